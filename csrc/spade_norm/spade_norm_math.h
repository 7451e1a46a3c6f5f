// Per-element and per-group SPADE-normalisation math, shared by the CPU and CUDA kernels (and the
// ctest of it).
//
// For one normalisation group (a (sample, channel) pair for instance norm, a channel for batch norm)
// with mean m and biased variance v over its elements, and per-element modulation g (gamma), b (beta):
//   r    = 1 / sqrt(v + eps)
//   xhat = (x - m) r
//   z    = xhat (1 + g) + b
//   y    = act(z)                            act in {none, relu, leaky_relu}
// Backward, with dy = dL/dy:
//   dz    = dy act'(z)
//   dg    = dz xhat,   db = dz,   dxhat = dz (1 + g)
//   dx    = r (dxhat - mean(dxhat) - xhat mean(dxhat xhat))      (means over the group)
// Eval-mode batch norm uses fixed statistics, so the two group means drop out of dx.
//
// Statistics are merged from partial (count, mean, M2) triples (Chan et al.), each partial taken
// around its own mean, so a large common offset never cancels catastrophically.
//
// A GPU reduction with few groups (channels_last, batch norm) is cut into pieces (Split) whose
// partial results a second pass merges in a fixed order.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/codes.h"
#include "common/hd.h"

namespace fnevr {
namespace spade {

// The output activations (fnevr::Activation): none, relu or leaky_relu.
using fnevr::kLeakyRelu;
using fnevr::kNone;
using fnevr::kRelu;

FNEVR_HD float rsqrt_(float x) {
#if defined(__CUDA_ARCH__)
  return rsqrtf(x);
#else
  return 1.0f / std::sqrt(x);
#endif
}
FNEVR_HD double rsqrt_(double x) {
#if defined(__CUDA_ARCH__)
  return rsqrt(x);
#else
  return 1.0 / std::sqrt(x);
#endif
}

// Count, mean and sum of squared deviations from the mean of some elements.
template <typename T>
struct Moments {
  T n = T(0), mean = T(0), m2 = T(0);

  // The moments of n elements from the sums s1 of their deviations from `shift` (a value near their
  // mean) and s2 of the squared deviations: the corrected two-pass formula, whose s1 term takes the
  // shift's own error back out. Rounding can make M2 slightly negative: clamped to 0, while a NaN
  // stays NaN (std::max(0, NaN) would give 0).
  FNEVR_HD static Moments from_shifted_sums(T n, T shift, T s1, T s2) {
    Moments m;
    m.n = n;
    m.mean = shift + s1 / n;
    const T m2 = s2 - s1 * s1 / n;
    m.m2 = m2 < T(0) ? T(0) : m2;
    return m;
  }
  // Welford's update with one element.
  FNEVR_HD void push(T x) {
    n += T(1);
    const T d = x - mean;
    mean += d / n;
    m2 += d * (x - mean);
  }
  // Chan's merge of two disjoint partials.
  FNEVR_HD void merge(const Moments& o) {
    if (o.n == T(0)) return;
    if (n == T(0)) {
      *this = o;
      return;
    }
    const T total = n + o.n;
    const T d = o.mean - mean;
    const T w = o.n / total;
    mean += d * w;
    m2 += o.m2 + d * d * n * w;
    n = total;
  }
  FNEVR_HD T var() const { return n > T(0) ? m2 / n : T(0); }  // biased, as normalisation uses
};

// How a reduction over N samples x S positions (per group) is cut into pieces for a GPU: piece p
// covers the samples of sample group p % groups (per_group of them, fewer in the last group) and the
// positions of chunk p / groups (chunk of them, fewer in the last chunk). Every (sample, position)
// lies in exactly one piece, and no piece is empty.
struct Split {
  int64_t groups, per_group, chunk, chunks;

  FNEVR_HD int64_t pieces() const { return groups * chunks; }
  FNEVR_HD int64_t sample_begin(int64_t p) const { return (p % groups) * per_group; }
  FNEVR_HD int64_t sample_end(int64_t p, int64_t N) const {
    const int64_t e = sample_begin(p) + per_group;
    return e < N ? e : N;
  }
  FNEVR_HD int64_t position_begin(int64_t p) const { return (p / groups) * chunk; }
  FNEVR_HD int64_t position_end(int64_t p, int64_t S) const {
    const int64_t e = position_begin(p) + chunk;
    return e < S ? e : S;
  }
};

// The Split that gives about `target` blocks when each piece takes `columns` blocks (channel tiles),
// with chunks a multiple of `step` positions (the least worth a block of its own). Instance norm
// (batch false; also the backward's per-(n, c) sums) keeps each sample to itself; batch norm groups
// samples first, then cuts positions. N, S >= 1. (kernels/spade_norm.py's _split does the same for
// Triton.)
inline Split plan_split(int64_t N, int64_t S, int64_t columns, int64_t target, int64_t step, bool batch) {
  auto cdiv = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  auto clamp1 = [](int64_t v) { return v < 1 ? int64_t(1) : v; };
  Split s{N, 1, 0, 0};
  if (batch) {
    const int64_t want = clamp1(target / clamp1(columns));
    s.per_group = cdiv(N, clamp1(want < N ? want : N));
    s.groups = cdiv(N, s.per_group);
  }
  const int64_t steps = clamp1(cdiv(S, step));
  int64_t want = clamp1(target / clamp1(s.groups * columns));
  want = want < steps ? want : steps;
  const int64_t per_chunk = cdiv(steps, want);
  s.chunk = per_chunk * step;
  s.chunks = cdiv(steps, per_chunk);
  return s;
}

// d act(z) / dz, with PyTorch's conventions at 0: relu'(0) = 0, leaky_relu'(0) = slope; and at NaN
// (its backward passes grad where not z <= 0, leaky_relu's scales it where not z > 0): relu'(NaN) = 1,
// leaky_relu'(NaN) = slope. Written as arithmetic on the comparison rather than as a choice: on
// random signs a branch mispredicts half the time, which costs a CPU loop several times its memory
// traffic.
template <typename T>
FNEVR_HD T activate_grad(T z, int act, T slope) {
  if (act == kRelu) return static_cast<T>(!(z <= T(0)));
  if (act == kLeakyRelu) return slope + (T(1) - slope) * static_cast<T>(z > T(0));
  return T(1);
}

// act(z): relu(NaN) = NaN and relu(-inf) = 0 as torch.relu (z relu'(z) would give NaN for -inf); a
// select, which compilers vectorise without a branch. leaky_relu is z leaky_relu'(z).
template <typename T>
FNEVR_HD T activate(T z, int act, T slope) {
  if (act == kRelu) return z <= T(0) ? T(0) : z;
  return act == kNone ? z : z * activate_grad(z, act, slope);
}

template <typename T>
FNEVR_HD T normalise(T x, T mean, T rstd) {
  return (x - mean) * rstd;
}

// Forward of one element: act(xhat (1 + g) + b).
template <typename T>
FNEVR_HD T modulate(T xhat, T g, T b, int act, T slope) {
  return activate(xhat * (T(1) + g) + b, act, slope);
}

// Backward of one element up to the group statistics.
template <typename T>
struct ElementGrad {
  T dz;     // dL/dz = dL/dbeta
  T dxhat;  // dz (1 + g)
};

// dL/dz = dy act'(z). For relu a select, as PyTorch's threshold_backward: where relu is off, a NaN
// or inf dy gives 0 (dy * 0 would give NaN); leaky_relu multiplies, as PyTorch's does.
template <typename T>
FNEVR_HD ElementGrad<T> modulate_grad(T dy, T xhat, T g, T b, int act, T slope) {
  const T z = xhat * (T(1) + g) + b;
  const T dz = act == kRelu ? (z <= T(0) ? T(0) : dy) : dy * activate_grad(z, act, slope);
  return {dz, dz * (T(1) + g)};
}

// dL/dx from dxhat and the group means c1 = mean(dxhat), c2 = mean(dxhat xhat) (0 in eval mode).
template <typename T>
FNEVR_HD T input_grad(T dxhat, T xhat, T rstd, T c1, T c2) {
  return rstd * (dxhat - c1 - xhat * c2);
}

}  // namespace spade
}  // namespace fnevr
