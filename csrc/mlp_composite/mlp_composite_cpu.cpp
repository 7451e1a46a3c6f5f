// The fused MLP + compositing op on the CPU (shapes and math: mlp_composite.h, mlp_composite_math.h).
//
// Rays go in tiles of about kTileRows samples (whole rays). A tile's samples are the rows of small
// matrices, so each layer is one product [rows, in] x [in, out], computed by a register-blocked
// micro-kernel (kMR x kNR accumulators) over weights converted once per call to the accumulator
// type and laid out for it. All of a tile's activations live in a per-thread workspace; nothing of
// size [R, D, H] is ever allocated.
// Forward: the tile's layers, then each ray's compositing. Backward: the tile's forward again,
// compositing backward, then backprop layer by layer; each activation is overwritten by its
// gradient once its last reader is done. Weight gradients accumulate into one partial buffer per
// chunk of tiles; chunks depend on R and D only, not on the thread count, and their partials are
// summed in chunk order, so the results are bit-identical run to run and across thread counts.
#include "common/cpu.h"
#include "common/cpu_clones.h"
#include "common/cpu_memory.h"
#include "mlp_composite.h"
#include "mlp_composite_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <vector>

#if !defined(__GNUC__)
#error "mlp_composite_cpu.cpp uses GCC/Clang vector extensions"
#endif

namespace fnevr {
namespace {

using mlp::Dims;

// ---- the micro-kernel ----------------------------------------------------------------------------
// GCC's vector types: its auto-vectoriser vectorises a register block along k instead of n, and the
// product then runs ~8x slower.
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Simd<double> {
  typedef double type __attribute__((vector_size(32)));
};
template <typename T>
using Vec = typename Simd<T>::type;
template <typename T>
constexpr int kLanes = sizeof(Vec<T>) / sizeof(T);

// A micro-tile is kMR rows x kVecs vectors: 12 accumulators, 2 rows of B and a broadcast fill the
// 16 AVX registers.
constexpr int kMR = 6;
constexpr int kVecs = 2;
template <typename T>
constexpr int64_t kNR = kVecs * kLanes<T>;  // the micro-tile's columns: 16 floats or 8 doubles

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// One term of a product: A (M x K; element (m, k) at a[m * a_rs + k * a_cs]) times B (K x N; row k
// at b + k * ldb, contiguous and readable up to N rounded up to kNR: zero padding).
template <typename T>
struct Term {
  const T* a;
  int64_t a_rs, a_cs;
  const T* b;
  int64_t ldb, K;
};

// What a product does with its result C (M x N, row m at c + m * ldc; only columns < N are touched).
enum class Mode {
  kBiasRelu,    // C = relu(sum + bias): a layer's forward
  kMasked,      // C = C <= 0 ? 0 : sum: a gradient through the ReLU whose output C holds, in place
  kPlain,       // C = sum
  kAccumulate,  // C += sum: weight gradients
};

// One vector <-> the first n values at p (all kLanes when n >= kLanes; the rest read as 0). Whole
// vectors move with one unaligned load or store; only a tile's last columns go through a buffer.
template <typename T>
inline void load_vec(Vec<T>& v, const T* p, int64_t n) {
  if (n >= kLanes<T>) {
    std::memcpy(&v, p, sizeof v);
    return;
  }
  T tmp[kLanes<T>] = {};
  if (n > 0) std::memcpy(tmp, p, n * sizeof(T));
  std::memcpy(&v, tmp, sizeof v);
}
template <typename T>
inline void store_vec(T* p, const Vec<T>& v, int64_t n) {
  if (n >= kLanes<T>) {
    std::memcpy(p, &v, sizeof v);
    return;
  }
  T tmp[kLanes<T>];
  std::memcpy(tmp, &v, sizeof v);
  if (n > 0) std::memcpy(p, tmp, n * sizeof(T));
}

// Rows [m0, m0 + mr) x columns [n0, n0 + nr) of the product. Rows past mr read row mr - 1 (so any
// mr <= kMR runs the same code) and are dropped.
template <typename T>
inline __attribute__((always_inline)) void micro_tile(std::initializer_list<Term<T>> terms, int64_t m0, int mr,
                                                      int64_t n0, int64_t nr, Mode mode, const T* bias, T* c,
                                                      int64_t ldc) {
  constexpr int L = kLanes<T>;
  Vec<T> acc[kMR][kVecs];
  for (int i = 0; i < kMR; ++i)
    for (int j = 0; j < kVecs; ++j) {
      if (mode == Mode::kBiasRelu)
        load_vec(acc[i][j], bias + n0 + j * L, L);  // biases are padded
      else if (mode == Mode::kAccumulate)
        load_vec(acc[i][j], c + (m0 + std::min(i, mr - 1)) * ldc + n0 + j * L, nr - j * L);
      else
        acc[i][j] = Vec<T>{};
    }
  for (const Term<T>& t : terms) {
    const T* a[kMR];
    for (int i = 0; i < kMR; ++i) a[i] = t.a + (m0 + std::min(i, mr - 1)) * t.a_rs;
    const T* b = t.b + n0;
    for (int64_t k = 0; k < t.K; ++k) {
      Vec<T> bk[kVecs];
      for (int j = 0; j < kVecs; ++j) load_vec(bk[j], b + k * t.ldb + j * L, L);
      for (int i = 0; i < kMR; ++i) {
        const T aik = a[i][k * t.a_cs];
        for (int j = 0; j < kVecs; ++j) acc[i][j] += aik * bk[j];
      }
    }
  }
  const Vec<T> zero{};
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < kVecs; ++j) {
      T* out = c + (m0 + i) * ldc + n0 + j * L;
      const int64_t n = nr - j * L;
      Vec<T> v = acc[i][j];
      // Selects as mlp::relu and mlp::relu_backward: NaN passes as in PyTorch.
      if (mode == Mode::kBiasRelu) {
        v = v <= zero ? zero : v;
      } else if (mode == Mode::kMasked) {
        Vec<T> y;
        load_vec(y, out, n);
        v = y <= zero ? zero : v;
      }
      store_vec(out, v, n);
    }
}

// C (M x N) from the sum of the terms' products, by micro-tiles; column blocks outermost, so the
// block of B they read (K x kNR) stays in L1 while the rows go by.
template <typename T>
FNEVR_CPU_CLONES void gemm(int64_t M, int64_t N, std::initializer_list<Term<T>> terms, Mode mode, const T* bias, T* c,
                           int64_t ldc) {
  for (int64_t n0 = 0; n0 < N; n0 += kNR<T>)
    for (int64_t m0 = 0; m0 < M; m0 += kMR)
      micro_tile(terms, m0, static_cast<int>(std::min<int64_t>(kMR, M - m0)), n0, std::min(kNR<T>, N - n0), mode, bias,
                 c, ldc);
}

// out[k] += sum over rows of z[r, k], row by row (fixed order): bias gradients.
template <typename T>
FNEVR_CPU_CLONES void add_column_sums(const T* __restrict__ z, int64_t ld, int64_t rows, int64_t n,
                                      T* __restrict__ out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < n; ++k) out[k] += z[r * ld + k];
}

// ---- the MLP's parameters, converted and laid out for the products -------------------------------

// Columns [col0, col0 + in) of a Linear weight [out, in_total], in the two layouts the products
// read as B, zero-padded to whole micro-tiles.
template <typename T>
struct Weight {
  int64_t ld_fwd, ld_bwd;
  std::vector<T> fwd;  // W^T [in, ld_fwd]: the forward, y = x W^T
  std::vector<T> bwd;  // W [out, ld_bwd]: the input gradient, dx = dy W
};

template <typename T, typename scalar_t>
Weight<T> make_weight(const at::Tensor& w, int64_t col0, int64_t in) {
  const int64_t out = w.size(0), in_total = w.size(1);
  const scalar_t* src = w.const_data_ptr<scalar_t>();
  Weight<T> r{round_up(out, kNR<T>), round_up(in, kNR<T>), {}, {}};
  r.fwd.assign(in * r.ld_fwd, T(0));
  r.bwd.assign(out * r.ld_bwd, T(0));
  for (int64_t o = 0; o < out; ++o)
    for (int64_t k = 0; k < in; ++k) {
      const T v = static_cast<T>(src[o * in_total + col0 + k]);
      r.fwd[k * r.ld_fwd + o] = v;
      r.bwd[o * r.ld_bwd + k] = v;
    }
  return r;
}

template <typename T, typename scalar_t>
std::vector<T> make_bias(const at::Tensor& b) {
  std::vector<T> r(round_up(b.size(0), kNR<T>), T(0));
  const scalar_t* src = b.const_data_ptr<scalar_t>();
  for (int64_t o = 0; o < b.size(0); ++o) r[o] = static_cast<T>(src[o]);
  return r;
}

template <typename T>
struct Mlp {
  Dims d;
  // density's W is one row, w_sigma, read from its bwd layout in both directions
  Weight<T> shape_in, shape_hidden, density, shape_feature, color_in, fuse_a2, fuse_a3, fuse_hidden;
  std::vector<T> b_shape_in, b_shape_hidden, b_shape_feature, b_color_in, b_fuse, b_fuse_hidden;
  T b_density;
};

template <typename T, typename scalar_t>
Mlp<T> make_mlp(const Dims& d, at::TensorList p) {
  using namespace mlp;
  auto weight = [&](int i, int64_t col0, int64_t in) { return make_weight<T, scalar_t>(p[i], col0, in); };
  auto bias = [&](int i) { return make_bias<T, scalar_t>(p[i]); };
  return {d,
          weight(kShapeInW, 0, d.Es),
          weight(kShapeHiddenW, 0, d.H),
          weight(kDensityW, 0, d.H),
          weight(kShapeFeatureW, 0, d.H),
          weight(kColorInW, 0, d.Ec),
          weight(kFuseW, 0, d.H4),  // fuse's input is [a2; a3]: its two column blocks
          weight(kFuseW, d.H4, d.H),
          weight(kFuseHiddenW, 0, d.H),
          bias(kShapeInB),
          bias(kShapeHiddenB),
          bias(kShapeFeatureB),
          bias(kColorInB),
          bias(kFuseB),
          bias(kFuseHiddenB),
          static_cast<T>(p[kDensityB].const_data_ptr<scalar_t>()[0])};
}

// ---- one tile of rays ----------------------------------------------------------------------------

// Samples per tile (16 micro-tile rows): a few hundred KB of activations at H = 128, L2-resident.
constexpr int64_t kTileRows = 96;

int64_t rays_per_tile(int64_t D) { return std::max<int64_t>(1, kTileRows / D); }

// A thread's buffers for one tile (mlp::TileBuffers), each row padded to kNR values (the padding
// stays zero), and one ray's dL/dF.
template <typename T>
struct Workspace : mlp::TileBuffers<T> {
  int64_t ld_s, ld_c, ld_h, ld_h4;
  std::vector<T> mem;
  T* g;

  Workspace(const Dims& d, int64_t rows)
      : ld_s(round_up(d.Es, kNR<T>)),
        ld_c(round_up(d.Ec, kNR<T>)),
        ld_h(round_up(d.H, kNR<T>)),
        ld_h4(round_up(d.H4, kNR<T>)),
        mem(rows * (ld_s + ld_c + 5 * ld_h + ld_h4 + 3) + ld_h, T(0)) {
    g = this->carve(mem.data(), rows, ld_s, ld_c, ld_h, ld_h4);
  }
};

// Everything a tile needs besides its workspace.
template <typename T, typename scalar_t>
struct Problem {
  const Mlp<T>& m;
  int64_t R, D;
  const scalar_t* color;  // [R, D, Ec]
  const scalar_t* shape;  // [R, D, Es]
  bool inclusive;
  int act;
};

template <typename T, typename scalar_t>
void load_rows(const scalar_t* src, int64_t rows, int64_t n, T* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < n; ++k) dst[r * ld + k] = static_cast<T>(src[r * n + k]);
}

template <typename T, typename scalar_t>
void store_rows(const T* src, int64_t ld, int64_t rows, int64_t n, scalar_t* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < n; ++k) dst[r * n + k] = static_cast<scalar_t>(src[r * ld + k]);
}

// The MLP on the tile's samples [first, first + rows): fills s, c, a0..a4, h and sigma.
template <typename T, typename scalar_t>
void tile_forward(const Problem<T, scalar_t>& p, Workspace<T>& ws, int64_t first, int64_t rows) {
  const Mlp<T>& m = p.m;
  const Dims& d = m.d;
  load_rows(p.shape + first * d.Es, rows, d.Es, ws.s, ws.ld_s);
  load_rows(p.color + first * d.Ec, rows, d.Ec, ws.c, ws.ld_c);
  auto layer = [&](const T* x, int64_t ldx, int64_t in, const Weight<T>& w, const std::vector<T>& b, int64_t out, T* y,
                   int64_t ldy) {
    gemm<T>(rows, out, {{x, ldx, 1, w.fwd.data(), w.ld_fwd, in}}, Mode::kBiasRelu, b.data(), y, ldy);
  };
  layer(ws.s, ws.ld_s, d.Es, m.shape_in, m.b_shape_in, d.H, ws.a0, ws.ld_h);
  layer(ws.a0, ws.ld_h, d.H, m.shape_hidden, m.b_shape_hidden, d.H, ws.a1, ws.ld_h);
  for (int64_t r = 0; r < rows; ++r) ws.sigma[r] = dot<T>(m.density.bwd.data(), ws.a1 + r * ws.ld_h, d.H) + m.b_density;
  layer(ws.a1, ws.ld_h, d.H, m.shape_feature, m.b_shape_feature, d.H4, ws.a2, ws.ld_h4);
  layer(ws.c, ws.ld_c, d.Ec, m.color_in, m.b_color_in, d.H, ws.a3, ws.ld_h);
  gemm<T>(rows, d.H,
          {{ws.a2, ws.ld_h4, 1, m.fuse_a2.fwd.data(), m.fuse_a2.ld_fwd, d.H4},
           {ws.a3, ws.ld_h, 1, m.fuse_a3.fwd.data(), m.fuse_a3.ld_fwd, d.H}},
          Mode::kBiasRelu, m.b_fuse.data(), ws.a4, ws.ld_h);
  layer(ws.a4, ws.ld_h, d.H, m.fuse_hidden, m.b_fuse_hidden, d.H, ws.h, ws.ld_h);
}

// F = sum_i w_i h_i and S = sum_i w_i for each of the tile's rays.
template <typename T, typename scalar_t>
FNEVR_CPU_CLONES void tile_composite(const Problem<T, scalar_t>& p, Workspace<T>& ws, int64_t ray0, int64_t rays,
                                     scalar_t* features, scalar_t* weight_sum) {
  const int64_t D = p.D, H = p.m.d.H;
  for (int64_t j = 0; j < rays; ++j) {
    weight_sum[ray0 + j] =
        static_cast<scalar_t>(mlp::ray_weights(ws.sigma + j * D, D, p.inclusive, p.act, ws.w + j * D));
    T* __restrict__ f = ws.g;
    std::fill(f, f + H, T(0));
    for (int64_t i = 0; i < D; ++i) {
      const T wi = ws.w[j * D + i];
      const T* __restrict__ hi = ws.h + (j * D + i) * ws.ld_h;
      for (int64_t k = 0; k < H; ++k) f[k] += wi * hi[k];
    }
    for (int64_t k = 0; k < H; ++k) features[(ray0 + j) * H + k] = static_cast<scalar_t>(f[k]);
  }
}

// Compositing backward for each of the tile's rays: e (dL/dw_i, then dL/dsigma_i), w, and h
// replaced by the gradient of fuse_hidden's pre-activation, relu'(.) w_i dL/dF.
template <typename T, typename scalar_t>
FNEVR_CPU_CLONES void tile_composite_backward(const Problem<T, scalar_t>& p, Workspace<T>& ws, int64_t ray0,
                                              int64_t rays, const scalar_t* grad_features,
                                              const scalar_t* grad_weight_sum) {
  const int64_t D = p.D, H = p.m.d.H;
  for (int64_t j = 0; j < rays; ++j) {
    T* __restrict__ g = ws.g;
    for (int64_t k = 0; k < H; ++k) g[k] = static_cast<T>(grad_features[(ray0 + j) * H + k]);
    const T gs = static_cast<T>(grad_weight_sum[ray0 + j]);
    for (int64_t i = 0; i < D; ++i) ws.e[j * D + i] = dot<T>(g, ws.h + (j * D + i) * ws.ld_h, H) + gs;
    mlp::ray_backward(ws.sigma + j * D, ws.e + j * D, D, p.inclusive, p.act, ws.w + j * D, ws.e + j * D);
    for (int64_t i = 0; i < D; ++i) {
      const T wi = ws.w[j * D + i];
      T* __restrict__ hi = ws.h + (j * D + i) * ws.ld_h;
      for (int64_t k = 0; k < H; ++k) hi[k] = mlp::relu_backward(wi * g[k], hi[k]);
    }
  }
}

// Backprop through the layers of a tile whose compositing backward is done. Weight and bias
// gradients go to `grads` (the flat layout of mlp_composite_math.h), the codes' to grad_color and
// grad_shape. Each step's comment names what the overwritten buffer holds afterwards.
template <typename T, typename scalar_t>
void tile_layers_backward(const Problem<T, scalar_t>& p, Workspace<T>& ws, int64_t first, int64_t rows, T* grads,
                          scalar_t* grad_color, scalar_t* grad_shape) {
  using namespace mlp;
  const Mlp<T>& m = p.m;
  const Dims& d = m.d;
  auto grad_of = [&](int param) { return grads + param_offset(d, param); };
  // dW += dz^T x: the product's A is dz transposed (rows of the weight = columns of dz).
  auto weight_grad = [&](const T* dz, int64_t ldz, int64_t out, const T* x, int64_t ldx, int64_t in, T* dw,
                         int64_t ld_dw) {
    gemm<T>(out, in, {{dz, 1, ldz, x, ldx, rows}}, Mode::kAccumulate, nullptr, dw, ld_dw);
  };
  // dx = dz W, then through x's ReLU when x is an activation (in place over x).
  auto input_grad = [&](const T* dz, int64_t ldz, int64_t out, const Weight<T>& w, int64_t in, Mode mode, T* x,
                        int64_t ldx) {
    gemm<T>(rows, in, {{dz, ldz, 1, w.bwd.data(), w.ld_bwd, out}}, mode, nullptr, x, ldx);
  };

  // fuse_hidden (dz in h)
  weight_grad(ws.h, ws.ld_h, d.H, ws.a4, ws.ld_h, d.H, grad_of(kFuseHiddenW), d.H);
  add_column_sums(ws.h, ws.ld_h, rows, d.H, grad_of(kFuseHiddenB));
  input_grad(ws.h, ws.ld_h, d.H, m.fuse_hidden, d.H, Mode::kMasked, ws.a4, ws.ld_h);  // a4: fuse's dz
  // fuse, whose weight's columns are [a2 part | a3 part]
  weight_grad(ws.a4, ws.ld_h, d.H, ws.a2, ws.ld_h4, d.H4, grad_of(kFuseW), d.H4 + d.H);
  weight_grad(ws.a4, ws.ld_h, d.H, ws.a3, ws.ld_h, d.H, grad_of(kFuseW) + d.H4, d.H4 + d.H);
  add_column_sums(ws.a4, ws.ld_h, rows, d.H, grad_of(kFuseB));
  input_grad(ws.a4, ws.ld_h, d.H, m.fuse_a3, d.H, Mode::kMasked, ws.a3, ws.ld_h);    // a3: color_in's dz
  input_grad(ws.a4, ws.ld_h, d.H, m.fuse_a2, d.H4, Mode::kMasked, ws.a2, ws.ld_h4);  // a2: shape_feature's dz
  // color_in
  weight_grad(ws.a3, ws.ld_h, d.H, ws.c, ws.ld_c, d.Ec, grad_of(kColorInW), d.Ec);
  add_column_sums(ws.a3, ws.ld_h, rows, d.H, grad_of(kColorInB));
  input_grad(ws.a3, ws.ld_h, d.H, m.color_in, d.Ec, Mode::kPlain, ws.c, ws.ld_c);  // c: the colour code's grad
  store_rows(ws.c, ws.ld_c, rows, d.Ec, grad_color + first * d.Ec);
  // shape_feature and density, both reading a1
  weight_grad(ws.a2, ws.ld_h4, d.H4, ws.a1, ws.ld_h, d.H, grad_of(kShapeFeatureW), d.H);
  add_column_sums(ws.a2, ws.ld_h4, rows, d.H4, grad_of(kShapeFeatureB));
  weight_grad(ws.e, 1, 1, ws.a1, ws.ld_h, d.H, grad_of(kDensityW), d.H);
  add_column_sums(ws.e, 1, rows, 1, grad_of(kDensityB));
  gemm<T>(rows, d.H,
          {{ws.a2, ws.ld_h4, 1, m.shape_feature.bwd.data(), m.shape_feature.ld_bwd, d.H4},
           {ws.e, 1, 0, m.density.bwd.data(), m.density.ld_bwd, 1}},
          Mode::kMasked, nullptr, ws.a1, ws.ld_h);  // a1: shape_hidden's dz
  // shape_hidden
  weight_grad(ws.a1, ws.ld_h, d.H, ws.a0, ws.ld_h, d.H, grad_of(kShapeHiddenW), d.H);
  add_column_sums(ws.a1, ws.ld_h, rows, d.H, grad_of(kShapeHiddenB));
  input_grad(ws.a1, ws.ld_h, d.H, m.shape_hidden, d.H, Mode::kMasked, ws.a0, ws.ld_h);  // a0: shape_in's dz
  // shape_in
  weight_grad(ws.a0, ws.ld_h, d.H, ws.s, ws.ld_s, d.Es, grad_of(kShapeInW), d.Es);
  add_column_sums(ws.a0, ws.ld_h, rows, d.H, grad_of(kShapeInB));
  input_grad(ws.a0, ws.ld_h, d.H, m.shape_in, d.Es, Mode::kPlain, ws.s, ws.ld_s);  // s: the shape code's grad
  store_rows(ws.s, ws.ld_s, rows, d.Es, grad_shape + first * d.Es);
}

// ---- the entry points ----------------------------------------------------------------------------

template <typename scalar_t>
void forward(const Problem<at::opmath_type<scalar_t>, scalar_t>& p, scalar_t* features, scalar_t* weight_sum) {
  using T = at::opmath_type<scalar_t>;
  const int64_t tile = rays_per_tile(p.D), tiles = (p.R + tile - 1) / tile;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    Workspace<T> ws(p.m.d, tile * p.D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t ray0 = t * tile, rays = std::min(tile, p.R - ray0);
      tile_forward(p, ws, ray0 * p.D, rays * p.D);
      tile_composite(p, ws, ray0, rays, features, weight_sum);
    }
  });
}

// Partial weight gradients: at most kMaxChunks buffers (enough to balance a few dozen threads), each
// summing at least kMinTilesPerChunk tiles.
constexpr int64_t kMaxChunks = 32;
constexpr int64_t kMinTilesPerChunk = 4;

// -> the weight gradients in the flat layout of mlp_composite_math.h.
template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> backward(const Problem<at::opmath_type<scalar_t>, scalar_t>& p,
                                                const scalar_t* grad_features, const scalar_t* grad_weight_sum,
                                                scalar_t* grad_color, scalar_t* grad_shape) {
  using T = at::opmath_type<scalar_t>;
  const int64_t tile = rays_per_tile(p.D), tiles = (p.R + tile - 1) / tile;
  const int64_t per_chunk = std::max(kMinTilesPerChunk, (tiles + kMaxChunks - 1) / kMaxChunks);
  const int64_t chunks = (tiles + per_chunk - 1) / per_chunk;
  const int64_t P = mlp::num_param_elements(p.m.d);
  std::unique_ptr<T[]> partials(new T[chunks * P]);  // each chunk zeroes its own, in parallel
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    Workspace<T> ws(p.m.d, tile * p.D);
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      T* partial = partials.get() + chunk * P;
      std::fill(partial, partial + P, T(0));
      for (int64_t t = chunk * per_chunk; t < std::min(tiles, (chunk + 1) * per_chunk); ++t) {
        const int64_t ray0 = t * tile, rays = std::min(tile, p.R - ray0);
        tile_forward(p, ws, ray0 * p.D, rays * p.D);
        tile_composite_backward(p, ws, ray0, rays, grad_features, grad_weight_sum);
        tile_layers_backward(p, ws, ray0 * p.D, rays * p.D, partial, grad_color, grad_shape);
      }
    }
  });
  std::vector<T> total(partials.get(), partials.get() + P);
  at::parallel_for(0, P, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t chunk = 1; chunk < chunks; ++chunk)
      for (int64_t i = i0; i < i1; ++i) total[i] += partials[chunk * P + i];
  });
  return total;
}

template <typename scalar_t>
Mlp<at::opmath_type<scalar_t>> prepare(const Dims& d, at::TensorList params) {
  return make_mlp<at::opmath_type<scalar_t>, scalar_t>(d, params);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mlp_composite_forward_cpu(const at::Tensor& color_code, const at::Tensor& shape_code,
                                                             at::TensorList params, bool inclusive,
                                                             int64_t activation) {
  const Dims d = check_mlp_composite_inputs(color_code, shape_code, params, activation);
  const int64_t R = color_code.size(0), D = color_code.size(1);
  if (R == 0 || D == 0) return {at::zeros({R, d.H}, color_code.options()), at::zeros({R}, color_code.options())};
  at::Tensor features = at::empty({R, d.H}, color_code.options());
  at::Tensor weight_sum = at::empty({R}, color_code.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, color_code.scalar_type(), "mlp_composite_forward_cpu", [&] {
    const auto mlp = prepare<scalar_t>(d, params);
    forward<scalar_t>({mlp, R, D, color_code.const_data_ptr<scalar_t>(), shape_code.const_data_ptr<scalar_t>(),
                       inclusive, static_cast<int>(activation)},
                      features.mutable_data_ptr<scalar_t>(), weight_sum.mutable_data_ptr<scalar_t>());
  });
  return {features, weight_sum};
}

std::vector<at::Tensor> mlp_composite_backward_cpu(const at::Tensor& grad_features, const at::Tensor& grad_weight_sum,
                                                   const at::Tensor& color_code, const at::Tensor& shape_code,
                                                   at::TensorList params, bool inclusive, int64_t activation) {
  const Dims d = check_mlp_composite_inputs(color_code, shape_code, params, activation);
  check_mlp_composite_grads(grad_features, grad_weight_sum, color_code, d);
  const int64_t R = color_code.size(0), D = color_code.size(1);
  if (R == 0 || D == 0) return zero_mlp_composite_grads(color_code, shape_code, params);
  std::vector<at::Tensor> grads = {empty_for_writing(color_code), empty_for_writing(shape_code)};
  for (const at::Tensor& t : params) grads.push_back(at::empty_like(t));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, color_code.scalar_type(), "mlp_composite_backward_cpu", [&] {
        const auto mlp = prepare<scalar_t>(d, params);
        const auto flat =
            backward<scalar_t>({mlp, R, D, color_code.const_data_ptr<scalar_t>(), shape_code.const_data_ptr<scalar_t>(),
                                inclusive, static_cast<int>(activation)},
                               grad_features.const_data_ptr<scalar_t>(), grad_weight_sum.const_data_ptr<scalar_t>(),
                               grads[0].mutable_data_ptr<scalar_t>(), grads[1].mutable_data_ptr<scalar_t>());
        for (int q = 0; q < mlp::kNumParams; ++q) {
          scalar_t* dst = grads[2 + q].mutable_data_ptr<scalar_t>();
          const int64_t offset = mlp::param_offset(d, q);
          for (int64_t i = 0; i < mlp::param_numel(d, q); ++i) dst[i] = static_cast<scalar_t>(flat[offset + i]);
        }
      });
  return grads;
}

// The schemas of this op's kernel entry points (fnevr/ops/mlp_composite.py calls them; the CUDA kernels
// implement the same ones). Defined here, in fnevr._C, which fnevr._C_cuda needs loaded first.
TORCH_LIBRARY_FRAGMENT(fnevr, m) {
  m.def(
      "_mlp_composite_forward(Tensor color_code, Tensor shape_code, Tensor[] params, bool inclusive, "
      "int activation) -> (Tensor, Tensor)");
  m.def(
      "_mlp_composite_backward(Tensor grad_features, Tensor grad_weight_sum, Tensor color_code, "
      "Tensor shape_code, Tensor[] params, bool inclusive, int activation) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fnevr, CPU, m) {
  m.impl("_mlp_composite_forward", &mlp_composite_forward_cpu);
  m.impl("_mlp_composite_backward", &mlp_composite_backward_cpu);
}

}  // namespace fnevr
