// Standalone test of csrc/mlp_composite/mlp_composite_math.h (no torch, no GPU), run by ctest.
// References are independent of the header: compositing weights in closed form (exp of prefix
// sums) in long double, and gradients by central finite differences of a plain forward pass. The
// last check runs the kernels' whole backward recipe (the header's compositing backward, then
// backprop through the layers) on a tiny MLP and compares every gradient with finite differences.
#include "mlp_composite/mlp_composite_math.h"

#include "check.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace {

namespace cm = fnevr::composite;
namespace mlp = fnevr::mlp;
using LD = long double;
using Vec = std::vector<double>;

constexpr int kActs[] = {cm::kRelu, cm::kSoftplus, cm::kNone};
constexpr const char* kActNames[] = {"relu", "softplus", "none"};

using fnevr_test::check;
using fnevr_test::Worst;

std::string mode_name(bool inclusive) { return inclusive ? "inclusive" : "exclusive"; }

std::mt19937_64 rng(2024);
double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng); }

// ---- independent references ----

LD ref_activate(LD x, int act) {
  if (act == cm::kRelu) return x > 0 ? x : 0;
  if (act == cm::kSoftplus) return x > 20 ? x : std::log1p(std::exp(x));
  return x;
}

std::vector<LD> closed_form_weights(const Vec& sigma, int act, bool inclusive) {
  std::vector<LD> w(sigma.size());
  LD before = 0;
  for (size_t i = 0; i < sigma.size(); ++i) {
    const LD p = ref_activate(sigma[i], act), through = before + p;
    w[i] = std::exp(-(inclusive ? through : before)) * (1 - std::exp(-p));
    before = through;
  }
  return w;
}

// Densities clear of the activations' kinks (relu at 0, softplus's switch at 20); no negative
// densities without an activation (they make weights grow along the ray, and nothing uses that).
Vec random_sigma(int D, int act) {
  Vec s(D);
  for (double& x : s) {
    x = uniform(0.05, 3) * (act != cm::kNone && uniform(0, 1) < 0.3 ? -1 : 1);
    if (act == cm::kSoftplus && uniform(0, 1) < 0.2) x = 25;
  }
  return s;
}

// ---- checks of the pieces ----

void check_param_table() {
  const mlp::Dims d{3, 5, 8, 2};  // Ec, Es, H, H4
  // nn.Linear shapes in PARAMETERS order ({out, in} for weights, {out} for biases).
  const std::vector<std::vector<int64_t>> want = {{8, 5}, {8},    {8, 8}, {8},     {1, 8}, {1},    {2, 8},
                                                  {2},    {8, 3}, {8},    {8, 10}, {8},    {8, 8}, {8}};
  bool ok = true;
  int64_t offset = 0;
  for (int p = 0; p < mlp::kNumParams; ++p) {
    const std::vector<int64_t> got = mlp::is_weight(p) ? std::vector<int64_t>{mlp::layer_out(d, p), mlp::layer_in(d, p)}
                                                       : std::vector<int64_t>{mlp::layer_out(d, p)};
    ok = ok && got == want[p] && mlp::param_offset(d, p) == offset;
    offset += mlp::param_numel(d, p);
  }
  check(ok && mlp::num_param_elements(d) == offset, "parameter table: shapes and back-to-back offsets");
}

void check_relu() {
  check(mlp::relu(-1.5) == 0.0 && mlp::relu(0.0) == 0.0 && mlp::relu(2.5f) == 2.5f &&
            mlp::relu_backward(3.0, 0.0) == 0.0 && mlp::relu_backward(3.0, 1e-30) == 3.0,
        "relu, and its gradient from the output (relu'(0) = 0, as in PyTorch)");
  const double nan = std::nan(""), inf = INFINITY;
  check(std::isnan(mlp::relu(nan)) && mlp::relu(-inf) == 0.0 && std::isnan(mlp::relu(float(nan))) &&
            mlp::relu_backward(nan, 0.0) == 0.0 && mlp::relu_backward(inf, 0.0) == 0.0 &&
            mlp::relu_backward(2.0, nan) == 2.0 && std::isnan(mlp::relu_backward(nan, 1.0)),
        "relu at NaN and inf as PyTorch: relu(NaN) = NaN; a NaN or inf gradient where it is off gives 0");

  // A NaN or inf e_k (a code or grad_features) reaches dL/dsigma of samples 0..k only, through the
  // reversed cumsum of the reference (fnevr.ops.composite_reference), whatever comes behind it.
  bool reach = true;
  for (bool inclusive : {false, true})
    for (double v : {nan, inf, -inf})
      for (int k = 0; k < 5; ++k) {
        const double sigma[5] = {0.5, 1.0, 0.25, 2.0, 0.75};
        double e[5] = {0.3, -1.0, 0.5, 0.25, 2.0}, w[5], ds[5];
        e[k] = v;
        mlp::ray_backward(sigma, e, 5, inclusive, fnevr::composite::kRelu, w, ds);
        for (int i = 0; i < 5; ++i) reach = reach && std::isfinite(ds[i]) == (i > k);
      }
  check(reach, "ray_backward: a NaN or inf e_k makes dL/dsigma non-finite at samples 0..k, finite behind");
}

template <typename T>
void check_ray_weights(int a, bool inclusive) {
  const int act = kActs[a];
  const double rtol = sizeof(T) == sizeof(double) ? 1e-12 : 1e-5;
  Worst w;
  for (int trial = 0; trial < 30; ++trial) {
    const int D = 1 + trial % 9;
    Vec sigma = random_sigma(D, act);
    for (double& x : sigma) x = double(T(x));  // the reference sees the same rounded inputs
    const std::vector<LD> ref = closed_form_weights(sigma, act, inclusive);
    std::vector<T> s(sigma.begin(), sigma.end()), got(D);
    const T sum = mlp::ray_weights(s.data(), D, inclusive, act, got.data());
    LD ref_sum = 0;
    for (int i = 0; i < D; ++i) {
      w.add(got[i], double(ref[i]), rtol, 1e-30);
      ref_sum += ref[i];
    }
    w.add(sum, double(ref_sum), rtol, 1e-30);
  }
  check(w.ok(),
        std::string(sizeof(T) == 8 ? "double " : "float ") + mode_name(inclusive) + " " + kActNames[a] +
            ": ray_weights and their sum match closed form",
        w.v);
}

// dL/dsigma for L = sum_i e_i w_i(sigma), e fixed; dsigma written over e (the aliasing the kernels use).
void check_ray_backward(int a, bool inclusive) {
  const int act = kActs[a];
  Worst w;
  bool same_weights = true;
  for (int trial = 0; trial < 30; ++trial) {
    const int D = 1 + trial % 9;
    const Vec sigma = random_sigma(D, act);
    Vec e(D);
    for (double& x : e) x = uniform(-1, 1);
    Vec got = e, wts(D), fwd(D);
    mlp::ray_backward(sigma.data(), got.data(), D, inclusive, act, wts.data(), got.data());
    mlp::ray_weights(sigma.data(), D, inclusive, act, fwd.data());
    same_weights = same_weights && wts == fwd;
    auto loss = [&](const Vec& s) {
      const std::vector<LD> wl = closed_form_weights(s, act, inclusive);
      LD l = 0;
      for (int i = 0; i < D; ++i) l += e[i] * wl[i];
      return l;
    };
    double scale = 0;
    for (double x : got) scale = std::max(scale, std::fabs(x));
    for (int i = 0; i < D; ++i) {
      const double h = 1e-5 * std::max(1.0, std::fabs(sigma[i]));
      Vec plus = sigma, minus = sigma;
      plus[i] += h;
      minus[i] -= h;
      // atol: the FD's own rounding noise when every gradient is tiny (behind an opaque sample)
      w.add(got[i], double((loss(plus) - loss(minus)) / (plus[i] - minus[i])), 1e-6, 1e-6 * scale + 1e-12);
    }
  }
  const std::string tag = std::string("double ") + mode_name(inclusive) + " " + kActNames[a];
  check(same_weights, tag + ": ray_backward's weights are ray_weights'");
  check(w.ok(), tag + ": ray_backward's dL/dsigma matches FD", w.v);
}

// ---- the whole op on a tiny MLP ----

// The 14 parameters back to back in the header's flat layout, and the rays' codes.
struct Problem {
  mlp::Dims d;
  int R, D;
  bool inclusive;
  int act;
  Vec params, color, shape;  // flat params; color [R, D, Ec]; shape [R, D, Es]
  Vec gF, gS;                // dL/dF [R, H], dL/dS [R]
};

// One sample's activations.
struct Sample {
  Vec a0, a1, a2, a3, a4, h;
  double sigma;
};

const double* param(const Problem& p, int q) { return p.params.data() + mlp::param_offset(p.d, q); }

// y = W x + b for the layer whose weight is parameter wq (x of length in), optionally ReLU'd.
Vec linear(const Problem& p, int wq, const Vec& x, bool relu) {
  const int64_t out = mlp::layer_out(p.d, wq), in = mlp::layer_in(p.d, wq);
  const double *W = param(p, wq), *b = param(p, wq + 1);
  Vec y(out);
  for (int64_t o = 0; o < out; ++o) {
    double z = b[o];
    for (int64_t k = 0; k < in; ++k) z += W[o * in + k] * x[k];
    y[o] = relu ? std::max(z, 0.0) : z;
  }
  return y;
}

Sample sample_forward(const Problem& p, int r, int i) {
  const mlp::Dims& d = p.d;
  const int64_t n = int64_t(r) * p.D + i;
  Sample s;
  s.a0 = linear(p, mlp::kShapeInW, Vec(p.shape.begin() + n * d.Es, p.shape.begin() + (n + 1) * d.Es), true);
  s.a1 = linear(p, mlp::kShapeHiddenW, s.a0, true);
  s.sigma = linear(p, mlp::kDensityW, s.a1, false)[0];
  s.a2 = linear(p, mlp::kShapeFeatureW, s.a1, true);
  s.a3 = linear(p, mlp::kColorInW, Vec(p.color.begin() + n * d.Ec, p.color.begin() + (n + 1) * d.Ec), true);
  Vec x = s.a2;
  x.insert(x.end(), s.a3.begin(), s.a3.end());
  s.a4 = linear(p, mlp::kFuseW, x, true);
  s.h = linear(p, mlp::kFuseHiddenW, s.a4, true);
  return s;
}

// L = sum_r <gF_r, F_r> + gS_r S_r, compositing in closed form.
LD loss(const Problem& p) {
  LD l = 0;
  for (int r = 0; r < p.R; ++r) {
    std::vector<Sample> s;
    Vec sigma;
    for (int i = 0; i < p.D; ++i) {
      s.push_back(sample_forward(p, r, i));
      sigma.push_back(s.back().sigma);
    }
    const std::vector<LD> w = closed_form_weights(sigma, p.act, p.inclusive);
    for (int i = 0; i < p.D; ++i) {
      l += w[i] * p.gS[r];
      for (int64_t k = 0; k < p.d.H; ++k) l += w[i] * s[i].h[k] * p.gF[r * p.d.H + k];
    }
  }
  return l;
}

// dL/dx += W^T dz and dW += dz x^T, db += dz for the layer of weight wq; dx may be null.
void linear_backward(const Problem& p, int wq, const Vec& dz, const Vec& x, Vec& grads, double* dx) {
  const int64_t out = mlp::layer_out(p.d, wq), in = mlp::layer_in(p.d, wq);
  const double* W = param(p, wq);
  double* dW = grads.data() + mlp::param_offset(p.d, wq);
  double* db = grads.data() + mlp::param_offset(p.d, wq + 1);
  for (int64_t o = 0; o < out; ++o) {
    db[o] += dz[o];
    for (int64_t k = 0; k < in; ++k) {
      dW[o * in + k] += dz[o] * x[k];
      if (dx != nullptr) dx[k] += W[o * in + k] * dz[o];
    }
  }
}

// dz = relu'(.) * dy from the layer's output y.
Vec through_relu(const Vec& dy, const Vec& y) {
  Vec dz(dy.size());
  for (size_t k = 0; k < dy.size(); ++k) dz[k] = mlp::relu_backward(dy[k], y[k]);
  return dz;
}

// The kernels' recipe: per ray, e_i and the header's ray_backward; then per sample, backprop.
// Returns the gradients of [params (flat), color, shape].
Vec recipe_backward(const Problem& p) {
  const mlp::Dims& d = p.d;
  Vec gparams(p.params.size()), gcolor(p.color.size()), gshape(p.shape.size());
  for (int r = 0; r < p.R; ++r) {
    std::vector<Sample> s;
    Vec sigma, e, w(p.D), dsigma(p.D);
    for (int i = 0; i < p.D; ++i) {
      s.push_back(sample_forward(p, r, i));
      sigma.push_back(s.back().sigma);
      double ei = p.gS[r];
      for (int64_t k = 0; k < d.H; ++k) ei += p.gF[r * d.H + k] * s[i].h[k];
      e.push_back(ei);
    }
    mlp::ray_backward(sigma.data(), e.data(), p.D, p.inclusive, p.act, w.data(), dsigma.data());
    for (int i = 0; i < p.D; ++i) {
      const Sample& si = s[i];
      const int64_t n = int64_t(r) * p.D + i;
      Vec dh(d.H);
      for (int64_t k = 0; k < d.H; ++k) dh[k] = w[i] * p.gF[r * d.H + k];
      const Vec dz5 = through_relu(dh, si.h);
      Vec da4(d.H);
      linear_backward(p, mlp::kFuseHiddenW, dz5, si.a4, gparams, da4.data());
      Vec x = si.a2, dx(d.H4 + d.H);
      x.insert(x.end(), si.a3.begin(), si.a3.end());
      linear_backward(p, mlp::kFuseW, through_relu(da4, si.a4), x, gparams, dx.data());
      const Vec da2(dx.begin(), dx.begin() + d.H4), da3(dx.begin() + d.H4, dx.end());
      const Vec c(p.color.begin() + n * d.Ec, p.color.begin() + (n + 1) * d.Ec);
      linear_backward(p, mlp::kColorInW, through_relu(da3, si.a3), c, gparams, gcolor.data() + n * d.Ec);
      Vec da1(d.H);
      linear_backward(p, mlp::kShapeFeatureW, through_relu(da2, si.a2), si.a1, gparams, da1.data());
      linear_backward(p, mlp::kDensityW, {dsigma[i]}, si.a1, gparams, da1.data());
      Vec da0(d.H);
      linear_backward(p, mlp::kShapeHiddenW, through_relu(da1, si.a1), si.a0, gparams, da0.data());
      const Vec sc(p.shape.begin() + n * d.Es, p.shape.begin() + (n + 1) * d.Es);
      linear_backward(p, mlp::kShapeInW, through_relu(da0, si.a0), sc, gparams, gshape.data() + n * d.Es);
    }
  }
  gparams.insert(gparams.end(), gcolor.begin(), gcolor.end());
  gparams.insert(gparams.end(), gshape.begin(), gshape.end());
  return gparams;
}

Problem random_problem(int act, bool inclusive) {
  Problem p{{3, 2, 6, 2}, 3, 4, inclusive, act, {}, {}, {}, {}, {}};  // Ec, Es, H, H4; R, D
  p.params.resize(mlp::num_param_elements(p.d));
  for (double& x : p.params) x = uniform(-0.8, 0.8);
  p.params[mlp::param_offset(p.d, mlp::kDensityB)] = 0.5;  // most densities positive: relu passes them
  p.color.resize(int64_t(p.R) * p.D * p.d.Ec);
  p.shape.resize(int64_t(p.R) * p.D * p.d.Es);
  for (double& x : p.color) x = uniform(-1, 1);
  for (double& x : p.shape) x = uniform(-1, 1);
  p.gF.resize(p.R * p.d.H);
  p.gS.resize(p.R);
  for (double& x : p.gF) x = uniform(-1, 1);
  for (double& x : p.gS) x = uniform(-1, 1);
  return p;
}

void check_tiny_mlp(int a, bool inclusive) {
  Worst w;
  for (int trial = 0; trial < 3; ++trial) {
    Problem p = random_problem(kActs[a], inclusive);
    const Vec got = recipe_backward(p);
    // The inputs FD perturbs: params, then color, then shape (the order recipe_backward returns).
    std::vector<double*> inputs;
    for (Vec* v : {&p.params, &p.color, &p.shape})
      for (double& x : *v) inputs.push_back(&x);
    double scale = 0;
    for (double x : got) scale = std::max(scale, std::fabs(x));
    for (size_t j = 0; j < inputs.size(); ++j) {
      const double x0 = *inputs[j], h = 1e-6;
      *inputs[j] = x0 + h;
      const LD plus = loss(p);
      *inputs[j] = x0 - h;
      const LD minus = loss(p);
      *inputs[j] = x0;
      w.add(got[j], double((plus - minus) / (2 * h)), 1e-5, 1e-5 * scale);
    }
  }
  check(w.ok(),
        std::string("tiny MLP ") + mode_name(inclusive) + " " + kActNames[a] +
            ": the backward recipe's gradients (params, codes) match FD",
        w.v);
}

}  // namespace

int main() {
  check_param_table();
  check_relu();
  for (bool inclusive : {false, true})
    for (int a = 0; a < 3; ++a) {
      check_ray_weights<double>(a, inclusive);
      check_ray_weights<float>(a, inclusive);
      check_ray_backward(a, inclusive);
      check_tiny_mlp(a, inclusive);
    }
  return fnevr_test::summary();
}
