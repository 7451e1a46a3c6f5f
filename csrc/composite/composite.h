// Host-side declarations of the compositing kernels and the argument checks both devices share.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <tuple>

namespace fnevr {

// color [R, D, C], density [R, D], both contiguous, same dtype and device -> out [R, C].
at::Tensor composite_forward_cpu(const at::Tensor& color, const at::Tensor& density, bool inclusive,
                                 int64_t activation);
at::Tensor composite_forward_cuda(const at::Tensor& color, const at::Tensor& density, bool inclusive,
                                  int64_t activation);

// -> (grad_color [R, D, C], or an empty tensor when color_grad is false; grad_density [R, D]).
std::tuple<at::Tensor, at::Tensor> composite_backward_cpu(const at::Tensor& grad_out,
                                                          const at::Tensor& color,
                                                          const at::Tensor& density,
                                                          bool inclusive, int64_t activation,
                                                          bool color_grad);
std::tuple<at::Tensor, at::Tensor> composite_backward_cuda(const at::Tensor& grad_out,
                                                           const at::Tensor& color,
                                                           const at::Tensor& density,
                                                           bool inclusive, int64_t activation,
                                                           bool color_grad);

// The Python layer validates user input with friendlier messages; these checks guard the kernels
// against direct calls of the torch.ops entry points.
inline void check_composite_inputs(const at::Tensor& color, const at::Tensor& density,
                                   int64_t activation) {
  TORCH_CHECK(color.dim() == 3, "fnevr composite: color must be [R, D, C], got ", color.sizes());
  TORCH_CHECK(density.dim() == 2 && density.size(0) == color.size(0) &&
                  density.size(1) == color.size(1),
              "fnevr composite: density must be [R, D] = [", color.size(0), ", ", color.size(1),
              "], got ", density.sizes());
  TORCH_CHECK(color.scalar_type() == density.scalar_type(),
              "fnevr composite: color and density must have one dtype, got ", color.scalar_type(),
              " and ", density.scalar_type());
  TORCH_CHECK(color.device() == density.device(),
              "fnevr composite: color and density must be on one device, got ", color.device(),
              " and ", density.device());
  TORCH_CHECK(color.is_contiguous() && density.is_contiguous(),
              "fnevr composite: color and density must be contiguous");
  TORCH_CHECK(activation >= 0 && activation <= 2,
              "fnevr composite: activation must be 0 (relu), 1 (softplus) or 2 (none), got ",
              activation);
}

inline void check_composite_grad(const at::Tensor& grad_out, const at::Tensor& color) {
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == color.size(0) &&
                  grad_out.size(1) == color.size(2) && grad_out.is_contiguous(),
              "fnevr composite: grad_out must be contiguous [R, C] = [", color.size(0), ", ",
              color.size(2), "], got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == color.scalar_type() && grad_out.device() == color.device(),
              "fnevr composite: grad_out must match color's dtype and device");
}

}  // namespace fnevr
