// The fused MLP + compositing op on CUDA (shapes and math: mlp_composite.h, mlp_composite_math.h).
//
// A block of kThreads threads owns a tile of whole rays (rows = rays * D samples). The tile's codes
// and every activation live in shared memory in the accumulator type T (fp32; fp64 for fp64), each
// [rows, width] row-major with an odd row pitch (see pitch()). Weights are read from global memory
// (small: they stay in L1/L2) as staged once per call by one small kernel (stage_params_kernel):
// W^T for the forward products, so that a warp reads consecutive outputs, and W and b in T.
// Every layer is one block-wide SIMT product (block_gemm); a __syncthreads() separates any two
// steps where one writes what the other reads. Row-wise dots (densities, e_i) take a warp per row.
// Per-ray compositing is mlp_composite_math.h's.
// Forward: one block per tile. Backward: a persistent grid (a fixed multiple of the SM count) whose
// blocks loop over tiles: recompute the tile's forward, composite backward, backprop layer by
// layer, each activation overwritten by its gradient once its last reader is done. Weight gradients
// go into the block's own slice of a [grid, P] partial buffer (no atomics), then a second kernel
// sums the slices in block order: results are deterministic for a given GPU model.
#include "common/cuda.cuh"
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
#include <type_traits>
#include <vector>

namespace fnevr {
namespace {

using mlp::Dims;

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

// Row pitch (in values) of a [rows, width] tile buffer in shared memory: odd. A warp that reads one
// column of several rows at once (block_gemm's A operand when N < 32: 32 / N row groups a warp, 4
// rows apart; and, before row_dots, the density and e_i loops: a row per lane) finds rows r and r'
// (r - r') * pitch banks apart, mod 32. At a pitch of H = 128 they all shared one bank: 2- to 4-way
// conflicts in block_gemm, 32-way in those loops. An odd pitch puts any 32 consecutive rows in 32
// distinct banks (fp64: a warp's 8-byte reads go as two halves of 16 lanes, in 16 distinct pairs).
__host__ __device__ inline int pitch(int64_t width) { return static_cast<int>(width | 1); }

// Shared-memory values per tile of `rows` samples; Tile carves them in this order.
__host__ __device__ int64_t tile_values(const Dims& d, int64_t rows) {
  return rows * (pitch(d.Es) + pitch(d.Ec) + 5 * pitch(d.H) + pitch(d.H4) + 3);
}

// A block's buffers for one tile (mlp::TileBuffers) in shared memory, rows an odd pitch apart.
template <typename T>
struct Tile : mlp::TileBuffers<T> {
  int ps, pc, ph, ph4;  // row pitches of s, c, the [rows, H] buffers and a2

  __device__ Tile(T* p, const Net<T>& n, int rows)
      : ps(pitch(n.Es)), pc(pitch(n.Ec)), ph(pitch(n.H)), ph4(pitch(n.H4)) {
    this->carve(p, rows, ps, pc, ph, ph4);
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

// For each row r < rows: f(r, sum over k < K of x[r * ldx + k] v(r, k)), a warp per row, its lanes
// over k: consecutive values (no bank conflicts; v's global reads coalesce).
template <typename T, typename V, typename F>
__device__ void row_dots(const T* x, int ldx, int K, int rows, V&& v, F&& f) {
  const int lane = threadIdx.x % 32;
  for (int r = threadIdx.x / 32; r < rows; r += blockDim.x / 32) {  // whole warps: the shuffles need all lanes
    T acc = T(0);
    for (int k = lane; k < K; k += 32) acc += x[r * ldx + k] * v(r, k);
#pragma unroll
    acc = group_sum(acc, 32);
    if (lane == 0) f(r, acc);
  }
}

// y = relu(x W^T + b) for layer l, x [rows, in] (pitch ldx), y [rows, out] (pitch ldy).
template <typename T>
__device__ void layer_forward(const Net<T>& net, int l, const T* x, int ldx, int in, int out, T* y, int ldy, int rows) {
  const T* b = net.b[l];
  const Term<T> terms[1] = {{x, ldx, 1, net.wt[l], out, in}};
  block_gemm(rows, out, terms, [&](int m, int n, T v) { y[m * ldy + n] = mlp::relu(v + b[n]); });
}

// Codes [rows, width] (dense, global) into a tile buffer of pitch ld.
template <typename T, typename scalar_t>
__device__ void load_codes(const scalar_t* src, int width, int rows, T* dst, int ld) {
  for (int i = threadIdx.x; i < rows * width; i += blockDim.x) dst[i / width * ld + i % width] = static_cast<T>(src[i]);
}

// The MLP on the tile's samples [first, first + rows): fills s, c, a0..a4, h and sigma. Ends synced.
template <typename T, typename scalar_t>
__device__ void tile_forward(const Net<T>& net, const Tile<T>& t, const scalar_t* color, const scalar_t* shape,
                             int64_t first, int rows) {
  const int Es = net.Es, Ec = net.Ec, H = net.H, H4 = net.H4, ph = t.ph;
  load_codes(shape + first * Es, Es, rows, t.s, t.ps);
  load_codes(color + first * Ec, Ec, rows, t.c, t.pc);
  __syncthreads();
  layer_forward(net, kShapeIn, t.s, t.ps, Es, H, t.a0, ph, rows);
  __syncthreads();
  layer_forward(net, kShapeHidden, t.a0, ph, H, H, t.a1, ph, rows);
  __syncthreads();
  // density, shape_feature and color_in: independent readers of a1 and c
  const T* wd = net.w[kDensity];
  const T bd = net.b[kDensity][0];
  row_dots(t.a1, ph, H, rows, [&](int, int k) { return wd[k]; }, [&](int r, T z) { t.sigma[r] = z + bd; });
  layer_forward(net, kShapeFeature, t.a1, ph, H, H4, t.a2, t.ph4, rows);
  layer_forward(net, kColorIn, t.c, t.pc, Ec, H, t.a3, ph, rows);
  __syncthreads();
  {  // fuse reads [a2; a3]: the rows of its W^T are a2's H4, then a3's H
    const T* b = net.b[kFuse];
    T* y = t.a4;
    const Term<T> terms[2] = {{t.a2, t.ph4, 1, net.wt[kFuse], H, H4}, {t.a3, ph, 1, net.wt[kFuse] + H4 * H, H, H}};
    block_gemm(rows, H, terms, [&](int m, int n, T v) { y[m * ph + n] = mlp::relu(v + b[n]); });
  }
  __syncthreads();
  layer_forward(net, kFuseHidden, t.a4, ph, H, H, t.h, ph, rows);
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
    for (int i = 0; i < D; ++i) f += t.w[j * D + i] * t.h[(j * D + i) * t.ph + k];
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

// In place over y [rows, in] (pitch ldy), the output of the layer below: y = relu_backward(dz W, y),
// with dz [rows, out] (pitch ldz) and W [out, in] at w with row stride ldw.
template <typename T>
__device__ void input_grad_through_relu(const T* dz, int ldz, int out, const T* w, int ldw, int in, T* y, int ldy,
                                        int rows) {
  const Term<T> terms[1] = {{dz, ldz, 1, w, ldw, out}};
  block_gemm(rows, in, terms, [&](int m, int n, T v) { y[m * ldy + n] = mlp::relu_backward(v, y[m * ldy + n]); });
}

// The codes' gradient dz W [rows, in] straight to global memory (dz [rows, out], pitch ldz).
template <typename T, typename scalar_t>
__device__ void code_grad(const T* dz, int ldz, int out, const T* w, int in, int rows, scalar_t* dst) {
  const Term<T> terms[1] = {{dz, ldz, 1, w, in, out}};
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
    const int ph = t.ph, ph4 = t.ph4;
    const scalar_t* gF = grad_features + span.ray0 * H;
    row_dots(
        t.h, ph, H, rows, [&](int r, int k) { return static_cast<T>(gF[r / D * H + k]); },
        [&](int r, T e) { t.e[r] = e + static_cast<T>(grad_weight_sum[span.ray0 + r / D]); });
    __syncthreads();
    for (int j = threadIdx.x; j < span.rays; j += blockDim.x)
      ray_backward(t.sigma + j * D, t.e + j * D, D, net.inclusive, net.act, t.w + j * D, t.e + j * D);
    __syncthreads();
    // h := fuse_hidden's dz = relu'(.) w_i gF
    for (int idx = threadIdx.x; idx < rows * H; idx += blockDim.x) {
      const int r = idx / H, k = idx % H;
      T& h = t.h[r * ph + k];
      h = relu_backward(t.w[r] * static_cast<T>(gF[r / D * H + k]), h);
    }
    __syncthreads();

    // fuse_hidden
    weight_grad(t.h, ph, t.a4, ph, H, H, rows, g + off.of[kFuseHiddenW], H);
    bias_grad(t.h, ph, H, rows, g + off.of[kFuseHiddenB]);
    __syncthreads();
    input_grad_through_relu(t.h, ph, H, net.w[kFuseHidden], H, H, t.a4, ph, rows);  // a4: fuse's dz
    __syncthreads();
    // fuse, whose weight's columns are [a2 part | a3 part]
    weight_grad(t.a4, ph, t.a2, ph4, H, H4, rows, g + off.of[kFuseW], H4 + H);
    weight_grad(t.a4, ph, t.a3, ph, H, H, rows, g + off.of[kFuseW] + H4, H4 + H);
    bias_grad(t.a4, ph, H, rows, g + off.of[kFuseB]);
    __syncthreads();
    input_grad_through_relu(t.a4, ph, H, net.w[kFuse] + H4, H4 + H, H, t.a3, ph, rows);  // a3: color_in's dz
    input_grad_through_relu(t.a4, ph, H, net.w[kFuse], H4 + H, H4, t.a2, ph4, rows);     // a2: shape_feature's dz
    __syncthreads();
    // color_in; shape_feature and density (both read a1)
    weight_grad(t.a3, ph, t.c, t.pc, H, Ec, rows, g + off.of[kColorInW], Ec);
    bias_grad(t.a3, ph, H, rows, g + off.of[kColorInB]);
    code_grad(t.a3, ph, H, net.w[kColorIn], Ec, rows, grad_color + span.first * Ec);
    weight_grad(t.a2, ph4, t.a1, ph, H4, H, rows, g + off.of[kShapeFeatureW], H);
    bias_grad(t.a2, ph4, H4, rows, g + off.of[kShapeFeatureB]);
    weight_grad(t.e, 1, t.a1, ph, 1, H, rows, g + off.of[kDensityW], H);
    bias_grad(t.e, 1, 1, rows, g + off.of[kDensityB]);
    __syncthreads();
    {  // a1 := shape_hidden's dz, from shape_feature's dz and dL/dsigma
      T* y = t.a1;
      const Term<T> terms[2] = {{t.a2, ph4, 1, net.w[kShapeFeature], H, H4}, {t.e, 1, 0, net.w[kDensity], H, 1}};
      block_gemm(rows, H, terms, [&](int m, int n, T v) { y[m * ph + n] = relu_backward(v, y[m * ph + n]); });
    }
    __syncthreads();
    // shape_hidden
    weight_grad(t.a1, ph, t.a0, ph, H, H, rows, g + off.of[kShapeHiddenW], H);
    bias_grad(t.a1, ph, H, rows, g + off.of[kShapeHiddenB]);
    __syncthreads();
    input_grad_through_relu(t.a1, ph, H, net.w[kShapeHidden], H, H, t.a0, ph, rows);  // a0: shape_in's dz
    __syncthreads();
    // shape_in
    weight_grad(t.a0, ph, t.s, t.ps, H, Es, rows, g + off.of[kShapeInW], Es);
    bias_grad(t.a0, ph, H, rows, g + off.of[kShapeInB]);
    code_grad(t.a0, ph, H, net.w[kShapeIn], Es, rows, grad_shape + span.first * Es);
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

// What stage_params_kernel copies: copy j writes dst[j] [rows[j], cols[j]] in T, from src[j] as is,
// or transposed (src [cols, rows]).
template <typename T, typename scalar_t>
struct Staging {
  static constexpr int kMax = 3 * kLayers;  // W^T, W and b of every layer
  const scalar_t* src[kMax];
  T* dst[kMax];
  int rows[kMax], cols[kMax];
  bool transpose[kMax];
  int count = 0;
};

// All of a call's parameter copies in one launch: copy blockIdx.y, each thread some destination
// values (writes coalesce; the sources are small and cached).
template <typename T, typename scalar_t>
__global__ void stage_params_kernel(Staging<T, scalar_t> st) {
  const int j = blockIdx.y, rows = st.rows[j], cols = st.cols[j];
  const scalar_t* src = st.src[j];
  T* dst = st.dst[j];
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < rows * cols; i += gridDim.x * blockDim.x)
    dst[i] = static_cast<T>(st.transpose[j] ? src[i % cols * rows + i / cols] : src[i]);
}

// The parameters as the kernels read them, staged into `workspace` by one launch on `stream`: every
// W^T in T (forward), and W and b converted to T unless the params are T already (fp32, fp64: then
// they are read in place). Staged per call rather than cached: parameters change in place every
// optimiser step, and a cache would have to key on each tensor's version counter and storage and
// hold copies across calls; this is one small launch (~60K values at H=128) and no state.
template <typename T, typename scalar_t>
Net<T> make_net(const Dims& d, at::TensorList params, int64_t R, int64_t D, bool inclusive, int64_t act,
                at::Tensor& workspace, cudaStream_t stream) {
  constexpr bool convert = !std::is_same_v<T, scalar_t>;
  int64_t values = 0;
  for (int l = 0; l < kLayers; ++l)
    values += params[2 * l].numel() * (convert ? 2 : 1) + (convert ? params[2 * l + 1].numel() : 0);
  workspace = at::empty({values}, params[0].options().dtype(c10::CppTypeToScalarType<T>::value));
  T* next = workspace.mutable_data_ptr<T>();
  Staging<T, scalar_t> st;
  int most = 0;
  auto stage = [&](const at::Tensor& src, int rows, int cols, bool transpose) {
    const int j = st.count++;
    st.src[j] = src.const_data_ptr<scalar_t>();
    st.dst[j] = next;
    st.rows[j] = rows;
    st.cols[j] = cols;
    st.transpose[j] = transpose;
    next += int64_t(rows) * cols;
    most = std::max(most, rows * cols);
    return st.dst[j];
  };
  Net<T> net;
  for (int l = 0; l < kLayers; ++l) {
    const at::Tensor &w = params[2 * l], &b = params[2 * l + 1];
    const int out = static_cast<int>(w.size(0)), in = static_cast<int>(w.size(1));
    net.wt[l] = stage(w, in, out, true);
    if constexpr (convert) {
      net.w[l] = stage(w, out, in, false);
      net.b[l] = stage(b, 1, out, false);
    } else {
      net.w[l] = w.const_data_ptr<T>();
      net.b[l] = b.const_data_ptr<T>();
    }
  }
  constexpr int threads = 256;
  const dim3 grid(static_cast<unsigned>(std::min((most + threads - 1) / threads, 32)), st.count);
  stage_params_kernel<T, scalar_t><<<grid, threads, 0, stream>>>(st);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  TORCH_CHECK(bytes <= limit, "fnevr mlp_composite (cuda): one ray's activations (D=", net.D, ", H=", d.H, ") need ",
              bytes, " bytes of shared memory, more than the GPU's ", limit);
  net.rays_per_tile = static_cast<int>(rays);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  return static_cast<size_t>(bytes);
}

int64_t num_tiles(int64_t R, int rays_per_tile) {
  const int64_t tiles = (R + rays_per_tile - 1) / rays_per_tile;
  TORCH_CHECK(tiles <= INT_MAX, "fnevr mlp_composite (cuda): too many rays (", R, ")");
  return tiles;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mlp_composite_forward_cuda(const at::Tensor& color_code,
                                                              const at::Tensor& shape_code, at::TensorList params,
                                                              bool inclusive, int64_t activation) {
  const Dims d = check_mlp_composite_inputs(color_code, shape_code, params, activation);
  check_cuda(color_code, "mlp_composite", "color_code");
  const c10::cuda::CUDAGuard guard(color_code.device());
  const int64_t R = color_code.size(0), D = color_code.size(1);
  if (R == 0 || D == 0) return {at::zeros({R, d.H}, color_code.options()), at::zeros({R}, color_code.options())};
  at::Tensor features = at::empty({R, d.H}, color_code.options());
  at::Tensor weight_sum = at::empty({R}, color_code.options());
  const auto dtype = color_code.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mlp_composite_forward_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto stream = c10::cuda::getCurrentCUDAStream();
    at::Tensor staged;
    Net<T> net = make_net<T, scalar_t>(d, params, R, D, inclusive, activation, staged, stream);
    const auto kernel = mlp_composite_forward_kernel<T, scalar_t>;
    const size_t smem = fit_tile(net, d, kernel);
    const int64_t tiles = num_tiles(R, net.rays_per_tile);
    kernel<<<static_cast<unsigned>(tiles), kThreads, smem, stream>>>(
        net, color_code.const_data_ptr<scalar_t>(), shape_code.const_data_ptr<scalar_t>(),
        features.mutable_data_ptr<scalar_t>(), weight_sum.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {features, weight_sum};
}

std::vector<at::Tensor> mlp_composite_backward_cuda(const at::Tensor& grad_features, const at::Tensor& grad_weight_sum,
                                                    const at::Tensor& color_code, const at::Tensor& shape_code,
                                                    at::TensorList params, bool inclusive, int64_t activation) {
  const Dims d = check_mlp_composite_inputs(color_code, shape_code, params, activation);
  check_mlp_composite_grads(grad_features, grad_weight_sum, color_code, d);
  check_cuda(color_code, "mlp_composite", "color_code");
  const c10::cuda::CUDAGuard guard(color_code.device());
  const int64_t R = color_code.size(0), D = color_code.size(1);
  if (R == 0 || D == 0) return zero_mlp_composite_grads(color_code, shape_code, params);
  std::vector<at::Tensor> grads = {at::empty_like(color_code), at::empty_like(shape_code)};
  const auto dtype = color_code.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mlp_composite_backward_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto stream = c10::cuda::getCurrentCUDAStream();
    at::Tensor staged;
    Net<T> net = make_net<T, scalar_t>(d, params, R, D, inclusive, activation, staged, stream);
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
    kernel<<<G, kThreads, smem, stream>>>(
        net, off, color_code.const_data_ptr<scalar_t>(), shape_code.const_data_ptr<scalar_t>(),
        grad_features.const_data_ptr<scalar_t>(), grad_weight_sum.const_data_ptr<scalar_t>(),
        grads[0].mutable_data_ptr<scalar_t>(), grads[1].mutable_data_ptr<scalar_t>(), partials.mutable_data_ptr<T>(), P,
        tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor flat = at::empty({P}, acc_options);
    const int blocks = static_cast<int>(std::min<int64_t>((P + kThreads - 1) / kThreads, int64_t(4) * sms));
    sum_partials_kernel<T>
        <<<blocks, kThreads, 0, stream>>>(partials.const_data_ptr<T>(), P, G, flat.mutable_data_ptr<T>());
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
