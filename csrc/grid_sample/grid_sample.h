// Host-side declarations of the grid-sampling kernels and the argument checks both devices share.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <tuple>

#include "common/codes.h"

namespace fnevr {

// input [N, C, H, W] (any strides; NCHW and channels_last are the fast ones), grid [N, Ho, Wo, 2]
// contiguous, one dtype and device -> out [N, C, Ho, Wo], channels_last where input is (and is not
// also contiguous), else contiguous.
at::Tensor grid_sample_forward_cpu(const at::Tensor& input, const at::Tensor& grid, int64_t mode, int64_t padding,
                                   bool align_corners);
at::Tensor grid_sample_forward_cuda(const at::Tensor& input, const at::Tensor& grid, int64_t mode, int64_t padding,
                                    bool align_corners);

// -> (grad_input like input, or an empty tensor when input_grad is false;
//     grad_grid like grid, or an empty tensor when grid_grad is false).
// The CPU kernel is always deterministic; the CUDA one when `deterministic` is set.
std::tuple<at::Tensor, at::Tensor> grid_sample_backward_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                                                            const at::Tensor& grid, int64_t mode, int64_t padding,
                                                            bool align_corners, bool input_grad, bool grid_grad,
                                                            bool deterministic);
std::tuple<at::Tensor, at::Tensor> grid_sample_backward_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                                                             const at::Tensor& grid, int64_t mode, int64_t padding,
                                                             bool align_corners, bool input_grad, bool grid_grad,
                                                             bool deterministic);

// The layout outputs and input gradients get: input's, where it is channels_last and not also
// plain contiguous (as fnevr/ops/grid_sample.py decides).
inline at::MemoryFormat grid_sample_memory_format(const at::Tensor& input) {
  return !input.is_contiguous() && input.is_contiguous(at::MemoryFormat::ChannelsLast) ? at::MemoryFormat::ChannelsLast
                                                                                       : at::MemoryFormat::Contiguous;
}

// The Python layer validates user input with friendlier messages; these checks guard the kernels
// against direct calls of the torch.ops entry points.
inline void check_grid_sample_inputs(const at::Tensor& input, const at::Tensor& grid, int64_t mode, int64_t padding) {
  TORCH_CHECK(input.dim() == 4, "fnevr grid_sample: input must be [N, C, H, W], got ", input.sizes());
  TORCH_CHECK(input.size(2) > 0 && input.size(3) > 0, "fnevr grid_sample: input must have non-empty H and W, got ",
              input.sizes());
  TORCH_CHECK(grid.dim() == 4 && grid.size(0) == input.size(0) && grid.size(3) == 2,
              "fnevr grid_sample: grid must be [N, Ho, Wo, 2] with N = ", input.size(0), ", got ", grid.sizes());
  TORCH_CHECK(grid.is_contiguous(), "fnevr grid_sample: grid must be contiguous");
  TORCH_CHECK(input.scalar_type() == grid.scalar_type(), "fnevr grid_sample: input and grid must have one dtype, got ",
              input.scalar_type(), " and ", grid.scalar_type());
  TORCH_CHECK(input.device() == grid.device(), "fnevr grid_sample: input and grid must be on one device, got ",
              input.device(), " and ", grid.device());
  TORCH_CHECK(mode == kBilinear || mode == kNearest, "fnevr grid_sample: mode must be ", int(kBilinear),
              " (bilinear) or ", int(kNearest), " (nearest), got ", mode);
  TORCH_CHECK(padding == kZeros || padding == kBorder || padding == kReflection, "fnevr grid_sample: padding must be ",
              int(kZeros), " (zeros), ", int(kBorder), " (border) or ", int(kReflection), " (reflection), got ",
              padding);
}

inline void check_grid_sample_grad(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& grid) {
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == input.size(0) && grad_out.size(1) == input.size(1) &&
                  grad_out.size(2) == grid.size(1) && grad_out.size(3) == grid.size(2),
              "fnevr grid_sample: grad_out must be [N, C, Ho, Wo] = [", input.size(0), ", ", input.size(1), ", ",
              grid.size(1), ", ", grid.size(2), "], got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type() && grad_out.device() == input.device(),
              "fnevr grid_sample: grad_out must match input's dtype and device");
}

}  // namespace fnevr
