"""Memory layouts the fused kernels handle directly."""

import torch
from torch import Tensor


def is_channels_last(t: Tensor) -> bool:
    """The layout the kernels keep: channels_last, unless ``t`` is (also) plain contiguous."""
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
