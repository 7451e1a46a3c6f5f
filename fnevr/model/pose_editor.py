"""Lightweight pose editor (FNeVR Fig. 5): turn a head-pose change into keypoint changes.

The paper edits a face's pose by moving its keypoints with a small MLP; the published code has no
such module, so this is our design. Input: the pose change (yaw, pitch, roll deltas, in radians,
``[B, 3]``) and the source keypoints (values ``[B, K, 2]`` and Jacobians ``[B, K, 2, 2]``).
Output: keypoints with ``value + Δvalue`` and ``(I + ΔJ) @ jacobian``. The last layer starts at
zero, so an untrained editor leaves the keypoints unchanged, and a zero pose change is mapped to
(almost) no change as training with the pose-edit loss proceeds.
"""

import torch
from torch import Tensor, nn


class PoseEditor(nn.Module):
    """MLP ``[angles (3) | values (2K) | Jacobians (4K)] -> hidden -> hidden -> [Δvalues (2K) | ΔJ (4K)]``
    with ReLU between layers."""

    def __init__(self, num_kp: int = 10, hidden: int = 256):
        super().__init__()
        self.num_kp = num_kp
        width = 3 + 6 * num_kp
        first, second, out = nn.Linear(width, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 6 * num_kp)
        self.mlp = nn.Sequential(first, nn.ReLU(), second, nn.ReLU(), out)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)

    def forward(self, kp: dict, angles: Tensor) -> dict[str, Tensor]:
        B, K = kp["value"].shape[:2]
        if angles.shape != (B, 3):
            raise ValueError(f"angles must be [B, 3] (yaw, pitch, roll deltas) with B={B}, got {tuple(angles.shape)}")
        jac = kp.get("jacobian", torch.eye(2, dtype=kp["value"].dtype, device=kp["value"].device).expand(B, K, 2, 2))
        delta = self.mlp(torch.cat([angles, kp["value"].flatten(1), jac.flatten(1)], dim=1))
        d_value, d_jac = delta[:, : 2 * K].view(B, K, 2), delta[:, 2 * K :].view(B, K, 2, 2)
        out = {"value": kp["value"] + d_value}
        if "jacobian" in kp:
            out["jacobian"] = (torch.eye(2, dtype=jac.dtype, device=jac.device) + d_jac) @ jac
        return out
