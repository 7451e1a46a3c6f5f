"""Live animation: a source face driven one frame at a time (a webcam, a stream), or a whole video.

::

    import cv2
    import fnevr

    animator = fnevr.Animator("vox.pth", crop=True, paste_back=True)   # device="auto": CUDA if present
    animator.set_source(cv2.cvtColor(cv2.imread("face.jpg"), cv2.COLOR_BGR2RGB))
    camera = cv2.VideoCapture(0)
    while (ok := camera.read())[0]:
        frame = cv2.cvtColor(ok[1], cv2.COLOR_BGR2RGB)
        cv2.imshow("fnevr", cv2.cvtColor(animator(frame), cv2.COLOR_RGB2BGR))
        if cv2.waitKey(1) == 27:  # Esc
            break

Motion is relative (as ``fnevr animate``): the source's keypoints move as the driving keypoints
move away from where they were in the first driving frame (:meth:`Animator.reset` starts again from
the next frame; :meth:`Animator.set_initial` picks another frame). ``fnevr animate`` runs through
this class: :meth:`Animator.animate` gives the frames ``animator(frame)`` gives one by one, only
with the model batched.
"""

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .animate import movement_scale, relative_keypoints
from .face import FaceTracker, HaarFaceDetector, Letterbox, Placement, to_float, to_uint8


class Animator:
    """Animate a source face with driving frames, one at a time or in batches.

    Args:
        model: a :class:`fnevr.FNeVR` or a checkpoint path (published or fnevr's).
        config: the config of a checkpoint that does not store one (default: vox-256).
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        crop: find the face in the source and in every driving frame and animate a square crop
            around it (:mod:`fnevr.face`); ``False`` letterboxes whole frames.
        paste_back: with ``crop``, return the source at full size with the animated face pasted
            into it (feathered edge, ``feather`` of the box's side); else the model's square.
        detector: a face detector (default :class:`~fnevr.face.HaarFaceDetector`).
        crop_scale: the crop's side over the detected face's.
        smoothing: weight of the past in the driving crop box's moving average, in [0, 1).
        no_face: ``"full-frame"``: a source without a face is letterboxed, and a driving frame
            without one keeps the last box (letterboxed before the first); ``"stop"``: raise
            :class:`~fnevr.face.NoFaceError`.
        relative: relative motion (default) or the driving keypoints as they are.
        precision: ``"auto"`` (bf16 autocast on CUDA, fp32 on the CPU), ``"bf16"``, ``"fp32"``.
        compile: ``torch.compile`` the per-frame model call (``mode="reduce-overhead"``: CUDA
            graphs on CUDA); the first frames of each batch size then take a while.
        backend: the fused ops' backend for the whole model (default: the config's).

    Frames are RGB ``uint8`` ``[H, W, 3]`` (numpy arrays or tensors); so is the output.
    """

    def __init__(
        self,
        model,
        *,
        config=None,
        device="auto",
        crop: bool = False,
        paste_back: bool = False,
        detector: Callable | None = None,
        crop_scale: float = 2.0,
        smoothing: float = 0.5,
        no_face: str = "full-frame",
        feather: float = 0.1,
        relative: bool = True,
        adapt_movement_scale: bool = True,
        precision: str = "auto",
        compile: bool = False,
        backend: str | None = None,
        source_name: str = "the source",
        driving_name: str = "the driving video",
    ):
        from .device import parse_device

        if paste_back and not crop:
            raise ValueError("paste_back needs crop=True (it pastes the animated face crop into the source)")
        if precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32'; got {precision!r}")
        self.device = parse_device(device) if isinstance(device, str) else torch.device(device)
        if not isinstance(model, torch.nn.Module):
            from .checkpoint import load_checkpoint

            model, _ = load_checkpoint(model, config, training_modules=False)
        if backend:
            model.set_backend(backend)
        self.model = model.to(self.device).channels_last().eval()
        self.size = int(model.config["dataset_params"]["frame_shape"][0])
        if crop and detector is None:
            detector = HaarFaceDetector()
        self.detector = detector if crop else None
        self.paste_back, self.feather = paste_back, feather
        self.relative, self.adapt_movement_scale = relative, adapt_movement_scale
        self.crop_scale, self.no_face, self.source_name = crop_scale, no_face, source_name
        self.tracker = FaceTracker(
            self.detector, self.size, scale=crop_scale, smoothing=smoothing, no_face=no_face, name=driving_name
        )
        bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if bf16 else None
        self._step = torch.compile(self._model_step, mode="reduce-overhead", dynamic=False) if compile else None
        self.source: Tensor | None = None
        self.source_placement: Placement | None = None
        self._background: Tensor | None = None
        self._kp_source: dict | None = None
        self._features: Tensor | None = None
        self._source_input: Tensor | None = None  # the source as the model takes it
        self._kp_initial: dict | None = None
        self._scale = 1.0  # the movement scale, from the source's and the initial frame's keypoints

    # --- the source ---------------------------------------------------------------------------------------

    def set_source(self, image) -> "Animator":
        """The face to animate: RGB ``uint8`` ``[H, W, 3]``, or an image path. Starts the driving
        motion afresh (:meth:`reset`)."""
        if isinstance(image, (str, Path)):
            from .data.video import read_image

            image = read_image(image)[0]
        full = to_float(image)
        placement: Placement = Letterbox(full.shape[1], full.shape[2], self.size)
        if self.detector is not None:
            source = FaceTracker(
                self.detector, self.size, scale=self.crop_scale, no_face=self.no_face, name=self.source_name
            )
            placement = source(np.asarray(image))
            if source.missing:
                warnings.warn(
                    f"no face found in {self.source_name}: it is used whole (letterboxed)", RuntimeWarning, stacklevel=2
                )
        self.source_placement, self._background = placement, full
        self.source = placement.cut(full).to(self.device)
        self._source_input = self._model_input(self.source[None])
        with self._inference():  # what depends on the source alone is computed once
            self._kp_source = self.model.kp_detector(self._source_input)
            self._features = self.model.generator.encode(self._source_input)
        self.reset()
        return self

    def reset(self) -> None:
        """The next driving frame becomes the one the motion is measured from; the crop box's
        smoothing starts again."""
        self._kp_initial = None
        self.tracker.reset()

    # --- driving frames -----------------------------------------------------------------------------------

    def __call__(self, frame) -> np.ndarray:
        """One driving frame (RGB ``uint8`` ``[H, W, 3]``) -> the animated source, RGB ``uint8``."""
        return self.finish(self._animate(self.prepare(frame)[None])[0].cpu())

    def prepare(self, frame) -> Tensor:
        """A driving frame as the model sees it: float ``[3, size, size]`` (cropped and smoothed,
        or letterboxed). Advances the tracker, as animating the frame would."""
        return self.tracker(np.asarray(frame)).cut(to_float(frame))

    def set_initial(self, square: Tensor) -> None:
        """Measure relative motion from this driving frame (as :meth:`prepare` returns it)."""
        with self._inference():
            self._kp_initial = self.model.kp_detector(self._model_input(square[None]))
        assert self._kp_source is not None
        self._scale = movement_scale(self._kp_source, self._kp_initial) if self.adapt_movement_scale else 1.0

    def animate(
        self, frames: Iterable, batch_size: int = 8, *, progress: Callable | None = None
    ) -> Iterator[np.ndarray]:
        """The animated source for each driving frame, RGB ``uint8``, in order, with the model run
        on ``batch_size`` frames at a time: the frames ``animator(frame)`` gives one by one."""
        squares = (self.prepare(frame) for frame in frames)
        for pred in self.animate_squares(squares, batch_size, progress=progress):
            yield self.finish(pred)

    def animate_squares(
        self, squares: Iterable[Tensor], batch_size: int = 8, *, progress: Callable | None = None
    ) -> Iterator[Tensor]:
        """The model's output, float ``[3, size, size]`` on the CPU, for each driving square
        (:meth:`prepare`'s output); :meth:`finish` makes a frame of it. ``progress(n)`` is called
        after each batch."""
        if self.source is None:
            raise RuntimeError("Animator: call set_source(image) before driving it")
        batch: list[Tensor] = []
        for square in squares:
            batch.append(square)
            if len(batch) == batch_size:
                yield from self._animate(torch.stack(batch)).cpu()
                if progress is not None:
                    progress(len(batch))
                batch = []
        if batch:
            yield from self._animate(torch.stack(batch)).cpu()
            if progress is not None:
                progress(len(batch))

    def finish(self, square: Tensor) -> np.ndarray:
        """The model's output square -> the output frame, RGB ``uint8``: pasted into the full-size
        source (``paste_back``), the letterbox cut off (no crop: the source's aspect, at the model's
        scale), or the square itself (crop)."""
        placement, background = self.source_placement, self._background
        assert placement is not None and background is not None
        if isinstance(placement, Letterbox):
            out = placement.undo(square)
            if self.paste_back:  # a source without a face, pasted back: the whole frame, at full size
                size = tuple(background.shape[1:])
                out = F.interpolate(out[None], size=size, mode="bilinear", align_corners=False)[0]
        elif self.paste_back:
            out = placement.paste(background, square, self.feather)
        else:
            out = square
        return to_uint8(out)

    # --- internals ------------------------------------------------------------------------------------------

    def _inference(self):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.autocast_dtype is not None:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast_dtype))
        return stack

    def _model_input(self, x: Tensor) -> Tensor:
        return x.to(self.device).contiguous(memory_format=torch.channels_last)

    def _model_step(
        self, squares: Tensor, source: Tensor, features: Tensor, kp_source: dict, kp_initial: dict, scale: float
    ) -> Tensor:
        kp_driving = self.model.kp_detector(squares)
        if self.relative:
            kp_driving = relative_keypoints(kp_source, kp_driving, kp_initial, scale=scale)
        n = squares.shape[0]
        kp_src = {k: v.expand(n, *v.shape[1:]) for k, v in kp_source.items()}
        batch = lambda x: x.expand(n, *x.shape[1:])
        return self.model.animate(batch(source), kp_src, kp_driving, source_features=batch(features))["prediction"]

    def _animate(self, squares: Tensor) -> Tensor:
        """float ``[n, 3, size, size]`` driving squares -> predictions ``[n, 3, size, size]``."""
        assert self._source_input is not None and self._kp_source is not None and self._features is not None
        squares = self._model_input(squares)
        if self._kp_initial is None:
            self.set_initial(squares[0])
        assert self._kp_initial is not None
        step = self._step or self._model_step
        with self._inference():
            pred = step(squares, self._source_input, self._features, self._kp_source, self._kp_initial, self._scale)
        return pred.float()
