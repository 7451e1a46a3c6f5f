"""Unsupervised keypoint detector with local affine Jacobians (FOMM's, used unchanged by FNeVR)."""

import torch
from torch import Tensor, nn

from .blocks import AntiAliasDownsample, Hourglass, coordinate_grid


class KeypointDetector(nn.Module):
    """Image ``[B, C, H, W]`` in [0, 1] -> ``{"value": [B, K, 2], "jacobian": [B, K, 2, 2]}``.

    An hourglass on the image downsampled by ``scale_factor`` predicts one heatmap per keypoint
    (7x7 conv, no padding); a softmax at ``temperature`` turns it into a distribution whose mean
    over the [-1, 1] coordinate grid is the keypoint (x, y). With ``estimate_jacobian``, a second
    7x7 head predicts four maps per keypoint, averaged under the same distribution into a 2x2
    Jacobian (initialised to the identity).
    """

    def __init__(
        self,
        num_kp: int = 10,
        num_channels: int = 3,
        block_expansion: int = 32,
        max_features: int = 1024,
        num_blocks: int = 5,
        temperature: float = 0.1,
        scale_factor: float = 0.25,
        estimate_jacobian: bool = True,
    ):
        super().__init__()
        self.num_kp, self.temperature = num_kp, temperature
        self.downsample = AntiAliasDownsample(num_channels, scale_factor)
        self.hourglass = Hourglass(num_channels, block_expansion, num_blocks, max_features)
        self.heatmap_head = nn.Conv2d(self.hourglass.out_channels, num_kp, 7)
        self.jacobian_head = None
        if estimate_jacobian:
            self.jacobian_head = nn.Conv2d(self.hourglass.out_channels, 4 * num_kp, 7)
            nn.init.zeros_(self.jacobian_head.weight)
            assert self.jacobian_head.bias is not None
            with torch.no_grad():
                self.jacobian_head.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 1.0]).repeat(num_kp))

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        features = self.hourglass(self.downsample(image))
        logits = self.heatmap_head(features)
        B, K, h, w = logits.shape
        heatmap = torch.softmax(logits.view(B, K, -1) / self.temperature, dim=2).view(B, K, h, w)
        grid = coordinate_grid(h, w, heatmap)
        out = {"value": (heatmap.unsqueeze(-1) * grid).sum(dim=(2, 3))}
        if self.jacobian_head is not None:
            maps = self.jacobian_head(features).view(B, K, 4, h, w)
            out["jacobian"] = (heatmap.unsqueeze(2) * maps).sum(dim=(3, 4)).view(B, K, 2, 2)
        return out
