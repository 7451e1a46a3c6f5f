// Output allocation for the CPU kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fnevr {

// A fresh tensor to be written in full. A large fresh allocation costs one page fault per 4 KiB on
// first touch, which for outputs the size of FNeVR's activations takes longer than computing them;
// asking for transparent huge pages (where the system allows them on request) cuts that by up to 512x.
inline at::Tensor empty_for_writing(const at::Tensor& like) {
  at::Tensor t = at::empty_like(like);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHuge = std::uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<std::uintptr_t>(t.data_ptr());
  const std::uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const std::uintptr_t last = (begin + t.nbytes()) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice only
#endif
  return t;
}

}  // namespace fnevr
