"""PNG sample grids: source | driving (with its keypoints) | prediction | mini render | deformed source."""

from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import draw_keypoints, make_grid, save_image

from .._files import atomic_path


def _with_keypoints(images: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
    """Draw keypoints ``[B, K, 2]`` (in [-1, 1]) on images ``[B, 3, H, W]`` in [0, 1]."""
    H, W = images.shape[2:]
    pixels = (kp.float().cpu() + 1) / 2 * torch.tensor([W - 1, H - 1])
    radius = max(1, H // 64)
    drawn = [
        draw_keypoints((img.cpu().clamp(0, 1) * 255).to(torch.uint8), pts[None], colors="red", radius=radius)
        for img, pts in zip(images, pixels)
    ]
    return torch.stack(drawn).float() / 255


def save_sample_grid(path: Path, batch: dict, out: dict, rows: int = 4) -> Path:
    """One row per sample (at most ``rows``); columns as in the module doc, resized to the frame size."""
    n = min(rows, batch["source"].shape[0])
    size = batch["source"].shape[2:]

    def col(x):
        x = x[:n].detach().float().cpu()
        return F.interpolate(x, size=size, mode="nearest") if x.shape[2:] != size else x

    columns = [
        col(batch["source"]),
        _with_keypoints(col(batch["driving"]), out["kp_driving"]["value"][:n]),
        col(out["prediction"]),
        col(out["mini_render"]),
        col(out["deformed"]),
    ]
    grid = make_grid(torch.stack(columns, 1).flatten(0, 1), nrow=len(columns), padding=2, pad_value=1.0)
    path = Path(path)
    with atomic_path(path) as tmp:
        save_image(grid, tmp)
    return path
