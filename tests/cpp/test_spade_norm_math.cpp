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
  // The corrected two-pass formula around a shift off the mean by a few units (the first element).
  T d1 = 0, d2 = 0;
  const T shift = static_cast<T>(x[0]);
  for (double v : x) {
    const T d = static_cast<T>(v) - shift;
    d1 += d;
    d2 += d * d;
  }
  sm::Moments<T> shifted = sm::Moments<T>::from_shifted_sums(T(x.size()), shift, d1, d2);
  for (const sm::Moments<T>* m : {&all, &merged, &shifted}) {
    const double var_err = std::fabs(static_cast<double>((m->var() - want.var) / want.var));
    const double mean_err = std::fabs(static_cast<double>((m->mean - want.mean) / want.var));
    const char* how = m == &all ? " welford" : m == &merged ? " chan merge" : " shifted sums";
    const std::string what = std::string(name) + how + " offset " + std::to_string(offset);
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
LD loss(const std::vector<LD>& x, const std::vector<LD>& g, const std::vector<LD>& b, const std::vector<LD>& w, int a,
        LD slope, LD eps) {
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
  for (int i = 0; i < n; ++i)
    x[i] = 3 + 2 * normal(rng), g[i] = 0.5 * normal(rng), b[i] = 0.5 * normal(rng), w[i] = normal(rng);
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

// A NaN among the elements makes the moments NaN, whichever way they are taken and merged.
void test_moments_of_nan() {
  const double nan = std::nan("");
  const sm::Moments<double> shifted = sm::Moments<double>::from_shifted_sums(4.0, 1.0, nan, nan);
  sm::Moments<double> pushed, merged = sm::Moments<double>::from_shifted_sums(3.0, 0.0, 0.5, 2.0);
  for (double v : {1.0, nan, 2.0}) pushed.push(v);
  merged.merge(shifted);
  check(std::isnan(shifted.mean) && std::isnan(shifted.var()) && std::isnan(pushed.var()) && std::isnan(merged.mean) &&
            std::isnan(merged.var()),
        "a NaN element makes mean and variance NaN (shifted sums, Welford, Chan merge)");
}

void test_activation_conventions() {
  check(sm::activate_grad(0.0, sm::kRelu, 0.2) == 0.0 && sm::activate_grad(0.0, sm::kLeakyRelu, 0.2) == 0.2 &&
            sm::activate(-2.0f, sm::kLeakyRelu, 0.5f) == -1.0f && sm::activate(-2.0, sm::kNone, 0.5) == -2.0,
        "activation values and derivatives at 0 follow PyTorch");
  const double nan = std::nan(""), inf = INFINITY;
  check(std::isnan(sm::activate(nan, sm::kRelu, 0.2)) && std::isnan(sm::activate(nan, sm::kLeakyRelu, 0.2)) &&
            sm::activate(-inf, sm::kRelu, 0.2) == 0.0 && sm::activate(-inf, sm::kLeakyRelu, 0.5) == -inf &&
            sm::activate(inf, sm::kRelu, 0.2) == inf && sm::activate_grad(nan, sm::kRelu, 0.2) == 1.0 &&
            sm::activate_grad(nan, sm::kLeakyRelu, 0.2) == 0.2,
        "activation values and derivatives at NaN and inf follow PyTorch (relu(-inf) = 0, relu'(NaN) = 1)");
  // xhat (1 + g) + b = -1: relu is off, so a NaN or inf dy gives 0 (a select, as threshold_backward);
  // leaky_relu multiplies, so NaN stays NaN.
  check(sm::modulate_grad(nan, 1.0, 0.0, -2.0, sm::kRelu, 0.2).dz == 0.0 &&
            sm::modulate_grad(inf, 1.0, 0.0, -2.0, sm::kRelu, 0.2).dz == 0.0 &&
            std::isnan(sm::modulate_grad(nan, 1.0, 0.0, 2.0, sm::kRelu, 0.2).dz) &&
            std::isnan(sm::modulate_grad(nan, 1.0, 0.0, -2.0, sm::kLeakyRelu, 0.2).dz),
        "the gradient through relu is a select: NaN/inf dy where relu is off gives 0");
}

// plan_split: every (sample, position) in exactly one non-empty piece; about `target` blocks when
// the problem is big enough, never more than it asks for beyond one block per group.
void test_plan_split() {
  std::mt19937 rng(3);
  int bad = 0, cases = 0;
  auto one = [&](int64_t N, int64_t S, int64_t cols, int64_t target, int64_t step, bool batch) {
    ++cases;
    const sm::Split sp = sm::plan_split(N, S, cols, target, step, batch);
    std::vector<int> seen(static_cast<size_t>(N * S), 0);
    bool ok = sp.groups >= 1 && sp.chunks >= 1 && sp.chunk % step == 0 && (batch || sp.per_group == 1);
    for (int64_t p = 0; ok && p < sp.pieces(); ++p) {
      const int64_t n0 = sp.sample_begin(p), n1 = sp.sample_end(p, N);
      const int64_t s0 = sp.position_begin(p), s1 = sp.position_end(p, S);
      ok = n0 < n1 && s0 < s1;
      for (int64_t n = n0; ok && n < n1; ++n)
        for (int64_t s = s0; s < s1; ++s) ++seen[n * S + s];
    }
    for (int v : seen) ok = ok && v == 1;
    const int64_t blocks = sp.pieces() * cols, floor = batch ? cols : N * cols;
    const int64_t most = N * ((S + step - 1) / step) * cols;  // every step of every sample a block
    ok = ok && blocks <= (target > floor ? target : floor) && 4 * blocks >= (target < most ? target : most);
    if (!ok && bad++ < 5)
      std::printf(
          "  plan_split(N=%lld, S=%lld, cols=%lld, target=%lld, step=%lld, batch=%d): groups %lld x %lld, "
          "chunks %lld of %lld\n",
          (long long)N, (long long)S, (long long)cols, (long long)target, (long long)step, (int)batch,
          (long long)sp.groups, (long long)sp.per_group, (long long)sp.chunks, (long long)sp.chunk);
  };
  // FNeVR's training shapes on an H100 (132 SMs x 8 blocks), NCHW and channels_last steps.
  const int64_t shapes[][3] = {{4, 32, 65536}, {4, 64, 16384}, {4, 512, 256}, {1, 512, 4096}};  // N, C, S
  for (const auto& shape : shapes)
    for (bool batch : {false, true}) {
      one(shape[0], shape[2], shape[1], 1056, 256 * 16, batch);
      one(shape[0], shape[2], (shape[1] + 31) / 32, 1056, 8 * 16, batch);
    }
  std::uniform_int_distribution<int64_t> small(1, 9), len(1, 3000), cols(1, 40), target(1, 600), step(1, 300);
  for (int k = 0; k < 3000; ++k) one(small(rng), len(rng), cols(rng), target(rng), step(rng), k % 2 == 0);
  check(bad == 0,
        "plan_split covers every element once, with about the blocks asked for (" + std::to_string(cases) + " cases)");
}

}  // namespace

int main() {
  test_moments<double>(1e8, 1e-7, "double");
  test_moments<float>(1e3, 1e-3, "float");
  for (int a : {sm::kNone, sm::kRelu, sm::kLeakyRelu}) test_group_gradients(a);
  test_moments_of_nan();
  test_activation_conventions();
  test_plan_split();
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
