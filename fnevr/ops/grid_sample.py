r"""Grid sampling (warping): ``torch.nn.functional.grid_sample`` for 4-D input, fused.

For ``input`` ``[N, C, H, W]`` and ``grid`` ``[N, Ho, Wo, 2]`` holding normalised coordinates
:math:`(g_x, g_y) \in [-1, 1]^2` (outside allowed), the output ``[N, C, Ho, Wo]`` is

.. math::

    x = u_W(g_x), \quad y = u_H(g_y), \qquad
    u_S(g) = \begin{cases} \frac{g + 1}{2} (S - 1) & \text{align\_corners} \\
                           \frac{(g + 1) S - 1}{2} & \text{otherwise} \end{cases}

    \mathrm{out}[n, c, i, j] = \sum_{(p, q)} w_{pq}(x, y)\, \mathrm{input}[n, c, q, p]

after ``padding_mode`` maps :math:`(x, y)`: ``zeros`` leaves it (pixels outside read as 0),
``border`` clips it to the image, ``reflection`` reflects it at the image's edges (at pixel centres
with align_corners, else at the outer pixel edges), then clips. ``bilinear`` sums the four pixels
around :math:`(x, y)` with weights :math:`(1 - |x - p|)(1 - |y - q|)`; ``nearest`` takes the pixel
at :math:`(\mathrm{rint}(x), \mathrm{rint}(y))` (ties to even). Non-finite coordinates follow
PyTorch's CUDA kernels on every device: with ``zeros`` they read nothing (output 0), with
``border`` and ``reflection`` NaN goes to pixel 0 and :math:`\pm\infty` to the clipped edge
(``reflection``: pixel 0). PyTorch's CPU kernel crashes on some of these and returns NaN for
bilinear ``zeros``.

Gradients flow to ``input`` and ``grid`` (only to those that require grad). The fused backward is
deterministic (bit-identical run to run) when ``torch.are_deterministic_algorithms_enabled()`` or
``deterministic=True``: the CPU kernel always is at a given thread count (each thread visits a
band of output points in order, scattering into rows of its own, added in band order); on CUDA
and Triton the scatter into ``grad_input`` then adds 64-bit fixed-point values (an integer sum
does not depend on the order of its terms) instead of floating-point atomics. Those have no NaN or
inf: there a non-finite ``grad_output`` makes all of ``grad_input`` NaN (elsewhere it is NaN and
inf where the reference's is). Double backward: with respect to ``input`` and ``grad_output``
through the fused kernels (``grad_input`` is linear in ``grad_output``, so its derivative is the
forward op itself); where ``grid`` needs a second derivative, the backward
falls back to differentiating :func:`grid_sample_reference` with autograd. Example::

    >>> import torch, fnevr
    >>> feature = torch.rand(2, 256, 64, 64).to(memory_format=torch.channels_last).requires_grad_()
    >>> flow = (torch.rand(2, 64, 64, 2) * 2 - 1).requires_grad_()
    >>> warped = fnevr.ops.grid_sample(feature, flow, align_corners=False)
    >>> warped.shape
    torch.Size([2, 256, 64, 64])
    >>> warped.sum().backward()

Backends: ``reference`` (:func:`grid_sample_reference`, pure-PyTorch gathers, deterministic and
double-differentiable by autograd), ``cpu`` (csrc/grid_sample/grid_sample_cpu.cpp), ``cuda``
(csrc/grid_sample/grid_sample_cuda.cu), ``triton`` (kernels/grid_sample.py). ``auto`` on the CPU
runs ``cpu``, except where PyTorch's own op is the faster (see :func:`_pytorch_is_faster`;
``fnevr.ops.backends("cpu", "grid_sample")["auto"]`` says it in words).
"""

import torch
from torch import Tensor

from . import _registry
from ._codes import Mode, Padding
from ._fused import custom_op
from ._layout import is_channels_last

MODES = {"bilinear": int(Mode.BILINEAR), "nearest": int(Mode.NEAREST)}  # names -> kernel codes
PADDINGS = {"zeros": int(Padding.ZEROS), "border": int(Padding.BORDER), "reflection": int(Padding.REFLECTION)}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FAR = -100.0  # where a non-finite coordinate goes (as grid_sample_math.h): outside any image
_MAX_COORD = 2.0**30  # larger source coordinates count as non-finite: their floor must fit an int
# PyTorch's own op, kept from before fnevr.patch_functional() can swap it for ours
TORCH_GRID_SAMPLE = torch.nn.functional.grid_sample


# --- the reference: the spec, in plain PyTorch ops ----------------------------------------------


def _clip(x: Tensor, size: int) -> Tensor:
    """Clamp to [0, size - 1], NaN -> 0; derivative 1 strictly inside, 0 elsewhere (as PyTorch)."""
    inside = (x > 0) & (x < size - 1)
    return torch.where(inside, x, torch.where(x > 0, float(size - 1), 0.0).to(x.dtype))


def _reflect(x: Tensor, twice_low: int, twice_high: int) -> Tensor:
    """Reflect x into [twice_low / 2, twice_high / 2] (x finite)."""
    if twice_low == twice_high:
        return x * 0  # (x is finite) still connected, so the grid gets its zero gradient
    low, span = twice_low / 2, (twice_high - twice_low) / 2
    d = (x - low).abs()
    extra = torch.fmod(d, span)
    odd = torch.fmod(torch.floor(d / span), 2) == 1
    return torch.where(odd, span - extra + low, extra + low)


def _source_index(g: Tensor, size: int, padding: str, align_corners: bool) -> Tensor:
    """Normalised coordinates -> pixel coordinates after padding (see the module doc)."""
    x = (g + 1) / 2 * (size - 1) if align_corners else ((g + 1) * size - 1) / 2
    if padding == "border":
        x = _clip(x, size)
    elif padding == "reflection":
        finite = x.isfinite()
        safe = torch.where(finite, x, 0.0)
        safe = _reflect(safe, 0, 2 * (size - 1)) if align_corners else _reflect(safe, -1, 2 * size - 1)
        x = torch.where(finite, _clip(safe, size), 0.0)
    return torch.where(x.abs() < _MAX_COORD, x, _FAR)


def _gather(flat: Tensor, xs: Tensor, ys: Tensor, H: int, W: int) -> Tensor:
    """flat [N, C, H*W], integer pixel coordinates [N, P] -> [N, C, P], 0 outside the image."""
    valid = (xs >= 0) & (xs < W) & (ys >= 0) & (ys < H)
    index = torch.where(valid, ys * W + xs, 0)
    vals = flat.gather(2, index.unsqueeze(1).expand(-1, flat.shape[1], -1))
    return torch.where(valid.unsqueeze(1), vals, 0.0)


def grid_sample_reference(
    input: Tensor, grid: Tensor, mode: str = "bilinear", padding_mode: str = "zeros", align_corners: bool = False
) -> Tensor:
    """The spec: grid sampling from gathers and elementwise ops, differentiated (twice) by
    autograd; deterministic wherever gather's backward is. Same arguments as :func:`grid_sample`
    (unchecked); fp16/bf16 are computed in fp32. Returns a contiguous ``[N, C, Ho, Wo]``."""
    dtype = input.dtype
    if dtype in (torch.float16, torch.bfloat16):
        input, grid = input.float(), grid.float()
    N, C, H, W = input.shape
    Ho, Wo = grid.shape[1:3]
    x = _source_index(grid[..., 0].reshape(N, Ho * Wo), W, padding_mode, align_corners)
    y = _source_index(grid[..., 1].reshape(N, Ho * Wo), H, padding_mode, align_corners)
    flat = input.reshape(N, C, H * W)
    if mode == "nearest":
        xr, yr = torch.round(x), torch.round(y)  # ties to even, as rint
        # Weight 1 whose derivative (round's) is 0: grid still gets its (zero) gradient.
        w = (xr - xr.detach() + 1) * (yr - yr.detach() + 1)
        out = _gather(flat, xr.long(), yr.long(), H, W) * w.unsqueeze(1)
    else:
        x0, y0 = torch.floor(x), torch.floor(y)
        ex, wx, ey, wy = x0 + 1 - x, x - x0, y0 + 1 - y, y - y0  # weights of the left/right, top/bottom
        xi, yi = x0.long(), y0.long()
        corners = ((0, 0, ex * ey), (1, 0, wx * ey), (0, 1, ex * wy), (1, 1, wx * wy))
        out = _gather(flat, xi, yi, H, W) * corners[0][2].unsqueeze(1)
        for dx, dy, w in corners[1:]:
            out = out + _gather(flat, xi + dx, yi + dy, H, W) * w.unsqueeze(1)
    return out.reshape(N, C, Ho, Wo).to(dtype)


# --- the public op ------------------------------------------------------------------------------


def grid_sample(
    input: Tensor,
    grid: Tensor,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool | None = False,
    *,
    backend: str = "auto",
    deterministic: bool | None = None,
) -> Tensor:
    """Sample ``input`` ``[N, C, H, W]`` at ``grid`` ``[N, Ho, Wo, 2]`` -> ``[N, C, Ho, Wo]``.

    Args:
        input: float16/bfloat16/float32/float64, NCHW or channels_last (kept: the output and
            ``input``'s gradient have its memory format; other layouts are made contiguous).
        grid: normalised (x, y) sampling points, same dtype and device as ``input``.
        mode: ``"bilinear"`` or ``"nearest"``.
        padding_mode: ``"zeros"``, ``"border"`` or ``"reflection"``.
        align_corners: as PyTorch's (None means False, without a warning).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
        deterministic: bit-reproducible backward; None follows
            ``torch.are_deterministic_algorithms_enabled()``.

    Returns:
        ``[N, C, Ho, Wo]`` in ``input``'s dtype (fused backends accumulate in fp32, fp64 for fp64).
    """
    if (
        isinstance(input, Tensor)
        and isinstance(grid, Tensor)
        and input.dtype != grid.dtype
        and torch.is_autocast_enabled(input.device.type)
    ):
        # As PyTorch's op under autocast: both run in the wider dtype (bf16 features, fp32 flow).
        dtype = torch.promote_types(input.dtype, grid.dtype)
        input, grid = input.to(dtype), grid.to(dtype)
    _check(input, grid, mode, padding_mode)
    align_corners = bool(align_corners)
    name = _registry.resolve(backend, input.device, "grid_sample")
    if name == "reference":
        return grid_sample_reference(input, grid, mode, padding_mode, align_corners)
    if backend == "auto" and name == "cpu" and _pytorch_is_faster(input, grid):
        return TORCH_GRID_SAMPLE(input, grid, mode, padding_mode, align_corners)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if not is_channels_last(input):
        input = input.contiguous()
    return _grid_sample_op(
        input, grid.contiguous(), MODES[mode], PADDINGS[padding_mode], align_corners, bool(deterministic), name
    )


def _check(input, grid, mode, padding_mode):
    for arg, t in (("input", input), ("grid", grid)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{arg} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    shape, g_shape = input.shape, grid.shape  # each .shape is a new torch.Size: read them once
    if len(shape) != 4:
        raise ValueError(f"input must be 4-D [N, C, H, W], got shape {tuple(shape)}")
    if len(g_shape) != 4 or g_shape[-1] != 2:
        raise ValueError(f"grid must be [N, Ho, Wo, 2], got shape {tuple(g_shape)}")
    if g_shape[0] != shape[0]:
        raise ValueError(f"grid and input must have the same batch size N, got {g_shape[0]} and {shape[0]}")
    if shape[2] == 0 or shape[3] == 0:
        raise ValueError(f"input must have non-empty spatial dims H, W, got shape {tuple(shape)}")
    if grid.dtype != input.dtype:
        raise ValueError(f"input and grid must have the same dtype, got {input.dtype} and {grid.dtype}")
    if grid.device != input.device:
        raise ValueError(f"input and grid must be on the same device, got {input.device} and {grid.device}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
    if padding_mode not in PADDINGS:
        raise ValueError(f"padding_mode must be one of {tuple(PADDINGS)}, got {padding_mode!r}")


# --- torch.library registration -----------------------------------------------------------------


def _memory_format(t: Tensor):
    return torch.channels_last if is_channels_last(t) else torch.contiguous_format


@custom_op("fnevr::grid_sample")
def _grid_sample_op(
    input: Tensor, grid: Tensor, mode: int, padding: int, align_corners: bool, deterministic: bool, backend: str
) -> Tensor:
    return _registry.kernels(backend, "grid_sample").grid_sample_forward(input, grid, mode, padding, align_corners)


@_grid_sample_op.register_fake
def _(input, grid, mode, padding, align_corners, deterministic, backend):
    shape = (input.shape[0], input.shape[1], grid.shape[1], grid.shape[2])
    return torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=_memory_format(input))


_MODE_NAMES = {code: name for name, code in MODES.items()}
_PADDING_NAMES = {code: name for name, code in PADDINGS.items()}


@_grid_sample_op.register_decomposition
def _(input, grid, mode, padding, align_corners, deterministic, backend):  # ONNX's GridSample (opset 16)
    return TORCH_GRID_SAMPLE(input, grid, _MODE_NAMES[mode], _PADDING_NAMES[padding], align_corners)


@custom_op("fnevr::grid_sample_grad")
def _grid_sample_grad_op(
    grad_out: Tensor,
    input: Tensor,
    grid: Tensor,
    mode: int,
    padding: int,
    align_corners: bool,
    deterministic: bool,
    backend: str,
    input_grad: bool,
    grid_grad: bool,
) -> tuple[Tensor, Tensor]:
    return _registry.kernels(backend, "grid_sample").grid_sample_backward(
        grad_out, input, grid, mode, padding, align_corners, input_grad, grid_grad, deterministic
    )


@_grid_sample_grad_op.register_fake
def _(grad_out, input, grid, mode, padding, align_corners, deterministic, backend, input_grad, grid_grad):
    return (
        torch.empty_like(input) if input_grad else input.new_empty((0,)),
        torch.empty_like(grid) if grid_grad else grid.new_empty((0,)),
    )


def _setup_context(ctx, inputs, output):
    input, grid, *options = inputs
    ctx.save_for_backward(input, grid)
    ctx.options = tuple(options)  # mode, padding, align_corners, deterministic, backend


def _backward(ctx, grad_out):
    input, grid = ctx.saved_tensors
    mode, padding, align_corners, deterministic, backend = ctx.options
    input_grad, grid_grad = ctx.needs_input_grad[:2]
    if torch.is_grad_enabled() and grid_grad and mode == MODES["bilinear"]:
        # create_graph with a grid that needs grad: grad_grid's own derivatives come from autograd
        # through the reference (grad_input's alone would not need it; see _grad_backward).
        names = {v: k for k, v in MODES.items()}, {v: k for k, v in PADDINGS.items()}
        out = grid_sample_reference(input, grid, names[0][mode], names[1][padding], align_corners)
        wrt = [t for t, need in ((input, input_grad), (grid, grid_grad)) if need]
        grads = iter(torch.autograd.grad(out, wrt, grad_out, create_graph=True))
        return (next(grads) if input_grad else None), next(grads), None, None, None, None, None
    grad_out = grad_out.contiguous(memory_format=_memory_format(input))
    grad_input, grad_grid = _grid_sample_grad_op(
        grad_out, input, grid, mode, padding, align_corners, deterministic, backend, input_grad, grid_grad
    )
    return (grad_input if input_grad else None), (grad_grid if grid_grad else None), None, None, None, None, None


_grid_sample_op.register_autograd(_backward, setup_context=_setup_context)


def _grad_setup_context(ctx, inputs, output):
    _, _, grid, mode, padding, align_corners, deterministic, backend, _, grid_grad = inputs
    ctx.save_for_backward(grid)
    ctx.options = (mode, padding, align_corners, deterministic, backend)
    ctx.grid_grad_is_live = grid_grad and mode == MODES["bilinear"]


def _grad_backward(ctx, gg_input, gg_grid):
    """Double backward. grad_input = S(grid)^T grad_out is linear in grad_out and does not depend on
    input, so d/d grad_out of <gg_input, grad_input> is the forward op applied to gg_input, and the
    input gets no gradient. grad_grid (bilinear) never reaches here: _backward differentiates the
    reference instead."""
    if ctx.grid_grad_is_live or ctx.needs_input_grad[2]:
        raise RuntimeError("fnevr grid_sample: internal error, double backward through grid must use the reference")
    (grid,) = ctx.saved_tensors
    mode, padding, align_corners, deterministic, backend = ctx.options
    grad_grad_out = None
    if ctx.needs_input_grad[0] and gg_input is not None and gg_input.numel() > 0:
        if not is_channels_last(gg_input):
            gg_input = gg_input.contiguous()
        grad_grad_out = _grid_sample_op(gg_input, grid, mode, padding, align_corners, deterministic, backend)
    return (grad_grad_out,) + (None,) * 9


_grid_sample_grad_op.register_autograd(_grad_backward, setup_context=_grad_setup_context)


def _pytorch(input, grid, mode="bilinear", padding_mode="zeros", align_corners=False, deterministic=None):
    """PyTorch's own op, as the benchmarks' baseline (`deterministic` follows torch's global setting)."""
    return TORCH_GRID_SAMPLE(input, grid, mode, padding_mode, bool(align_corners))


def _pytorch_is_faster(input: Tensor, grid: Tensor) -> bool:
    """Where ``auto`` on the CPU runs PyTorch's op instead of ours: a call under ``torch.no_grad()``
    (or inference mode) on few-channel NCHW images (the dense motion's, visual and equivariance warps' 3-channel
    frames) with at least as many images as threads. PyTorch's kernel gives each image a thread and
    vectorises across points, which per thread beats our forward there; ours splits an image's
    points between threads, so with fewer images than threads it is the faster, and its backward
    is the faster on every FNeVR warp (benchmarks/results/cpu-table-2026-11-28.txt). Only for finite
    grids in fp32/fp64: PyTorch's CPU kernel treats non-finite coordinates differently from ours
    (see the module doc). Not inside torch.compile (the grid check would break the graph)."""
    N, C = input.shape[:2]
    return (
        not torch.compiler.is_compiling()  # first: torch.get_num_threads() would break the graph
        and not torch.is_grad_enabled()
        and C <= _PYTORCH_CHANNELS
        and N >= torch.get_num_threads()
        and input.dtype in (torch.float32, torch.float64)
        and input.is_contiguous()
        and grid.is_contiguous()
        and _registry.kernels("cpu", "grid_sample").grid_sample_grid_is_finite(grid)
    )


_PYTORCH_CHANNELS = 4
_PYTORCH_WHEN = (
    f"under torch.no_grad() for NCHW fp32/fp64 inputs of at most {_PYTORCH_CHANNELS} channels "
    "with at least as many images as threads, and a finite grid"
)


def _samples(device, dtype, generator) -> list[_registry.Sample]:
    """The first is bench_overhead's tiny call ([1, 4, 8, 8] sampled at 8 x 8 points)."""
    tiny, tiny_grid = _registry.tensors([(1, 4, 8, 8), (1, 8, 8, 2)], device, dtype, generator)
    x, grid = _registry.tensors([(2, 3, 5, 6), (2, 4, 3, 2)], device, dtype, generator)
    grid = grid * 2.4 - 1.2  # some points outside the image
    saved = x.numel() + grid.numel()
    return [
        _registry.Sample("zeros", (tiny, tiny_grid * 2 - 1), {}, (0, 1), tiny.numel() + tiny_grid.numel()),
        _registry.Sample("border-aligned", (x, grid), dict(padding_mode="border", align_corners=True), (0, 1), saved),
        _registry.Sample("nearest-reflection", (x, grid), dict(mode="nearest", padding_mode="reflection"), (0,), saved),
        _registry.Sample("deterministic", (x, grid), dict(deterministic=True), (0, 1), saved),
    ]


OP = _registry.register(
    _registry.Op(
        name="grid_sample",
        fn=grid_sample,
        reference=grid_sample_reference,
        samples=_samples,
        auto={"cpu": _registry.CPU_ORDER, "cuda": ("triton", "cuda")},
        why_auto="CUDA: not yet timed on a GPU; Triton until it is",
        layouts=True,
        pytorch=_pytorch,
        pytorch_when={"cpu": (_pytorch_is_faster, _PYTORCH_WHEN)},
    )
)
