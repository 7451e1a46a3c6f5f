"""Building blocks shared by the FNeVR networks: conv-norm-ReLU blocks, the hourglass, band-limited
downsampling and the keypoint geometry helpers (coordinate grids, Gaussian heatmaps).

Submodule names (``conv``, ``norm``, ``conv1``...) are kept stable because published checkpoints
address them; the networks built from these blocks give them descriptive names of their own.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import recompute
from ..nn.conv3d import Conv3d


def coordinate_grid(height: int, width: int, like: Tensor) -> Tensor:
    """``[H, W, 2]`` grid of (x, y) pixel centres in [-1, 1], corners included (the keypoints'
    convention), in ``like``'s dtype and device."""

    def axis(n):  # 2 i / (n - 1) - 1, the published arithmetic (linspace rounds differently)
        i = torch.arange(n, dtype=like.dtype, device=like.device)
        return 2 * (i / (n - 1)) - 1 if n > 1 else torch.zeros_like(i)

    return torch.stack(torch.meshgrid(axis(width), axis(height), indexing="xy"), dim=-1)


def gaussian_heatmaps(kp: Tensor, height: int, width: int, variance: float) -> Tensor:
    """Unnormalised Gaussians ``exp(-|p - kp|^2 / (2 variance))`` around keypoints ``kp`` ``[B, K, 2]``
    -> ``[B, K, H, W]``."""
    grid = coordinate_grid(height, width, kp)  # [H, W, 2]
    diff = grid.view(1, 1, height, width, 2) - kp.view(*kp.shape[:2], 1, 1, 2)
    return torch.exp(-0.5 * diff.pow(2).sum(-1) / variance)


def cat_channels(*parts: Tensor) -> Tensor:
    """``torch.cat(parts, dim=1)``, in autocast's dtype under autocast: the next convolution casts
    to it anyway, and keeps that copy."""
    dtype = recompute.autocast_dtype(parts[0])
    return torch.cat([p.to(dtype) for p in parts] if dtype else parts, dim=1)


def upsample2x(x: Tensor) -> Tensor:
    """2x nearest upsampling, recomputable (:mod:`fnevr.nn.recompute`): the next conv keeps its
    input, four times the size of ``x``."""
    return recompute.cheap_call(_nearest2x, x)


def _nearest2x(x):
    dtype = recompute.autocast_dtype(x)  # the next conv casts to it; nearest upsampling only copies values
    with torch.autocast(x.device.type, enabled=False):
        return F.interpolate(x if dtype is None else x.to(dtype), scale_factor=2.0)


def norm_act(norm: nn.Module, x: Tensor, act=torch.relu, pool: bool = False) -> Tensor:
    """``act(norm(x))``, then a 2x average pool if ``pool``. Inside
    :func:`fnevr.nn.recompute.saving_memory` a plain BatchNorm keeps only ``x`` (and the batch
    statistics are recomputed from it in backward, without touching the running ones)."""

    def run(x, *affine):
        y = norm(x) if act is None else act(norm(x))
        return F.avg_pool2d(y, 2) if pool else y

    if type(norm) not in (nn.BatchNorm2d, nn.BatchNorm3d) or norm.weight is None:  # e.g. SyncBatchNorm
        return run(x)
    training = norm.training or norm.running_mean is None
    stats = (None, None) if training else (norm.running_mean, norm.running_var)

    def pure(x, weight, bias):
        y = F.batch_norm(x, *stats, weight, bias, training, 0.0, norm.eps)
        y = y if act is None else act(y)
        return F.avg_pool2d(y, 2) if pool else y

    if recompute.recomputing():  # a checkpointed block runs again: the running statistics are updated
        return pure(x, norm.weight, norm.bias)
    return recompute.recomputed(run, x, norm.weight, norm.bias, pure=pure)


class ConvBlock(nn.Module):
    """conv -> BatchNorm -> ReLU, then optionally a 2x average pool ("down") or preceded by a 2x
    nearest upsample ("up"). ``kind``: "same", "down" or "up"."""

    def __init__(self, in_channels: int, out_channels: int, kind: str = "same", kernel_size: int = 3):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "up":
            x = upsample2x(x)
        return norm_act(self.norm, self.conv(x), pool=self.kind == "down")


class ResBlock3d(nn.Module):
    """Pre-activation 3-D residual block: x + conv(relu(bn(conv(relu(bn(x))))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = Conv3d(channels, channels, 3, padding=1)
        self.conv2 = Conv3d(channels, channels, 3, padding=1)
        self.norm1 = nn.BatchNorm3d(channels)
        self.norm2 = nn.BatchNorm3d(channels)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(norm_act(self.norm1, x))
        return x + self.conv2(norm_act(self.norm2, out))


class Hourglass(nn.Module):
    """U-Net of ``num_blocks`` down and up :class:`ConvBlock` s with skip connections.

    ``[B, in_channels, H, W]`` -> ``[B, out_channels, H, W]`` with
    ``out_channels = block_expansion + in_channels`` (the last skip is the input itself).
    H and W must be divisible by ``2**num_blocks``.
    """

    def __init__(self, in_channels: int, block_expansion: int, num_blocks: int, max_features: int):
        super().__init__()

        def width(i):
            return min(max_features, block_expansion * 2**i)

        self.down = nn.ModuleList(
            ConvBlock(in_channels if i == 0 else width(i), width(i + 1), "down") for i in range(num_blocks)
        )
        self.up = nn.ModuleList(
            ConvBlock((1 if i == num_blocks - 1 else 2) * width(i + 1), width(i), "up")
            for i in reversed(range(num_blocks))
        )
        self.out_channels = block_expansion + in_channels

    def forward(self, x: Tensor) -> Tensor:
        # --checkpoint-activations: each block keeps only its input (SyncBatchNorm cannot run twice)
        plain = recompute.checkpointing() and all(type(m.norm) is nn.BatchNorm2d for m in (*self.down, *self.up))
        skips = [x]
        for block in self.down:
            skips.append(recompute.checkpoint_module(block, skips[-1]) if plain else block(skips[-1]))
        out = skips.pop()
        for block in self.up:
            out = recompute.cheap_call(
                cat_channels, recompute.checkpoint_module(block, out) if plain else block(out), skips.pop()
            )
        return out


def gaussian_kernel(scale: float) -> Tensor:
    """The normalised 1-D Gaussian taps for band-limited downsampling by ``scale`` (``[1]`` for
    scale 1): ``sigma = (1/scale - 1) / 2``, ``2 round(4 sigma) + 1`` taps (FOMM's choice)."""
    sigma = (1 / scale - 1) / 2
    if sigma == 0:
        return torch.ones(1)
    size = 2 * round(4 * sigma) + 1
    taps = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    return (taps / taps.sum()).float()


class AntiAliasDownsample(nn.Module):
    weight: Tensor  # a buffer
    """Gaussian blur then stride-``1/scale`` subsampling (band-limited downsampling), per channel.

    ``sigma = (1/scale - 1) / 2``, kernel ``2*round(4 sigma) + 1``; the kernel is a buffer named
    ``weight`` (``[C, 1, k, k]``), as in published checkpoints.
    """

    def __init__(self, channels: int, scale: float):
        super().__init__()
        self.scale = scale
        self.stride = round(1 / scale)
        taps = gaussian_kernel(scale)
        size = taps.numel()
        self.pad = size // 2
        self.register_buffer("weight", (taps[:, None] * taps[None, :]).expand(channels, 1, size, size).clone())

    def forward(self, x: Tensor) -> Tensor:
        if self.scale == 1:
            return x
        x = F.conv2d(F.pad(x, (self.pad,) * 4), self.weight.to(x.dtype), groups=x.shape[1])
        return x[:, :, :: self.stride, :: self.stride]
