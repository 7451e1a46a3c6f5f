// Host-side declarations of the compositing kernels and the argument checks both devices share.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <tuple>

#include "common/codes.h"

namespace fnevr {

// color [R, D, C], density [R, D], both contiguous, same dtype and device -> out [R, C].
at::Tensor composite_forward_cpu(const at::Tensor& color, const at::Tensor& density, bool inclusive,
                                 int64_t activation);
at::Tensor composite_forward_cuda(const at::Tensor& color, const at::Tensor& density, bool inclusive,
                                  int64_t activation);

// -> (grad_color [R, D, C], or an empty tensor when color_grad is false; grad_density [R, D]).
std::tuple<at::Tensor, at::Tensor> composite_backward_cpu(const at::Tensor& grad_out, const at::Tensor& color,
                                                          const at::Tensor& density, bool inclusive, int64_t activation,
                                                          bool color_grad);
std::tuple<at::Tensor, at::Tensor> composite_backward_cuda(const at::Tensor& grad_out, const at::Tensor& color,
                                                           const at::Tensor& density, bool inclusive,
                                                           int64_t activation, bool color_grad);

// The Python layer validates user input with friendlier messages; these checks guard the kernels
// against direct calls of the torch.ops entry points.
inline void check_composite_inputs(const at::Tensor& color, const at::Tensor& density, int64_t activation) {
  TORCH_CHECK(color.dim() == 3, "fnevr composite: color must be [R, D, C], got ", color.sizes());
  TORCH_CHECK(density.dim() == 2 && density.size(0) == color.size(0) && density.size(1) == color.size(1),
              "fnevr composite: density must be [R, D] = [", color.size(0), ", ", color.size(1), "], got ",
              density.sizes());
  TORCH_CHECK(color.scalar_type() == density.scalar_type(),
              "fnevr composite: color and density must have one dtype, got ", color.scalar_type(), " and ",
              density.scalar_type());
  TORCH_CHECK(color.device() == density.device(), "fnevr composite: color and density must be on one device, got ",
              color.device(), " and ", density.device());
  TORCH_CHECK(color.is_contiguous() && density.is_contiguous(),
              "fnevr composite: color and density must be contiguous");
  TORCH_CHECK(activation == kNone || activation == kRelu || activation == kSoftplus,
              "fnevr composite: activation must be ", int(kNone), " (none), ", int(kRelu), " (relu) or ",
              int(kSoftplus), " (softplus), got ", activation);
}

// The backward entry points' inputs: the forward's, and grad_out [R, C].
inline void check_composite_backward_inputs(const at::Tensor& grad_out, const at::Tensor& color,
                                            const at::Tensor& density, int64_t activation) {
  check_composite_inputs(color, density, activation);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == color.size(0) && grad_out.size(1) == color.size(2) &&
                  grad_out.is_contiguous(),
              "fnevr composite: grad_out must be contiguous [R, C] = [", color.size(0), ", ", color.size(2), "], got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == color.scalar_type() && grad_out.device() == color.device(),
              "fnevr composite: grad_out must match color's dtype and device");
}

}  // namespace fnevr
