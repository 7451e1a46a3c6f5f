// Standalone test of csrc/composite/composite_math.h (no torch, no GPU), run by ctest.
// References are computed independently of the header: closed-form weights from exp of prefix
// sums, in long double, and gradients from central finite differences of that closed form.
#include "composite/composite_math.h"

#include "check.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

namespace cm = fnevr::composite;
using LD = long double;
using Vec = std::vector<double>;

constexpr int kD = 8;  // samples per ray
constexpr int kC = 3;  // colour channels
constexpr int kActs[] = {cm::kRelu, cm::kSoftplus, cm::kNone};
constexpr const char* kActNames[] = {"relu", "softplus", "none"};
const double kInf = std::numeric_limits<double>::infinity();

using fnevr_test::check;
using fnevr_test::Worst;

std::string mode_name(bool inclusive) { return inclusive ? "inclusive" : "exclusive"; }
template <typename T>
const char* type_name();
template <>
const char* type_name<float>() {
  return "float";
}
template <>
const char* type_name<double>() {
  return "double";
}

// ---- independent references ----

std::vector<LD> closed_form_weights(const std::vector<LD>& p, bool inclusive) {
  std::vector<LD> w(p.size());
  LD before = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    const LD pi = p[i], through = before + pi;
    w[i] = std::exp(-(inclusive ? through : before)) * (1 - std::exp(-pi));
    before = through;
  }
  return w;
}

// Exact activations (softplus without PyTorch's threshold), so the header's shortcut is tested too.
LD ref_activate(LD x, int act) {
  if (act == cm::kRelu) return x > 0 ? x : 0;
  if (act == cm::kSoftplus) return std::log1p(std::exp(x));
  return x;
}

struct Ray {
  Vec sigma;  // [D]
  Vec color;  // [D * C]
  Vec g;      // [C], dL/dout
};

// L = <g, out> with out = sum_i w_i c_i, from the closed form.
LD ref_loss(const Ray& r, const Vec& sigma, int act, bool inclusive) {
  std::vector<LD> p(sigma.size());
  for (size_t i = 0; i < p.size(); ++i) p[i] = ref_activate(sigma[i], act);
  const std::vector<LD> w = closed_form_weights(p, inclusive);
  LD loss = 0;
  for (size_t i = 0; i < p.size(); ++i)
    for (int k = 0; k < kC; ++k) loss += w[i] * r.color[i * kC + k] * r.g[k];
  return loss;
}

// ---- the header under test ----

template <typename T>
std::vector<T> weights(const Vec& p, bool inclusive) {
  cm::RayMarcher<T> m(inclusive);
  std::vector<T> w;
  for (double pi : p) w.push_back(m.step(T(pi)).w);
  return w;
}

// One forward-and-backward pass as the kernels do it; returns dL/dsigma.
template <typename T>
std::vector<T> grad_sigma(const Ray& r, int act, bool inclusive) {
  const size_t D = r.sigma.size();
  cm::RayMarcher<T> m(inclusive);
  cm::GradScan<T> scan(inclusive);
  std::vector<T> pushed(D), grad(D);
  for (size_t i = 0; i < D; ++i) {
    const cm::SampleWeight<T> s = m.step(cm::activate(T(r.sigma[i]), act));
    T e = 0;
    for (int k = 0; k < kC; ++k) e += T(r.g[k]) * T(r.color[i * kC + k]);
    T taken;
    pushed[i] = scan.push(e, s, taken);
    cm::take_off(pushed.data(), i, taken);
  }
  for (size_t i = 0; i < D; ++i) grad[i] = scan.finish(pushed[i], T(r.sigma[i]), act);
  return grad;
}

// dL/dsigma as the reference's autograd forms it (fnevr.ops.composite_reference: weights
// exp(-cumsum(p)) (1 - exp(-p)), cumsum's backward a reversed cumsum), term by term, for activation
// none: e_i E_i q_i minus the sum over the samples whose depth includes p_i of e_k w_k. Which
// entries are NaN or +-inf does not depend on the order of a sum or product, so this says where
// the header's must be.
template <typename T>
std::vector<T> autograd_grad_sigma(const std::vector<T>& p, const std::vector<T>& e, bool inclusive) {
  const size_t D = p.size();
  std::vector<T> E(D), w(D), grad(D);
  T depth = 0;
  for (size_t i = 0; i < D; ++i) {
    const T before = depth;
    depth += p[i];
    E[i] = std::exp(-(inclusive ? depth : before));
    w[i] = E[i] * -std::expm1(-p[i]);
  }
  for (size_t i = 0; i < D; ++i) {
    T sum = 0;
    for (size_t k = inclusive ? i : i + 1; k < D; ++k) sum += e[k] * w[k];
    grad[i] = e[i] * E[i] * (std::expm1(-p[i]) + T(1)) - sum;
  }
  return grad;
}

// ---- random inputs ----

std::mt19937_64 rng(12345);
double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng); }

// Densities after activation: some zero, some tiny, some large enough to make the ray opaque.
Vec random_p() {
  Vec p(kD);
  for (double& x : p) {
    const double u = uniform(0, 1);
    x = u < 0.2 ? 0.0 : u < 0.3 ? uniform(1e-4, 1e-3) : u < 0.4 ? uniform(5, 40) : uniform(0, 2);
  }
  return p;
}

// Pre-activation densities, kept clear of each activation's kink (relu at 0, softplus at 20).
Ray random_ray(int act) {
  Ray r;
  for (int i = 0; i < kD; ++i) {
    double s;
    if (act == cm::kRelu)
      s = uniform(0.05, 3) * (uniform(0, 1) < 0.25 ? -1 : 1);
    else if (act == cm::kSoftplus)
      s = i == kD / 2 ? 25.0 : uniform(-4, 4);
    else
      s = uniform(0, 3);
    r.sigma.push_back(s);
  }
  for (int i = 0; i < kD * kC; ++i) r.color.push_back(uniform(0, 1));
  for (int k = 0; k < kC; ++k) r.g.push_back(uniform(-1, 1));
  return r;
}

// ---- checks ----

template <typename T>
void check_forward(bool inclusive) {
  const bool dbl = sizeof(T) == sizeof(double);
  const double rtol = dbl ? 1e-12 : 1e-5, atol = dbl ? 1e-300 : 1e-30;
  Worst ww, wo;
  for (int trial = 0; trial < 50; ++trial) {
    Vec p = random_p();
    for (double& x : p) x = double(T(x));  // the reference sees the same rounded inputs
    const std::vector<LD> ref = closed_form_weights({p.begin(), p.end()}, inclusive);
    const std::vector<T> got = weights<T>(p, inclusive);
    Vec c(kD);
    for (double& x : c) x = double(T(uniform(0, 1)));
    LD out_ref = 0;
    T out = 0;
    for (int i = 0; i < kD; ++i) {
      ww.add(got[i], double(ref[i]), rtol, atol);
      out_ref += ref[i] * c[i];
      out += got[i] * T(c[i]);
    }
    wo.add(out, double(out_ref), rtol, atol);
  }
  const std::string tag = std::string(type_name<T>()) + " " + mode_name(inclusive);
  check(ww.ok(), tag + ": weights match closed form", ww.v);
  check(wo.ok(), tag + ": composited output matches closed form", wo.v);
}

void check_backward_fd(int a, bool inclusive) {
  const int act = kActs[a];
  Worst w;
  for (int trial = 0; trial < 20; ++trial) {
    const Ray r = random_ray(act);
    const std::vector<double> got = grad_sigma<double>(r, act, inclusive);
    double scale = 0;
    for (double x : got) scale = std::max(scale, std::fabs(x));
    for (int i = 0; i < kD; ++i) {
      const double h = 1e-5 * std::max(1.0, std::fabs(r.sigma[i]));
      Vec plus = r.sigma, minus = r.sigma;
      plus[i] += h;
      minus[i] -= h;
      const LD fd = (ref_loss(r, plus, act, inclusive) - ref_loss(r, minus, act, inclusive)) / (plus[i] - minus[i]);
      w.add(got[i], double(fd), 1e-6, 1e-6 * scale + 1e-300);
    }
  }
  check(w.ok(), std::string("double ") + mode_name(inclusive) + " " + kActNames[a] + ": dL/dsigma matches FD", w.v);
}

void check_backward_float(int a, bool inclusive) {
  const int act = kActs[a];
  Worst w;
  for (int trial = 0; trial < 20; ++trial) {
    const Ray r = random_ray(act);
    const std::vector<float> got = grad_sigma<float>(r, act, inclusive);
    const std::vector<double> ref = grad_sigma<double>(r, act, inclusive);
    double scale = 0;
    for (double x : ref) scale = std::max(scale, std::fabs(x));
    for (int i = 0; i < kD; ++i) w.add(got[i], ref[i], 1e-4, 1e-4 * scale + 1e-30);
  }
  check(w.ok(), std::string("float ") + mode_name(inclusive) + " " + kActNames[a] + ": dL/dsigma matches double", w.v);
}

template <typename T>
void check_extremes(bool inclusive) {
  const std::string tag = std::string(type_name<T>()) + " " + mode_name(inclusive);

  // An infinite density makes its sample fully opaque: it takes all remaining transmittance
  // (exclusive) and everything behind it gets exactly nothing.
  for (double huge : {1e30, kInf}) {
    const Vec p = {0.5, huge, 0.3, 2.0};
    const std::vector<T> w = weights<T>(p, inclusive);
    const T opaque = inclusive ? T(0) : T(std::exp(-0.5));
    bool ok = std::all_of(w.begin(), w.end(), [](T x) { return std::isfinite(x); });
    ok = ok && std::fabs(w[1] - opaque) <= T(1e-6) && w[2] == T(0) && w[3] == T(0);
    check(ok, tag + ": p=" + (std::isinf(huge) ? "inf" : "1e30") + " gives finite, opaque weights");
  }

  bool finite = true;
  for (int a = 0; a < 3; ++a) {
    Ray r;
    r.sigma = {0.7, 1e30, 0.4, kInf, 1.5};
    for (int i = 0; i < 5 * kC; ++i) r.color.push_back(0.25 + 0.1 * i);
    r.g = {0.3, -0.8, 0.5};
    for (T x : grad_sigma<T>(r, kActs[a], inclusive)) finite = finite && std::isfinite(x);
  }
  check(finite, tag + ": sigma=1e30/inf give finite dL/dsigma, all activations");

  const std::vector<T> w = weights<T>({0.0, 1.0, 0.0, 0.0, 2.0, 0.0}, inclusive);
  check(w[0] == T(0) && w[2] == T(0) && w[3] == T(0) && w[5] == T(0) && w[1] > T(0),
        tag + ": zero densities give exactly zero weight");
}

template <typename T>
void check_activations() {
  const std::string tag = type_name<T>();
  bool ident = true;
  for (double x : {20.001, 21.0, 50.0, 1e3, 1e30, kInf})
    ident = ident && cm::activate(T(x), cm::kSoftplus) == T(x) && cm::activate_grad(T(x), cm::kSoftplus) == T(1);
  check(ident, tag + ": softplus above 20 is the identity, gradient 1");

  const double rtol = sizeof(T) == sizeof(double) ? 1e-14 : 1e-6;
  Worst w;
  for (double x : {-30.0, -3.0, -0.1, 0.0, 0.5, 7.0, 19.9}) {
    const LD z = std::exp(LD(x));
    w.add(cm::activate(T(x), cm::kSoftplus), double(std::log1p(z)), rtol, 1e-300);
    w.add(cm::activate_grad(T(x), cm::kSoftplus), double(z / (1 + z)), rtol, 1e-300);
  }
  check(w.ok(), tag + ": softplus below 20 matches log1p(exp(x)), sigmoid", w.v);

  check(cm::activate(T(-2), cm::kRelu) == T(0) && cm::activate_grad(T(0), cm::kRelu) == T(0) &&
            cm::activate_grad(T(3), cm::kRelu) == T(1) && cm::activate(T(-2), cm::kNone) == T(-2),
        tag + ": relu and none (relu'(0) = 0, as in PyTorch)");

  // NaN and inf as torch.relu and its threshold_backward: relu(NaN) = NaN, relu(-inf) = 0,
  // relu'(NaN) = 1, and where relu is off a NaN or inf gradient gives 0, not NaN.
  const T nan = T(std::nan("")), inf = T(kInf);
  check(std::isnan(cm::activate(nan, cm::kRelu)) && cm::activate(-inf, cm::kRelu) == T(0) &&
            cm::activate(inf, cm::kRelu) == inf && cm::activate_grad(nan, cm::kRelu) == T(1) &&
            std::isnan(cm::activate(nan, cm::kSoftplus)) && std::isnan(cm::activate_grad(nan, cm::kSoftplus)),
        tag + ": activations at NaN and inf follow PyTorch");
  const cm::GradScan<T> scan(false);
  check(scan.finish(nan, T(-1), cm::kRelu) == T(0) && scan.finish(inf, T(0), cm::kRelu) == T(0) &&
            std::isnan(scan.finish(nan, T(2), cm::kRelu)) && std::isnan(scan.finish(nan, nan, cm::kRelu)) &&
            std::isnan(scan.finish(nan, T(-1), cm::kSoftplus)),
        tag + ": the density gradient through relu is a select (NaN where relu is on or at NaN, 0 where off)");
}

// A NaN or +-inf in e (a colour or the incoming gradient) or in p: dL/dp is NaN exactly where the
// reference's autograd makes it NaN, +-inf where it does (a poisoned e_k w_k reaches the samples
// 0..k only, through the reversed cumsum; the inclusive form's e_i w_i is its own term).
template <typename T>
void check_nonfinite(bool inclusive) {
  const std::string tag = std::string(type_name<T>()) + " " + mode_name(inclusive);
  const T nan = T(std::nan("")), inf = T(kInf);
  const std::vector<T> p0 = {0.5, 0.25, 1.0, 0.0, 0.75, 2.0}, e0 = {0.5, -1.0, 0.25, 2.0, -0.5, 1.5};
  bool same = true;
  std::string bad;
  for (int where = 0; where < 2; ++where)
    for (size_t k = 0; k < p0.size(); ++k)
      for (T v : {nan, inf, -inf}) {
        std::vector<T> p = p0, e = e0;
        (where == 0 ? e : p)[k] = v;
        const std::vector<T> want = autograd_grad_sigma(p, e, inclusive);
        cm::RayMarcher<T> m(inclusive);
        cm::GradScan<T> scan(inclusive);
        std::vector<T> got(p.size());
        for (size_t i = 0; i < p.size(); ++i) {
          T taken;
          got[i] = scan.push(e[i], m.step(p[i]), taken);
          cm::take_off(got.data(), i, taken);
        }
        for (size_t i = 0; i < p.size(); ++i) {
          got[i] = scan.finish(got[i], p[i], cm::kNone);
          const bool ok = std::isnan(got[i]) == std::isnan(want[i]) &&
                          (std::isinf(got[i]) ? got[i] == want[i] : !std::isinf(want[i]));
          if (!ok && same)
            bad = std::string(where ? " (p[" : " (e[") + std::to_string(k) + "] = " + std::to_string(double(v)) +
                  ", sample " + std::to_string(i) + ")";
          same = same && ok;
        }
      }
  check(same, tag + ": NaN/inf in e or p give NaN and inf in dL/dp where autograd's are" + bad);
}

}  // namespace

int main() {
  for (bool inclusive : {false, true}) {
    check_forward<double>(inclusive);
    check_forward<float>(inclusive);
  }
  for (bool inclusive : {false, true})
    for (int a = 0; a < 3; ++a) {
      check_backward_fd(a, inclusive);
      check_backward_float(a, inclusive);
    }
  for (bool inclusive : {false, true}) {
    check_extremes<double>(inclusive);
    check_extremes<float>(inclusive);
    check_nonfinite<double>(inclusive);
    check_nonfinite<float>(inclusive);
  }
  check_activations<double>();
  check_activations<float>();

  return fnevr_test::summary();
}
