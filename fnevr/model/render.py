r"""The neural volume renderer: orthogonal adaptive ray sampler, per-sample MLP, compositing and the
mini decoder (FNeVR Sec. 3.2).

Every pixel of the warped feature map ``[B, C, h, w]`` casts one orthogonal ray with D samples.
The ray sampler turns the features into per-sample colour and shape codes, the per-sample MLP
into a colour feature ``c_i`` (C channels) and a density ``σ_i``, and compositing
(``fnevr.ops.composite``) into one feature per ray:

.. math::  F = \mathrm{sigmoid}\Big(\sum_i \tau_i (1 - e^{-p_i}) c_i\Big), \quad p_i = \mathrm{relu}(\sigma_i)

with the published model's inclusive transmittance :math:`\tau_i = e^{-\sum_{j \le i} p_j}`
(``transmittance="exclusive"`` gives the paper's Eq. 3).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .blocks import ConvBlock, ResBlock3d


class RaySampler(nn.Module):
    """Orthogonal adaptive ray sampler: features ``[B, C, h, w]`` -> colour codes and shape codes,
    both ``[B, h, w, D, e]`` (``e = channels / D``).

    Colour branch: a 3x3 conv to ``color_channels``, split channel-major into (e, D). Shape branch:
    a 3x3 conv to ``shape_channels``, viewed as an ``[B, e, D, h, w]`` volume and refined by three
    3-D residual blocks, each followed by a BatchNorm3d.
    """

    def __init__(self, in_channels: int, color_channels: int = 128, shape_channels: int = 128, samples: int = 8):
        super().__init__()
        if color_channels % samples or shape_channels % samples:
            raise ValueError(
                f"color_channels ({color_channels}) and shape_channels ({shape_channels}) must be "
                f"multiples of samples ({samples})"
            )
        self.samples = samples
        self.color_conv = nn.Conv2d(in_channels, color_channels, 3, padding=1)
        self.shape_conv = nn.Conv2d(in_channels, shape_channels, 3, padding=1)
        e = shape_channels // samples
        self.shape_blocks = nn.Sequential(*(m for _ in range(3) for m in (ResBlock3d(e), nn.BatchNorm3d(e))))

    def _to_rays(self, x: Tensor) -> Tensor:  # [B, e, D, h, w] -> [B, h, w, D, e]
        return x.permute(0, 3, 4, 2, 1)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (colour codes, shape codes, the shape volume ``[B, e, D, h, w]``)."""
        B, _, h, w = features.shape
        color = self.color_conv(features).view(B, -1, self.samples, h, w)
        volume = self.shape_blocks(self.shape_conv(features).view(B, -1, self.samples, h, w))
        return self._to_rays(color), self._to_rays(volume), volume


class SampleMLP(nn.Module):
    """Per-sample MLP (ReLU between layers): shape code -> density and a ``hidden/4`` feature;
    colour code -> ``hidden``; both concatenated -> ``hidden`` -> ``hidden`` -> colour feature
    ``out_channels`` (the last layer is linear).

    ``[..., e_color]``, ``[..., e_shape]`` -> colour ``[..., out_channels]``, density ``[..., 1]``.
    """

    def __init__(self, color_dim: int = 16, shape_dim: int = 16, hidden: int = 128, out_channels: int = 256):
        super().__init__()
        self.shape_in = nn.Linear(shape_dim, hidden)
        self.shape_hidden = nn.Linear(hidden, hidden)
        self.density = nn.Linear(hidden, 1)
        self.shape_feature = nn.Linear(hidden, hidden // 4)
        self.color_in = nn.Linear(color_dim, hidden)
        self.fuse = nn.Linear(hidden // 4 + hidden, hidden)
        self.fuse_hidden = nn.Linear(hidden, hidden)
        self.color_out = nn.Linear(hidden, out_channels)

    def hidden_features(self, color_code: Tensor, shape_code: Tensor) -> tuple[Tensor, Tensor]:
        """Everything but the last (linear) layer: ``[..., hidden]`` features and ``[..., 1]`` density."""
        s = torch.relu(self.shape_hidden(torch.relu(self.shape_in(shape_code))))
        density = self.density(s)
        x = torch.cat([torch.relu(self.shape_feature(s)), torch.relu(self.color_in(color_code))], dim=-1)
        return torch.relu(self.fuse_hidden(torch.relu(self.fuse(x)))), density

    def forward(self, color_code: Tensor, shape_code: Tensor) -> tuple[Tensor, Tensor]:
        x, density = self.hidden_features(color_code, shape_code)
        return self.color_out(x), density


FUSED_HEADS = ("none", "hidden", "mlp")


def fused_head_choice(value: str | bool) -> str:
    """``render_params.fused_head`` as one of :data:`FUSED_HEADS` (the booleans of older configs:
    ``false`` is ``"none"``, ``true`` is ``"hidden"``)."""
    if value is False or value is True:
        return "hidden" if value else "none"
    if value not in FUSED_HEADS:
        raise ValueError(
            f"fused_head must be one of {FUSED_HEADS} (or, from older configs, false or true), got {value!r}"
        )
    return value


class VolumeRenderer(nn.Module):
    r"""Ray sampler + per-sample MLP + compositing + mini decoder.

    Features ``[B, C, h, w]`` -> ``render`` ``[B, C, h, w]`` (composited, sigmoid),
    ``mini_render`` ``[B, 3, 4h, 4w]`` (two nearest-upsampling conv blocks, sigmoid: an auxiliary
    image) and ``shape_volume`` ``[B, e, D, h, w]``.

    ``fused_head`` (one of :data:`FUSED_HEADS`): the MLP's last layer is linear, so it commutes with
    compositing, :math:`\sum_i w_i (W h_i + b) = W \sum_i w_i h_i + b \sum_i w_i`. With ``"hidden"`` the renderer
    composites the ``hidden``-channel features (and a tensor of ones, for :math:`\sum_i w_i`) and
    applies the last layer once per ray: the ``[B, h, w, D, C]`` colour field and its gradient never
    exist, and that layer does D times less work. With ``"mlp"`` the whole per-sample MLP and the
    compositing run as one fused op (:func:`fnevr.ops.mlp_composite`), which keeps the per-sample
    activations on chip and recomputes them in backward. Same outputs up to round-off, same
    parameters, in every mode. ``"none"`` runs the published per-sample MLP, then compositing.
    Configs written before these names may say ``false`` (``"none"``) or ``true`` (``"hidden"``).
    """

    def __init__(
        self,
        in_channels: int = 256,
        color_channels: int = 128,
        shape_channels: int = 128,
        samples: int = 8,
        hidden: int = 128,
        transmittance: str = "inclusive",
        fused_head: str | bool = "none",
    ):
        super().__init__()
        self.transmittance, self.fused_head = transmittance, fused_head_choice(fused_head)
        self.ops_backend = "auto"
        self.ray_sampler = RaySampler(in_channels, color_channels, shape_channels, samples)
        self.sample_mlp = SampleMLP(color_channels // samples, shape_channels // samples, hidden, in_channels)
        self.mini_decoder = nn.Sequential(
            ConvBlock(in_channels, in_channels // 4, "up"), ConvBlock(in_channels // 4, 3, "up")
        )

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        color_code, shape_code, volume = self.ray_sampler(features)
        kw = dict(transmittance=self.transmittance, density_activation="relu", backend=self.ops_backend)
        head = self.sample_mlp.color_out
        if self.fused_head == "mlp":
            hidden, weight_sum = ops.mlp_composite(
                color_code, shape_code, dict(self.sample_mlp.named_parameters()), **kw
            )  # composited: [B, h, w, hidden], [B, h, w, 1]
            rays = F.linear(hidden, head.weight) + weight_sum * head.bias
        elif self.fused_head == "hidden":
            hidden, density = self.sample_mlp.hidden_features(color_code, shape_code)  # [B, h, w, D, hidden]
            weight_sum = ops.composite(torch.ones_like(density), density, **kw)  # [B, h, w, 1]
            rays = F.linear(ops.composite(hidden, density, **kw), head.weight) + weight_sum * head.bias
        else:
            color, density = self.sample_mlp(color_code, shape_code)  # [B, h, w, D, C], [B, h, w, D, 1]
            rays = ops.composite(color, density, **kw)  # [B, h, w, C]
        render = torch.sigmoid(rays.permute(0, 3, 1, 2))
        # The published mini decoder applies ReLU after an up block that already ends in ReLU, and a
        # sigmoid after the last one: relu(relu(x)) = relu(x), so only the sigmoid is extra.
        mini = torch.sigmoid(self.mini_decoder(render))
        return {"render": render, "mini_render": mini, "shape_volume": volume}
