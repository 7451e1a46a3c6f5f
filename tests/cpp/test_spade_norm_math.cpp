// Standalone test of csrc/spade_norm/spade_norm_math.h (no torch, no GPU), run by ctest.
// References are computed independently of the header: statistics by two passes in long double, and
// gradients by central finite differences of a long-double group normalisation.
#include "spade_norm/spade_norm_math.h"

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace {

namespace sm = fnevr::spade;
using LD = long double;

int passed = 0, failed = 0;

void check(bool ok, const std::string& what, double err = -1) {
  ++(ok ? passed : failed);
  std::printf("%s  %s", ok ? "PASS" : "FAIL", what.c_str());
  if (!(err < 0)) std::printf("  (err %.3g)", err);
  std::printf("\n");
}

struct Exact {
  LD mean, var;
};

Exact exact_moments(const std::vector<double>& x) {
  LD s = 0;
  for (double v : x) s += v;
  const LD mean = s / x.size();
  LD m2 = 0;
  for (double v : x) m2 += (v - mean) * (v - mean);
  return {mean, m2 / x.size()};
}

// Welford for every element, and Chan merges of uneven pieces, against the exact moments, with a
// large common offset (1e8 in double, 1e3 in float) that the E[x^2] - E[x]^2 formula cannot survive.
template <typename T>
void test_moments(double offset, double rel_tol, const char* name) {
  std::mt19937 rng(1);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> x(3001);
  for (double& v : x) v = static_cast<double>(static_cast<T>(offset + normal(rng)));  // exactly representable in T
  const Exact want = exact_moments(x);

  sm::Moments<T> all;
  for (double v : x) all.push(static_cast<T>(v));
  sm::Moments<T> merged, piece;
  const size_t cuts[] = {0, 1, 2, 700, 701, 2000, x.size()};
  for (size_t k = 0; k + 1 < sizeof(cuts) / sizeof(cuts[0]); ++k) {
    piece = sm::Moments<T>{};
    for (size_t i = cuts[k]; i < cuts[k + 1]; ++i) piece.push(static_cast<T>(x[i]));
    merged.merge(piece);
  }
  merged.merge(sm::Moments<T>{});  // an empty partial changes nothing
  for (const auto* m : {&all, &merged}) {
    const double var_err = std::fabs(static_cast<double>((m->var() - want.var) / want.var));
    const double mean_err = std::fabs(static_cast<double>((m->mean - want.mean) / want.var));
    const std::string what = std::string(name) + (m == &all ? " welford" : " chan merge") + " offset " +
                             std::to_string(offset);
    check(m->n == T(x.size()) && var_err < rel_tol && mean_err < rel_tol, what + " variance", var_err);
  }
  // The naive formula fails at this offset (the reason for the above): keep the test honest.
  LD s = 0, s2 = 0;
  for (double v : x) {
    const T t = static_cast<T>(v);
    s = static_cast<T>(s + t);
    s2 = static_cast<T>(s2 + t * t);
  }
  const double naive = static_cast<double>(s2 / x.size() - (s / x.size()) * (s / x.size()));
  check(std::fabs((naive - static_cast<double>(want.var)) / static_cast<double>(want.var)) > rel_tol,
        std::string(name) + " naive formula is indeed inaccurate here");
}

LD act(LD z, int a, LD slope) {
  if (a == sm::kRelu) return z > 0 ? z : 0;
  if (a == sm::kLeakyRelu) return z > 0 ? z : z * slope;
  return z;
}

// L = sum_i w_i y_i over one group, y_i = act(xhat_i (1 + g_i) + b_i).
LD loss(const std::vector<LD>& x, const std::vector<LD>& g, const std::vector<LD>& b, const std::vector<LD>& w,
        int a, LD slope, LD eps) {
  LD s = 0;
  for (LD v : x) s += v;
  const LD mean = s / x.size();
  LD m2 = 0;
  for (LD v : x) m2 += (v - mean) * (v - mean);
  const LD rstd = 1 / std::sqrt(m2 / x.size() + eps);
  LD total = 0;
  for (size_t i = 0; i < x.size(); ++i) total += w[i] * act((x[i] - mean) * rstd * (1 + g[i]) + b[i], a, slope);
  return total;
}

// The header's per-element forward and backward, assembled into one group's gradients, against
// finite differences of `loss`.
void test_group_gradients(int a) {
  const int n = 9;
  const double slope = 0.15, eps = 1e-5;
  std::mt19937 rng(7 + a);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<LD> x(n), g(n), b(n), w(n);
  for (int i = 0; i < n; ++i) x[i] = 3 + 2 * normal(rng), g[i] = 0.5 * normal(rng), b[i] = 0.5 * normal(rng),
                              w[i] = normal(rng);
  sm::Moments<double> m;
  for (LD v : x) m.push(static_cast<double>(v));
  const double rstd = sm::rsqrt_(m.var() + eps);
  std::vector<double> xhat(n), dxhat(n), dz(n);
  double c1 = 0, c2 = 0;
  double worst_y = 0;
  for (int i = 0; i < n; ++i) {
    xhat[i] = sm::normalise(static_cast<double>(x[i]), m.mean, rstd);
    const double y = sm::modulate(xhat[i], double(g[i]), double(b[i]), a, slope);
    worst_y = std::fmax(worst_y, std::fabs(y - double(act((x[i] - m.mean) * rstd * (1 + g[i]) + b[i], a, slope))));
    const auto e = sm::modulate_grad(double(w[i]), xhat[i], double(g[i]), double(b[i]), a, slope);
    dz[i] = e.dz, dxhat[i] = e.dxhat;
    c1 += e.dxhat / n, c2 += e.dxhat * xhat[i] / n;
  }
  check(worst_y < 1e-12, "forward of act " + std::to_string(a), worst_y);
  double worst = 0;
  const LD h = 1e-6L;
  for (int i = 0; i < n; ++i) {
    auto fd = [&](std::vector<LD>& v) {
      const LD keep = v[i];
      v[i] = keep + h;
      const LD up = loss(x, g, b, w, a, slope, eps);
      v[i] = keep - h;
      const LD down = loss(x, g, b, w, a, slope, eps);
      v[i] = keep;
      return static_cast<double>((up - down) / (2 * h));
    };
    worst = std::fmax(worst, std::fabs(sm::input_grad(dxhat[i], xhat[i], rstd, c1, c2) - fd(x)));
    worst = std::fmax(worst, std::fabs(dz[i] * xhat[i] - fd(g)));
    worst = std::fmax(worst, std::fabs(dz[i] - fd(b)));
  }
  check(worst < 1e-6, "gradients of x, gamma, beta for act " + std::to_string(a), worst);
}

void test_activation_conventions() {
  check(sm::activate_grad(0.0, sm::kRelu, 0.2) == 0.0 && sm::activate_grad(0.0, sm::kLeakyRelu, 0.2) == 0.2 &&
            sm::activate(-2.0f, sm::kLeakyRelu, 0.5f) == -1.0f && sm::activate(-2.0, sm::kNone, 0.5) == -2.0,
        "activation values and derivatives at 0 follow PyTorch");
}

}  // namespace

int main() {
  test_moments<double>(1e8, 1e-7, "double");
  test_moments<float>(1e3, 1e-3, "float");
  for (int a : {sm::kNone, sm::kRelu, sm::kLeakyRelu}) test_group_gradients(a);
  test_activation_conventions();
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
