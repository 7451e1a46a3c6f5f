"""Dense motion: from source and driving keypoints to a dense backward warp and an occlusion map."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .blocks import AntiAliasDownsample, Hourglass, coordinate_grid, gaussian_heatmaps


class DenseMotion(nn.Module):
    """FOMM's dense motion network, on the source downsampled by ``scale_factor`` (h, w).

    Builds K+1 candidate motions — the identity (background) and, per keypoint k, the local affine
    map ``z -> kp_s[k] + J_s[k] J_d[k]^-1 (z - kp_d[k])`` — warps the source with each
    (``fnevr.ops.grid_sample``, ``[B*(K+1), C, h, w]``), and feeds the warped sources and the
    heatmap differences to an hourglass that predicts a softmax mask over the K+1 motions.

    Returns ``deformation`` ``[B, h, w, 2]`` (for each driving pixel, where to sample the source,
    in grid_sample's [-1, 1] coordinates), ``mask`` ``[B, K+1, h, w]``, ``sparse_deformed``
    ``[B, K+1, C, h, w]`` and, with ``estimate_occlusion_map``, ``occlusion_map`` ``[B, 1, h, w]``.
    """

    def __init__(
        self,
        num_kp: int = 10,
        num_channels: int = 3,
        block_expansion: int = 64,
        max_features: int = 1024,
        num_blocks: int = 5,
        scale_factor: float = 0.25,
        kp_variance: float = 0.01,
        estimate_occlusion_map: bool = True,
    ):
        super().__init__()
        self.num_kp, self.kp_variance = num_kp, kp_variance
        self.ops_backend = "auto"
        self.downsample = AntiAliasDownsample(num_channels, scale_factor)
        self.hourglass = Hourglass((num_kp + 1) * (num_channels + 1), block_expansion, num_blocks, max_features)
        self.mask_head = nn.Conv2d(self.hourglass.out_channels, num_kp + 1, 7, padding=3)
        self.occlusion_head = (
            nn.Conv2d(self.hourglass.out_channels, 1, 7, padding=3) if estimate_occlusion_map else None
        )

    def sparse_motions(self, source: Tensor, kp_driving: dict, kp_source: dict) -> Tensor:
        """``[B, K+1, h, w, 2]``: the identity, then one local affine motion per keypoint."""
        B, _, h, w = source.shape
        identity = coordinate_grid(h, w, kp_source["value"]).view(1, 1, h, w, 2)
        rel = identity - kp_driving["value"].view(B, self.num_kp, 1, 1, 2)
        if "jacobian" in kp_driving:
            jac = kp_source["jacobian"] @ torch.inverse(kp_driving["jacobian"])  # [B, K, 2, 2]
            rel = (jac.view(B, self.num_kp, 1, 1, 2, 2) @ rel.unsqueeze(-1)).squeeze(-1)
        to_source = rel + kp_source["value"].view(B, self.num_kp, 1, 1, 2)
        return torch.cat([identity.expand(B, 1, h, w, 2), to_source], dim=1)

    def forward(self, source: Tensor, kp_driving: dict, kp_source: dict) -> dict[str, Tensor]:
        source = self.downsample(source)
        B, C, h, w = source.shape
        K1 = self.num_kp + 1
        heat = gaussian_heatmaps(kp_driving["value"], h, w, self.kp_variance) - gaussian_heatmaps(
            kp_source["value"], h, w, self.kp_variance
        )
        heat = torch.cat([heat.new_zeros(B, 1, h, w), heat], dim=1).unsqueeze(2)  # [B, K+1, 1, h, w]
        motions = self.sparse_motions(source, kp_driving, kp_source)
        repeated = source.unsqueeze(1).expand(B, K1, C, h, w).reshape(B * K1, C, h, w)
        deformed = ops.grid_sample(repeated, motions.reshape(B * K1, h, w, 2), backend=self.ops_backend)
        deformed = deformed.view(B, K1, C, h, w)
        features = self.hourglass(torch.cat([heat, deformed], dim=2).view(B, -1, h, w))
        mask = F.softmax(self.mask_head(features), dim=1)
        deformation = (motions * mask.unsqueeze(-1)).sum(dim=1)  # [B, h, w, 2]
        out = {"deformation": deformation, "mask": mask, "sparse_deformed": deformed}
        if self.occlusion_head is not None:
            out["occlusion_map"] = torch.sigmoid(self.occlusion_head(features))
        return out
