// The integer codes the Python ops pass to the kernels, one table for every op: the same values
// as fnevr/ops/_codes.py and kernels/_common.py (tests/test_codes.py checks that they agree).
#pragma once

namespace fnevr {

// An activation inside a fused op: composite's density (none, relu, softplus), spade_norm's output
// (none, relu, leaky_relu).
enum Activation : int { kNone = 0, kRelu = 1, kLeakyRelu = 2, kSoftplus = 3 };

// grid_sample's interpolation and padding.
enum Mode : int { kBilinear = 0, kNearest = 1 };
enum Padding : int { kZeros = 0, kBorder = 1, kReflection = 2 };

}  // namespace fnevr
