r"""FNeVR's per-sample MLP and compositing in one op: ray codes -> composited hidden features.

Each ray has D samples with a colour code :math:`c_i \in \mathbb{R}^{E_c}` and a shape code
:math:`s_i \in \mathbb{R}^{E_s}`. The MLP (``fnevr.model.render.SampleMLP`` up to its last layer;
:math:`\rho` is ReLU, every layer affine) gives a density and an H-channel feature per sample:

.. math::

    a_i = \rho(W_{sh} \rho(W_{si} s_i)), \quad \sigma_i = w_\sigma^\top a_i, \quad
    h_i = \rho\big(W_{fh} \rho(W_f [\rho(W_{sf} a_i); \rho(W_{ci} c_i)])\big)

and compositing (as :func:`fnevr.ops.composite`, weights :math:`w_i = \tau_i (1 - e^{-p_i})`,
:math:`p_i = \mathrm{act}(\sigma_i)`) sums them along the ray:

.. math::  F = \sum_i w_i h_i, \qquad S = \sum_i w_i

Because the MLP's last layer :math:`(W, b)` is linear, the colour the unfused model composites is
:math:`\sum_i w_i (W h_i + b) = W F + b S`. The fused backends keep every per-sample activation on
chip and recompute them in backward: nothing of size ``[..., D, H]`` is stored, only the inputs.

Shapes: ``color_code`` ``[..., D, Ec]``, ``shape_code`` ``[..., D, Es]``; ``params`` the 14
tensors named in :data:`PARAMETERS` (``fnevr.ops.MLP_PARAMETERS``; Linear layout, ``weight``
``[out, in]``), as a mapping (e.g. ``dict(sample_mlp.named_parameters())``; extra names are
ignored) or a sequence in that order.
Result: ``features`` ``[..., H]`` and ``weight_sum`` ``[..., 1]``. Gradients flow to the codes and
every parameter. Under autocast the codes and parameters run in the autocast dtype, as
``nn.Linear`` would; otherwise all must share one dtype. Example::

    >>> import torch, fnevr
    >>> mlp = fnevr.model.render.SampleMLP(color_dim=16, shape_dim=16, hidden=128, out_channels=256)
    >>> color, shape = torch.rand(2, 64, 64, 8, 16), torch.rand(2, 64, 64, 8, 16)
    >>> feat, wsum = fnevr.ops.mlp_composite(color, shape, dict(mlp.named_parameters()),
    ...                                      transmittance="inclusive")
    >>> rgb = torch.nn.functional.linear(feat, mlp.color_out.weight) + wsum * mlp.color_out.bias
    >>> rgb.shape
    torch.Size([2, 64, 64, 256])

Backends: ``reference`` (:func:`mlp_composite_reference`, plain PyTorch and autograd, which keeps
every activation), ``cpu`` (csrc/mlp_composite/mlp_composite_cpu.cpp), ``cuda``
(csrc/mlp_composite/mlp_composite_cuda.cu), ``triton`` (kernels/mlp_composite.py).
"""

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _registry
from ._fused import custom_op
from .composite import _NAMES as _ACTIVATION_NAMES
from .composite import ACTIVATIONS, TRANSMITTANCES, composite_reference

# The MLP's layers, in the order the kernels take them: (name, activation follows).
LAYERS = ("shape_in", "shape_hidden", "density", "shape_feature", "color_in", "fuse", "fuse_hidden")
PARAMETERS = tuple(f"{layer}.{kind}" for layer in LAYERS for kind in ("weight", "bias"))
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def mlp_composite_reference(
    color_code: Tensor,
    shape_code: Tensor,
    params,
    *,
    transmittance: str = "exclusive",
    density_activation: str = "relu",
) -> tuple[Tensor, Tensor]:
    """The spec: the MLP layer by layer and :func:`fnevr.ops.composite_reference`, differentiated
    by autograd. Same arguments as :func:`mlp_composite` (unchecked)."""
    p = dict(zip(PARAMETERS, _as_list(params)))

    def layer(name, x):
        return torch.relu(F.linear(x, p[f"{name}.weight"], p[f"{name}.bias"]))

    a = layer("shape_hidden", layer("shape_in", shape_code))
    density = F.linear(a, p["density.weight"], p["density.bias"])  # [..., D, 1]
    x = torch.cat([layer("shape_feature", a), layer("color_in", color_code)], dim=-1)
    hidden = layer("fuse_hidden", layer("fuse", x))
    kw = dict(transmittance=transmittance, density_activation=density_activation)
    return composite_reference(hidden, density, **kw), composite_reference(torch.ones_like(density), density, **kw)


def mlp_composite(
    color_code: Tensor,
    shape_code: Tensor,
    params,
    *,
    transmittance: str = "exclusive",
    density_activation: str = "relu",
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Run the per-sample MLP on ``[..., D, E]`` codes and composite along D (see the module doc).

    Args:
        color_code: ``[..., D, Ec]`` float16/bfloat16/float32/float64.
        shape_code: ``[..., D, Es]``, same leading dims, dtype and device.
        params: the 14 parameters of :data:`PARAMETERS`, a mapping by name or a sequence in order.
        transmittance: ``"exclusive"`` (paper) or ``"inclusive"`` (published FNeVR code).
        density_activation: ``"relu"`` (published model), ``"softplus"`` or ``"none"``.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        ``(features [..., H], weight_sum [..., 1])`` in the codes' dtype (fused backends keep
        activations and sums in fp32, fp64 for fp64).
    """
    params = _as_list(params)
    color_code, shape_code, params = _cast(color_code, shape_code, params)
    lead, D, H = _check(color_code, shape_code, params, transmittance, density_activation)
    name = _registry.resolve(backend, color_code.device, "mlp_composite")
    if name == "reference":
        return mlp_composite_reference(
            color_code, shape_code, params, transmittance=transmittance, density_activation=density_activation
        )
    R = math.prod(lead)
    features, weight_sum = _mlp_composite_op(
        color_code.reshape(R, D, color_code.shape[-1]).contiguous(),
        shape_code.reshape(R, D, shape_code.shape[-1]).contiguous(),
        [t.contiguous() for t in params],
        transmittance == "inclusive",
        ACTIVATIONS[density_activation],
        name,
    )
    return features.reshape(*lead, H), weight_sum.reshape(*lead, 1)


def layer_shapes(Ec: int, Es: int, H: int, H4: int) -> dict[str, tuple[int, int]]:
    """(out, in) of each of the MLP's Linear layers, by name, for codes of widths Ec, Es, hidden
    width H and shape-feature width H4."""
    return {
        "shape_in": (H, Es),
        "shape_hidden": (H, H),
        "density": (1, H),
        "shape_feature": (H4, H),
        "color_in": (H, Ec),
        "fuse": (H, H4 + H),
        "fuse_hidden": (H, H),
    }


def _as_list(params) -> list[Tensor]:
    if isinstance(params, Mapping):
        missing = [n for n in PARAMETERS if n not in params]
        if missing:
            raise ValueError(f"params is missing {missing}; it needs {list(PARAMETERS)}")
        return [params[n] for n in PARAMETERS]
    if not isinstance(params, Sequence) or len(params) != len(PARAMETERS):
        raise ValueError(
            f"params must be a mapping or a sequence of {len(PARAMETERS)} tensors "
            f"({list(PARAMETERS)}), got {type(params).__name__}"
            + (f" of length {len(params)}" if isinstance(params, Sequence) else "")
        )
    return list(params)


def _cast(color_code, shape_code, params):
    """Under autocast, everything runs in its dtype (as nn.Linear would)."""
    if isinstance(color_code, Tensor) and torch.is_autocast_enabled(color_code.device.type):
        dtype = torch.get_autocast_dtype(color_code.device.type)
        return color_code.to(dtype), shape_code.to(dtype), [t.to(dtype) for t in params]
    return color_code, shape_code, params


def _check(color_code, shape_code, params, transmittance, density_activation):
    for arg, t in [("color_code", color_code), ("shape_code", shape_code)] + list(zip(PARAMETERS, params)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{arg} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.dtype != color_code.dtype:
            raise ValueError(
                f"{arg} must have color_code's dtype {color_code.dtype}, got {t.dtype} "
                "(outside autocast every input shares one dtype)"
            )
        if t.device != color_code.device:
            raise ValueError(f"{arg} must be on color_code's device {color_code.device}, got {t.device}")
    for arg, t in (("color_code", color_code), ("shape_code", shape_code)):
        if t.dim() < 2:
            raise ValueError(f"{arg} must be [..., D, E] (at least 2-D), got shape {tuple(t.shape)}")
    if color_code.shape[:-1] != shape_code.shape[:-1]:
        raise ValueError(
            f"shape_code's leading dims [..., D] {tuple(shape_code.shape[:-1])} differ from "
            f"color_code's {tuple(color_code.shape[:-1])}"
        )
    p = dict(zip(PARAMETERS, params))
    H, H4 = p["shape_in.weight"].shape[0], p["shape_feature.weight"].shape[0]
    Ec, Es = color_code.shape[-1], shape_code.shape[-1]
    for layer, (out, inp) in layer_shapes(Ec, Es, H, H4).items():
        w, b = p[f"{layer}.weight"], p[f"{layer}.bias"]
        if tuple(w.shape) != (out, inp) or tuple(b.shape) != (out,):
            raise ValueError(
                f"params {layer}.weight/.bias must be [{out}, {inp}] and [{out}] (H={H}, H/4 "
                f"part={H4}, Ec={Ec}, Es={Es}), got {tuple(w.shape)} and {tuple(b.shape)}"
            )
    if min(H, H4, Ec, Es) == 0:
        raise ValueError(f"the MLP's widths must be positive, got H={H}, H4={H4}, Ec={Ec}, Es={Es}")
    if transmittance not in TRANSMITTANCES:
        raise ValueError(f"transmittance must be one of {TRANSMITTANCES}, got {transmittance!r}")
    if density_activation not in ACTIVATIONS:
        raise ValueError(f"density_activation must be one of {tuple(ACTIVATIONS)}, got {density_activation!r}")
    return tuple(color_code.shape[:-2]), color_code.shape[-2], H


# --- torch.library registration: one op over flat [R, D, E] codes --------------------------------


@custom_op("fnevr::mlp_composite")
def _mlp_composite_op(
    color_code: Tensor, shape_code: Tensor, params: list[Tensor], inclusive: bool, activation: int, backend: str
) -> tuple[Tensor, Tensor]:
    return _registry.kernels(backend, "mlp_composite").mlp_composite_forward(
        color_code, shape_code, params, inclusive, activation
    )


@_mlp_composite_op.register_fake
def _(color_code, shape_code, params, inclusive, activation, backend):
    R, H = color_code.shape[0], params[0].shape[0]
    return color_code.new_empty((R, H)), color_code.new_empty((R,))


@_mlp_composite_op.register_decomposition
def _(color_code, shape_code, params, inclusive, activation, backend):  # linear layers and the compositing
    transmittance = "inclusive" if inclusive else "exclusive"
    kw = dict(transmittance=transmittance, density_activation=_ACTIVATION_NAMES[activation])
    features, weight_sum = mlp_composite_reference(color_code, shape_code, params, **kw)
    return features, weight_sum.squeeze(-1)


@custom_op("fnevr::mlp_composite_grad")
def _mlp_composite_grad_op(
    grad_features: Tensor,
    grad_weight_sum: Tensor,
    color_code: Tensor,
    shape_code: Tensor,
    params: list[Tensor],
    inclusive: bool,
    activation: int,
    backend: str,
) -> list[Tensor]:
    return _registry.kernels(backend, "mlp_composite").mlp_composite_backward(
        grad_features, grad_weight_sum, color_code, shape_code, params, inclusive, activation
    )


@_mlp_composite_grad_op.register_fake
def _(grad_features, grad_weight_sum, color_code, shape_code, params, inclusive, activation, backend):
    return [torch.empty_like(t) for t in [color_code, shape_code, *params]]


def _setup_context(ctx, inputs, output):
    color_code, shape_code, params, inclusive, activation, backend = inputs
    ctx.save_for_backward(color_code, shape_code, *params)
    ctx.options = (inclusive, activation, backend)


def _backward(ctx, grad_features, grad_weight_sum):
    color_code, shape_code, *params = ctx.saved_tensors
    # An output that took no part in the loss comes back as None.
    if grad_features is None:
        grad_features = color_code.new_zeros((color_code.shape[0], params[0].shape[0]))
    if grad_weight_sum is None:
        grad_weight_sum = color_code.new_zeros((color_code.shape[0],))
    grad_color, grad_shape, *grad_params = _mlp_composite_grad_op(
        grad_features.contiguous(), grad_weight_sum.contiguous(), color_code, shape_code, params, *ctx.options
    )
    return grad_color, grad_shape, grad_params, None, None, None


_mlp_composite_op.register_autograd(_backward, setup_context=_setup_context)


def _samples(device, dtype, generator) -> list[_registry.Sample]:
    """Codes and parameters scaled so that the ReLUs cut about half the units and densities spread
    around zero (Ec = Es = 4, H = 16, H4 = 4, on 16 rays of 8 samples: bench_overhead's tiny call)."""
    Ec, Es, H, H4 = 4, 4, 16, 4
    widths = layer_shapes(Ec, Es, H, H4)
    cc, sc = (t * 2 - 1 for t in _registry.tensors([(1, 4, 4, 8, Ec), (1, 4, 4, 8, Es)], device, dtype, generator))
    params = []
    for name in PARAMETERS:
        out, fan_in = widths[name.split(".")[0]]
        (t,) = _registry.tensors([(out, fan_in) if name.endswith("weight") else (out,)], device, dtype, generator)
        params.append((t * 2 - 1) * (2.5 / fan_in**0.5))
    saved = cc.numel() + sc.numel() + sum(p.numel() for p in params)
    return [
        _registry.Sample("inclusive", (cc, sc, params), dict(transmittance="inclusive"), (0, 1, 2), saved),
        _registry.Sample(
            "exclusive-softplus",
            (cc, sc, params),
            dict(transmittance="exclusive", density_activation="softplus"),
            (1,),
            saved,
        ),
    ]


OP = _registry.register(
    _registry.Op(
        name="mlp_composite",
        fn=mlp_composite,
        reference=mlp_composite_reference,
        samples=_samples,
        auto={"cpu": _registry.CPU_ORDER, "cuda": ("triton", "cuda")},
        why_auto="CUDA: not yet timed on a GPU; Triton until it is",
        # Seven layers and a compositing sum round more than one op: fp16/bf16 get twice the default.
        tolerance={
            **_registry.TOLERANCE,
            torch.float16: 2 * _registry.TOLERANCE[torch.float16],
            torch.bfloat16: 2 * _registry.TOLERANCE[torch.bfloat16],
        },
    )
)
