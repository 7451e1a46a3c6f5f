"""The embedded default dataset: procedurally drawn talking heads, no download.

Every identity has its own head shape, skin, hair (colour, volume, fringe), eyes (spacing, size,
iris colour), brows, nose, mouth, clothes and background; every clip of it moves over time: head
yaw/pitch/roll (drawn as a 2-D roll rotation, a shift, a horizontal squeeze by cos(yaw) and a larger
shift of the facial features than of the outline, a cheap parallax), blinks and mouth opening.
Shapes are ellipses rendered anti-aliased from signed distances (coverage
``clamp(0.5 - d / pixel, 0, 1)``) with plain torch ops, composited back to front.

The dataset is written in FOMM's layout with png strips (``train/id007#clip01.png``: ``T`` frames of
``S x S`` side by side) and per-frame poses (``train/id007#clip01.pose.csv``, degrees, see
:mod:`fnevr.data.dataset`). Test identities differ from the training ones. It is a pure function of
its parameters (same seed, same bytes), so it is built once per parameter set into a cache folder,
atomically: into a temporary sibling that is renamed into place when complete. Example::

    >>> from fnevr.data import FramesDataset, ensure_synthetic_dataset
    >>> root = ensure_synthetic_dataset(size=64, num_frames=32)   # ~/.cache/fnevr/... on first use
    >>> sorted(p.name for p in root.iterdir())
    ['meta.json', 'test', 'train']
    >>> len(FramesDataset(root, frame_shape=(64, 64), id_sampling=True))   # 40 clips of 20 identities
    20

:func:`save_preview` writes a preview png, three identities of eight frames (``docs/synthetic_example.png``:
``python -c "from fnevr.data.synthetic import save_preview; save_preview('docs/synthetic_example.png')"``).
"""

import json
import math
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .dataset import write_pose_csv

FORMAT_VERSION = 1  # bump when the drawing changes, so caches of the old drawing are not reused


def default_cache_dir() -> Path:
    """``$FNEVR_CACHE`` or ``~/.cache/fnevr``."""
    return Path(os.environ.get("FNEVR_CACHE", Path.home() / ".cache" / "fnevr"))


def ensure_synthetic_dataset(
    root=None,
    *,
    size: int = 64,
    num_frames: int = 32,
    num_train: int = 40,
    num_test: int = 8,
    clips_per_id: int = 2,
    seed: int = 0,
) -> Path:
    """Build the synthetic dataset unless already built, and return its folder.

    Args:
        root: where it goes; default ``default_cache_dir()/synthetic-<parameters>``.
        size: frame height and width in pixels (>= 16).
        num_frames: frames per video (>= 2).
        num_train, num_test: number of training / test videos (>= 1 each).
        clips_per_id: videos per identity (names ``id<k>#clip<c>``).
        seed: the dataset is a deterministic function of all these parameters.

    Returns:
        ``root``, holding ``train/``, ``test/`` and ``meta.json`` (the parameters).
    """
    params = {
        "format": FORMAT_VERSION,
        "size": int(size),
        "num_frames": int(num_frames),
        "num_train": int(num_train),
        "num_test": int(num_test),
        "clips_per_id": int(clips_per_id),
        "seed": int(seed),
    }
    for key, low in (("size", 16), ("num_frames", 2), ("num_train", 1), ("num_test", 1), ("clips_per_id", 1)):
        if params[key] < low:
            raise ValueError(f"ensure_synthetic_dataset: {key} must be >= {low}; got {params[key]}")
    if root is None:
        name = "synthetic-v{format}-s{size}-f{num_frames}-tr{num_train}-te{num_test}-c{clips_per_id}-seed{seed}"
        root = default_cache_dir() / name.format(**params)
    root = Path(root)
    if _complete(root, params):
        return root
    if root.exists():
        raise FileExistsError(
            f"ensure_synthetic_dataset: {root} exists but is not a synthetic dataset with "
            f"parameters {params}; remove it or choose another root"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _build(tmp, params)
        try:
            os.rename(tmp, root)  # atomic; fails if another process finished first
        except OSError:
            if not _complete(root, params):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def render_video(identity: dict, motion: dict, size: int) -> Tensor:
    """Draw one clip: ``uint8`` ``[T, size, size, 3]`` from :func:`random_identity` and
    :func:`random_motion` parameters."""
    f32 = dict(dtype=torch.float32)
    T = len(motion["yaw"])
    px = 2.0 / size  # pixel size in the [-1, 1] image frame
    axis = (torch.arange(size, **f32) + 0.5) * px - 1
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    x, y = x.expand(T, size, size), y.expand(T, size, size)

    def per_frame(name):
        return torch.tensor(np.asarray(motion[name]), **f32).view(T, 1, 1)

    yaw, pitch, roll = (per_frame(k).mul(math.pi / 180) for k in ("yaw", "pitch", "roll"))
    blink, mouth = per_frame("eyes_open"), per_frame("mouth_open")
    sx, sy = per_frame("shift_x"), per_frame("shift_y")
    c = {k: torch.tensor(v, **f32).view(3, 1, 1, 1) for k, v in identity.items() if k.endswith("colour")}
    g = identity

    # Background: a linear gradient in a random direction.
    t = (0.5 + 0.5 * (x * math.cos(g["bg_angle"]) + y * math.sin(g["bg_angle"]))).clamp(0, 1)
    image = c["bg_colour"] * (1 - t) + c["bg2_colour"] * t

    def paint(colour, alpha):
        nonlocal image
        image = image * (1 - alpha) + colour * alpha

    # Head frame: shift, then rotate by roll about the head centre; u right, v down.
    hx, hy = x - sx - 0.35 * torch.sin(yaw), y - g["head_y"] - sy - 0.3 * torch.sin(pitch)
    cr, sr = torch.cos(roll), torch.sin(roll)
    u, v = cr * hx + sr * hy, -sr * hx + cr * hy
    squeeze = 0.8 + 0.2 * torch.cos(yaw)  # the outline narrows as the head turns
    rx, ry = g["head_rx"] * squeeze, g["head_ry"]

    def feature(fu, fv):
        """Face-surface point (fu, fv) -> head frame: features move more than the outline."""
        fu = fu * torch.cos(yaw) + 0.55 * g["head_rx"] * torch.sin(yaw)
        return fu, fv * torch.cos(pitch) + 0.35 * ry * torch.sin(pitch)

    # Shoulders and neck (only shifted, not rolled), behind the head.
    paint(c["cloth_colour"], _ellipse(x - 0.6 * sx, y, 0, 1.25, 1.0, 0.5, px))
    paint(c["skin_colour"] * 0.85, _ellipse(x - 0.8 * sx, y, 0, g["head_y"] + 0.65, 0.2, 0.4, px))
    # Hair volume behind the head: a larger ellipse, its upper part only.
    hair = _ellipse(u, v, 0, -0.08, rx * g["hair_volume"], ry * g["hair_volume"], px)
    paint(c["hair_colour"], hair * _below(v, g["hair_drop"], px))
    for side in (-1, 1):  # ears
        paint(c["skin_colour"] * 0.92, _ellipse(u, v, side * rx * 0.97, 0.05, 0.09, 0.16, px))
    paint(c["skin_colour"], _ellipse(u, v, 0, 0, rx, ry, px))
    # Fringe: the top of the head above the hairline.
    paint(c["hair_colour"], _ellipse(u, v, 0, 0, rx * 1.02, ry * 1.02, px) * _below(v, g["hairline"], px))

    shade = 1 - 0.25 * yaw.abs()  # the far side of the face shows less of the eye
    for side in (-1, 1):
        ex, ey = feature(side * g["eye_dx"], g["eye_y"])
        open_ = blink.clamp(0.02, 1)
        erx, ery = g["eye_rx"] * torch.cos(yaw) * shade.clamp(min=0.6), g["eye_ry"] * open_
        visible = (blink / 0.15).clamp(0, 1)
        paint(c["white_colour"], _ellipse(u, v, ex, ey, erx, ery, px) * visible)
        iris = _ellipse(u, v, ex + 0.25 * erx * torch.sin(yaw), ey, erx * 0.5, ery * 0.9, px)
        paint(c["iris_colour"], iris * visible)
        brow_y = ey - g["eye_ry"] - 0.07 - g["brow_raise"]
        paint(c["hair_colour"] * 0.8, _ellipse(u, v, ex, brow_y, erx * 1.2, 0.025, px))
    nx, ny = feature(0.0, g["nose_y"])
    paint(c["skin_colour"] * 0.78, _ellipse(u, v, nx, ny, 0.05 * torch.cos(yaw) + 0.02, 0.035, px))
    mx, my = feature(0.0, g["mouth_y"])
    mrx = g["mouth_rx"] * torch.cos(yaw) * (1 - 0.15 * mouth)
    paint(c["lip_colour"], _ellipse(u, v, mx, my, mrx, 0.035 + 0.1 * mouth, px))
    inside = _ellipse(u, v, mx, my, mrx * 0.8, (0.085 * mouth).clamp(min=1e-3), px)
    paint(c["mouth_colour"], inside * (mouth / 0.1).clamp(0, 1))

    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 3, 0).contiguous()


def random_identity(rng: np.random.Generator) -> dict:
    """Shape and colour parameters of one synthetic person."""
    skin = np.array([0.98, 0.84, 0.72]) * (1 - rng.uniform(0, 0.6)) + rng.normal(0, 0.02, 3)
    hair_palette = np.array(
        [[0.08, 0.06, 0.05], [0.35, 0.2, 0.1], [0.85, 0.7, 0.4], [0.65, 0.25, 0.1], [0.7, 0.7, 0.7], [0.2, 0.25, 0.5]]
    )
    iris_palette = np.array([[0.25, 0.45, 0.8], [0.35, 0.2, 0.1], [0.25, 0.55, 0.3], [0.4, 0.4, 0.45]])
    head_rx = rng.uniform(0.36, 0.48)
    return {
        "bg_colour": rng.uniform(0.1, 0.9, 3),
        "bg2_colour": rng.uniform(0.1, 0.9, 3),
        "bg_angle": rng.uniform(0, 2 * math.pi),
        "skin_colour": np.clip(skin, 0, 1),
        "hair_colour": np.clip(hair_palette[rng.integers(len(hair_palette))] + rng.normal(0, 0.04, 3), 0, 1),
        "iris_colour": np.clip(iris_palette[rng.integers(len(iris_palette))] + rng.normal(0, 0.04, 3), 0, 1),
        "white_colour": np.array([0.96, 0.96, 0.94]),
        "lip_colour": np.clip(np.array([0.75, 0.35, 0.35]) * rng.uniform(0.7, 1.1) + rng.normal(0, 0.03, 3), 0, 1),
        "mouth_colour": np.array([0.25, 0.05, 0.08]),
        "cloth_colour": rng.uniform(0.05, 0.95, 3),
        "head_rx": head_rx,
        "head_ry": head_rx * rng.uniform(1.15, 1.45),
        "head_y": rng.uniform(-0.1, 0.05),
        "hair_volume": rng.uniform(1.05, 1.3),
        "hair_drop": rng.uniform(-0.1, 0.35),
        "hairline": rng.uniform(-0.45, -0.25),
        "eye_dx": head_rx * rng.uniform(0.35, 0.5),
        "eye_y": rng.uniform(-0.15, -0.05),
        "eye_rx": rng.uniform(0.07, 0.1),
        "eye_ry": rng.uniform(0.04, 0.06),
        "brow_raise": rng.uniform(0, 0.04),
        "nose_y": rng.uniform(0.07, 0.14),
        "mouth_y": rng.uniform(0.27, 0.36),
        "mouth_rx": rng.uniform(0.1, 0.17),
    }


def random_motion(rng: np.random.Generator, num_frames: int) -> dict:
    """Per-frame head pose (degrees), shift, eye openness and mouth opening of one clip."""
    t = np.arange(num_frames) / num_frames

    def wave(amplitude):
        cycles, phase = rng.uniform(0.4, 1.5), rng.uniform(0, 2 * math.pi)
        return amplitude * np.sin(2 * math.pi * cycles * t + phase)

    eyes = np.ones(num_frames)
    for centre in rng.uniform(0, num_frames, rng.integers(1, 3)):
        eyes = np.minimum(eyes, np.clip(np.abs(np.arange(num_frames) - centre) / 1.5, 0, 1))
    speech = np.clip(np.sin(2 * math.pi * rng.uniform(1, 3) * t + rng.uniform(0, 2 * math.pi)), 0, 1)
    return {
        "yaw": wave(rng.uniform(10, 30)),
        "pitch": wave(rng.uniform(5, 15)),
        "roll": wave(rng.uniform(4, 12)),
        "shift_x": wave(rng.uniform(0, 0.06)),
        "shift_y": wave(rng.uniform(0, 0.04)),
        "eyes_open": eyes,
        "mouth_open": speech * rng.uniform(0.4, 1.0),
    }


def _ellipse(x, y, cx, cy, rx, ry, px) -> Tensor:
    """Anti-aliased coverage of an ellipse: the level-set value q = |((x-cx)/rx, (y-cy)/ry)| divided
    by its gradient norm approximates the signed distance (exact on the boundary)."""
    dx, dy = (x - cx) / rx, (y - cy) / ry
    q = torch.sqrt(dx * dx + dy * dy)
    grad = torch.sqrt((dx / rx) ** 2 + (dy / ry) ** 2) / q.clamp(min=1e-6)
    rmax = torch.maximum(torch.as_tensor(rx), torch.as_tensor(ry))
    distance = (q - 1) / torch.maximum(grad, 1 / rmax)  # the gradient norm is >= 1/max(r) away from 0/0
    return (0.5 - distance / px).clamp(0, 1)


def _below(value, threshold, px) -> Tensor:
    """Anti-aliased coverage of ``value < threshold``."""
    return (0.5 - (value - threshold) / px).clamp(0, 1)


def _complete(root: Path, params: dict) -> bool:
    try:
        return json.loads((root / "meta.json").read_text()) == params
    except (OSError, ValueError):
        return False


def _build(folder: Path, params: dict):
    T, S, per_id = params["num_frames"], params["size"], params["clips_per_id"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the frames are small: intra-op threads cost more than they save
    try:
        _build_splits(folder, params, T, S, per_id)
    finally:
        torch.set_num_threads(threads)
    (folder / "meta.json").write_text(json.dumps(params))


def _build_splits(folder, params, T, S, per_id):
    import imageio.v3 as iio

    first_id = 0
    for split in ("train", "test"):
        (folder / split).mkdir(parents=True)
        count = params[f"num_{split}"]
        for n in range(count):
            person, clip = first_id + n // per_id, n % per_id
            identity = random_identity(np.random.default_rng([params["seed"], 0, person]))
            motion = random_motion(np.random.default_rng([params["seed"], 1, person, clip]), T)
            frames = render_video(identity, motion, S)
            name = f"id{person:04d}#clip{clip:02d}"
            iio.imwrite(folder / split / f"{name}.png", frames.permute(1, 0, 2, 3).reshape(S, T * S, 3).numpy())
            write_pose_csv(
                folder / split / f"{name}.pose.csv", np.stack([motion["yaw"], motion["pitch"], motion["roll"]], axis=1)
            )
        first_id += -(-count // per_id)  # test identities follow the training ones


def save_preview(path, size: int = 64, num_frames: int = 8, num_identities: int = 3, seed: int = 0):
    """A png grid: one row per identity, ``num_frames`` frames of one of its clips."""
    import imageio.v3 as iio

    rows = []
    for person in range(num_identities):
        identity = random_identity(np.random.default_rng([seed, 0, person]))
        frames = render_video(identity, random_motion(np.random.default_rng([seed, 1, person, 0]), 32), size)
        frames = frames[torch.linspace(0, 31, num_frames).round().long()]
        rows.append(frames.permute(1, 0, 2, 3).reshape(size, num_frames * size, 3))
    iio.imwrite(path, torch.cat(rows).numpy())
