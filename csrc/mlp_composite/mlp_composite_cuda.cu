// The fused MLP + compositing op on CUDA (shapes and math: mlp_composite.h, mlp_composite_math.h).
//
// A block of kThreads threads owns a tile of whole rays (rows = rays * D samples). The tile's codes
// and every activation live in shared memory in the accumulator type T (fp32; fp64 for fp64), each
// [rows, width] row-major. Weights are read from global memory (small: they stay in L1/L2), once
// converted to T on the host side, forward ones transposed so that a warp reads consecutive outputs.
// Every layer is one block-wide SIMT product (block_gemm); a __syncthreads() separates any two
// steps where one writes what the other reads. Per-ray compositing is mlp_composite_math.h's.
// Forward: one block per tile. Backward: a persistent grid (a fixed multiple of the SM count) whose
// blocks loop over tiles: recompute the tile's forward, composite backward, backprop layer by
// layer, each activation overwritten by its gradient once its last reader is done. Weight gradients
// go into the block's own slice of a [grid, P] partial buffer (no atomics), then a second kernel
// sums the slices in block order: results are deterministic for a given GPU model.
#include "mlp_composite.h"
#include "mlp_composite_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <vector>

namespace fnevr {
namespace {

using mlp::Dims;

constexpr int kThreads = 256;
constexpr int kTileRows = 32;      // samples per tile when D allows (whole rays, at least one)
constexpr int kRowsPerThread = 4;  // block_gemm: rows of one output column per thread
constexpr int kBlocksPerSM = 2;    // backward's persistent grid

// The seven Linear layers, in PARAMETERS order (layer l owns params 2l and 2l + 1).
enum Layer : int { kShapeIn, kShapeHidden, kDensity, kShapeFeature, kColorIn, kFuse, kFuseHidden, kLayers };
static_assert(kFuse == mlp::kFuseW / 2 && kLayers == mlp::kNumParams / 2, "layer order is PARAMETERS'");

// The MLP's parameters in T on the device, and the problem's sizes.
template <typename T>
struct Net {
  const T* wt[kLayers];  // forward: W^T [in, out]
  const T* w[kLayers];   // backward: W [out, in]
  const T* b[kLayers];   // [out]
  int Ec, Es, H, H4, D;
  int rays_per_tile;
  int64_t R;
  bool inclusive;
  int act;
};

// Shared-memory values per tile of `rows` samples; Tile carves them in this order.
__host__ __device__ int64_t tile_values(const Dims& d, int64_t rows) {
  return rows * (d.Es + d.Ec + 5 * d.H + d.H4 + 3);
}

template <typename T>
struct Tile {
  T *s, *c;                    // shape code [rows, Es], colour code [rows, Ec]
  T *a0, *a1, *a2, *a3, *a4;   // the layers' outputs: [rows, H], except a2 [rows, H4]
  T* h;                        // fuse_hidden's output [rows, H]
  T *sigma, *w, *e;            // per sample: density, weight, dL/dw then dL/dsigma

  __device__ Tile(T* p, const Net<T>& n, int rows) {
    auto take = [&](int count) { T* q = p; p += count; return q; };
    s = take(rows * n.Es);
    c = take(rows * n.Ec);
    a0 = take(rows * n.H);
    a1 = take(rows * n.H);
    a2 = take(rows * n.H4);
    a3 = take(rows * n.H);
    a4 = take(rows * n.H);
    h = take(rows * n.H);
    sigma = take(rows);
    w = take(rows);
    e = take(rows);
  }
};

// One term of a product: A (M x K; element (m, k) at a[m * a_rs + k * a_cs]) times B (K x N;
// element (k, n) at b[k * ldb + n]).
template <typename T>
struct Term {
  const T* a;
  int a_rs, a_cs;
  const T* b;
  int ldb, K;
};

// For every (m, n) of M x N: f(m, n, sum over the terms of sum_k A(m, k) B(k, n)), each (m, n) by
// exactly one thread. A thread takes kRowsPerThread rows of one column at a time; consecutive
// threads take consecutive columns, so B's reads are coalesced and A's are broadcasts. Rows past
// M are computed on row M - 1 and dropped. No synchronisation inside.
template <typename T, int NT, typename F>
__device__ void block_gemm(int M, int N, const Term<T> (&terms)[NT], F&& f) {
  const int groups = (M + kRowsPerThread - 1) / kRowsPerThread;
  for (int idx = threadIdx.x; idx < groups * N; idx += blockDim.x) {
    const int n = idx % N, m0 = idx / N * kRowsPerThread;
    T acc[kRowsPerThread];
#pragma unroll
    for (int j = 0; j < kRowsPerThread; ++j) acc[j] = T(0);
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const Term<T>& tm = terms[t];
      const T* a[kRowsPerThread];
#pragma unroll
      for (int j = 0; j < kRowsPerThread; ++j) a[j] = tm.a + min(m0 + j, M - 1) * tm.a_rs;
      for (int k = 0; k < tm.K; ++k) {
        const T bkn = tm.b[k * tm.ldb + n];
#pragma unroll
        for (int j = 0; j < kRowsPerThread; ++j) acc[j] += a[j][k * tm.a_cs] * bkn;
      }
    }
#pragma unroll
    for (int j = 0; j < kRowsPerThread; ++j)
      if (m0 + j < M) f(m0 + j, n, acc[j]);
  }
}

// y = relu(x W^T + b) for layer l, x [rows, in], y [rows, out].
template <typename T>
__device__ void layer_forward(const Net<T>& net, int l, const T* x, int in, int out, T* y, int rows) {
  const T* b = net.b[l];
  const Term<T> terms[1] = {{x, in, 1, net.wt[l], out, in}};
  block_gemm(rows, out, terms, [&](int m, int n, T v) { y[m * out + n] = mlp::relu(v + b[n]); });
}

// The MLP on the tile's samples [first, first + rows): fills s, c, a0..a4, h and sigma. Ends synced.
template <typename T, typename scalar_t>
__device__ void tile_forward(const Net<T>& net, const Tile<T>& t, const scalar_t* color, const scalar_t* shape,
                             int64_t first, int rows) {
  const int Es = net.Es, Ec = net.Ec, H = net.H, H4 = net.H4;
  for (int i = threadIdx.x; i < rows * Es; i += blockDim.x) t.s[i] = static_cast<T>(shape[first * Es + i]);
  for (int i = threadIdx.x; i < rows * Ec; i += blockDim.x) t.c[i] = static_cast<T>(color[first * Ec + i]);
  __syncthreads();
  layer_forward(net, kShapeIn, t.s, Es, H, t.a0, rows);
  __syncthreads();
  layer_forward(net, kShapeHidden, t.a0, H, H, t.a1, rows);
  __syncthreads();
  // density, shape_feature and color_in: independent readers of a1 and c
  for (int r = threadIdx.x; r < rows; r += blockDim.x) {
    T z = net.b[kDensity][0];
    for (int k = 0; k < H; ++k) z += net.w[kDensity][k] * t.a1[r * H + k];
    t.sigma[r] = z;
  }
  layer_forward(net, kShapeFeature, t.a1, H, H4, t.a2, rows);
  layer_forward(net, kColorIn, t.c, Ec, H, t.a3, rows);
  __syncthreads();
  {  // fuse reads [a2; a3]: the rows of its W^T are a2's H4, then a3's H
    const T* b = net.b[kFuse];
    T* y = t.a4;
    const Term<T> terms[2] = {{t.a2, H4, 1, net.wt[kFuse], H, H4}, {t.a3, H, 1, net.wt[kFuse] + H4 * H, H, H}};
    block_gemm(rows, H, terms, [&](int m, int n, T v) { y[m * H + n] = mlp::relu(v + b[n]); });
  }
  __syncthreads();
  layer_forward(net, kFuseHidden, t.a4, H, H, t.h, rows);
  __syncthreads();
}

// Where a block's tile starts and how big it is.
struct TileSpan {
  int64_t ray0, first;  // first ray, first sample
  int rays, rows;
};

template <typename T>
__device__ TileSpan tile_span(const Net<T>& net, int64_t tile) {
  const int64_t ray0 = tile * net.rays_per_tile, left = net.R - ray0;
  const int rays = left < net.rays_per_tile ? static_cast<int>(left) : net.rays_per_tile;
  return {ray0, ray0 * net.D, rays, rays * net.D};
}

// Dynamic shared memory, carved by Tile.
template <typename T>
__device__ T* shared_values() {
  extern __shared__ __align__(16) unsigned char smem[];
  return reinterpret_cast<T*>(smem);
}

template <typename T, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    mlp_composite_forward_kernel(Net<T> net, const scalar_t* __restrict__ color, const scalar_t* __restrict__ shape,
                                 scalar_t* __restrict__ features, scalar_t* __restrict__ weight_sum) {
  const TileSpan span = tile_span(net, blockIdx.x);
  const Tile<T> t(shared_values<T>(), net, span.rows);
  tile_forward(net, t, color, shape, span.first, span.rows);
  const int D = net.D, H = net.H;
  for (int j = threadIdx.x; j < span.rays; j += blockDim.x)
    weight_sum[span.ray0 + j] =
        static_cast<scalar_t>(mlp::ray_weights(t.sigma + j * D, D, net.inclusive, net.act, t.w + j * D));
  __syncthreads();
  for (int idx = threadIdx.x; idx < span.rays * H; idx += blockDim.x) {
    const int j = idx / H, k = idx % H;
    T f = T(0);
    for (int i = 0; i < D; ++i) f += t.w[j * D + i] * t.h[(j * D + i) * H + k];
    features[(span.ray0 + j) * H + k] = static_cast<scalar_t>(f);
  }
}

// dW[o, i] += sum_r dz[r, o] x[r, i] over the tile's rows, in row order: the product dz^T x.
template <typename T>
__device__ void weight_grad(const T* dz, int ldz, const T* x, int ldx, int out, int in, int rows, T* dw, int ld_dw) {
  const Term<T> terms[1] = {{dz, 1, ldz, x, ldx, rows}};
  block_gemm(out, in, terms, [&](int o, int i, T v) { dw[o * ld_dw + i] += v; });
}

// db[o] += sum_r dz[r, o], in row order.
template <typename T>
__device__ void bias_grad(const T* dz, int ldz, int out, int rows, T* db) {
  for (int o = threadIdx.x; o < out; o += blockDim.x) {
    T s = T(0);
    for (int r = 0; r < rows; ++r) s += dz[r * ldz + o];
    db[o] += s;
  }
}

// In place over y [rows, in], the output of the layer below: y = relu_backward(dz W, y), with
// dz [rows, out] and W [out, in] at w with row stride ldw.
template <typename T>
__device__ void input_grad_through_relu(const T* dz, int out, const T* w, int ldw, int in, T* y, int rows) {
  const Term<T> terms[1] = {{dz, out, 1, w, ldw, out}};
  block_gemm(rows, in, terms, [&](int m, int n, T v) { y[m * in + n] = mlp::relu_backward(v, y[m * in + n]); });
}

// The codes' gradient dz W [rows, in] straight to global memory.
template <typename T, typename scalar_t>
__device__ void code_grad(const T* dz, int out, const T* w, int in, int rows, scalar_t* dst) {
  const Term<T> terms[1] = {{dz, out, 1, w, in, out}};
  block_gemm(rows, in, terms,
             [&](int m, int n, T v) { dst[static_cast<int64_t>(m) * in + n] = static_cast<scalar_t>(v); });
}

// The flat gradient layout of mlp_composite_math.h, as offsets into a block's partial slice.
struct Offsets {
  int64_t of[mlp::kNumParams];
};

template <typename T, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    mlp_composite_backward_kernel(Net<T> net, Offsets off, const scalar_t* __restrict__ color,
                                  const scalar_t* __restrict__ shape, const scalar_t* __restrict__ grad_features,
                                  const scalar_t* __restrict__ grad_weight_sum, scalar_t* __restrict__ grad_color,
                                  scalar_t* __restrict__ grad_shape, T* __restrict__ partials, int64_t P,
                                  int64_t tiles) {
  using namespace mlp;
  const int Es = net.Es, Ec = net.Ec, H = net.H, H4 = net.H4, D = net.D;
  T* g = partials + blockIdx.x * P;  // this block's weight gradients
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const TileSpan span = tile_span(net, tile);
    const int rows = span.rows;
    const Tile<T> t(shared_values<T>(), net, rows);
    tile_forward(net, t, color, shape, span.first, rows);

    // Compositing backward: e_i = <gF, h_i> + gS, then each ray's w_i and dL/dsigma_i (over e).
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
      const int64_t ray = span.ray0 + r / D;
      T e = static_cast<T>(grad_weight_sum[ray]);
      for (int k = 0; k < H; ++k) e += static_cast<T>(grad_features[ray * H + k]) * t.h[r * H + k];
      t.e[r] = e;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < span.rays; j += blockDim.x)
      ray_backward(t.sigma + j * D, t.e + j * D, D, net.inclusive, net.act, t.w + j * D, t.e + j * D);
    __syncthreads();
    // h := fuse_hidden's dz = relu'(.) w_i gF
    for (int idx = threadIdx.x; idx < rows * H; idx += blockDim.x) {
      const int r = idx / H, k = idx % H;
      const T gf = static_cast<T>(grad_features[(span.ray0 + r / D) * H + k]);
      t.h[idx] = relu_backward(t.w[r] * gf, t.h[idx]);
    }
    __syncthreads();

    // fuse_hidden
    weight_grad(t.h, H, t.a4, H, H, H, rows, g + off.of[kFuseHiddenW], H);
    bias_grad(t.h, H, H, rows, g + off.of[kFuseHiddenB]);
    __syncthreads();
    input_grad_through_relu(t.h, H, net.w[kFuseHidden], H, H, t.a4, rows);  // a4: fuse's dz
    __syncthreads();
    // fuse, whose weight's columns are [a2 part | a3 part]
    weight_grad(t.a4, H, t.a2, H4, H, H4, rows, g + off.of[kFuseW], H4 + H);
    weight_grad(t.a4, H, t.a3, H, H, H, rows, g + off.of[kFuseW] + H4, H4 + H);
    bias_grad(t.a4, H, H, rows, g + off.of[kFuseB]);
    __syncthreads();
    input_grad_through_relu(t.a4, H, net.w[kFuse] + H4, H4 + H, H, t.a3, rows);  // a3: color_in's dz
    input_grad_through_relu(t.a4, H, net.w[kFuse], H4 + H, H4, t.a2, rows);      // a2: shape_feature's dz
    __syncthreads();
    // color_in; shape_feature and density (both read a1)
    weight_grad(t.a3, H, t.c, Ec, H, Ec, rows, g + off.of[kColorInW], Ec);
    bias_grad(t.a3, H, H, rows, g + off.of[kColorInB]);
    code_grad(t.a3, H, net.w[kColorIn], Ec, rows, grad_color + span.first * Ec);
    weight_grad(t.a2, H4, t.a1, H, H4, H, rows, g + off.of[kShapeFeatureW], H);
    bias_grad(t.a2, H4, H4, rows, g + off.of[kShapeFeatureB]);
    weight_grad(t.e, 1, t.a1, H, 1, H, rows, g + off.of[kDensityW], H);
    bias_grad(t.e, 1, 1, rows, g + off.of[kDensityB]);
    __syncthreads();
    {  // a1 := shape_hidden's dz, from shape_feature's dz and dL/dsigma
      T* y = t.a1;
      const Term<T> terms[2] = {{t.a2, H4, 1, net.w[kShapeFeature], H, H4}, {t.e, 1, 0, net.w[kDensity], H, 1}};
      block_gemm(rows, H, terms, [&](int m, int n, T v) { y[m * H + n] = relu_backward(v, y[m * H + n]); });
    }
    __syncthreads();
    // shape_hidden
    weight_grad(t.a1, H, t.a0, H, H, H, rows, g + off.of[kShapeHiddenW], H);
    bias_grad(t.a1, H, H, rows, g + off.of[kShapeHiddenB]);
    __syncthreads();
    input_grad_through_relu(t.a1, H, net.w[kShapeHidden], H, H, t.a0, rows);  // a0: shape_in's dz
    __syncthreads();
    // shape_in
    weight_grad(t.a0, H, t.s, Es, H, Es, rows, g + off.of[kShapeInW], Es);
    bias_grad(t.a0, H, H, rows, g + off.of[kShapeInB]);
    code_grad(t.a0, H, net.w[kShapeIn], Es, rows, grad_shape + span.first * Es);
    __syncthreads();  // the next tile overwrites the workspace
  }
}

// out[p] = sum over the G slices of partials[g, p], in slice order.
template <typename T>
__global__ void sum_partials_kernel(const T* __restrict__ partials, int64_t P, int G, T* __restrict__ out) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < P;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    T s = T(0);
    for (int g = 0; g < G; ++g) s += partials[g * P + p];
    out[p] = s;
  }
}

// ---- host side ---------------------------------------------------------------------------------

// The parameters converted to T (forward weights also transposed); `keep` owns the memory.
template <typename T>
Net<T> make_net(const Dims& d, at::TensorList params, int64_t R, int64_t D, bool inclusive, int64_t act,
                std::vector<at::Tensor>& keep) {
  const auto dtype = c10::CppTypeToScalarType<T>::value;
  Net<T> net;
  for (int l = 0; l < kLayers; ++l) {
    at::Tensor w = params[2 * l].to(dtype).contiguous();
    at::Tensor wt = w.t().contiguous();
    at::Tensor b = params[2 * l + 1].to(dtype).contiguous();
    net.w[l] = w.const_data_ptr<T>();
    net.wt[l] = wt.const_data_ptr<T>();
    net.b[l] = b.const_data_ptr<T>();
    keep.insert(keep.end(), {w, wt, b});
  }
  net.Ec = static_cast<int>(d.Ec);
  net.Es = static_cast<int>(d.Es);
  net.H = static_cast<int>(d.H);
  net.H4 = static_cast<int>(d.H4);
  net.D = static_cast<int>(D);
  net.R = R;
  net.inclusive = inclusive;
  net.act = static_cast<int>(act);
  return net;
}

// An attribute of the current device (not ATen's device properties: their header needs cuSPARSE's).
int device_attribute(cudaDeviceAttr attr) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, c10::cuda::current_device()));
  return value;
}

// Rays per tile: about kTileRows samples, fewer if shared memory runs short; sets the kernel's
// dynamic shared memory limit and returns the bytes it needs.
template <typename T, typename Kernel>
size_t fit_tile(Net<T>& net, const Dims& d, Kernel kernel) {
  const int64_t limit = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  int64_t rays = std::max<int64_t>(1, kTileRows / net.D);
  while (rays > 1 && tile_values(d, rays * net.D) * int64_t(sizeof(T)) > limit) rays /= 2;
  const int64_t bytes = tile_values(d, rays * net.D) * sizeof(T);
  TORCH_CHECK(bytes <= limit, "fnevr mlp_composite (cuda): one ray's activations (D=", net.D, ", H=", d.H,
              ") need ", bytes, " bytes of shared memory, more than the GPU's ", limit);
  net.rays_per_tile = static_cast<int>(rays);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  return static_cast<size_t>(bytes);
}

int64_t num_tiles(int64_t R, int rays_per_tile) {
  const int64_t tiles = (R + rays_per_tile - 1) / rays_per_tile;
  TORCH_CHECK(tiles <= INT_MAX, "fnevr mlp_composite (cuda): too many rays (", R, ")");
  return tiles;
}

void check_cuda(const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "fnevr mlp_composite (cuda): expected CUDA tensors, got ", t.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mlp_composite_forward_cuda(const at::Tensor& color_code,
                                                              const at::Tensor& shape_code,
                                                              at::TensorList params, bool inclusive,
                                                              int64_t activation) {
  const Dims d = check_mlp_composite_inputs(color_code, shape_code, params, activation);
  check_cuda(color_code);
  const c10::cuda::CUDAGuard guard(color_code.device());
  const int64_t R = color_code.size(0), D = color_code.size(1);
  if (R == 0 || D == 0) return {at::zeros({R, d.H}, color_code.options()), at::zeros({R}, color_code.options())};
  at::Tensor features = at::empty({R, d.H}, color_code.options());
  at::Tensor weight_sum = at::empty({R}, color_code.options());
  const auto dtype = color_code.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mlp_composite_forward_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    std::vector<at::Tensor> keep;
    Net<T> net = make_net<T>(d, params, R, D, inclusive, activation, keep);
    const auto kernel = mlp_composite_forward_kernel<T, scalar_t>;
    const size_t smem = fit_tile(net, d, kernel);
    const int64_t tiles = num_tiles(R, net.rays_per_tile);
    kernel<<<static_cast<unsigned>(tiles), kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
        net, color_code.const_data_ptr<scalar_t>(), shape_code.const_data_ptr<scalar_t>(),
        features.mutable_data_ptr<scalar_t>(), weight_sum.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {features, weight_sum};
}

std::vector<at::Tensor> mlp_composite_backward_cuda(const at::Tensor& grad_features,
                                                    const at::Tensor& grad_weight_sum,
                                                    const at::Tensor& color_code,
                                                    const at::Tensor& shape_code, at::TensorList params,
                                                    bool inclusive, int64_t activation) {
  const Dims d = check_mlp_composite_inputs(color_code, shape_code, params, activation);
  check_mlp_composite_grads(grad_features, grad_weight_sum, color_code, d);
  check_cuda(color_code);
  const c10::cuda::CUDAGuard guard(color_code.device());
  const int64_t R = color_code.size(0), D = color_code.size(1);
  if (R == 0 || D == 0) return zero_mlp_composite_grads(color_code, shape_code, params);
  std::vector<at::Tensor> grads = {at::empty_like(color_code), at::empty_like(shape_code)};
  const auto dtype = color_code.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mlp_composite_backward_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto stream = c10::cuda::getCurrentCUDAStream();
    std::vector<at::Tensor> keep;
    Net<T> net = make_net<T>(d, params, R, D, inclusive, activation, keep);
    const auto kernel = mlp_composite_backward_kernel<T, scalar_t>;
    const size_t smem = fit_tile(net, d, kernel);
    const int64_t tiles = num_tiles(R, net.rays_per_tile);
    const int sms = device_attribute(cudaDevAttrMultiProcessorCount);
    const int G = static_cast<int>(std::min<int64_t>(tiles, int64_t(kBlocksPerSM) * sms));
    Offsets off;
    for (int q = 0; q < mlp::kNumParams; ++q) off.of[q] = mlp::param_offset(d, q);
    const int64_t P = mlp::num_param_elements(d);
    const auto acc_options = color_code.options().dtype(c10::CppTypeToScalarType<T>::value);
    at::Tensor partials = at::zeros({G, P}, acc_options);
    kernel<<<G, kThreads, smem, stream>>>(net, off, color_code.const_data_ptr<scalar_t>(),
                                         shape_code.const_data_ptr<scalar_t>(),
                                         grad_features.const_data_ptr<scalar_t>(),
                                         grad_weight_sum.const_data_ptr<scalar_t>(),
                                         grads[0].mutable_data_ptr<scalar_t>(), grads[1].mutable_data_ptr<scalar_t>(),
                                         partials.mutable_data_ptr<T>(), P, tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor flat = at::empty({P}, acc_options);
    const int blocks = static_cast<int>(std::min<int64_t>((P + kThreads - 1) / kThreads, int64_t(4) * sms));
    sum_partials_kernel<T><<<blocks, kThreads, 0, stream>>>(partials.const_data_ptr<T>(), P, G,
                                                            flat.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    for (int q = 0; q < mlp::kNumParams; ++q)  // copies: the outputs own their memory
      grads.push_back(flat.narrow(0, off.of[q], mlp::param_numel(d, q))
                          .view(params[q].sizes())
                          .to(dtype, /*non_blocking=*/false, /*copy=*/true));
  });
  return grads;
}

TORCH_LIBRARY_IMPL(fnevr, CUDA, m) {
  m.impl("_mlp_composite_forward", &mlp_composite_forward_cuda);
  m.impl("_mlp_composite_backward", &mlp_composite_backward_cuda);
}

}  // namespace fnevr
