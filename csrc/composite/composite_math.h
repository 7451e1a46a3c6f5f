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
//   dL/dp_i = e_i T_i q_i - sum_{k>i} e_k w_k          exclusive
//   dL/dp_i = e_i T_i q_i^2 - sum_{k>=i} e_k w_k       inclusive
// (the first term through alpha_i, the sum through the transmittances p_i is part of, in the
// reference's cumsum). The transmittance is a running product of q (not exp of a running sum), so
// huge densities only drive it to an exact 0: no inf - inf and no NaN.
//
// Non-finite values (NaN, inf in a density, colour or gradient) come out as from the reference's
// autograd: NaN exactly where its values are NaN, +-inf where they are +-inf. Whether a product or
// sum of given terms is NaN or inf does not depend on their order, so the terms are kept as the
// reference has them: the inclusive form's e_i w_i stays in the sum rather than in e_i dw_i/dp_i
// (inf - inf is NaN, inf (T q^2 - w) is not), and the sums over k > i are never formed as
// total - prefix (inf - inf again), see GradScan.
#pragma once

#include <cmath>

#include "common/codes.h"
#include "common/hd.h"

namespace fnevr {
namespace composite {

// The density activations (fnevr::Activation): none, relu or softplus.
using fnevr::kNone;
using fnevr::kRelu;
using fnevr::kSoftplus;

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
  T w;         // compositing weight of the sample
  T dw_alpha;  // dw/dp through its alpha: T q (exclusive), T q^2 (inclusive; dw/dp is that - w)
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
    if (inclusive) return {t * q * alpha, t * q * q};
    return {t * alpha, t * q};
  }
};

// Backward bookkeeping along one ray, in a single front-to-back pass: push() takes the samples in
// order and returns a partial value each, which the caller keeps (partial[i]); once all are
// pushed, finish() turns each into dL/dsigma_i. The sums over k > i (k >= i inclusive) of e_k w_k
// are total - prefix_i over the finite terms only. A NaN or inf e_k w_k is not summed (total -
// prefix would then be inf - inf in every sample behind it, where the reference's reversed cumsum
// leaves them finite): push() hands it back as `taken`, and take_off() subtracts it from the
// partial values of the samples whose sums hold it, before k (inclusive: k's own already has it).
// A finite ray costs a compare per sample and no state; the loop runs only for non-finite terms.
template <typename T>
struct GradScan {
  bool inclusive;
  T prefix = T(0);  // sum of the finite e_k w_k pushed so far

  FNEVR_HD explicit GradScan(bool inclusive_) : inclusive(inclusive_) {}

  // Sample i's partial value; taken: its e_i w_i where that is NaN or inf, else 0.
  FNEVR_HD T push(T e, const SampleWeight<T>& s, T& taken) {
    const T ew = e * s.w;
    const bool finite = ew - ew == T(0);  // (no fast-math here)
    taken = finite ? T(0) : ew;
    const T own = e * s.dw_alpha;
    if (inclusive) {  // minus, in finish(), sum_{k>=i}: the finite ones of total - prefix_{i-1}
      const T partial = own + prefix - taken;
      if (finite) prefix += ew;
      return partial;
    }
    if (finite) prefix += ew;  // minus, in finish(), sum_{k>i}: total - prefix_i
    return own + prefix;
  }
  // dL/dsigma_i from sample i's partial value, through act at sigma_i. relu's is a select, as
  // PyTorch's threshold_backward: where relu is off a NaN or inf gradient gives 0 (times 0 would
  // give NaN).
  FNEVR_HD T finish(T partial, T sigma, int act) const {
    const T g = partial - prefix;
    return act == kRelu ? (sigma <= T(0) ? T(0) : g) : g * activate_grad(sigma, act);
  }
};

// The loop of take_off, out of line on a GPU: inlined into a kernel's unrolled sample loop it holds
// registers in the common path (finite rays), where it never runs.
#if defined(__CUDACC__) || defined(__HIPCC__)
template <typename T, typename I>
__host__ __device__ __noinline__ void take_off_loop(T* partial, I i, T taken) {
#else
template <typename T, typename I>
inline void take_off_loop(T* partial, I i, T taken) {
#endif
  for (I j = 0; j < i; ++j) partial[j] -= taken;
}

// After push() of sample i: a non-finite e_i w_i (taken != 0; NaN != 0 too) off the partial values
// of samples 0..i-1, whose sums hold it.
template <typename T, typename I>
FNEVR_HD void take_off(T* partial, I i, T taken) {
  if (taken != T(0)) take_off_loop(partial, i, taken);
}

}  // namespace composite
}  // namespace fnevr
