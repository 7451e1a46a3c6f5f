// Grid sampling on CUDA, with the per-point math of grid_sample_math.h.
//
// Work mapping (Plan): for channels_last tensors a group of G lanes (a power of two, at most a
// warp) owns one output point and strides over its contiguous channels, so a warp's loads of a
// tap are coalesced; for NCHW a thread owns one point and a chunk of kChunk channels, and
// neighbouring threads take neighbouring points (coalesced stores, mostly local gathers). Every
// lane computes its point's taps itself: cheaper than sharing them. The launch grid spells out the
// image and the channel chunk, and output-shaped tensors are read as dense runs of Ho * Wo points,
// so no thread divides (a 64-bit division is a long emulated sequence).
// The grid gradient needs all channels of a point: its group reduces partial dot products with
// warp shuffles (NCHW: one thread loops over all channels). The input gradient is a scatter with
// atomics (relaxed, as CUDA's atomicAdd is): floating-point ones (fast, order-dependent), or, when
// deterministic, 64-bit integer adds of fixed-point values scaled by 2^k with
// points * max|grad_out| * 2^k <= 2^62; integer sums do not depend on order, so the result is
// bit-identical run to run.
#include "common/cuda.cuh"
#include "common/strides.h"
#include "grid_sample.h"
#include "grid_sample_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace fnevr {
namespace {

using grid_sample::Taps;

constexpr int64_t kChunk = 16;         // channels per thread for NCHW (more when C > 16 * kMaxGridYZ)
constexpr int64_t kMaxGridYZ = 65535;  // CUDA's limit on gridDim.y and gridDim.z

// An output-shaped tensor [N, C, Ho, Wo] that is dense over (Ho, Wo): point p = i * Wo + j of an
// image is at p * p_stride, so no kernel divides by Wo.
struct PointStrides {
  int64_t n, c, p;
};

// t's PointStrides; t is first made dense over (Ho, Wo) where it is not.
PointStrides point_strides(at::Tensor& t) {
  const int64_t Ho = t.size(2), Wo = t.size(3);
  if (Ho > 1 && Wo > 1 && t.stride(2) != Wo * t.stride(3)) t = t.contiguous(grid_sample_memory_format(t));
  return {t.stride(0), t.stride(1), Wo > 1 ? t.stride(3) : t.stride(2)};
}

// Launches are 3-D: x runs over an image's points (times the lanes of a point's group), y over the
// channel chunks (NCHW), z over the images, from image n0 (at most kMaxGridYZ per launch). So no
// thread divides to find its point, channels or image.
struct Plan {
  int64_t N, C, H, W, P;  // P = Ho * Wo output points per image
  int mode, padding;
  bool align_corners;
  bool lanes_on_channels;  // channels_last: a group of lanes per point
  int group_log2;          // lanes per point (lanes_on_channels), else 0
  int64_t chunk, chunks;   // channels per thread and chunks per point (NCHW)
};

// Which point, and which of its channels (begin, end, step), this thread owns; p >= P: none.
struct Work {
  int64_t n, p, c_begin, c_end, c_step;
};

__device__ __forceinline__ Work locate(const Plan& L, int64_t n0) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t n = n0 + blockIdx.z;
  if (L.lanes_on_channels)
    return {n, t >> L.group_log2, t & ((int64_t(1) << L.group_log2) - 1), L.C, int64_t(1) << L.group_log2};
  const int64_t c0 = blockIdx.y * L.chunk;
  return {n, t, c0, c0 + L.chunk < L.C ? c0 + L.chunk : L.C, 1};
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ Taps<acc_t> point_taps(const scalar_t* grid, const Plan& L, int64_t n, int64_t p,
                                                  const Strides& s) {
  const scalar_t* g = grid + (n * L.P + p) * 2;
  return grid_sample::make_taps<acc_t>(static_cast<acc_t>(g[0]), static_cast<acc_t>(g[1]), L.H, L.W, s.h, s.w, L.mode,
                                       L.padding, L.align_corners);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ input, const scalar_t* __restrict__ grid, scalar_t* __restrict__ out,
                   Plan L, Strides si, PointStrides so, int64_t n0) {
  const Work w = locate(L, n0);
  if (w.p >= L.P) return;
  const Taps<acc_t> t = point_taps<scalar_t, acc_t>(grid, L, w.n, w.p, si);
  const scalar_t* in_n = input + w.n * si.n;
  scalar_t* o = out + w.n * so.n + w.p * so.p;
  for (int64_t c = w.c_begin; c < w.c_end; c += w.c_step) {
    acc_t v = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k)  // unrolled, so the taps stay in registers; nearest has 1 valid
      if (t.valid[k]) v += t.w[k] * static_cast<acc_t>(in_n[t.offset[k] + c * si.c]);
    o[c * so.c] = static_cast<scalar_t>(v);
  }
}

// Lanes past the last point keep running (on point 0, storing nothing) so every shuffle has a full warp.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    grid_grad_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ input,
                     const scalar_t* __restrict__ grid, scalar_t* __restrict__ grad_grid, Plan L, Strides si,
                     PointStrides sg, int64_t n0) {
  const int64_t t_id = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t n = n0 + blockIdx.z;
  const bool valid = (t_id >> L.group_log2) < L.P;
  const int64_t p = valid ? t_id >> L.group_log2 : 0;
  const int lane = static_cast<int>(t_id & ((int64_t(1) << L.group_log2) - 1));
  const Taps<acc_t> t = point_taps<scalar_t, acc_t>(grid, L, n, p, si);
  const scalar_t* in_n = input + n * si.n;
  const scalar_t* g = grad_out + n * sg.n + p * sg.p;
  acc_t dots[4] = {0, 0, 0, 0};
  for (int64_t c = lane; c < L.C; c += int64_t(1) << L.group_log2) {
    const acc_t gc = static_cast<acc_t>(g[c * sg.c]);
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (t.valid[k]) dots[k] += gc * static_cast<acc_t>(in_n[t.offset[k] + c * si.c]);
  }
  acc_t gx = 0, gy = 0;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    gx += t.dw_dx[k] * dots[k];
    gy += t.dw_dy[k] * dots[k];
  }
  gx = group_sum(gx, 1 << L.group_log2);
  gy = group_sum(gy, 1 << L.group_log2);
  if (!valid || lane != 0) return;
  scalar_t* gg = grad_grid + (n * L.P + p) * 2;
  gg[0] = static_cast<scalar_t>(gx * t.dx_dgx);
  gg[1] = static_cast<scalar_t>(gy * t.dy_dgy);
}

// 2^(62 - e) with points * max|grad_out| < 2^e: a grad_input element sums at most one term of at
// most max|grad_out| per output point of its image, so its fixed-point sum stays below 2^62.
__device__ __forceinline__ double fixed_point_scale(double max_abs, int64_t points) {
  int e = 0;
  frexp(max_abs * static_cast<double>(points), &e);
  return ldexp(1.0, 62 - e);
}

// buf_t: acc_t (floating-point atomics) or unsigned long long (fixed point, deterministic). CUDA's
// atomicAdd is relaxed: these only accumulate, and nothing reads buf before the kernel ends.
template <typename scalar_t, typename acc_t, typename buf_t>
__global__ void __launch_bounds__(kThreads)
    input_grad_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ grid, buf_t* buf,
                      const double* max_abs, Plan L, Strides sb, PointStrides sg, int64_t n0) {
  const Work w = locate(L, n0);
  if (w.p >= L.P) return;
  const Taps<acc_t> t = point_taps<scalar_t, acc_t>(grid, L, w.n, w.p, sb);
  const scalar_t* g = grad_out + w.n * sg.n + w.p * sg.p;
  buf_t* b = buf + w.n * sb.n;
  double scale = 1.0;
  if constexpr (std::is_same_v<buf_t, unsigned long long>) scale = fixed_point_scale(*max_abs, L.P);
  for (int64_t c = w.c_begin; c < w.c_end; c += w.c_step) {
    const acc_t gc = static_cast<acc_t>(g[c * sg.c]);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (!t.valid[k]) continue;
      buf_t* dst = b + t.offset[k] + c * sb.c;
      if constexpr (std::is_same_v<buf_t, unsigned long long>) {
        const long long q = llrint(static_cast<double>(t.w[k] * gc) * scale);
        atomicAdd(dst, static_cast<unsigned long long>(q));  // two's complement: wraps like a signed add
      } else {
        atomicAdd(dst, t.w[k] * gc);
      }
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fixed_to_float_kernel(const unsigned long long* __restrict__ buf, scalar_t* __restrict__ out, int64_t numel,
                          const double* max_abs, int64_t points) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= numel) return;
  const double bound = *max_abs;
  // A non-finite grad_out has no fixed-point form: its gradient is NaN, not garbage.
  const double v = grid_sample::finite_(bound)
                       ? static_cast<double>(static_cast<long long>(buf[i])) / fixed_point_scale(bound, points)
                       : nan("");
  out[i] = static_cast<scalar_t>(v);
}

Plan make_plan(const at::Tensor& input, const at::Tensor& grid, int64_t mode, int64_t padding, bool align_corners,
               bool lanes_on_channels) {
  Plan L{input.size(0),
         input.size(1),
         input.size(2),
         input.size(3),
         grid.size(1) * grid.size(2),
         static_cast<int>(mode),
         static_cast<int>(padding),
         align_corners,
         lanes_on_channels,
         0,
         kChunk,
         1};
  if (lanes_on_channels)
    while ((int64_t(1) << L.group_log2) < L.C && L.group_log2 < 5) ++L.group_log2;
  L.chunk = std::max(kChunk, (L.C + kMaxGridYZ - 1) / kMaxGridYZ);
  L.chunks = (L.C + L.chunk - 1) / L.chunk;
  return L;
}

int64_t blocks_for(int64_t threads) { return (threads + kThreads - 1) / kThreads; }

// Launches `launch(grid, n0)` over the images in slices of at most kMaxGridYZ (gridDim.z).
template <typename F>
void for_image_slices(const Plan& L, bool one_chunk, F launch) {
  for (int64_t n0 = 0; n0 < L.N; n0 += kMaxGridYZ) {
    const dim3 grid(static_cast<unsigned>(blocks_for(L.P << L.group_log2)),
                    static_cast<unsigned>(L.lanes_on_channels || one_chunk ? 1 : L.chunks),
                    static_cast<unsigned>(std::min(kMaxGridYZ, L.N - n0)));
    launch(grid, n0);
  }
}

}  // namespace

at::Tensor grid_sample_forward_cuda(const at::Tensor& input, const at::Tensor& grid, int64_t mode, int64_t padding,
                                    bool align_corners) {
  check_grid_sample_inputs(input, grid, mode, padding);
  check_cuda(input, "grid_sample", "input");
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty({input.size(0), input.size(1), grid.size(1), grid.size(2)},
                             input.options().memory_format(grid_sample_memory_format(input)));
  if (out.numel() == 0) return out;
  const Strides si = strides_of(input);
  const PointStrides so = point_strides(out);  // dense as made: out stays itself
  const Plan L = make_plan(input, grid, mode, padding, align_corners, si.c == 1 && so.c == 1 && input.size(1) > 1);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "grid_sample_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for_image_slices(L, false, [&](dim3 blocks, int64_t n0) {
      forward_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(input.const_data_ptr<scalar_t>(),
                                                                       grid.const_data_ptr<scalar_t>(),
                                                                       out.mutable_data_ptr<scalar_t>(), L, si, so, n0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> grid_sample_backward_cuda(const at::Tensor& grad_out_, const at::Tensor& input,
                                                             const at::Tensor& grid, int64_t mode, int64_t padding,
                                                             bool align_corners, bool input_grad, bool grid_grad,
                                                             bool deterministic) {
  check_grid_sample_inputs(input, grid, mode, padding);
  check_grid_sample_grad(grad_out_, input, grid);
  check_cuda(input, "grid_sample", "input");
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor grad_input = at::empty({0}, input.options());
  at::Tensor grad_grid = grid_grad ? at::zeros_like(grid) : at::empty({0}, grid.options());
  if (grad_out_.numel() == 0) {
    if (input_grad) grad_input = at::zeros_like(input);
    return {grad_input, grad_grid};
  }
  at::Tensor grad_out = grad_out_;
  const PointStrides sg = point_strides(grad_out);
  const Strides si = strides_of(input);
  const Plan L = make_plan(input, grid, mode, padding, align_corners, si.c == 1 && sg.c == 1 && input.size(1) > 1);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "grid_sample_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (input_grad) {
      if (deterministic) {
        at::Tensor buf = at::zeros_like(input, input.options().dtype(at::kLong));  // keeps input's layout
        grad_input = at::empty_like(input);
        const at::Tensor max_abs = at::amax(at::abs(grad_out)).to(at::kDouble);
        auto* b = reinterpret_cast<unsigned long long*>(buf.mutable_data_ptr<int64_t>());
        for_image_slices(L, false, [&](dim3 blocks, int64_t n0) {
          input_grad_kernel<scalar_t, acc_t, unsigned long long>
              <<<blocks, kThreads, 0, stream>>>(grad_out.const_data_ptr<scalar_t>(), grid.const_data_ptr<scalar_t>(), b,
                                                max_abs.const_data_ptr<double>(), L, strides_of(buf), sg, n0);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
        // buf and grad_input have the same dense strides: element i is element i in both.
        fixed_to_float_kernel<scalar_t><<<blocks_for(buf.numel()), kThreads, 0, stream>>>(
            b, grad_input.mutable_data_ptr<scalar_t>(), buf.numel(), max_abs.const_data_ptr<double>(), L.P);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        at::Tensor buf = at::zeros_like(input, input.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
        for_image_slices(L, false, [&](dim3 blocks, int64_t n0) {
          input_grad_kernel<scalar_t, acc_t, acc_t>
              <<<blocks, kThreads, 0, stream>>>(grad_out.const_data_ptr<scalar_t>(), grid.const_data_ptr<scalar_t>(),
                                                buf.mutable_data_ptr<acc_t>(), nullptr, L, strides_of(buf), sg, n0);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
        grad_input = std::is_same_v<scalar_t, acc_t> ? buf : buf.to(input.scalar_type());
      }
    }
    if (grid_grad && mode == grid_sample::kBilinear) {
      for_image_slices(L, true, [&](dim3 blocks, int64_t n0) {
        grid_grad_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
            grad_out.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), grid.const_data_ptr<scalar_t>(),
            grad_grid.mutable_data_ptr<scalar_t>(), L, si, sg, n0);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  });
  return {grad_input, grad_grid};
}

TORCH_LIBRARY_IMPL(fnevr, CUDA, m) {
  m.impl("_grid_sample_forward", &grid_sample_forward_cuda);
  m.impl("_grid_sample_backward", &grid_sample_backward_cuda);
}

}  // namespace fnevr
