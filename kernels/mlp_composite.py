"""Triton kernels for the fused per-sample MLP + compositing; the math is in `fnevr.ops.mlp_composite`.

Rows are (ray, sample) pairs. A program owns BLOCK_R rays and, per chunk, DC samples of each (DC is
D rounded up to a power of two, capped at the tile's rows; D > DC takes several chunks): a
[ROWS = BLOCK_R * DC, K] tile of codes. Each layer is a product of the activation tile with the
layer's weight (read transposed, zero-padded to powers of two >= 16), then bias and ReLU, all on
chip; padded channels stay exactly 0. Products over more than 64 channels are several `tl.dot`s,
each over a 64-wide piece of the reduction (a smaller weight operand to load and hold: fewer
registers and less shared memory; see _K_PIECE). The density is a row-wise dot with the density
weight. Compositing reshapes the densities to [BLOCK_R, DC]: the transmittance in front of each
sample is an exclusive running product of exp(-p) (an associative scan of (product but the last,
product) pairs; as composite_math.h, never exp of a running sum, so huge densities give an exact 0
and no NaN), then `kernels.composite._step` gives each weight and its derivative. Features are
sum_i w_i h_i over [BLOCK_R, DC, H]; across chunks the transmittance is carried per ray.

Backward recomputes the tile's forward on chip, then e_i = <gF, h_i> + gS, the GradScan of
composite_math.h (pushed_i = e_i dw_i + prefix_i, dsigma_i = (pushed_i - total) act'(sigma_i), the
sums over the finite e_k w_k and the last NaN, +inf and -inf ones added by where they are, so a
non-finite value poisons the samples the reference's reversed cumsum does; with several chunks a
first pass over the ray finds the total and those places), and backprops layer by layer with
`tl.dot` (a0, a1, a3 recomputed where needed again rather than kept live): input gradients are
stored per sample; weight gradients are dz^T a dots, in blocks of at most 64 x 64, accumulated, in
the dot itself, onto this program's own fp32 (fp64) partial buffer (load, dot-accumulate, store; a program's first tile
stores without loading: no zero fill, no atomics). The grid is persistent, one program per SM
(fixed per device), each looping over tiles in a fixed order; the P partials are summed in torch,
so the gradients are deterministic.

Dtypes: fp16/bf16 dots take operands in that dtype (activations and gradients rounded as PyTorch's
own fp16/bf16 Linear rounds its outputs) and accumulate in fp32; fp32 dots run as tf32x3 (three
TF32 tensor-core products: about fp32's accuracy; see _FP32_DOT), plain TF32 if
torch.backends.cuda.matmul.allow_tf32 is set (as PyTorch's Linear); fp64 is fp64 throughout.
Biases, densities, compositing and everything between dots are fp32 (fp64). Under the interpreter
bf16 runs in fp32 with bf16 rounding (round to nearest even) emulated on the dot operands (numpy
has no bf16); precisions of fp32 dots do not apply there (numpy's fp32 products).
"""

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ._common import accumulator, cdiv, interpreting, launch_ctx, multiprocessors, next_power_of_2
from .composite import _INF, _activate, _activate_backward, _step

# Wide layers go in pieces (see _xwt, _dzw, _wgrad): each tl.dot reduces over at most _K_PIECE
# channels, each weight-gradient block is at most _G_BLOCK x _G_BLOCK. A whole [128, 128] fp32
# weight operand is loaded through registers (128 a thread at 4 warps; x3 for tf32x3's split) and
# held in shared memory twice (tf32x3's two parts), and a [128, 128] gradient accumulator is 128
# registers a thread. Compile-only report, sm_90, H=128 (spills a thread, shared memory, CPU seconds
# to compile), whole -> pieces of 64 (of 32):
#   backward fp32, 64 rows, 4 warps:  5.5 KB, 216 KB, 45 s -> 3.6 KB, 120 KB, 45 s (3.5 KB, 120 KB, 64 s)
#   backward fp16, 128 rows, 8 warps: 1.8 KB, 112 KB, 6 s -> 0.9 KB, 88 KB, 9 s (0.8 KB, 88 KB, 12 s)
#   forward fp32, 128 rows, 8 warps:  0.7 KB, 128 KB -> 0.3 KB, 64 KB (0.7 KB, 32 KB)
#   fp64 (forward 64 rows, backward 32, 4 warps) in pieces of 32: forward 4.6 KB, 193 KB -> 2.0 KB,
#   64 KB (of 64: 27 KB of spills), backward 22 KB, 177 KB -> 3.4 KB, 84 KB
_K_PIECE = tl.constexpr(64)
_K_PIECE_FP64 = tl.constexpr(32)
_G_BLOCK = tl.constexpr(64)


# --- helpers ------------------------------------------------------------------------------------


@triton.jit
def _op(x, OP: tl.constexpr, EMU_BF16: tl.constexpr):
    """x as a dot operand: rounded to OP; EMU_BF16 (interpreter): to bf16, round-to-nearest-even,
    kept in fp32."""
    if EMU_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        y = bits.to(tl.float32, bitcast=True)
    else:
        y = x.to(OP)
    return y


@triton.jit
def _wt(w, N, K, ld, col0, KP: tl.constexpr, NP: tl.constexpr, OP: tl.constexpr, z):
    """W^T as a [KP, NP] dot operand: W[n, col0 + k] for n < N, k < K (row stride ld), else 0.
    z: 0, but opaque to the compiler and different in each loop iteration (see _opaque_zero)."""
    k = tl.arange(0, KP)[:, None] + z
    n = tl.arange(0, NP)[None, :]
    return tl.load(w + n * ld + col0 + k, mask=(k < K) & (n < N), other=0.0).to(OP)


@triton.jit
def _w(w, N, K, ld, col0, NP: tl.constexpr, KP: tl.constexpr, OP: tl.constexpr, z):
    """W as a [NP, KP] dot operand (for the backward dz @ W)."""
    n = tl.arange(0, NP)[:, None] + z
    k = tl.arange(0, KP)[None, :]
    return tl.load(w + n * ld + col0 + k, mask=(n < N) & (k < K), other=0.0).to(OP)


@triton.jit
def _halves(x, ROWS: tl.constexpr, N: tl.constexpr):
    """(x[:, :N // 2], x[:, N // 2:]) of x [ROWS, N]: the same registers, regrouped."""
    return tl.split(tl.permute(tl.reshape(x, [ROWS, 2, N // 2]), [0, 2, 1]))


@triton.jit
def _fresh(x, PREC: tl.constexpr, z):
    """x, as a value the compiler cannot identify with x (z: an opaque 0). A tf32x3 dot splits its
    operands into two TF32 parts each; a tensor that two distant dots read would otherwise share
    one split, and keep its two parts live (in registers) in between."""
    if PREC == "tf32x3":
        x = x + z.to(x.dtype)  # exact (-0 becomes +0, which no product can tell)
    return x


@triton.jit
def _xwt(
    x,
    w,
    N,
    K,
    ld,
    col0,
    acc,
    ROWS: tl.constexpr,
    KP: tl.constexpr,
    NP: tl.constexpr,
    OP: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    z,
):
    """acc + x @ W^T [ROWS, NP] (acc None: 0) for x [ROWS, KP] and W^T as _wt reads it, in pieces of
    at most _K_PIECE (fp64: _K_PIECE_FP64) of K (each piece a dot of its own, with its own smaller
    weight operand)."""
    if KP > _K_PIECE or (OP == tl.float64 and KP > _K_PIECE_FP64):
        x0, x1 = _halves(x, ROWS, KP)
        acc = _xwt(x0, w, N, K, ld, col0, acc, ROWS, KP // 2, NP, OP, ACC, PREC, z)
        acc = _xwt(x1, w, N, K - KP // 2, ld, col0 + KP // 2, acc, ROWS, KP // 2, NP, OP, ACC, PREC, z)
    else:
        acc = tl.dot(x, _wt(w, N, K, ld, col0, KP, NP, OP, z), acc, input_precision=PREC, out_dtype=ACC)
    return acc


@triton.jit
def _dzw(
    dz,
    w,
    N,
    K,
    ld,
    col0,
    acc,
    ROWS: tl.constexpr,
    NP: tl.constexpr,
    KP: tl.constexpr,
    OP: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    z,
):
    """acc + dz @ W [ROWS, KP] (acc None: 0) for dz [ROWS, NP] and W as _w reads it, in pieces of at
    most _K_PIECE (fp64: _K_PIECE_FP64) of NP."""
    if NP > _K_PIECE or (OP == tl.float64 and NP > _K_PIECE_FP64):
        d0, d1 = _halves(dz, ROWS, NP)
        acc = _dzw(d0, w, N, K, ld, col0, acc, ROWS, NP // 2, KP, OP, ACC, PREC, z)
        acc = _dzw(d1, w + (NP // 2) * ld, N - NP // 2, K, ld, col0, acc, ROWS, NP // 2, KP, OP, ACC, PREC, z)
    else:
        acc = tl.dot(dz, _w(w, N, K, ld, col0, NP, KP, OP, z), acc, input_precision=PREC, out_dtype=ACC)
    return acc


@triton.jit
def _vec(b, N, NP: tl.constexpr, ACC: tl.constexpr, z):
    n = tl.arange(0, NP) + z
    return tl.load(b + n, mask=n < N, other=0.0).to(ACC)


@triton.jit
def _codes(x, rows, valid, E, EP: tl.constexpr, OP: tl.constexpr):
    """The [ROWS, EP] tile of codes x[row, :E] (rows: (ray, sample) indices, int64), 0 elsewhere."""
    k = tl.arange(0, EP)
    return tl.load(x + rows[:, None] * E + k[None, :], mask=valid[:, None] & (k < E)[None, :], other=0.0).to(OP)


@triton.jit
def _opaque_zero(i, R):
    """0 (R >= 0), as a value the compiler cannot fold and that changes with the loop index i.
    Weight addresses and masks built from it are computed in each iteration: left loop-invariant,
    Triton hoists them out of the loop and keeps every [K, N] pointer and mask tensor of every layer
    live across it (hundreds of registers per thread: spills, and weights held in shared memory)."""
    return i * (R >> 31) * 1024  # a multiple of 1024: addresses keep their alignment (vector loads)


@triton.jit
def _relu(z, keep):
    """relu(z) where keep (the tile's real rows and channels), else 0. NaN stays NaN, as torch.relu.
    The padding is made 0 here, not only by its zero codes and weights: with an inf in a real row
    or weight, a padded channel's product holds inf * 0 = NaN, which the next layer's zero weights
    would carry into the real channels (NaN * 0), and a padded sample's into the weight gradients."""
    return tl.where(keep, tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL), 0.0)


@triton.jit
def _keep(valid, N, NP: tl.constexpr, PAD_COLS: tl.constexpr):
    """Mask of the real rows (valid) and, where a width is padded (PAD_COLS), channels (< N) of an
    activation tile [ROWS, NP]. (The channel mask costs registers: FNeVR's widths need none.)"""
    if PAD_COLS:
        keep = valid[:, None] & (tl.arange(0, NP) < N)[None, :]
    else:
        keep = valid[:, None]
    return keep


@triton.jit
def _excl_prod(a1, b1, a2, b2):
    # Pairs (product of a segment but its last element, product of the whole segment): the scan's
    # first component is the exclusive running product, with no division.
    return b1 * a2, b1 * b2


@triton.jit
def _rows(ray0, c, R, D, ROWS: tl.constexpr, DC: tl.constexpr):
    """Row indices (int64) and validity of chunk c of rays ray0.. in a tile: row m is ray m // DC,
    sample c * DC + m % DC."""
    m = tl.arange(0, ROWS)
    ray = (ray0 + m // DC).to(tl.int64)
    sample = c * DC + m % DC
    valid = (ray < R) & (sample < D)
    return ray * D + sample, valid


@triton.jit
def _mlp(
    cc,
    sc,
    wsi,
    bsi,
    wsh,
    bsh,
    wd,
    bd,
    wsf,
    bsf,
    wci,
    bci,
    wf,
    bf,
    wfh,
    bfh,
    rows,
    valid,
    Ec,
    Es,
    H,
    H4,
    ACC: tl.constexpr,
    OP: tl.constexpr,
    EMU: tl.constexpr,
    PREC: tl.constexpr,
    KS: tl.constexpr,
    KC: tl.constexpr,
    HP: tl.constexpr,
    H4P: tl.constexpr,
    ROWS: tl.constexpr,
    PAD_COLS: tl.constexpr,
    z,
):
    """One tile's MLP: the codes s, c, the activations a0..a4 (as dot operands), h (ACC) and the
    densities sigma [ROWS] (ACC). z: an opaque 0 (see _opaque_zero)."""
    keep_h, keep_h4 = _keep(valid, H, HP, PAD_COLS), _keep(valid, H4, H4P, PAD_COLS)
    s = _codes(sc, rows, valid, Es, KS, OP)
    y = _xwt(s, wsi, H, Es, Es, 0, None, ROWS, KS, HP, OP, ACC, PREC, z)
    a0 = _op(_relu(y + _vec(bsi, H, HP, ACC, z)[None, :], keep_h), OP, EMU)
    y = _xwt(a0, wsh, H, H, H, 0, None, ROWS, HP, HP, OP, ACC, PREC, z)
    a1 = _op(_relu(y + _vec(bsh, H, HP, ACC, z)[None, :], keep_h), OP, EMU)
    sigma = tl.sum(a1.to(ACC) * _vec(wd, H, HP, ACC, z)[None, :], axis=1) + tl.load(bd).to(ACC)
    y = _xwt(a1, wsf, H4, H, H, 0, None, ROWS, HP, H4P, OP, ACC, PREC, z)
    a2 = _op(_relu(y + _vec(bsf, H4, H4P, ACC, z)[None, :], keep_h4), OP, EMU)
    c = _codes(cc, rows, valid, Ec, KC, OP)
    y = _xwt(c, wci, H, Ec, Ec, 0, None, ROWS, KC, HP, OP, ACC, PREC, z)
    a3 = _op(_relu(y + _vec(bci, H, HP, ACC, z)[None, :], keep_h), OP, EMU)
    # fuse takes concat(a2, a3): its weight's first H4 columns meet a2, the other H meet a3.
    y = _xwt(a2, wf, H, H4, H4 + H, 0, None, ROWS, H4P, HP, OP, ACC, PREC, z)
    y = _xwt(a3, wf, H, H, H4 + H, H4, y, ROWS, HP, HP, OP, ACC, PREC, z)
    a4 = _op(_relu(y + _vec(bf, H, HP, ACC, z)[None, :], keep_h), OP, EMU)
    y = _xwt(a4, wfh, H, H, H, 0, None, ROWS, HP, HP, OP, ACC, PREC, z)
    h = _relu(y + _vec(bfh, H, HP, ACC, z)[None, :], keep_h)
    return s, c, a0, a1, a2, a3, a4, h, sigma


@triton.jit
def _weights(
    sigma,
    trans,
    c,
    D,
    INCLUSIVE: tl.constexpr,
    ACT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DC: tl.constexpr,
):
    """Compositing weights of chunk c: (sigma [BLOCK_R, DC], w, dw/dp, sample valid, transmittance
    behind the chunk). trans: transmittance in front of it; padded samples get p = 0, weight 0."""
    sigma = tl.reshape(sigma, [BLOCK_R, DC])
    j = tl.arange(0, DC)[None, :]
    inside = (c * DC + j) < D
    p = tl.where(inside, _activate(sigma, ACT), 0.0)
    if DC == 1:  # one sample per chunk: no scan
        excl, incl = tl.full([BLOCK_R, DC], 1.0, ACC), tl.exp(-p)
    else:
        excl, incl = tl.associative_scan((tl.full([BLOCK_R, DC], 1.0, ACC), tl.exp(-p)), axis=1, combine_fn=_excl_prod)
    w, dw, _ = _step(p, trans[:, None] * excl, INCLUSIVE)
    w = tl.where(inside, w, 0.0)
    trans = trans * tl.sum(tl.where(j == DC - 1, incl, 0.0), axis=1)
    return sigma, w, dw, inside, trans


@triton.jit
def _scan_finish(g, first, last_nan, last_pinf, last_ninf):
    """g (own term + prefix - total, over the finite e_k w_k) minus the non-finite e_k w_k of the
    sum that starts at sample `first`, given where the last NaN, +inf and -inf one is (-1: none):
    composite_math.h's GradScan.finish before act'."""
    g = g - tl.where(last_pinf >= first, _INF, 0.0) + tl.where(last_ninf >= first, _INF, 0.0)
    return tl.where(last_nan >= first, _INF - _INF, g)  # NaN


@triton.jit
def _scan_totals(ew, j, total, last_nan, last_pinf, last_ninf):
    """Over a chunk's terms ew = e_k w_k [BLOCK_R, DC] of samples j: the ray's sum of the finite ones,
    and the last sample whose term is NaN, +inf, -inf (-1: none), as composite_math.h's GradScan."""
    total += tl.sum(tl.where(tl.abs(ew) < _INF, ew, 0.0), axis=1)
    last_nan = tl.maximum(last_nan, tl.max(tl.where(ew != ew, j, -1), axis=1))
    last_pinf = tl.maximum(last_pinf, tl.max(tl.where(ew == _INF, j, -1), axis=1))
    last_ninf = tl.maximum(last_ninf, tl.max(tl.where(ew == -_INF, j, -1), axis=1))
    return total, last_nan, last_pinf, last_ninf


# --- forward --------------------------------------------------------------------------------------


@triton.jit
def _forward_chunk(
    cc,
    sc,
    wsi,
    bsi,
    wsh,
    bsh,
    wd,
    bd,
    wsf,
    bsf,
    wci,
    bci,
    wf,
    bf,
    wfh,
    bfh,
    ray0,
    c,
    trans,
    feat,
    wsum,
    R,
    D,
    Ec,
    Es,
    H,
    H4,
    INCLUSIVE: tl.constexpr,
    ACT: tl.constexpr,
    ACC: tl.constexpr,
    OP: tl.constexpr,
    EMU: tl.constexpr,
    PREC: tl.constexpr,
    KS: tl.constexpr,
    KC: tl.constexpr,
    HP: tl.constexpr,
    H4P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DC: tl.constexpr,
    PAD_COLS: tl.constexpr,
    z,
):
    rows, valid = _rows(ray0, c, R, D, BLOCK_R * DC, DC)
    _, _, _, _, _, _, _, h, sigma = _mlp(
        cc,
        sc,
        wsi,
        bsi,
        wsh,
        bsh,
        wd,
        bd,
        wsf,
        bsf,
        wci,
        bci,
        wf,
        bf,
        wfh,
        bfh,
        rows,
        valid,
        Ec,
        Es,
        H,
        H4,
        ACC,
        OP,
        EMU,
        PREC,
        KS,
        KC,
        HP,
        H4P,
        BLOCK_R * DC,
        PAD_COLS,
        z,
    )
    _, w, _, _, trans = _weights(sigma, trans, c, D, INCLUSIVE, ACT, ACC, BLOCK_R, DC)
    feat += tl.sum(w[:, :, None] * tl.reshape(h, [BLOCK_R, DC, HP]), axis=1)
    wsum += tl.sum(w, axis=1)
    return trans, feat, wsum


@triton.jit
def _forward_kernel(
    cc,
    sc,
    wsi,
    bsi,
    wsh,
    bsh,
    wd,
    bd,
    wsf,
    bsf,
    wci,
    bci,
    wf,
    bf,
    wfh,
    bfh,
    features,
    weight_sum,
    R,
    D,
    Ec,
    Es,
    H,
    H4,
    INCLUSIVE: tl.constexpr,
    ACT: tl.constexpr,
    ACC: tl.constexpr,
    OP: tl.constexpr,
    EMU: tl.constexpr,
    PREC: tl.constexpr,
    KS: tl.constexpr,
    KC: tl.constexpr,
    HP: tl.constexpr,
    H4P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DC: tl.constexpr,
    MULTI: tl.constexpr,
    PAD_COLS: tl.constexpr,
):
    ray0 = tl.program_id(0) * BLOCK_R  # < R: int32 is enough; row offsets are int64
    trans = tl.full([BLOCK_R], 1.0, ACC)
    feat = tl.zeros([BLOCK_R, HP], ACC)
    wsum = tl.zeros([BLOCK_R], ACC)
    if MULTI:  # a ray spans several chunks
        for c in range(tl.cdiv(D, DC)):
            trans, feat, wsum = _forward_chunk(
                cc,
                sc,
                wsi,
                bsi,
                wsh,
                bsh,
                wd,
                bd,
                wsf,
                bsf,
                wci,
                bci,
                wf,
                bf,
                wfh,
                bfh,
                ray0,
                c,
                trans,
                feat,
                wsum,
                R,
                D,
                Ec,
                Es,
                H,
                H4,
                INCLUSIVE,
                ACT,
                ACC,
                OP,
                EMU,
                PREC,
                KS,
                KC,
                HP,
                H4P,
                BLOCK_R,
                DC,
                PAD_COLS,
                _opaque_zero(c, R),
            )
    else:
        trans, feat, wsum = _forward_chunk(
            cc,
            sc,
            wsi,
            bsi,
            wsh,
            bsh,
            wd,
            bd,
            wsf,
            bsf,
            wci,
            bci,
            wf,
            bf,
            wfh,
            bfh,
            ray0,
            0,
            trans,
            feat,
            wsum,
            R,
            D,
            Ec,
            Es,
            H,
            H4,
            INCLUSIVE,
            ACT,
            ACC,
            OP,
            EMU,
            PREC,
            KS,
            KC,
            HP,
            H4P,
            BLOCK_R,
            DC,
            PAD_COLS,
            0,
        )
    rays = (ray0 + tl.arange(0, BLOCK_R)).to(tl.int64)
    n = tl.arange(0, HP)
    tl.store(
        features + rays[:, None] * H + n[None, :],
        feat.to(features.dtype.element_ty),
        mask=(rays < R)[:, None] & (n < H)[None, :],
    )
    tl.store(weight_sum + rays, wsum.to(weight_sum.dtype.element_ty), mask=rays < R)


# --- backward -------------------------------------------------------------------------------------


@triton.jit
def _wgrad(
    part,
    dz,
    a,
    keep,
    ROWS: tl.constexpr,
    NP: tl.constexpr,
    KP: tl.constexpr,
    LD: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    z,
):
    """part[NP, KP] (row stride LD) += dz^T a (dz [ROWS, NP], a [ROWS, KP]), in blocks of at most
    _G_BLOCK x _G_BLOCK; keep = 0: part is uninitialised, start at 0."""
    if NP > _G_BLOCK:
        d0, d1 = _halves(dz, ROWS, NP)
        _wgrad(part, d0, a, keep, ROWS, NP // 2, KP, LD, ACC, PREC, z)
        _wgrad(part + (NP // 2) * LD, d1, a, keep, ROWS, NP // 2, KP, LD, ACC, PREC, z)
    elif KP > _G_BLOCK:
        a0, a1 = _halves(a, ROWS, KP)
        _wgrad(part, dz, a0, keep, ROWS, NP, KP // 2, LD, ACC, PREC, z)
        _wgrad(part + KP // 2, dz, a1, keep, ROWS, NP, KP // 2, LD, ACC, PREC, z)
    else:
        offs = (tl.arange(0, NP)[:, None] + z) * LD + tl.arange(0, KP)[None, :]
        g = tl.load(part + offs, mask=keep, other=0.0)  # a scalar mask: vector loads
        g = tl.dot(tl.trans(dz), a, g, input_precision=PREC, out_dtype=ACC)
        tl.store(part + offs, g)


@triton.jit
def _vgrad(part, v, keep, NP: tl.constexpr, z):
    """part[NP] += v."""
    offs = tl.arange(0, NP) + z
    tl.store(part + offs, tl.load(part + offs, mask=keep, other=0.0) + v)


@triton.jit
def _backward_chunk(
    cc,
    sc,
    wsi,
    bsi,
    wsh,
    bsh,
    wd,
    bd,
    wsf,
    bsf,
    wci,
    bci,
    wf,
    bf,
    wfh,
    bfh,
    grad_cc,
    grad_sc,
    part,
    gF,
    gS,
    ray0,
    c,
    keep,
    trans,
    prefix,
    total,
    last_nan,
    last_pinf,
    last_ninf,
    R,
    D,
    Ec,
    Es,
    H,
    H4,
    INCLUSIVE: tl.constexpr,
    ACT: tl.constexpr,
    ACC: tl.constexpr,
    OP: tl.constexpr,
    EMU: tl.constexpr,
    PREC: tl.constexpr,
    KS: tl.constexpr,
    KC: tl.constexpr,
    HP: tl.constexpr,
    H4P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DC: tl.constexpr,
    MULTI: tl.constexpr,
    O_SI: tl.constexpr,
    O_SH: tl.constexpr,
    O_SF: tl.constexpr,
    O_CI: tl.constexpr,
    O_FA: tl.constexpr,
    O_FB: tl.constexpr,
    O_FH: tl.constexpr,
    O_BSI: tl.constexpr,
    O_BSH: tl.constexpr,
    O_BSF: tl.constexpr,
    O_BCI: tl.constexpr,
    O_BF: tl.constexpr,
    O_BFH: tl.constexpr,
    O_WD: tl.constexpr,
    O_BD: tl.constexpr,
    PAD_COLS: tl.constexpr,
    z,
):
    """Chunk c of a tile: recompute, composite's GradScan, backprop; input gradients stored, weight
    gradients added to this program's partials `part` (keep = 0: they are not initialised yet)."""
    ROWS: tl.constexpr = BLOCK_R * DC
    rows, valid = _rows(ray0, c, R, D, ROWS, DC)
    # a0, a1 and a3 are recomputed where they are needed again (a0 and a3 from the codes, K = 16;
    # a1 costs one more H x H dot): keeping them live from here costs registers and, as wgmma
    # operands, shared memory. Tensors that two distant dots read go in _fresh.
    keep_h = _keep(valid, H, HP, PAD_COLS)
    s, cd, _, _, a2, _, a4, h, sigma = _mlp(
        cc,
        sc,
        wsi,
        bsi,
        wsh,
        bsh,
        wd,
        bd,
        wsf,
        bsf,
        wci,
        bci,
        wf,
        bf,
        wfh,
        bfh,
        rows,
        valid,
        Ec,
        Es,
        H,
        H4,
        ACC,
        OP,
        EMU,
        PREC,
        KS,
        KC,
        HP,
        H4P,
        ROWS,
        PAD_COLS,
        z,
    )
    sigma, w, dw, inside, trans = _weights(sigma, trans, c, D, INCLUSIVE, ACT, ACC, BLOCK_R, DC)
    # Compositing: composite_math.h's GradScan over the chunk's samples.
    e = tl.sum(tl.reshape(h, [BLOCK_R, DC, HP]) * gF[:, None, :], axis=2) + gS[:, None]
    ew = tl.where(inside, e * w, 0.0)  # padded samples: 0, even where e is inf or NaN
    j = c * DC + tl.arange(0, DC)[None, :]  # the samples' indices along the ray
    if not MULTI:  # the whole ray is in this chunk
        total, last_nan, last_pinf, last_ninf = _scan_totals(ew, j, total, last_nan, last_pinf, last_ninf)
    ewf = tl.where(tl.abs(ew) < _INF, ew, 0.0)  # the prefix sums take the finite terms only
    # own term: inclusive's sum starts at sample i itself (a finite e_i w_i may join e_i dw_i: a NaN
    # or inf one must not, inf - inf, and is added in _scan_finish instead)
    own = e * dw - ewf if INCLUSIVE else e * dw
    if DC == 1:
        pushed = own + (prefix[:, None] + ewf)
    else:
        pushed = own + (prefix[:, None] + tl.cumsum(ewf, axis=1))
    prefix += tl.sum(ewf, axis=1)
    g = _scan_finish(
        pushed - total[:, None], j + (0 if INCLUSIVE else 1), last_nan[:, None], last_pinf[:, None], last_ninf[:, None]
    )
    dsigma = tl.where(inside, _activate_backward(g, sigma, ACT), 0.0)
    dsigma = tl.reshape(dsigma, [ROWS])
    dh = tl.reshape(w[:, :, None] * gF[:, None, :], [ROWS, HP])  # 0 * inf gF in padded samples: h is 0 there
    # fuse_hidden
    dz = _op(tl.where(h <= 0.0, 0.0, dh), OP, EMU)
    _wgrad(part + O_FH, _fresh(dz, PREC, z), _fresh(a4, PREC, z), keep, ROWS, HP, HP, HP, ACC, PREC, z)
    _vgrad(part + O_BFH, tl.sum(dz.to(ACC), axis=0), keep, HP, z)
    da = _dzw(dz, wfh, H, H, H, 0, None, ROWS, HP, HP, OP, ACC, PREC, z)
    # fuse
    dz = _op(tl.where(a4 <= 0.0, 0.0, da), OP, EMU)
    y = _xwt(_fresh(cd, PREC, z), wci, H, Ec, Ec, 0, None, ROWS, KC, HP, OP, ACC, PREC, z)
    a3 = _op(_relu(y + _vec(bci, H, HP, ACC, z)[None, :], keep_h), OP, EMU)
    _wgrad(part + O_FA, _fresh(dz, PREC, z), _fresh(a2, PREC, z), keep, ROWS, HP, H4P, H4P, ACC, PREC, z)
    _wgrad(part + O_FB, _fresh(dz, PREC, z), _fresh(a3, PREC, z), keep, ROWS, HP, HP, HP, ACC, PREC, z)
    _vgrad(part + O_BF, tl.sum(dz.to(ACC), axis=0), keep, HP, z)
    da2 = _dzw(dz, wf, H, H4, H4 + H, 0, None, ROWS, HP, H4P, OP, ACC, PREC, z)
    da = _dzw(dz, wf, H, H, H4 + H, H4, None, ROWS, HP, HP, OP, ACC, PREC, z)
    # color_in
    dz = _op(tl.where(a3 <= 0.0, 0.0, da), OP, EMU)
    _wgrad(part + O_CI, _fresh(dz, PREC, z), _fresh(cd, PREC, z), keep, ROWS, HP, KC, KC, ACC, PREC, z)
    _vgrad(part + O_BCI, tl.sum(dz.to(ACC), axis=0), keep, HP, z)
    gc = _dzw(dz, wci, H, Ec, Ec, 0, None, ROWS, HP, KC, OP, ACC, PREC, z)
    k = tl.arange(0, KC)
    tl.store(
        grad_cc + rows[:, None] * Ec + k[None, :],
        gc.to(grad_cc.dtype.element_ty),
        mask=valid[:, None] & (k < Ec)[None, :],
    )
    # shape_feature
    y = _xwt(_fresh(s, PREC, z), wsi, H, Es, Es, 0, None, ROWS, KS, HP, OP, ACC, PREC, z)
    a0 = _op(_relu(y + _vec(bsi, H, HP, ACC, z)[None, :], keep_h), OP, EMU)
    y = _xwt(a0, wsh, H, H, H, 0, None, ROWS, HP, HP, OP, ACC, PREC, z)
    a1 = _op(_relu(y + _vec(bsh, H, HP, ACC, z)[None, :], keep_h), OP, EMU)
    dz = _op(tl.where(a2 <= 0.0, 0.0, da2), OP, EMU)
    _wgrad(part + O_SF, _fresh(dz, PREC, z), _fresh(a1, PREC, z), keep, ROWS, H4P, HP, HP, ACC, PREC, z)
    _vgrad(part + O_BSF, tl.sum(dz.to(ACC), axis=0), keep, H4P, z)
    da = _dzw(dz, wsf, H4, H, H, 0, None, ROWS, H4P, HP, OP, ACC, PREC, z)
    # density
    _vgrad(part + O_WD, tl.sum(dsigma[:, None] * a1.to(ACC), axis=0), keep, HP, z)
    bd_old = tl.load(part + O_BD, mask=keep, other=0.0)
    tl.store(part + O_BD, bd_old + tl.sum(dsigma, axis=0))
    da += dsigma[:, None] * _vec(wd, H, HP, ACC, z)[None, :]
    # shape_hidden
    dz = _op(tl.where(a1 <= 0.0, 0.0, da), OP, EMU)
    _wgrad(part + O_SH, _fresh(dz, PREC, z), _fresh(a0, PREC, z), keep, ROWS, HP, HP, HP, ACC, PREC, z)
    _vgrad(part + O_BSH, tl.sum(dz.to(ACC), axis=0), keep, HP, z)
    da = _dzw(dz, wsh, H, H, H, 0, None, ROWS, HP, HP, OP, ACC, PREC, z)
    # shape_in
    dz = _op(tl.where(a0 <= 0.0, 0.0, da), OP, EMU)
    _wgrad(part + O_SI, _fresh(dz, PREC, z), _fresh(s, PREC, z), keep, ROWS, HP, KS, KS, ACC, PREC, z)
    _vgrad(part + O_BSI, tl.sum(dz.to(ACC), axis=0), keep, HP, z)
    gs = _dzw(dz, wsi, H, Es, Es, 0, None, ROWS, HP, KS, OP, ACC, PREC, z)
    k = tl.arange(0, KS)
    tl.store(
        grad_sc + rows[:, None] * Es + k[None, :],
        gs.to(grad_sc.dtype.element_ty),
        mask=valid[:, None] & (k < Es)[None, :],
    )
    return trans, prefix


@triton.jit
def _backward_kernel(
    grad_features,
    grad_weight_sum,
    cc,
    sc,
    wsi,
    bsi,
    wsh,
    bsh,
    wd,
    bd,
    wsf,
    bsf,
    wci,
    bci,
    wf,
    bf,
    wfh,
    bfh,
    grad_cc,
    grad_sc,
    partials,
    R,
    D,
    Ec,
    Es,
    H,
    H4,
    num_tiles,
    INCLUSIVE: tl.constexpr,
    ACT: tl.constexpr,
    ACC: tl.constexpr,
    OP: tl.constexpr,
    EMU: tl.constexpr,
    PREC: tl.constexpr,
    KS: tl.constexpr,
    KC: tl.constexpr,
    HP: tl.constexpr,
    H4P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DC: tl.constexpr,
    MULTI: tl.constexpr,
    O_SI: tl.constexpr,
    O_SH: tl.constexpr,
    O_SF: tl.constexpr,
    O_CI: tl.constexpr,
    O_FA: tl.constexpr,
    O_FB: tl.constexpr,
    O_FH: tl.constexpr,
    O_BSI: tl.constexpr,
    O_BSH: tl.constexpr,
    O_BSF: tl.constexpr,
    O_BCI: tl.constexpr,
    O_BF: tl.constexpr,
    O_BFH: tl.constexpr,
    O_WD: tl.constexpr,
    O_BD: tl.constexpr,
    PT: tl.constexpr,
    PAD_COLS: tl.constexpr,
):
    ROWS: tl.constexpr = BLOCK_R * DC
    pid = tl.program_id(0)
    part = partials + pid.to(tl.int64) * PT  # this program's own partial sums
    n = tl.arange(0, HP)
    for t in range(pid, num_tiles, tl.num_programs(0)):  # a fixed order of tiles per program
        ray0 = t * BLOCK_R  # < R: int32 is enough; row offsets are int64
        rays = (ray0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        rmask = rays < R
        gF = tl.load(
            grad_features + rays[:, None] * H + n[None, :], mask=rmask[:, None] & (n < H)[None, :], other=0.0
        ).to(ACC)
        gS = tl.load(grad_weight_sum + rays, mask=rmask, other=0.0).to(ACC)
        trans = tl.full([BLOCK_R], 1.0, ACC)
        prefix = tl.zeros([BLOCK_R], ACC)  # sum_{k < chunk} e_k w_k, of the finite ones
        total = tl.zeros([BLOCK_R], ACC)  # sum_k e_k w_k over the ray, of the finite ones
        last_nan = tl.full([BLOCK_R], -1, tl.int32)  # the last sample whose e_k w_k is NaN, +inf, -inf
        last_pinf = tl.full([BLOCK_R], -1, tl.int32)
        last_ninf = tl.full([BLOCK_R], -1, tl.int32)
        # The last tile's (chunk's) partial-sum stores, by whichever threads held those elements, must
        # land before this one's loads, by others: a CTA barrier orders them.
        tl.debug_barrier()
        if MULTI:  # a ray spans several chunks: a first pass for the total, then one per chunk
            for c in range(tl.cdiv(D, DC)):
                rows, valid = _rows(ray0, c, R, D, ROWS, DC)
                _, _, _, _, _, _, _, h, sigma = _mlp(
                    cc,
                    sc,
                    wsi,
                    bsi,
                    wsh,
                    bsh,
                    wd,
                    bd,
                    wsf,
                    bsf,
                    wci,
                    bci,
                    wf,
                    bf,
                    wfh,
                    bfh,
                    rows,
                    valid,
                    Ec,
                    Es,
                    H,
                    H4,
                    ACC,
                    OP,
                    EMU,
                    PREC,
                    KS,
                    KC,
                    HP,
                    H4P,
                    ROWS,
                    PAD_COLS,
                    _opaque_zero(c, R),
                )
                _, w, _, inside, trans = _weights(sigma, trans, c, D, INCLUSIVE, ACT, ACC, BLOCK_R, DC)
                e = tl.sum(tl.reshape(h, [BLOCK_R, DC, HP]) * gF[:, None, :], axis=2) + gS[:, None]
                total, last_nan, last_pinf, last_ninf = _scan_totals(
                    tl.where(inside, e * w, 0.0),
                    c * DC + tl.arange(0, DC)[None, :],
                    total,
                    last_nan,
                    last_pinf,
                    last_ninf,
                )
            trans = tl.full([BLOCK_R], 1.0, ACC)
            for c in range(tl.cdiv(D, DC)):
                tl.debug_barrier()
                trans, prefix = _backward_chunk(
                    cc,
                    sc,
                    wsi,
                    bsi,
                    wsh,
                    bsh,
                    wd,
                    bd,
                    wsf,
                    bsf,
                    wci,
                    bci,
                    wf,
                    bf,
                    wfh,
                    bfh,
                    grad_cc,
                    grad_sc,
                    part,
                    gF,
                    gS,
                    ray0,
                    c,
                    (t != pid) | (c > 0),
                    trans,
                    prefix,
                    total,
                    last_nan,
                    last_pinf,
                    last_ninf,
                    R,
                    D,
                    Ec,
                    Es,
                    H,
                    H4,
                    INCLUSIVE,
                    ACT,
                    ACC,
                    OP,
                    EMU,
                    PREC,
                    KS,
                    KC,
                    HP,
                    H4P,
                    BLOCK_R,
                    DC,
                    MULTI,
                    O_SI,
                    O_SH,
                    O_SF,
                    O_CI,
                    O_FA,
                    O_FB,
                    O_FH,
                    O_BSI,
                    O_BSH,
                    O_BSF,
                    O_BCI,
                    O_BF,
                    O_BFH,
                    O_WD,
                    O_BD,
                    PAD_COLS,
                    _opaque_zero(c, R),
                )
        else:
            trans, prefix = _backward_chunk(
                cc,
                sc,
                wsi,
                bsi,
                wsh,
                bsh,
                wd,
                bd,
                wsf,
                bsf,
                wci,
                bci,
                wf,
                bf,
                wfh,
                bfh,
                grad_cc,
                grad_sc,
                part,
                gF,
                gS,
                ray0,
                0,
                t != pid,
                trans,
                prefix,
                total,
                last_nan,
                last_pinf,
                last_ninf,
                R,
                D,
                Ec,
                Es,
                H,
                H4,
                INCLUSIVE,
                ACT,
                ACC,
                OP,
                EMU,
                PREC,
                KS,
                KC,
                HP,
                H4P,
                BLOCK_R,
                DC,
                MULTI,
                O_SI,
                O_SH,
                O_SF,
                O_CI,
                O_FA,
                O_FB,
                O_FH,
                O_BSI,
                O_BSH,
                O_BSF,
                O_BCI,
                O_BF,
                O_BFH,
                O_WD,
                O_BD,
                PAD_COLS,
                _opaque_zero(t, R),
            )


# --- launchers ------------------------------------------------------------------------------------


def _pad(n: int) -> int:
    """Padded width of a dot operand: a power of two, at least 16 (the smallest fp16 MMA K)."""
    return max(16, next_power_of_2(n))


def _dims(color_code, shape_code, params):
    R, D, Ec = color_code.shape
    Es = shape_code.shape[2]
    H, H4 = params[0].shape[0], params[6].shape[0]
    return R, D, Ec, Es, H, H4


# Rows (ray samples) per tile, first choice per dtype, for padded widths HP <= 32, 64 and 128 (halved
# for each doubling past 128). Chosen from sm_90 compiles (ptxas registers and spills, Triton's shared
# memory; `python -m fnevr.kernels mlp_composite`), without a GPU to time them:
# - wgmma gives a warpgroup (4 warps) 64 rows, and Triton puts every warp along the rows when dots
#   chain (as here): 8 warps need 128 rows, or both warpgroups compute the same rows. A [64, 128]
#   fp32 activation is then 64 registers per thread;
# - forward: 128 rows (8 warps) for every dtype but fp64 at H=128 (fp32 spills 0.3 KB a thread);
# - backward at H=128 holds several activations and weight-gradient blocks: 128 rows for fp16/bf16
#   (~0.8 KB of spills, ~90 KB of shared memory), 64 for fp32 (~3.4 KB, ~120 KB; 128 rows do not
#   fit 227 KB; 32 or 16 rows, below wgmma's 64, spill twice as much), 32 for fp64. At HP <= 32 fp32
#   takes 32 rows (0.1 KB of spills; 128 rows: 1 KB);
# - more rows amortise what each tile reloads: the weights (~240 KB in fp32 at H=128, from L2) and,
#   in backward, its program's weight-gradient partials (read and written, as much again).
# Every first choice fits an H100's 227 KB of shared memory. A launch that runs out of resources
# anyway (another GPU) retries with half the rows; what launched is remembered per shape.
_FORWARD_ROWS = {
    torch.float16: (128, 128, 128),
    torch.bfloat16: (128, 128, 128),
    torch.float32: (128, 128, 128),
    torch.float64: (128, 128, 64),
}
_BACKWARD_ROWS = {
    torch.float16: (128, 128, 128),
    torch.bfloat16: (128, 128, 128),
    torch.float32: (32, 64, 64),
    torch.float64: (128, 64, 32),
}
_MIN_ROWS, _MAX_ROWS = 16, 128  # 16: the smallest MMA M
_launched_rows: dict = {}  # (kernel, device, dtype, dims, options) -> rows of a launch that fitted
# fp32 dots without allow_tf32: "tf32x3" (three TF32 tensor-core products per dot, split operands:
# about fp32's accuracy). "ieee" (FMA, exact like PyTorch's fp32 Linear) compiles here, at H=128, to
# ~30 KB of register spills per thread: unusable at speed.
_FP32_DOT = "tf32x3"


def _tile(D: int, rows: int) -> tuple[int, int, int]:
    """(BLOCK_R, DC, num_warps) for tiles of `rows` (ray, sample) rows: DC samples of BLOCK_R rays."""
    dc = min(next_power_of_2(D), rows)
    return rows // dc, dc, 8 if rows >= 128 else 4


def _first_rows(table: dict, dtype: torch.dtype, HP: int) -> int:
    """The table's rows for width HP: its entry for HP <= 32, 64 or 128; past 128, fewer in proportion."""
    narrow, mid, wide = table[dtype]
    rows = narrow if HP <= 32 else mid if HP == 64 else wide * 128 // HP
    return max(_MIN_ROWS, min(_MAX_ROWS, rows))


def _launch(name: str, key: tuple, rows: int, launch) -> None:
    """launch(rows); on OutOfResources again with half the rows, down to _MIN_ROWS."""
    rows = _launched_rows.get((name, *key), rows)
    while True:
        try:
            launch(rows)
        except OutOfResources:
            if rows <= _MIN_ROWS:
                raise
            rows //= 2
            continue
        _launched_rows[(name, *key)] = rows
        return


def _constexprs(dtype: torch.dtype, emu: bool, inclusive: bool, activation: int, Ec, Es, H, H4) -> dict:
    if emu:
        op = tl.float32
    else:
        op = {
            torch.float16: tl.float16,
            torch.bfloat16: tl.bfloat16,
            torch.float32: tl.float32,
            torch.float64: tl.float64,
        }[dtype]
    # The precision matters to fp32 dots only (fp16/bf16/fp64 products are exact in the accumulator).
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting()
    return dict(
        INCLUSIVE=bool(inclusive),
        ACT=int(activation),
        ACC=accumulator(dtype),
        OP=op,
        EMU=emu,
        PREC="tf32" if tf32 else (_FP32_DOT if dtype == torch.float32 else "ieee"),
        KS=_pad(Es),
        KC=_pad(Ec),
        HP=_pad(H),
        H4P=_pad(H4),
        PAD_COLS=_pad(H) != H or _pad(H4) != H4,
    )


def _grad_layout(KS: int, KC: int, HP: int, H4P: int) -> tuple[dict, int]:
    """Offsets of each gradient in a program's (padded) partial buffer, and its length."""
    sizes = dict(
        O_SI=HP * KS,
        O_SH=HP * HP,
        O_SF=H4P * HP,
        O_CI=HP * KC,
        O_FA=HP * H4P,
        O_FB=HP * HP,
        O_FH=HP * HP,
        O_BSI=HP,
        O_BSH=HP,
        O_BSF=H4P,
        O_BCI=HP,
        O_BF=HP,
        O_BFH=HP,
        O_WD=HP,
        O_BD=1,
    )
    offsets, total = {}, 0
    for name, size in sizes.items():
        offsets[name] = total
        total += -(-size // 32) * 32  # 128-byte aligned blocks (vector loads; the buffer is too)
    return offsets, total


# Backward's persistent grid: one program per SM (255 registers per thread and ~90-120 KB of shared
# memory at H=128 leave room for one); a fixed count per device, so the order of the weight-gradient
# sums is fixed. A few under the interpreter, so that programs loop over several tiles there too.
_INTERPRETER_PROGRAMS = 3


def _emulating_bf16(t: torch.Tensor) -> bool:
    return interpreting() and t.dtype == torch.bfloat16  # numpy has no bf16: fp32 with bf16 rounding


def mlp_composite_forward(
    color_code: torch.Tensor, shape_code: torch.Tensor, params: list, inclusive: bool, activation: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """color_code [R, D, Ec], shape_code [R, D, Es], the 14 params (contiguous, one dtype)
    -> (features [R, H], weight_sum [R]) in that dtype."""
    dtype = color_code.dtype
    emu = _emulating_bf16(color_code)
    if emu:
        color_code, shape_code, params = color_code.float(), shape_code.float(), [p.float() for p in params]
    R, D, Ec, Es, H, H4 = _dims(color_code, shape_code, params)
    run = R > 0 and D > 0  # then the kernel writes every element
    new = torch.empty if run else torch.zeros
    features = new((R, H), dtype=color_code.dtype, device=color_code.device)
    weight_sum = new((R,), dtype=color_code.dtype, device=color_code.device)
    if run:
        const = _constexprs(dtype, emu, inclusive, activation, Ec, Es, H, H4)

        def launch(rows):
            block_r, dc, warps = _tile(D, rows)
            _forward_kernel[(cdiv(R, block_r),)](
                color_code,
                shape_code,
                *params,
                features,
                weight_sum,
                R,
                D,
                Ec,
                Es,
                H,
                H4,
                BLOCK_R=block_r,
                DC=dc,
                MULTI=D > dc,
                num_warps=warps,
                **const,
            )

        with launch_ctx(color_code):
            _launch(
                "forward",
                (color_code.device, dtype, D, Ec, Es, H, H4, inclusive, activation, const["PREC"]),
                _first_rows(_FORWARD_ROWS, dtype, const["HP"]),
                launch,
            )
    return features.to(dtype), weight_sum.to(dtype)


def mlp_composite_backward(
    grad_features: torch.Tensor,
    grad_weight_sum: torch.Tensor,
    color_code: torch.Tensor,
    shape_code: torch.Tensor,
    params: list,
    inclusive: bool,
    activation: int,
) -> list:
    """-> [grad_color_code, grad_shape_code, one grad per param], each like its input."""
    dtype = color_code.dtype
    emu = _emulating_bf16(color_code)
    if emu:
        grad_features, grad_weight_sum = grad_features.float(), grad_weight_sum.float()
        color_code, shape_code, params = color_code.float(), shape_code.float(), [p.float() for p in params]
    R, D, Ec, Es, H, H4 = _dims(color_code, shape_code, params)
    if R == 0 or D == 0:
        return [torch.zeros_like(t, dtype=dtype) for t in [color_code, shape_code, *params]]
    grad_cc = torch.empty_like(color_code)  # the kernel writes every element
    grad_sc = torch.empty_like(shape_code)
    const = _constexprs(dtype, emu, inclusive, activation, Ec, Es, H, H4)
    KS, KC, HP, H4P = const["KS"], const["KC"], const["HP"], const["H4P"]
    offsets, length = _grad_layout(KS, KC, HP, H4P)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    partials = None

    def launch(rows):
        nonlocal partials
        block_r, dc, warps = _tile(D, rows)
        num_tiles = cdiv(R, block_r)
        programs = min(num_tiles, multiprocessors(color_code.device, _INTERPRETER_PROGRAMS))
        # Each program initialises its own partials (its first tile stores without loading).
        partials = torch.empty((programs, length), dtype=acc, device=color_code.device)
        _backward_kernel[(programs,)](
            grad_features,
            grad_weight_sum,
            color_code,
            shape_code,
            *params,
            grad_cc,
            grad_sc,
            partials,
            R,
            D,
            Ec,
            Es,
            H,
            H4,
            num_tiles,
            BLOCK_R=block_r,
            DC=dc,
            MULTI=D > dc,
            PT=length,
            num_warps=warps,
            **const,
            **offsets,
        )

    with launch_ctx(color_code):
        _launch(
            "backward",
            (color_code.device, dtype, D, Ec, Es, H, H4, inclusive, activation, const["PREC"]),
            _first_rows(_BACKWARD_ROWS, dtype, HP),
            launch,
        )
    assert partials is not None  # launch() made them
    g = partials.sum(0)  # fixed order: deterministic

    def block(name, rows, cols, n, k):
        o = offsets[name]
        return g[o : o + rows * cols].view(rows, cols)[:n, :k]

    grads = [  # each its own tensor (views of g would alias one another)
        block("O_SI", HP, KS, H, Es),
        block("O_BSI", 1, HP, 1, H)[0],
        block("O_SH", HP, HP, H, H),
        block("O_BSH", 1, HP, 1, H)[0],
        block("O_WD", 1, HP, 1, H),
        g[offsets["O_BD"] : offsets["O_BD"] + 1],
        block("O_SF", H4P, HP, H4, H),
        block("O_BSF", 1, H4P, 1, H4)[0],
        block("O_CI", HP, KC, H, Ec),
        block("O_BCI", 1, HP, 1, H)[0],
        torch.cat([block("O_FA", HP, H4P, H, H4), block("O_FB", HP, HP, H, H)], dim=1),
        block("O_BF", 1, HP, 1, H)[0],
        block("O_FH", HP, HP, H, H),
        block("O_BFH", 1, HP, 1, H)[0],
    ]
    grads = [t.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True) for t in grads]
    return [grad_cc.to(dtype), grad_sc.to(dtype)] + grads


# --- compile-only launches (kernels/aot.py, FNEVR_TRITON_COMPILE_ONLY) -------------------------------


def compile_launches(dtype):
    """The launches that make kernels/aot.py compile every configuration of these kernels in `dtype`."""
    from fnevr.model.render import SampleMLP
    from fnevr.ops import mlp_composite

    from .aot import fwd_bwd

    # fp32 dots are tf32x3, or plain TF32 where PyTorch's own matmuls may use it: both.
    tf32_flags = (False, True) if dtype == torch.float32 else (False,)
    for e, hidden, D in ((16, 128, 8), (8, 32, 4)):  # vox-256's ray head; the small config's
        mlp = SampleMLP(color_dim=e, shape_dim=e, hidden=hidden).to(dtype)
        params = [p for name, p in mlp.named_parameters() if not name.startswith("color_out")]
        for tf32 in tf32_flags:
            saved = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                fwd_bwd(
                    lambda c, s, *p: mlp_composite(c, s, list(p), transmittance="inclusive", backend="triton"),
                    torch.rand(64, D, e, dtype=dtype),
                    torch.rand(64, D, e, dtype=dtype),
                    *[p.detach().clone() for p in params],
                )
            finally:
                torch.backends.cuda.matmul.allow_tf32 = saved
