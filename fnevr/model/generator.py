"""The FNeVR generator: encoder, dense motion, feature warp, volume renderer and SPADE decoder."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..nn import recompute
from .blocks import ConvBlock, cat_channels
from .decoder import SPADEDecoder
from .dense_motion import DenseMotion
from .render import VolumeRenderer


class Generator(nn.Module):
    """Source image ``[B, 3, H, W]`` + source and driving keypoints -> the animated frame.

    1. Encoder: 7x7 conv block, then ``num_down_blocks`` down blocks -> features
       ``[B, C, H/4, W/4]`` (vox-256: ``[B, 256, 64, 64]``).
    2. :class:`DenseMotion` gives a backward warp and an occlusion map; the features are warped
       (``fnevr.ops.grid_sample``) and multiplied by the occlusion map.
    3. :class:`VolumeRenderer` renders the warped features (``render``, and the 3-channel
       ``mini_render``).
    4. :class:`SPADEDecoder` turns concat(warped, render) into ``prediction`` ``[B, 3, H, W]``.

    The output dict also has ``deformation`` ``[B, h, w, 2]``, ``mask``, ``sparse_deformed``,
    ``occlusion_map`` and ``deformed`` (the source warped at full size, for visualisation).
    """

    def __init__(
        self,
        num_kp: int = 10,
        num_channels: int = 3,
        block_expansion: int = 64,
        max_features: int = 512,
        num_down_blocks: int = 2,
        estimate_occlusion_map: bool = True,
        dense_motion: dict | None = None,
        render: dict | None = None,
        modulation_channels: int = 128,
    ):
        super().__init__()
        self.ops_backend = "auto"
        self.dense_motion = DenseMotion(
            num_kp=num_kp,
            num_channels=num_channels,
            estimate_occlusion_map=estimate_occlusion_map,
            **(dense_motion or {}),
        )
        widths = [min(max_features, block_expansion * 2**i) for i in range(num_down_blocks + 1)]
        self.stem = ConvBlock(num_channels, block_expansion, kernel_size=7)
        self.down = nn.ModuleList(ConvBlock(widths[i], widths[i + 1], "down") for i in range(num_down_blocks))
        self.renderer = VolumeRenderer(in_channels=widths[-1], **(render or {}))
        self.decoder = SPADEDecoder(2 * widths[-1], modulation_channels)

    def encode(self, image: Tensor) -> Tensor:
        x = self.stem(image)
        for block in self.down:
            x = block(x)
        return x

    def warp(self, x: Tensor, deformation: Tensor) -> Tensor:
        """Sample ``x`` ``[B, C, H, W]`` at ``deformation`` ``[B, h, w, 2]``, resized (bilinearly)
        to H x W first if needed."""
        if deformation.shape[1:3] != x.shape[2:]:
            deformation = F.interpolate(
                deformation.permute(0, 3, 1, 2), size=x.shape[2:], mode="bilinear", align_corners=False
            ).permute(0, 2, 3, 1)
        return ops.grid_sample(x, deformation, backend=self.ops_backend)

    def forward(
        self, source: Tensor, kp_driving: dict, kp_source: dict, source_features: Tensor | None = None
    ) -> dict[str, Tensor]:
        """``source_features``: :meth:`encode`'s output for ``source``, when already known (a source
        animated frame after frame needs it once)."""
        features = self.encode(source) if source_features is None else source_features
        motion = self.dense_motion(source, kp_driving=kp_driving, kp_source=kp_source)
        out = dict(motion)
        features = self.warp(features, motion["deformation"])
        if "occlusion_map" in motion:
            occlusion = motion["occlusion_map"]
            if occlusion.shape[2:] != features.shape[2:]:
                occlusion = F.interpolate(occlusion, size=features.shape[2:], mode="bilinear", align_corners=False)
            features = recompute.cheap_call(torch.mul, features, occlusion)
        out["deformed"] = self.warp(source, motion["deformation"])
        rendered = self.renderer(features)
        out.update(rendered)
        out["prediction"] = self.decoder(recompute.cheap_call(cat_channels, features, rendered["render"]))
        return out
