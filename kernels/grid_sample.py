"""Triton kernels for grid sampling; the math is in `fnevr.ops.grid_sample` (and
csrc/grid_sample/grid_sample_math.h, which these mirror).

A program owns BLOCK_P output points of one image and a span of channels, which it walks in steps
of [BLOCK_C, BLOCK_P] tiles (see _tiles): it computes each point's taps once, for all the span.
Tensors are addressed through their strides, so NCHW and channels_last need no copies; point
indices are int32 and output-shaped tensors are read as dense runs of Ho * Wo points (no division
by Wo); only offsets that a stride multiplies are int64. Forward gathers the four taps and writes
once. The grid gradient (one writer per point) walks all channels and reduces them in the program.
The input gradient is a scatter: relaxed floating-point atomics, or, when deterministic, atomic
adds of 64-bit fixed-point values (2^-k scaled and rounded; integer sums do not depend on order).
Registers per kernel, tile and dtype for sm_90: `FNEVR_TRITON_COMPILE_ONLY=90 python -m fnevr.kernels
grid_sample`.
"""

import torch
import triton
import triton.language as tl

from fnevr.ops._codes import Mode

from ._common import BILINEAR, BORDER, NEAREST, REFLECTION, accumulator, cdiv, interpreting, launch_ctx

_MAX_COORD: tl.constexpr = tl.constexpr(1073741824.0)  # 2^30, as grid_sample_math.h's kMaxCoord
_FAR: tl.constexpr = tl.constexpr(-100.0)  # kFar


@triton.jit
def _clip(x, dx, size):
    hi = tl.zeros_like(x) + (size - 1)  # the exact integer, then converted (as C's T(size - 1))
    inside = (x > 0.0) & (x < hi)
    return tl.where(inside, x, tl.where(x > 0.0, hi, 0.0)), tl.where(inside, dx, 0.0)


@triton.jit
def _div(a, b):
    """a / b rounded as IEEE division (an fp32 `/` compiles to an approximate division, off by up
    to 2 ulp: floor(a / b) could then miss an exact integer quotient)."""
    if a.dtype == tl.float32:
        return tl.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _source_index(g, size, PADDING: tl.constexpr, ALIGN: tl.constexpr):
    """Grid values -> (pixel coordinates after padding, d coordinate / d grid value)."""
    # size and size - 1 in g's type, from the exact integers (not .to(): a size of 1 arrives as a
    # constexpr; not size * 1.0: that is fp32 even for fp64 g, and size - 1 must be taken first).
    sizef = tl.zeros_like(g) + size
    lastf = tl.zeros_like(g) + (size - 1)
    if ALIGN:
        x = (g + 1.0) * 0.5 * lastf  # * 0.5: exactly / 2, without a division
        dx = lastf * 0.5
    else:
        x = ((g + 1.0) * sizef - 1.0) * 0.5
        dx = sizef * 0.5
    if PADDING == BORDER:
        x, dx = _clip(x, dx, size)
    elif PADDING == REFLECTION:
        finite = (x - x) == 0.0
        if ALIGN:
            low = 0.0
            span = lastf
        else:
            low = -0.5
            span = sizef
        d = tl.where(finite, x, 0.0) - low
        sign = tl.where(d < 0.0, -1.0, 1.0)
        d = tl.abs(d)
        safe_span = tl.maximum(span, 1.0)
        extra = d % safe_span  # d >= 0: C's fmod
        odd = (tl.floor(_div(d, safe_span)) % 2.0) == 1.0
        x = tl.where(odd, span - extra + low, extra + low)
        dx = tl.where(odd, -sign * dx, sign * dx)
        x, dx = _clip(x, dx, size)
        keep = finite & (span > 0.0)  # one pixel with align_corners reflects everything to 0
        x = tl.where(keep, x, 0.0)
        dx = tl.where(keep, dx, 0.0)
    far = ~(tl.abs(x) < _MAX_COORD)
    return tl.where(far, _FAR, x), tl.where(far, 0.0, dx)


@triton.jit
def _rint(x):
    """Round half to even, as C's rint, exactly: x - floor(x) is exact but for x in (-1/2, 0), where
    its rounding (to 1/2 at worst: a tie, which goes to the even 0) cannot change the result.
    (floor(x + 1/2) is not: x + 1/2 rounds, e.g. to the even x + 1 for odd x in [2^23, 2^24) in fp32.)"""
    r = tl.floor(x)
    f = x - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where((f > 0.5) | ((f == 0.5) & odd), r + 1.0, r)


@triton.jit
def _axis(x0, size, stride):
    """The two pixels x0 (an integral float) and x0 + 1 along an axis: their offsets (int64) and
    whether each lies inside."""
    i = x0.to(tl.int32)  # |x0| <= 2^30 (or kFar): fits
    o = i.to(tl.int64) * stride
    return o, o + stride, (i >= 0) & (i < size), (i >= -1) & (i < size - 1)


@triton.jit
def _points(grid, n, p0, P, H, W, PADDING: tl.constexpr, ALIGN: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr):
    """Points p0 + [0, BLOCK_P) of image n: (index in the tile (int32), mask, x, dx, y, dy)."""
    local = tl.arange(0, BLOCK_P)
    pmask = local < tl.minimum(P - p0, BLOCK_P).to(tl.int32)
    base = grid + (n * P + p0) * 2 + local * 2
    gx = tl.load(base, mask=pmask, other=0.0).to(ACC)
    gy = tl.load(base + 1, mask=pmask, other=0.0).to(ACC)
    x, dx = _source_index(gx, W, PADDING, ALIGN)
    y, dy = _source_index(gy, H, PADDING, ALIGN)
    return local, pmask, x, dx, y, dy


@triton.jit
def _taps(x, y, H, W, s_h, s_w, pmask, MODE: tl.constexpr):
    """Per point: the element offsets (int64), masks and weights of the four taps (nearest: tap 0
    with weight 1; the others read nothing)."""
    if MODE == NEAREST:
        ox, _, vx, _ = _axis(_rint(x), W, s_w)
        oy, _, vy, _ = _axis(_rint(y), H, s_h)
        o = oy + ox
        m = vx & vy & pmask
        one = tl.full(x.shape, 1.0, x.dtype)
        return o, o, o, o, m, m, m, m, one, one, one, one  # only tap 0 is read
    x0 = tl.floor(x)
    y0 = tl.floor(y)
    ox0, ox1, vx0, vx1 = _axis(x0, W, s_w)
    oy0, oy1, vy0, vy1 = _axis(y0, H, s_h)
    ex = x0 + 1.0 - x
    wx = x - x0
    ey = y0 + 1.0 - y
    wy = y - y0
    return (
        oy0 + ox0,
        oy0 + ox1,
        oy1 + ox0,
        oy1 + ox1,
        vx0 & vy0 & pmask,
        vx1 & vy0 & pmask,
        vx0 & vy1 & pmask,
        vx1 & vy1 & pmask,
        ex * ey,
        wx * ey,
        ex * wy,
        wx * wy,
    )


@triton.jit
def _channel_stride(stride, CL: tl.constexpr):
    """The channel stride as int64; CL: 1, which the compiler then sees (lanes along the channels,
    vector accesses)."""
    if CL:
        return 1
    else:
        return stride.to(tl.int64)


@triton.jit
def _point_offsets(p0, local, stride, C, CL: tl.constexpr):
    """[1, BLOCK_P] element offsets (int64) of points p0 + local of an [N, C, Ho, Wo] tensor that
    is dense over (Ho, Wo): no division by Wo. CL: the stride is C, whose divisibility the compiler
    knows (aligned vector accesses)."""
    if CL:
        stride = C
    return (p0 * stride + local.to(tl.int64) * stride)[None, :]


# Tiles are [BLOCK_C, BLOCK_P]: BLOCK_C contiguous channels (CL) or one channel (otherwise), and a
# step of a channel loop handles UNROLL tiles. With one channel per tile the layout can only put
# lanes along the points: one point per thread, whose taps it computes once for all its channels.
# The channel and point strides are not specialised (do_not_specialize): the compiler would see
# NCHW's unit point stride and put several points on a thread (vector accesses along the points).


@triton.jit(do_not_specialize=["s_in_c", "s_out_c", "s_out_p"])
def _forward_kernel(
    inp,
    grid,
    out,
    C,
    H,
    W,
    P,
    c_span,
    s_in_n,
    s_in_c,
    s_in_h,
    s_in_w,
    s_out_n,
    s_out_c,
    s_out_p,
    MODE: tl.constexpr,
    PADDING: tl.constexpr,
    ALIGN: tl.constexpr,
    ACC: tl.constexpr,
    CL: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """Points [pid0 * BLOCK_P, +BLOCK_P) x channels [pid1 * c_span, +c_span) of image pid2."""
    n = tl.program_id(2).to(tl.int64)
    p0 = tl.program_id(0).to(tl.int64) * BLOCK_P
    local, pmask, x, _, y, _ = _points(grid, n, p0, P, H, W, PADDING, ALIGN, ACC, BLOCK_P)
    o0, o1, o2, o3, m0, m1, m2, m3, w0, w1, w2, w3 = _taps(x, y, H, W, s_in_h, s_in_w, pmask, MODE)
    s_ic = _channel_stride(s_in_c, CL)
    s_oc = _channel_stride(s_out_c, CL)
    chans = tl.arange(0, BLOCK_C)
    src = inp + n * s_in_n + (chans * s_ic)[:, None]
    dst = out + n * s_out_n + (chans * s_oc)[:, None] + _point_offsets(p0, local, s_out_p, C, CL)
    c_start = tl.program_id(1) * c_span
    c_end = tl.minimum(C, c_start + c_span)
    for c0 in range(c_start, c_end, BLOCK_C * UNROLL):
        for u in tl.static_range(UNROLL):
            c = c0 + u * BLOCK_C
            mask = (chans < c_end - c)[:, None]
            s = src + c * s_ic
            acc = tl.load(s + o0[None, :], mask=m0[None, :] & mask, other=0.0).to(ACC)
            if MODE == BILINEAR:
                acc = acc * w0[None, :]
                acc += w1[None, :] * tl.load(s + o1[None, :], mask=m1[None, :] & mask, other=0.0).to(ACC)
                acc += w2[None, :] * tl.load(s + o2[None, :], mask=m2[None, :] & mask, other=0.0).to(ACC)
                acc += w3[None, :] * tl.load(s + o3[None, :], mask=m3[None, :] & mask, other=0.0).to(ACC)
            tl.store(dst + c * s_oc, acc.to(out.dtype.element_ty), mask=pmask[None, :] & mask)


@triton.jit(do_not_specialize=["s_in_c", "s_g_c", "s_g_p"])
def _grid_grad_kernel(
    grad_out,
    inp,
    grid,
    grad_grid,
    C,
    H,
    W,
    P,
    s_in_n,
    s_in_c,
    s_in_h,
    s_in_w,
    s_g_n,
    s_g_c,
    s_g_p,
    PADDING: tl.constexpr,
    ALIGN: tl.constexpr,
    ACC: tl.constexpr,
    CL: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """Points [pid0 * BLOCK_P, +BLOCK_P) of image pid1, all channels (bilinear only)."""
    n = tl.program_id(1).to(tl.int64)
    p0 = tl.program_id(0).to(tl.int64) * BLOCK_P
    local, pmask, x, dx, y, dy = _points(grid, n, p0, P, H, W, PADDING, ALIGN, ACC, BLOCK_P)
    o0, o1, o2, o3, m0, m1, m2, m3, _, _, _, _ = _taps(x, y, H, W, s_in_h, s_in_w, pmask, 0)
    s_ic = _channel_stride(s_in_c, CL)
    s_gc = _channel_stride(s_g_c, CL)
    chans = tl.arange(0, BLOCK_C)
    src = inp + n * s_in_n + (chans * s_ic)[:, None]
    gsrc = grad_out + n * s_g_n + (chans * s_gc)[:, None] + _point_offsets(p0, local, s_g_p, C, CL)
    # Dot products of grad_out with the four taps: partial sums per lane, summed over the tile's
    # channels once, at the end.
    d0 = tl.zeros([BLOCK_C, BLOCK_P], ACC)
    d1 = tl.zeros([BLOCK_C, BLOCK_P], ACC)
    d2 = tl.zeros([BLOCK_C, BLOCK_P], ACC)
    d3 = tl.zeros([BLOCK_C, BLOCK_P], ACC)
    for c0 in range(0, C, BLOCK_C * UNROLL):
        for u in tl.static_range(UNROLL):
            c = c0 + u * BLOCK_C
            mask = (chans < C - c)[:, None]
            g = tl.load(gsrc + c * s_gc, mask=pmask[None, :] & mask, other=0.0).to(ACC)
            s = src + c * s_ic
            d0 += g * tl.load(s + o0[None, :], mask=m0[None, :] & mask, other=0.0).to(ACC)
            d1 += g * tl.load(s + o1[None, :], mask=m1[None, :] & mask, other=0.0).to(ACC)
            d2 += g * tl.load(s + o2[None, :], mask=m2[None, :] & mask, other=0.0).to(ACC)
            d3 += g * tl.load(s + o3[None, :], mask=m3[None, :] & mask, other=0.0).to(ACC)
    t0 = tl.sum(d0, 0)
    t1 = tl.sum(d1, 0)
    t2 = tl.sum(d2, 0)
    t3 = tl.sum(d3, 0)
    x0 = tl.floor(x)  # the weights: recomputed rather than kept through the loop
    y0 = tl.floor(y)
    ex = x0 + 1.0 - x
    wx = x - x0
    ey = y0 + 1.0 - y
    wy = y - y0
    gx = (-ey * t0 + ey * t1 - wy * t2 + wy * t3) * dx
    gy = (-ex * t0 - wx * t1 + ex * t2 + wx * t3) * dy
    base = grad_grid + (n * P + p0) * 2 + local * 2
    tl.store(base, gx.to(grad_grid.dtype.element_ty), mask=pmask)
    tl.store(base + 1, gy.to(grad_grid.dtype.element_ty), mask=pmask)


@triton.jit
def _scatter(ptrs, mask, val, scale, FIXED: tl.constexpr):
    # Relaxed: the adds only accumulate, and nothing reads the buffer before the kernel ends.
    if FIXED:  # round to the nearest multiple of 1/scale; the integer sum is order-independent
        q = tl.floor(val.to(tl.float64) * scale + 0.5)
        q = tl.where(q == q, q, 0.0).to(tl.int64)  # scale NaN: the result is NaN anyway
        tl.atomic_add(ptrs, q, mask=mask, sem="relaxed")
    else:
        tl.atomic_add(ptrs, val, mask=mask, sem="relaxed")


@triton.jit(do_not_specialize=["s_b_c", "s_g_c", "s_g_p"])
def _input_grad_kernel(
    grad_out,
    grid,
    buf,
    scale_ptr,
    C,
    H,
    W,
    P,
    c_span,
    s_b_n,
    s_b_c,
    s_b_h,
    s_b_w,
    s_g_n,
    s_g_c,
    s_g_p,
    MODE: tl.constexpr,
    PADDING: tl.constexpr,
    ALIGN: tl.constexpr,
    ACC: tl.constexpr,
    FIXED: tl.constexpr,
    CL: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """Points [pid0 * BLOCK_P, +BLOCK_P) x channels [pid1 * c_span, +c_span) of image pid2,
    scattered into buf (input's strides)."""
    n = tl.program_id(2).to(tl.int64)
    p0 = tl.program_id(0).to(tl.int64) * BLOCK_P
    local, pmask, x, _, y, _ = _points(grid, n, p0, P, H, W, PADDING, ALIGN, ACC, BLOCK_P)
    o0, o1, o2, o3, m0, m1, m2, m3, w0, w1, w2, w3 = _taps(x, y, H, W, s_b_h, s_b_w, pmask, MODE)
    s_bc = _channel_stride(s_b_c, CL)
    s_gc = _channel_stride(s_g_c, CL)
    chans = tl.arange(0, BLOCK_C)
    dst = buf + n * s_b_n + (chans * s_bc)[:, None]
    gsrc = grad_out + n * s_g_n + (chans * s_gc)[:, None] + _point_offsets(p0, local, s_g_p, C, CL)
    scale = 1.0
    if FIXED:
        scale = tl.load(scale_ptr)
    c_start = tl.program_id(1) * c_span
    c_end = tl.minimum(C, c_start + c_span)
    for c0 in range(c_start, c_end, BLOCK_C * UNROLL):
        for u in tl.static_range(UNROLL):
            c = c0 + u * BLOCK_C
            mask = (chans < c_end - c)[:, None]
            g = tl.load(gsrc + c * s_gc, mask=pmask[None, :] & mask, other=0.0).to(ACC)
            d = dst + c * s_bc
            if MODE == NEAREST:
                _scatter(d + o0[None, :], m0[None, :] & mask, g, scale, FIXED)
            else:
                _scatter(d + o0[None, :], m0[None, :] & mask, w0[None, :] * g, scale, FIXED)
                _scatter(d + o1[None, :], m1[None, :] & mask, w1[None, :] * g, scale, FIXED)
                _scatter(d + o2[None, :], m2[None, :] & mask, w2[None, :] * g, scale, FIXED)
                _scatter(d + o3[None, :], m3[None, :] & mask, w3[None, :] * g, scale, FIXED)


def _memory_format(t: torch.Tensor):
    cl = not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if cl else torch.contiguous_format


_LANES_ON_CHANNELS = 64  # channels_last with at least this many channels: lanes along the channels
_PROGRAMS = 2048  # enough programs to fill a GPU several times over (132 SMs on an H100)


def _tiles(C: int, input: torch.Tensor, output_like: torch.Tensor) -> dict:
    """BLOCK_P, BLOCK_C, UNROLL, CL and num_warps of every kernel for these tensors.

    CL (lanes along 64 contiguous channels, vector accesses; each thread owns one or two points)
    where C >= _LANES_ON_CHANNELS, the channels are contiguous in `input` and `output_like`
    ([N, C, Ho, Wo]), and `output_like`'s point stride is C (the kernels then use C). Otherwise
    (NCHW, few channels) a thread owns one point and UNROLL of its channels per step, neighbouring
    threads neighbouring points. Either keeps a thread's registers well below the spill limit
    (see `python -m fnevr.kernels grid_sample`)."""
    Ho, Wo = output_like.shape[2:]
    if (
        C >= _LANES_ON_CHANNELS
        and input.stride(1) == 1
        and output_like.stride(1) == 1
        and (Wo == 1 or output_like.stride(3) == C)
        and (Ho == 1 or output_like.stride(2) == Wo * C)
    ):
        return dict(BLOCK_P=16, BLOCK_C=64, UNROLL=1, CL=True, num_warps=4)
    return dict(BLOCK_P=128, BLOCK_C=1, UNROLL=1 if C == 1 else 4 if C <= 4 else 8, CL=False, num_warps=4)


def _split(C: int, N: int, P: int, tiles: dict) -> tuple[tuple[int, int, int], int]:
    """(launch grid, c_span) of the kernels that split the channels: each program takes the most
    channels (a multiple of a step's) that still leave about _PROGRAMS programs, as it computes its
    points' taps once for all of them."""
    point_tiles = cdiv(P, tiles["BLOCK_P"])
    step = tiles["BLOCK_C"] * tiles["UNROLL"]
    groups = max(1, min(cdiv(C, step), _PROGRAMS // (point_tiles * N)))
    span = cdiv(cdiv(C, groups), step) * step
    return (point_tiles, cdiv(C, span), N), span


def _point_strides(t: torch.Tensor):
    """(t [N, C, Ho, Wo] made dense over (Ho, Wo) if it is not, its strides (n, c, point)): point
    p of an image is at p * point stride, so no kernel divides by Wo."""
    N, C, Ho, Wo = t.shape
    try:
        return t, t.view(N, C, Ho * Wo).stride()
    except RuntimeError:  # (Ho, Wo) not one dense run
        t = t.contiguous(memory_format=_memory_format(t))
        return t, t.view(N, C, Ho * Wo).stride()


def grid_sample_forward(
    input: torch.Tensor, grid: torch.Tensor, mode: int, padding: int, align_corners: bool
) -> torch.Tensor:
    """input [N, C, H, W] (NCHW or channels_last), grid [N, Ho, Wo, 2] contiguous -> [N, C, Ho, Wo]."""
    if interpreting() and input.dtype == torch.bfloat16:  # numpy has no bf16
        return grid_sample_forward(input.float(), grid.float(), mode, padding, align_corners).to(input.dtype)
    N, C, H, W = input.shape
    Ho, Wo = grid.shape[1:3]
    out = torch.empty((N, C, Ho, Wo), dtype=input.dtype, device=input.device, memory_format=_memory_format(input))
    if out.numel() == 0:
        return out
    P = Ho * Wo
    tiles = _tiles(C, input, out)
    launch, span = _split(C, N, P, tiles)
    _, s_out = _point_strides(out)
    with launch_ctx(input):
        _forward_kernel[launch](
            input,
            grid,
            out,
            C,
            H,
            W,
            P,
            span,
            *input.stride(),
            *s_out,
            MODE=mode,
            PADDING=padding,
            ALIGN=align_corners,
            ACC=accumulator(input.dtype),
            **tiles,
        )
    return out


def _fixed_point_scale(grad_out: torch.Tensor, points: int) -> torch.Tensor:
    """2^(62 - e) with points * max|grad_out| < 2^e: a grad_input element sums at most `points`
    terms of at most max|grad_out| each, so its fixed-point sum stays below 2^62. fp64, on device;
    NaN where grad_out is not finite (it has no fixed-point form)."""
    bound = grad_out.abs().amax().double() * points
    scale = torch.ldexp(torch.ones_like(bound), 62 - torch.frexp(bound).exponent)
    return torch.where(bound.isfinite(), scale, float("nan"))


def grid_sample_backward(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    grid: torch.Tensor,
    mode: int,
    padding: int,
    align_corners: bool,
    input_grad: bool,
    grid_grad: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_out [N, C, Ho, Wo] -> (grad_input like input or an empty tensor, grad_grid like grid
    or an empty tensor)."""
    if interpreting() and input.dtype == torch.bfloat16:
        gi, gg = grid_sample_backward(
            grad_out.float(),
            input.float(),
            grid.float(),
            mode,
            padding,
            align_corners,
            input_grad,
            grid_grad,
            deterministic,
        )
        return gi.to(input.dtype), gg.to(input.dtype)
    N, C, H, W = input.shape
    Ho, Wo = grid.shape[1:3]
    P = Ho * Wo
    acc = accumulator(input.dtype)
    grad_input = input.new_empty((0,))
    empty = grad_out.numel() == 0
    writes_grid_grad = grid_grad and mode == Mode.BILINEAR and not empty  # the kernel writes every element
    grad_grid = (
        (torch.empty_like(grid) if writes_grid_grad else torch.zeros_like(grid)) if grid_grad else grid.new_empty((0,))
    )
    if not empty:
        grad_out, s_g = _point_strides(grad_out)
        tiles = _tiles(C, input, grad_out)
    with launch_ctx(input):
        if input_grad:
            buf_dtype = (
                torch.int64 if deterministic else (torch.float64 if input.dtype == torch.float64 else torch.float32)
            )
            buf = torch.zeros_like(input, dtype=buf_dtype)  # input is NCHW or channels_last: kept
            scale = _fixed_point_scale(grad_out, P) if deterministic and not empty else buf  # read if FIXED only
            if not empty:
                launch, span = _split(C, N, P, tiles)
                _input_grad_kernel[launch](
                    grad_out,
                    grid,
                    buf,
                    scale,
                    C,
                    H,
                    W,
                    P,
                    span,
                    *buf.stride(),
                    *s_g,
                    MODE=mode,
                    PADDING=padding,
                    ALIGN=align_corners,
                    ACC=acc,
                    FIXED=deterministic,
                    **tiles,
                )
            if deterministic and not empty:
                grad_input = (buf.double() / scale).to(input.dtype)  # NaN for a non-finite grad_out
            else:
                grad_input = buf.to(input.dtype)
        if writes_grid_grad:
            _grid_grad_kernel[(cdiv(P, tiles["BLOCK_P"]), N)](
                grad_out,
                input,
                grid,
                grad_grid,
                C,
                H,
                W,
                P,
                *input.stride(),
                *s_g,
                PADDING=padding,
                ALIGN=align_corners,
                ACC=acc,
                **tiles,
            )
    return grad_input, grad_grid


# --- compile-only launches (kernels/aot.py, FNEVR_TRITON_COMPILE_ONLY) -------------------------------


def compile_launches(dtype):
    """Every tile configuration in every dtype; each other (mode, padding, align_corners,
    deterministic) code path once, the paths spread over the dtypes."""
    import itertools

    from fnevr.ops import grid_sample

    from .aot import DTYPES, fwd_bwd

    def run(C, mode="bilinear", padding="zeros", align=False, channels_last=False, deterministic=(False,)):
        x = torch.rand(1, C, 8, 8, dtype=dtype)
        x = x.to(memory_format=torch.channels_last) if channels_last else x
        g = torch.rand(1, 4, 4, 2, dtype=dtype) * 2 - 1
        for det in deterministic:  # a second run compiles only the input gradient's FIXED variant
            fwd_bwd(
                lambda x, g: grid_sample(x, g, mode, padding, align, backend="triton", deterministic=det),
                x.detach().clone(),
                g.detach().clone(),
            )

    for C in (1, 3, 8):  # NCHW tiles: UNROLL 1 (C = 1), 4, 8
        run(C, deterministic=(False, True) if C == 8 else (False,))
    run(64, channels_last=True, deterministic=(False, True))  # lanes along the channels
    paths = [
        p
        for p in itertools.product(("bilinear", "nearest"), ("zeros", "border", "reflection"), (False, True))
        if p != ("bilinear", "zeros", False)
    ]
    for i, (mode, padding, align) in enumerate(paths):
        if DTYPES[i % len(DTYPES)] == dtype:
            run(3, mode, padding, align, deterministic=(False, True))
    if dtype == DTYPES[0]:
        run(3, channels_last=True)  # a channels_last input with few channels: NCHW's tiles, other strides
