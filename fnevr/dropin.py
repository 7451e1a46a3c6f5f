r"""Drop-in: fnevr's fused ops inside models built by other code (the authors' FNeVR,
first-order-model and its relatives), with their classes, parameters and state-dict keys unchanged.

::

    >>> import fnevr
    >>> report = fnevr.patch(generator)   # doctest: +SKIP   (warps, SPADE, compositing -> fused ops)
    >>> fnevr.unpatch(generator)          # doctest: +SKIP   (or: with fnevr.patch(generator): ...)
    >>> with fnevr.patch_functional():    # doctest: +SKIP   (any code: F.grid_sample -> fnevr's)
    ...     out = model(x)

:func:`patch` finds modules by what they hold and do, not by class name, and replaces their forward
(or the method that warps) on the instance only:

- **warps**: a method whose code calls ``grid_sample`` through ``torch.nn.functional`` (imported
  under any name, or ``grid_sample`` itself) is rebound to the same code reading
  :func:`fnevr.ops.grid_sample` instead (``deform_input``, ``create_deformed_source_image``, ...);
- **SPADE**: a layer with ``param_free_norm`` (``InstanceNorm2d`` without affine or running
  statistics), ``mlp_shared`` (3x3 conv, ReLU), ``mlp_gamma`` and ``mlp_beta`` (3x3 convs) runs
  :func:`fnevr.nn.spade.spade_layer` (:func:`fnevr.ops.spade_norm`); a block of two such layers
  each followed by a ``ReLU`` and a conv (``SPADE_0, relu_0, conv_0, SPADE_1, relu_1, conv_1``)
  also fuses the ReLUs into the norm;
- **compositing**: a renderer (``rgb_predict``, ``sigma_predict``, ``nerf_module``,
  ``mini_decoder``) whose forward calls a module-level ``volume_render`` composites with
  :func:`fnevr.ops.mlp_composite` when its ``nerf_module`` is FNeVR's per-sample MLP
  (``layer1`` ... ``layer6``), else with :func:`fnevr.ops.composite` (inclusive transmittance,
  ReLU densities, as the published loop);
- **batch norm** (``batchnorm=True``): ``BatchNorm1d/2d/3d`` layers (and the authors'
  ``SynchronizedBatchNorm``, outside ``DataParallel``) run :func:`fnevr.ops.spade_norm`.

Every replaced forward is checked once, when patched, against the module's own forward on a small
random input (eval mode, no gradients, the module's dtype and device, a private random generator);
one that disagrees is left as it was and reported. The warps need no check: ``fnevr.ops.grid_sample``
takes PyTorch's arguments and gives its results (it also defines non-finite coordinates as
PyTorch's CUDA kernel does, on every device), and calls it does not handle (5-D input,
``bicubic``) go to PyTorch's op.
"""

import dataclasses
import functools
import threading
import types
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nn.batchnorm import batch_norm
from .nn.spade import spade_layer
from .ops import _registry, composite, mlp_composite
from .ops import grid_sample as fused_grid_sample
from .ops.grid_sample import MODES, PADDINGS, TORCH_GRID_SAMPLE

_MARK = "_fnevr_patched"  # instance attribute: {replaced attribute: what the instance had before, or None}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what the fused ops take
_TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


class PatchWarning(UserWarning):
    """Something :func:`patch` was asked for could not be done (see the message)."""


@dataclasses.dataclass
class PatchReport:
    """What :func:`patch` replaced (module name -> what now runs) and what it could not (-> why).
    Also a context manager: leaving the ``with`` block undoes fnevr's patches on the model (:func:`unpatch`)."""

    model: nn.Module
    patched: dict[str, str] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"fnevr.patch({type(self.model).__name__}): {len(self.patched)} replaced, {len(self.skipped)} not"]
        lines += [f"  {name or '<model>'}: {what}" for name, what in self.patched.items()]
        lines += [f"  not {name or '<model>'}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)

    def __enter__(self) -> "PatchReport":
        return self

    def __exit__(self, *exc) -> None:
        unpatch(self.model)


def patch(
    model: nn.Module,
    *,
    grid_sample: bool = True,
    spade: bool = True,
    compositing: bool = True,
    batchnorm: bool = False,
    backend: str = "auto",
) -> PatchReport:
    """Run ``model``'s warps, SPADE layers, compositing (and, if asked, batch norms) on fnevr's
    fused ops (see the module doc for what is matched). Parameters, buffers and state-dict keys
    are untouched; only forwards (and warping methods) of matched modules are replaced, on the
    instances. Modules already patched are left as they are.

    Args:
        model: any ``nn.Module``, e.g. the authors' ``OcclusionAwareGenerator_SPADE``.
        grid_sample, spade, compositing, batchnorm: which kinds of module to patch.
        backend: the fused ops' backend (``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"``, ``"reference"``).

    Returns:
        A :class:`PatchReport`; what could not be patched is also given as a :class:`PatchWarning`,
        and so is a model in which nothing matched (it is then unchanged).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    device = next(model.parameters(), torch.empty(0)).device
    for op in ("grid_sample", "spade_norm", "composite", "mlp_composite"):
        _registry.resolve(backend, device, op)  # a bad or unavailable backend fails here, not at a forward
    report, already = PatchReport(model), 0
    patchers = [
        (spade, _patch_spade_block),
        (spade, _patch_spade_layer),
        (compositing, _patch_renderer),
        (batchnorm, _patch_batchnorm),
        (grid_sample, _patch_warps),
    ]
    for name, module in model.named_modules():
        if _MARK in vars(module):  # by an earlier call, or as part of a block
            already += 1
            continue
        if type(module).__module__.startswith("fnevr."):
            continue  # fnevr's own modules run the fused ops already
        for wanted, patcher in patchers:
            if wanted and "forward" not in vars(module).get(_MARK, {}):
                outcome = patcher(module, backend)
                if outcome is not None:
                    ok, text = outcome
                    (report.patched if ok else report.skipped)[name] = text
    if report.skipped:
        listed = "; ".join(f"{n or '<model>'}: {why}" for n, why in report.skipped.items())
        warnings.warn(f"fnevr.patch left {len(report.skipped)} module(s) as they were: {listed}", PatchWarning, 2)
    if not report.patched and not report.skipped and not already:
        warnings.warn(
            f"fnevr.patch: nothing in {type(model).__name__} matched a structure fnevr knows (FNeVR/FOMM "
            "warps, SPADE layers, volume rendering); the model is unchanged. For F.grid_sample calls "
            "elsewhere, use fnevr.patch_functional().",
            PatchWarning,
            2,
        )
    return report


def unpatch(model: nn.Module) -> int:
    """Undo :func:`patch` on ``model`` and its submodules; returns how many modules were restored."""
    restored = 0
    for module in model.modules():
        before = vars(module).pop(_MARK, None)
        if before is None:
            continue
        for attr, value in before.items():
            if value is None:
                vars(module).pop(attr, None)
            else:
                vars(module)[attr] = value
        restored += 1
    return restored


def _replace(module: nn.Module, **attrs) -> None:
    before = vars(module).setdefault(_MARK, {})
    for attr, fn in attrs.items():
        before.setdefault(attr, vars(module).get(attr))
        # a partial, not a bound method: copy.deepcopy of the model binds the copy's to the copy
        vars(module)[attr] = functools.partial(fn, module)


# --- warps ---------------------------------------------------------------------------------------


@functools.cache
def _functional_grid_sample(backend: str):
    """``torch.nn.functional.grid_sample``'s signature and results, on fnevr's op where it applies."""

    def grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=None):
        if (
            isinstance(input, Tensor)
            and isinstance(grid, Tensor)
            and input.dim() == 4
            and grid.dim() == 4
            and grid.shape[-1] == 2
            and grid.shape[0] == input.shape[0]
            and input.shape[2] > 0
            and input.shape[3] > 0
            and input.dtype in _DTYPES
            and (input.dtype == grid.dtype or (grid.dtype in _DTYPES and torch.is_autocast_enabled(input.device.type)))
            and input.device == grid.device
            and mode in MODES
            and padding_mode in PADDINGS
        ):
            return fused_grid_sample(input, grid, mode, padding_mode, align_corners, backend=backend)
        return TORCH_GRID_SAMPLE(input, grid, mode, padding_mode, align_corners)

    grid_sample.__doc__ = f"torch.nn.functional.grid_sample on fnevr.ops.grid_sample (backend={backend!r})."
    return grid_sample


@functools.cache
def _functional_module(backend: str) -> types.ModuleType:
    """A stand-in for ``torch.nn.functional`` whose ``grid_sample`` is fnevr's."""
    module = types.ModuleType(F.__name__, F.__doc__)
    vars(module).update({k: v for k, v in vars(F).items() if not k.startswith("__")})
    vars(module)["grid_sample"] = _functional_grid_sample(backend)
    return module


def _names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _rebind_globals(fn: types.FunctionType, replacements: dict[int, object]) -> types.FunctionType | None:
    """A copy of ``fn`` whose globals hold replacements[id(value)] for each value listed, or None."""
    names = _names(fn.__code__)
    swapped = {
        name: replacements[id(value)]
        for name, value in fn.__globals__.items()
        if name in names and id(value) in replacements
    }
    if not swapped:
        return None
    # (a snapshot of its module's globals: fine for code that does not rebind them after import)
    copy = types.FunctionType(fn.__code__, {**fn.__globals__, **swapped}, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__, copy.__qualname__, copy.__doc__ = fn.__kwdefaults__, fn.__qualname__, fn.__doc__
    return copy


def _own_methods(module: nn.Module):
    """(name, function) of the methods module's classes below nn.Module define, as resolved."""
    seen = set()
    for cls in type(module).__mro__:
        if cls in (nn.Module, object) or cls.__module__.startswith("torch."):
            continue
        for name, value in vars(cls).items():
            if name not in seen and isinstance(value, types.FunctionType):
                seen.add(name)
                if getattr(type(module), name) is value and name not in vars(module):
                    yield name, value


def _patch_warps(module: nn.Module, backend: str):
    methods, unreachable = {}, []
    replacements = {id(F): _functional_module(backend), id(TORCH_GRID_SAMPLE): _functional_grid_sample(backend)}
    for name, fn in _own_methods(module):
        if "grid_sample" not in _names(fn.__code__):
            continue
        copy = _rebind_globals(fn, replacements)
        if copy is None:
            unreachable.append(name)
        else:
            methods[name] = copy
    if methods:
        _replace(module, **methods)
        text = f"grid_sample -> fnevr.ops.grid_sample in {', '.join(sorted(methods))}"
        return True, text + (f" (not in {', '.join(unreachable)})" if unreachable else "")
    if unreachable:
        why = "does not reach it through torch.nn.functional or grid_sample: use fnevr.patch_functional()"
        return False, f"{', '.join(unreachable)} call(s) grid_sample but {why}"
    return None


# --- SPADE ---------------------------------------------------------------------------------------


def _is_conv3x3(m) -> bool:
    return (
        type(m) is nn.Conv2d
        and m.kernel_size == (3, 3)
        and m.padding == (1, 1)
        and m.stride == (1, 1)
        and m.dilation == (1, 1)
        and m.groups == 1
        and m.padding_mode == "zeros"
        and m.bias is not None
    )


def _spade_layer_mismatch(m: nn.Module) -> str | None:
    """Why ``m`` is not a SPADE layer fnevr can run (None if it is)."""
    norm = getattr(m, "param_free_norm", None)
    if not isinstance(norm, nn.InstanceNorm2d) or norm.affine or norm.track_running_stats:
        return "param_free_norm is not InstanceNorm2d(affine=False, track_running_stats=False)"
    shared = getattr(m, "mlp_shared", None)
    if not (isinstance(shared, nn.Sequential) and len(shared) == 2 and type(shared[1]) is nn.ReLU):
        return "mlp_shared is not [Conv2d, ReLU]"
    if not all(_is_conv3x3(c) for c in (shared[0], getattr(m, "mlp_gamma", None), getattr(m, "mlp_beta", None))):
        return "mlp_shared.0, mlp_gamma and mlp_beta are not all 3x3 convolutions with padding 1 and bias"
    return None


def _patch_spade_layer(module: Any, backend: str):  # Any: matched by its attributes
    if not hasattr(module, "param_free_norm") or not hasattr(module, "mlp_gamma"):
        return None
    why = _spade_layer_mismatch(module)
    if why:
        return False, why
    C, L = module.mlp_gamma.out_channels, module.mlp_shared[0].in_channels
    forward = functools.partial(spade_layer, backend=backend)
    return _replace_checked(module, forward, lambda rand: (rand(2, C, 4, 4), rand(2, L, 2, 2)), "spade_norm")


_SPADE_BLOCK = ("SPADE_0", "relu_0", "conv_0", "SPADE_1", "relu_1", "conv_1")


def _spade_block_forward(block, x, modulation, *, backend="auto"):
    for i in (0, 1):
        layer, conv = getattr(block, f"SPADE_{i}"), getattr(block, f"conv_{i}")
        x = conv(spade_layer(layer, x, modulation, activation="relu", backend=backend))
    return x


def _patch_spade_block(module: nn.Module, backend: str):
    children: dict[str, Any] = dict(module.named_children())
    if set(children) != set(_SPADE_BLOCK):
        return None
    if any(type(children[f"relu_{i}"]) is not nn.ReLU for i in (0, 1)) or any(
        _spade_layer_mismatch(children[f"SPADE_{i}"]) for i in (0, 1)
    ):
        return None  # its layers, if they match, are patched alone
    C, L = children["SPADE_0"].mlp_gamma.out_channels, children["SPADE_0"].mlp_shared[0].in_channels
    forward = functools.partial(_spade_block_forward, backend=backend)
    result = _replace_checked(module, forward, lambda rand: (rand(2, C, 4, 4), rand(2, L, 2, 2)), "spade_norm")
    if result[0]:  # its layers run inside the block's forward; patch them too, for direct calls
        for i in (0, 1):
            _replace(children[f"SPADE_{i}"], forward=functools.partial(spade_layer, backend=backend))
        result = True, "spade_norm with the ReLUs fused (SPADE_0, SPADE_1 included)"
    return result


# --- compositing -----------------------------------------------------------------------------------


_RENDERER = ("rgb_predict", "sigma_predict", "nerf_module", "mini_decoder")
# The published per-sample MLP's layers, in fnevr.ops.MLP_PARAMETERS' order.
_NERF_LAYERS = ("layer1", "layer2", "layer3_1", "layer3_2", "layer3_3", "layer4", "layer5")


def _volume_render(backend, rgb, sigma):
    """The published ``volume_render``: inclusive transmittance, ReLU densities, [B, C, H, W] out."""
    return composite(rgb, sigma, transmittance="inclusive", backend=backend).permute(0, 3, 1, 2)


def _renderer_forward(render, feature, *, backend="auto"):
    """The published renderer with its MLP and compositing as one op (colour = W F + b S)."""
    mlp = render.nerf_module
    color_code = render.rgb_predict(feature)
    shape_code, point = render.sigma_predict(feature)
    params = [getattr(getattr(mlp, n), k) for n in _NERF_LAYERS for k in ("weight", "bias")]
    features, weight_sum = mlp_composite(color_code, shape_code, params, transmittance="inclusive", backend=backend)
    color = F.linear(features, mlp.layer6.weight) + weight_sum * mlp.layer6.bias.to(weight_sum.dtype)
    out = torch.sigmoid(color.permute(0, 3, 1, 2))
    return {"render": out, "mini_pred": render.mini_decoder(out), "point_pred": point}


def _patch_renderer(module: Any, backend: str):  # Any: matched by its attributes
    if not all(hasattr(module, n) for n in _RENDERER):
        return None
    forward = type(module).forward
    if not isinstance(forward, types.FunctionType) or not callable(forward.__globals__.get("volume_render")):
        return False, "its forward does not call a module-level volume_render"
    convs = [m for m in module.rgb_predict.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        return False, "rgb_predict has no Conv2d to size a check input by"

    def probe(rand):
        return (rand(1, convs[0].in_channels, 4, 4),)

    mlp = module.nerf_module
    layers = [getattr(mlp, n, None) for n in (*_NERF_LAYERS, "layer6")]
    if all(type(m) is nn.Linear for m in layers) and mlp.layer3_1.out_features == 1:
        result = _replace_checked(module, functools.partial(_renderer_forward, backend=backend), probe, "mlp_composite")
        if result[0]:
            return result
    # The loop alone: the forward's own code, with fnevr's compositing as its volume_render.
    theirs = forward.__globals__["volume_render"]
    ours = functools.partial(_volume_render, backend)
    gen = torch.Generator().manual_seed(0)
    param = next(module.parameters())
    rgb, sigma = (torch.randn(s, generator=gen).to(param) for s in ((2, 3, 2, 5, 6), (2, 3, 2, 5, 1)))
    why = _disagreement(theirs, ours, (rgb, sigma), param.dtype)
    if why:
        return False, f"its volume_render is not the published compositing ({why})"
    copy = _rebind_globals(forward, {id(theirs): ours})
    if copy is None:
        return False, "its forward reaches volume_render other than by that name"
    _replace(module, forward=copy)
    return True, "volume_render -> fnevr.ops.composite"


# --- batch norm ------------------------------------------------------------------------------------


def _batchnorm_forward(bn, x, *, backend="auto", original=None):
    """``original``: the forward of a class that is not torch's (the authors' SynchronizedBatchNorm),
    which checks no rank and counts no batches, and runs itself inside DataParallel (its sync)."""
    if original is None:
        bn._check_input_dim(x)
    elif getattr(bn, "_is_parallel", False) and bn.training:
        return original(bn, x)
    return batch_norm(bn, x, backend=backend, count_batches=original is None)


_TORCH_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _patch_batchnorm(module: nn.Module, backend: str):
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        return None
    own = type(module).forward
    plain = own in {cls.forward for cls in _TORCH_BATCHNORMS}
    if not plain and not hasattr(module, "_is_parallel"):
        return False, f"{type(module).__name__} has its own forward"
    original = None if plain else own
    C = module.num_features
    shape = {nn.BatchNorm1d: (4, C, 3), nn.BatchNorm3d: (2, C, 2, 2, 2)}
    dims = next((s for cls, s in shape.items() if isinstance(module, cls)), (2, C, 3, 3))
    forward = functools.partial(_batchnorm_forward, backend=backend, original=original)
    return _replace_checked(module, forward, lambda rand: (rand(*dims),), "spade_norm (batch)")


# --- the check -----------------------------------------------------------------------------------


def _disagreement(theirs, ours, inputs, dtype) -> str | None:
    with torch.no_grad():
        try:
            expected, actual = theirs(*inputs), ours(*inputs)
        except Exception as error:
            return f"{type(error).__name__}: {error}".splitlines()[0]
    tol = _TOLERANCES.get(dtype, 1e-4)
    try:
        torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, equal_nan=True)
    except (AssertionError, TypeError, ValueError) as error:
        return next((line.strip() for line in str(error).splitlines() if "mismatch" in line.lower()), "outputs differ")
    return None


def _replace_checked(module: nn.Module, forward, inputs, what: str):
    """Replace module.forward with forward(module, ...) if both agree on inputs(rand)."""
    param = next(module.parameters(), None)
    if param is None or param.device.type == "meta":
        return False, "no parameters with values to check the replacement on"
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(param)

    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        why = _disagreement(module.forward, functools.partial(forward, module), inputs(rand), param.dtype)
    finally:
        for m, mode in modes:
            m.training = mode
    if why:
        return False, f"its forward does not compute what {what} does ({why})"
    _replace(module, forward=forward)
    return True, what


# --- any code: torch.nn.functional.grid_sample -----------------------------------------------------


_functional_lock = threading.Lock()
_functional_depth = 0


class FunctionalPatch:
    """``torch.nn.functional.grid_sample`` swapped for fnevr's while active (see :func:`patch_functional`)."""

    def __init__(self, backend: str):
        self.backend, self.active = backend, False

    def __enter__(self) -> "FunctionalPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def undo(self) -> None:
        """Put PyTorch's grid_sample back (once every active patch is undone); repeat calls do nothing."""
        global _functional_depth
        with _functional_lock:
            if self.active:
                self.active = False
                _functional_depth -= 1
                if _functional_depth == 0:
                    F.grid_sample = TORCH_GRID_SAMPLE


def patch_functional(backend: str = "auto") -> FunctionalPatch:
    """Swap ``torch.nn.functional.grid_sample`` for fnevr's (same signature, same results; calls it
    does not handle go to PyTorch's) for code fnevr does not know: within ``with
    fnevr.patch_functional():``, or until ``.undo()``. Nested and repeated patches are counted;
    PyTorch's op comes back when the last is undone. Code that imported the function itself
    (``from torch.nn.functional import grid_sample``) before the patch keeps PyTorch's."""
    global _functional_depth
    handle = FunctionalPatch(backend)
    with _functional_lock:
        if _functional_depth == 0:
            F.grid_sample = _functional_grid_sample(backend)
        _functional_depth += 1
        handle.active = True
    return handle
