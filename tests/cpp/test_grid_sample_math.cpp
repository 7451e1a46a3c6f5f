// Standalone test of csrc/grid_sample/grid_sample_math.h (no torch, no GPU), run by ctest.
// References are computed independently of the header: reflection by folding the coordinate back
// one edge at a time, weights from the tent function (1 - |x - p|)(1 - |y - q|), derivatives from
// central finite differences.
#include "grid_sample/grid_sample_math.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>

namespace {

namespace gs = fnevr::grid_sample;
const double kNan = std::numeric_limits<double>::quiet_NaN();
const double kInf = std::numeric_limits<double>::infinity();

int passed = 0, failed = 0;

void check(bool ok, const std::string& what) {
  ++(ok ? passed : failed);
  std::printf("%s  %s\n", ok ? "PASS" : "FAIL", what.c_str());
}

bool near(double a, double b, double tol) { return std::fabs(a - b) <= tol * (1 + std::fabs(b)); }

// Pixel coordinate after padding, from the definitions: fold at the two mirrors until inside.
double ref_index(double g, int size, int padding, bool align) {
  double x = align ? (g + 1) / 2 * (size - 1) : ((g + 1) * size - 1) / 2;
  if (padding == gs::kReflection) {
    const double lo = align ? 0 : -0.5, hi = align ? size - 1 : size - 0.5;
    if (hi == lo) return 0;
    while (x < lo || x > hi) x = x < lo ? 2 * lo - x : 2 * hi - x;
  }
  if (padding != gs::kZeros) x = std::fmin(std::fmax(x, 0.0), size - 1.0);
  return x;
}

double tent(double x, double p) { return std::fmax(0.0, 1 - std::fabs(x - p)); }

void test_source_index() {
  std::mt19937 rng(1);
  std::uniform_real_distribution<double> uni(-7, 7);
  for (int padding : {gs::kZeros, gs::kBorder, gs::kReflection})
    for (bool align : {false, true})
      for (int size : {1, 2, 5, 8}) {
        bool values = true, derivs = true;
        for (int i = 0; i < 2000; ++i) {
          const double g = uni(rng), h = 1e-6;
          const gs::Coord<double> c = gs::source_index(g, size, padding, align);
          values = values && near(c.x, ref_index(g, size, padding, align), 1e-12);
          const double fd = (ref_index(g + h, size, padding, align) - ref_index(g - h, size, padding, align)) / (2 * h);
          // Finite differences are wrong only within h of a kink; skip those points.
          const double k1 = ref_index(g + 2 * h, size, padding, align), k0 = ref_index(g - 2 * h, size, padding, align);
          if (near((k1 - k0) / (4 * h), fd, 1e-6)) derivs = derivs && near(c.dx, fd, 1e-5);
        }
        const std::string tag =
            " padding=" + std::to_string(padding) + " align=" + std::to_string(align) + " size=" + std::to_string(size);
        check(values, "source_index matches folding and clipping" + tag);
        check(derivs, "source_index derivative matches finite differences" + tag);
      }
}

void test_non_finite() {
  for (bool align : {false, true}) {
    check(gs::source_index(kNan, 5, gs::kZeros, align).x == gs::kFar, "zeros: NaN goes far outside");
    check(gs::source_index(kInf, 5, gs::kZeros, align).x == gs::kFar, "zeros: inf goes far outside");
    check(gs::source_index(1e30, 5, gs::kZeros, align).x == gs::kFar, "zeros: 1e30 goes far outside");
    check(gs::source_index(kNan, 5, gs::kBorder, align).x == 0, "border: NaN -> 0");
    check(gs::source_index(kInf, 5, gs::kBorder, align).x == 4, "border: inf -> the last pixel");
    check(gs::source_index(-kInf, 5, gs::kBorder, align).x == 0, "border: -inf -> 0");
    for (double v : {kNan, kInf, -kInf}) {
      const gs::Coord<double> c = gs::source_index(v, 5, gs::kReflection, align);
      check(c.x == 0 && c.dx == 0, "reflection: non-finite -> 0 with no gradient");
    }
    const gs::Coord<float> f = gs::source_index(std::numeric_limits<float>::quiet_NaN(), 5, gs::kBorder, align);
    check(f.x == 0 && f.dx == 0, "float border: NaN -> 0 with no gradient");
  }
}

void test_taps() {
  std::mt19937 rng(2);
  std::uniform_real_distribution<double> uni(-1.4, 1.4);
  const int H = 4, W = 6;
  bool weights = true, derivs = true, offsets = true;
  for (int i = 0; i < 2000; ++i) {
    const double gx = uni(rng), gy = uni(rng);
    const auto t = gs::make_taps(gx, gy, H, W, 100, 1, gs::kBilinear, gs::kZeros, false);
    const double x = ref_index(gx, W, gs::kZeros, false), y = ref_index(gy, H, gs::kZeros, false);
    for (int k = 0; k < 4; ++k) {
      const int64_t px = t.offset[k] % 100, py = t.offset[k] / 100;
      if (!t.valid[k]) continue;
      offsets = offsets && px >= 0 && px < W && py >= 0 && py < H;
      weights = weights && near(t.w[k], tent(x, px) * tent(y, py), 1e-12);
      const double h = 1e-7;
      const double fdx = (tent(x + h, px) - tent(x - h, px)) / (2 * h) * tent(y, py);
      const double fdy = tent(x, px) * (tent(y + h, py) - tent(y - h, py)) / (2 * h);
      derivs = derivs && near(t.dw_dx[k], fdx, 1e-5) && near(t.dw_dy[k], fdy, 1e-5);
    }
  }
  check(offsets, "bilinear taps lie inside the image when valid");
  check(weights, "bilinear weights are the tent function");
  check(derivs, "bilinear weight derivatives match finite differences");
  // Nearest rounds half to even, as rint: x = 1.5 -> 2, x = 2.5 -> 2 (align_corners, W = 6: g = x / 2.5 - 1).
  for (double x : {1.5, 2.5}) {
    const auto t = gs::make_taps(x / 2.5 - 1, 0.0, H, W, 100, 1, gs::kNearest, gs::kZeros, true);
    check(t.count == 1 && t.valid[0] && t.offset[0] % 100 == 2 && !t.valid[1], "nearest rounds half to even");
  }
  const auto out = gs::make_taps(kNan, 0.0, H, W, 100, 1, gs::kBilinear, gs::kZeros, false);
  check(!out.valid[0] && !out.valid[1] && !out.valid[2] && !out.valid[3], "NaN with zeros padding reads nothing");
}

// source_index_fast agrees with source_index bit for bit wherever it says it is exact, is exact for
// every point with zeros or border padding and for most points of a warp with reflection.
template <typename T>
void test_source_index_fast() {
  std::mt19937 rng(2);
  std::uniform_real_distribution<double> uni(-3, 3);
  const T specials[] = {T(-1), T(1), T(0), -T(0), T(kNan), T(kInf), T(-kInf), T(1e30)};
  for (int padding : {gs::kZeros, gs::kBorder, gs::kReflection})
    for (bool align : {false, true})
      for (int size : {1, 2, 5, 7, 256}) {
        bool same = true, exact_all = true;
        int exact_count = 0, total = 0;
        auto one = [&](T g) {
          bool exact = false;
          const gs::Coord<T> f = gs::source_index_fast(g, size, padding, align, exact);
          const gs::Coord<T> c = gs::source_index(g, size, padding, align);
          if (exact) same = same && std::memcmp(&f, &c, sizeof(f)) == 0, ++exact_count;
          exact_all = exact_all && exact;
          ++total;
        };
        for (T g : specials) one(g);
        for (int i = 0; i < 4000; ++i) one(static_cast<T>(uni(rng)));
        // Points next to the reflection lines and twice as far, where d / span may round up.
        for (T edge : {T(-3), T(-1), T(1), T(3)})
          for (int i = -50; i <= 50; ++i) one(edge + T(i) * std::numeric_limits<T>::epsilon() * std::fabs(edge));
        const std::string tag = std::string(sizeof(T) == 4 ? " float" : " double") +
                                " padding=" + std::to_string(padding) + " align=" + std::to_string(align) +
                                " size=" + std::to_string(size);
        check(same, "source_index_fast equals source_index where exact" + tag);
        if (padding != gs::kReflection) check(exact_all, "source_index_fast is exact without reflection" + tag);
        // uni draws from [-3, 3]: about two thirds lie within one reflection of the image.
        if (padding == gs::kReflection && size > 1) check(exact_count > total / 2, "reflection: mostly exact" + tag);
      }
}

}  // namespace

int main() {
  test_source_index();
  test_source_index_fast<float>();
  test_source_index_fast<double>();
  test_non_finite();
  test_taps();
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
