"""Triton kernels for SPADE normalisation; the math is in `fnevr.ops.spade_norm` and
csrc/spade_norm/spade_norm_math.h.

x is a contiguous [N, C, S] (NCHW) or [N, S, C] (channels_last) tensor. The reductions (statistics,
backward sums) run one program per (sample or all samples, tile of channels) over [BLOCK_C, BLOCK_S]
tiles: each tile's per-channel moments are taken around the tile's own mean and merged by Chan's rule,
so large means do not cancel. The element-wise passes work on tiles of one (n, c) row (NCHW) or of
rows x channels (channels_last), so finding an element's statistics costs a division per row, not
per element. eps and the leaky-ReLU slope are compile-time constants: Triton would pass them as
fp32, too coarse for fp64.
"""


import torch
import triton
import triton.language as tl

from ._common import accumulator, interpreting, launch_ctx


@triton.jit
def _act(z, ACT: tl.constexpr, slope):
    if ACT == 1:
        z = tl.where(z > 0.0, z, 0.0)
    elif ACT == 2:
        z = tl.where(z > 0.0, z, z * slope)
    return z


@triton.jit
def _act_grad(z, ACT: tl.constexpr, slope):
    one = z * 0.0 + 1.0  # in z's dtype: a bare float constant would be fp32
    if ACT == 1:
        d = tl.where(z > 0.0, one, 0.0)
    elif ACT == 2:
        d = tl.where(z > 0.0, one, one * slope)
    else:
        d = one
    return d


@triton.jit
def _tile(s0, chans, S, C, CL: tl.constexpr, BLOCK_S: tl.constexpr):
    """Offsets in one sample, and mask, of its [BLOCK_C, BLOCK_S] tile at spatial positions s0..."""
    s = s0 + tl.arange(0, BLOCK_S)
    if CL:
        offs = s[None, :] * C + chans[:, None]
    else:
        offs = chans[:, None] * S + s[None, :]
    return offs, (chans < C)[:, None] & (s < S)[None, :]


@triton.jit
def _moments(xn, chans, samples, C, S, CL: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
             BLOCK_S: tl.constexpr):
    """Per-channel (mean, biased variance) over `samples` consecutive samples from xn: each tile's
    moments around its own mean (corrected two-pass), merged by Chan's rule."""
    count = tl.zeros([BLOCK_C], ACC)
    mu = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for _ in range(0, samples):
        for s0 in range(0, S, BLOCK_S):
            offs, mask = _tile(s0, chans, S, C, CL, BLOCK_S)
            v = tl.load(xn + offs, mask=mask, other=0.0).to(ACC)
            cnt = tl.minimum(S - s0, BLOCK_S).to(ACC)
            shift = tl.sum(v, axis=1) / cnt
            d = tl.where(mask, v - shift[:, None], 0.0)
            d1 = tl.sum(d, axis=1)
            t_mean = shift + d1 / cnt
            t_m2 = tl.maximum(tl.sum(d * d, axis=1) - d1 * d1 / cnt, 0.0)
            total = count + cnt  # Chan's merge of (count, mu, m2) with the tile's (cnt, t_mean, t_m2)
            delta = t_mean - mu
            w = cnt / total
            mu += delta * w
            m2 += t_m2 + delta * delta * count * w
            count = total
        xn += C * S
    return mu, m2 / tl.maximum(count, 1.0)


@triton.jit
def _stats_kernel(x, mean, var, N, C, S, BATCH: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid_n = tl.program_id(0)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    xn = x + pid_n.to(tl.int64) * C * S  # this program's sample (batch norm: the first, then all)
    if BATCH:
        mu, v = _moments(xn, chans, N, C, S, CL, ACC, BLOCK_C, BLOCK_S)
        out = chans
    else:
        mu, v = _moments(xn, chans, 1, C, S, CL, ACC, BLOCK_C, BLOCK_S)
        out = pid_n * C + chans
    cmask = chans < C
    tl.store(mean + out, mu, mask=cmask)
    tl.store(var + out, v, mask=cmask)


@triton.jit
def _instance_forward_kernel(x, gamma, beta, y, mean, var, S, eps: tl.constexpr, slope: tl.constexpr,
                             ACT: tl.constexpr, G_FULL: tl.constexpr, B_FULL: tl.constexpr, ACC: tl.constexpr,
                             BLOCK_S: tl.constexpr, ONE_TILE: tl.constexpr):
    """Instance norm, NCHW: statistics and output of one (n, c) row in one program. With ONE_TILE the
    row is read once; else the statistics pass is followed by a second (mostly cached) read."""
    row = tl.program_id(0)
    base = row.to(tl.int64) * S
    pos = tl.arange(0, BLOCK_S)
    if ONE_TILE:
        mask = pos < S
        xv = tl.load(x + base + pos, mask=mask, other=0.0).to(ACC)
        shift = tl.sum(xv, axis=0) / S
        d = tl.where(mask, xv - shift, 0.0)
        d1 = tl.sum(d, axis=0)
        m = shift + d1 / S
        v = tl.maximum(tl.sum(d * d, axis=0) - d1 * d1 / S, 0.0) / S
    else:
        mu, vv = _moments(x + base, tl.arange(0, 1), 1, 1, S, False, ACC, 1, BLOCK_S)
        m = tl.sum(mu, axis=0)
        v = tl.sum(vv, axis=0)
    tl.store(mean + row, m)
    tl.store(var + row, v)
    rstd = 1.0 / tl.sqrt(v + eps)
    g_row = 0.0
    b_row = 0.0
    if not G_FULL:
        g_row = tl.load(gamma + row).to(ACC)
    if not B_FULL:
        b_row = tl.load(beta + row).to(ACC)
    for s0 in range(0, S, BLOCK_S):
        mask = s0 + pos < S
        offs = base + s0 + pos
        if not ONE_TILE:
            xv = tl.load(x + offs, mask=mask, other=0.0).to(ACC)
        if G_FULL:
            g = tl.load(gamma + offs, mask=mask, other=0.0).to(ACC)
        else:
            g = xv * 0.0 + g_row
        if B_FULL:
            b = tl.load(beta + offs, mask=mask, other=0.0).to(ACC)
        else:
            b = xv * 0.0 + b_row
        tl.store(y + offs, _act((xv - m) * rstd * (1.0 + g) + b, ACT, slope).to(y.dtype.element_ty), mask=mask)


@triton.jit
def _element_tile(x, gamma, beta, mean, var, eps, N, C, S, G_FULL: tl.constexpr, B_FULL: tl.constexpr,
                  BATCH: tl.constexpr, CL: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    """This program's [BLOCK_R, BLOCK_C] tile of the element-wise passes: (offsets, mask, xhat, rstd,
    gamma, beta, statistics index). NCHW: BLOCK_C positions of one (n, c) row (BLOCK_R = 1);
    channels_last: BLOCK_R (n, s) rows x BLOCK_C channels. Divisions are per row, not per element."""
    if CL:
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        offs = rows[:, None] * C + chans[None, :]
        mask = (rows < N * S)[:, None] & (chans < C)[None, :]
        nc = (rows // S)[:, None] * C + chans[None, :]
        if BATCH:
            grp = nc * 0 + chans[None, :]
        else:
            grp = nc
    else:
        row = tl.program_id(0)  # (n, c)
        pos = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        offs = (row.to(tl.int64) * S + pos)[None, :]
        mask = (pos < S)[None, :]
        nc = (pos * 0 + row)[None, :]
        if BATCH:
            grp = nc % C
        else:
            grp = nc
    m = tl.load(mean + grp, mask=mask, other=0.0)
    rstd = 1.0 / tl.sqrt(tl.load(var + grp, mask=mask, other=1.0) + eps)
    xhat = (tl.load(x + offs, mask=mask, other=0.0).to(ACC) - m) * rstd
    if G_FULL:
        g = tl.load(gamma + offs, mask=mask, other=0.0).to(ACC)
    else:
        g = tl.load(gamma + nc, mask=mask, other=0.0).to(ACC)
    if B_FULL:
        b = tl.load(beta + offs, mask=mask, other=0.0).to(ACC)
    else:
        b = tl.load(beta + nc, mask=mask, other=0.0).to(ACC)
    return offs, mask, xhat, rstd, g, b, grp


@triton.jit
def _forward_kernel(x, gamma, beta, mean, var, y, N, C, S, eps: tl.constexpr, slope: tl.constexpr, ACT: tl.constexpr,
                    G_FULL: tl.constexpr, B_FULL: tl.constexpr, BATCH: tl.constexpr, CL: tl.constexpr,
                    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    offs, mask, xhat, _, g, b, _ = _element_tile(x, gamma, beta, mean, var, eps, N, C, S, G_FULL, B_FULL, BATCH, CL,
                                                 ACC, BLOCK_R, BLOCK_C)
    tl.store(y + offs, _act(xhat * (1.0 + g) + b, ACT, slope).to(y.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_kernel(grad_y, x, gamma, beta, mean, var, sums, N, C, S, eps: tl.constexpr, slope: tl.constexpr,
                   ACT: tl.constexpr, G_FULL: tl.constexpr, B_FULL: tl.constexpr, BATCH: tl.constexpr, CL: tl.constexpr,
                   ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    n = tl.program_id(0)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = chans < C
    nc = n * C + chans
    if BATCH:
        grp = chans
    else:
        grp = nc
    m = tl.load(mean + grp, mask=cmask, other=0.0)
    rstd = 1.0 / tl.sqrt(tl.load(var + grp, mask=cmask, other=1.0) + eps)
    g_nc = tl.zeros([BLOCK_C], ACC)
    b_nc = tl.zeros([BLOCK_C], ACC)
    if not G_FULL:
        g_nc = tl.load(gamma + nc, mask=cmask, other=0.0).to(ACC)
    if not B_FULL:
        b_nc = tl.load(beta + nc, mask=cmask, other=0.0).to(ACC)
    s_dxhat = tl.zeros([BLOCK_C], ACC)
    s_dxhat_xhat = tl.zeros([BLOCK_C], ACC)
    s_dz = tl.zeros([BLOCK_C], ACC)
    s_dz_xhat = tl.zeros([BLOCK_C], ACC)
    base = n.to(tl.int64) * C * S
    for s0 in range(0, S, BLOCK_S):
        offs, mask = _tile(s0, chans, S, C, CL, BLOCK_S)
        offs = base + offs
        xhat = (tl.load(x + offs, mask=mask, other=0.0).to(ACC) - m[:, None]) * rstd[:, None]
        dy = tl.load(grad_y + offs, mask=mask, other=0.0).to(ACC)
        if G_FULL:
            g = tl.load(gamma + offs, mask=mask, other=0.0).to(ACC)
        else:
            g = g_nc[:, None] + xhat * 0.0
        if B_FULL:
            b = tl.load(beta + offs, mask=mask, other=0.0).to(ACC)
        else:
            b = b_nc[:, None] + xhat * 0.0
        dz = tl.where(mask, dy * _act_grad(xhat * (1.0 + g) + b, ACT, slope), 0.0)
        dxhat = dz * (1.0 + g)
        s_dxhat += tl.sum(dxhat, axis=1)
        s_dxhat_xhat += tl.sum(dxhat * xhat, axis=1)
        s_dz += tl.sum(dz, axis=1)
        s_dz_xhat += tl.sum(dz * xhat, axis=1)
    NC = N * C
    tl.store(sums + nc, s_dxhat, mask=cmask)
    tl.store(sums + NC + nc, s_dxhat_xhat, mask=cmask)
    tl.store(sums + 2 * NC + nc, s_dz, mask=cmask)
    tl.store(sums + 3 * NC + nc, s_dz_xhat, mask=cmask)


@triton.jit
def _backward_kernel(grad_y, x, gamma, beta, mean, var, group_means, dx, dgamma, dbeta, G, N, C, S,
                     eps: tl.constexpr, slope: tl.constexpr, ACT: tl.constexpr, G_FULL: tl.constexpr,
                     B_FULL: tl.constexpr, BATCH: tl.constexpr, CL: tl.constexpr, GAMMA_GRAD: tl.constexpr,
                     BETA_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    offs, mask, xhat, rstd, g, b, grp = _element_tile(x, gamma, beta, mean, var, eps, N, C, S, G_FULL, B_FULL, BATCH,
                                                      CL, ACC, BLOCK_R, BLOCK_C)
    c1 = tl.load(group_means + grp, mask=mask, other=0.0)
    c2 = tl.load(group_means + G + grp, mask=mask, other=0.0)
    dz = tl.load(grad_y + offs, mask=mask, other=0.0).to(ACC) * _act_grad(xhat * (1.0 + g) + b, ACT, slope)
    dxhat = dz * (1.0 + g)
    tl.store(dx + offs, (rstd * (dxhat - c1 - xhat * c2)).to(dx.dtype.element_ty), mask=mask)
    if GAMMA_GRAD:
        tl.store(dgamma + offs, (dz * xhat).to(dgamma.dtype.element_ty), mask=mask)
    if BETA_GRAD:
        tl.store(dbeta + offs, dz.to(dbeta.dtype.element_ty), mask=mask)


@triton.jit
def _instance_tile(grad_y, x, gamma, beta, offs, mask, g_row, b_row, m, rstd, slope, ACT: tl.constexpr,
                   G_FULL: tl.constexpr, B_FULL: tl.constexpr, ACC: tl.constexpr):
    """One tile of an (n, c) row: (xhat, dz, dxhat), zero where masked."""
    dy = tl.load(grad_y + offs, mask=mask, other=0.0).to(ACC)
    xv = tl.load(x + offs, mask=mask, other=0.0).to(ACC)
    if G_FULL:
        g = tl.load(gamma + offs, mask=mask, other=0.0).to(ACC)
    else:
        g = xv * 0.0 + g_row
    if B_FULL:
        b = tl.load(beta + offs, mask=mask, other=0.0).to(ACC)
    else:
        b = xv * 0.0 + b_row
    xhat = tl.where(mask, (xv - m) * rstd, 0.0)
    dz = tl.where(mask, dy * _act_grad(xhat * (1.0 + g) + b, ACT, slope), 0.0)
    return xhat, dz, dz * (1.0 + g)


@triton.jit
def _instance_store(dx, dgamma, dbeta, offs, mask, xhat, dz, dxhat, rstd, c1, c2, G_FULL: tl.constexpr,
                    B_FULL: tl.constexpr, GAMMA_GRAD: tl.constexpr, BETA_GRAD: tl.constexpr):
    tl.store(dx + offs, (rstd * (dxhat - c1 - xhat * c2)).to(dx.dtype.element_ty), mask=mask)
    if GAMMA_GRAD and G_FULL:
        tl.store(dgamma + offs, (dz * xhat).to(dgamma.dtype.element_ty), mask=mask)
    if BETA_GRAD and B_FULL:
        tl.store(dbeta + offs, dz.to(dbeta.dtype.element_ty), mask=mask)


@triton.jit
def _instance_backward_kernel(grad_y, x, gamma, beta, mean, var, dx, dgamma, dbeta, S, eps: tl.constexpr,
                              slope: tl.constexpr, ACT: tl.constexpr, G_FULL: tl.constexpr, B_FULL: tl.constexpr,
                              GAMMA_GRAD: tl.constexpr, BETA_GRAD: tl.constexpr, ACC: tl.constexpr,
                              BLOCK_S: tl.constexpr, ONE_TILE: tl.constexpr):
    """Instance norm, NCHW: the whole backward of one (n, c) row. With ONE_TILE the row is loaded
    once and stays in registers for both the group sums and the gradients; else a second pass
    re-reads it (from cache, mostly). [N, C] gamma/beta get their gradients as row sums."""
    row = tl.program_id(0)
    base = row.to(tl.int64) * S
    m = tl.load(mean + row)
    rstd = 1.0 / tl.sqrt(tl.load(var + row) + eps)
    g_row = 0.0
    b_row = 0.0
    if not G_FULL:
        g_row = tl.load(gamma + row).to(ACC)
    if not B_FULL:
        b_row = tl.load(beta + row).to(ACC)
    pos = tl.arange(0, BLOCK_S)
    if ONE_TILE:
        mask = pos < S
        offs = base + pos
        xhat, dz, dxhat = _instance_tile(grad_y, x, gamma, beta, offs, mask, g_row, b_row, m, rstd, slope, ACT,
                                         G_FULL, B_FULL, ACC)
        s_dz = tl.sum(dz, axis=0)
        s_dz_xhat = tl.sum(dz * xhat, axis=0)
        c1 = tl.sum(dxhat, axis=0) / S
        c2 = tl.sum(dxhat * xhat, axis=0) / S
        _instance_store(dx, dgamma, dbeta, offs, mask, xhat, dz, dxhat, rstd, c1, c2, G_FULL, B_FULL, GAMMA_GRAD,
                        BETA_GRAD)
    else:
        a_dxhat = tl.zeros([BLOCK_S], ACC)
        a_dxhat_xhat = tl.zeros([BLOCK_S], ACC)
        a_dz = tl.zeros([BLOCK_S], ACC)
        a_dz_xhat = tl.zeros([BLOCK_S], ACC)
        for s0 in range(0, S, BLOCK_S):
            mask = s0 + pos < S
            xhat, dz, dxhat = _instance_tile(grad_y, x, gamma, beta, base + s0 + pos, mask, g_row, b_row, m, rstd,
                                             slope, ACT, G_FULL, B_FULL, ACC)
            a_dxhat += dxhat
            a_dxhat_xhat += dxhat * xhat
            a_dz += dz
            a_dz_xhat += dz * xhat
        s_dz = tl.sum(a_dz, axis=0)
        s_dz_xhat = tl.sum(a_dz_xhat, axis=0)
        c1 = tl.sum(a_dxhat, axis=0) / S
        c2 = tl.sum(a_dxhat_xhat, axis=0) / S
        for s0 in range(0, S, BLOCK_S):
            mask = s0 + pos < S
            offs = base + s0 + pos
            xhat, dz, dxhat = _instance_tile(grad_y, x, gamma, beta, offs, mask, g_row, b_row, m, rstd, slope, ACT,
                                             G_FULL, B_FULL, ACC)
            _instance_store(dx, dgamma, dbeta, offs, mask, xhat, dz, dxhat, rstd, c1, c2, G_FULL, B_FULL,
                            GAMMA_GRAD, BETA_GRAD)
    if GAMMA_GRAD and not G_FULL:
        tl.store(dgamma + row, s_dz_xhat.to(dgamma.dtype.element_ty))
    if BETA_GRAD and not B_FULL:
        tl.store(dbeta + row, s_dz.to(dbeta.dtype.element_ty))


_ONE_TILE_MAX = 4096  # rows up to this long are read once by the fused instance-norm kernels


def _element_blocks(N: int, C: int, S: int, channels_last: bool):
    """(grid, BLOCK_R, BLOCK_C) of the element-wise kernels: tiles of about 2K elements."""
    if channels_last:
        block_c = min(128, triton.next_power_of_2(max(C, 1)))
        block_r = max(1, 2048 // block_c)
        return (triton.cdiv(N * S, block_r), triton.cdiv(C, block_c)), block_r, block_c
    block_c = min(2048, triton.next_power_of_2(max(S, 1)))
    return (N * C, triton.cdiv(S, block_c)), 1, block_c


def _dims(x: torch.Tensor, channels_last: bool):
    N, A, B = x.shape
    return (N, B, A) if channels_last else (N, A, B)  # N, C, S


def _reduce_blocks(C: int, S: int, channels_last: bool):
    """(BLOCK_C, BLOCK_S) of about 4K elements (8 warps: 16 per thread); NCHW tiles are one
    channel's run of S."""
    if channels_last:
        block_c = min(64, triton.next_power_of_2(max(C, 1)))
        return block_c, max(1, min(triton.next_power_of_2(max(S, 1)), 4096 // block_c))
    return 1, min(4096, triton.next_power_of_2(max(S, 1)))


def _as_fp32(*ts):
    return [t.float() if t.dtype == torch.bfloat16 else t for t in ts]


def spade_norm_stats(x: torch.Tensor, channels_last: bool, batch: bool):
    """-> (mean, biased var) [C] (batch) or [N, C], fp32 (fp64 for fp64)."""
    if interpreting() and x.dtype == torch.bfloat16:  # numpy has no bf16
        return spade_norm_stats(x.float(), channels_last, batch)
    N, C, S = _dims(x, channels_last)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = (C,) if batch else (N, C)
    mean = torch.zeros(shape, dtype=acc, device=x.device)
    var = torch.zeros(shape, dtype=acc, device=x.device)
    if x.numel() == 0:
        return mean, var
    block_c, block_s = _reduce_blocks(C, S, channels_last)
    grid = (1 if batch else N, triton.cdiv(C, block_c))
    with launch_ctx(x):
        _stats_kernel[grid](x, mean, var, N, C, S, BATCH=batch, CL=channels_last, ACC=accumulator(x.dtype),
                            BLOCK_C=block_c, BLOCK_S=block_s, num_warps=8)
    return mean, var


def spade_norm_forward(x, gamma, beta, mean, var, eps: float, channels_last: bool, activation: int, slope: float):
    """-> y = act(xhat (1 + gamma) + beta), like x."""
    if interpreting() and x.dtype == torch.bfloat16:
        return spade_norm_forward(*_as_fp32(x, gamma, beta), mean, var, eps, channels_last, activation,
                                  slope).to(x.dtype)
    N, C, S = _dims(x, channels_last)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    grid, block_r, block_c = _element_blocks(N, C, S, channels_last)
    with launch_ctx(x):
        _forward_kernel[grid](
            x, gamma, beta, mean, var, y, N, C, S, eps=eps, slope=slope, ACT=activation, G_FULL=gamma.dim() == 3,
            B_FULL=beta.dim() == 3, BATCH=mean.dim() == 1, CL=channels_last, ACC=accumulator(x.dtype), BLOCK_R=block_r,
            BLOCK_C=block_c)
    return y


def spade_norm_backward_reduce(grad_y, x, gamma, beta, mean, var, eps: float, channels_last: bool, activation: int,
                               slope: float):
    """-> [4, N, C] per-(n, c) sums of dxhat, dxhat xhat, dz, dz xhat (statistics' dtype)."""
    if interpreting() and x.dtype == torch.bfloat16:
        return spade_norm_backward_reduce(*_as_fp32(grad_y, x, gamma, beta), mean, var, eps, channels_last,
                                          activation, slope)
    N, C, S = _dims(x, channels_last)
    sums = torch.zeros((4, N, C), dtype=mean.dtype, device=x.device)
    if x.numel() == 0:
        return sums
    block_c, block_s = _reduce_blocks(C, S, channels_last)
    with launch_ctx(x):
        _reduce_kernel[(N, triton.cdiv(C, block_c))](
            grad_y, x, gamma, beta, mean, var, sums, N, C, S, eps=eps, slope=slope, ACT=activation,
            G_FULL=gamma.dim() == 3,
            B_FULL=beta.dim() == 3, BATCH=mean.dim() == 1, CL=channels_last, ACC=accumulator(x.dtype), BLOCK_C=block_c,
            BLOCK_S=block_s, num_warps=8)
    return sums


def spade_norm_backward(grad_y, x, gamma, beta, mean, var, group_sums, scale: float, eps: float, channels_last: bool,
                        activation: int, slope: float, gamma_grad: bool, beta_grad: bool):
    """-> (dx like x; dgamma, dbeta like x when asked for (full-size gamma/beta), else empty)."""
    if interpreting() and x.dtype == torch.bfloat16:
        grads = spade_norm_backward(*_as_fp32(grad_y, x, gamma, beta), mean, var, group_sums, scale, eps,
                                    channels_last, activation, slope, gamma_grad, beta_grad)
        return tuple(t.to(x.dtype) for t in grads)
    N, C, S = _dims(x, channels_last)
    dx = torch.empty_like(x)
    dg = torch.empty_like(x) if gamma_grad else x.new_empty((0,))
    db = torch.empty_like(x) if beta_grad else x.new_empty((0,))
    if x.numel() == 0:
        return dx, dg, db
    grid, block_r, block_c = _element_blocks(N, C, S, channels_last)
    with launch_ctx(x):
        _backward_kernel[grid](
            grad_y, x, gamma, beta, mean, var, group_sums * scale, dx, dg, db, mean.numel(), N, C, S, eps=eps,
            slope=slope, ACT=activation, G_FULL=gamma.dim() == 3, B_FULL=beta.dim() == 3, BATCH=mean.dim() == 1,
            CL=channels_last, GAMMA_GRAD=gamma_grad, BETA_GRAD=beta_grad, ACC=accumulator(x.dtype), BLOCK_R=block_r,
            BLOCK_C=block_c)
    return dx, dg, db


def spade_norm_instance_backward(grad_y, x, gamma, beta, mean, var, eps: float, activation: int, slope: float,
                                 gamma_grad: bool, beta_grad: bool):
    """Instance norm of an NCHW x ([N, C, S]), whole backward in one kernel -> (dx; dgamma, dbeta
    shaped like gamma, beta when asked for, else empty)."""
    if interpreting() and x.dtype == torch.bfloat16:
        grads = spade_norm_instance_backward(*_as_fp32(grad_y, x, gamma, beta), mean, var, eps, activation, slope,
                                             gamma_grad, beta_grad)
        return tuple(t.to(x.dtype) for t in grads)
    N, C, S = x.shape
    dx = torch.empty_like(x)
    dg = torch.empty_like(gamma) if gamma_grad else x.new_empty((0,))
    db = torch.empty_like(beta) if beta_grad else x.new_empty((0,))
    if x.numel() == 0:
        return dx, dg.zero_(), db.zero_()
    block_s = min(_ONE_TILE_MAX, triton.next_power_of_2(S))
    with launch_ctx(x):
        _instance_backward_kernel[(N * C,)](
            grad_y, x, gamma, beta, mean, var, dx, dg, db, S, eps=eps, slope=slope, ACT=activation,
            G_FULL=gamma.dim() == 3, B_FULL=beta.dim() == 3, GAMMA_GRAD=gamma_grad, BETA_GRAD=beta_grad,
            ACC=accumulator(x.dtype), BLOCK_S=block_s, ONE_TILE=S <= block_s, num_warps=8 if block_s >= 2048 else 4)
    return dx, dg, db


def spade_norm_instance_forward(x, gamma, beta, eps: float, activation: int, slope: float):
    """Instance norm of an NCHW x ([N, C, S]), statistics and output in one kernel -> (y, mean, var)."""
    if interpreting() and x.dtype == torch.bfloat16:
        y, mean, var = spade_norm_instance_forward(*_as_fp32(x, gamma, beta), eps, activation, slope)
        return y.to(x.dtype), mean, var
    N, C, S = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.empty_like(x)
    mean = torch.zeros((N, C), dtype=acc, device=x.device)
    var = torch.zeros((N, C), dtype=acc, device=x.device)
    if x.numel() == 0:
        return y, mean, var
    block_s = min(_ONE_TILE_MAX, triton.next_power_of_2(S))
    with launch_ctx(x):
        _instance_forward_kernel[(N * C,)](
            x, gamma, beta, y, mean, var, S, eps=eps, slope=slope, ACT=activation, G_FULL=gamma.dim() == 3,
            B_FULL=beta.dim() == 3, ACC=accumulator(x.dtype), BLOCK_S=block_s, ONE_TILE=S <= block_s,
            num_warps=8 if block_s >= 2048 else 4)
    return y, mean, var
