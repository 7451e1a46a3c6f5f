"""Data: video reading/writing, FOMM-layout datasets, augmentation and the synthetic default set."""

from .augment import Augmentation
from .dataset import DatasetRepeater, FramesDataset, pose_path, read_pose_csv, write_pose_csv
from .synthetic import ensure_synthetic_dataset
from .video import VideoReadError, read_video, write_video

__all__ = [
    "Augmentation",
    "DatasetRepeater",
    "FramesDataset",
    "VideoReadError",
    "ensure_synthetic_dataset",
    "pose_path",
    "read_pose_csv",
    "read_video",
    "write_pose_csv",
    "write_video",
]
