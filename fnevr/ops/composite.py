r"""Volume-rendering compositing: FNeVR's colour field and densities -> one colour per ray.

For each ray with D samples, colours :math:`c_i \in \mathbb{R}^C` and densities :math:`\sigma_i`:

.. math::

    p_i = \mathrm{act}(\sigma_i), \qquad
    C = \sum_{i=1}^{D} \tau_i \, (1 - e^{-p_i}) \, c_i, \qquad
    \tau_i = \begin{cases}
        \exp(-\sum_{j<i} p_j)   & \text{exclusive (the paper's Eq. 3)} \\
        \exp(-\sum_{j\le i} p_j) & \text{inclusive (the published code; its checkpoints need it)}
    \end{cases}

Shapes: ``color`` ``[..., D, C]`` (FNeVR: ``[B, 64, 64, 8, 256]``), ``density`` ``[..., D]`` or
``[..., D, 1]``, result ``[..., C]``. Gradients flow to both inputs. The fused backends save only
their inputs for backward and recompute the D weights per ray, so no ``[..., D, C]`` temporary is
kept. Example::

    >>> import torch, fnevr
    >>> color = torch.rand(2, 64, 64, 8, 256, requires_grad=True)
    >>> density = torch.randn(2, 64, 64, 8, 1, requires_grad=True)
    >>> rgb = fnevr.ops.composite(color, density, transmittance="inclusive")
    >>> rgb.shape
    torch.Size([2, 64, 64, 256])
    >>> rgb.sum().backward()

Backends: ``reference`` (this module's :func:`composite_reference`, the spec, plain autograd),
``cpu`` (csrc/composite/composite_cpu.cpp), ``cuda`` (csrc/composite/composite_cuda.cu), ``triton``
(kernels/composite.py); ``auto`` picks the fastest one available for the tensors' device.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _registry
from ._codes import Activation
from ._fused import custom_op

TRANSMITTANCES = ("exclusive", "inclusive")
# Names -> kernel codes (plain ints: what the schemas take)
ACTIVATIONS = {"relu": int(Activation.RELU), "softplus": int(Activation.SOFTPLUS), "none": int(Activation.NONE)}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def composite_reference(
    color: Tensor, density: Tensor, *, transmittance: str = "exclusive", density_activation: str = "relu"
) -> Tensor:
    """The spec: compositing in plain PyTorch ops, differentiated by autograd. Same arguments as
    :func:`composite` (unchecked); it keeps ``[..., D, C]`` temporaries for backward."""
    if density.dim() == color.dim():
        density = density.squeeze(-1)
    if density_activation == "relu":
        p = torch.relu(density)
    elif density_activation == "softplus":
        p = F.softplus(density)
    else:
        p = density
    depth = torch.cumsum(p, dim=-1)  # optical depth up to and including each sample
    if transmittance == "exclusive":  # shift, rather than subtract p: no cancellation for huge p
        depth = torch.cat([torch.zeros_like(depth[..., :1]), depth[..., :-1]], dim=-1)
    weights = torch.exp(-depth) * -torch.expm1(-p)
    return (weights.unsqueeze(-1) * color).sum(dim=-2)


def composite(
    color: Tensor,
    density: Tensor,
    *,
    transmittance: str = "exclusive",
    density_activation: str = "relu",
    backend: str = "auto",
) -> Tensor:
    """Composite ``color`` ``[..., D, C]`` along D with weights from ``density`` ``[..., D(, 1)]``.

    Args:
        color: per-sample colours or features, float16/bfloat16/float32/float64.
        density: per-sample densities, same dtype and device as ``color``.
        transmittance: ``"exclusive"`` (paper) or ``"inclusive"`` (published FNeVR code).
        density_activation: ``"relu"`` (published model), ``"softplus"`` or ``"none"``.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        ``[..., C]`` in ``color``'s dtype (fused backends accumulate in fp32, fp64 for fp64).
    """
    lead, D, C = _check(color, density, transmittance, density_activation)
    name = _registry.resolve(backend, color.device, "composite")
    if name == "reference":
        return composite_reference(color, density, transmittance=transmittance, density_activation=density_activation)
    R = math.prod(lead)
    out = _composite_op(
        color.reshape(R, D, C).contiguous(),
        density.reshape(R, D).contiguous(),
        transmittance == "inclusive",
        ACTIVATIONS[density_activation],
        name,
    )
    return out.reshape(*lead, C)


def _check(color, density, transmittance, density_activation):
    for arg, t in (("color", color), ("density", density)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{arg} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    shape, d_shape = color.shape, density.shape  # each .shape is a new torch.Size: read them once
    if len(shape) < 2:
        raise ValueError(f"color must be [..., D, C] (at least 2-D), got shape {tuple(shape)}")
    lead, D, C = shape[:-2], shape[-2], shape[-1]
    if len(d_shape) == len(shape) and d_shape[-1] == 1:
        d_lead, d_samples = d_shape[:-2], d_shape[-2]
    elif len(d_shape) == len(shape) - 1:
        d_lead, d_samples = d_shape[:-1], d_shape[-1]
    else:
        raise ValueError(
            f"density must be [..., D] or [..., D, 1] for color [..., D, C] of shape "
            f"{tuple(shape)}, got shape {tuple(d_shape)}"
        )
    if d_lead != lead:
        raise ValueError(f"density's leading (ray) dims {tuple(d_lead)} differ from color's {tuple(lead)}")
    if d_samples != D:
        raise ValueError(f"density has D={d_samples} samples per ray but color has D={D}")
    if density.dtype != color.dtype:
        raise ValueError(f"color and density must have the same dtype, got {color.dtype} and {density.dtype}")
    if density.device != color.device:
        raise ValueError(f"color and density must be on the same device, got {color.device} and {density.device}")
    if transmittance not in TRANSMITTANCES:
        raise ValueError(f"transmittance must be one of {TRANSMITTANCES}, got {transmittance!r}")
    if density_activation not in ACTIVATIONS:
        raise ValueError(f"density_activation must be one of {tuple(ACTIVATIONS)}, got {density_activation!r}")
    return lead, D, C


# --- torch.library registration: one op over flat [R, D, C] / [R, D] tensors --------------------


@custom_op("fnevr::composite")
def _composite_op(color: Tensor, density: Tensor, inclusive: bool, activation: int, backend: str) -> Tensor:
    return _registry.kernels(backend, "composite").composite_forward(color, density, inclusive, activation)


@_composite_op.register_fake
def _(color, density, inclusive, activation, backend):
    return color.new_empty((color.shape[0], color.shape[2]))


@custom_op("fnevr::composite_grad")
def _composite_grad_op(
    grad_out: Tensor, color: Tensor, density: Tensor, inclusive: bool, activation: int, backend: str, color_grad: bool
) -> tuple[Tensor, Tensor]:
    k = _registry.kernels(backend, "composite")
    return k.composite_backward(grad_out, color, density, inclusive, activation, color_grad)


@_composite_grad_op.register_fake
def _(grad_out, color, density, inclusive, activation, backend, color_grad):
    return color.new_empty(color.shape if color_grad else (0,)), torch.empty_like(density)


def _setup_context(ctx, inputs, output):
    color, density, inclusive, activation, backend = inputs
    ctx.save_for_backward(color, density)
    ctx.options = (inclusive, activation, backend)


def _backward(ctx, grad_out):
    color, density = ctx.saved_tensors
    color_grad = ctx.needs_input_grad[0]
    grad_color, grad_density = _composite_grad_op(grad_out.contiguous(), color, density, *ctx.options, color_grad)
    return (grad_color if color_grad else None), grad_density, None, None, None


_composite_op.register_autograd(_backward, setup_context=_setup_context)
_NAMES = {code: name for name, code in ACTIVATIONS.items()}


@_composite_op.register_decomposition
def _(color, density, inclusive, activation, backend):  # cumsum, exp, expm1 and a sum: ONNX has each
    transmittance = "inclusive" if inclusive else "exclusive"
    return composite_reference(color, density, transmittance=transmittance, density_activation=_NAMES[activation])


def _samples(device, dtype, generator) -> list[_registry.Sample]:
    """The first is bench_overhead's tiny call (16 rays of 8 samples, 8 channels)."""
    color, density = _registry.tensors([(1, 4, 4, 8, 8), (1, 4, 4, 8, 1)], device, dtype, generator)
    density = density * 2 - 0.5
    saved = color.numel() + density.numel()
    return [
        _registry.Sample("inclusive", (color, density), dict(transmittance="inclusive"), (0, 1), saved),
        _registry.Sample(
            "exclusive-softplus",
            (color, density),
            dict(transmittance="exclusive", density_activation="softplus"),
            (1,),
            saved,
        ),
    ]


OP = _registry.register(
    _registry.Op(
        name="composite",
        fn=composite,
        reference=composite_reference,
        samples=_samples,
        auto={"cpu": _registry.CPU_ORDER, "cuda": ("triton", "cuda")},
        why_auto="CUDA: Triton (H100, 2026-11-24, benchmarks/results/composite-cuda-*-4325dc8.txt: fwd+bwd 163 us "
        "against CUDA's 202 in fp32, 82 against 132 in bf16; the forwards tie)",
    )
)
