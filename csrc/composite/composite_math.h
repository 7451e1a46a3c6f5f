// Per-ray volume-rendering math, shared by the CPU and CUDA kernels (and the ctest of it).
//
// One ray has D samples with densities sigma_i and colours c_i (C channels):
//   p_i   = act(sigma_i)                      act in {relu, softplus, none}
//   q_i   = exp(-p_i),  alpha_i = 1 - q_i
//   T_i   = prod_{j<i} q_j                    transmittance in front of sample i
//   w_i   = T_i * alpha_i                     exclusive: the paper's Eq. 3
//   w_i   = T_i * q_i * alpha_i               inclusive: what the published FNeVR code computes
//   out   = sum_i w_i c_i
// Backward, with g = dL/dout and e_i = <g, c_i>:
//   dL/dc_i = w_i g
//   dL/dp_i = e_i dw_i/dp_i - sum_{k>i} e_k w_k
// The transmittance is a running product of q (not exp of a running sum), so huge densities only
// drive it to an exact 0: no inf - inf and no NaN.
#pragma once

#include <cmath>

#include "../fnevr_hd.h"

namespace fnevr {
namespace composite {

// Values of the `density_activation` argument, as passed from Python.
enum Activation : int { kRelu = 0, kSoftplus = 1, kNone = 2 };

// PyTorch's softplus (beta 1) switches to the identity above this, and so do we, to match it.
constexpr double kSoftplusThreshold = 20.0;

FNEVR_HD float exp_(float x) { return expf(x); }
FNEVR_HD double exp_(double x) { return exp(x); }
FNEVR_HD float expm1_(float x) { return expm1f(x); }
FNEVR_HD double expm1_(double x) { return expm1(x); }
FNEVR_HD float log1p_(float x) { return log1pf(x); }
FNEVR_HD double log1p_(double x) { return log1p(x); }

// relu as torch.relu: NaN stays NaN (x > 0 ? x : 0 would make it 0), -inf gives 0.
template <typename T>
FNEVR_HD T activate(T x, int act) {
  if (act == kRelu) return x <= T(0) ? T(0) : x;
  if (act == kSoftplus) return x > T(kSoftplusThreshold) ? x : log1p_(exp_(x));
  return x;
}

// d act(x) / dx, with PyTorch's conventions: relu'(0) = 0, relu'(NaN) = 1, softplus' = 1 above the
// threshold.
template <typename T>
FNEVR_HD T activate_grad(T x, int act) {
  if (act == kRelu) return x <= T(0) ? T(0) : T(1);
  if (act == kSoftplus) {
    if (x > T(kSoftplusThreshold)) return T(1);
    const T z = exp_(x);
    return z / (z + T(1));
  }
  return T(1);
}

template <typename T>
struct SampleWeight {
  T w;      // compositing weight of the sample
  T dw_dp;  // its partial derivative in the sample's own (activated) density
};

// Walks one ray front to back and yields each sample's weight.
template <typename T>
struct RayMarcher {
  T transmittance;
  bool inclusive;

  FNEVR_HD explicit RayMarcher(bool inclusive_) : transmittance(T(1)), inclusive(inclusive_) {}

  FNEVR_HD SampleWeight<T> step(T p) {
    const T q = exp_(-p);
    const T alpha = -expm1_(-p);  // 1 - exp(-p), exact for small p
    const T t = transmittance;
    transmittance = t * q;
    if (inclusive) return {t * q * alpha, t * q * (T(2) * q - T(1))};
    return {t * alpha, t * q};
  }
};

// Backward bookkeeping along one ray. push() takes samples front to back and returns a partial
// value; once all are pushed, finish() turns each partial value into dL/dsigma_i. Keeping only a
// running prefix sum lets a kernel do the whole backward in a single front-to-back pass.
template <typename T>
struct GradScan {
  T prefix = T(0);  // sum_{k<=i} e_k w_k, after sample i

  FNEVR_HD T push(T e, const SampleWeight<T>& s) {
    prefix += e * s.w;
    return e * s.dw_dp + prefix;
  }
  // sum_{k>i} e_k w_k = total - prefix_i, through act at sigma_i. relu's is a select, as PyTorch's
  // threshold_backward: where relu is off a NaN or inf gradient gives 0 (times 0 would give NaN).
  FNEVR_HD T finish(T pushed, T sigma, int act) const {
    const T g = pushed - prefix;
    return act == kRelu ? (sigma <= T(0) ? T(0) : g) : g * activate_grad(sigma, act);
  }
};

}  // namespace composite
}  // namespace fnevr
