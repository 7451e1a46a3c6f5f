"""Triton kernels for SPADE normalisation; the math is in `fnevr.ops.spade_norm` and
csrc/spade_norm/spade_norm_math.h.

x is a contiguous [N, C, S] (NCHW) or [N, S, C] (channels_last) tensor. The reductions (statistics,
backward sums) run over [BLOCK_C, BLOCK_S] tiles: each tile's per-channel moments are taken around the
tile's own mean and merged by Chan's rule, so large means do not cancel. So that a GPU fills up when
there are few (sample, channel tile) pairs (channels_last, batch norm), each pair's positions (and,
for batch norm, its samples) are cut into pieces, one program each, whose partial results a second
small kernel merges in a fixed order (deterministic). The element-wise passes work on tiles of one
(n, c) row (NCHW) or of rows x channels (channels_last), so finding an element's statistics costs a
division per row, not per element. eps and the leaky-ReLU slope are compile-time constants: Triton
would pass them as fp32, too coarse for fp64.
"""

import dataclasses

import torch
import triton
import triton.language as tl

from ._common import LEAKY_RELU, RELU, accumulator, cdiv, interpreting, launch_ctx, multiprocessors, next_power_of_2


@triton.jit
def _act(z, ACT: tl.constexpr, slope):
    """act(z); at NaN as PyTorch (spade_norm_math.h): relu(NaN) = NaN, relu'(NaN) = 1, leaky_relu'(NaN) = slope."""
    if ACT == RELU:
        z = tl.where(z <= 0.0, 0.0, z)
    elif ACT == LEAKY_RELU:
        z = tl.where(z > 0.0, z, z * slope)
    return z


@triton.jit
def _act_backward(dy, z, ACT: tl.constexpr, slope):
    """dy act'(z), as PyTorch: relu's is a select (a NaN or inf dy where relu is off gives 0),
    leaky_relu's a product; relu'(NaN) = 1, leaky_relu'(NaN) = slope."""
    if ACT == RELU:
        d = tl.where(z <= 0.0, 0.0, dy)
    elif ACT == LEAKY_RELU:
        d = tl.where(z > 0.0, dy, dy * slope)
    else:
        d = dy
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
def _moments(
    xn,
    chans,
    samples,
    t_lo,
    t_hi,
    C,
    S,
    CL: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Per-channel (mean, biased variance) over tiles t_lo..t_hi of positions of `samples` consecutive
    samples from xn: each tile's moments around its own mean (corrected two-pass), merged by Chan's
    rule. (A loop over tile indices, not positions, lets the compiler see the tiles' alignment.)"""
    count = tl.zeros([BLOCK_C], ACC)
    mu = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for _ in range(0, samples):
        for t in range(t_lo, t_hi):
            s0 = t * BLOCK_S
            offs, mask = _tile(s0, chans, S, C, CL, BLOCK_S)
            v = tl.load(xn + offs, mask=mask, other=0.0).to(ACC)
            cnt = tl.minimum(S - s0, BLOCK_S).to(ACC)
            shift = tl.sum(v, axis=1) / cnt
            d = tl.where(mask, v - shift[:, None], 0.0)
            d1 = tl.sum(d, axis=1)
            t_mean = shift + d1 / cnt
            t_m2 = _clamp0(tl.sum(d * d, axis=1) - d1 * d1 / cnt)
            count, mu, m2 = _chan(count, mu, m2, cnt, t_mean, t_m2)
        xn += C * S
    return mu, m2 / tl.maximum(count, 1.0)


@triton.jit
def _clamp0(m2):
    """M2 >= 0 against rounding; NaN stays NaN (tl.maximum may drop it on a GPU)."""
    return tl.where(m2 < 0.0, 0.0, m2)


@triton.jit
def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan's merge of two (count, mean, M2) partials. An empty partial (count 0, mean 0) leaves the
    other unchanged while it is finite; a NaN or inf stays one."""
    n = n_a + n_b
    delta = mean_b - mean_a
    w = tl.where(n > 0.0, n_b / tl.maximum(n, 1.0), 0.0)
    return n, mean_a + delta * w, m2_a + m2_b + delta * delta * n_a * w


@triton.jit
def _stats_kernel(
    x,
    mean,
    var,
    N,
    C,
    S,
    per_group,
    chunk_tiles,
    CL: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """(mean, biased var) of sample group program 0, chunk program 1 (of chunk_tiles tiles) and
    program 2's channels: piece p of _Split at [p, C]."""
    n0 = tl.program_id(0) * per_group
    piece = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    t_lo = tl.program_id(1) * chunk_tiles
    chans = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mu, v = _moments(
        x + n0.to(tl.int64) * C * S,
        chans,
        tl.minimum(per_group, N - n0),
        t_lo,
        tl.minimum(t_lo + chunk_tiles, tl.cdiv(S, BLOCK_S)),
        C,
        S,
        CL,
        ACC,
        BLOCK_C,
        BLOCK_S,
    )
    cmask = chans < C
    tl.store(mean + piece * C + chans, mu, mask=cmask)
    tl.store(var + piece * C + chans, v, mask=cmask)


@triton.jit
def _merge_moments_kernel(
    pmean,
    pvar,
    mean,
    var,
    G,
    Q,
    N,
    S,
    groups,
    per_group,
    chunk,
    ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Merges the Q partials (mean, biased var) [Q, G] of each of G groups by Chan's rule: a fixed
    tree within [BLOCK_Q, BLOCK_G] tiles, then tile after tile. Partial q covers sample group
    q % groups (per_group samples, fewer in the last) and chunk q // groups (chunk positions, fewer in
    the last): its element count. Instance norm passes N = groups = per_group = 1."""
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = g < G
    count = tl.zeros([BLOCK_G], ACC)
    mu = tl.zeros([BLOCK_G], ACC)
    m2 = tl.zeros([BLOCK_G], ACC)
    for q0 in range(0, Q, BLOCK_Q):
        q = q0 + tl.arange(0, BLOCK_Q)
        mask = (q < Q)[:, None] & gmask[None, :]
        offs = q[:, None] * G + g[None, :]
        n0 = (q % groups) * per_group
        s_lo = (q // groups) * chunk
        cnt = (tl.minimum(per_group, N - n0).to(ACC) * tl.minimum(chunk, S - s_lo).to(ACC))[:, None]
        cnt = tl.where(mask, cnt, 0.0)
        t_mean = tl.load(pmean + offs, mask=mask, other=0.0)
        t_m2 = tl.load(pvar + offs, mask=mask, other=0.0) * cnt
        t_n, t_mean, t_m2 = tl.reduce((cnt, t_mean, t_m2), 0, _chan)
        count, mu, m2 = _chan(count, mu, m2, t_n, t_mean, t_m2)
    tl.store(mean + g, mu, mask=gmask)
    tl.store(var + g, m2 / tl.maximum(count, 1.0), mask=gmask)


@triton.jit
def _merge_sums_kernel(part, sums, G, Q, BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr):
    """sums [4, G] = the sums over q of part [4, Q, G]: a fixed tree within tiles, then tile after tile."""
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = g < G
    for k in tl.static_range(4):
        total = tl.zeros([BLOCK_G], sums.dtype.element_ty)
        for q0 in range(0, Q, BLOCK_Q):
            q = q0 + tl.arange(0, BLOCK_Q)
            mask = (q < Q)[:, None] & gmask[None, :]
            total += tl.sum(tl.load(part + (k * Q + q[:, None]) * G + g[None, :], mask=mask, other=0.0), axis=0)
        tl.store(sums + k * G + g, total, mask=gmask)


@triton.jit
def _instance_forward_kernel(
    x,
    gamma,
    beta,
    y,
    mean,
    var,
    S,
    eps: tl.constexpr,
    slope: tl.constexpr,
    ACT: tl.constexpr,
    G_FULL: tl.constexpr,
    B_FULL: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_S: tl.constexpr,
    ONE_TILE: tl.constexpr,
):
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
        v = _clamp0(tl.sum(d * d, axis=0) - d1 * d1 / S) / S
    else:
        mu, vv = _moments(x + base, tl.arange(0, 1), 1, 0, tl.cdiv(S, BLOCK_S), 1, S, False, ACC, 1, BLOCK_S)
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
def _element_tile(
    x,
    gamma,
    beta,
    mean,
    var,
    eps,
    N,
    C,
    S,
    G_FULL: tl.constexpr,
    B_FULL: tl.constexpr,
    BATCH: tl.constexpr,
    CL: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
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
def _forward_kernel(
    x,
    gamma,
    beta,
    mean,
    var,
    y,
    N,
    C,
    S,
    eps: tl.constexpr,
    slope: tl.constexpr,
    ACT: tl.constexpr,
    G_FULL: tl.constexpr,
    B_FULL: tl.constexpr,
    BATCH: tl.constexpr,
    CL: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs, mask, xhat, _, g, b, _ = _element_tile(
        x, gamma, beta, mean, var, eps, N, C, S, G_FULL, B_FULL, BATCH, CL, ACC, BLOCK_R, BLOCK_C
    )
    tl.store(y + offs, _act(xhat * (1.0 + g) + b, ACT, slope).to(y.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_kernel(
    grad_y,
    x,
    gamma,
    beta,
    mean,
    var,
    sums,
    N,
    C,
    S,
    chunk_tiles,
    eps: tl.constexpr,
    slope: tl.constexpr,
    ACT: tl.constexpr,
    G_FULL: tl.constexpr,
    B_FULL: tl.constexpr,
    BATCH: tl.constexpr,
    CL: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Sums of sample n = program 0, chunk j = program 1 (of chunk_tiles tiles) and program 2's
    channels: piece j N + n of [4, pieces, C]."""
    n = tl.program_id(0)
    piece = tl.program_id(1) * N + n
    t_lo = tl.program_id(1) * chunk_tiles
    chans = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
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
    for t in range(t_lo, tl.minimum(t_lo + chunk_tiles, tl.cdiv(S, BLOCK_S))):
        offs, mask = _tile(t * BLOCK_S, chans, S, C, CL, BLOCK_S)  # a tile index: the compiler sees s0's alignment
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
        dz = tl.where(mask, _act_backward(dy, xhat * (1.0 + g) + b, ACT, slope), 0.0)
        dxhat = dz * (1.0 + g)
        s_dxhat += tl.sum(dxhat, axis=1)
        s_dxhat_xhat += tl.sum(dxhat * xhat, axis=1)
        s_dz += tl.sum(dz, axis=1)
        s_dz_xhat += tl.sum(dz * xhat, axis=1)
    P = tl.num_programs(0) * tl.num_programs(1) * C
    out = piece * C + chans
    tl.store(sums + out, s_dxhat, mask=cmask)
    tl.store(sums + P + out, s_dxhat_xhat, mask=cmask)
    tl.store(sums + 2 * P + out, s_dz, mask=cmask)
    tl.store(sums + 3 * P + out, s_dz_xhat, mask=cmask)


@triton.jit
def _backward_kernel(
    grad_y,
    x,
    gamma,
    beta,
    mean,
    var,
    group_means,
    dx,
    dgamma,
    dbeta,
    G,
    N,
    C,
    S,
    eps: tl.constexpr,
    slope: tl.constexpr,
    ACT: tl.constexpr,
    G_FULL: tl.constexpr,
    B_FULL: tl.constexpr,
    BATCH: tl.constexpr,
    CL: tl.constexpr,
    GAMMA_GRAD: tl.constexpr,
    BETA_GRAD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs, mask, xhat, rstd, g, b, grp = _element_tile(
        x, gamma, beta, mean, var, eps, N, C, S, G_FULL, B_FULL, BATCH, CL, ACC, BLOCK_R, BLOCK_C
    )
    c1 = tl.load(group_means + grp, mask=mask, other=0.0)
    c2 = tl.load(group_means + G + grp, mask=mask, other=0.0)
    dz = _act_backward(tl.load(grad_y + offs, mask=mask, other=0.0).to(ACC), xhat * (1.0 + g) + b, ACT, slope)
    dxhat = dz * (1.0 + g)
    tl.store(dx + offs, (rstd * (dxhat - c1 - xhat * c2)).to(dx.dtype.element_ty), mask=mask)
    if GAMMA_GRAD:
        tl.store(dgamma + offs, (dz * xhat).to(dgamma.dtype.element_ty), mask=mask)
    if BETA_GRAD:
        tl.store(dbeta + offs, dz.to(dbeta.dtype.element_ty), mask=mask)


@triton.jit
def _instance_tile(
    grad_y,
    x,
    gamma,
    beta,
    offs,
    mask,
    g_row,
    b_row,
    m,
    rstd,
    slope,
    ACT: tl.constexpr,
    G_FULL: tl.constexpr,
    B_FULL: tl.constexpr,
    ACC: tl.constexpr,
):
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
    dz = tl.where(mask, _act_backward(dy, xhat * (1.0 + g) + b, ACT, slope), 0.0)
    return xhat, dz, dz * (1.0 + g)


@triton.jit
def _instance_store(
    dx,
    dgamma,
    dbeta,
    offs,
    mask,
    xhat,
    dz,
    dxhat,
    rstd,
    c1,
    c2,
    G_FULL: tl.constexpr,
    B_FULL: tl.constexpr,
    GAMMA_GRAD: tl.constexpr,
    BETA_GRAD: tl.constexpr,
):
    tl.store(dx + offs, (rstd * (dxhat - c1 - xhat * c2)).to(dx.dtype.element_ty), mask=mask)
    if GAMMA_GRAD and G_FULL:
        tl.store(dgamma + offs, (dz * xhat).to(dgamma.dtype.element_ty), mask=mask)
    if BETA_GRAD and B_FULL:
        tl.store(dbeta + offs, dz.to(dbeta.dtype.element_ty), mask=mask)


@triton.jit
def _instance_backward_kernel(
    grad_y,
    x,
    gamma,
    beta,
    mean,
    var,
    dx,
    dgamma,
    dbeta,
    S,
    eps: tl.constexpr,
    slope: tl.constexpr,
    ACT: tl.constexpr,
    G_FULL: tl.constexpr,
    B_FULL: tl.constexpr,
    GAMMA_GRAD: tl.constexpr,
    BETA_GRAD: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_S: tl.constexpr,
    ONE_TILE: tl.constexpr,
):
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
        xhat, dz, dxhat = _instance_tile(
            grad_y, x, gamma, beta, offs, mask, g_row, b_row, m, rstd, slope, ACT, G_FULL, B_FULL, ACC
        )
        s_dz = tl.sum(dz, axis=0)
        s_dz_xhat = tl.sum(dz * xhat, axis=0)
        c1 = tl.sum(dxhat, axis=0) / S
        c2 = tl.sum(dxhat * xhat, axis=0) / S
        _instance_store(
            dx, dgamma, dbeta, offs, mask, xhat, dz, dxhat, rstd, c1, c2, G_FULL, B_FULL, GAMMA_GRAD, BETA_GRAD
        )
    else:
        a_dxhat = tl.zeros([BLOCK_S], ACC)
        a_dxhat_xhat = tl.zeros([BLOCK_S], ACC)
        a_dz = tl.zeros([BLOCK_S], ACC)
        a_dz_xhat = tl.zeros([BLOCK_S], ACC)
        for s0 in range(0, S, BLOCK_S):
            mask = s0 + pos < S
            xhat, dz, dxhat = _instance_tile(
                grad_y, x, gamma, beta, base + s0 + pos, mask, g_row, b_row, m, rstd, slope, ACT, G_FULL, B_FULL, ACC
            )
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
            xhat, dz, dxhat = _instance_tile(
                grad_y, x, gamma, beta, offs, mask, g_row, b_row, m, rstd, slope, ACT, G_FULL, B_FULL, ACC
            )
            _instance_store(
                dx, dgamma, dbeta, offs, mask, xhat, dz, dxhat, rstd, c1, c2, G_FULL, B_FULL, GAMMA_GRAD, BETA_GRAD
            )
    if GAMMA_GRAD and not G_FULL:
        tl.store(dgamma + row, s_dz_xhat.to(dgamma.dtype.element_ty))
    if BETA_GRAD and not B_FULL:
        tl.store(dbeta + row, s_dz.to(dbeta.dtype.element_ty))


_ONE_TILE_MAX = 4096  # rows up to this long are read once by the fused instance-norm kernels


def _element_blocks(N: int, C: int, S: int, channels_last: bool):
    """(grid, BLOCK_R, BLOCK_C) of the element-wise kernels: tiles of about 2K elements."""
    if channels_last:
        block_c = min(128, next_power_of_2(max(C, 1)))
        block_r = max(1, 2048 // block_c)
        return (cdiv(N * S, block_r), cdiv(C, block_c)), block_r, block_c
    block_c = min(2048, next_power_of_2(max(S, 1)))
    return (N * C, cdiv(S, block_c)), 1, block_c


def _dims(x: torch.Tensor, channels_last: bool):
    N, A, B = x.shape
    return (N, B, A) if channels_last else (N, A, B)  # N, C, S


_REDUCE_TILE = 4096  # elements of a reduction tile (8 warps: 16 per thread)
_PROGRAMS_PER_SM = 4  # reductions are cut into pieces until about this many programs per multiprocessor run
_INTERPRETER_SMS = 2  # CPU tensors in the interpreter: few, so that the tests' small shapes are cut too
_MERGE_Q, _MERGE_G = 256, 8  # merge tiles: partials x groups (many partials of few groups is the common case)


def _reduce_blocks(C: int, S: int, channels_last: bool):
    """(BLOCK_C, BLOCK_S) of _REDUCE_TILE elements; NCHW tiles are one channel's run of S."""
    if channels_last:
        block_c = min(64, next_power_of_2(max(C, 1)))
        return block_c, max(1, min(next_power_of_2(max(S, 1)), _REDUCE_TILE // block_c))
    return 1, min(_REDUCE_TILE, next_power_of_2(max(S, 1)))


@dataclasses.dataclass(frozen=True)
class _Split:
    """How a reduction over N samples x S positions is cut for (channel tiles) x pieces programs: piece
    p covers the per_group samples (fewer in the last group) of group p % groups and the chunk
    positions (fewer in the last chunk, a whole number of tiles in the others) of chunk p // groups."""

    groups: int
    per_group: int
    chunk: int
    chunks: int

    @property
    def pieces(self) -> int:
        return self.groups * self.chunks


def _split(N: int, S: int, block_s: int, channel_tiles: int, device: torch.device, batch: bool) -> _Split:
    """Instance norm (and the backward sums, per (n, c)): groups of one sample, positions cut until
    the programs fill the GPU. Batch norm: samples grouped as far as that fills it, then positions cut."""
    target = _PROGRAMS_PER_SM * multiprocessors(device, _INTERPRETER_SMS)
    groups, per_group = N, 1
    if batch:
        per_group = cdiv(N, min(N, max(1, target // channel_tiles)))
        groups = cdiv(N, per_group)
    tiles = cdiv(S, block_s)
    want = min(tiles, max(1, target // (groups * channel_tiles)))
    per_chunk = cdiv(tiles, want)
    return _Split(groups, per_group, per_chunk * block_s, cdiv(tiles, per_chunk))


def _as_fp32(*ts: torch.Tensor) -> list:
    return [t.float() if t.dtype == torch.bfloat16 else t for t in ts]


def spade_norm_stats(x: torch.Tensor, channels_last: bool, batch: bool):
    """-> (mean, biased var) [C] (batch) or [N, C], fp32 (fp64 for fp64)."""
    if interpreting() and x.dtype == torch.bfloat16:  # numpy has no bf16
        return spade_norm_stats(x.float(), channels_last, batch)
    N, C, S = _dims(x, channels_last)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    shape = (C,) if batch else (N, C)
    if x.numel() == 0:
        return torch.zeros(shape, dtype=acc, device=x.device), torch.zeros(shape, dtype=acc, device=x.device)
    block_c, block_s = _reduce_blocks(C, S, channels_last)
    c_tiles = cdiv(C, block_c)
    sp = _split(N, S, block_s, c_tiles, x.device, batch)
    Q = sp.pieces if batch else sp.chunks  # partials per group
    mean = torch.empty(shape, dtype=acc, device=x.device)
    var = torch.empty(shape, dtype=acc, device=x.device)
    part: tuple[torch.Tensor, ...] = (mean, var)
    if Q > 1:
        part = torch.empty((2, sp.pieces, C), dtype=acc, device=x.device).unbind(0)
    with launch_ctx(x):
        _stats_kernel[(sp.groups, sp.chunks, c_tiles)](
            x,
            *part,
            N,
            C,
            S,
            sp.per_group,
            sp.chunk // block_s,
            CL=channels_last,
            ACC=accumulator(x.dtype),
            BLOCK_C=block_c,
            BLOCK_S=block_s,
            num_warps=8,
        )
        if Q > 1:
            G = mean.numel()
            # Instance norm: partial q of group (n, c) is piece q N + n, one sample of chunk q.
            n, groups, per_group = (N, sp.groups, sp.per_group) if batch else (1, 1, 1)
            _merge_moments_kernel[(cdiv(G, _MERGE_G),)](
                *part,
                mean,
                var,
                G,
                Q,
                n,
                S,
                groups,
                per_group,
                sp.chunk,
                ACC=accumulator(x.dtype),
                BLOCK_Q=_MERGE_Q,
                BLOCK_G=_MERGE_G,
                num_warps=4,
            )
    return mean, var


def spade_norm_forward(x, gamma, beta, mean, var, eps: float, channels_last: bool, activation: int, slope: float):
    """-> y = act(xhat (1 + gamma) + beta), like x."""
    if interpreting() and x.dtype == torch.bfloat16:
        x32, g32, b32 = _as_fp32(x, gamma, beta)
        return spade_norm_forward(x32, g32, b32, mean, var, eps, channels_last, activation, slope).to(x.dtype)
    N, C, S = _dims(x, channels_last)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    grid, block_r, block_c = _element_blocks(N, C, S, channels_last)
    with launch_ctx(x):
        _forward_kernel[grid](
            x,
            gamma,
            beta,
            mean,
            var,
            y,
            N,
            C,
            S,
            eps=eps,
            slope=slope,
            ACT=activation,
            G_FULL=gamma.dim() == 3,
            B_FULL=beta.dim() == 3,
            BATCH=mean.dim() == 1,
            CL=channels_last,
            ACC=accumulator(x.dtype),
            BLOCK_R=block_r,
            BLOCK_C=block_c,
        )
    return y


def spade_norm_backward_reduce(
    grad_y, x, gamma, beta, mean, var, eps: float, channels_last: bool, activation: int, slope: float
):
    """-> [4, N, C] per-(n, c) sums of dxhat, dxhat xhat, dz, dz xhat (statistics' dtype)."""
    if interpreting() and x.dtype == torch.bfloat16:
        gy32, x32, g32, b32 = _as_fp32(grad_y, x, gamma, beta)
        return spade_norm_backward_reduce(gy32, x32, g32, b32, mean, var, eps, channels_last, activation, slope)
    N, C, S = _dims(x, channels_last)
    if x.numel() == 0:
        return torch.zeros((4, N, C), dtype=mean.dtype, device=x.device)
    block_c, block_s = _reduce_blocks(C, S, channels_last)
    c_tiles = cdiv(C, block_c)
    sp = _split(N, S, block_s, c_tiles, x.device, False)
    sums = torch.empty((4, N, C), dtype=mean.dtype, device=x.device)
    part = sums if sp.chunks == 1 else torch.empty((4, sp.chunks, N, C), dtype=mean.dtype, device=x.device)
    with launch_ctx(x):
        _reduce_kernel[(N, sp.chunks, c_tiles)](
            grad_y,
            x,
            gamma,
            beta,
            mean,
            var,
            part,
            N,
            C,
            S,
            sp.chunk // block_s,
            eps=eps,
            slope=slope,
            ACT=activation,
            G_FULL=gamma.dim() == 3,
            B_FULL=beta.dim() == 3,
            BATCH=mean.dim() == 1,
            CL=channels_last,
            ACC=accumulator(x.dtype),
            BLOCK_C=block_c,
            BLOCK_S=block_s,
            num_warps=8,
        )
        if sp.chunks > 1:
            _merge_sums_kernel[(cdiv(N * C, _MERGE_G),)](
                part, sums, N * C, sp.chunks, BLOCK_Q=_MERGE_Q, BLOCK_G=_MERGE_G, num_warps=4
            )
    return sums


def spade_norm_backward(
    grad_y,
    x,
    gamma,
    beta,
    mean,
    var,
    group_sums,
    scale: float,
    eps: float,
    channels_last: bool,
    activation: int,
    slope: float,
    gamma_grad: bool,
    beta_grad: bool,
):
    """-> (dx like x; dgamma, dbeta like x when asked for (full-size gamma/beta), else empty)."""
    if interpreting() and x.dtype == torch.bfloat16:
        gy32, x32, g32, b32 = _as_fp32(grad_y, x, gamma, beta)
        grads = spade_norm_backward(
            gy32,
            x32,
            g32,
            b32,
            mean,
            var,
            group_sums,
            scale,
            eps,
            channels_last,
            activation,
            slope,
            gamma_grad,
            beta_grad,
        )
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
            grad_y,
            x,
            gamma,
            beta,
            mean,
            var,
            group_sums * scale,
            dx,
            dg,
            db,
            mean.numel(),
            N,
            C,
            S,
            eps=eps,
            slope=slope,
            ACT=activation,
            G_FULL=gamma.dim() == 3,
            B_FULL=beta.dim() == 3,
            BATCH=mean.dim() == 1,
            CL=channels_last,
            GAMMA_GRAD=gamma_grad,
            BETA_GRAD=beta_grad,
            ACC=accumulator(x.dtype),
            BLOCK_R=block_r,
            BLOCK_C=block_c,
        )
    return dx, dg, db


def spade_norm_instance_backward(
    grad_y, x, gamma, beta, mean, var, eps: float, activation: int, slope: float, gamma_grad: bool, beta_grad: bool
):
    """Instance norm of an NCHW x ([N, C, S]), whole backward in one kernel -> (dx; dgamma, dbeta
    shaped like gamma, beta when asked for, else empty)."""
    if interpreting() and x.dtype == torch.bfloat16:
        gy32, x32, g32, b32 = _as_fp32(grad_y, x, gamma, beta)
        grads = spade_norm_instance_backward(
            gy32, x32, g32, b32, mean, var, eps, activation, slope, gamma_grad, beta_grad
        )
        return tuple(t.to(x.dtype) for t in grads)
    N, C, S = x.shape
    dx = torch.empty_like(x)
    dg = torch.empty_like(gamma) if gamma_grad else x.new_empty((0,))
    db = torch.empty_like(beta) if beta_grad else x.new_empty((0,))
    if x.numel() == 0:
        return dx, dg.zero_(), db.zero_()
    block_s = min(_ONE_TILE_MAX, next_power_of_2(S))
    with launch_ctx(x):
        _instance_backward_kernel[(N * C,)](
            grad_y,
            x,
            gamma,
            beta,
            mean,
            var,
            dx,
            dg,
            db,
            S,
            eps=eps,
            slope=slope,
            ACT=activation,
            G_FULL=gamma.dim() == 3,
            B_FULL=beta.dim() == 3,
            GAMMA_GRAD=gamma_grad,
            BETA_GRAD=beta_grad,
            ACC=accumulator(x.dtype),
            BLOCK_S=block_s,
            ONE_TILE=S <= block_s,
            num_warps=8 if block_s >= 2048 else 4,
        )
    return dx, dg, db


def spade_norm_instance_forward(x, gamma, beta, eps: float, activation: int, slope: float):
    """Instance norm of an NCHW x ([N, C, S]), statistics and output in one kernel -> (y, mean, var)."""
    if interpreting() and x.dtype == torch.bfloat16:
        x32, g32, b32 = _as_fp32(x, gamma, beta)
        y, mean, var = spade_norm_instance_forward(x32, g32, b32, eps, activation, slope)
        return y.to(x.dtype), mean, var
    N, C, S = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.empty_like(x)
    new = torch.empty if x.numel() else torch.zeros  # the kernel writes every (n, c)'s statistics
    mean = new((N, C), dtype=acc, device=x.device)
    var = new((N, C), dtype=acc, device=x.device)
    if x.numel() == 0:
        return y, mean, var
    block_s = min(_ONE_TILE_MAX, next_power_of_2(S))
    with launch_ctx(x):
        _instance_forward_kernel[(N * C,)](
            x,
            gamma,
            beta,
            y,
            mean,
            var,
            S,
            eps=eps,
            slope=slope,
            ACT=activation,
            G_FULL=gamma.dim() == 3,
            B_FULL=beta.dim() == 3,
            ACC=accumulator(x.dtype),
            BLOCK_S=block_s,
            ONE_TILE=S <= block_s,
            num_warps=8 if block_s >= 2048 else 4,
        )
    return y, mean, var


# --- compile-only launches (kernels/aot.py, FNEVR_TRITON_COMPILE_ONLY) -------------------------------


def compile_launches(dtype):
    """The launches that make kernels/aot.py compile every configuration of these kernels in `dtype`."""
    from fnevr.ops import spade_norm

    from .aot import fwd_bwd

    # One tile, several tiles (reductions cut into pieces and merged, for sm_90's 132 SMs), wide C; a
    # batch of 2, so that merges span sample groups and no size is the constant 1. No activation: its
    # code differs from relu's in one select, so on one shape only.
    modes = (("instance", "relu"), ("batch", "leaky_relu"))
    cases = [(shape, m) for shape in ((2, 4, 8, 8), (2, 8, 64, 128), (2, 200, 8, 8)) for m in modes]
    for shape, (norm, act) in cases + [((2, 8, 64, 128), ("instance", None))]:
        for cl in (False, True):
            for full in (True, False):  # gamma/beta per element, or per channel
                fmt = torch.channels_last if cl else torch.contiguous_format
                mshape = shape if full else (1, shape[1], 1, 1)
                fwd_bwd(
                    lambda x, g, b: spade_norm(x, g, b, norm=norm, activation=act, backend="triton"),
                    torch.randn(shape, dtype=dtype).to(memory_format=fmt),
                    torch.randn(mshape, dtype=dtype),
                    torch.randn(mshape, dtype=dtype),
                )
