"""Reading and writing videos as ``uint8`` tensors ``[T, H, W, 3]``.

A video is one of (FOMM's dataset conventions):

* a folder of frames (``.png``/``.jpg``/``.jpeg``, in name order; other files are ignored),
* an ``.mp4``/``.mov``/``.gif`` file (decoded by imageio / imageio-ffmpeg),
* a ``.png``/``.jpg`` "strip": frames of ``H x H`` pixels side by side, so the width is a multiple of
  the height.

Grey images become RGB, an alpha channel is dropped. With ``frame_shape`` every frame is resized
(antialiased bilinear) to that shape. Example::

    >>> import torch
    >>> from fnevr.data.video import read_video, write_video
    >>> frames = torch.randint(0, 256, (8, 64, 64, 3), dtype=torch.uint8)
    >>> write_video("/tmp/clip.mp4", frames, fps=25)
    >>> read_video("/tmp/clip.mp4", frame_shape=(32, 32)).shape
    torch.Size([8, 32, 32, 3])
"""

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .._files import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MOVIE_SUFFIXES = (".mp4", ".mov", ".gif")


class VideoReadError(RuntimeError, ValueError):
    """A video could not be read; the message names the path and the reason."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        super().__init__(f"cannot read video {self.path!r}: {reason}")


def is_video(path) -> bool:
    """Whether ``path`` looks like a video in one of the supported layouts (by type and suffix)."""
    path = Path(path)
    return path.is_dir() or path.suffix.lower() in IMAGE_SUFFIXES + MOVIE_SUFFIXES


def frame_files(folder) -> list:
    """The frame images of a frame-folder video, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_video(path, frame_shape=None) -> Tensor:
    """Read a video (any layout above) into a ``uint8`` tensor ``[T, H, W, 3]``.

    Args:
        path: frame folder, movie file or png/jpg strip.
        frame_shape: ``(H, W)`` or ``(H, W, 3)`` to resize every frame to; ``None`` keeps the size
            (frames of a folder must then all have the same size).

    Raises:
        VideoReadError: missing, empty, corrupt or unsupported input; the message names ``path``.
    """
    path = Path(path)
    size = _check_shape(frame_shape)
    if not path.exists():
        raise VideoReadError(path, "no such file or folder")
    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            files = frame_files(path)
            if not files:
                raise VideoReadError(path, f"folder has no frame images ({', '.join(IMAGE_SUFFIXES)})")
            frames = [resize_frames(_read_image(f)[None], size) for f in files]
            if len({f.shape for f in frames}) > 1:
                raise VideoReadError(path, "frames differ in size; pass frame_shape to resize them")
            video = torch.cat(frames)
        elif suffix in IMAGE_SUFFIXES:
            video = resize_frames(split_strip(_read_image(path), path), size)
        elif suffix in MOVIE_SUFFIXES:
            video = resize_frames(_read_movie(path), size)
        else:
            raise VideoReadError(
                path, f"unsupported suffix {suffix!r}; expected a folder or one of {IMAGE_SUFFIXES + MOVIE_SUFFIXES}"
            )
    except VideoReadError:
        raise
    except Exception as error:  # decoders raise many types (OSError, ValueError, RuntimeError...)
        raise VideoReadError(path, f"{type(error).__name__}: {error}") from error
    if video.shape[0] == 0:
        raise VideoReadError(path, "no frames")
    return video


def read_frames(path, indices, frame_shape=None) -> Tensor:
    """Only the frames ``indices`` of a video, ``uint8`` ``[len(indices), H, W, 3]``. A frame
    folder reads just those files (fast for training pairs); other layouts are read whole."""
    path = Path(path)
    if not path.is_dir():
        return read_video(path, frame_shape)[list(indices)]
    files = frame_files(path)
    size = _check_shape(frame_shape)
    try:
        frames = [resize_frames(_read_image(files[i])[None], size) for i in indices]
        return torch.cat(frames)
    except Exception as error:
        raise VideoReadError(path, f"{type(error).__name__}: {error}") from error


def num_frames(path) -> int:
    """Number of frames of a frame-folder video without reading the images (others are read)."""
    path = Path(path)
    if path.is_dir():
        count = len(frame_files(path))
        if count == 0:
            raise VideoReadError(path, "folder has no frame images")
        return count
    return read_video(path).shape[0]


def split_strip(image: Tensor, path="<strip>") -> Tensor:
    """Cut a strip ``[H, N*H, 3]`` into ``N`` frames ``[N, H, H, 3]``."""
    height, width = image.shape[:2]
    if height == 0 or width % height:
        raise VideoReadError(path, f"a strip's width must be a multiple of its height; got {width}x{height}")
    return image.reshape(height, width // height, height, 3).permute(1, 0, 2, 3).contiguous()


def resize_frames(frames: Tensor, size) -> Tensor:
    """Antialiased bilinear resize of ``uint8`` ``[T, H, W, 3]`` to ``size = (H', W')`` (or as is
    when ``size`` is ``None`` or already matches)."""
    if size is None or tuple(frames.shape[1:3]) == tuple(size):
        return frames
    x = frames.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def write_video(path, frames, fps: float = 25.0, **options) -> None:
    """Write ``frames`` (``uint8`` ``[T, H, W, 3]`` tensor or array; float in ``[0, 1]`` is scaled)
    with :class:`VideoWriter` (``options``: its ``crf`` and ``audio``)."""
    frames = torch.as_tensor(np.asarray(frames) if not isinstance(frames, Tensor) else frames)
    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"write_video: frames must be [T, H, W, 3] with T > 0; got {tuple(frames.shape)}")
    if frames.is_floating_point():
        frames = (frames.clamp(0, 1) * 255).round()
    with VideoWriter(path, fps, **options) as writer:
        for frame in frames.to("cpu", torch.uint8).numpy():
            writer.write(frame)


OUT_SUFFIXES = (".mp4", ".mov", ".gif")


class VideoWriter:
    """Write RGB ``uint8`` frames ``[H, W, 3]`` one at a time to an H.264 mp4/mov (yuv420p, quality
    ``crf``: 0 lossless ... 51 worst, x264's default 23) or a looping gif.

    ``audio``: a media file whose first audio stream is copied into the mp4/mov (AAC), cut to the
    video's length; a file without audio adds none (:attr:`audio_kept` says which). Odd heights or
    widths are padded by one edge pixel, as yuv420p needs even sizes. The file appears only once
    complete (written under a temporary name in the same folder, then renamed), so a failure
    leaves no partial file behind. Use as a context manager; :meth:`close` finishes the file."""

    def __init__(self, path, fps: float = 25.0, *, crf: int = 23, audio=None):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in OUT_SUFFIXES:
            raise ValueError(f"video output {self.path}: expected a name ending in {', '.join(OUT_SUFFIXES)}")
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must be in 0..51; got {crf}")
        self.fps, self.crf, self.gif = float(fps), int(crf), suffix == ".gif"
        self.audio = None if audio is None or self.gif else Path(audio)
        self.audio_kept = False
        self.frames = 0
        self._atomic = None  # opened at the first frame: a run that fails before it leaves nothing
        self._made: list[Path] = []  # the folders the output created, removed again if it fails
        self._writer = None
        self._gif_frames: list = []

    def _open(self) -> None:
        folder = self.path.absolute().parent
        self._made = [p for p in (folder, *folder.parents) if not p.exists()]
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()

    def write(self, frame) -> None:
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"VideoWriter.write: expected RGB uint8 [H, W, 3]; got {frame.dtype} {frame.shape}")
        if self._atomic is None:
            self._open()
        if self.gif:
            self._gif_frames.append(frame)
        else:
            if frame.shape[0] % 2 or frame.shape[1] % 2:
                frame = np.pad(frame, ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0)), mode="edge")
            if self._writer is None:
                import imageio.v2 as imageio

                self._writer = imageio.get_writer(
                    str(self._tmp),
                    fps=self.fps,
                    codec="libx264",
                    pixelformat="yuv420p",
                    macro_block_size=2,
                    quality=None,
                    output_params=["-crf", str(self.crf)],
                    ffmpeg_log_level="error",
                )
            self._writer.append_data(frame)
        self.frames += 1

    def close(self) -> None:
        """Finish the file (and mux the audio); nothing is written if no frame was."""
        if self.frames == 0:
            raise ValueError(f"video output {self.path}: no frames were written")
        assert self._atomic is not None
        try:
            if self.gif:
                import imageio.v3 as iio

                iio.imwrite(self._tmp, np.stack(self._gif_frames), plugin="pillow", duration=1000 / self.fps, loop=0)
            else:
                self._writer.close()
                if self.audio is not None and has_audio(self.audio):
                    _mux_audio(self._tmp, self.audio, self.frames / self.fps)
                    self.audio_kept = True
        except BaseException:
            self.abort()
            raise
        self._atomic.__exit__(None, None, None)

    def abort(self) -> None:
        """Drop the partial file, and the folders made for it."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
        if self._atomic is not None:
            error = RuntimeError("aborted")
            with contextlib.suppress(RuntimeError):
                self._atomic.__exit__(RuntimeError, error, None)
            for folder in self._made:  # deepest first
                with contextlib.suppress(OSError):
                    folder.rmdir()
            self._atomic = None

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if kind is None:
            self.close()
        else:
            self.abort()


def _ffmpeg(*args: str) -> subprocess.CompletedProcess:
    import imageio_ffmpeg

    return subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", *args], capture_output=True, text=True)


def has_audio(path) -> bool:
    """Whether the media file ``path`` has an audio stream (asks imageio-ffmpeg's ffmpeg)."""
    if Path(path).is_dir():
        return False
    result = _ffmpeg("-i", str(path))  # exits 1 (no output named); the streams are on stderr
    return any(line.lstrip().startswith("Stream #") and " Audio:" in line for line in result.stderr.splitlines())


def _mux_audio(video: Path, audio: Path, duration: float) -> None:
    """Replace ``video`` by itself plus ``audio``'s first audio stream (AAC), cut to ``duration``
    seconds (ffmpeg's ``-shortest`` can drop the video's last frame)."""
    out = video.with_name(video.stem + ".audio" + video.suffix)
    try:
        result = _ffmpeg(
            "-y", "-loglevel", "error", "-i", str(video), "-t", f"{duration:.6f}", "-i", str(audio),
            "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", "-c:a", "aac", str(out),
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"cannot copy the audio of {audio} into the video: {result.stderr.strip()}")
        os.replace(out, video)
    finally:
        out.unlink(missing_ok=True)


def iter_video(path, frame_shape=None) -> Iterator[Tensor]:
    """The frames of a video one at a time, ``uint8`` ``[H, W, 3]``: a movie is decoded as it goes
    (constant memory); other layouts are read whole first. Errors name ``path``
    (:class:`VideoReadError`)."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() not in (".mp4", ".mov"):
        yield from read_video(path, frame_shape)
        return
    if not path.is_file():
        raise VideoReadError(path, "no such file")
    import imageio.v2 as imageio

    size = _check_shape(frame_shape)
    count = 0
    try:
        reader = imageio.get_reader(str(path))
    except Exception as error:
        raise VideoReadError(path, f"{type(error).__name__}: {error}") from error
    try:
        while True:
            try:
                frame = reader.get_next_data()
            except (IndexError, StopIteration):
                break
            except Exception as error:
                raise VideoReadError(path, f"frame {count}: {type(error).__name__}: {error}") from error
            count += 1
            yield resize_frames(_to_rgb(np.asarray(frame))[None], size)[0]
    finally:
        reader.close()
    if count == 0:
        raise VideoReadError(path, "no frames")


def frame_rate(path, default: float = 25.0) -> float:
    """A movie's frame rate (``default`` for frame folders, strips and files that have none)."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() not in MOVIE_SUFFIXES:
        return default
    import imageio.v3 as iio

    with contextlib.suppress(Exception):
        return float(iio.immeta(path).get("fps") or default)
    return default


def _check_shape(frame_shape):
    if frame_shape is None:
        return None
    shape = tuple(int(s) for s in frame_shape)
    if len(shape) not in (2, 3) or min(shape[:2]) <= 0 or (len(shape) == 3 and shape[2] != 3):
        raise ValueError(f"frame_shape must be (H, W) or (H, W, 3) with H, W > 0; got {frame_shape!r}")
    return shape[:2]


def _to_rgb(array: np.ndarray) -> Tensor:
    """``[..., H, W]``, ``[..., H, W, 1|3|4]`` of any integer/float dtype -> ``uint8`` ``[..., H, W, 3]``."""
    if array.dtype == np.uint16:
        array = (array // 257).astype(np.uint8)
    elif array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    if array.ndim >= 3 and array.shape[-1] in (3, 4):
        array = array[..., :3]
    else:
        if array.ndim >= 3 and array.shape[-1] == 1:
            array = array[..., 0]
        array = np.repeat(array[..., None], 3, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(array))


def read_image(path, frame_shape=None) -> Tensor:
    """One image as ``uint8`` ``[1, H, W, 3]`` (any size; resized to ``frame_shape`` if given).

    Raises:
        VideoReadError: missing, corrupt or empty input; the message names ``path``.
    """
    path = Path(path)
    size = _check_shape(frame_shape)
    if not path.is_file():
        raise VideoReadError(path, "no such file")
    try:
        image = _read_image(path)[None]
    except VideoReadError:
        raise
    except Exception as error:  # decoders raise many types (OSError, ValueError, ...)
        raise VideoReadError(path, f"{type(error).__name__}: {error}") from error
    if image.numel() == 0:
        raise VideoReadError(path, "empty image")
    return resize_frames(image, size)


def _read_image(path) -> Tensor:
    import imageio.v3 as iio

    image = iio.imread(path, plugin="pillow")
    if image.ndim not in (2, 3):
        raise VideoReadError(path, f"expected a single image, decoded an array of shape {image.shape}")
    return _to_rgb(image)


def _read_movie(path) -> Tensor:
    import imageio.v2 as imageio

    if path.suffix.lower() == ".gif":
        import imageio.v3 as iio

        frames = iio.imread(path, index=None, mode="RGB", plugin="pillow")  # pillow: [T, H, W, 3] for any palette
        return _to_rgb(frames if frames.ndim == 4 else frames[None])
    frames = imageio.mimread(str(path), memtest=False)
    if not frames:
        raise VideoReadError(path, "no frames decoded")
    return _to_rgb(np.stack(frames))
