// Compositing on the CPU: rays are split across threads; each ray is one front-to-back pass.
#include "common/cpu.h"
#include "common/cpu_memory.h"
#include "composite.h"
#include "composite_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fnevr {
namespace {

using composite::GradScan;
using composite::RayMarcher;

constexpr int64_t kTaskWork = 32768;  // samples x channels per task

template <typename scalar_t>
void forward_rays(const scalar_t* color, const scalar_t* density, scalar_t* out, int64_t R, int64_t D, int64_t C,
                  bool inclusive, int act) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, R, grain_size(D * C, kTaskWork), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(C);
    for (int64_t r = begin; r < end; ++r) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      RayMarcher<acc_t> march(inclusive);
      for (int64_t i = 0; i < D; ++i) {
        const acc_t w = march.step(composite::activate(static_cast<acc_t>(density[r * D + i]), act)).w;
        const scalar_t* c = color + (r * D + i) * C;
        for (int64_t k = 0; k < C; ++k) acc[k] += w * static_cast<acc_t>(c[k]);
      }
      scalar_t* o = out + r * C;
      for (int64_t k = 0; k < C; ++k) o[k] = static_cast<scalar_t>(acc[k]);
    }
  });
}

template <typename scalar_t>
void backward_rays(const scalar_t* grad_out, const scalar_t* color, const scalar_t* density, scalar_t* grad_color,
                   scalar_t* grad_density, int64_t R, int64_t D, int64_t C, bool inclusive, int act) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, R, grain_size(D * C, kTaskWork), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> g(C);
    std::vector<acc_t> pushed(D);
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t k = 0; k < C; ++k) g[k] = static_cast<acc_t>(grad_out[r * C + k]);
      RayMarcher<acc_t> march(inclusive);
      GradScan<acc_t> scan(inclusive);
      for (int64_t i = 0; i < D; ++i) {
        const auto s = march.step(composite::activate(static_cast<acc_t>(density[r * D + i]), act));
        const scalar_t* c = color + (r * D + i) * C;
        acc_t taken;
        pushed[i] = scan.push(dot<acc_t>(g.data(), c, C), s, taken);
        composite::take_off(pushed.data(), i, taken);
        if (grad_color != nullptr) {
          scalar_t* __restrict__ gc = grad_color + (r * D + i) * C;
          const acc_t* __restrict__ gr = g.data();
          for (int64_t k = 0; k < C; ++k) gc[k] = static_cast<scalar_t>(s.w * gr[k]);
        }
      }
      for (int64_t i = 0; i < D; ++i) {
        const acc_t sigma = static_cast<acc_t>(density[r * D + i]);
        grad_density[r * D + i] = static_cast<scalar_t>(scan.finish(pushed[i], sigma, act));
      }
    }
  });
}

}  // namespace

at::Tensor composite_forward_cpu(const at::Tensor& color, const at::Tensor& density, bool inclusive,
                                 int64_t activation) {
  check_composite_inputs(color, density, activation);
  const int64_t R = color.size(0), D = color.size(1), C = color.size(2);
  at::Tensor out = at::empty({R, C}, color.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, color.scalar_type(), "composite_forward_cpu", [&] {
    forward_rays<scalar_t>(color.const_data_ptr<scalar_t>(), density.const_data_ptr<scalar_t>(),
                           out.mutable_data_ptr<scalar_t>(), R, D, C, inclusive, static_cast<int>(activation));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> composite_backward_cpu(const at::Tensor& grad_out, const at::Tensor& color,
                                                          const at::Tensor& density, bool inclusive, int64_t activation,
                                                          bool color_grad) {
  check_composite_backward_inputs(grad_out, color, density, activation);
  const int64_t R = color.size(0), D = color.size(1), C = color.size(2);
  at::Tensor grad_color = color_grad ? empty_for_writing(color) : at::empty({0}, color.options());
  at::Tensor grad_density = at::zeros_like(density);
  if (R == 0 || D == 0) return {grad_color, grad_density};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, color.scalar_type(), "composite_backward_cpu", [&] {
    backward_rays<scalar_t>(
        grad_out.const_data_ptr<scalar_t>(), color.const_data_ptr<scalar_t>(), density.const_data_ptr<scalar_t>(),
        color_grad ? grad_color.mutable_data_ptr<scalar_t>() : nullptr, grad_density.mutable_data_ptr<scalar_t>(), R, D,
        C, inclusive, static_cast<int>(activation));
  });
  return {grad_color, grad_density};
}

// The schemas of this op's kernel entry points (fnevr/ops/composite.py calls them; the CUDA kernels
// implement the same ones). Defined here, in fnevr._C, which fnevr._C_cuda needs loaded first.
TORCH_LIBRARY_FRAGMENT(fnevr, m) {
  m.def("_composite_forward(Tensor color, Tensor density, bool inclusive, int activation) -> Tensor");
  m.def(
      "_composite_backward(Tensor grad_out, Tensor color, Tensor density, bool inclusive, "
      "int activation, bool color_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fnevr, CPU, m) {
  m.impl("_composite_forward", &composite_forward_cpu);
  m.impl("_composite_backward", &composite_backward_cpu);
}

}  // namespace fnevr
