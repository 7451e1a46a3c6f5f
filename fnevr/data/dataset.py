"""FOMM-layout video datasets for training and evaluation.

Layout::

    root/train/<video>   root/test/<video>

where each ``<video>`` is a frame folder, an ``.mp4``/``.mov``/``.gif`` or a ``.png``/``.jpg``
strip (see :mod:`fnevr.data.video`). Names ``<id>#<clip>`` share the identity ``<id>``; with
``id_sampling`` an epoch visits every identity once and picks one of its videos at random (so
identities with many clips don't dominate).

Pose angles (optional): ``root/<split>/<stem>.pose.csv`` next to the video, where ``<stem>`` is the
video's name without its suffix (a folder's full name). It is a CSV file with a header naming
(at least) the columns ``yaw``, ``pitch``, ``roll`` (degrees) and one row per frame, in frame order.
Poses are used only when every video of the split has such a file (otherwise a warning says which
lack one). Training items then carry ``pose``: ``[3]`` = (yaw, pitch, roll) of the driving frame
minus the source frame's (a horizontal flip negates yaw and roll).

Unreadable videos: in the training split, when a video cannot be read, a ``RuntimeWarning`` names
it, the dataset drops it for the rest of the run (per DataLoader worker) and the item is taken from
the next readable video of the list instead (for ``id_sampling``: another clip of that identity,
else the next identity); only when no video can be read is an error raised. In the test split an
item is one particular video, never replaced by another: reading it raises
:class:`~fnevr.data.video.VideoReadError` (naming the file), and the caller decides (``fnevr
evaluate`` skips it and says so).

Randomness: with ``seed=None`` draws come from torch's global generator (which DataLoader seeds per
worker); with an integer ``seed`` each item draws from its own generator seeded by
``(seed, epoch, key)`` (:meth:`FramesDataset.set_epoch`), so items do not depend on workers or
order, which makes resumed runs exact. Example::

    >>> from fnevr.data import FramesDataset, DatasetRepeater, ensure_synthetic_dataset
    >>> root = ensure_synthetic_dataset()
    >>> train = DatasetRepeater(FramesDataset(root, frame_shape=(64, 64, 3), id_sampling=True,
    ...     augmentation={"flip_param": {"horizontal_flip": True, "time_flip": True}}, seed=0), 10)
    >>> item = train[0]
    >>> item["source"].shape, item["driving"].shape, item["pose"].shape
    (torch.Size([3, 64, 64]), torch.Size([3, 64, 64]), torch.Size([3]))
    >>> FramesDataset(root, frame_shape=(64, 64, 3), is_train=False)[0]["video"].shape
    torch.Size([3, 32, 64, 64])
"""

import csv
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .augment import Augmentation
from .video import IMAGE_SUFFIXES, MOVIE_SUFFIXES, VideoReadError, frame_files, is_video, read_frames, read_video

POSE_SUFFIX = ".pose.csv"
POSE_COLUMNS = ("yaw", "pitch", "roll")


class FramesDataset(Dataset):
    """Videos of ``root/train`` (``is_train``) or ``root/test``.

    Args:
        root: dataset folder holding ``train/`` and ``test/``.
        frame_shape: ``(H, W[, 3])``; frames are resized (antialiased) to it.
        is_train: training items (a random frame pair) from ``train/``, else whole videos from ``test/``.
        id_sampling: one item per identity (name before ``#``) per epoch, training only.
        augmentation: an :class:`~fnevr.data.augment.Augmentation`, FOMM's ``augmentation_params``
            dict, or ``None``; training only.
        pairs_list: optional CSV with columns ``source``, ``driving`` (video names) of evaluation
            pairs; the rows whose videos are both in this split become :attr:`pairs`.
        seed: ``None`` (global torch RNG) or an int (per-item generators, see the module doc).

    Items: training ``{"source": [3, H, W], "driving": [3, H, W], "name": str[, "pose": [3]]}``,
    test ``{"video": [3, T, H, W], "name": str[, "pose": [T, 3]]}``; images float32 in ``[0, 1]``.
    """

    def __init__(
        self,
        root,
        frame_shape=(256, 256, 3),
        is_train: bool = True,
        id_sampling: bool = False,
        augmentation=None,
        pairs_list=None,
        seed=None,
    ):
        split = "train" if is_train else "test"
        self.root = Path(root) / split
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"FramesDataset: expected the FOMM layout {root}/train and {root}/test; {self.root} is not a folder"
            )
        if frame_shape is None or len(frame_shape) not in (2, 3) or tuple(frame_shape[2:]) not in ((), (3,)):
            raise ValueError(f"FramesDataset: frame_shape must be (H, W) or (H, W, 3); got {frame_shape!r}")
        if seed is not None and not isinstance(seed, (int, np.integer)):
            raise TypeError(f"FramesDataset: seed must be None or an int; got {seed!r}")
        self.frame_shape = tuple(int(s) for s in frame_shape[:2])
        self.is_train = bool(is_train)
        self.id_sampling = bool(id_sampling) and self.is_train
        self.augmentation = Augmentation.from_config(augmentation) if self.is_train else None
        self.seed = None if seed is None else int(seed)
        self.epoch = 0
        self.videos = sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".") and is_video(p))
        if not self.videos:
            raise ValueError(
                f"FramesDataset: no videos in {self.root} (frame folders, .mp4/.mov/.gif or .png/.jpg strips)"
            )
        self.ids = sorted({name.split("#")[0] for name in self.videos})
        self.by_id = {i: [v for v in range(len(self.videos)) if self.videos[v].split("#")[0] == i] for i in self.ids}
        self.poses = self._load_poses()
        self.pairs = _read_pairs(pairs_list, set(self.videos)) if pairs_list is not None else None
        self._bad = set()  # indices of videos found unreadable in this process

    def __len__(self):
        return len(self.ids) if self.id_sampling else len(self.videos)

    def __getitem__(self, index):
        return self.sample(index, key=index)

    def set_epoch(self, epoch: int):
        """Choose the epoch part of the per-item seeds (no effect with ``seed=None``)."""
        self.epoch = int(epoch)

    def sample(self, index: int, key: int):
        """Item ``index``, drawing its randomness from the stream ``key`` (see the module doc)."""
        if not 0 <= index < len(self):
            raise IndexError(f"FramesDataset: index {index} out of range for {len(self)} items")
        if not self.is_train:  # a test item is that video or nothing
            return self._test_item(index, self.root / self.videos[index])
        generator = None
        if self.seed is not None:
            state = np.random.SeedSequence([self.seed, self.epoch, int(key)]).generate_state(2, np.uint32)
            generator = torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]))
        # Each failed try drops a video or, once an identity has none left, moves to the next one.
        for _ in range(len(self.videos) + len(self.ids)):
            video = self._pick(index, generator)
            if video is None:  # every clip of this identity is unreadable
                index = (index + 1) % len(self)
                continue
            path = self.root / self.videos[video]
            try:
                return self._train_item(video, path, generator) if self.is_train else self._test_item(video, path)
            except VideoReadError as error:
                warnings.warn(f"skipping unreadable video {path}: {error}", RuntimeWarning, stacklevel=2)
                self._bad.add(video)
                if not self.id_sampling:
                    index = (index + 1) % len(self)
        raise RuntimeError(f"FramesDataset: no readable video left in {self.root}")

    def _pick(self, index, generator):
        if not self.id_sampling:
            for offset in range(len(self.videos)):
                video = (index + offset) % len(self.videos)
                if video not in self._bad:
                    return video
            return None
        clips = [v for v in self.by_id[self.ids[index]] if v not in self._bad]
        if not clips:
            return None
        return clips[int(torch.randint(len(clips), (), generator=generator))]

    def _train_item(self, video, path, generator):
        if path.is_dir():
            count = len(frame_files(path))
            if count == 0:
                raise VideoReadError(path, "folder has no frame images")
            indices = torch.randint(count, (2,), generator=generator).sort().values.tolist()
            frames = read_frames(path, indices, self.frame_shape)
        else:
            whole = read_video(path, self.frame_shape)
            count = whole.shape[0]
            indices = torch.randint(count, (2,), generator=generator).sort().values.tolist()
            frames = whole[indices]
        clip = frames.permute(0, 3, 1, 2).float().div_(255)
        info = {"time_flip": False, "horizontal_flip": False}
        if self.augmentation is not None:
            clip, info = self.augmentation(clip, generator)
        item = {"source": clip[0], "driving": clip[1], "name": self.videos[video]}
        if self.poses is not None:
            pose = self._pose(video, path, count)
            first, second = indices[::-1] if info["time_flip"] else indices
            delta = pose[second] - pose[first]
            if info["horizontal_flip"]:  # a mirror turns the head the other way and tilts it the other way
                delta = delta * torch.tensor([-1.0, 1.0, -1.0])
            item["pose"] = delta
        return item

    def _test_item(self, video, path):
        frames = read_video(path, self.frame_shape)
        item = {"video": frames.permute(3, 0, 1, 2).float().div_(255), "name": self.videos[video]}
        if self.poses is not None:
            item["pose"] = self._pose(video, path, frames.shape[0])
        return item

    def _pose(self, video, path, count):
        pose = self.poses[video]
        if pose.shape[0] != count:
            raise VideoReadError(path, f"pose file has {pose.shape[0]} rows but the video has {count} frames")
        return pose

    def _load_poses(self):
        files = [self.root / (_stem(self.root / v) + POSE_SUFFIX) for v in self.videos]
        present = [f.is_file() for f in files]
        if not any(present):
            return None
        if not all(present):
            missing = [v for v, p in zip(self.videos, present) if not p]
            warnings.warn(
                f"{self.root}: poses ignored, {len(missing)} video(s) lack a {POSE_SUFFIX} file (e.g. {missing[0]})",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        return [read_pose_csv(f) for f in files]


class DatasetRepeater(Dataset):
    """``num_repeats`` passes over ``dataset`` per epoch (fewer, longer epochs; less loader start-up).
    Repeated items get distinct random streams when the dataset has ``sample(index, key)``."""

    def __init__(self, dataset, num_repeats: int = 100):
        if int(num_repeats) < 1:
            raise ValueError(f"DatasetRepeater: num_repeats must be >= 1; got {num_repeats}")
        self.dataset = dataset
        self.num_repeats = int(num_repeats)

    def __len__(self):
        return self.num_repeats * len(self.dataset)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"DatasetRepeater: index {index} out of range for {len(self)} items")
        if hasattr(self.dataset, "sample"):
            return self.dataset.sample(index % len(self.dataset), key=index)
        return self.dataset[index % len(self.dataset)]

    def set_epoch(self, epoch: int):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def read_pose_csv(path) -> torch.Tensor:
    """A ``.pose.csv`` file -> float32 ``[T, 3]`` (yaw, pitch, roll in degrees)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or any(c not in rows[0] for c in POSE_COLUMNS):
        raise ValueError(f"pose file {path}: expected a header with columns {POSE_COLUMNS} and one row per frame")
    try:
        return torch.tensor([[float(r[c]) for c in POSE_COLUMNS] for r in rows], dtype=torch.float32)
    except (TypeError, ValueError) as error:
        raise ValueError(f"pose file {path}: {error}") from error


def write_pose_csv(path, pose) -> None:
    """Write ``[T, 3]`` (yaw, pitch, roll in degrees) as a ``.pose.csv`` file."""
    pose = np.asarray(pose, dtype=np.float64)
    if pose.ndim != 2 or pose.shape[1] != 3:
        raise ValueError(f"write_pose_csv: pose must be [T, 3]; got {pose.shape}")
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("frame",) + POSE_COLUMNS)
        for i, row in enumerate(pose):
            writer.writerow([i] + [f"{v:.4f}" for v in row])


def pose_path(video_path) -> Path:
    """Where the pose file of ``video_path`` lives."""
    video_path = Path(video_path)
    return video_path.parent / (_stem(video_path) + POSE_SUFFIX)


def _stem(path: Path) -> str:
    if path.is_dir() or path.suffix.lower() not in IMAGE_SUFFIXES + MOVIE_SUFFIXES:
        return path.name
    return path.name[: -len(path.suffix)]


def _read_pairs(pairs_list, videos):
    with open(pairs_list, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and not {"source", "driving"} <= set(rows[0]):
        raise ValueError(f"pairs_list {pairs_list}: expected columns 'source' and 'driving'")
    return [(r["source"], r["driving"]) for r in rows if r["source"] in videos and r["driving"] in videos]


__all__ = ["DatasetRepeater", "FramesDataset", "pose_path", "read_pose_csv", "write_pose_csv"]
