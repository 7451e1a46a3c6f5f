"""Triton kernels for grid sampling; the math is in `fnevr.ops.grid_sample` (and
csrc/grid_sample/grid_sample_math.h, which these mirror).

A program owns BLOCK_P output points x BLOCK_C channels of one image; tensors are addressed through
their strides, so NCHW and channels_last need no copies. Forward gathers the four taps and writes
once. The grid gradient (one writer per point) loops over channel tiles and reduces them in the
program. The input gradient is a scatter: floating-point atomics, or, when deterministic, atomic
adds of 64-bit fixed-point values (2^-k scaled and rounded; integer sums do not depend on order).
"""


import torch
import triton
import triton.language as tl

from ._common import accumulator, interpreting, launch_ctx

_MAX_COORD: tl.constexpr = tl.constexpr(1073741824.0)  # 2^30, as grid_sample_math.h's kMaxCoord
_FAR: tl.constexpr = tl.constexpr(-100.0)  # kFar


@triton.jit
def _clip(x, dx, size):
    hi = (size - 1) * 1.0  # not .to(): a size of 1 arrives as a constexpr (Triton specialises 1)
    inside = (x > 0.0) & (x < hi)
    return tl.where(inside, x, tl.where(x > 0.0, hi, 0.0)), tl.where(inside, dx, 0.0)


@triton.jit
def _source_index(g, size, PADDING: tl.constexpr, ALIGN: tl.constexpr):
    """Grid values -> (pixel coordinates after padding, d coordinate / d grid value)."""
    sizef = size * 1.0  # to float (promoted to fp64 with g where ACC is fp64)
    if ALIGN:
        x = (g + 1.0) / 2.0 * (sizef - 1.0)
        dx = tl.zeros_like(g) + (sizef - 1.0) / 2.0
    else:
        x = ((g + 1.0) * sizef - 1.0) / 2.0
        dx = tl.zeros_like(g) + sizef / 2.0
    if PADDING == 1:
        x, dx = _clip(x, dx, size)
    elif PADDING == 2:
        finite = (x - x) == 0.0
        if ALIGN:
            low = 0.0
            span = sizef - 1.0
        else:
            low = -0.5
            span = sizef
        d = tl.where(finite, x, 0.0) - low
        sign = tl.where(d < 0.0, -1.0, 1.0)
        d = tl.abs(d)
        safe_span = tl.maximum(span, 1.0)
        extra = d % safe_span  # d >= 0: C's fmod
        odd = (tl.floor(d / safe_span) % 2.0) == 1.0
        x = tl.where(odd, span - extra + low, extra + low)
        dx = tl.where(odd, -sign * dx, sign * dx)
        x, dx = _clip(x, dx, size)
        keep = finite & ((tl.zeros_like(x) + span) > 0.0)  # one pixel with align_corners reflects everything to 0
        x = tl.where(keep, x, 0.0)
        dx = tl.where(keep, dx, 0.0)
    far = ~(tl.abs(x) < _MAX_COORD)
    return tl.where(far, _FAR, x), tl.where(far, 0.0, dx)


@triton.jit
def _rint(x):
    """Round half to even (as C's rint)."""
    r = tl.floor(x + 0.5)
    tie_to_odd = ((r - x) == 0.5) & ((r % 2.0) != 0.0)
    return tl.where(tie_to_odd, r - 1.0, r)


@triton.jit
def _tap(px, py, H, W, s_h, s_w):
    """Element offset (int64) of pixel (px, py) and whether it lies inside the image."""
    xi = px.to(tl.int64)
    yi = py.to(tl.int64)
    valid = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
    return tl.where(valid, yi * s_h + xi * s_w, 0), valid


@triton.jit
def _coords(grid, n, pts, pmask, P, H, W, PADDING: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr):
    base = grid + (n * P + pts) * 2
    gx = tl.load(base, mask=pmask, other=0.0).to(ACC)
    gy = tl.load(base + 1, mask=pmask, other=0.0).to(ACC)
    x, dx = _source_index(gx, W, PADDING, ALIGN)
    y, dy = _source_index(gy, H, PADDING, ALIGN)
    return x, dx, y, dy


@triton.jit
def _forward_kernel(inp, grid, out, C, H, W, P, Wo, s_in_n, s_in_c, s_in_h, s_in_w,
                    s_out_n, s_out_c, s_out_h, s_out_w, MODE: tl.constexpr, PADDING: tl.constexpr,
                    ALIGN: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(2).to(tl.int64)
    pts = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pmask = pts < P
    cmask = (chans < C)[None, :]
    x, _, y, _ = _coords(grid, n, pts, pmask, P, H, W, PADDING, ALIGN, ACC)
    src = inp + n * s_in_n + (chans.to(tl.int64) * s_in_c)[None, :]
    if MODE == 1:
        off, valid = _tap(_rint(x), _rint(y), H, W, s_in_h, s_in_w)
        acc = tl.load(src + off[:, None], mask=(valid & pmask)[:, None] & cmask, other=0.0).to(ACC)
    else:
        x0 = tl.floor(x)
        y0 = tl.floor(y)
        acc = tl.zeros([BLOCK_P, BLOCK_C], ACC)
        for k in tl.static_range(4):
            kx = k % 2  # k is a constexpr; an annotated constexpr here would be reassigned per pass
            ky = k // 2
            w = ((x0 + 1.0 - x) if kx == 0 else x - x0) * ((y0 + 1.0 - y) if ky == 0 else y - y0)
            off, valid = _tap(x0 + kx, y0 + ky, H, W, s_in_h, s_in_w)
            v = tl.load(src + off[:, None], mask=(valid & pmask)[:, None] & cmask, other=0.0).to(ACC)
            acc += w[:, None] * v
    ooff = n * s_out_n + (pts // Wo) * s_out_h + (pts % Wo) * s_out_w
    tl.store(out + ooff[:, None] + (chans.to(tl.int64) * s_out_c)[None, :], acc.to(out.dtype.element_ty),
             mask=pmask[:, None] & cmask)


@triton.jit
def _grid_grad_kernel(grad_out, inp, grid, grad_grid, C, H, W, P, Wo, s_in_n, s_in_c, s_in_h, s_in_w,
                      s_g_n, s_g_c, s_g_h, s_g_w, PADDING: tl.constexpr, ALIGN: tl.constexpr,
                      ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(1).to(tl.int64)
    pts = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = pts < P
    x, dx, y, dy = _coords(grid, n, pts, pmask, P, H, W, PADDING, ALIGN, ACC)
    x0 = tl.floor(x)
    y0 = tl.floor(y)
    off0, v0 = _tap(x0, y0, H, W, s_in_h, s_in_w)
    off1, v1 = _tap(x0 + 1.0, y0, H, W, s_in_h, s_in_w)
    off2, v2 = _tap(x0, y0 + 1.0, H, W, s_in_h, s_in_w)
    off3, v3 = _tap(x0 + 1.0, y0 + 1.0, H, W, s_in_h, s_in_w)
    goff = n * s_g_n + (pts // Wo) * s_g_h + (pts % Wo) * s_g_w
    d0 = tl.zeros([BLOCK_P], ACC)
    d1 = tl.zeros([BLOCK_P], ACC)
    d2 = tl.zeros([BLOCK_P], ACC)
    d3 = tl.zeros([BLOCK_P], ACC)
    for c0 in range(0, C, BLOCK_C):
        chans = c0 + tl.arange(0, BLOCK_C)
        cmask = (chans < C)[None, :]
        coff = chans.to(tl.int64)
        g = tl.load(grad_out + goff[:, None] + (coff * s_g_c)[None, :], mask=pmask[:, None] & cmask,
                    other=0.0).to(ACC)
        src = inp + n * s_in_n + (coff * s_in_c)[None, :]
        d0 += tl.sum(g * tl.load(src + off0[:, None], mask=(v0 & pmask)[:, None] & cmask, other=0.0).to(ACC), 1)
        d1 += tl.sum(g * tl.load(src + off1[:, None], mask=(v1 & pmask)[:, None] & cmask, other=0.0).to(ACC), 1)
        d2 += tl.sum(g * tl.load(src + off2[:, None], mask=(v2 & pmask)[:, None] & cmask, other=0.0).to(ACC), 1)
        d3 += tl.sum(g * tl.load(src + off3[:, None], mask=(v3 & pmask)[:, None] & cmask, other=0.0).to(ACC), 1)
    ex = x0 + 1.0 - x
    wx = x - x0
    ey = y0 + 1.0 - y
    wy = y - y0
    gx = (-ey * d0 + ey * d1 - wy * d2 + wy * d3) * dx
    gy = (-ex * d0 - wx * d1 + ex * d2 + wx * d3) * dy
    base = grad_grid + (n * P + pts) * 2
    tl.store(base, gx.to(grad_grid.dtype.element_ty), mask=pmask)
    tl.store(base + 1, gy.to(grad_grid.dtype.element_ty), mask=pmask)


@triton.jit
def _scatter(buf, offs, mask, val, scale, FIXED: tl.constexpr):
    if FIXED:  # round to the nearest multiple of 1/scale; the integer sum is order-independent
        q = tl.floor(val.to(tl.float64) * scale + 0.5)
        q = tl.where(q == q, q, 0.0).to(tl.int64)  # scale NaN: the result is NaN anyway
        tl.atomic_add(buf + offs, q, mask=mask)
    else:
        tl.atomic_add(buf + offs, val, mask=mask)


@triton.jit
def _input_grad_kernel(grad_out, grid, buf, scale_ptr, C, H, W, P, Wo, s_b_n, s_b_c, s_b_h, s_b_w,
                       s_g_n, s_g_c, s_g_h, s_g_w, MODE: tl.constexpr, PADDING: tl.constexpr,
                       ALIGN: tl.constexpr, ACC: tl.constexpr, FIXED: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(2).to(tl.int64)
    pts = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pmask = pts < P
    cmask = (chans < C)[None, :]
    coff = chans.to(tl.int64)
    x, _, y, _ = _coords(grid, n, pts, pmask, P, H, W, PADDING, ALIGN, ACC)
    goff = n * s_g_n + (pts // Wo) * s_g_h + (pts % Wo) * s_g_w
    g = tl.load(grad_out + goff[:, None] + (coff * s_g_c)[None, :], mask=pmask[:, None] & cmask,
                other=0.0).to(ACC)
    dst = n * s_b_n + (coff * s_b_c)[None, :]
    scale = 1.0
    if FIXED:
        scale = tl.load(scale_ptr)
    if MODE == 1:
        off, valid = _tap(_rint(x), _rint(y), H, W, s_b_h, s_b_w)
        _scatter(buf, dst + off[:, None], (valid & pmask)[:, None] & cmask, g, scale, FIXED)
    else:
        x0 = tl.floor(x)
        y0 = tl.floor(y)
        for k in tl.static_range(4):
            kx = k % 2  # k is a constexpr; an annotated constexpr here would be reassigned per pass
            ky = k // 2
            w = ((x0 + 1.0 - x) if kx == 0 else x - x0) * ((y0 + 1.0 - y) if ky == 0 else y - y0)
            off, valid = _tap(x0 + kx, y0 + ky, H, W, s_b_h, s_b_w)
            _scatter(buf, dst + off[:, None], (valid & pmask)[:, None] & cmask, w[:, None] * g, scale, FIXED)


def _memory_format(t: torch.Tensor):
    cl = not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if cl else torch.contiguous_format


def _blocks(C: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C): tiles of about 4K elements, channels up to 64 at a time."""
    block_c = min(triton.next_power_of_2(max(C, 1)), 64)
    return max(16, 4096 // block_c), block_c


def grid_sample_forward(input: torch.Tensor, grid: torch.Tensor, mode: int, padding: int,
                        align_corners: bool) -> torch.Tensor:
    """input [N, C, H, W] (NCHW or channels_last), grid [N, Ho, Wo, 2] contiguous -> [N, C, Ho, Wo]."""
    if interpreting() and input.dtype == torch.bfloat16:  # numpy has no bf16
        return grid_sample_forward(input.float(), grid.float(), mode, padding, align_corners).to(input.dtype)
    N, C, H, W = input.shape
    Ho, Wo = grid.shape[1:3]
    out = torch.empty((N, C, Ho, Wo), dtype=input.dtype, device=input.device, memory_format=_memory_format(input))
    if out.numel() == 0:
        return out
    block_p, block_c = _blocks(C)
    P = Ho * Wo
    with launch_ctx(input):
        _forward_kernel[(triton.cdiv(P, block_p), triton.cdiv(C, block_c), N)](
            input, grid, out, C, H, W, P, Wo, *input.stride(), *out.stride(), MODE=mode, PADDING=padding,
            ALIGN=align_corners, ACC=accumulator(input.dtype), BLOCK_P=block_p, BLOCK_C=block_c)
    return out


def _fixed_point_scale(grad_out: torch.Tensor, points: int) -> torch.Tensor:
    """2^(62 - e) with points * max|grad_out| < 2^e: a grad_input element sums at most `points`
    terms of at most max|grad_out| each, so its fixed-point sum stays below 2^62. fp64, on device;
    NaN where grad_out is not finite (it has no fixed-point form)."""
    bound = grad_out.abs().amax().double() * points
    scale = torch.ldexp(torch.ones_like(bound), 62 - torch.frexp(bound).exponent)
    return torch.where(bound.isfinite(), scale, float("nan"))


def grid_sample_backward(grad_out: torch.Tensor, input: torch.Tensor, grid: torch.Tensor, mode: int, padding: int,
                         align_corners: bool, input_grad: bool, grid_grad: bool,
                         deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (grad_input like input or an empty tensor, grad_grid like grid or an empty tensor)."""
    if interpreting() and input.dtype == torch.bfloat16:
        gi, gg = grid_sample_backward(grad_out.float(), input.float(), grid.float(), mode, padding, align_corners,
                                      input_grad, grid_grad, deterministic)
        return gi.to(input.dtype), gg.to(input.dtype)
    N, C, H, W = input.shape
    Ho, Wo = grid.shape[1:3]
    P = Ho * Wo
    block_p, block_c = _blocks(C)
    acc = accumulator(input.dtype)
    grad_input = input.new_empty((0,))
    grad_grid = torch.zeros_like(grid) if grid_grad else grid.new_empty((0,))
    empty = grad_out.numel() == 0
    with launch_ctx(input):
        if input_grad:
            buf_dtype = torch.int64 if deterministic else (torch.float64 if input.dtype == torch.float64
                                                           else torch.float32)
            buf = torch.zeros_like(input, dtype=buf_dtype)  # input is NCHW or channels_last: kept
            scale = (_fixed_point_scale(grad_out, P) if deterministic and not empty
                     else buf.new_ones((), dtype=torch.float64))
            if not empty:
                _input_grad_kernel[(triton.cdiv(P, block_p), triton.cdiv(C, block_c), N)](
                    grad_out, grid, buf, scale, C, H, W, P, Wo, *buf.stride(), *grad_out.stride(), MODE=mode,
                    PADDING=padding, ALIGN=align_corners, ACC=acc, FIXED=deterministic, BLOCK_P=block_p,
                    BLOCK_C=block_c)
            if deterministic:
                grad_input = (buf.double() / scale).to(input.dtype)  # NaN for a non-finite grad_out
            else:
                grad_input = buf.to(input.dtype)
        if grid_grad and mode == 0 and not empty:
            _grid_grad_kernel[(triton.cdiv(P, block_p), N)](
                grad_out, input, grid, grad_grid, C, H, W, P, Wo, *input.stride(), *grad_out.stride(),
                PADDING=padding, ALIGN=align_corners, ACC=acc, BLOCK_P=block_p, BLOCK_C=block_c)
    return grad_input, grad_grid
