"""fnevr's layers built on its fused ops; their state dicts match the published FNeVR model's."""

from .batchnorm import SyncBatchNorm
from .spade import SPADE

__all__ = ["SPADE", "SyncBatchNorm"]
