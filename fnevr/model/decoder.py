"""The SPADE decoder: warped features + rendered features -> the output image (FNeVR Sec. 3.3)."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import SPADE, recompute


def _bilinear2x(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)


class SPADEBlock(nn.Module):
    """SPADE(+ReLU) -> 3x3 conv -> SPADE(+ReLU) -> 3x3 conv; ``[B, C, H, W]`` -> ``[B, out, H, W]``.
    Each normalisation, modulation and ReLU is one fused ``fnevr.ops.spade_norm``."""

    def __init__(self, channels: int, out_channels: int, modulation_channels: int):
        super().__init__()
        self.norm1 = SPADE(channels, modulation_channels, activation="relu")
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = SPADE(channels, modulation_channels, activation="relu")
        self.conv2 = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor, modulation: Tensor) -> Tensor:
        return self.conv2(self.norm2(self.conv1(self.norm1(x, modulation)), modulation))


class SPADEDecoder(nn.Module):
    """``[B, C, h, w]`` -> image ``[B, 3, 4h, 4w]`` in (0, 1).

    A 3x3 conv + ReLU makes the modulation map (``modulation_channels``) once; four SPADE blocks
    C -> C/4 (then 2x bilinear upsampling) -> C/16 (then 2x upsampling) -> C/16 -> C/16; a 7x7 conv
    to RGB and a sigmoid. The upsampling aligns corners, as the published model's does.
    """

    def __init__(self, in_channels: int = 512, modulation_channels: int = 128):
        super().__init__()
        c = in_channels
        self.modulation_conv = nn.Conv2d(c, modulation_channels, 3, padding=1)
        self.blocks = nn.ModuleList(
            [
                SPADEBlock(c, c // 4, modulation_channels),
                SPADEBlock(c // 4, c // 16, modulation_channels),
                SPADEBlock(c // 16, c // 16, modulation_channels),
                SPADEBlock(c // 16, c // 16, modulation_channels),
            ]
        )
        self.to_rgb = nn.Conv2d(c // 16, 3, 7, padding=3)

    def forward(self, x: Tensor) -> Tensor:
        modulation = torch.relu(self.modulation_conv(x))
        checkpoint = recompute.checkpointing() and all(
            m.norm == "instance" for m in self.modules() if isinstance(m, SPADE)
        )  # stateless: safe to rerun
        for i, block in enumerate(self.blocks):
            x = recompute.checkpoint_module(block, x, modulation) if checkpoint else block(x, modulation)
            if i < 2:
                x = recompute.cheap_call(_bilinear2x, x)
        return torch.sigmoid(self.to_rgb(x))
