// Per-point grid-sampling math, shared by the CPU and CUDA kernels (and the ctest of it).
//
// A grid value g in [-1, 1] (outside allowed) maps to a pixel coordinate x along an axis of S pixels:
//   align_corners:  x = (g + 1) / 2 * (S - 1)       dx/dg = (S - 1) / 2
//   otherwise:      x = ((g + 1) S - 1) / 2         dx/dg = S / 2
// then padding maps x: zeros keeps it; border clips it to [0, S - 1]; reflection reflects it at
// the pixel centres 0 and S - 1 (align_corners) or the outer edges -1/2 and S - 1/2, then clips.
// Clipping has derivative 1 strictly inside and 0 elsewhere, as PyTorch's. Non-finite values
// follow PyTorch's CUDA kernels: clipping sends NaN to 0, reflection sends NaN and inf to 0, and a
// coordinate that is still non-finite (or beyond +-2^30) becomes kFar, outside any image.
// Bilinear reads the four pixels around (x, y) with weights (1 - |x - p|)(1 - |y - q|); nearest
// reads the pixel at (rint(x), rint(y)) (ties to even) with weight 1 and no grid gradient.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/codes.h"
#include "common/hd.h"

namespace fnevr {
namespace grid_sample {

using fnevr::kBilinear;
using fnevr::kBorder;
using fnevr::kNearest;
using fnevr::kReflection;
using fnevr::kZeros;
using fnevr::Mode;
using fnevr::Padding;

constexpr double kFar = -100.0;             // where a non-finite coordinate goes
constexpr double kMaxCoord = 1073741824.0;  // 2^30: beyond it a floor might not fit an int

FNEVR_HD float floor_(float x) { return floorf(x); }
FNEVR_HD double floor_(double x) { return floor(x); }
FNEVR_HD float fabs_(float x) { return fabsf(x); }
FNEVR_HD double fabs_(double x) { return fabs(x); }
FNEVR_HD float fmod_(float x, float y) { return fmodf(x, y); }
FNEVR_HD double fmod_(double x, double y) { return fmod(x, y); }
FNEVR_HD float rint_(float x) { return rintf(x); }  // ties to even in the default rounding mode
FNEVR_HD double rint_(double x) { return rint(x); }
// Finite: x - x is 0 for finite x and NaN for inf and NaN (no fast-math here).
template <typename T>
FNEVR_HD bool finite_(T x) {
  return x - x == T(0);
}

// floor for |x| < 2^30 (source_index guarantees it) by truncation: no library call, vectorisable.
template <typename T>
FNEVR_HD T floor_small(T x) {
  const T t = static_cast<T>(static_cast<int32_t>(x));
  return t > x ? t - T(1) : t;
}

// A pixel coordinate and its derivative in the grid value it came from.
template <typename T>
struct Coord {
  T x;
  T dx;
};

template <typename T>
FNEVR_HD Coord<T> unnormalize(T g, int64_t size, bool align_corners) {
  if (align_corners) return {(g + T(1)) / T(2) * T(size - 1), T(size - 1) / T(2)};
  return {((g + T(1)) * T(size) - T(1)) / T(2), T(size) / T(2)};
}

template <typename T>
FNEVR_HD Coord<T> clip(Coord<T> c, int64_t size) {
  const T hi = T(size - 1);
  if (c.x > T(0) && c.x < hi) return c;
  return {c.x > T(0) ? hi : T(0), T(0)};  // NaN > 0 is false: NaN -> 0
}

// Reflects a finite coordinate into [twice_low / 2, twice_high / 2].
template <typename T>
FNEVR_HD Coord<T> reflect(Coord<T> c, T twice_low, T twice_high) {
  if (twice_low == twice_high) return {T(0), T(0)};
  const T low = twice_low / T(2), span = (twice_high - twice_low) / T(2);
  T d = c.x - low, sign = T(1);
  if (d < T(0)) d = -d, sign = T(-1);
  const T extra = fmod_(d, span);
  const bool odd = fmod_(floor_(d / span), T(2)) == T(1);  // number of reflections so far
  return odd ? Coord<T>{span - extra + low, -sign * c.dx} : Coord<T>{extra + low, sign * c.dx};
}

// Grid value -> pixel coordinate after padding, with d coordinate / d grid value.
template <typename T>
FNEVR_HD Coord<T> source_index(T g, int64_t size, int padding, bool align_corners) {
  Coord<T> c = unnormalize(g, size, align_corners);
  if (padding == kBorder) {
    c = clip(c, size);
  } else if (padding == kReflection) {
    if (!finite_(c.x)) {
      c = {T(0), T(0)};
    } else {
      c = align_corners ? reflect(c, T(0), T(2 * (size - 1))) : reflect(c, T(-1), T(2 * size - 1));
      c = clip(c, size);
    }
  }
  if (!(fabs_(c.x) < T(kMaxCoord))) c = {T(kFar), T(0)};
  return c;
}

// source_index without branches or library calls, so that CPU loops over points vectorise. It is
// exact for zeros and border padding, and for reflection where the coordinate lies within one
// reflection of the image (nearly every point of a warp): there fmod(d, span) is d or d - span
// (exact), and reflect's other steps are repeated as they are. Elsewhere it sets `exact` false;
// call source_index for those points.
template <typename T>
FNEVR_HD Coord<T> source_index_fast(T g, int64_t size, int padding, bool align_corners, bool& exact) {
  Coord<T> c = unnormalize(g, size, align_corners);
  exact = true;
  if (padding == kBorder) {
    c = clip(c, size);
  } else if (padding == kReflection) {  // reflect, for source_index's twice_low and twice_high
    const T twice_low = align_corners ? T(0) : T(-1);
    const T twice_high = align_corners ? T(2 * (size - 1)) : T(2 * size - 1);
    const T low = twice_low / T(2), span = (twice_high - twice_low) / T(2);
    T d = c.x - low, sign = T(1);
    if (d < T(0)) d = -d, sign = T(-1);
    const T q = d / span;  // reflect's floor(d / span) is 0 or 1 when q < 2
    exact = twice_low != twice_high && q < T(2);
    const T extra = d >= span ? d - span : d;
    c = q >= T(1) ? Coord<T>{span - extra + low, -sign * c.dx} : Coord<T>{extra + low, sign * c.dx};
    c = clip(c, size);
  }
  if (!(fabs_(c.x) < T(kMaxCoord))) c = {T(kFar), T(0)};
  return c;
}

// The first of the two pixels bilinear reads along an axis, and the fraction of the way to the
// second: weights 1 - frac and frac.
template <typename T>
struct Corner {
  int64_t index;
  T frac;
};

template <typename T>
FNEVR_HD Corner<T> corner(T x) {
  const T f = floor_small(x);
  return {static_cast<int64_t>(f), x - f};
}

// The pixels one output point reads: up to four taps at element offsets y * stride_h + x * stride_w,
// each with its weight and the weight's derivatives in x and y. Taps outside the image are marked
// invalid (they read nothing, not even a NaN); so are nearest's unused taps 1 to 3.
template <typename T>
struct Taps {
  int count;  // taps that may be valid: 4 (bilinear) or 1 (nearest)
  int64_t offset[4];
  bool valid[4];
  T w[4], dw_dx[4], dw_dy[4];
  T dx_dgx, dy_dgy;  // chain factors from pixel coordinates back to the grid values
};

template <typename T>
FNEVR_HD Taps<T> make_taps(T gx, T gy, int64_t H, int64_t W, int64_t stride_h, int64_t stride_w, int mode, int padding,
                           bool align_corners) {
  const Coord<T> cx = source_index(gx, W, padding, align_corners);
  const Coord<T> cy = source_index(gy, H, padding, align_corners);
  Taps<T> t;
  t.dx_dgx = cx.dx;
  t.dy_dgy = cy.dx;
  if (mode == kNearest) {
    const int64_t px = static_cast<int64_t>(rint_(cx.x)), py = static_cast<int64_t>(rint_(cy.x));
    t.count = 1;
    t.offset[0] = py * stride_h + px * stride_w;
    t.valid[0] = px >= 0 && px < W && py >= 0 && py < H;
    t.w[0] = T(1);
    for (int k = 0; k < 4; ++k) t.dw_dx[k] = t.dw_dy[k] = T(0);
    for (int k = 1; k < 4; ++k) t.valid[k] = false, t.offset[k] = 0, t.w[k] = T(0);
    return t;
  }
  const Corner<T> x0 = corner(cx.x), y0 = corner(cy.x);
  t.count = 4;
  const T wxs[2] = {T(1) - x0.frac, x0.frac}, wys[2] = {T(1) - y0.frac, y0.frac};  // columns x0, x0 + 1; rows
  for (int k = 0; k < 4; ++k) {  // tap k: column x0 + (k & 1), row y0 + (k >> 1)
    const int dx = k & 1, dy = k >> 1;
    const int64_t px = x0.index + dx, py = y0.index + dy;
    t.offset[k] = py * stride_h + px * stride_w;
    t.valid[k] = px >= 0 && px < W && py >= 0 && py < H;
    t.w[k] = wxs[dx] * wys[dy];
    t.dw_dx[k] = (dx ? T(1) : T(-1)) * wys[dy];
    t.dw_dy[k] = (dy ? T(1) : T(-1)) * wxs[dx];
  }
  return t;
}

}  // namespace grid_sample
}  // namespace fnevr
