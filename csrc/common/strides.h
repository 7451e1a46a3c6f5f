// Element strides of a 4-D tensor [N, C, H, W], read once for the kernels' index arithmetic.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fnevr {

struct Strides {
  int64_t n, c, h, w;
};

inline Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

}  // namespace fnevr
