// What the CUDA kernels share: the block size, the device check of an entry point's input, and
// the warp-level sum.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fnevr {

// Threads per block of the one-dimensional kernels (8 warps: enough to hide latency, few enough
// that a block's registers leave room for several blocks per multiprocessor).
constexpr int kThreads = 256;

// `t`, argument `name` of op `op`'s CUDA entry point, must be a CUDA tensor.
inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fnevr ", op, " (cuda): ", name, " must be a CUDA tensor, got ", t.device());
}

#if defined(__CUDACC__)
// Sums v over each aligned group of `width` lanes (a power of two, at most 32) by butterfly
// exchanges: every lane of a group gets the group's total, added in the same order on each.
template <typename T>
__device__ __forceinline__ T group_sum(T v, int width) {
  for (int offset = width >> 1; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}
#endif

}  // namespace fnevr
