"""Faces in full frames: detection, the square crop the model sees, and pasting its output back.

The model works on square frames of the config's size (256² for vox-256). A frame of another size
reaches it one of two ways, each a :class:`Placement` that maps the frame to the model's square and
the model's output back:

* :class:`Letterbox` (no face crop): the whole frame, resized to fit the square with its aspect
  kept, the rest filled by repeating the edge pixels. Undoing it cuts the padding off again, so a
  non-square input comes out undistorted, at the model's scale.
* :class:`Crop`: a square box around the face, with margin (``scale`` times the detected face's
  side, centred a little above it: the detectors' boxes leave out forehead and hair, which the
  training crops keep). Where the box leaves the frame, the edge pixels are repeated. Undoing it
  (:meth:`Crop.paste`) resizes the model's output to the box and blends it into a full-size
  background with a feathered edge; pixels outside the box stay exactly as they were.

:class:`FaceTracker` turns a stream of frames into crops: it detects the largest face in each
frame, smooths the box over time (causally, so that a live stream and a whole video give the same
boxes) and decides what happens when no face is found.

Detection: :class:`HaarFaceDetector`, OpenCV's frontal-face Haar cascade. Its weights ship inside
the ``opencv-python-headless`` 4.x wheels (``cv2/data``; the 5.x wheels dropped them), so nothing is
downloaded; ``cascade=PATH`` loads another cascade file. Any callable ``uint8 [H, W, 3] -> boxes``
can take its place (:class:`FaceDetector`).

Example::

    >>> import numpy as np
    >>> from fnevr.face import HaarFaceDetector, Crop
    >>> from skimage.data import astronaut                      # doctest: +SKIP
    >>> face = HaarFaceDetector()(astronaut())[0]               # doctest: +SKIP
    >>> Crop.around(face).box                                   # doctest: +SKIP
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels; x1, y1 exclusive


class NoFaceError(RuntimeError):
    """No face was found in a frame and the policy is to stop; the message names the file and frame."""


class FaceDetector(Protocol):
    def __call__(self, image: np.ndarray) -> list[Box]:
        """Faces in an RGB ``uint8`` image ``[H, W, 3]``, largest first (empty: none found)."""
        ...


def _cv2():
    try:
        import cv2
    except ImportError as e:
        raise RuntimeError(
            "face detection needs OpenCV: pip install 'opencv-python-headless<5' (or fnevr[face]); "
            "without --crop the whole frame is used"
        ) from e
    return cv2


class HaarFaceDetector:
    """OpenCV's frontal-face Haar cascade (``haarcascade_frontalface_default.xml`` from the wheel's
    ``cv2/data``, or the cascade file ``cascade``). Frames are scanned at most ``max_side`` pixels
    wide or high (faster, and the cascade needs no more); faces smaller than ``min_fraction`` of the
    shorter side are ignored."""

    def __init__(self, cascade=None, *, max_side: int = 320, min_fraction: float = 0.08):
        cv2 = self._cv2 = _cv2()
        if cascade is None:
            folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
            if folder is None:
                raise RuntimeError(
                    f"this OpenCV ({cv2.__version__}) ships no Haar cascades (the 5.x wheels dropped them): "
                    "install 'opencv-python-headless<5' or give a cascade file"
                )
            cascade = Path(folder) / "haarcascade_frontalface_default.xml"
        self.path = Path(cascade)
        if not self.path.is_file():
            raise FileNotFoundError(f"face detector cascade {self.path}: no such file")
        try:
            self._cascade = cv2.CascadeClassifier(str(self.path))
        except Exception:  # cv2.error (as SystemError) for a file that is XML but not a cascade
            self._cascade = None
        if self._cascade is None or self._cascade.empty():
            raise ValueError(f"face detector cascade {self.path}: not an OpenCV cascade file")
        self.max_side, self.min_fraction = max_side, min_fraction

    def __call__(self, image: np.ndarray) -> list[Box]:
        cv2 = self._cv2
        image = np.ascontiguousarray(image)
        h, w = image.shape[:2]
        factor = min(1.0, self.max_side / max(h, w))
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        if factor < 1:
            gray = cv2.resize(gray, (round(w * factor), round(h * factor)), interpolation=cv2.INTER_AREA)
        smallest = max(20, int(self.min_fraction * min(gray.shape)))
        found = self._cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(smallest, smallest))
        boxes = [(x / factor, y / factor, (x + bw) / factor, (y + bh) / factor) for x, y, bw, bh in np.asarray(found)]
        return sorted(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)


def _resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    """float ``[3, H, W]`` -> ``[3, *size]``, antialiased bilinear (as the data loader resizes)."""
    if tuple(image.shape[1:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]


@dataclass(frozen=True)
class Letterbox:
    """The whole ``height x width`` frame in a ``size x size`` square: resized to ``inner``
    (``(h, w)``, the longer side = ``size``) and placed at ``offset`` (top row, left column)."""

    height: int
    width: int
    size: int

    @property
    def inner(self) -> tuple[int, int]:
        scale = self.size / max(self.height, self.width)
        return max(1, round(self.height * scale)), max(1, round(self.width * scale))

    @property
    def offset(self) -> tuple[int, int]:
        h, w = self.inner
        return (self.size - h) // 2, (self.size - w) // 2

    def cut(self, image: Tensor) -> Tensor:
        """float ``[3, height, width]`` -> the model's ``[3, size, size]``."""
        h, w = self.inner
        top, left = self.offset
        inner = _resize(image, (h, w))
        return F.pad(inner[None], (left, self.size - w - left, top, self.size - h - top), mode="replicate")[0]

    def undo(self, square: Tensor) -> Tensor:
        """The model's ``[3, size, size]`` -> the frame's part ``[3, *inner]`` (no distortion)."""
        h, w = self.inner
        top, left = self.offset
        return square[:, top : top + h, left : left + w]


@dataclass(frozen=True)
class Crop:
    """A square box ``(x0, y0, side)`` in integer pixels of a frame, cut out to ``size x size``."""

    x0: int
    y0: int
    side: int
    size: int

    @classmethod
    def around(cls, face: Box, size: int, scale: float = 2.0, lift: float = 0.1) -> "Crop":
        """The square of side ``scale`` times the face box's longer side, centred on the face moved
        up by ``lift`` of its side."""
        x0, y0, x1, y1 = face
        side = max(x1 - x0, y1 - y0)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 - lift * side
        return cls.square(cx, cy, scale * side, size)

    @classmethod
    def square(cls, cx: float, cy: float, side: float, size: int) -> "Crop":
        side_px = max(2, round(side))
        return cls(round(cx - side_px / 2), round(cy - side_px / 2), side_px, size)

    @property
    def box(self) -> Box:
        return (self.x0, self.y0, self.x0 + self.side, self.y0 + self.side)

    def cut(self, image: Tensor) -> Tensor:
        """float ``[3, H, W]`` -> ``[3, size, size]``; outside the frame the edge pixels repeat."""
        _, h, w = image.shape
        x0, y0, x1, y1 = self.x0, self.y0, self.x0 + self.side, self.y0 + self.side
        # the box's part inside the frame (at least one pixel, so that padding has an edge to repeat)
        cx0, cy0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
        cx1, cy1 = max(min(x1, w), cx0 + 1), max(min(y1, h), cy0 + 1)
        part = image[:, cy0:cy1, cx0:cx1]
        pads = (cx0 - x0, x1 - cx1, cy0 - y0, y1 - cy1)
        if any(pads):
            part = F.pad(part[None], pads, mode="replicate")[0]
        return _resize(part, (self.size, self.size))

    def feather_mask(self, feather: float, dtype=torch.float32) -> Tensor:
        """``[side, side]`` weights of the pasted output: 1 inside, falling smoothly to 0 over the
        outer ``feather`` fraction of the side."""
        width = max(feather * self.side, 1e-6)
        u = torch.arange(self.side, dtype=torch.float64) + 0.5
        ramp = (torch.minimum(u, self.side - u) / width).clamp(0, 1)
        ramp = ramp * ramp * (3 - 2 * ramp)  # smoothstep: no visible seam where the ramp starts
        return (ramp[:, None] * ramp[None, :]).to(dtype)

    def paste(self, background: Tensor, square: Tensor, feather: float = 0.1) -> Tensor:
        """Blend the model's ``square`` ``[3, size, size]`` into ``background`` ``[3, H, W]`` (a
        new tensor): resized to the box, weighted by :meth:`feather_mask`. Pixels outside the box
        are the background's, exactly."""
        out = background.clone()
        _, h, w = background.shape
        x0, y0 = max(self.x0, 0), max(self.y0, 0)
        x1, y1 = min(self.x0 + self.side, w), min(self.y0 + self.side, h)
        if x1 <= x0 or y1 <= y0:
            return out
        patch = _resize(square.to(background.dtype), (self.side, self.side))
        mask = self.feather_mask(feather, background.dtype)
        rows, cols = slice(y0 - self.y0, y1 - self.y0), slice(x0 - self.x0, x1 - self.x0)
        m = mask[rows, cols]
        region = out[:, y0:y1, x0:x1]
        out[:, y0:y1, x0:x1] = region + m * (patch[:, rows, cols] - region)
        return out


Placement = Letterbox | Crop


def to_float(image) -> Tensor:
    """RGB ``uint8`` ``[H, W, 3]`` (numpy or tensor) -> float ``[3, H, W]`` in [0, 1]."""
    image = torch.as_tensor(np.asarray(image) if not isinstance(image, Tensor) else image)
    if image.dim() != 3 or image.shape[-1] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"expected an RGB uint8 frame [H, W, 3]; got {image.dtype} {tuple(image.shape)}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"expected a non-empty RGB frame; got {tuple(image.shape)}")
    return image.permute(2, 0, 1).float() / 255


def to_uint8(image: Tensor) -> np.ndarray:
    """float ``[3, H, W]`` in [0, 1] -> RGB ``uint8`` ``[H, W, 3]``."""
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


class FaceTracker:
    """Where the model's square comes from in each frame of a stream.

    ``detector=None``: every frame is letterboxed. Otherwise a face's :meth:`Crop.around` box (the
    largest face in the first frame, then the face nearest the box followed so far), its centre and
    side smoothed over time by an exponential moving average (``smoothing`` = the weight of the
    past: 0 follows each detection, 0.9 moves slowly). A frame
    where no face is found keeps the previous box; before any face was found it is letterboxed
    (``no_face="full-frame"``) or stops with :class:`NoFaceError` (``"stop"``). ``missing`` lists
    the frame numbers without a face; ``name`` names the input in messages.
    """

    def __init__(
        self,
        detector: Callable | None,
        size: int,
        *,
        scale: float = 2.0,
        smoothing: float = 0.0,
        no_face: str = "full-frame",
        name: str = "frame",
    ):
        if no_face not in ("full-frame", "stop"):
            raise ValueError(f"no_face must be 'full-frame' or 'stop'; got {no_face!r}")
        if not 0 <= smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1); got {smoothing}")
        self.detector, self.size, self.scale = detector, size, scale
        self.smoothing, self.no_face, self.name = smoothing, no_face, name
        self.reset()

    def reset(self) -> None:
        self._state: tuple[float, float, float] | None = None
        self.frame = 0
        self.missing: list[int] = []

    def __call__(self, image: np.ndarray) -> Placement:
        """The placement of the next frame, RGB ``uint8`` ``[H, W, 3]``."""
        index, self.frame = self.frame, self.frame + 1
        h, w = image.shape[:2]
        if self.detector is None:
            return Letterbox(h, w, self.size)
        faces = self.detector(image)
        if faces:
            boxes = [Crop.around(face, self.size, self.scale) for face in faces]
            box = boxes[0]  # the largest face; then the one nearest the box followed so far
            if self._state is not None:
                cx, cy, _ = self._state
                box = min(boxes, key=lambda b: math.hypot(b.x0 + b.side / 2 - cx, b.y0 + b.side / 2 - cy))
            now = (box.x0 + box.side / 2, box.y0 + box.side / 2, float(box.side))
            a = self.smoothing if self._state is not None else 0.0
            prev = self._state or now
            self._state = (
                a * prev[0] + (1 - a) * now[0],
                a * prev[1] + (1 - a) * now[1],
                a * prev[2] + (1 - a) * now[2],
            )
        else:
            self.missing.append(index)
            if self.no_face == "stop":
                raise NoFaceError(f"no face found in {self.name} frame {index} (--no-face full-frame goes on)")
        if self._state is None:  # no face yet
            return Letterbox(h, w, self.size)
        cx, cy, side = self._state
        return Crop.square(cx, cy, side, self.size)


def describe_missing(name: str, frames: Sequence[int], total: int) -> str:
    """One line naming the frames without a face, as ranges: ``"video.mp4: no face in frames 3-5, 9
    (4 of 20)"``."""
    spans: list[list[int]] = []
    for f in frames:
        if spans and f == spans[-1][1] + 1:
            spans[-1][1] = f
        else:
            spans.append([f, f])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return f"no face found in {name} frame{'s' if len(frames) > 1 else ''} {text} ({len(frames)} of {total})"
