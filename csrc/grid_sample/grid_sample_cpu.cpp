// Grid sampling on the CPU. Output points go in blocks of kBlock whose taps (grid_sample_math.h)
// are computed once; then, for channels_last tensors, each point loops over its contiguous
// channels (vectorisable), and for NCHW each channel plane loops over the block's points.
// The input gradient is a scatter made deterministic without atomics: a task owns whole channel
// ranges of one image's grad_input and adds the output points' contributions in order, so every
// element sums its terms in the same order whatever the thread count.
#include "grid_sample.h"
#include "grid_sample_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace fnevr {
namespace {

using grid_sample::Taps;

constexpr int64_t kBlock = 64;  // output points whose taps are computed together

struct Dims {
  int64_t N, C, H, W, Ho, Wo;
  int mode, padding;
  bool align_corners;
  int64_t points() const { return Ho * Wo; }
  int64_t blocks() const { return (points() + kBlock - 1) / kBlock; }
};

struct Strides {
  int64_t n, c, h, w;
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

Dims dims_of(const at::Tensor& input, const at::Tensor& grid, int64_t mode, int64_t padding, bool align_corners) {
  return {input.size(0), input.size(1), input.size(2), input.size(3), grid.size(1), grid.size(2),
          static_cast<int>(mode), static_cast<int>(padding), align_corners};
}

// Blocks per task: enough taps x channels that a task amortises its scheduling.
int64_t grain_size(int64_t C) { return std::max<int64_t>(1, 16384 / (kBlock * std::max<int64_t>(1, C))); }

// The taps of output points [p0, p1) of image n (offsets for strides `s`), and where each point
// sits in a [N, C, Ho, Wo] tensor with strides `o`.
template <typename acc_t, typename scalar_t>
void block_taps(const scalar_t* grid, const Dims& d, const Strides& s, const Strides& o, int64_t n, int64_t p0,
                int64_t p1, Taps<acc_t>* taps, int64_t* point) {
  for (int64_t p = p0; p < p1; ++p) {
    const scalar_t* g = grid + (n * d.points() + p) * 2;
    taps[p - p0] = grid_sample::make_taps<acc_t>(static_cast<acc_t>(g[0]), static_cast<acc_t>(g[1]), d.H, d.W, s.h,
                                                 s.w, d.mode, d.padding, d.align_corners);
    point[p - p0] = (p / d.Wo) * o.h + (p % d.Wo) * o.w;
  }
}

// Eight independent partial sums so the compiler vectorises the dot product without -ffast-math.
template <typename acc_t, typename scalar_t>
acc_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  acc_t part[8] = {};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int j = 0; j < 8; ++j) part[j] += static_cast<acc_t>(a[k + j]) * static_cast<acc_t>(b[k + j]);
  for (; k < n; ++k) part[0] += static_cast<acc_t>(a[k]) * static_cast<acc_t>(b[k]);
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
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
  at::parallel_for(0, d.N * blocks, grain_size(d.C), [&](int64_t begin, int64_t end) {
    Taps<acc_t> taps[kBlock];
    int64_t point[kBlock];
    std::vector<acc_t> acc(channels_inner ? d.C : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, p0 = (task % blocks) * kBlock, np = std::min(d.points() - p0, kBlock);
      block_taps(gr, d, si, so, n, p0, p0 + np, taps, point);
      const scalar_t* in_n = in + n * si.n;
      scalar_t* o_n = o + n * so.n;
      if (channels_inner) {
        for (int64_t p = 0; p < np; ++p) {
          const Taps<acc_t>& t = taps[p];
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int k = 0; k < t.count; ++k) {
            if (!t.valid[k]) continue;
            const scalar_t* __restrict__ src = in_n + t.offset[k];
            acc_t* __restrict__ a = acc.data();
            const acc_t w = t.w[k];
            for (int64_t c = 0; c < d.C; ++c) a[c] += w * static_cast<acc_t>(src[c]);
          }
          scalar_t* __restrict__ dst = o_n + point[p];
          for (int64_t c = 0; c < d.C; ++c) dst[c] = static_cast<scalar_t>(acc[c]);
        }
      } else {
        for (int64_t c = 0; c < d.C; ++c) {
          const scalar_t* in_c = in_n + c * si.c;
          scalar_t* o_c = o_n + c * so.c;
          for (int64_t p = 0; p < np; ++p) {
            const Taps<acc_t>& t = taps[p];
            acc_t v = 0;
            for (int k = 0; k < t.count; ++k)
              if (t.valid[k]) v += t.w[k] * static_cast<acc_t>(in_c[t.offset[k]]);
            o_c[point[p]] = static_cast<scalar_t>(v);
          }
        }
      }
    }
  });
}

// grad_grid[n, p] = (sum_k dw_k/dx <g, in_k>, sum_k dw_k/dy <g, in_k>) * (dx/dgx, dy/dgy): one
// writer per point, channels reduced in a loop.
template <typename scalar_t>
void grid_grad_points(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& grid,
                      at::Tensor& grad_grid, const Dims& d) {
  using acc_t = at::opmath_type<scalar_t>;
  const Strides si = strides_of(input), sg = strides_of(grad_out);
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* gr = grid.const_data_ptr<scalar_t>();
  scalar_t* gg = grad_grid.mutable_data_ptr<scalar_t>();
  const bool channels_inner = si.c == 1 && sg.c == 1;
  const int64_t blocks = d.blocks();
  at::parallel_for(0, d.N * blocks, grain_size(d.C), [&](int64_t begin, int64_t end) {
    Taps<acc_t> taps[kBlock];
    int64_t point[kBlock];
    acc_t dots[kBlock][4];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, p0 = (task % blocks) * kBlock, np = std::min(d.points() - p0, kBlock);
      block_taps(gr, d, si, sg, n, p0, p0 + np, taps, point);
      const scalar_t* in_n = in + n * si.n;
      const scalar_t* go_n = go + n * sg.n;
      for (int64_t p = 0; p < np; ++p)
        for (int k = 0; k < 4; ++k) dots[p][k] = acc_t(0);
      if (channels_inner) {
        for (int64_t p = 0; p < np; ++p)
          for (int k = 0; k < 4; ++k)
            if (taps[p].valid[k]) dots[p][k] = dot<acc_t>(go_n + point[p], in_n + taps[p].offset[k], d.C);
      } else {
        for (int64_t c = 0; c < d.C; ++c) {
          const scalar_t* in_c = in_n + c * si.c;
          const scalar_t* go_c = go_n + c * sg.c;
          for (int64_t p = 0; p < np; ++p) {
            const acc_t g = static_cast<acc_t>(go_c[point[p]]);
            for (int k = 0; k < 4; ++k)
              if (taps[p].valid[k]) dots[p][k] += g * static_cast<acc_t>(in_c[taps[p].offset[k]]);
          }
        }
      }
      for (int64_t p = 0; p < np; ++p) {
        const Taps<acc_t>& t = taps[p];
        acc_t gx = 0, gy = 0;
        for (int k = 0; k < 4; ++k) {
          gx += t.dw_dx[k] * dots[p][k];
          gy += t.dw_dy[k] * dots[p][k];
        }
        scalar_t* out = gg + (n * d.points() + p0 + p) * 2;
        out[0] = static_cast<scalar_t>(gx * t.dx_dgx);
        out[1] = static_cast<scalar_t>(gy * t.dy_dgy);
      }
    }
  });
}

// grad_input (buf, zeroed, input's strides, in acc_t) += sum over points of w_k * g at tap k.
// A task owns channels [c0, c1) of one image and walks the points in order: deterministic.
template <typename scalar_t, typename acc_t>
void input_grad_points(const at::Tensor& grad_out, const at::Tensor& grid, at::Tensor& buf, const Dims& d) {
  const Strides sb = strides_of(buf), sg = strides_of(grad_out);
  const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* gr = grid.const_data_ptr<scalar_t>();
  acc_t* b = buf.mutable_data_ptr<acc_t>();
  const bool channels_inner = sb.c == 1 && sg.c == 1;
  // Enough channel ranges to keep every thread busy, but (channels_last) at least 16 channels each
  // so the inner loop stays vectorised.
  const int64_t want = (2 * at::get_num_threads() + d.N - 1) / d.N;
  const int64_t ranges = std::clamp<int64_t>(want, 1, channels_inner ? (d.C + 15) / 16 : d.C);
  const int64_t width = (d.C + ranges - 1) / ranges;
  at::parallel_for(0, d.N * ranges, 1, [&](int64_t begin, int64_t end) {
    Taps<acc_t> taps[kBlock];
    int64_t point[kBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / ranges, c0 = (task % ranges) * width, c1 = std::min(d.C, c0 + width);
      acc_t* b_n = b + n * sb.n;
      const scalar_t* go_n = go + n * sg.n;
      for (int64_t p0 = 0; p0 < d.points() && c0 < c1; p0 += kBlock) {
        const int64_t np = std::min(d.points() - p0, kBlock);
        block_taps(gr, d, sb, sg, n, p0, p0 + np, taps, point);
        if (channels_inner) {
          for (int64_t p = 0; p < np; ++p) {
            const Taps<acc_t>& t = taps[p];
            const scalar_t* __restrict__ g = go_n + point[p];
            for (int k = 0; k < t.count; ++k) {
              if (!t.valid[k]) continue;
              acc_t* __restrict__ dst = b_n + t.offset[k];
              const acc_t w = t.w[k];
              for (int64_t c = c0; c < c1; ++c) dst[c] += w * static_cast<acc_t>(g[c]);
            }
          }
        } else {
          for (int64_t c = c0; c < c1; ++c) {
            acc_t* b_c = b_n + c * sb.c;
            const scalar_t* go_c = go_n + c * sg.c;
            for (int64_t p = 0; p < np; ++p) {
              const Taps<acc_t>& t = taps[p];
              const acc_t g = static_cast<acc_t>(go_c[point[p]]);
              for (int k = 0; k < t.count; ++k)
                if (t.valid[k]) b_c[t.offset[k]] += t.w[k] * g;
            }
          }
        }
      }
    }
  });
}

}  // namespace

at::Tensor grid_sample_forward_cpu(const at::Tensor& input, const at::Tensor& grid, int64_t mode, int64_t padding,
                                   bool align_corners) {
  check_grid_sample_inputs(input, grid, mode, padding);
  const Dims d = dims_of(input, grid, mode, padding, align_corners);
  at::Tensor out = at::empty({d.N, d.C, d.Ho, d.Wo}, input.options().memory_format(grid_sample_memory_format(input)));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "grid_sample_forward_cpu", [&] {
    forward_points<scalar_t>(input, grid, out, d);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> grid_sample_backward_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                                                            const at::Tensor& grid, int64_t mode, int64_t padding,
                                                            bool align_corners, bool input_grad, bool grid_grad,
                                                            bool /*deterministic: always*/) {
  check_grid_sample_inputs(input, grid, mode, padding);
  check_grid_sample_grad(grad_out, input, grid);
  const Dims d = dims_of(input, grid, mode, padding, align_corners);
  at::Tensor grad_input = at::empty({0}, input.options());
  at::Tensor grad_grid = grid_grad ? at::zeros_like(grid) : at::empty({0}, grid.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "grid_sample_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (input_grad) {
      // fp16/bf16 sums go through an fp32 buffer, converted once at the end. The buffer keeps
      // input's layout (NCHW or channels_last), and so does the gradient.
      at::Tensor buf = at::zeros_like(input, input.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      if (grad_out.numel() > 0) input_grad_points<scalar_t, acc_t>(grad_out, grid, buf, d);
      grad_input = std::is_same_v<scalar_t, acc_t> ? buf : buf.to(input.scalar_type());
    }
    if (grid_grad && mode == grid_sample::kBilinear && grad_out.numel() > 0)
      grid_grad_points<scalar_t>(grad_out, input, grid, grad_grid, d);
  });
  return {grad_input, grad_grid};
}

TORCH_LIBRARY_IMPL(fnevr, CPU, m) {
  m.impl("_grid_sample_forward", &grid_sample_forward_cpu);
  m.impl("_grid_sample_backward", &grid_sample_backward_cpu);
}

}  // namespace fnevr
