r"""SPADE: spatially-adaptive normalisation, as in FNeVR's decoder.

.. math::

    a = \mathrm{ReLU}(\mathrm{conv}_{3\times3}(\mathrm{resize}(m))), \quad
    \gamma = \mathrm{conv}^\gamma_{3\times3}(a), \quad \beta = \mathrm{conv}^\beta_{3\times3}(a), \quad
    y = \mathrm{act}(\mathrm{norm}(x)\,(1 + \gamma) + \beta)

with the modulation map ``m`` resized (nearest) to ``x``'s height and width (without gradients, by an
integer factor: the first convolution runs at ``m``'s resolution instead, same sums,
:mod:`fnevr.nn.upsampled_conv`), and the last step
:func:`fnevr.ops.spade_norm`, one fused op. γ and β come from one convolution with 2C outputs (the
two layers' weights concatenated at call time), while ``mlp_gamma`` and ``mlp_beta`` stay separate
parameters so the published checkpoints load unchanged.
"""

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.spade_norm import ACTIVATIONS, NORMS, spade_norm
from . import recompute
from .upsampled_conv import upsampled_conv3x3


def _resize_nearest(x: Tensor, size) -> Tensor:
    with torch.autocast(x.device.type, enabled=False):  # copies values: no need for CPU autocast's fp32
        return F.interpolate(x, size=size, mode="nearest")


class SPADE(nn.Module):
    """``SPADE(norm_channels, label_channels)(x, segmap)``: ``x`` ``[N, norm_channels, H, W]``, ``segmap``
    ``[N, label_channels, H', W']`` -> ``[N, norm_channels, H, W]``.

    Args:
        norm_channels: C, the channels of ``x``.
        label_channels: the channels of the modulation map (FNeVR: 128).
        hidden_channels: the channels of the shared convolution's output.
        norm: ``"instance"`` (FNeVR) or ``"batch"`` (keeps running statistics, like ``BatchNorm2d``).
        activation: ``None`` (FNeVR applies its ReLU outside), ``"relu"`` or ``"leaky_relu"``, fused in.
        backend: passed to :func:`fnevr.ops.spade_norm`.

    Submodules and state-dict keys as in the published model: ``param_free_norm`` (an
    ``InstanceNorm2d``/``BatchNorm2d`` without affine parameters; the instance norm has no state),
    ``mlp_shared.0`` (3x3 conv label -> hidden, then a ReLU), ``mlp_gamma`` and ``mlp_beta`` (3x3 convs
    hidden -> C). Example::

        >>> import torch, fnevr
        >>> layer = fnevr.nn.SPADE(32, 128)
        >>> y = layer(torch.randn(2, 32, 256, 256), torch.randn(2, 128, 64, 64))
        >>> y.shape
        torch.Size([2, 32, 256, 256])
    """

    def __init__(
        self,
        norm_channels: int,
        label_channels: int,
        hidden_channels: int = 128,
        norm: str = "instance",
        activation: str | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        self.norm, self.activation, self.ops_backend = norm, activation, backend
        if norm == "instance":
            self.param_free_norm = nn.InstanceNorm2d(norm_channels, affine=False)
        else:
            self.param_free_norm = nn.BatchNorm2d(norm_channels, affine=False)
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_channels, hidden_channels, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden_channels, norm_channels, 3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden_channels, norm_channels, 3, padding=1)

    def forward(self, x: Tensor, segmap: Tensor) -> Tensor:
        return spade_layer(self, x, segmap, norm=self.norm, activation=self.activation, backend=self.ops_backend)

    def extra_repr(self) -> str:
        return f"norm={self.norm!r}, activation={self.activation!r}, backend={self.ops_backend!r}"


def spade_layer(
    layer: nn.Module,
    x: Tensor,
    segmap: Tensor,
    *,
    norm: str = "instance",
    activation: str | None = None,
    backend: str = "auto",
) -> Tensor:
    """One SPADE layer's forward on any module with the published layout (``param_free_norm``,
    ``mlp_shared`` = [3x3 conv, ReLU], ``mlp_gamma``, ``mlp_beta``): :class:`SPADE` and, through
    :func:`fnevr.patch`, the authors' ``SPADE_layer``. ``norm`` says what ``param_free_norm`` is."""
    scale = x.shape[2] // segmap.shape[2]
    # Inference (no gradients, and not a checkpointed block's first pass, which must compute as
    # its recomputation in backward will): the shared convolution at the modulation map's
    # resolution, 2.7x less time at 4x. Its summed taps turn the full-resolution path's inf - inf
    # into inf, so a non-finite map takes the full-resolution path (checked in eager mode).
    inference = not torch.is_grad_enabled() and not recompute.inside()
    if (
        inference
        and scale >= 2
        and x.shape[2:] == (scale * segmap.shape[2], scale * segmap.shape[3])
        and (torch.compiler.is_compiling() or bool(torch.isfinite(segmap).all()))
    ):
        conv = layer.mlp_shared[0]
        hidden = torch.relu(upsampled_conv3x3(segmap, conv.weight, conv.bias, scale))
    else:
        if segmap.shape[2:] != x.shape[2:]:  # recomputable: the conv keeps it, C_label x H x W
            segmap = recompute.cheap_call(_resize_nearest, segmap, tuple(x.shape[2:]))
        hidden = layer.mlp_shared(segmap)
    weight = torch.cat([layer.mlp_gamma.weight, layer.mlp_beta.weight])
    bias = torch.cat([layer.mlp_gamma.bias, layer.mlp_beta.bias])
    gamma, beta = F.conv2d(hidden, weight, bias, padding=1).chunk(2, dim=1)
    if x.dtype != gamma.dtype:  # CPU autocast upsamples in fp32; convolutions give its dtype
        x = recompute.cheap_call(Tensor.to, x, gamma.dtype)
    pfn = layer.param_free_norm
    kw = {}
    if norm == "batch":
        training = layer.training or pfn.running_mean is None
        momentum = pfn.momentum
        if layer.training and pfn.num_batches_tracked is not None:
            pfn.num_batches_tracked.add_(1)
            if momentum is None:  # BatchNorm2d's cumulative moving average
                momentum = 1.0 / float(pfn.num_batches_tracked)
        kw = dict(
            running_mean=pfn.running_mean,
            running_var=pfn.running_var,
            training=training,
            momentum=momentum if momentum is not None else 0.0,
        )
    kw.update(norm=norm, eps=pfn.eps, activation=activation, backend=backend)
    out = spade_norm(x, gamma, beta, **kw)
    # The output is a pure function of x, gamma and beta, which the op keeps as they are when
    # they are contiguous; for other layouts (channels_last) it keeps copies, and a recipe would
    # keep the originals besides.
    if (norm == "instance" or not kw["training"]) and x.is_contiguous() and gamma.is_contiguous():
        out = recompute.cheap(out, functools.partial(spade_norm, **kw), x, gamma, beta)
    return out
