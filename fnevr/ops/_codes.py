"""The integer codes the Python ops pass to their kernels: one table for every op and backend.

csrc/common/codes.h (C++ and CUDA) and kernels/_common.py (Triton) hold the same values;
tests/test_codes.py checks that the three agree.
"""

from enum import IntEnum


class Activation(IntEnum):
    """An activation applied inside a fused op (composite's density, spade_norm's output)."""

    NONE = 0
    RELU = 1
    LEAKY_RELU = 2
    SOFTPLUS = 3


class Mode(IntEnum):
    """grid_sample's interpolation."""

    BILINEAR = 0
    NEAREST = 1


class Padding(IntEnum):
    """grid_sample's treatment of points outside the input."""

    ZEROS = 0
    BORDER = 1
    REFLECTION = 2
