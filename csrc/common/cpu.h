// What the CPU kernels share: the vectorisable dot product and the task size of at::parallel_for.
#pragma once

#include <algorithm>
#include <cstdint>

namespace fnevr {

// sum_k a[k] b[k] in acc_t, with eight independent partial sums so the compiler vectorises it
// without -ffast-math (the order of the additions is fixed, so results are reproducible).
template <typename acc_t, typename A, typename B>
acc_t dot(const A* a, const B* b, int64_t n) {
  acc_t part[8] = {};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int j = 0; j < 8; ++j) part[j] += static_cast<acc_t>(a[k + j]) * static_cast<acc_t>(b[k + j]);
  for (; k < n; ++k) part[0] += static_cast<acc_t>(a[k]) * static_cast<acc_t>(b[k]);
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// The grain of at::parallel_for over items of `item_work` elements each: enough items that a task
// does about `task_work` elements' work, which amortises its scheduling (at least one).
inline int64_t grain_size(int64_t item_work, int64_t task_work) {
  return std::max<int64_t>(1, task_work / std::max<int64_t>(1, item_work));
}

}  // namespace fnevr
