// Host-side declarations of the SPADE-normalisation kernels and the argument checks both devices
// share.
//
// The kernels see x as a contiguous [N, C, S] (NCHW, S = H W) or [N, S, C] (channels_last) tensor.
// gamma and beta are either full size in x's layout or [N, C] (constant over S). Statistics (mean and
// biased variance, fp32, or fp64 for fp64 x) are [N, C] for instance norm and [C] for batch norm; the
// kernels tell the two apart by their rank.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <tuple>
#include <type_traits>

#include "common/codes.h"

namespace fnevr {

// -> (mean, var) per (n, c) (batch false) or per c (batch true).
std::tuple<at::Tensor, at::Tensor> spade_norm_stats_cpu(const at::Tensor& x, bool channels_last, bool batch);
std::tuple<at::Tensor, at::Tensor> spade_norm_stats_cuda(const at::Tensor& x, bool channels_last, bool batch);

// -> y = act(xhat (1 + gamma) + beta), like x.
at::Tensor spade_norm_forward_cpu(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                                  const at::Tensor& mean, const at::Tensor& var, double eps, bool channels_last,
                                  int64_t activation, double slope);
at::Tensor spade_norm_forward_cuda(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                                   const at::Tensor& mean, const at::Tensor& var, double eps, bool channels_last,
                                   int64_t activation, double slope);

// -> [4, N, C] per-(n, c) sums of dxhat, dxhat xhat, dz and dz xhat (in the statistics' dtype).
at::Tensor spade_norm_backward_reduce_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& gamma,
                                          const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var,
                                          double eps, bool channels_last, int64_t activation, double slope);
at::Tensor spade_norm_backward_reduce_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& gamma,
                                           const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var,
                                           double eps, bool channels_last, int64_t activation, double slope);

// group_sums [2, *mean.shape]: per-group sums of dxhat and dxhat xhat, times `scale` (1 / group size,
// 0 when the statistics are constants) giving their means. -> (dx like x; dgamma, dbeta like x when
// asked for, else empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor> spade_norm_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& group_sums, double scale, double eps,
    bool channels_last, int64_t activation, double slope, bool gamma_grad, bool beta_grad);
std::tuple<at::Tensor, at::Tensor, at::Tensor> spade_norm_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& group_sums, double scale, double eps,
    bool channels_last, int64_t activation, double slope, bool gamma_grad, bool beta_grad);

// Instance norm of an NCHW x, fused one (n, c) row at a time (CPU only; Triton has its own):
// -> (y, mean, var), and backward -> (dx; dgamma, dbeta shaped like gamma, beta when asked for, else empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor> spade_norm_instance_forward_cpu(const at::Tensor& x,
                                                                               const at::Tensor& gamma,
                                                                               const at::Tensor& beta, double eps,
                                                                               int64_t activation, double slope);
std::tuple<at::Tensor, at::Tensor, at::Tensor> spade_norm_instance_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
    const at::Tensor& mean, const at::Tensor& var, double eps, int64_t activation, double slope, bool gamma_grad,
    bool beta_grad);

// The Python layer validates user input with friendlier messages; these checks guard the kernels
// against direct calls of the torch.ops entry points.
struct SpadeShape {
  int64_t N, C, S;
  bool channels_last, batch;
};

inline SpadeShape check_spade_x(const at::Tensor& x, bool channels_last) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(),
              "fnevr spade_norm: x must be a contiguous [N, C, S] or [N, S, C] "
              "tensor, got sizes ",
              x.sizes(), (x.is_contiguous() ? "" : " (not contiguous)"));
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "fnevr spade_norm: x must be floating point, got ", x.scalar_type());
  const int64_t C = channels_last ? x.size(2) : x.size(1), S = channels_last ? x.size(1) : x.size(2);
  return {x.size(0), C, S, channels_last, false};
}

inline at::ScalarType spade_stats_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline SpadeShape check_spade_inputs(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                                     const at::Tensor& mean, const at::Tensor& var, bool channels_last,
                                     int64_t activation) {
  SpadeShape s = check_spade_x(x, channels_last);
  for (const auto* t : {&gamma, &beta}) {
    const bool full = t->sizes() == x.sizes();
    const bool per_nc = t->dim() == 2 && t->size(0) == s.N && t->size(1) == s.C;
    TORCH_CHECK(full || per_nc, "fnevr spade_norm: gamma and beta must be ", x.sizes(), " or [", s.N, ", ", s.C,
                "], got ", t->sizes());
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                "fnevr spade_norm: gamma and beta must be contiguous, with x's dtype and device");
  }
  s.batch = mean.dim() == 1;
  const bool shape_ok = s.batch ? mean.size(0) == s.C : (mean.dim() == 2 && mean.size(0) == s.N && mean.size(1) == s.C);
  TORCH_CHECK(shape_ok && var.sizes() == mean.sizes(), "fnevr spade_norm: mean and var must be [", s.C, "] or [", s.N,
              ", ", s.C, "], got ", mean.sizes(), " and ", var.sizes());
  for (const auto* t : {&mean, &var})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == spade_stats_type(x) && t->device() == x.device(),
                "fnevr spade_norm: mean and var must be contiguous ", spade_stats_type(x), " on x's device");
  TORCH_CHECK(activation == kNone || activation == kRelu || activation == kLeakyRelu,
              "fnevr spade_norm: activation must be ", int(kNone), " (none), ", int(kRelu), " (relu) or ",
              int(kLeakyRelu), " (leaky_relu), got ", activation);
  return s;
}

inline void check_spade_grad(const at::Tensor& grad_y, const at::Tensor& x) {
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.is_contiguous() && grad_y.scalar_type() == x.scalar_type() &&
                  grad_y.device() == x.device(),
              "fnevr spade_norm: grad_y must be contiguous ", x.sizes(), " with x's dtype and device, got ",
              grad_y.sizes());
}

inline void check_spade_group_sums(const at::Tensor& group_sums, const at::Tensor& mean) {
  TORCH_CHECK(group_sums.dim() == mean.dim() + 1 && group_sums.size(0) == 2 &&
                  group_sums.sizes().slice(1) == mean.sizes() && group_sums.is_contiguous() &&
                  group_sums.scalar_type() == mean.scalar_type() && group_sums.device() == mean.device(),
              "fnevr spade_norm: group_sums must be contiguous [2, ", mean.sizes(), "] like mean, got ",
              group_sums.sizes());
}

// Calls f with the activation code as a compile-time constant, so the kernels' inner loops have no
// branch on it (the CPU and CUDA entry points dispatch through it).
template <typename F>
void with_activation(int64_t act, F&& f) {
  switch (act) {
    case kRelu:
      f(std::integral_constant<int, kRelu>{});
      break;
    case kLeakyRelu:
      f(std::integral_constant<int, kLeakyRelu>{});
      break;
    default:
      f(std::integral_constant<int, kNone>{});
      break;
  }
}

// The general backward entry points' inputs: the forward's, grad_y like x, group_sums like mean;
// these kernels write full-size gamma/beta gradients only ([N, C] ones are reduce's sums).
inline SpadeShape check_spade_backward_inputs(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& gamma,
                                              const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var,
                                              const at::Tensor& group_sums, bool channels_last, int64_t activation,
                                              bool gamma_grad, bool beta_grad) {
  const SpadeShape s = check_spade_inputs(x, gamma, beta, mean, var, channels_last, activation);
  check_spade_grad(grad_y, x);
  check_spade_group_sums(group_sums, mean);
  TORCH_CHECK(!(gamma_grad && gamma.dim() != 3) && !(beta_grad && beta.dim() != 3),
              "fnevr spade_norm: the backward kernel writes full-size gamma/beta gradients only");
  return s;
}

}  // namespace fnevr
