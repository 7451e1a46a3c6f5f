// Grid sampling on the CPU. Output points go in blocks of kBlock whose taps (grid_sample_math.h's
// source_index and corner, laid out as arrays) are computed once; then, for channels_last
// tensors, each point loops over its contiguous channels (vectorisable), and for NCHW each
// channel plane loops over the block's points.
// The input gradient is a scatter made deterministic without atomics: a task owns whole channel
// ranges of one image's grad_input and adds the output points' contributions in order, so every
// element sums its terms in the same order whatever the thread count.
#include "common/cpu.h"
#include "common/strides.h"
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
#include <memory>
#include <type_traits>
#include <vector>

namespace fnevr {
namespace {

constexpr int64_t kBlock = 64;  // output points whose taps are computed together

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

// Points x channels per task: enough that a task amortises its scheduling.
constexpr int64_t kTaskWork = 16384;

// The taps of a block of output points, computed once and then read for every channel, in
// structure-of-arrays form so the per-point loops vectorise. "Full" points (nearly all of a warp)
// have every tap inside the image and take branch-free paths.
template <typename acc_t>
struct Block {
  int64_t count;          // points in the block
  int taps;               // 4 (bilinear) or 1 (nearest)
  int64_t point[kBlock];  // each point's offset in a [N, C, Ho, Wo] tensor with strides `o`
  acc_t x[kBlock], y[kBlock], dx[kBlock], dy[kBlock];  // pixel coordinates, d coordinate / d grid
  acc_t fx[kBlock], fy[kBlock];                        // bilinear: fractions past the first tap
  int64_t off[4][kBlock];
  acc_t w[4][kBlock];
  bool valid[4][kBlock];
  bool full[kBlock];

  // Output points [p0, p0 + count) of image n; tap offsets for strides `s`.
  template <typename scalar_t>
  void fill(const scalar_t* grid, const Dims& d, const Strides& s, const Strides& o, int64_t n, int64_t p0) {
    count = std::min(d.points() - p0, kBlock);
    taps = d.mode == grid_sample::kNearest ? 1 : 4;
    int64_t row = p0 / d.Wo, col = p0 % d.Wo;  // of point p0 + i, stepped along (no division per point)
    for (int64_t i = 0; i < count; ++i, ++col) {
      if (col == d.Wo) col = 0, ++row;
      point[i] = row * o.h + col * o.w;
    }
    const scalar_t* g = grid + (n * d.points() + p0) * 2;
    for (int64_t i = 0; i < count; ++i) {
      const auto cx = grid_sample::source_index(static_cast<acc_t>(g[2 * i]), d.W, d.padding, d.align_corners);
      const auto cy = grid_sample::source_index(static_cast<acc_t>(g[2 * i + 1]), d.H, d.padding, d.align_corners);
      x[i] = cx.x, dx[i] = cx.dx, y[i] = cy.x, dy[i] = cy.dx;
    }
    if (taps == 1) {
      for (int64_t i = 0; i < count; ++i) {
        const int64_t px = static_cast<int64_t>(grid_sample::rint_(x[i]));
        const int64_t py = static_cast<int64_t>(grid_sample::rint_(y[i]));
        full[i] = valid[0][i] = px >= 0 && px < d.W && py >= 0 && py < d.H;
        off[0][i] = py * s.h + px * s.w;
        w[0][i] = acc_t(1);
      }
      return;
    }
    for (int64_t i = 0; i < count; ++i) {
      const auto cx = grid_sample::corner(x[i]), cy = grid_sample::corner(y[i]);
      fx[i] = cx.frac, fy[i] = cy.frac;
      bool all = true;
      for (int k = 0; k < 4; ++k) {  // as make_taps: column x0 + (k & 1), row y0 + (k >> 1)
        const int64_t px = cx.index + (k & 1), py = cy.index + (k >> 1);
        valid[k][i] = px >= 0 && px < d.W && py >= 0 && py < d.H;
        all = all && valid[k][i];
        off[k][i] = py * s.h + px * s.w;
        w[k][i] = ((k & 1) ? cx.frac : acc_t(1) - cx.frac) * ((k >> 1) ? cy.frac : acc_t(1) - cy.frac);
      }
      full[i] = all;
    }
  }

  // sum_k w_k plane[offset_k] for point i of one channel plane.
  template <typename scalar_t>
  acc_t sample(const scalar_t* plane, int64_t i) const {
    if (full[i]) {
      if (taps == 1) return static_cast<acc_t>(plane[off[0][i]]);
      return w[0][i] * static_cast<acc_t>(plane[off[0][i]]) + w[1][i] * static_cast<acc_t>(plane[off[1][i]]) +
             w[2][i] * static_cast<acc_t>(plane[off[2][i]]) + w[3][i] * static_cast<acc_t>(plane[off[3][i]]);
    }
    acc_t v = 0;
    for (int k = 0; k < taps; ++k)
      if (valid[k][i]) v += w[k][i] * static_cast<acc_t>(plane[off[k][i]]);
    return v;
  }
};

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
      const scalar_t* in_n = in + n * si.n;
      scalar_t* o_n = o + n * so.n;
      if (channels_inner) {
        for (int64_t i = 0; i < b.count; ++i) {
          scalar_t* __restrict__ dst = o_n + b.point[i];
          if (b.full[i] && b.taps == 4) {  // the common case: one vectorised pass
            const scalar_t *s0 = in_n + b.off[0][i], *s1 = in_n + b.off[1][i];
            const scalar_t *s2 = in_n + b.off[2][i], *s3 = in_n + b.off[3][i];
            const acc_t w0 = b.w[0][i], w1 = b.w[1][i], w2 = b.w[2][i], w3 = b.w[3][i];
            for (int64_t c = 0; c < d.C; ++c)
              dst[c] = static_cast<scalar_t>(w0 * static_cast<acc_t>(s0[c]) + w1 * static_cast<acc_t>(s1[c]) +
                                             w2 * static_cast<acc_t>(s2[c]) + w3 * static_cast<acc_t>(s3[c]));
            continue;
          }
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int k = 0; k < b.taps; ++k) {
            if (!b.valid[k][i]) continue;
            const scalar_t* __restrict__ src = in_n + b.off[k][i];
            acc_t* __restrict__ a = acc.data();
            const acc_t w = b.w[k][i];
            for (int64_t c = 0; c < d.C; ++c) a[c] += w * static_cast<acc_t>(src[c]);
          }
          for (int64_t c = 0; c < d.C; ++c) dst[c] = static_cast<scalar_t>(acc[c]);
        }
      } else {
        for (int64_t c = 0; c < d.C; ++c) {
          const scalar_t* in_c = in_n + c * si.c;
          scalar_t* o_c = o_n + c * so.c;
          for (int64_t i = 0; i < b.count; ++i) o_c[b.point[i]] = static_cast<scalar_t>(b.sample(in_c, i));
        }
      }
    }
  });
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

// Adds <g, in_k> over channels [c0, c1) to dots, for one block (NCHW: channel planes outside).
template <typename acc_t, typename scalar_t>
void add_dots(const Block<acc_t>& b, const scalar_t* in_n, const scalar_t* go_n, const Strides& si, const Strides& sg,
              int64_t c0, int64_t c1, bool channels_inner, acc_t (*dots)[4]) {
  if (channels_inner) {
    for (int64_t i = 0; i < b.count; ++i)
      for (int k = 0; k < 4; ++k)
        if (b.valid[k][i]) dots[i][k] += dot<acc_t>(go_n + b.point[i] + c0, in_n + b.off[k][i] + c0, c1 - c0);
    return;
  }
  for (int64_t c = c0; c < c1; ++c) {
    const scalar_t* in_c = in_n + c * si.c;
    const scalar_t* go_c = go_n + c * sg.c;
    for (int64_t i = 0; i < b.count; ++i) {
      const acc_t g = static_cast<acc_t>(go_c[b.point[i]]);
      if (b.full[i]) {
        for (int k = 0; k < 4; ++k) dots[i][k] += g * static_cast<acc_t>(in_c[b.off[k][i]]);
      } else {
        for (int k = 0; k < 4; ++k)
          if (b.valid[k][i]) dots[i][k] += g * static_cast<acc_t>(in_c[b.off[k][i]]);
      }
    }
  }
}

// The grid gradient alone (bilinear): one writer per point, channels reduced in a loop.
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
  at::parallel_for(0, d.N * blocks, grain_size(kBlock * d.C, kTaskWork), [&](int64_t begin, int64_t end) {
    auto block = std::make_unique<Block<acc_t>>();
    acc_t dots[kBlock][4];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, p0 = (task % blocks) * kBlock;
      block->fill(gr, d, si, sg, n, p0);
      std::fill(&dots[0][0], &dots[0][0] + kBlock * 4, acc_t(0));
      add_dots(*block, in + n * si.n, go + n * sg.n, si, sg, 0, d.C, channels_inner, dots);
      write_grid_grad(*block, dots, gg + (n * d.points() + p0) * 2);
    }
  });
}

// grad_input (buf: zeroed, input's strides, in acc_t) += sum over points of w_k g at tap k. A task
// owns channels [c0, c1) of one image and walks the points in order: deterministic. Where a task
// owns all channels and grad_grid is wanted (not null), it computes that too, from the same taps.
template <typename scalar_t, typename acc_t>
void input_grad_points(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& grid, at::Tensor& buf,
                       scalar_t* grad_grid, int64_t ranges, const Dims& d) {
  const Strides sb = strides_of(buf), sg = strides_of(grad_out), si = strides_of(input);
  const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  const scalar_t* gr = grid.const_data_ptr<scalar_t>();
  acc_t* bp = buf.mutable_data_ptr<acc_t>();
  const bool channels_inner = sb.c == 1 && sg.c == 1;
  const int64_t width = (d.C + ranges - 1) / ranges;
  const int64_t grain = grain_size(d.points() * width, kTaskWork);
  at::parallel_for(0, d.N * ranges, grain, [&](int64_t begin, int64_t end) {
    auto block = std::make_unique<Block<acc_t>>();
    acc_t dots[kBlock][4];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / ranges, c0 = (task % ranges) * width, c1 = std::min(d.C, c0 + width);
      acc_t* b_n = bp + n * sb.n;
      const scalar_t* go_n = go + n * sg.n;
      for (int64_t p0 = 0; p0 < d.points() && c0 < c1; p0 += kBlock) {
        block->fill(gr, d, sb, sg, n, p0);
        const Block<acc_t>& b = *block;
        if (channels_inner) {
          for (int64_t i = 0; i < b.count; ++i) {
            const scalar_t* __restrict__ g = go_n + b.point[i];
            for (int k = 0; k < b.taps; ++k) {
              if (!b.valid[k][i]) continue;
              acc_t* __restrict__ dst = b_n + b.off[k][i];
              const acc_t w = b.w[k][i];
              for (int64_t c = c0; c < c1; ++c) dst[c] += w * static_cast<acc_t>(g[c]);
            }
          }
        } else {
          for (int64_t c = c0; c < c1; ++c) {
            acc_t* b_c = b_n + c * sb.c;
            const scalar_t* go_c = go_n + c * sg.c;
            for (int64_t i = 0; i < b.count; ++i) {
              const acc_t g = static_cast<acc_t>(go_c[b.point[i]]);
              if (b.full[i] && b.taps == 4) {
                for (int k = 0; k < 4; ++k) b_c[b.off[k][i]] += b.w[k][i] * g;
              } else {
                for (int k = 0; k < b.taps; ++k)
                  if (b.valid[k][i]) b_c[b.off[k][i]] += b.w[k][i] * g;
              }
            }
          }
        }
        if (grad_grid != nullptr) {
          std::fill(&dots[0][0], &dots[0][0] + kBlock * 4, acc_t(0));
          add_dots(b, in + n * si.n, go_n, si, sg, 0, d.C, channels_inner, dots);
          write_grid_grad(b, dots, grad_grid + (n * d.points() + p0) * 2);
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
  at::Tensor grad_input = at::empty({0}, input.options());
  at::Tensor grad_grid = grid_grad ? at::zeros_like(grid) : at::empty({0}, grid.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "grid_sample_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool live_grid = grid_grad && mode == grid_sample::kBilinear && grad_out.numel() > 0;
    bool grid_done = false;
    if (input_grad) {
      // fp16/bf16 sums go through an fp32 buffer, converted once at the end. The buffer keeps
      // input's layout (NCHW or channels_last), and so does the gradient.
      at::Tensor buf = at::zeros_like(input, input.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      if (grad_out.numel() > 0) {
        // Enough channel ranges per image to keep every thread busy, but each with at least
        // kTaskWork points x channels (as the forward's tasks; on a tiny input, starting threads
        // costs more than the work) and (channels_last) at least 16 channels, so the inner loop
        // stays vectorised. With one range per image, the grid gradient comes from the same pass.
        const int64_t want = std::min((at::get_num_threads() + d.N - 1) / d.N, d.C * d.points() / kTaskWork);
        const int64_t ranges = std::clamp<int64_t>(want, 1, buf.stride(1) == 1 ? (d.C + 15) / 16 : d.C);
        grid_done = live_grid && ranges == 1 && buf.strides() == input.strides();  // taps index both
        input_grad_points<scalar_t, acc_t>(grad_out, input, grid, buf,
                                           grid_done ? grad_grid.mutable_data_ptr<scalar_t>() : nullptr, ranges, d);
      }
      grad_input = std::is_same_v<scalar_t, acc_t> ? buf : buf.to(input.scalar_type());
    }
    if (live_grid && !grid_done) grid_grad_points<scalar_t>(grad_out, input, grid, grad_grid, d);
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
}

TORCH_LIBRARY_IMPL(fnevr, CPU, m) {
  m.impl("_grid_sample_forward", &grid_sample_forward_cpu);
  m.impl("_grid_sample_backward", &grid_sample_backward_cpu);
}

}  // namespace fnevr
