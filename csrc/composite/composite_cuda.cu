// Compositing on CUDA. A group of G lanes (a power of two, at most a warp) owns one ray; each lane
// owns VEC consecutive channels per chunk (16-byte loads when C allows) and CHUNKS chunks per pass,
// interleaved across the group so a warp's loads are coalesced. Samples go in tiles of kTile whose
// loads are all issued before any is used, to keep enough bytes in flight. Forward reads colour once
// and writes the output once; backward reads colour and grad_out once and writes grad_colour once.
// Both run one front-to-back pass per ray (see composite_math.h); backward reduces e_i = <g, c_i>
// across the group with warp shuffles.
#include "common/cuda.cuh"
#include "composite.h"
#include "composite_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace fnevr {
namespace {

using composite::GradScan;
using composite::RayMarcher;
using composite::SampleWeight;

// Tuning knobs, settable with -D for benchmarks/tune_composite_cuda.py: the samples whose loads are
// issued together, ahead of their use, and the most chunks (VEC channels each) one lane owns. The
// defaults won that sweep on an H100 (benchmarks/results/tune-composite-cuda-*): fewer registers
// per thread, more threads, beat more loads per thread.
#ifndef FNEVR_COMPOSITE_TILE
#define FNEVR_COMPOSITE_TILE 4
#endif
#ifndef FNEVR_COMPOSITE_CHUNKS
#define FNEVR_COMPOSITE_CHUNKS 1
#endif
constexpr int kTile = FNEVR_COMPOSITE_TILE;
constexpr int kMaxChunks = FNEVR_COMPOSITE_CHUNKS;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// What a launch is planned from: the [R, D, C] problem and how many lanes share a ray.
struct Plan {
  int64_t R;
  int D, C;
  int group_log2;  // log2 of the lanes per ray
};

// The tile's sample weights, from its densities (loaded first: everything else waits on them).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void tile_weights(const scalar_t* d_ray, int i0, int D, int act, RayMarcher<acc_t>& march,
                                             SampleWeight<acc_t> (&s)[kTile]) {
  acc_t sigma[kTile];
#pragma unroll
  for (int u = 0; u < kTile; ++u) sigma[u] = i0 + u < D ? static_cast<acc_t>(d_ray[i0 + u]) : acc_t(0);
#pragma unroll
  for (int u = 0; u < kTile; ++u)
    s[u] = i0 + u < D ? march.step(composite::activate(sigma[u], act)) : SampleWeight<acc_t>{acc_t(0), acc_t(0)};
}

template <typename scalar_t, typename acc_t, int VEC, int CHUNKS>
__global__ void __launch_bounds__(kThreads)
    composite_forward_kernel(const scalar_t* __restrict__ color, const scalar_t* __restrict__ density,
                             scalar_t* __restrict__ out, Plan L, bool inclusive, int act) {
  using P = Pack<scalar_t, VEC>;
  const int G = 1 << L.group_log2;
  const int lane = threadIdx.x & (G - 1);
  const int64_t ray = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> L.group_log2;
  if (ray >= L.R) return;
  const scalar_t* c_ray = color + ray * L.D * L.C;
  const scalar_t* d_ray = density + ray * L.D;
  for (int base = 0; base < L.C; base += G * VEC * CHUNKS) {  // one pass unless C is very wide
    acc_t acc[CHUNKS][VEC];
#pragma unroll
    for (int k = 0; k < CHUNKS; ++k)
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[k][j] = acc_t(0);
    RayMarcher<acc_t> march(inclusive);
    for (int i0 = 0; i0 < L.D; i0 += kTile) {
      P c[kTile][CHUNKS];
#pragma unroll
      for (int u = 0; u < kTile; ++u)
#pragma unroll
        for (int k = 0; k < CHUNKS; ++k) {
          const int ch = base + (k * G + lane) * VEC;
          if (i0 + u < L.D && ch < L.C) c[u][k] = *reinterpret_cast<const P*>(c_ray + (i0 + u) * L.C + ch);
        }
      SampleWeight<acc_t> s[kTile];
      tile_weights(d_ray, i0, L.D, act, march, s);
#pragma unroll
      for (int u = 0; u < kTile; ++u)
#pragma unroll
        for (int k = 0; k < CHUNKS; ++k) {
          if (i0 + u < L.D && base + (k * G + lane) * VEC < L.C)
#pragma unroll
            for (int j = 0; j < VEC; ++j) acc[k][j] += s[u].w * static_cast<acc_t>(c[u][k].v[j]);
        }
    }
#pragma unroll
    for (int k = 0; k < CHUNKS; ++k) {
      const int ch = base + (k * G + lane) * VEC;
      if (ch < L.C) {
        P o;
#pragma unroll
        for (int j = 0; j < VEC; ++j) o.v[j] = static_cast<scalar_t>(acc[k][j]);
        *reinterpret_cast<P*>(out + ray * L.C + ch) = o;
      }
    }
  }
}

// grad_color may be null (colour needs no gradient). pushed is an [R, D] scratch in acc_t: the
// group's lane 0 keeps each sample's partial value there until the ray's total is known.
template <typename scalar_t, typename acc_t, int VEC, int CHUNKS>
__global__ void __launch_bounds__(kThreads)
    composite_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ color,
                              const scalar_t* __restrict__ density, scalar_t* __restrict__ grad_color, acc_t* pushed,
                              scalar_t* grad_density,  // pushed and grad_density may alias: see the launch
                              Plan L, bool inclusive, int act) {
  using P = Pack<scalar_t, VEC>;
  const int G = 1 << L.group_log2;
  const int lane = threadIdx.x & (G - 1);
  const int64_t ray_raw = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> L.group_log2;
  // Lanes past the last ray keep running (on ray 0, storing nothing) so every shuffle has a full warp.
  const bool valid = ray_raw < L.R;
  const int64_t ray = valid ? ray_raw : 0;
  const scalar_t* c_ray = color + ray * L.D * L.C;
  const scalar_t* g_ray = grad_out + ray * L.C;
  const scalar_t* d_ray = density + ray * L.D;

  RayMarcher<acc_t> march(inclusive);
  GradScan<acc_t> scan(inclusive);
  for (int i0 = 0; i0 < L.D; i0 += kTile) {
    SampleWeight<acc_t> s[kTile];
    tile_weights(d_ray, i0, L.D, act, march, s);
    acc_t e[kTile];
#pragma unroll
    for (int u = 0; u < kTile; ++u) e[u] = acc_t(0);
    for (int base = 0; base < L.C; base += G * VEC * CHUNKS) {  // one pass unless C is very wide
      P g[CHUNKS], c[kTile][CHUNKS];
#pragma unroll
      for (int k = 0; k < CHUNKS; ++k) {
        const int ch = base + (k * G + lane) * VEC;
        if (ch < L.C) {
          g[k] = *reinterpret_cast<const P*>(g_ray + ch);
#pragma unroll
          for (int u = 0; u < kTile; ++u)
            if (i0 + u < L.D) c[u][k] = *reinterpret_cast<const P*>(c_ray + (i0 + u) * L.C + ch);
        }
      }
#pragma unroll
      for (int u = 0; u < kTile; ++u)
#pragma unroll
        for (int k = 0; k < CHUNKS; ++k) {
          const int ch = base + (k * G + lane) * VEC;
          if (i0 + u >= L.D || ch >= L.C) continue;
          P gc;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const acc_t gj = static_cast<acc_t>(g[k].v[j]);
            e[u] += gj * static_cast<acc_t>(c[u][k].v[j]);
            gc.v[j] = static_cast<scalar_t>(s[u].w * gj);
          }
          if (valid && grad_color != nullptr) *reinterpret_cast<P*>(grad_color + (ray * L.D + i0 + u) * L.C + ch) = gc;
        }
    }
#pragma unroll
    for (int u = 0; u < kTile; ++u) {
      if (i0 + u >= L.D) break;
      e[u] = group_sum(e[u], G);
      acc_t taken;
      const acc_t p = scan.push(e[u], s[u], taken);
      if (valid && lane == 0) {
        pushed[ray * L.D + i0 + u] = p;
        composite::take_off(pushed + ray * L.D, i0 + u, taken);  // a loop only for a NaN or inf e_i w_i
      }
    }
  }
  if (!valid || lane != 0) return;
  for (int i = 0; i < L.D; ++i) {
    const acc_t sigma = static_cast<acc_t>(d_ray[i]);
    grad_density[ray * L.D + i] = static_cast<scalar_t>(scan.finish(pushed[ray * L.D + i], sigma, act));
  }
}

// Launch shape for a [R, D, C] problem: the widest vector the data's alignment allows, then up to
// kMaxChunks chunks per lane over the fewest lanes per ray, up to a warp, that cover C (past that,
// up to 4 chunks, and more passes).
struct Config {
  int vec, chunks;
  Plan plan;
  int64_t blocks;
};

template <typename scalar_t>
Config make_config(const at::Tensor& color, std::initializer_list<const at::Tensor*> others) {
  const int64_t R = color.size(0);
  const int D = static_cast<int>(color.size(1)), C = static_cast<int>(color.size(2));
  int vec = 16 / static_cast<int>(sizeof(scalar_t));
  auto aligned = [](const at::Tensor& t) { return reinterpret_cast<std::uintptr_t>(t.const_data_ptr()) % 16 == 0; };
  bool all_aligned = aligned(color);
  for (const at::Tensor* t : others) all_aligned = all_aligned && (t == nullptr || aligned(*t));
  if (C % vec != 0 || !all_aligned) vec = 1;
  const int units = (C + vec - 1) / vec;
  int group_log2 = 0;
  while ((kMaxChunks << group_log2) < units && group_log2 < 5) ++group_log2;
  const int per_lane = (units + (1 << group_log2) - 1) >> group_log2;
  const int chunks = per_lane <= 1 ? 1 : per_lane <= 2 ? 2 : 4;
  const int64_t rays_per_block = kThreads >> group_log2;
  return {vec, chunks, {R, D, C, group_log2}, (R + rays_per_block - 1) / rays_per_block};
}

// Calls f with the config's VEC and CHUNKS as compile-time constants.
template <typename scalar_t, typename F>
void with_shape(const Config& cfg, F&& f) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  auto pick_chunks = [&](auto vec) {
    switch (cfg.chunks) {
      case 1:
        f(vec, std::integral_constant<int, 1>{});
        break;
      case 2:
        f(vec, std::integral_constant<int, 2>{});
        break;
      default:
        f(vec, std::integral_constant<int, 4>{});
        break;
    }
  };
  if (cfg.vec == kVec)
    pick_chunks(std::integral_constant<int, kVec>{});
  else
    pick_chunks(std::integral_constant<int, 1>{});
}

}  // namespace

at::Tensor composite_forward_cuda(const at::Tensor& color, const at::Tensor& density, bool inclusive,
                                  int64_t activation) {
  check_composite_inputs(color, density, activation);
  check_cuda(color, "composite", "color");
  const c10::cuda::CUDAGuard guard(color.device());
  at::Tensor out = color.size(1) == 0 ? at::zeros({color.size(0), color.size(2)}, color.options())
                                      : at::empty({color.size(0), color.size(2)}, color.options());
  if (out.numel() == 0 || color.size(1) == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, color.scalar_type(), "composite_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Config cfg = make_config<scalar_t>(color, {&out});
    with_shape<scalar_t>(cfg, [&](auto vec, auto chunks) {
      composite_forward_kernel<scalar_t, acc_t, decltype(vec)::value, decltype(chunks)::value>
          <<<cfg.blocks, kThreads, 0, stream>>>(color.const_data_ptr<scalar_t>(), density.const_data_ptr<scalar_t>(),
                                                out.mutable_data_ptr<scalar_t>(), cfg.plan, inclusive,
                                                static_cast<int>(activation));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> composite_backward_cuda(const at::Tensor& grad_out, const at::Tensor& color,
                                                           const at::Tensor& density, bool inclusive,
                                                           int64_t activation, bool color_grad) {
  check_composite_backward_inputs(grad_out, color, density, activation);
  check_cuda(color, "composite", "color");
  const c10::cuda::CUDAGuard guard(color.device());
  at::Tensor grad_color = color_grad ? at::empty_like(color) : at::empty({0}, color.options());
  at::Tensor grad_density = at::zeros_like(density);
  if (color.size(0) == 0 || color.size(1) == 0) return {grad_color, grad_density};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, color.scalar_type(), "composite_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Where grad_density already holds acc_t (fp32, fp64) it doubles as the scratch.
    at::Tensor pushed =
        std::is_same<scalar_t, acc_t>::value
            ? grad_density
            : at::empty(density.sizes(), density.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const Config c = make_config<scalar_t>(color, {&grad_out, color_grad ? &grad_color : nullptr});
    with_shape<scalar_t>(c, [&](auto vec, auto chunks) {
      composite_backward_kernel<scalar_t, acc_t, decltype(vec)::value, decltype(chunks)::value>
          <<<c.blocks, kThreads, 0, stream>>>(
              grad_out.const_data_ptr<scalar_t>(), color.const_data_ptr<scalar_t>(), density.const_data_ptr<scalar_t>(),
              color_grad ? grad_color.mutable_data_ptr<scalar_t>() : nullptr, pushed.mutable_data_ptr<acc_t>(),
              grad_density.mutable_data_ptr<scalar_t>(), c.plan, inclusive, static_cast<int>(activation));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_color, grad_density};
}

TORCH_LIBRARY_IMPL(fnevr, CUDA, m) {
  m.impl("_composite_forward", &composite_forward_cuda);
  m.impl("_composite_backward", &composite_backward_cuda);
}

}  // namespace fnevr
