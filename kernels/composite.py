"""Triton kernels for volume-rendering compositing; the math is in `fnevr.ops.composite`.

Forward: a program owns BLOCK_R rays x BLOCK_C channels and walks the D samples front to back.
Backward: a program owns BLOCK_R rays and all their channels (e_i = <g, c_i> needs every channel);
each sample's partial value is kept in a [BLOCK_R, BLOCK_D] register tile until the ray's total is
known, so the whole backward is one pass over the colours.
"""

import torch
import triton
import triton.language as tl

from ._common import RELU, SOFTPLUS, accumulator, cdiv, interpreting, launch_ctx, next_power_of_2

_UNROLL_D: tl.constexpr = tl.constexpr(32)  # up to this many samples, the loop over D is unrolled
# (No NaN global: Triton checks at each launch that a global is unchanged since the compile, with ==.)
_INF: tl.constexpr = tl.constexpr(float("inf"))


@triton.jit
def _activate(x, ACT: tl.constexpr):
    # Softplus as PyTorch's (identity above 20); exp(x) below -15, where 1 + exp(x) rounds to 1.
    if ACT == RELU:
        p = tl.where(x <= 0.0, 0.0, x)  # as torch.relu: NaN stays NaN (tl.maximum may drop it)
    elif ACT == SOFTPLUS:
        p = tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))
    else:
        p = x
    return p


@triton.jit
def _activate_backward(g, x, ACT: tl.constexpr):
    """g act'(x), as PyTorch: relu's a select (where relu is off a NaN or inf g gives 0; relu'(NaN) = 1),
    softplus's a product."""
    if ACT == RELU:
        d = tl.where(x <= 0.0, 0.0, g)
    elif ACT == SOFTPLUS:
        z = tl.exp(tl.minimum(x, 20.0, propagate_nan=tl.PropagateNan.ALL))  # NaN: NaN, as PyTorch's
        d = tl.where(x > 20.0, g, g * (z / (z + 1.0)))
    else:
        d = g
    return d


@triton.jit
def _step(p, trans, INCLUSIVE: tl.constexpr):
    """One sample: (weight, d weight / d p through its alpha, transmittance behind it). As
    composite_math.h's RayMarcher: inclusive's d weight / d p is that minus the weight, which the
    backward counts with the later samples' (as the reference's cumsum; see _backward_sample)."""
    q = tl.exp(-p)
    # 1 - exp(-p) without cancellation for small |p| (Triton has no expm1): Taylor to p^5, whose
    # remainder p^6/720 is below fp64 round-off of 1 - q where |p| < 1e-2.
    small = tl.abs(p) < 1e-2
    ps = tl.where(small, p, 0.0)
    taylor = ps * (1.0 - ps * (0.5 - ps * (1.0 / 6.0 - ps * (1.0 / 24.0 - ps * (1.0 / 120.0)))))
    alpha = tl.where(small, taylor, 1.0 - q)
    if INCLUSIVE:
        w = trans * q * alpha
        dw = trans * q * q
    else:
        w = trans * alpha
        dw = trans * q
    return w, dw, trans * q


@triton.jit
def _forward_sample(
    color,
    density,
    rays,
    chans,
    rmask,
    mask,
    i,
    D,
    C,
    trans,
    acc,
    INCLUSIVE: tl.constexpr,
    ACT: tl.constexpr,
    ACC: tl.constexpr,
):
    sigma = tl.load(density + rays * D + i, mask=rmask, other=0.0).to(ACC)
    w, _, trans = _step(_activate(sigma, ACT), trans, INCLUSIVE)
    c = tl.load(color + (rays * D + i)[:, None] * C + chans[None, :], mask=mask, other=0.0)
    return trans, acc + w[:, None] * c.to(ACC)


@triton.jit
def _forward_kernel(
    color,
    density,
    out,
    R,
    D: tl.constexpr,
    C,
    INCLUSIVE: tl.constexpr,
    ACT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rays = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rays < R
    mask = rmask[:, None] & (chans < C)[None, :]
    trans = tl.full([BLOCK_R], 1.0, ACC)
    acc = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    if D <= _UNROLL_D:  # unrolled: every sample's loads can be in flight at once
        for i in tl.static_range(D):
            trans, acc = _forward_sample(
                color, density, rays, chans, rmask, mask, i, D, C, trans, acc, INCLUSIVE, ACT, ACC
            )
    else:
        for i in range(D):
            trans, acc = _forward_sample(
                color, density, rays, chans, rmask, mask, i, D, C, trans, acc, INCLUSIVE, ACT, ACC
            )
    tl.store(out + rays[:, None] * C + chans[None, :], acc.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _backward_sample(
    grad_out,
    color,
    density,
    grad_color,
    rays,
    rmask,
    samples,
    i,
    D,
    C,
    trans,
    prefix,
    pushed,
    g_tile,
    COLOR_GRAD: tl.constexpr,
    INCLUSIVE: tl.constexpr,
    ACT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ONE_TILE: tl.constexpr,
):
    sigma = tl.load(density + rays * D + i, mask=rmask, other=0.0).to(ACC)
    w, dw, trans = _step(_activate(sigma, ACT), trans, INCLUSIVE)
    e = tl.zeros([BLOCK_R], ACC)
    for c0 in range(0, C, BLOCK_C):  # one pass unless C > BLOCK_C
        chans = c0 + tl.arange(0, BLOCK_C)
        mask = rmask[:, None] & (chans < C)[None, :]
        if ONE_TILE:  # grad_out was loaded once for all samples
            g = g_tile
        else:
            g = tl.load(grad_out + rays[:, None] * C + chans[None, :], mask=mask, other=0.0).to(ACC)
        offs = (rays * D + i)[:, None] * C + chans[None, :]
        c = tl.load(color + offs, mask=mask, other=0.0).to(ACC)
        e += tl.sum(g * c, axis=1)
        if COLOR_GRAD:
            tl.store(grad_color + offs, (w[:, None] * g).to(grad_color.dtype.element_ty), mask=mask)
    # GradScan of composite_math.h: pushed_i = e_i dw_i + prefix_i, and dL/dp_i = pushed_i - total,
    # minus e_i w_i inclusive. Only finite e_k w_k go into the prefix sum: a NaN or inf one is taken
    # off the samples whose sums hold it (k > i; k >= i inclusive) as it comes, so it poisons those
    # and no others, as the reference's reversed cumsum (total - prefix would have inf - inf in all
    # samples behind it). No state beyond the tile; a finite ray takes 0 off.
    ew = e * w
    ewf = tl.where(tl.abs(ew) < _INF, ew, 0.0)
    nf = ew - ewf  # 0, or the non-finite e_i w_i
    if INCLUSIVE:  # prefix without sample i, whose e_i w_i is in its own sum (not in e_i dw_i: inf - inf)
        own = e * dw + prefix - nf
        prefix += ewf
    else:
        prefix += ewf
        own = e * dw + prefix
    earlier = samples[None, :] < i
    pushed = tl.where(samples[None, :] == i, own[:, None], pushed - tl.where(earlier, nf[:, None], 0.0))
    return trans, prefix, pushed


@triton.jit
def _backward_kernel(
    grad_out,
    color,
    density,
    grad_color,
    grad_density,
    R,
    D: tl.constexpr,
    C,
    COLOR_GRAD: tl.constexpr,
    INCLUSIVE: tl.constexpr,
    ACT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_TILE: tl.constexpr,
):
    rays = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rays < R
    g_tile = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    if ONE_TILE:
        chans = tl.arange(0, BLOCK_C)
        gmask = rmask[:, None] & (chans < C)[None, :]
        g_tile = tl.load(grad_out + rays[:, None] * C + chans[None, :], mask=gmask, other=0.0).to(ACC)
    samples = tl.arange(0, BLOCK_D)
    trans = tl.full([BLOCK_R], 1.0, ACC)
    prefix = tl.zeros([BLOCK_R], ACC)  # sum_{k<=i} e_k w_k over the finite ones
    pushed = tl.zeros([BLOCK_R, BLOCK_D], ACC)  # e_i dw_i/dp_i + prefix_i, per sample
    if D <= _UNROLL_D:
        for i in tl.static_range(D):
            trans, prefix, pushed = _backward_sample(
                grad_out,
                color,
                density,
                grad_color,
                rays,
                rmask,
                samples,
                i,
                D,
                C,
                trans,
                prefix,
                pushed,
                g_tile,
                COLOR_GRAD,
                INCLUSIVE,
                ACT,
                ACC,
                BLOCK_R,
                BLOCK_C,
                ONE_TILE,
            )
    else:
        for i in range(D):
            trans, prefix, pushed = _backward_sample(
                grad_out,
                color,
                density,
                grad_color,
                rays,
                rmask,
                samples,
                i,
                D,
                C,
                trans,
                prefix,
                pushed,
                g_tile,
                COLOR_GRAD,
                INCLUSIVE,
                ACT,
                ACC,
                BLOCK_R,
                BLOCK_C,
                ONE_TILE,
            )
    dmask = rmask[:, None] & (samples < D)[None, :]
    doffs = rays[:, None] * D + samples[None, :]
    sigma = tl.load(density + doffs, mask=dmask, other=0.0).to(ACC)
    grad = _activate_backward(pushed - prefix[:, None], sigma, ACT)
    tl.store(grad_density + doffs, grad.to(grad_density.dtype.element_ty), mask=dmask)


def _blocks(C: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps): one sample's tile is about 8 KiB, so the unrolled loads of all
    D samples stay in registers."""
    block_c = min(next_power_of_2(max(C, 1)), 256)
    block_r = max(1, min(64, 8192 // (block_c * dtype.itemsize)))
    return block_r, block_c, 8 if block_r * block_c >= 4096 else 4


# Large problems are autotuned over the rays per program and warps, around the heuristic above;
# small ones (tests, the interpreter) take the heuristic and skip the tuning runs. The autotuner's
# choice is kept per problem class and launched without it afterwards: its per-call Python (argument
# dicts, key building) cost about as much as the launch itself.
_TUNE_MIN_ELEMENTS = 1 << 22
_TUNE_CONFIGS = [triton.Config({"BLOCK_R": r}, num_warps=w) for r in (4, 8, 16, 32) for w in (4, 8)]


def _within(bytes_per_thread: int):
    """Prune the configs whose one-sample tile takes more than this per thread: sm_90 compiles
    (python -m fnevr.kernels composite) spill registers above 128 B in the forward (its D tiles
    are in flight at once) and above 64 B in the backward, which holds more per sample."""

    def prune(configs, named_args, **kwargs):
        tile = kwargs["BLOCK_C"] * named_args["color"].element_size()
        return [c for c in configs if c.kwargs["BLOCK_R"] * tile <= bytes_per_thread * 32 * c.num_warps]

    return prune


_forward_tuned = triton.autotune(_TUNE_CONFIGS, key=["D", "C"], prune_configs_by={"early_config_prune": _within(128)})(
    _forward_kernel
)
_backward_tuned = triton.autotune(
    _TUNE_CONFIGS, key=["D", "C", "COLOR_GRAD"], prune_configs_by={"early_config_prune": _within(64)}
)(_backward_kernel)
_tuned: dict = {}  # (direction, D, C, dtype, color_grad) -> the autotuner's launch options


def _launch(kernel, tuned, key, color: torch.Tensor, grid, args, constexprs) -> None:
    """Launch `kernel` over grid(BLOCK_R) with the heuristic's options, or the autotuner's for large
    problems (`tuned` launches the first call of each `key` and picks them)."""
    R, D, C = color.shape
    block_r, block_c, warps = _blocks(C, color.dtype)
    options = {"BLOCK_R": block_r, "num_warps": warps}
    if not interpreting() and R * D * C >= _TUNE_MIN_ELEMENTS and C <= block_c:
        if key not in _tuned:
            tuned[lambda meta: grid(meta["BLOCK_R"])](*args, BLOCK_C=block_c, **constexprs)
            _tuned[key] = tuned.best_config.all_kwargs()
            return
        options = _tuned[key]
    kernel[grid(options["BLOCK_R"])](*args, BLOCK_C=block_c, **constexprs, **options)


def composite_forward(color: torch.Tensor, density: torch.Tensor, inclusive: bool, activation: int) -> torch.Tensor:
    """color [R, D, C], density [R, D] (contiguous, one dtype) -> [R, C]."""
    if interpreting() and color.dtype == torch.bfloat16:  # numpy has no bf16
        return composite_forward(color.float(), density.float(), inclusive, activation).to(color.dtype)
    R, D, C = color.shape
    out = torch.empty((R, C), dtype=color.dtype, device=color.device)
    if out.numel() == 0 or D == 0:
        return out.zero_()
    block_c = _blocks(C, color.dtype)[1]
    with launch_ctx(color):
        _launch(
            _forward_kernel,
            _forward_tuned,
            ("forward", D, C, color.dtype),
            color,
            lambda block_r: (cdiv(R, block_r), cdiv(C, block_c)),
            (color, density, out, R, D, C),
            dict(INCLUSIVE=inclusive, ACT=activation, ACC=accumulator(color.dtype)),
        )
    return out


def composite_backward(
    grad_out: torch.Tensor,
    color: torch.Tensor,
    density: torch.Tensor,
    inclusive: bool,
    activation: int,
    color_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (grad_color [R, D, C] or an empty tensor when color_grad is False, grad_density [R, D])."""
    if interpreting() and color.dtype == torch.bfloat16:
        gc, gd = composite_backward(grad_out.float(), color.float(), density.float(), inclusive, activation, color_grad)
        return gc.to(color.dtype), gd.to(color.dtype)
    R, D, C = color.shape
    grad_color = torch.empty_like(color) if color_grad else color.new_empty((0,))
    grad_density = torch.zeros_like(density)
    if R == 0 or D == 0:
        return grad_color, grad_density
    block_c = _blocks(C, color.dtype)[1]
    with launch_ctx(color):  # a program spans all of C
        _launch(
            _backward_kernel,
            _backward_tuned,
            ("backward", D, C, color.dtype, color_grad),
            color,
            lambda block_r: (cdiv(R, block_r),),
            (grad_out, color, density, grad_color, grad_density, R, D, C),
            dict(
                COLOR_GRAD=color_grad,
                INCLUSIVE=inclusive,
                ACT=activation,
                ACC=accumulator(color.dtype),
                BLOCK_D=next_power_of_2(D),
                ONE_TILE=C <= block_c,
            ),
        )
    return grad_color, grad_density


# --- compile-only launches (kernels/aot.py, FNEVR_TRITON_COMPILE_ONLY) -------------------------------


def compile_launches(dtype):
    """The launches that make kernels/aot.py compile every configuration of these kernels in `dtype`."""
    from fnevr.ops import composite

    from .aot import fwd_bwd

    cases = [
        ((4096, 8, 256), {}),  # FNeVR's shape class: >= 2^22 elements, the autotuner's configs
        ((64, 8, 3), {}),
        ((64, 8, 64), {}),
        ((64, 8, 128), {}),
        ((64, 8, 300), {}),  # tiles by C
        ((64, 40, 16), {}),  # D above the unrolled limit
        ((64, 8, 16), {"transmittance": "exclusive", "density_activation": "softplus"}),
        ((64, 8, 16), {"density_activation": "none"}),
    ]
    for (R, D, C), kw in cases:
        kw = {"transmittance": "inclusive", **kw}
        fwd_bwd(
            lambda c, d: composite(c, d, backend="triton", **kw),
            torch.rand(R, D, C, dtype=dtype),
            torch.randn(R, D, dtype=dtype),
        )
