"""``fnevr evaluate``: reconstruction metrics of a checkpoint on a dataset's test split.

Each test video is re-created from its first frame with its own (absolute) keypoints, as FOMM's
reconstruction benchmark does, and L1, PSNR, SSIM and (with backbone weights) LPIPS are averaged
over all frames of all videos.

With a landmark model, AKD (average keypoint distance, in pixels of the frame) and with an identity
model AED (average embedding distance) follow FOMM's published protocol: its reconstruction script
saves each video as an 8-bit png, its pose-evaluation scripts run the models on those frames and on
the real ones, and average per frame over the frames where both have a face. Here the frames are
rounded to 8 bits as the png holds them (``save_png`` also writes those pngs, one strip per video as
FOMM does, for its own scripts), and AKD counts only frames with a face in both.
"""

import warnings
from pathlib import Path

import torch

from ..animate import animate
from ..checkpoint import load_checkpoint
from ..data.dataset import FramesDataset
from ..data.video import VideoReadError
from ..metrics import (
    embedding_distance,
    evaluate_pairs,
    keypoint_distance,
    load_identity,
    load_landmarks,
    load_lpips,
    quantize,
)


def evaluate(
    checkpoint,
    data,
    config=None,
    *,
    device="cpu",
    batch_size: int = 16,
    max_videos: int | None = None,
    lpips_weights=None,
    backend: str | None = None,
    landmark_model=None,
    identity_weights=None,
    save_png=None,
    progress=None,
) -> dict:
    """Returns ``{"videos": n, "skipped": n, "frames": n, "l1", "psnr", "ssim"[, "lpips"]}`` (means
    over the frames of the videos read). A video that cannot be read is skipped with a
    ``RuntimeWarning`` naming it, and counted in ``skipped``, not in ``videos``; ``max_videos``
    counts the videos evaluated. ``landmark_model``/``identity_weights``: paths for
    :func:`~fnevr.metrics.load_landmarks`/:func:`~fnevr.metrics.load_identity` (``akd`` and
    ``akd_frames``, ``aed`` appear when a model is found). ``save_png``: a folder for the
    reconstructions as png strips."""
    model, _ = load_checkpoint(checkpoint, config, training_modules=False)
    if backend:
        model.set_backend(backend)
    model.to(device).eval()
    d = model.config["dataset_params"]
    ds = FramesDataset(data, frame_shape=d["frame_shape"], is_train=False)
    lpips = load_lpips(lpips_weights)
    landmarks = load_landmarks(landmark_model, device)
    identity = load_identity(identity_weights, device)
    wanted = len(ds) if max_videos is None else min(max_videos, len(ds))
    sums, frames, videos, skipped = {}, 0, 0, []
    akd = [0.0, 0]  # sum of per-frame distances, frames with a face in both
    for i in range(len(ds)):
        if videos == wanted:
            break
        try:
            video = ds[i]["video"].permute(1, 0, 2, 3).to(device)  # [T, 3, H, W]
        except VideoReadError as e:
            warnings.warn(f"skipped: {e}", RuntimeWarning, stacklevel=2)
            skipped.append(e.path)
            continue
        pred = animate(model, video[0], video, relative=False, batch_size=batch_size)
        metrics = evaluate_pairs(pred, video.float(), lpips=lpips)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v * video.shape[0]
        png, real = quantize(pred), quantize(video.float())
        if landmarks is not None:
            total, found = keypoint_distance(landmarks(png), landmarks(real))
            akd[0], akd[1] = akd[0] + total, akd[1] + found
        if identity is not None:
            sums["aed"] = sums.get("aed", 0.0) + embedding_distance(identity(png), identity(real))
        if save_png is not None:
            _save_strip(Path(save_png) / f"{Path(ds[i]['name']).stem}.png", png)
        frames += video.shape[0]
        videos += 1
        if progress is not None:
            progress(1)
    if frames == 0:
        raise ValueError(
            f"no readable test video to evaluate in {ds.root}"
            + (f" ({len(skipped)} could not be read)" if skipped else "")
        )
    result = {"videos": videos, "skipped": len(skipped), "frames": frames, **{k: v / frames for k, v in sums.items()}}
    if landmarks is not None:
        result["akd"] = akd[0] / akd[1] if akd[1] else float("nan")
        result["akd_frames"] = akd[1]
    return result


def _save_strip(path: Path, frames) -> None:
    """``[T, 3, H, W]`` in [0, 1] as one png, the frames side by side (FOMM's reconstruction output)."""
    import imageio.v3 as iio

    from .._files import atomic_path

    strip = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(2, 0, 3, 1).flatten(1, 2).cpu().numpy()
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, strip)
