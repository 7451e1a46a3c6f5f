// Per-sample math of the fused MLP + compositing op, shared by the CPU and CUDA kernels (and the
// ctest of it). Torch-free.
//
// The MLP (fnevr/ops/mlp_composite.py; rho = ReLU, widths Es, Ec, H, H4):
//   a0 = rho(Wsi s + bsi) [H]     a1 = rho(Wsh a0 + bsh) [H]     sigma = wd . a1 + bd
//   a2 = rho(Wsf a1 + bsf) [H4]   a3 = rho(Wci c + bci) [H]
//   a4 = rho(Wf [a2; a3] + bf) [H]                              h = rho(Wfh a4 + bfh) [H]
// and per ray, over its D samples, compositing as in composite_math.h:
//   F = sum_i w_i h_i,  S = sum_i w_i.
// Backward per ray, with gF = dL/dF and gS = dL/dS:
//   e_i = <gF, h_i> + gS,  dL/dsigma_i from GradScan,  dL/dh_i = w_i gF,
// then ordinary backprop through the layers (ReLU masks from the recomputed activations).
//
// What lives here: the parameter table (which tensor is which, its shape, its place in a flat
// gradient buffer), the ReLU helpers, and compositing of one ray given its densities (forward) or
// its densities and e_i (backward). The layers themselves are matrix products that each kernel
// tiles for its own hardware.
#pragma once

#include <cstdint>

#include "common/codes.h"
#include "common/hd.h"
#include "composite/composite_math.h"

namespace fnevr {
namespace mlp {

// The 14 parameters in the order of fnevr.ops.mlp_composite.PARAMETERS: seven Linear layers
// (weight [out, in], bias [out]), weight then bias.
enum Param : int {
  kShapeInW,
  kShapeInB,  // Es -> H
  kShapeHiddenW,
  kShapeHiddenB,  // H -> H
  kDensityW,
  kDensityB,  // H -> 1
  kShapeFeatureW,
  kShapeFeatureB,  // H -> H4
  kColorInW,
  kColorInB,  // Ec -> H
  kFuseW,
  kFuseB,  // H4 + H -> H
  kFuseHiddenW,
  kFuseHiddenB,  // H -> H
  kNumParams
};

// One tile's activations and per-sample values, carved in this order out of one buffer (a CPU
// thread's workspace, a CUDA block's shared memory). Rows of the [rows, width] buffers are a pitch
// apart: ps (s), pc (c), ph (the [rows, H] buffers), ph4 (a2). In backward each buffer later holds
// its activation's gradient.
template <typename T>
struct TileBuffers {
  T *s, *c;                   // shape code [rows, Es], colour code [rows, Ec]
  T *a0, *a1, *a2, *a3, *a4;  // the layers' outputs: [rows, H], except a2 [rows, H4]
  T* h;                       // fuse_hidden's output [rows, H]
  T *sigma, *w, *e;           // per sample: density, compositing weight, dL/dw then dL/dsigma

  // Points the buffers into p, which holds rows * (ps + pc + 5 ph + ph4 + 3) values; returns the
  // first value past them.
  template <typename I>
  FNEVR_HD T* carve(T* p, I rows, I ps, I pc, I ph, I ph4) {
    s = p, p += rows * ps;
    c = p, p += rows * pc;
    a0 = p, p += rows * ph;
    a1 = p, p += rows * ph;
    a2 = p, p += rows * ph4;
    a3 = p, p += rows * ph;
    a4 = p, p += rows * ph;
    h = p, p += rows * ph;
    sigma = p, p += rows;
    w = p, p += rows;
    e = p, p += rows;
    return p;
  }
};

struct Dims {
  int64_t Ec, Es, H, H4;
};

// Output and input width of the Linear layer that parameter p belongs to.
FNEVR_HD int64_t layer_out(const Dims& d, int p) {
  switch (p / 2) {
    case kDensityW / 2:
      return 1;
    case kShapeFeatureW / 2:
      return d.H4;
    default:
      return d.H;
  }
}
FNEVR_HD int64_t layer_in(const Dims& d, int p) {
  switch (p / 2) {
    case kShapeInW / 2:
      return d.Es;
    case kColorInW / 2:
      return d.Ec;
    case kFuseW / 2:
      return d.H4 + d.H;
    default:
      return d.H;
  }
}
FNEVR_HD bool is_weight(int p) { return p % 2 == 0; }
FNEVR_HD int64_t param_numel(const Dims& d, int p) {
  return is_weight(p) ? layer_out(d, p) * layer_in(d, p) : layer_out(d, p);
}
// Where parameter p's gradient starts in a flat buffer holding all 14 back to back, each in its
// tensor's own (row-major) layout.
FNEVR_HD int64_t param_offset(const Dims& d, int p) {
  int64_t offset = 0;
  for (int q = 0; q < p; ++q) offset += param_numel(d, q);
  return offset;
}
FNEVR_HD int64_t num_param_elements(const Dims& d) { return param_offset(d, kNumParams); }

// As torch.relu: NaN stays NaN (x > 0 ? x : 0 would make it 0).
template <typename T>
FNEVR_HD T relu(T x) {
  return x <= T(0) ? T(0) : x;
}
// The gradient through y = relu(z), given dL/dy and y, as PyTorch's threshold_backward: a select
// (relu'(0) = 0; where y is NaN the gradient passes, where y is 0 a NaN gradient gives 0).
template <typename T>
FNEVR_HD T relu_backward(T grad, T y) {
  return y <= T(0) ? T(0) : grad;
}

// Forward compositing of one ray: the weights w[0..D) of its samples from their raw densities
// sigma[0..D); returns their sum (the ray's weight_sum).
template <typename T>
FNEVR_HD T ray_weights(const T* sigma, int64_t D, bool inclusive, int act, T* w) {
  composite::RayMarcher<T> march(inclusive);
  T sum = T(0);
  for (int64_t i = 0; i < D; ++i) {
    w[i] = march.step(composite::activate(sigma[i], act)).w;
    sum += w[i];
  }
  return sum;
}

// Backward compositing of one ray: from the densities sigma[0..D) and e[0..D) (e_i = dL/dw_i,
// i.e. <gF, h_i> + gS), the weights w[0..D) and dL/dsigma[0..D). dsigma may alias e.
template <typename T>
FNEVR_HD void ray_backward(const T* sigma, const T* e, int64_t D, bool inclusive, int act, T* w, T* dsigma) {
  composite::RayMarcher<T> march(inclusive);
  composite::GradScan<T> scan(inclusive);
  for (int64_t i = 0; i < D; ++i) {
    const composite::SampleWeight<T> s = march.step(composite::activate(sigma[i], act));
    w[i] = s.w;
    T taken;
    dsigma[i] = scan.push(e[i], s, taken);  // partial value until the ray's total is known
    composite::take_off(dsigma, i, taken);
  }
  for (int64_t i = 0; i < D; ++i) dsigma[i] = scan.finish(dsigma[i], sigma[i], act);
}

}  // namespace mlp
}  // namespace fnevr
