// SPADE normalisation on the CPU. NCHW: a task owns whole (n, c) rows of S contiguous elements, so
// the statistics are scalars per row. channels_last: a task owns blocks of rows of C channels, and
// per-channel partial results of the blocks are merged in a second, cheap step.
#include "common/cpu.h"
#include "common/cpu_clones.h"
#include "common/cpu_memory.h"
#include "spade_norm.h"
#include "spade_norm_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace fnevr {
namespace {

using spade::Moments;

constexpr int64_t kGrainElements = 32768;  // elements per task: enough to amortise its scheduling
constexpr int64_t kChunk = 1024;           // elements per two-pass chunk of the statistics (fits L1)

int64_t rows_per_task(int64_t row_len) { return grain_size(row_len, kGrainElements); }

// Moments of a contiguous run, chunk by chunk: a first pass for the chunk's mean, a second for the
// deviations from it, whose own (small) mean is folded back in (the corrected two-pass formula), so a
// large common offset never cancels. Chunks merge by Chan's rule.
template <typename acc_t, typename scalar_t>
FNEVR_CPU_CLONES Moments<acc_t> run_moments(const scalar_t* p, int64_t len) {
  Moments<acc_t> total;
  for (int64_t s0 = 0; s0 < len; s0 += kChunk) {
    const int64_t L = std::min(kChunk, len - s0);
    const scalar_t* q = p + s0;
    acc_t sum[8] = {}, d1[8] = {}, d2[8] = {};
    int64_t k = 0;
    for (; k + 8 <= L; k += 8)
      for (int j = 0; j < 8; ++j) sum[j] += static_cast<acc_t>(q[k + j]);
    for (; k < L; ++k) sum[0] += static_cast<acc_t>(q[k]);
    const acc_t shift = (((sum[0] + sum[1]) + (sum[2] + sum[3])) + ((sum[4] + sum[5]) + (sum[6] + sum[7]))) / acc_t(L);
    for (k = 0; k + 8 <= L; k += 8)
      for (int j = 0; j < 8; ++j) {
        const acc_t d = static_cast<acc_t>(q[k + j]) - shift;
        d1[j] += d;
        d2[j] += d * d;
      }
    for (; k < L; ++k) {
      const acc_t d = static_cast<acc_t>(q[k]) - shift;
      d1[0] += d;
      d2[0] += d * d;
    }
    const acc_t s1 = ((d1[0] + d1[1]) + (d1[2] + d1[3])) + ((d1[4] + d1[5]) + (d1[6] + d1[7]));
    const acc_t s2 = ((d2[0] + d2[1]) + (d2[2] + d2[3])) + ((d2[4] + d2[5]) + (d2[6] + d2[7]));
    total.merge(Moments<acc_t>::from_shifted_sums(acc_t(L), shift, s1, s2));
  }
  return total;
}

// Per-channel moments of `rows` consecutive rows of C channels, the same two-pass way.
template <typename acc_t, typename scalar_t>
FNEVR_CPU_CLONES void block_moments(const scalar_t* p, int64_t rows, int64_t C, Moments<acc_t>* out) {
  std::vector<acc_t> shift(C, acc_t(0)), d1(C, acc_t(0)), d2(C, acc_t(0));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < C; ++c) shift[c] += static_cast<acc_t>(p[r * C + c]);
  for (int64_t c = 0; c < C; ++c) shift[c] /= acc_t(rows);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < C; ++c) {
      const acc_t d = static_cast<acc_t>(p[r * C + c]) - shift[c];
      d1[c] += d;
      d2[c] += d * d;
    }
  for (int64_t c = 0; c < C; ++c) out[c] = Moments<acc_t>::from_shifted_sums(acc_t(rows), shift[c], d1[c], d2[c]);
}

// channels_last row blocks: `sets` independent sets (samples for instance norm, one for batch norm)
// of R rows each, cut into blocks of at most RB rows; f(set, first row, rows, block index) per block.
struct RowBlocks {
  int64_t sets, R, RB, blocks;
  RowBlocks(const SpadeShape& s, bool batch)
      : sets(batch ? 1 : s.N),
        R(batch ? s.N * s.S : s.S),
        RB(rows_per_task(s.C)),
        blocks(R == 0 ? 0 : (R + RB - 1) / RB) {}
  template <typename F>
  void parallel(F&& f) const {
    at::parallel_for(0, sets * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t set = t / blocks, r0 = (t % blocks) * RB;
        f(set, set * R + r0, std::min(RB, R - r0), t);
      }
    });
  }
};

template <typename scalar_t>
void stats_impl(const scalar_t* x, at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* var,
                const SpadeShape& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = s.N, C = s.C, S = s.S;
  if (!s.channels_last) {
    const int64_t G = s.batch ? C : N * C;
    at::parallel_for(0, G, rows_per_task(s.batch ? N * S : S), [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        Moments<acc_t> m;
        if (s.batch)
          for (int64_t n = 0; n < N; ++n) m.merge(run_moments<acc_t>(x + (n * C + g) * S, S));
        else
          m = run_moments<acc_t>(x + g * S, S);
        mean[g] = m.mean;
        var[g] = m.var();
      }
    });
    return;
  }
  const RowBlocks rb(s, s.batch);
  std::vector<Moments<acc_t>> part(rb.sets * rb.blocks * C);
  rb.parallel(
      [&](int64_t, int64_t row, int64_t rows, int64_t t) { block_moments(x + row * C, rows, C, &part[t * C]); });
  at::parallel_for(0, rb.sets * C, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t set = i / C, c = i % C;
      Moments<acc_t> m;
      for (int64_t b = 0; b < rb.blocks; ++b) m.merge(part[(set * rb.blocks + b) * C + c]);
      mean[i] = m.mean;
      var[i] = m.var();
    }
  });
}

// Per-group constants the element loops read: mean, rstd and (backward) the two group means.
template <typename acc_t>
struct GroupConsts {
  std::vector<acc_t> mean, rstd, c1, c2;
  GroupConsts(const at::Tensor& mean_t, const at::Tensor& var_t, double eps, const at::Tensor* sums, double scale) {
    const int64_t G = mean_t.numel();
    const acc_t* m = mean_t.const_data_ptr<acc_t>();
    const acc_t* v = var_t.const_data_ptr<acc_t>();
    mean.assign(m, m + G);
    rstd.resize(G);
    for (int64_t g = 0; g < G; ++g) rstd[g] = spade::rsqrt_(v[g] + acc_t(eps));
    if (sums != nullptr) {
      const acc_t* p = sums->const_data_ptr<acc_t>();
      c1.resize(G);
      c2.resize(G);
      for (int64_t g = 0; g < G; ++g) {
        c1[g] = p[g] * acc_t(scale);
        c2[g] = p[G + g] * acc_t(scale);
      }
    }
  }
};

// The element loops below see one row of L contiguous elements with contiguous gamma, beta (and
// outputs); the statistics are one value per row (NCHW, kRowStats) or one per element (channels_last:
// the row is the channels). Branch-free bodies over contiguous pointers let the compiler vectorise.
template <typename acc_t>
struct RowStats {
  const acc_t *mean, *rstd, *c1, *c2;
};

template <typename scalar_t, int kAct, bool kRowStats>
FNEVR_CPU_CLONES void forward_row(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                  const scalar_t* __restrict__ b, scalar_t* __restrict__ y,
                                  RowStats<at::opmath_type<scalar_t>> st, int64_t L, at::opmath_type<scalar_t> slope) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t m0 = st.mean[0], r0 = st.rstd[0];
  for (int64_t j = 0; j < L; ++j) {
    const acc_t xhat =
        spade::normalise(static_cast<acc_t>(x[j]), kRowStats ? m0 : st.mean[j], kRowStats ? r0 : st.rstd[j]);
    y[j] =
        static_cast<scalar_t>(spade::modulate(xhat, static_cast<acc_t>(g[j]), static_cast<acc_t>(b[j]), kAct, slope));
  }
}

template <typename scalar_t, int kAct, bool kRowStats>
FNEVR_CPU_CLONES void backward_row(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                   const scalar_t* __restrict__ g, const scalar_t* __restrict__ b,
                                   scalar_t* __restrict__ dx, scalar_t* __restrict__ dg, scalar_t* __restrict__ db,
                                   RowStats<at::opmath_type<scalar_t>> st, int64_t L, at::opmath_type<scalar_t> slope) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t m0 = st.mean[0], r0 = st.rstd[0], c10 = st.c1[0], c20 = st.c2[0];
  for (int64_t j = 0; j < L; ++j) {
    const acc_t r = kRowStats ? r0 : st.rstd[j];
    const acc_t xhat = spade::normalise(static_cast<acc_t>(x[j]), kRowStats ? m0 : st.mean[j], r);
    const auto e = spade::modulate_grad(static_cast<acc_t>(dy[j]), xhat, static_cast<acc_t>(g[j]),
                                        static_cast<acc_t>(b[j]), kAct, slope);
    dx[j] = static_cast<scalar_t>(
        spade::input_grad(e.dxhat, xhat, r, kRowStats ? c10 : st.c1[j], kRowStats ? c20 : st.c2[j]));
    dg[j] = static_cast<scalar_t>(e.dz * xhat);
    db[j] = static_cast<scalar_t>(e.dz);
  }
}

// NCHW: the row's four sums (dxhat, dxhat xhat, dz, dz xhat), in eight lanes so they vectorise.
template <typename scalar_t, int kAct>
FNEVR_CPU_CLONES void reduce_row(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                 const scalar_t* __restrict__ g, const scalar_t* __restrict__ b,
                                 at::opmath_type<scalar_t> m, at::opmath_type<scalar_t> r, int64_t L,
                                 at::opmath_type<scalar_t> slope, at::opmath_type<scalar_t> (&out)[4]) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t s[4][8] = {};
  auto add = [&](int64_t j, int lane) {
    const acc_t xhat = spade::normalise(static_cast<acc_t>(x[j]), m, r);
    const auto e = spade::modulate_grad(static_cast<acc_t>(dy[j]), xhat, static_cast<acc_t>(g[j]),
                                        static_cast<acc_t>(b[j]), kAct, slope);
    s[0][lane] += e.dxhat;
    s[1][lane] += e.dxhat * xhat;
    s[2][lane] += e.dz;
    s[3][lane] += e.dz * xhat;
  };
  int64_t j = 0;
  for (; j + 8 <= L; j += 8)
    for (int lane = 0; lane < 8; ++lane) add(j + lane, lane);
  for (; j < L; ++j) add(j, 0);
  for (int q = 0; q < 4; ++q)
    out[q] = ((s[q][0] + s[q][1]) + (s[q][2] + s[q][3])) + ((s[q][4] + s[q][5]) + (s[q][6] + s[q][7]));
}

// channels_last: adds one row's per-channel contributions to acc [4][C].
template <typename scalar_t, int kAct>
FNEVR_CPU_CLONES void reduce_row_channels(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                          const scalar_t* __restrict__ g, const scalar_t* __restrict__ b,
                                          const at::opmath_type<scalar_t>* __restrict__ mean,
                                          const at::opmath_type<scalar_t>* __restrict__ rstd, int64_t C,
                                          at::opmath_type<scalar_t> slope,
                                          at::opmath_type<scalar_t>* __restrict__ acc) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t c = 0; c < C; ++c) {
    const acc_t xhat = spade::normalise(static_cast<acc_t>(x[c]), mean[c], rstd[c]);
    const auto e = spade::modulate_grad(static_cast<acc_t>(dy[c]), xhat, static_cast<acc_t>(g[c]),
                                        static_cast<acc_t>(b[c]), kAct, slope);
    acc[c] += e.dxhat;
    acc[C + c] += e.dxhat * xhat;
    acc[2 * C + c] += e.dz;
    acc[3 * C + c] += e.dz * xhat;
  }
}

// Walks x as rows: f(row index, element offset, n, statistics index of element 0) per row, with
// scratch space for gamma/beta rows that are one value (NCHW with [N, C] modulation). NCHW rows are
// (n, c) pairs of S elements; channels_last rows are (n, s) pairs of C channels.
template <typename scalar_t, typename F>
void for_rows(const SpadeShape& s, F&& f) {
  const int64_t rows = s.channels_last ? s.N * s.S : s.N * s.C, len = s.channels_last ? s.C : s.S;
  at::parallel_for(0, rows, rows_per_task(len), [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> scratch(4 * len);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = s.channels_last ? i / s.S : i / s.C;
      const int64_t grp = s.channels_last ? (s.batch ? 0 : n * s.C) : (s.batch ? i % s.C : i);
      f(i, i * len, n, grp, len, scratch.data());
    }
  });
}

// gamma or beta along row i: itself when full size, else its (n, c) value(s).
template <typename scalar_t>
const scalar_t* modulation_row(const scalar_t* t, bool full, const SpadeShape& s, int64_t i, int64_t off, int64_t n,
                               scalar_t* scratch) {
  if (full) return t + off;
  if (s.channels_last) return t + n * s.C;
  std::fill(scratch, scratch + s.S, t[i]);  // NCHW row i is (n, c) = i: one value for the row
  return scratch;
}

template <typename scalar_t>
void forward_impl(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                  const GroupConsts<at::opmath_type<scalar_t>>& k, at::Tensor& y, const SpadeShape& s, int64_t act,
                  double slope) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = gamma.const_data_ptr<scalar_t>();
  const scalar_t* bp = beta.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const bool g_full = gamma.dim() == 3, b_full = beta.dim() == 3;
  with_activation(act, [&](auto a) {
    constexpr int kAct = decltype(a)::value;
    for_rows<scalar_t>(s, [&](int64_t i, int64_t off, int64_t n, int64_t grp, int64_t L, scalar_t* scratch) {
      const scalar_t* g = modulation_row(gp, g_full, s, i, off, n, scratch);
      const scalar_t* b = modulation_row(bp, b_full, s, i, off, n, scratch + L);
      const RowStats<acc_t> st{k.mean.data() + grp, k.rstd.data() + grp, nullptr, nullptr};
      if (s.channels_last)
        forward_row<scalar_t, kAct, false>(xp + off, g, b, yp + off, st, L, acc_t(slope));
      else
        forward_row<scalar_t, kAct, true>(xp + off, g, b, yp + off, st, L, acc_t(slope));
    });
  });
}

template <typename scalar_t>
void reduce_impl(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                 const GroupConsts<at::opmath_type<scalar_t>>& k, at::Tensor& sums, const SpadeShape& s, int64_t act,
                 double slope_d) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* dyp = grad_y.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = gamma.const_data_ptr<scalar_t>();
  const scalar_t* bp = beta.const_data_ptr<scalar_t>();
  acc_t* out = sums.mutable_data_ptr<acc_t>();
  const int64_t NC = s.N * s.C, C = s.C;
  const bool g_full = gamma.dim() == 3, b_full = beta.dim() == 3;
  const acc_t slope = acc_t(slope_d);
  with_activation(act, [&](auto a) {
    constexpr int kAct = decltype(a)::value;
    if (!s.channels_last) {
      for_rows<scalar_t>(s, [&](int64_t i, int64_t off, int64_t n, int64_t grp, int64_t L, scalar_t* scratch) {
        acc_t row[4];
        reduce_row<scalar_t, kAct>(dyp + off, xp + off, modulation_row(gp, g_full, s, i, off, n, scratch),
                                   modulation_row(bp, b_full, s, i, off, n, scratch + L), k.mean[grp], k.rstd[grp], L,
                                   slope, row);
        for (int q = 0; q < 4; ++q) out[q * NC + i] = row[q];
      });
      return;
    }
    const RowBlocks rb(s, false);  // blocks within one sample: the sums are per (n, c)
    std::vector<acc_t> part(rb.sets * rb.blocks * C * 4, acc_t(0));
    rb.parallel([&](int64_t n, int64_t row, int64_t rows, int64_t t) {
      const int64_t grp = s.batch ? 0 : n * C;
      for (int64_t r = row; r < row + rows; ++r)
        reduce_row_channels<scalar_t, kAct>(dyp + r * C, xp + r * C, g_full ? gp + r * C : gp + n * C,
                                            b_full ? bp + r * C : bp + n * C, k.mean.data() + grp, k.rstd.data() + grp,
                                            C, slope, &part[t * C * 4]);
    });
    at::parallel_for(0, NC, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = i / C, c = i % C;
        for (int q = 0; q < 4; ++q) {
          acc_t total = 0;
          for (int64_t blk = 0; blk < rb.blocks; ++blk) total += part[((n * rb.blocks + blk) * 4 + q) * C + c];
          out[q * NC + i] = total;
        }
      }
    });
  });
}

// dg / db may be null (not wanted): the row then writes them to scratch.
template <typename scalar_t>
void backward_impl(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                   const GroupConsts<at::opmath_type<scalar_t>>& k, at::Tensor& dx, scalar_t* dg, scalar_t* db,
                   const SpadeShape& s, int64_t act, double slope) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* dyp = grad_y.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = gamma.const_data_ptr<scalar_t>();
  const scalar_t* bp = beta.const_data_ptr<scalar_t>();
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  const bool g_full = gamma.dim() == 3, b_full = beta.dim() == 3;
  with_activation(act, [&](auto a) {
    constexpr int kAct = decltype(a)::value;
    for_rows<scalar_t>(s, [&](int64_t i, int64_t off, int64_t n, int64_t grp, int64_t L, scalar_t* scratch) {
      const scalar_t* g = modulation_row(gp, g_full, s, i, off, n, scratch);
      const scalar_t* b = modulation_row(bp, b_full, s, i, off, n, scratch + L);
      scalar_t* dgr = dg != nullptr ? dg + off : scratch + 2 * L;
      scalar_t* dbr = db != nullptr ? db + off : scratch + 3 * L;
      const RowStats<acc_t> st{k.mean.data() + grp, k.rstd.data() + grp, k.c1.data() + grp, k.c2.data() + grp};
      if (s.channels_last)
        backward_row<scalar_t, kAct, false>(dyp + off, xp + off, g, b, dxp + off, dgr, dbr, st, L, acc_t(slope));
      else
        backward_row<scalar_t, kAct, true>(dyp + off, xp + off, g, b, dxp + off, dgr, dbr, st, L, acc_t(slope));
    });
  });
}

// Instance norm of NCHW x, one (n, c) row at a time from statistics to output, so the row is read
// from memory once and then from cache.
template <typename scalar_t>
void instance_forward_impl(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta, at::Tensor& y,
                           at::Tensor& mean, at::Tensor& var, const SpadeShape& s, double eps, int64_t act,
                           double slope) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = gamma.const_data_ptr<scalar_t>();
  const scalar_t* bp = beta.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  acc_t* mp = mean.mutable_data_ptr<acc_t>();
  acc_t* vp = var.mutable_data_ptr<acc_t>();
  const bool g_full = gamma.dim() == 3, b_full = beta.dim() == 3;
  with_activation(act, [&](auto a) {
    constexpr int kAct = decltype(a)::value;
    for_rows<scalar_t>(s, [&](int64_t i, int64_t off, int64_t n, int64_t, int64_t L, scalar_t* scratch) {
      const Moments<acc_t> m = run_moments<acc_t>(xp + off, L);
      mp[i] = m.mean;
      vp[i] = m.var();
      const acc_t rstd = spade::rsqrt_(m.var() + acc_t(eps));
      const RowStats<acc_t> st{&mp[i], &rstd, nullptr, nullptr};
      forward_row<scalar_t, kAct, true>(xp + off, modulation_row(gp, g_full, s, i, off, n, scratch),
                                        modulation_row(bp, b_full, s, i, off, n, scratch + L), yp + off, st, L,
                                        acc_t(slope));
    });
  });
}

// Its backward, likewise one row at a time: the group sums, then the gradients from cache. [N, C]
// gamma/beta get their gradients as row sums (dg, db then point to [N, C]).
template <typename scalar_t>
void instance_backward_impl(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& gamma,
                            const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var, at::Tensor& dx,
                            scalar_t* dg, scalar_t* db, const SpadeShape& s, double eps, int64_t act, double slope) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* dyp = grad_y.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = gamma.const_data_ptr<scalar_t>();
  const scalar_t* bp = beta.const_data_ptr<scalar_t>();
  const acc_t* mp = mean.const_data_ptr<acc_t>();
  const acc_t* vp = var.const_data_ptr<acc_t>();
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  const bool g_full = gamma.dim() == 3, b_full = beta.dim() == 3;
  with_activation(act, [&](auto a) {
    constexpr int kAct = decltype(a)::value;
    for_rows<scalar_t>(s, [&](int64_t i, int64_t off, int64_t n, int64_t, int64_t L, scalar_t* scratch) {
      const scalar_t* g = modulation_row(gp, g_full, s, i, off, n, scratch);
      const scalar_t* b = modulation_row(bp, b_full, s, i, off, n, scratch + L);
      const acc_t rstd = spade::rsqrt_(vp[i] + acc_t(eps));
      acc_t sums[4];
      reduce_row<scalar_t, kAct>(dyp + off, xp + off, g, b, mp[i], rstd, L, acc_t(slope), sums);
      const acc_t c1 = sums[0] / acc_t(L), c2 = sums[1] / acc_t(L);
      const RowStats<acc_t> st{&mp[i], &rstd, &c1, &c2};
      scalar_t* dgr = dg != nullptr && g_full ? dg + off : scratch + 2 * L;
      scalar_t* dbr = db != nullptr && b_full ? db + off : scratch + 3 * L;
      backward_row<scalar_t, kAct, true>(dyp + off, xp + off, g, b, dxp + off, dgr, dbr, st, L, acc_t(slope));
      if (dg != nullptr && !g_full) dg[i] = static_cast<scalar_t>(sums[3]);
      if (db != nullptr && !b_full) db[i] = static_cast<scalar_t>(sums[2]);
    });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> spade_norm_stats_cpu(const at::Tensor& x, bool channels_last, bool batch) {
  SpadeShape s = check_spade_x(x, channels_last);
  s.batch = batch;
  const auto opts = x.options().dtype(spade_stats_type(x));
  const std::vector<int64_t> shape = batch ? std::vector<int64_t>{s.C} : std::vector<int64_t>{s.N, s.C};
  at::Tensor mean = at::zeros(shape, opts), var = at::zeros(shape, opts);
  if (x.numel() == 0) return {mean, var};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spade_norm_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    stats_impl<scalar_t>(x.const_data_ptr<scalar_t>(), mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>(),
                         s);
  });
  return {mean, var};
}

at::Tensor spade_norm_forward_cpu(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                                  const at::Tensor& mean, const at::Tensor& var, double eps, bool channels_last,
                                  int64_t activation, double slope) {
  const SpadeShape s = check_spade_inputs(x, gamma, beta, mean, var, channels_last, activation);
  at::Tensor y = empty_for_writing(x);
  if (x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spade_norm_forward_cpu", [&] {
    const GroupConsts<at::opmath_type<scalar_t>> k(mean, var, eps, nullptr, 0.0);
    forward_impl<scalar_t>(x, gamma, beta, k, y, s, activation, slope);
  });
  return y;
}

at::Tensor spade_norm_backward_reduce_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& gamma,
                                          const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& var,
                                          double eps, bool channels_last, int64_t activation, double slope) {
  const SpadeShape s = check_spade_inputs(x, gamma, beta, mean, var, channels_last, activation);
  check_spade_grad(grad_y, x);
  at::Tensor sums = at::zeros({4, s.N, s.C}, mean.options());
  if (x.numel() == 0) return sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spade_norm_backward_reduce_cpu", [&] {
    const GroupConsts<at::opmath_type<scalar_t>> k(mean, var, eps, nullptr, 0.0);
    reduce_impl<scalar_t>(grad_y, x, gamma, beta, k, sums, s, activation, slope);
  });
  return sums;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spade_norm_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& group_sums, double scale, double eps,
    bool channels_last, int64_t activation, double slope, bool gamma_grad, bool beta_grad) {
  const SpadeShape s = check_spade_backward_inputs(grad_y, x, gamma, beta, mean, var, group_sums, channels_last,
                                                   activation, gamma_grad, beta_grad);
  at::Tensor dx = empty_for_writing(x);
  at::Tensor dg = gamma_grad ? empty_for_writing(x) : at::empty({0}, x.options());
  at::Tensor db = beta_grad ? empty_for_writing(x) : at::empty({0}, x.options());
  if (x.numel() == 0) return {dx, dg, db};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spade_norm_backward_cpu", [&] {
    const GroupConsts<at::opmath_type<scalar_t>> k(mean, var, eps, &group_sums, scale);
    backward_impl<scalar_t>(grad_y, x, gamma, beta, k, dx, gamma_grad ? dg.mutable_data_ptr<scalar_t>() : nullptr,
                            beta_grad ? db.mutable_data_ptr<scalar_t>() : nullptr, s, activation, slope);
  });
  return {dx, dg, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spade_norm_instance_forward_cpu(const at::Tensor& x,
                                                                               const at::Tensor& gamma,
                                                                               const at::Tensor& beta, double eps,
                                                                               int64_t activation, double slope) {
  const SpadeShape s = check_spade_x(x, false);
  const auto stats_opts = x.options().dtype(spade_stats_type(x));
  at::Tensor mean = at::zeros({s.N, s.C}, stats_opts), var = at::zeros({s.N, s.C}, stats_opts);
  check_spade_inputs(x, gamma, beta, mean, var, false, activation);
  at::Tensor y = empty_for_writing(x);
  if (x.numel() == 0) return {y, mean, var};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spade_norm_instance_forward_cpu", [&] {
    instance_forward_impl<scalar_t>(x, gamma, beta, y, mean, var, s, eps, activation, slope);
  });
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spade_norm_instance_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
    const at::Tensor& mean, const at::Tensor& var, double eps, int64_t activation, double slope, bool gamma_grad,
    bool beta_grad) {
  const SpadeShape s = check_spade_inputs(x, gamma, beta, mean, var, false, activation);
  check_spade_grad(grad_y, x);
  TORCH_CHECK(!s.batch, "fnevr spade_norm: the fused instance-norm backward needs [N, C] statistics");
  at::Tensor dx = empty_for_writing(x);
  at::Tensor dg = gamma_grad ? empty_for_writing(gamma) : at::empty({0}, x.options());
  at::Tensor db = beta_grad ? empty_for_writing(beta) : at::empty({0}, x.options());
  if (x.numel() == 0) return {dx, dg.zero_(), db.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spade_norm_instance_backward_cpu", [&] {
    instance_backward_impl<scalar_t>(grad_y, x, gamma, beta, mean, var, dx,
                                     gamma_grad ? dg.mutable_data_ptr<scalar_t>() : nullptr,
                                     beta_grad ? db.mutable_data_ptr<scalar_t>() : nullptr, s, eps, activation, slope);
  });
  return {dx, dg, db};
}

// The schemas of this op's kernel entry points (fnevr/ops/spade_norm.py calls them; the CUDA kernels
// implement the same ones). Defined here, in fnevr._C, which fnevr._C_cuda needs loaded first.
TORCH_LIBRARY_FRAGMENT(fnevr, m) {
  m.def("_spade_norm_stats(Tensor x, bool channels_last, bool batch) -> (Tensor, Tensor)");
  m.def(
      "_spade_norm_forward(Tensor x, Tensor gamma, Tensor beta, Tensor mean, Tensor var, float eps, "
      "bool channels_last, int activation, float slope) -> Tensor");
  m.def(
      "_spade_norm_backward_reduce(Tensor grad_y, Tensor x, Tensor gamma, Tensor beta, Tensor mean, "
      "Tensor var, float eps, bool channels_last, int activation, float slope) -> Tensor");
  m.def(
      "_spade_norm_backward(Tensor grad_y, Tensor x, Tensor gamma, Tensor beta, Tensor mean, Tensor var, "
      "Tensor group_sums, float scale, float eps, bool channels_last, int activation, float slope, "
      "bool gamma_grad, bool beta_grad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_spade_norm_instance_forward(Tensor x, Tensor gamma, Tensor beta, float eps, int activation, "
      "float slope) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_spade_norm_instance_backward(Tensor grad_y, Tensor x, Tensor gamma, Tensor beta, Tensor mean, "
      "Tensor var, float eps, int activation, float slope, bool gamma_grad, bool beta_grad) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fnevr, CPU, m) {
  m.impl("_spade_norm_instance_forward", &spade_norm_instance_forward_cpu);
  m.impl("_spade_norm_instance_backward", &spade_norm_instance_backward_cpu);
  m.impl("_spade_norm_stats", &spade_norm_stats_cpu);
  m.impl("_spade_norm_forward", &spade_norm_forward_cpu);
  m.impl("_spade_norm_backward_reduce", &spade_norm_backward_reduce_cpu);
  m.impl("_spade_norm_backward", &spade_norm_backward_cpu);
}

}  // namespace fnevr
