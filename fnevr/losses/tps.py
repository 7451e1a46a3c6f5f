r"""Random thin-plate-spline (TPS) transforms for FOMM's equivariance constraints.

A transform maps points :math:`p \in [-1, 1]^2` (x right, y down; ``-1``/``1`` are the centres of the
border pixels) of the transformed image to points of the original image:

.. math::

    T(p) = A p + b + \sum_{j=1}^{P^2} c_j \, r_j^2 \log(r_j + 10^{-6}),
    \qquad r_j = \lVert p - q_j \rVert_1

with :math:`[A\,|\,b] = [I\,|\,0] + \mathcal N(0, \sigma_{affine}^2)` per sample, control points
:math:`q_j` on a ``points_tps x points_tps`` grid over :math:`[-1, 1]^2` and weights
:math:`c_j \sim \mathcal N(0, \sigma_{tps}^2)` per sample (shared by x and y), as in FOMM (which uses
the L1 distance). ``transform_frame(frame)[p] = frame[T(p)]``, sampled bilinearly with reflection
padding and ``align_corners=True`` (FOMM's grid puts -1/1 on the border pixel centres, and it was
written for torch 1.0, whose grid_sample behaved as ``align_corners=True``). So a keypoint detector
``kp`` is equivariant when ``T(kp(transform_frame(x))) = kp(x)``. Example::

    >>> import torch
    >>> from fnevr.losses import RandomTPS
    >>> tps = RandomTPS(4, sigma_affine=0.05, sigma_tps=0.005, points_tps=5)
    >>> tps.transform_frame(torch.rand(4, 3, 64, 64)).shape
    torch.Size([4, 3, 64, 64])
    >>> tps.jacobian(torch.rand(4, 10, 2) * 2 - 1).shape
    torch.Size([4, 10, 2, 2])
"""

import torch
from torch import Tensor

from .. import ops


def coordinate_grid(height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """``[height, width, 2]`` of (x, y) in ``[-1, 1]``, the border pixel centres at -1 and 1."""
    y = torch.linspace(-1, 1, height, device=device, dtype=dtype)
    x = torch.linspace(-1, 1, width, device=device, dtype=dtype)
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    return torch.stack([xx, yy], dim=-1)


class RandomTPS:
    """A batch of ``batch`` random transforms (module doc).

    Args:
        batch: number of transforms (one per sample).
        sigma_affine: std of the affine perturbation (FOMM vox: 0.05).
        sigma_tps: std of the TPS weights (FOMM vox: 0.005); 0 or ``points_tps=0`` disables TPS.
        points_tps: control points per side (FOMM vox: 5).
        generator: optional ``torch.Generator`` for the draws (CPU); device/dtype of the parameters.
    """

    def __init__(
        self,
        batch: int,
        sigma_affine: float = 0.05,
        sigma_tps: float = 0.005,
        points_tps: int = 5,
        generator: torch.Generator = None,
        device=None,
        dtype=torch.float32,
    ):
        if batch < 1 or sigma_affine < 0 or sigma_tps < 0 or points_tps < 0:
            raise ValueError(
                f"RandomTPS: need batch >= 1 and non-negative sigmas/points; got batch={batch}, "
                f"sigma_affine={sigma_affine}, sigma_tps={sigma_tps}, points_tps={points_tps}"
            )
        self.batch = int(batch)
        noise = torch.randn(batch, 2, 3, generator=generator, dtype=torch.float64) * sigma_affine
        self.theta = (torch.eye(2, 3, dtype=torch.float64) + noise).to(device=device, dtype=dtype)
        self.tps = sigma_tps > 0 and points_tps > 0
        if self.tps:
            self.control_points = coordinate_grid(points_tps, points_tps, device, dtype).view(-1, 2)
            params = torch.randn(batch, points_tps**2, generator=generator, dtype=torch.float64) * sigma_tps
            self.control_params = params.to(device=device, dtype=dtype)

    def warp_coordinates(self, coords: Tensor) -> Tensor:
        """``T(coords)``: ``[batch, K, 2]`` -> ``[batch, K, 2]`` (differentiable)."""
        if coords.dim() != 3 or coords.shape[-1] != 2 or coords.shape[0] != self.batch:
            raise ValueError(f"RandomTPS.warp_coordinates: expected [{self.batch}, K, 2]; got {tuple(coords.shape)}")
        theta = self.theta.to(coords.dtype)
        out = coords @ theta[:, :, :2].transpose(1, 2) + theta[:, None, :, 2]
        if self.tps:
            r = (coords[:, :, None, :] - self.control_points.to(coords.dtype)).abs().sum(-1)  # [B, K, P]
            bend = (r**2 * torch.log(r + 1e-6) * self.control_params.to(coords.dtype)[:, None, :]).sum(-1)
            out = out + bend[..., None]
        return out

    def jacobian(self, coords: Tensor) -> Tensor:
        """``dT/dp`` at ``coords`` ``[batch, K, 2]`` -> ``[batch, K, 2, 2]`` (row = output x/y), by
        autograd; when ``coords`` requires grad the result stays differentiable in it
        (``create_graph``), as the Jacobian equivariance loss needs."""
        differentiable = coords.requires_grad
        with torch.enable_grad():
            if not differentiable:
                coords = coords.detach().requires_grad_(True)
            warped = self.warp_coordinates(coords)
            rows = [
                torch.autograd.grad(warped[..., i].sum(), coords, retain_graph=True, create_graph=differentiable)[0]
                for i in range(2)
            ]
        return torch.stack(rows, dim=-2)

    def transform_frame(self, frame: Tensor, backend: str = "auto") -> Tensor:
        """``frame`` ``[batch, C, H, W]`` resampled at ``T(grid)``: same shape. Bilinear, reflection
        padding, ``align_corners=True``, through ``fnevr.ops.grid_sample`` on ``backend``."""
        if frame.dim() != 4 or frame.shape[0] != self.batch:
            raise ValueError(f"RandomTPS.transform_frame: expected [{self.batch}, C, H, W]; got {tuple(frame.shape)}")
        height, width = frame.shape[2:]
        dtype = frame.dtype if frame.dtype in (torch.float32, torch.float64) else torch.float32
        grid = coordinate_grid(height, width, frame.device, dtype).view(1, -1, 2).expand(self.batch, -1, -1)
        grid = self.warp_coordinates(grid).view(self.batch, height, width, 2)
        return ops.grid_sample(
            frame, grid.to(frame.dtype), "bilinear", "reflection", align_corners=True, backend=backend
        )
