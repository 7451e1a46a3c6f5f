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


def write_video(path, frames, fps: float = 25.0) -> None:
    """Write ``frames`` (``uint8`` ``[T, H, W, 3]`` tensor or array; float in ``[0, 1]`` is scaled)
    as a playable H.264 mp4 (yuv420p). Odd heights/widths are padded by one edge pixel, because
    yuv420p needs even sizes. The file appears only once complete (written to a temporary name in
    the same folder, then renamed), so a failed write leaves no partial video behind."""
    import imageio.v2 as imageio

    frames = torch.as_tensor(np.asarray(frames) if not isinstance(frames, Tensor) else frames)
    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"write_video: frames must be [T, H, W, 3] with T > 0; got {tuple(frames.shape)}")
    if frames.is_floating_point():
        frames = (frames.clamp(0, 1) * 255).round()
    frames = frames.to("cpu", torch.uint8)
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = F.pad(frames.permute(0, 3, 1, 2).float(), (0, pad_w, 0, pad_h), mode="replicate")
        frames = frames.to(torch.uint8).permute(0, 2, 3, 1)
    with atomic_path(path) as tmp:
        writer = imageio.get_writer(
            str(tmp), fps=fps, codec="libx264", pixelformat="yuv420p", macro_block_size=2, ffmpeg_log_level="error"
        )
        try:
            for frame in frames.numpy():
                writer.append_data(frame)
        finally:
            writer.close()


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
