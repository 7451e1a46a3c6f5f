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
#pragma once

#include <cmath>

#include "../fnevr_hd.h"

namespace fnevr {
namespace spade {

// Values of the `activation` argument, as passed from Python.
enum Activation : int { kNone = 0, kRelu = 1, kLeakyRelu = 2 };

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

// d act(z) / dz, with PyTorch's conventions at 0: relu'(0) = 0, leaky_relu'(0) = slope. Written as
// arithmetic on the comparison rather than as a choice: on random signs a branch mispredicts half
// the time, which costs a CPU loop several times its memory traffic.
template <typename T>
FNEVR_HD T activate_grad(T z, int act, T slope) {
  const T positive = static_cast<T>(z > T(0));
  if (act == kRelu) return positive;
  if (act == kLeakyRelu) return slope + (T(1) - slope) * positive;
  return T(1);
}

template <typename T>
FNEVR_HD T activate(T z, int act, T slope) {
  return act == kNone ? z : z * activate_grad(z, act, slope);  // both activations are z act'(z)
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

template <typename T>
FNEVR_HD ElementGrad<T> modulate_grad(T dy, T xhat, T g, T b, int act, T slope) {
  const T dz = dy * activate_grad(xhat * (T(1) + g) + b, act, slope);
  return {dz, dz * (T(1) + g)};
}

// dL/dx from dxhat and the group means c1 = mean(dxhat), c2 = mean(dxhat xhat) (0 in eval mode).
template <typename T>
FNEVR_HD T input_grad(T dxhat, T xhat, T rstd, T c1, T c2) {
  return rstd * (dxhat - c1 - xhat * c2);
}

}  // namespace spade
}  // namespace fnevr
