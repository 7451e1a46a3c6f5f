// Host-side declarations of the fused MLP + compositing kernels and the argument checks both
// devices share.
//
// forward(color_code [R, D, Ec], shape_code [R, D, Es], params (14, see mlp_composite_math.h),
//         inclusive, activation) -> (features [R, H], weight_sum [R])
// backward(grad_features [R, H], grad_weight_sum [R], color_code, shape_code, params, inclusive,
//          activation) -> [grad_color_code, grad_shape_code, one grad per param]
// Everything contiguous, one dtype (fp16, bf16, fp32, fp64), one device.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>

#include <tuple>
#include <vector>

#include "mlp_composite_math.h"

namespace fnevr {

std::tuple<at::Tensor, at::Tensor> mlp_composite_forward_cpu(const at::Tensor& color_code, const at::Tensor& shape_code,
                                                             at::TensorList params, bool inclusive, int64_t activation);
std::vector<at::Tensor> mlp_composite_backward_cpu(const at::Tensor& grad_features, const at::Tensor& grad_weight_sum,
                                                   const at::Tensor& color_code, const at::Tensor& shape_code,
                                                   at::TensorList params, bool inclusive, int64_t activation);
std::tuple<at::Tensor, at::Tensor> mlp_composite_forward_cuda(const at::Tensor& color_code,
                                                              const at::Tensor& shape_code, at::TensorList params,
                                                              bool inclusive, int64_t activation);
std::vector<at::Tensor> mlp_composite_backward_cuda(const at::Tensor& grad_features, const at::Tensor& grad_weight_sum,
                                                    const at::Tensor& color_code, const at::Tensor& shape_code,
                                                    at::TensorList params, bool inclusive, int64_t activation);

// The Python layer validates user input with friendlier messages; these checks guard the kernels
// against direct calls of the torch.ops entry points. Returns the MLP's widths.
inline mlp::Dims check_mlp_composite_inputs(const at::Tensor& color_code, const at::Tensor& shape_code,
                                            at::TensorList params, int64_t activation) {
  TORCH_CHECK(color_code.dim() == 3 && shape_code.dim() == 3 && color_code.size(0) == shape_code.size(0) &&
                  color_code.size(1) == shape_code.size(1),
              "fnevr mlp_composite: color_code and shape_code must be [R, D, Ec] and [R, D, Es], got ",
              color_code.sizes(), " and ", shape_code.sizes());
  TORCH_CHECK(params.size() == mlp::kNumParams, "fnevr mlp_composite: expected ", int(mlp::kNumParams), " params, got ",
              params.size());
  const mlp::Dims dims{color_code.size(2), shape_code.size(2), params[mlp::kShapeInW].size(0),
                       params[mlp::kShapeFeatureW].size(0)};
  TORCH_CHECK(dims.Ec > 0 && dims.Es > 0 && dims.H > 0 && dims.H4 > 0,
              "fnevr mlp_composite: the MLP's widths must be positive");
  for (int p = 0; p < mlp::kNumParams; ++p) {
    const at::Tensor& t = params[p];
    const int64_t out = mlp::layer_out(dims, p), in = mlp::layer_in(dims, p);
    const std::vector<int64_t> want = mlp::is_weight(p) ? std::vector<int64_t>{out, in} : std::vector<int64_t>{out};
    TORCH_CHECK(t.sizes().equals(want), "fnevr mlp_composite: param ", p, " must be ", at::IntArrayRef(want),
                " (Linear layout, H=", dims.H, ", H4=", dims.H4, ", Ec=", dims.Ec, ", Es=", dims.Es, "), got ",
                t.sizes());
    TORCH_CHECK(t.scalar_type() == color_code.scalar_type() && t.device() == color_code.device() && t.is_contiguous(),
                "fnevr mlp_composite: param ", p, " must be contiguous with color_code's dtype and device");
  }
  TORCH_CHECK(shape_code.scalar_type() == color_code.scalar_type() && shape_code.device() == color_code.device(),
              "fnevr mlp_composite: color_code and shape_code must share dtype and device");
  TORCH_CHECK(color_code.is_contiguous() && shape_code.is_contiguous(),
              "fnevr mlp_composite: color_code and shape_code must be contiguous");
  TORCH_CHECK(activation == kNone || activation == kRelu || activation == kSoftplus,
              "fnevr mlp_composite: activation must be ", int(kNone), " (none), ", int(kRelu), " (relu) or ",
              int(kSoftplus), " (softplus), got ", activation);
  return dims;
}

inline void check_mlp_composite_grads(const at::Tensor& grad_features, const at::Tensor& grad_weight_sum,
                                      const at::Tensor& color_code, const mlp::Dims& dims) {
  const int64_t R = color_code.size(0);
  TORCH_CHECK(grad_features.dim() == 2 && grad_features.size(0) == R && grad_features.size(1) == dims.H,
              "fnevr mlp_composite: grad_features must be [R, H] = [", R, ", ", dims.H, "], got ",
              grad_features.sizes());
  TORCH_CHECK(grad_weight_sum.dim() == 1 && grad_weight_sum.size(0) == R,
              "fnevr mlp_composite: grad_weight_sum must be [R] = [", R, "], got ", grad_weight_sum.sizes());
  for (const at::Tensor* t : {&grad_features, &grad_weight_sum})
    TORCH_CHECK(
        t->scalar_type() == color_code.scalar_type() && t->device() == color_code.device() && t->is_contiguous(),
        "fnevr mlp_composite: the output grads must be contiguous with color_code's dtype and device");
}

// The gradients of an empty batch (R = 0 or D = 0): all zeros, in the inputs' shapes.
inline std::vector<at::Tensor> zero_mlp_composite_grads(const at::Tensor& color_code, const at::Tensor& shape_code,
                                                        at::TensorList params) {
  std::vector<at::Tensor> grads = {at::zeros_like(color_code), at::zeros_like(shape_code)};
  for (const at::Tensor& t : params) grads.push_back(at::zeros_like(t));
  return grads;
}

}  // namespace fnevr
