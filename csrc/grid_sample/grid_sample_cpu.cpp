// Grid sampling on the CPU. Output points go in blocks of kBlock whose taps are computed once, in
// loops over points that vectorise (grid_sample_math.h's source_index_fast, then floor, weights and
// offsets as arrays: at 3 channels the taps are most of the work). Then each block is read out:
// with channels_last, each point loops over its contiguous channels; with NCHW, each point loops
// over kPlanes channel planes, then the next kPlanes. The hot loops are also compiled for AVX2
// (cpu_clones.h).
//
// The input gradient is a scatter made deterministic without atomics. A task owns a band of one
// image's output points, walks it in order, and adds into grad_input (band 0) or into a private
// buffer over the input rows its taps touch (the other bands; a warp moves pixels a little, so
// these are a slice of the image); the buffers are then added in band order. The bands depend on
// the thread count (one per thread an image can use), so results are bit-identical run to run at
// a given thread count. The grid gradient comes from the same pass (one writer per point).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/cpu.h"
#include "common/cpu_clones.h"
#include "common/strides.h"
#include "grid_sample.h"
#include "grid_sample_math.h"

namespace fnevr {
namespace {

using grid_sample::Coord;

constexpr int64_t kBlock = 128;       // output points whose taps are computed together
constexpr int64_t kTaskWork = 16384;  // points x channels per task: enough to amortise its scheduling
constexpr int64_t kPlanes = 4;        // NCHW: channel planes read per pass over a block's points

struct Dims {
  int64_t N, C, H, W, Ho, Wo;
  int mode, padding;
  bool align_corners;
  int64_t points() const { return Ho * Wo; }
  int64_t blocks() const { return (points() + kBlock - 1) / kBlock; }
};

Dims dims_of(const at::Tensor& input, const at::Tensor& grid, int64_t mode, int64_t padding, bool align_corners) {
  return {input.size(0), input.size(1), input.size(2),          input.size(3),
          grid.size(1),  grid.size(2),  static_cast<int>(mode), static_cast<int>(padding),
          align_corners};
}

// Pixel coordinates along one axis, with d coordinate / d grid value, of count grid values at
// g[0], g[2], ...: source_index_fast in a vectorised loop, source_index where that is not exact.
template <int P, bool AC, typename acc_t, typename scalar_t>
FNEVR_CPU_CLONES void axis_coords(const scalar_t* g, int64_t count, int64_t size, acc_t* x, acc_t* dx) {
  bool exact[kBlock];
  int inexact = 0;
  for (int64_t i = 0; i < count; ++i) {
    const Coord<acc_t> c = grid_sample::source_index_fast(static_cast<acc_t>(g[2 * i]), size, P, AC, exact[i]);
    x[i] = c.x, dx[i] = c.dx;
    inexact |= !exact[i];
  }
  if (P != grid_sample::kReflection || !inexact) return;
  for (int64_t i = 0; i < count; ++i) {
    if (exact[i]) continue;
    const Coord<acc_t> c = grid_sample::source_index(static_cast<acc_t>(g[2 * i]), size, P, AC);
    x[i] = c.x, dx[i] = c.dx;
  }
}

template <typename acc_t, typename scalar_t>
void coords(const scalar_t* g, int64_t count, int64_t size, int padding, bool align_corners, acc_t* x, acc_t* dx) {
  using grid_sample::kBorder;
  using grid_sample::kReflection;
  using grid_sample::kZeros;
  switch (padding * 2 + align_corners) {
    case kZeros * 2:
      return axis_coords<kZeros, false>(g, count, size, x, dx);
    case kZeros * 2 + 1:
      return axis_coords<kZeros, true>(g, count, size, x, dx);
    case kBorder * 2:
      return axis_coords<kBorder, false>(g, count, size, x, dx);
    case kBorder * 2 + 1:
      return axis_coords<kBorder, true>(g, count, size, x, dx);
    case kReflection * 2:
      return axis_coords<kReflection, false>(g, count, size, x, dx);
    default:
      return axis_coords<kReflection, true>(g, count, size, x, dx);
  }
}

// The taps of a block of output points, in structure-of-arrays form. Tap k of point i (bilinear:
// column ix + (k & 1), row iy + (k >> 1), as make_taps; nearest: tap 0 only) is at element offset
// off[i] + step[k] of an image and has weight w[k][i]; bit k of mask[i] says whether it lies inside
// (an outside tap reads nothing, not even a NaN).
template <typename acc_t>
struct Block {
  int64_t count;  // points in the block
  int taps;       // 4 (bilinear) or 1 (nearest)
  int64_t step[4];
  int64_t point[kBlock];  // each point's offset in an [N, C, Ho, Wo] tensor with strides `o`
  acc_t x[kBlock], y[kBlock], dx[kBlock], dy[kBlock];  // pixel coordinates, d coordinate / d grid
  acc_t fx[kBlock], fy[kBlock];                        // bilinear: fractions past ix, iy
  acc_t w[4][kBlock];
  int32_t ix[kBlock], iy[kBlock], mask[kBlock];  // 32-bit, as the coordinates: the loops vectorise
  int64_t off[kBlock];

  // Output points [p0, p0 + count) of image n; tap offsets for image strides `s`.
  template <typename scalar_t>
  void fill(const scalar_t* grid, const Dims& d, const Strides& s, const Strides& o, int64_t n, int64_t p0) {
    count = std::min(d.points() - p0, kBlock);
    taps = d.mode == grid_sample::kNearest ? 1 : 4;
    step[0] = 0, step[1] = s.w, step[2] = s.h, step[3] = s.h + s.w;
    int64_t row = p0 / d.Wo, col = p0 % d.Wo;  // of point p0 + i, stepped along (no division per point)
    for (int64_t i = 0; i < count; ++i, ++col) {
      if (col == d.Wo) col = 0, ++row;
      point[i] = row * o.h + col * o.w;
    }
    const scalar_t* g = grid + (n * d.points() + p0) * 2;
    coords(g, count, d.W, d.padding, d.align_corners, x, dx);
    coords(g + 1, count, d.H, d.padding, d.align_corners, y, dy);
    // Sizes up to 2^31: coordinates are below 2^30 in magnitude (source_index), so every index fits.
    const auto H = static_cast<int32_t>(std::min<int64_t>(d.H, INT32_MAX)),
               W = static_cast<int32_t>(std::min<int64_t>(d.W, INT32_MAX));
    if (taps == 1)
      nearest_taps(*this, H, W);
    else
      bilinear_taps(*this, H, W);
    for (int64_t i = 0; i < count; ++i) off[i] = int64_t(iy[i]) * s.h + int64_t(ix[i]) * s.w;
  }
};

// ix, iy = floor of the coordinates, the fractions past them, the weights and the masks.
template <typename acc_t>
FNEVR_CPU_CLONES void bilinear_taps(Block<acc_t>& b, int32_t H, int32_t W) {
  for (int64_t i = 0; i < b.count; ++i) {
    // As grid_sample::corner, in 32 bits.
    const acc_t x0 = grid_sample::floor_small(b.x[i]), y0 = grid_sample::floor_small(b.y[i]);
    const acc_t fx = b.x[i] - x0, fy = b.y[i] - y0, ex = acc_t(1) - fx, ey = acc_t(1) - fy;
    const auto cx = static_cast<int32_t>(x0), cy = static_cast<int32_t>(y0);
    b.fx[i] = fx, b.fy[i] = fy, b.ix[i] = cx, b.iy[i] = cy;
    b.w[0][i] = ex * ey, b.w[1][i] = fx * ey, b.w[2][i] = ex * fy, b.w[3][i] = fx * fy;
    const int32_t vx0 = (cx >= 0) & (cx < W), vx1 = (cx >= -1) & (cx < W - 1);
    const int32_t vy0 = (cy >= 0) & (cy < H), vy1 = (cy >= -1) & (cy < H - 1);
    const int32_t m = (vx0 & vy0) | (vx1 & vy0) << 1 | (vx0 & vy1) << 2 | (vx1 & vy1) << 3;
    b.mask[i] = m;
  }
}

template <typename acc_t>
FNEVR_CPU_CLONES void nearest_taps(Block<acc_t>& b, int32_t H, int32_t W) {
  for (int64_t i = 0; i < b.count; ++i) {
    const auto px = static_cast<int32_t>(grid_sample::rint_(b.x[i]));
    const auto py = static_cast<int32_t>(grid_sample::rint_(b.y[i]));
    const int32_t m = (px >= 0) & (px < W) & (py >= 0) & (py < H);
    b.ix[i] = px, b.iy[i] = py, b.mask[i] = m;
    b.w[0][i] = acc_t(1), b.w[1][i] = b.w[2][i] = b.w[3][i] = acc_t(0);
  }
}

// --- forward ------------------------------------------------------------------------------------

// channels_last: each point's channels are contiguous in input and output.
template <typename acc_t, typename scalar_t>
FNEVR_CPU_CLONES void forward_channels_inner(const Block<acc_t>& b, const scalar_t* in, scalar_t* out, int64_t C,
                                             acc_t* acc) {
  for (int64_t i = 0; i < b.count; ++i) {
    scalar_t* __restrict__ dst = out + b.point[i];
    const scalar_t* src = in + b.off[i];
    if (b.mask[i] == 15) {  // the common case: one vectorised pass
      const scalar_t *s0 = src, *s1 = src + b.step[1], *s2 = src + b.step[2], *s3 = src + b.step[3];
      const acc_t w0 = b.w[0][i], w1 = b.w[1][i], w2 = b.w[2][i], w3 = b.w[3][i];
      for (int64_t c = 0; c < C; ++c)
        dst[c] = static_cast<scalar_t>(
            ((w0 * static_cast<acc_t>(s0[c]) + w1 * static_cast<acc_t>(s1[c])) + w2 * static_cast<acc_t>(s2[c])) +
            w3 * static_cast<acc_t>(s3[c]));
      continue;
    }
    std::fill(acc, acc + C, acc_t(0));
    for (int k = 0; k < b.taps; ++k) {
      if (!(b.mask[i] >> k & 1)) continue;
      const scalar_t* __restrict__ s = src + b.step[k];
      const acc_t w = b.w[k][i];
      for (int64_t c = 0; c < C; ++c) acc[c] += w * static_cast<acc_t>(s[c]);
    }
    for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(acc[c]);
  }
}

// NCHW, one point: channels [c0, c1) of planes `sc_in`, `sc_out` apart.
template <typename acc_t, typename scalar_t>
inline void sample_point(const Block<acc_t>& b, int64_t i, const scalar_t* p, scalar_t* q, int64_t c0, int64_t c1,
                         int64_t sc_in, int64_t sc_out) {
  const int64_t s1 = b.step[1], s2 = b.step[2], s3 = b.step[3];
  const int m = b.mask[i];
  const acc_t w0 = b.w[0][i], w1 = b.w[1][i], w2 = b.w[2][i], w3 = b.w[3][i];
  p += b.off[i] + c0 * sc_in, q += b.point[i] + c0 * sc_out;
  if (b.taps == 1) {
    for (int64_t c = c0; c < c1; ++c, p += sc_in, q += sc_out) *q = m ? *p : scalar_t(0);
  } else if (m == 15) {
    for (int64_t c = c0; c < c1; ++c, p += sc_in, q += sc_out)
      *q = static_cast<scalar_t>(
          ((w0 * static_cast<acc_t>(p[0]) + w1 * static_cast<acc_t>(p[s1])) + w2 * static_cast<acc_t>(p[s2])) +
          w3 * static_cast<acc_t>(p[s3]));
  } else {
    for (int64_t c = c0; c < c1; ++c, p += sc_in, q += sc_out) {
      acc_t v = 0;
      if (m & 1) v += w0 * static_cast<acc_t>(p[0]);
      if (m & 2) v += w1 * static_cast<acc_t>(p[s1]);
      if (m & 4) v += w2 * static_cast<acc_t>(p[s2]);
      if (m & 8) v += w3 * static_cast<acc_t>(p[s3]);
      *q = static_cast<scalar_t>(v);
    }
  }
}

// NCHW: planes `sc_in`, `sc_out` apart, kPlanes at a time: each point's taps are read once for
// them. (More at once would thrash the cache's sets: planes are often 2^k elements apart. On a
// [1, 256, 64, 64] warp, 1, 2, 4 and 8 planes: 2.6, 1.7, 1.2 and 1.8-2.7 ms.)
template <typename acc_t, typename scalar_t>
FNEVR_CPU_CLONES void forward_planes(const Block<acc_t>& b, const scalar_t* in, scalar_t* out, int64_t C, int64_t sc_in,
                                     int64_t sc_out) {
  for (int64_t c0 = 0; c0 < C; c0 += kPlanes)
    for (int64_t i = 0; i < b.count; ++i) sample_point(b, i, in, out, c0, std::min(C, c0 + kPlanes), sc_in, sc_out);
}

template <typename scalar_t>
void forward_points(const at::Tensor& input, const at::Tensor& grid, at::Tensor& out, const Dims& d) {
  using acc_t = at::opmath_type<scalar_t>;
  const Strides si = strides_of(input), so = strides_of(out);
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  const scalar_t* gr = grid.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  const bool channels_inner = si.c == 1 && so.c == 1;
  const int64_t blocks = d.blocks();
  at::parallel_for(0, d.N * blocks, grain_size(kBlock * d.C, kTaskWork), [&](int64_t begin, int64_t end) {
    auto block = std::make_unique<Block<acc_t>>();
    std::vector<acc_t> acc(channels_inner ? d.C : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks;
      block->fill(gr, d, si, so, n, (task % blocks) * kBlock);
      const Block<acc_t>& b = *block;
      if (channels_inner) {
        forward_channels_inner(b, in + n * si.n, o + n * so.n, d.C, acc.data());
        continue;
      }
      forward_planes(b, in + n * si.n, o + n * so.n, d.C, si.c, so.c);
    }
  });
}

// --- backward -----------------------------------------------------------------------------------

// Where one band's input-gradient terms go: channel c, tap offset t -> base[c * sc + t + bias].
template <typename acc_t>
struct Target {
  acc_t* base;  // null: no input gradient wanted
  int64_t sc, bias;
};

// For each point of the block: scatter w_k g into the target (if kInput), and (if kGrid) add
// <g, in_k> over the channels to dots[i][k] for the grid gradient. Points in order, channels in
// order: deterministic.
template <bool kInput, bool kGrid, typename acc_t, typename scalar_t>
FNEVR_CPU_CLONES void backward_block(const Block<acc_t>& b, const scalar_t* in, const scalar_t* go, const Strides& si,
                                     const Strides& sg, int64_t C, const Target<acc_t>& t, acc_t (*dots)[4]) {
  const int64_t s1 = b.step[1], s2 = b.step[2], s3 = b.step[3];
  if (si.c == 1 && sg.c == 1) {  // channels_last: vectorised over the channels
    for (int64_t i = 0; i < b.count; ++i) {
      const scalar_t* g = go + b.point[i];
      for (int k = 0; k < b.taps; ++k) {
        if (!(b.mask[i] >> k & 1)) continue;
        const int64_t o = b.off[i] + b.step[k];
        if constexpr (kInput) {
          acc_t* __restrict__ dst = t.base + o + t.bias;
          const acc_t w = b.w[k][i];
          for (int64_t c = 0; c < C; ++c) dst[c] += w * static_cast<acc_t>(g[c]);
        }
        if constexpr (kGrid) dots[i][k] = dot<acc_t>(g, in + o, C);
      }
    }
    return;
  }
  for (int64_t c0 = 0; c0 < C; c0 += kPlanes) {  // as forward_planes
    const int64_t c1 = std::min(C, c0 + kPlanes);
    for (int64_t i = 0; i < b.count; ++i) {
      const scalar_t* g = go + b.point[i] + c0 * sg.c;
      const scalar_t* p = in + b.off[i] + c0 * si.c;
      acc_t* q = kInput ? t.base + b.off[i] + t.bias + c0 * t.sc : nullptr;
      const int m = b.mask[i];
      const acc_t w0 = b.w[0][i], w1 = b.w[1][i], w2 = b.w[2][i], w3 = b.w[3][i];
      acc_t e0 = 0, e1 = 0, e2 = 0, e3 = 0;
      if (m == 15) {
        for (int64_t c = c0; c < c1; ++c, g += sg.c, p += si.c) {
          const acc_t gc = static_cast<acc_t>(*g);
          if constexpr (kInput) q[0] += w0 * gc, q[s1] += w1 * gc, q[s2] += w2 * gc, q[s3] += w3 * gc, q += t.sc;
          if constexpr (kGrid) {
            e0 += gc * static_cast<acc_t>(p[0]), e1 += gc * static_cast<acc_t>(p[s1]);
            e2 += gc * static_cast<acc_t>(p[s2]), e3 += gc * static_cast<acc_t>(p[s3]);
          }
        }
      } else {
        for (int64_t c = c0; c < c1; ++c, g += sg.c, p += si.c) {
          const acc_t gc = static_cast<acc_t>(*g);
          if constexpr (kInput) {
            if (m & 1) q[0] += w0 * gc;
            if (m & 2) q[s1] += w1 * gc;
            if (m & 4) q[s2] += w2 * gc;
            if (m & 8) q[s3] += w3 * gc;
            q += t.sc;
          }
          if constexpr (kGrid) {
            if (m & 1) e0 += gc * static_cast<acc_t>(p[0]);
            if (m & 2) e1 += gc * static_cast<acc_t>(p[s1]);
            if (m & 4) e2 += gc * static_cast<acc_t>(p[s2]);
            if (m & 8) e3 += gc * static_cast<acc_t>(p[s3]);
          }
        }
      }
      if constexpr (kGrid) dots[i][0] += e0, dots[i][1] += e1, dots[i][2] += e2, dots[i][3] += e3;
    }
  }
}

// grad_grid[n, p] = (sum_k dw_k/dx <g, in_k>, sum_k dw_k/dy <g, in_k>) * (dx/dgx, dy/dgy), from the
// block's per-tap dot products <g, in_k> over all channels.
template <typename acc_t, typename scalar_t>
void write_grid_grad(const Block<acc_t>& b, const acc_t (*dots)[4], scalar_t* grad_grid) {
  for (int64_t i = 0; i < b.count; ++i) {
    // d w_k / dx and d w_k / dy of tap k = (column x0 + (k & 1), row y0 + (k >> 1)), as make_taps.
    const acc_t ex = acc_t(1) - b.fx[i], wx = b.fx[i], ey = acc_t(1) - b.fy[i], wy = b.fy[i];
    const acc_t* e = dots[i];
    const acc_t gx = ((-ey * e[0] + ey * e[1]) - wy * e[2]) + wy * e[3];
    const acc_t gy = ((-ex * e[0] - wx * e[1]) + ex * e[2]) + wx * e[3];
    grad_grid[2 * i] = static_cast<scalar_t>(gx * b.dx[i]);
    grad_grid[2 * i + 1] = static_cast<scalar_t>(gy * b.dy[i]);
  }
}

// The input rows [lo, hi] that the taps of output points [p0, p1) of image n can touch.
template <typename acc_t, typename scalar_t>
std::pair<int64_t, int64_t> rows_touched(const scalar_t* grid, const Dims& d, int64_t n, int64_t p0, int64_t p1) {
  acc_t y[kBlock], dy[kBlock];
  const bool nearest = d.mode == grid_sample::kNearest;
  int64_t lo = d.H, hi = -1;
  for (int64_t q = p0; q < p1; q += kBlock) {
    const int64_t count = std::min(p1 - q, kBlock);
    coords(grid + (n * d.points() + q) * 2 + 1, count, d.H, d.padding, d.align_corners, y, dy);
    acc_t top = acc_t(d.H), bottom = acc_t(-2);
    for (int64_t i = 0; i < count; ++i) {  // rows of kFar points and others outside are left out below
      const acc_t r = nearest ? grid_sample::rint_(y[i]) : grid_sample::floor_small(y[i]);
      if (r >= acc_t(-1) && r < top) top = r;
      if (r < acc_t(d.H) && r > bottom) bottom = r;
    }
    lo = std::min(lo, std::max<int64_t>(0, static_cast<int64_t>(top)));
    hi = std::max(hi, std::min<int64_t>(d.H - 1, static_cast<int64_t>(bottom) + (nearest ? 0 : 1)));
  }
  return {lo, hi};
}

// One image's output points split into `bands` tasks; the first scatters into grad_input itself,
// the others into private buffers over the rows they touch, added into grad_input afterwards.
template <typename scalar_t, typename acc_t>
void backward_points(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& grid, acc_t* grad_input,
                     scalar_t* grad_grid, const Dims& d) {
  const Strides si = strides_of(input), sg = strides_of(grad_out);
  const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  const scalar_t* gr = grid.const_data_ptr<scalar_t>();
  const bool channels_inner = si.c == 1;
  const int64_t blocks = d.blocks();
  // One band per thread an image can use, each with at least kTaskWork points x channels.
  const int64_t want = (at::get_num_threads() + d.N - 1) / d.N;
  const int64_t bands = std::clamp<int64_t>(std::min(want, d.points() * d.C / kTaskWork), 1, blocks);
  struct Private {
    std::vector<acc_t> buf;
    int64_t lo = 0, hi = -1;
  };
  std::vector<Private> priv(grad_input != nullptr ? d.N * bands : 0);
  at::parallel_for(0, d.N * bands, 1, [&](int64_t begin, int64_t end) {
    auto block = std::make_unique<Block<acc_t>>();
    acc_t dots[kBlock][4];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / bands, band = task % bands;
      const int64_t p0 = blocks * band / bands * kBlock,
                    p1 = std::min(d.points(), blocks * (band + 1) / bands * kBlock);
      Target<acc_t> t{nullptr, si.c, 0};
      if (grad_input != nullptr && band == 0) {
        t.base = grad_input + n * si.n;
      } else if (grad_input != nullptr) {
        Private& p = priv[task];
        std::tie(p.lo, p.hi) = rows_touched<acc_t>(gr, d, n, p0, p1);
        if (p.hi < p.lo) continue;  // every tap lies outside the image
        const int64_t rows = p.hi - p.lo + 1;
        p.buf.assign(d.C * rows * d.W, acc_t(0));
        t = {p.buf.data(), channels_inner ? 1 : rows * d.W, -p.lo * si.h};
      }
      for (int64_t q = p0; q < p1; q += kBlock) {
        block->fill(gr, d, si, sg, n, q);
        const Block<acc_t>& b = *block;
        const scalar_t* in_n = in + n * si.n;
        const scalar_t* go_n = go + n * sg.n;
        if (grad_grid == nullptr) {
          backward_block<true, false>(b, in_n, go_n, si, sg, d.C, t, dots);
          continue;
        }
        std::fill(&dots[0][0], &dots[0][0] + kBlock * 4, acc_t(0));
        if (t.base != nullptr)
          backward_block<true, true>(b, in_n, go_n, si, sg, d.C, t, dots);
        else
          backward_block<false, true>(b, in_n, go_n, si, sg, d.C, t, dots);
        write_grid_grad(b, dots, grad_grid + (n * d.points() + q) * 2);
      }
    }
  });
  if (bands == 1 || grad_input == nullptr) return;
  // Add the private buffers in band order, one input row of one image per item.
  const int64_t row = d.W * d.C;
  at::parallel_for(0, d.N * d.H, grain_size(row, kTaskWork), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / d.H, r = item % d.H;
      for (int64_t band = 1; band < bands; ++band) {
        const Private& p = priv[n * bands + band];
        if (r < p.lo || r > p.hi) continue;
        const int64_t rows = p.hi - p.lo + 1;
        for (int64_t c = 0; c < (channels_inner ? 1 : d.C); ++c) {
          acc_t* __restrict__ dst = grad_input + n * si.n + r * si.h + c * si.c;
          const acc_t* __restrict__ src = p.buf.data() + (r - p.lo) * si.h + c * rows * d.W;
          for (int64_t k = 0; k < (channels_inner ? row : d.W); ++k) dst[k] += src[k];
        }
      }
    }
  });
}

// Whether every element is finite: x - x is 0 for a finite x and NaN otherwise (no fast-math here).
template <typename T>
FNEVR_CPU_CLONES bool all_finite(const T* p, int64_t n) {
  constexpr int64_t kChunk = 4096;  // checked between chunks: a NaN early on ends the scan
  for (int64_t i = 0; i < n; i += kChunk) {
    int ok = 1;
    for (int64_t k = i; k < std::min(n, i + kChunk); ++k) ok &= p[k] - p[k] == T(0);
    if (!ok) return false;
  }
  return true;
}

}  // namespace

// fnevr/ops/grid_sample.py's auto rule asks this before it hands a grid to PyTorch's CPU kernel,
// which treats non-finite coordinates differently from ours: one pass, a quarter of torch.sum's time.
bool grid_sample_grid_is_finite_cpu(const at::Tensor& grid) {
  TORCH_CHECK(grid.device().is_cpu() && grid.is_contiguous() &&
                  (grid.scalar_type() == at::kFloat || grid.scalar_type() == at::kDouble),
              "fnevr grid_sample: grid_is_finite takes a contiguous fp32/fp64 CPU tensor");
  return grid.scalar_type() == at::kFloat ? all_finite(grid.const_data_ptr<float>(), grid.numel())
                                          : all_finite(grid.const_data_ptr<double>(), grid.numel());
}

at::Tensor grid_sample_forward_cpu(const at::Tensor& input, const at::Tensor& grid, int64_t mode, int64_t padding,
                                   bool align_corners) {
  check_grid_sample_inputs(input, grid, mode, padding);
  const Dims d = dims_of(input, grid, mode, padding, align_corners);
  at::Tensor out = at::empty({d.N, d.C, d.Ho, d.Wo}, input.options().memory_format(grid_sample_memory_format(input)));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "grid_sample_forward_cpu",
                                  [&] { forward_points<scalar_t>(input, grid, out, d); });
  return out;
}

std::tuple<at::Tensor, at::Tensor> grid_sample_backward_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                                                            const at::Tensor& grid, int64_t mode, int64_t padding,
                                                            bool align_corners, bool input_grad, bool grid_grad,
                                                            bool /*deterministic: always*/) {
  check_grid_sample_inputs(input, grid, mode, padding);
  check_grid_sample_grad(grad_out, input, grid);
  const Dims d = dims_of(input, grid, mode, padding, align_corners);
  // One layout for input, grad_out and the gradient buffer (so one set of tap offsets indexes all).
  const at::MemoryFormat format = grid_sample_memory_format(input);
  const at::Tensor in = input.contiguous(format), go = grad_out.contiguous(format);
  at::Tensor grad_input = at::empty({0}, input.options());
  at::Tensor grad_grid = grid_grad ? at::zeros_like(grid) : at::empty({0}, grid.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "grid_sample_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool live_grid = grid_grad && mode == grid_sample::kBilinear && go.numel() > 0;
    // fp16/bf16 sums go through an fp32 buffer, converted once at the end.
    at::Tensor buf;
    if (input_grad) buf = at::zeros_like(in, in.options().dtype(c10::CppTypeToScalarType<acc_t>::value), format);
    if ((input_grad || live_grid) && go.numel() > 0)
      backward_points<scalar_t, acc_t>(go, in, grid, input_grad ? buf.mutable_data_ptr<acc_t>() : nullptr,
                                       live_grid ? grad_grid.mutable_data_ptr<scalar_t>() : nullptr, d);
    if (input_grad) {
      grad_input = std::is_same_v<scalar_t, acc_t> ? buf : buf.to(input.scalar_type());
      if (grad_input.strides() != input.strides()) grad_input = at::empty_like(input).copy_(grad_input);
    }
  });
  return {grad_input, grad_grid};
}

// The schemas of this op's kernel entry points (fnevr/ops/grid_sample.py calls them; the CUDA kernels
// implement the same ones). Defined here, in fnevr._C, which fnevr._C_cuda needs loaded first.
TORCH_LIBRARY_FRAGMENT(fnevr, m) {
  m.def("_grid_sample_forward(Tensor input, Tensor grid, int mode, int padding, bool align_corners) -> Tensor");
  m.def(
      "_grid_sample_backward(Tensor grad_out, Tensor input, Tensor grid, int mode, int padding, "
      "bool align_corners, bool input_grad, bool grid_grad, bool deterministic) -> (Tensor, Tensor)");
  m.def("_grid_sample_grid_is_finite(Tensor grid) -> bool");  // CPU only: for the auto rule
}

TORCH_LIBRARY_IMPL(fnevr, CPU, m) {
  m.impl("_grid_sample_forward", &grid_sample_forward_cpu);
  m.impl("_grid_sample_backward", &grid_sample_backward_cpu);
  m.impl("_grid_sample_grid_is_finite", &grid_sample_grid_is_finite_cpu);
}

}  // namespace fnevr
