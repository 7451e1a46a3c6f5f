"""``fnevr evaluate``: reconstruction metrics of a checkpoint on a dataset's test split.

Each test video is re-created from its first frame with its own (absolute) keypoints, as FOMM's
reconstruction benchmark does, and L1, PSNR, SSIM and (with backbone weights) LPIPS are averaged
over all frames of all videos.
"""

import warnings

from ..animate import animate
from ..checkpoint import load_checkpoint
from ..data.dataset import FramesDataset
from ..data.video import VideoReadError
from ..metrics import evaluate_pairs, load_lpips


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
    progress=None,
) -> dict:
    """Returns ``{"videos": n, "skipped": n, "frames": n, "l1", "psnr", "ssim"[, "lpips"]}`` (means
    over the frames of the videos read). A video that cannot be read is skipped with a
    ``RuntimeWarning`` naming it, and counted in ``skipped``, not in ``videos``; ``max_videos``
    counts the videos evaluated."""
    model, _ = load_checkpoint(checkpoint, config, training_modules=False)
    if backend:
        model.set_backend(backend)
    model.to(device).eval()
    d = model.config["dataset_params"]
    ds = FramesDataset(data, frame_shape=d["frame_shape"], is_train=False)
    lpips = load_lpips(lpips_weights)
    wanted = len(ds) if max_videos is None else min(max_videos, len(ds))
    sums, frames, videos, skipped = {}, 0, 0, []
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
        frames += video.shape[0]
        videos += 1
        if progress is not None:
            progress(1)
    if frames == 0:
        raise ValueError(
            f"no readable test video to evaluate in {ds.root}"
            + (f" ({len(skipped)} could not be read)" if skipped else "")
        )
    return {"videos": videos, "skipped": len(skipped), "frames": frames, **{k: v / frames for k, v in sums.items()}}
