"""Animation with a trained FNeVR: drive a source image with a video's keypoints.

``relative`` motion (FOMM): the source keypoints move as the driving keypoints move away from
their position in the driving frame that best matches the source (the first frame by default),
scaled by ``sqrt(hull area(source kp) / hull area(initial driving kp))`` with
``adapt_movement_scale``; Jacobians follow ``J_d J_d0^-1 J_s``. Without ``relative``, the driving
keypoints are used as they are (``reconstruct`` does this: the video drives its own first frame).
"""

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

from .model import FNeVR


def hull_area(points: Tensor) -> float:
    """Area of the convex hull of 2-D ``points`` ``[K, 2]`` (monotone chain + shoelace)."""
    pts = sorted(map(tuple, points.detach().double().cpu().tolist()))
    if len(pts) < 3:
        return 0.0

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    def half(seq):
        chain = []
        for p in seq:
            while len(chain) >= 2 and cross(chain[-2], chain[-1], p) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    hull = half(pts) + half(reversed(pts))
    return abs(sum(a[0] * b[1] - b[0] * a[1] for a, b in zip(hull, hull[1:] + hull[:1]))) / 2


def movement_scale(kp_source: dict, kp_initial: dict) -> float:
    """``sqrt(hull area(source kp) / hull area(initial driving kp))`` (1 for a degenerate hull)."""
    initial = hull_area(kp_initial["value"][0])
    return (hull_area(kp_source["value"][0]) / initial) ** 0.5 if initial > 0 else 1.0


def relative_keypoints(
    kp_source: dict,
    kp_driving: dict,
    kp_initial: dict,
    adapt_movement_scale: bool = True,
    relative_jacobian: bool = True,
    scale: float | None = None,
) -> dict:
    """Source keypoints moved by the driving keypoints' motion since ``kp_initial`` (batch of
    driving frames ``[T, K, ...]``; source and initial have batch 1). ``scale``: the movement
    scale, when already known (else computed from the hulls, or 1 without adapting)."""
    if scale is None:
        scale = movement_scale(kp_source, kp_initial) if adapt_movement_scale else 1.0
    out = {"value": (kp_driving["value"] - kp_initial["value"]) * scale + kp_source["value"]}
    if "jacobian" in kp_driving:
        out["jacobian"] = kp_driving["jacobian"]
        if relative_jacobian:
            out["jacobian"] = kp_driving["jacobian"] @ torch.inverse(kp_initial["jacobian"]) @ kp_source["jacobian"]
    return out


@torch.no_grad()
def animate(
    model: FNeVR,
    source: Tensor,
    driving: Tensor,
    *,
    relative: bool = True,
    adapt_movement_scale: bool = True,
    initial_frame: int = 0,
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
    progress: Callable | None = None,
) -> Tensor:
    """Animate ``source`` ``[3, H, W]`` with ``driving`` ``[T, 3, H, W]`` (both in [0, 1], on the
    model's device) -> ``[T, 3, H, W]`` predictions.

    ``initial_frame``: the driving frame whose pose matches the source's (the first, or the one a
    best-frame search found); with relative motion, every frame moves relative to it.
    ``autocast_dtype`` (e.g. ``torch.bfloat16`` on a GPU) runs the model under autocast.
    ``progress(n)`` is called after each batch with the frames done.
    """
    device = source.device
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    with amp:
        kp_source = model.kp_detector(source[None])
        features = model.generator.encode(source[None])  # the source's, once for every frame
        kp_initial = model.kp_detector(driving[initial_frame][None])
        frames = []
        for start in range(0, driving.shape[0], batch_size):
            batch = driving[start : start + batch_size]
            kp_driving = model.kp_detector(batch)
            if relative:
                kp_driving = relative_keypoints(kp_source, kp_driving, kp_initial, adapt_movement_scale)
            n = batch.shape[0]
            kp_src = {k: v.expand(n, *v.shape[1:]) for k, v in kp_source.items()}
            batch = lambda x: x.expand(n, *x.shape[1:])
            out = model.animate(batch(source[None]), kp_src, kp_driving, source_features=batch(features))
            frames.append(out["prediction"].float())
            if progress is not None:
                progress(n)
    return torch.cat(frames)


def find_best_frame(source: Tensor, driving: Tensor, device: str = "cpu") -> int:
    """Index of the driving frame whose face landmarks best match the source's, after removing
    translation and scale. Needs the optional ``face-alignment`` package (and its weights)."""
    try:
        import face_alignment
    except ImportError as e:
        raise RuntimeError(
            "best-frame search needs the optional face-alignment package "
            "(pip install face-alignment); run without --find-best-frame to use the first frame"
        ) from e
    kind = getattr(face_alignment.LandmarksType, "TWO_D", None) or face_alignment.LandmarksType._2D
    detector = face_alignment.FaceAlignment(kind, flip_input=True, device=device)

    def landmarks(image):
        found = detector.get_landmarks((image.permute(1, 2, 0) * 255).cpu().numpy())
        if not found:
            return None
        lm = torch.as_tensor(found[0][:, :2], dtype=torch.float64)
        lm = lm - lm.mean(0)
        return lm / max(hull_area(lm), 1e-12) ** 0.5

    target = landmarks(source)
    if target is None:
        raise RuntimeError("best-frame search found no face in the source image")
    best, best_frame = float("inf"), 0
    for i, frame in enumerate(driving):
        lm = landmarks(frame)
        if lm is not None and (d := (lm - target).pow(2).sum().item()) < best:
            best, best_frame = d, i
    return best_frame
