// SPADE normalisation on CUDA.
//
// Reductions (statistics; the backward's per-(n, c) sums) are cut into pieces of samples x positions
// (spade::Split) so that the GPU gets enough blocks even with few groups (channels_last, batch norm).
// NCHW gives a block one channel of a piece, whose threads stride through its runs and then merge
// across the block; channels_last gives a block 32 channels x 8 row lanes of a piece, so a warp reads
// 32 consecutive channels of a row. When a group spans several pieces, their partials are merged by
// a second kernel in a fixed order (deterministic). Statistics merge per-thread Welford moments by
// Chan's rule (spade_norm_math.h), so large means do not cancel.
// Element-wise passes (forward; dx, dgamma, dbeta) are grid-stride loops over all of x, recomputing
// xhat from x and the group's mean and variance.
#include "common/cuda.cuh"
#include "spade_norm.h"
#include "spade_norm_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace fnevr {
namespace {

using spade::Moments;
using spade::Split;

constexpr int kLanesC = 32;  // channels_last reductions: channels per block
constexpr int kLanesR = 8;   // ... and row lanes per block
constexpr int kWarps = kThreads / 32;
constexpr int kMergeLanes = 32;     // merges of partials: lanes per group (blocks of kLanesC groups)
constexpr int kBlocksPerSM = 8;     // reductions are cut until about this many blocks per multiprocessor
constexpr int64_t kPerThread = 16;  // ... but not below this many elements per thread

template <typename T>
__device__ __forceinline__ Moments<T> shfl_down(const Moments<T>& m, int offset) {
  Moments<T> o;
  o.n = __shfl_down_sync(0xffffffffu, m.n, offset);
  o.mean = __shfl_down_sync(0xffffffffu, m.mean, offset);
  o.m2 = __shfl_down_sync(0xffffffffu, m.m2, offset);
  return o;
}

template <typename T>
__device__ __forceinline__ T shfl_down(T v, int offset) {
  return __shfl_down_sync(0xffffffffu, v, offset);
}

template <typename T>
__device__ __forceinline__ void combine(Moments<T>& a, const Moments<T>& b) {
  a.merge(b);
}
template <typename T>
__device__ __forceinline__ void combine(T& a, const T& b) {
  a += b;
}

// Reduces V (Moments or a plain sum) over a 1-D block of kThreads; thread 0 gets the result.
// Shared memory for n values of V: raw bytes, since V's default member initialisers would count as
// a constructor, which __shared__ variables may not have.
template <typename V, int n>
__device__ __forceinline__ V* shared_array() {
  __shared__ alignas(V) unsigned char bytes[sizeof(V) * n];
  return reinterpret_cast<V*>(bytes);
}

template <typename V>
__device__ V block_reduce(V v) {
  V* warp_part = shared_array<V, kWarps>();
  for (int offset = 16; offset > 0; offset >>= 1) combine(v, shfl_down(v, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? warp_part[lane] : V{};
    for (int offset = 16; offset > 0; offset >>= 1) combine(v, shfl_down(v, offset));
  }
  __syncthreads();  // warp_part may be reused by the caller's next reduction
  return v;
}

// Reduces V over the row lanes (threadIdx.y) of a kLanesC x kRows block; row lane 0 gets it.
template <int kRows, typename V>
__device__ V lane_reduce(V v) {
  V* part = shared_array<V, kRows * kLanesC>();
  part[threadIdx.y * kLanesC + threadIdx.x] = v;
  __syncthreads();
  if (threadIdx.y == 0)
    for (int r = 1; r < kRows; ++r) combine(v, part[r * kLanesC + threadIdx.x]);
  __syncthreads();
  return v;
}

struct Dims {
  int64_t N, C, S;
};

// ---- statistics ----

// Where a piece's moments go: the final mean and variance, or (when groups span several pieces) the
// partials for merge_moments_kernel. Index i = piece * C + channel.
template <typename acc_t>
struct MomentsOut {
  acc_t* mean;
  acc_t* var;
  Moments<acc_t>* part;
  __device__ void store(int64_t i, const Moments<acc_t>& m) const {
    if (part != nullptr) {
      part[i] = m;
    } else {
      mean[i] = m.mean;
      var[i] = m.var();
    }
  }
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    stats_nchw_kernel(const scalar_t* __restrict__ x, MomentsOut<acc_t> out, Dims d, Split sp) {
  const int64_t i = blockIdx.x, c = i % d.C, p = i / d.C;  // (piece, channel)
  const int64_t s0 = sp.position_begin(p), s1 = sp.position_end(p, d.S);
  Moments<acc_t> m;
  for (int64_t n = sp.sample_begin(p); n < sp.sample_end(p, d.N); ++n) {
    const scalar_t* run = x + (n * d.C + c) * d.S;
    for (int64_t s = s0 + threadIdx.x; s < s1; s += kThreads) m.push(static_cast<acc_t>(run[s]));
  }
  m = block_reduce(m);
  if (threadIdx.x == 0) out.store(i, m);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kLanesC* kLanesR)
    stats_cl_kernel(const scalar_t* __restrict__ x, MomentsOut<acc_t> out, Dims d, Split sp) {
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kLanesC + threadIdx.x, p = blockIdx.x;
  const int64_t s0 = sp.position_begin(p), s1 = sp.position_end(p, d.S);
  Moments<acc_t> m;
  if (c < d.C)
    for (int64_t n = sp.sample_begin(p); n < sp.sample_end(p, d.N); ++n)
      for (int64_t r = s0 + threadIdx.y; r < s1; r += kLanesR) m.push(static_cast<acc_t>(x[(n * d.S + r) * d.C + c]));
  m = lane_reduce<kLanesR>(m);
  if (threadIdx.y == 0 && c < d.C) out.store(p * d.C + c, m);
}

// mean, var [G] from Q partials [Q, G] per group: kMergeLanes lanes take every kMergeLanes-th
// partial, in order, then the lanes merge in a fixed tree. Q reaches ~1000 (channels_last batch norm
// of few channels): a lane loads a batch of partials before merging them, so that their loads are in
// flight together (merge's tests of the counts would otherwise wait for each load in turn). The batch
// is as big as 64 registers a thread allow (1024 threads).
template <typename acc_t>
__global__ void __launch_bounds__(kLanesC* kMergeLanes)
    merge_moments_kernel(const Moments<acc_t>* __restrict__ part, acc_t* __restrict__ mean, acc_t* __restrict__ var,
                         int64_t G, int64_t Q) {
  constexpr int kMergeBatch = sizeof(acc_t) == 8 ? 4 : 8;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kLanesC + threadIdx.x;
  Moments<acc_t> m;
  if (g < G)
    for (int64_t q0 = threadIdx.y; q0 < Q; q0 += kMergeLanes * kMergeBatch) {
      Moments<acc_t> batch[kMergeBatch];  // empty (count 0) past Q: merge skips them
#pragma unroll
      for (int b = 0; b < kMergeBatch; ++b)
        if (q0 + b * kMergeLanes < Q) batch[b] = part[(q0 + b * kMergeLanes) * G + g];
#pragma unroll
      for (int b = 0; b < kMergeBatch; ++b) m.merge(batch[b]);
    }
  m = lane_reduce<kMergeLanes>(m);
  if (threadIdx.y == 0 && g < G) {
    mean[g] = m.mean;
    var[g] = m.var();
  }
}

// ---- element-wise passes ----

// Where element i's group statistics and (per-(n, c)) modulation live.
struct Index {
  int64_t grp, nc;
};

// index_t is 32-bit whenever x is small enough: 64-bit division is emulated and would dominate.
template <typename index_t>
__device__ __forceinline__ Index index_of(index_t i, const Dims& d, bool channels_last, bool batch) {
  const index_t C = static_cast<index_t>(d.C), S = static_cast<index_t>(d.S);
  index_t n, c;
  if (channels_last) {
    c = i % C;
    n = i / (S * C);
  } else {
    const index_t row = i / S;
    c = row % C;
    n = row / C;
  }
  const index_t nc = n * C + c;
  return {batch ? c : nc, nc};
}

struct Flags {
  bool channels_last, batch, g_full, b_full;
};

template <typename scalar_t, typename acc_t, int kAct, typename index_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ gamma,
                   const scalar_t* __restrict__ beta, const acc_t* __restrict__ mean, const acc_t* __restrict__ var,
                   scalar_t* __restrict__ y, index_t total, Dims d, Flags f, acc_t eps, acc_t slope) {
  for (index_t i = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<index_t>(gridDim.x) * kThreads) {
    const Index ix = index_of<index_t>(i, d, f.channels_last, f.batch);
    const acc_t rstd = spade::rsqrt_(var[ix.grp] + eps);
    const acc_t xhat = spade::normalise(static_cast<acc_t>(x[i]), mean[ix.grp], rstd);
    const acc_t g = static_cast<acc_t>(gamma[f.g_full ? i : ix.nc]);
    const acc_t b = static_cast<acc_t>(beta[f.b_full ? i : ix.nc]);
    y[i] = static_cast<scalar_t>(spade::modulate(xhat, g, b, kAct, slope));
  }
}

template <typename scalar_t, typename acc_t, int kAct, typename index_t>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ x,
                    const scalar_t* __restrict__ gamma, const scalar_t* __restrict__ beta,
                    const acc_t* __restrict__ mean, const acc_t* __restrict__ var, const acc_t* __restrict__ group_sums,
                    scalar_t* __restrict__ dx, scalar_t* __restrict__ dgamma, scalar_t* __restrict__ dbeta,
                    index_t total, int64_t G, Dims d, Flags f, acc_t scale, acc_t eps, acc_t slope) {
  for (index_t i = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<index_t>(gridDim.x) * kThreads) {
    const Index ix = index_of<index_t>(i, d, f.channels_last, f.batch);
    const acc_t rstd = spade::rsqrt_(var[ix.grp] + eps);
    const acc_t xhat = spade::normalise(static_cast<acc_t>(x[i]), mean[ix.grp], rstd);
    const acc_t g = static_cast<acc_t>(gamma[f.g_full ? i : ix.nc]);
    const acc_t b = static_cast<acc_t>(beta[f.b_full ? i : ix.nc]);
    const auto e = spade::modulate_grad(static_cast<acc_t>(grad_y[i]), xhat, g, b, kAct, slope);
    const acc_t c1 = group_sums[ix.grp] * scale, c2 = group_sums[G + ix.grp] * scale;
    dx[i] = static_cast<scalar_t>(spade::input_grad(e.dxhat, xhat, rstd, c1, c2));
    if (dgamma != nullptr) dgamma[i] = static_cast<scalar_t>(e.dz * xhat);
    if (dbeta != nullptr) dbeta[i] = static_cast<scalar_t>(e.dz);
  }
}

// ---- the backward's per-(n, c) sums ----

template <typename acc_t>
struct Sums4 {
  acc_t v[4] = {};
};
template <typename T>
__device__ __forceinline__ Sums4<T> shfl_down(const Sums4<T>& s, int offset) {
  Sums4<T> o;
#pragma unroll
  for (int q = 0; q < 4; ++q) o.v[q] = __shfl_down_sync(0xffffffffu, s.v[q], offset);
  return o;
}
template <typename T>
__device__ __forceinline__ void combine(Sums4<T>& a, const Sums4<T>& b) {
#pragma unroll
  for (int q = 0; q < 4; ++q) a.v[q] += b.v[q];
}

template <typename scalar_t, typename acc_t, int kAct>
__device__ __forceinline__ void accumulate(Sums4<acc_t>& s, acc_t dy, acc_t xv, acc_t m, acc_t rstd, acc_t g, acc_t b,
                                           acc_t slope) {
  const acc_t xhat = spade::normalise(xv, m, rstd);
  const auto e = spade::modulate_grad(dy, xhat, g, b, kAct, slope);
  s.v[0] += e.dxhat;
  s.v[1] += e.dxhat * xhat;
  s.v[2] += e.dz;
  s.v[3] += e.dz * xhat;
}

// The backward sums of piece p (sample p % N, a chunk of positions) go to sums[q * P + p * C + c],
// P = pieces * C: with one chunk, the [4, N, C] result itself.
template <typename scalar_t, typename acc_t, int kAct>
__global__ void __launch_bounds__(kThreads)
    reduce_nchw_kernel(const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ x,
                       const scalar_t* __restrict__ gamma, const scalar_t* __restrict__ beta,
                       const acc_t* __restrict__ mean, const acc_t* __restrict__ var, acc_t* __restrict__ sums, Dims d,
                       Flags f, Split sp, acc_t eps, acc_t slope) {
  const int64_t i = blockIdx.x, c = i % d.C, p = i / d.C;  // (piece, channel)
  const int64_t nc = sp.sample_begin(p) * d.C + c, grp = f.batch ? c : nc;
  const acc_t m = mean[grp], rstd = spade::rsqrt_(var[grp] + eps);
  const int64_t end = sp.position_end(p, d.S);
  Sums4<acc_t> s;
  for (int64_t j = sp.position_begin(p) + threadIdx.x; j < end; j += kThreads) {
    const int64_t e = nc * d.S + j;
    accumulate<scalar_t, acc_t, kAct>(s, static_cast<acc_t>(grad_y[e]), static_cast<acc_t>(x[e]), m, rstd,
                                      static_cast<acc_t>(gamma[f.g_full ? e : nc]),
                                      static_cast<acc_t>(beta[f.b_full ? e : nc]), slope);
  }
  s = block_reduce(s);
  if (threadIdx.x == 0) {
    const int64_t P = sp.pieces() * d.C;
#pragma unroll
    for (int q = 0; q < 4; ++q) sums[q * P + i] = s.v[q];
  }
}

template <typename scalar_t, typename acc_t, int kAct>
__global__ void __launch_bounds__(kLanesC* kLanesR)
    reduce_cl_kernel(const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ x,
                     const scalar_t* __restrict__ gamma, const scalar_t* __restrict__ beta,
                     const acc_t* __restrict__ mean, const acc_t* __restrict__ var, acc_t* __restrict__ sums, Dims d,
                     Flags f, Split sp, acc_t eps, acc_t slope) {
  const int64_t p = blockIdx.x, n = sp.sample_begin(p), c = static_cast<int64_t>(blockIdx.y) * kLanesC + threadIdx.x;
  const int64_t nc = n * d.C + c;
  Sums4<acc_t> s;
  if (c < d.C) {
    const int64_t grp = f.batch ? c : nc;
    const acc_t m = mean[grp], rstd = spade::rsqrt_(var[grp] + eps);
    const int64_t end = sp.position_end(p, d.S);
    for (int64_t r = sp.position_begin(p) + threadIdx.y; r < end; r += kLanesR) {
      const int64_t e = (n * d.S + r) * d.C + c;
      accumulate<scalar_t, acc_t, kAct>(s, static_cast<acc_t>(grad_y[e]), static_cast<acc_t>(x[e]), m, rstd,
                                        static_cast<acc_t>(gamma[f.g_full ? e : nc]),
                                        static_cast<acc_t>(beta[f.b_full ? e : nc]), slope);
    }
  }
  s = lane_reduce<kLanesR>(s);
  if (threadIdx.y == 0 && c < d.C) {
    const int64_t P = sp.pieces() * d.C;
#pragma unroll
    for (int q = 0; q < 4; ++q) sums[q * P + p * d.C + c] = s.v[q];
  }
}

// sums [4, G] from part [4, Q, G]: as merge_moments_kernel, with plain sums.
template <typename acc_t>
__global__ void __launch_bounds__(kLanesC* kMergeLanes)
    merge_sums_kernel(const acc_t* __restrict__ part, acc_t* __restrict__ sums, int64_t G, int64_t Q) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kLanesC + threadIdx.x;
  Sums4<acc_t> s;
  if (g < G)
#pragma unroll 4
    for (int64_t q = threadIdx.y; q < Q; q += kMergeLanes)
#pragma unroll
      for (int k = 0; k < 4; ++k) s.v[k] += part[(k * Q + q) * G + g];
  s = lane_reduce<kMergeLanes>(s);
  if (threadIdx.y == 0 && g < G)
#pragma unroll
    for (int k = 0; k < 4; ++k) sums[k * G + g] = s.v[k];
}

constexpr int64_t kMaxBlocks = int64_t(1) << 22;  // grid-stride beyond this

int64_t elementwise_blocks(int64_t total) {
  return std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, kMaxBlocks));
}

// Calls f with int32_t or int64_t: 32-bit when no index, nor index plus the grid's stride, overflows.
template <typename F>
void with_index_type(int64_t total, F&& f) {
  if (total + kMaxBlocks * kThreads <= INT32_MAX)
    f(int32_t{});
  else
    f(int64_t{});
}

Dims dims(const SpadeShape& s) { return {s.N, s.C, s.S}; }

// The Split of a reduction on the current device: NCHW blocks take one channel and kThreads positions
// a step, channels_last blocks kLanesC channels and kLanesR rows a step.
Split reduction_split(const SpadeShape& s, bool channels_last, bool batch) {
  int sms = 0;  // a cached attribute: cheap to ask each call
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t target = int64_t(sms) * kBlocksPerSM;
  if (channels_last)
    return spade::plan_split(s.N, s.S, (s.C + kLanesC - 1) / kLanesC, target, kLanesR * kPerThread, batch);
  return spade::plan_split(s.N, s.S, s.C, target, kThreads * kPerThread, batch);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> spade_norm_stats_cuda(const at::Tensor& x, bool channels_last, bool batch) {
  SpadeShape s = check_spade_x(x, channels_last);
  check_cuda(x, "spade_norm", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto opts = x.options().dtype(spade_stats_type(x));
  const std::vector<int64_t> shape = batch ? std::vector<int64_t>{s.C} : std::vector<int64_t>{s.N, s.C};
  if (x.numel() == 0) return {at::zeros(shape, opts), at::zeros(shape, opts)};
  at::Tensor mean = at::empty(shape, opts), var = at::empty(shape, opts);
  const Split sp = reduction_split(s, channels_last, batch);
  const int64_t G = mean.numel(), Q = sp.pieces() * s.C / G;  // partials per group
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spade_norm_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor part;  // Moments<acc_t> [pieces, C], when groups span several pieces
    MomentsOut<acc_t> out{mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>(), nullptr};
    if (Q > 1) {
      part = at::empty({sp.pieces() * s.C * 3}, opts);
      out.part = reinterpret_cast<Moments<acc_t>*>(part.mutable_data_ptr<acc_t>());
    }
    if (!channels_last) {
      stats_nchw_kernel<scalar_t, acc_t>
          <<<sp.pieces() * s.C, kThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(), out, dims(s), sp);
    } else {
      const dim3 grid(sp.pieces(), (s.C + kLanesC - 1) / kLanesC);
      stats_cl_kernel<scalar_t, acc_t>
          <<<grid, dim3(kLanesC, kLanesR), 0, stream>>>(x.const_data_ptr<scalar_t>(), out, dims(s), sp);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (Q > 1) {
      merge_moments_kernel<acc_t>
          <<<(G + kLanesC - 1) / kLanesC, dim3(kLanesC, kMergeLanes), 0, stream>>>(out.part, out.mean, out.var, G, Q);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {mean, var};
}

at::Tensor spade_norm_forward_cuda(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                                   const at::Tensor& mean, const at::Tensor& var, double eps, bool channels_last,
                                   int64_t activation, double slope) {
  const SpadeShape s = check_spade_inputs(x, gamma, beta, mean, var, channels_last, activation);
  check_cuda(x, "spade_norm", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const Flags f{channels_last, s.batch, gamma.dim() == 3, beta.dim() == 3};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spade_norm_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_activation(activation, [&](auto a) {
      with_index_type(x.numel(), [&](auto index) {
        using index_t = decltype(index);
        forward_kernel<scalar_t, acc_t, decltype(a)::value, index_t>
            <<<elementwise_blocks(x.numel()), kThreads, 0, stream>>>(
                x.const_data_ptr<scalar_t>(), gamma.const_data_ptr<scalar_t>(), beta.const_data_ptr<scalar_t>(),
                mean.const_data_ptr<acc_t>(), var.const_data_ptr<acc_t>(), y.mutable_data_ptr<scalar_t>(),
                static_cast<index_t>(x.numel()), dims(s), f, acc_t(eps), acc_t(slope));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return y;
}

at::Tensor spade_norm_backward_reduce_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& gamma,
                                           const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var,
                                           double eps, bool channels_last, int64_t activation, double slope) {
  const SpadeShape s = check_spade_inputs(x, gamma, beta, mean, var, channels_last, activation);
  check_spade_grad(grad_y, x);
  check_cuda(x, "spade_norm", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  if (x.numel() == 0) return at::zeros({4, s.N, s.C}, mean.options());
  at::Tensor sums = at::empty({4, s.N, s.C}, mean.options());
  const Split sp = reduction_split(s, channels_last, false);  // the sums are per (n, c)
  // With one chunk the pieces are the samples and write the result; else [4, chunks, N, C] partials.
  at::Tensor part = sp.chunks == 1 ? sums : at::empty({4, sp.chunks, s.N, s.C}, mean.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const Flags f{channels_last, s.batch, gamma.dim() == 3, beta.dim() == 3};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spade_norm_backward_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_activation(activation, [&](auto a) {
      constexpr int kAct = decltype(a)::value;
      if (!channels_last) {
        reduce_nchw_kernel<scalar_t, acc_t, kAct><<<sp.pieces() * s.C, kThreads, 0, stream>>>(
            grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), gamma.const_data_ptr<scalar_t>(),
            beta.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(), var.const_data_ptr<acc_t>(),
            part.mutable_data_ptr<acc_t>(), dims(s), f, sp, acc_t(eps), acc_t(slope));
      } else {
        const dim3 grid(sp.pieces(), (s.C + kLanesC - 1) / kLanesC);
        reduce_cl_kernel<scalar_t, acc_t, kAct><<<grid, dim3(kLanesC, kLanesR), 0, stream>>>(
            grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), gamma.const_data_ptr<scalar_t>(),
            beta.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(), var.const_data_ptr<acc_t>(),
            part.mutable_data_ptr<acc_t>(), dims(s), f, sp, acc_t(eps), acc_t(slope));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (sp.chunks > 1) {
      const int64_t G = s.N * s.C;
      merge_sums_kernel<acc_t><<<(G + kLanesC - 1) / kLanesC, dim3(kLanesC, kMergeLanes), 0, stream>>>(
          part.const_data_ptr<acc_t>(), sums.mutable_data_ptr<acc_t>(), G, sp.chunks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return sums;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spade_norm_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& group_sums, double scale, double eps,
    bool channels_last, int64_t activation, double slope, bool gamma_grad, bool beta_grad) {
  const SpadeShape s = check_spade_backward_inputs(grad_y, x, gamma, beta, mean, var, group_sums, channels_last,
                                                   activation, gamma_grad, beta_grad);
  check_cuda(x, "spade_norm", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x);
  at::Tensor dg = gamma_grad ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor db = beta_grad ? at::empty_like(x) : at::empty({0}, x.options());
  if (x.numel() == 0) return {dx, dg, db};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const Flags f{channels_last, s.batch, gamma.dim() == 3, beta.dim() == 3};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spade_norm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_activation(activation, [&](auto a) {
      with_index_type(x.numel(), [&](auto index) {
        using index_t = decltype(index);
        backward_kernel<scalar_t, acc_t, decltype(a)::value, index_t>
            <<<elementwise_blocks(x.numel()), kThreads, 0, stream>>>(
                grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), gamma.const_data_ptr<scalar_t>(),
                beta.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(), var.const_data_ptr<acc_t>(),
                group_sums.const_data_ptr<acc_t>(), dx.mutable_data_ptr<scalar_t>(),
                gamma_grad ? dg.mutable_data_ptr<scalar_t>() : nullptr,
                beta_grad ? db.mutable_data_ptr<scalar_t>() : nullptr, static_cast<index_t>(x.numel()), mean.numel(),
                dims(s), f, acc_t(scale), acc_t(eps), acc_t(slope));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {dx, dg, db};
}

TORCH_LIBRARY_IMPL(fnevr, CUDA, m) {
  m.impl("_spade_norm_stats", &spade_norm_stats_cuda);
  m.impl("_spade_norm_forward", &spade_norm_forward_cuda);
  m.impl("_spade_norm_backward_reduce", &spade_norm_backward_reduce_cuda);
  m.impl("_spade_norm_backward", &spade_norm_backward_cuda);
}

}  // namespace fnevr
