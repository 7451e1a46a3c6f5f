"""Loss arithmetic runs in fp32, or fp64 for fp64 input: half precision is too coarse for sums
over whole images, and fp64 keeps gradient checks exact."""

import torch
from torch import Tensor


def loss_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def to_loss_dtype(t: Tensor) -> Tensor:
    return t.to(loss_dtype(t))
