"""The @triton.jit helpers every kernel family shares.

Math (see :mod:`fusedce.spec`). Per row r with target t and upstream row gradient g:

    z_j  = softcap * tanh(scale * x_j / softcap)   (or scale * x_j)
    m    = max_j z_j,  s = sum_j exp(z_j - m),  lse = m + log s,  nll = (m - z_t) + log s
    zt   = z_t,  sz = sum_j w_j z_j,  am = first argmax_j z_j,
    sez  = sum_j exp(z_j - m) (z_j - m)
    dz_j = g * (p_j * c_p - c_t * [j = t] - (a / V) * w_j),   p_j = exp(z_j - m) / s
    c_p  = (1 - a) * w_t + (a / V) * W + 2 * zl * lse,   c_t = (1 - a) * w_t
    dx_j = dz_j * scale * (1 - (z_j / softcap)^2)   (or dz_j * scale)
    entropy: H = log s - sez / s,  dz_j = -g * p_j * ((z_j - m) - (log s - H))

tanh(u) is an odd polynomial in u for |u| < 0.625 and sign(u) * (1 - e) / (1 + e), e =
exp(-2|u|), above: within 2 ulp of tanh everywhere (the exp form alone loses the relative
accuracy of small |u|, the usual case of logits well below the cap), never overflowing, and
without libdevice (the CPU interpreter runs the same code).

Every exponential is taken of z - m (the row maximum), never of z * log2(e) - m * log2(e):
the difference is exact where the logits are large and close, and m * log2(e) overflows
for a maximum near the fp32 limit.

Vocabulary pieces (threads, chunks, segments, cooperating programs, ranks) fold with the
spec's combine, :func:`_combine`: m = max(m1, m2), s = s1 exp(m1 - m) + s2 exp(m2 - m) (a piece
with m = -inf adds 0); z_t and sz add, am keeps the first piece that holds the maximum,
sez_k becomes exp(m_k - m) (sez_k + s_k (m_k - m)) (:func:`_rescale_sez`).

Offsets are 64-bit per row (b * stride_b + t * stride_t) and 64-bit per column when
(V - 1) * stride_v could pass 2**31 (COL64).
"""

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_LOG2E = tl.constexpr(1.4426950408889634)
# the interpreter casts fp32 to bf16 by truncation (the GPU rounds to nearest even)
_ROUND_BF16 = tl.constexpr(INTERPRET)
# ex2.approx.ftz on GPUs; the interpreter has no inline PTX
_FAST_EXP2 = tl.constexpr(not INTERPRET)
# "no argmax yet": larger than every column id
_NO_AM = tl.constexpr(2147483647)


def scalars(logit_scale: float, softcap, label_smoothing: float = 0.0, vocab_size: int = 1,
            z_loss: float = 0.0) -> tuple:
    """The per-call fp32 scalars of the fused kernels, one tuple argument (kernel parameters,
    like separate floats; unpacked in the kernels in this order): 1 - a, a / V, zl, 2 zl, V,
    scale, scale / cap, cap, 1 / cap (cap = 1 without a softcap)."""
    a = float(label_smoothing)
    cap = float(softcap) if softcap is not None else 1.0
    s = float(logit_scale)
    return (1.0 - a, a / vocab_size, float(z_loss), 2.0 * float(z_loss), float(vocab_size),
            s, s / cap, cap, 1.0 / cap)


def transform_flags(logit_scale: float, softcap) -> dict:
    """SOFTCAP / SCALE of a launch: which transform z of x the kernels apply."""
    return dict(SOFTCAP=softcap is not None,
                SCALE=softcap is None and float(logit_scale) != 1.0)


@triton.jit
def _tanh(u):
    a = tl.abs(u)
    # |u| < 0.625: tanh(u) / u as a polynomial in u^2 (least squares on Chebyshev nodes,
    # within 2 ulp in fp32 Horner form); above: (1 - e) / (1 + e) with e <= exp(-1.25), where
    # 1 - e cancels little
    t = u * u
    q = -0.0008011311387323488
    q = q * t + 0.0032256064616023455
    q = q * t - 0.008749526384907596
    q = q * t + 0.02184943923764236
    q = q * t - 0.0539663095666941
    q = q * t + 0.1333332400597344
    q = q * t - 0.33333333162135725
    small = u + u * (q * t)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    return tl.where(a < 0.625, small, tl.where(u < 0.0, -big, big))


@triton.jit
def _z_of(x, scale, inv_cap, softcap, SOFTCAP: tl.constexpr, SCALE: tl.constexpr):
    z = x.to(tl.float32)
    if SOFTCAP:
        z = softcap * _tanh(z * inv_cap)
    elif SCALE:
        z = z * scale
    return z


@triton.jit
def _chain(d, z, scale, rcap, SOFTCAP: tl.constexpr, SCALE: tl.constexpr):
    """dz -> dx: times dz/dx of _z_of."""
    if SOFTCAP:
        r = z * rcap
        d = d * (scale * (1.0 - r * r))
    elif SCALE:
        d = d * scale
    return d


@triton.jit
def _exp2(x):
    # ex2.approx.ftz: one MUFU op; the default lowering adds a denormal-range fix-up (three
    # more instructions per element), and results below 2**-126 do not matter here
    if _FAST_EXP2:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def _to_out(d, ty: tl.constexpr):
    """d (fp32) in the output dtype, rounded once to nearest even on every platform."""
    if _ROUND_BF16 and ty == tl.bfloat16:
        bits = d.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        d = bits.to(tl.float32, bitcast=True)
    return d.to(ty)


@triton.jit
def _row_ptr(ptr, row, T, sb, st):
    b = row // T
    t = row - b * T
    return ptr + b.to(tl.int64) * sb + t.to(tl.int64) * st


@triton.jit
def _col_off(cols, sv, COL64: tl.constexpr):
    if COL64:
        return cols.to(tl.int64) * sv
    else:
        return cols * sv


# ----------------------------------------------------------------------------- the combine


@triton.jit
def _combine(s, m, mm):
    """The spec's combine of vocabulary pieces: the sum s of exp(z - m) of a piece whose
    maximum is m, about the maximum mm >= m of several pieces (a piece with m = -inf, empty
    or masked, adds 0; an all -inf mm shifts by 0). Every fold takes its pieces' s through
    this, pairwise (s1 -> mm, s2 -> mm) or over a tile (s -> max of the tile)."""
    sh = tl.where(mm == float("-inf"), 0.0, mm)
    return s * tl.where(m == float("-inf"), 0.0, tl.exp(m - sh))


@triton.jit
def _fold(m, s, am, AXIS: tl.constexpr):
    """(m, s, first argmax) of the pieces of a tile along AXIS (0: a vector, 1: rows of a
    [rows, pieces] tile): the maximum, every s combined to it, the smallest argmax among the
    pieces that hold it (_NO_AM where none does: all -inf or NaN)."""
    mm = tl.max(m, axis=AXIS)
    if AXIS == 1:
        mb = mm[:, None]
    else:
        mb = mm
    return mm, tl.sum(_combine(s, m, mb), axis=AXIS), tl.min(tl.where(m == mb, am, _NO_AM),
                                                             axis=AXIS)


@triton.jit
def _rescale_sez(sez, s, m, mm):
    """A piece's sez (about its own maximum m) about the maximum mm of several pieces."""
    live = m != float("-inf")
    d = tl.where(live, m - tl.where(mm == float("-inf"), 0.0, mm), 0.0)
    f = tl.exp(d)
    # a piece far below the maximum (f = 0) adds 0: s * d may overflow to -inf there
    return tl.where(live & (f > 0.0), (sez + s * d) * f, 0.0)


# ----------------------------------------------------------------------------- row chunks


@triton.jit
def _chunk_stats(x, cols, end, c0, lane, m, s, sz, am, w_ptr, scale, inv_cap, softcap,
                 R: tl.constexpr, SOFTCAP: tl.constexpr, SCALE: tl.constexpr,
                 NEED_SZ: tl.constexpr, HAS_W: tl.constexpr, NEED_AM: tl.constexpr):
    """Fold one [BLOCK / R, R] chunk x (masked lanes loaded as -inf) into the per-thread
    running (m, s, sz, am); also returns z, e = exp(z - m_new) and alpha = exp(m - m_new)."""
    mask = cols < end
    z = _z_of(x, scale, inv_cap, softcap, SOFTCAP, SCALE)
    if SOFTCAP:
        z = tl.where(mask, z, float("-inf"))  # tanh(-inf) is -1, not -inf
    if NEED_SZ:
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            sz += tl.sum(tl.where(mask, z * w, 0.0), axis=1)
        else:
            sz += tl.sum(tl.where(mask, z, 0.0), axis=1)
    if NEED_AM:
        mc, ic = tl.max(z, axis=1, return_indices=True, return_indices_tie_break_left=True)
        am = tl.where(mc > m, c0 + lane * R + ic, am)
    else:
        mc = tl.max(z, axis=1)
    m_new = tl.maximum(m, mc)
    # an all -inf piece has no finite shift: use 0 so that it adds exp(-inf) = 0
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    e = _exp2((z - shift[:, None]) * _LOG2E)
    alpha = _exp2((m - shift) * _LOG2E)
    s = s * alpha + tl.sum(e, axis=1)
    return z, m_new, s, sz, am, e, alpha


@triton.jit
def _sez_step(sez, s_old, m_old, alpha, z, e, m_new):
    """The running sum exp(z - m) (z - m) after a chunk moved the maximum m_old -> m_new
    (e = exp(z - m_new), alpha = exp(m_old - m_new) from _chunk_stats)."""
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    # alpha = 0 (an empty past, or one far below the new maximum) adds 0: s_old (m_old -
    # shift) may overflow to -inf there
    old = tl.where(alpha > 0.0, alpha * (sez + s_old * (m_old - shift)), 0.0)
    return old + tl.sum(tl.where(e > 0.0, e * (z - shift[:, None]), 0.0), axis=1)


@triton.jit
def _fold_threads(m, s, sz, am, lane, NEED_AM: tl.constexpr):
    """(m, s, sum w z, first argmax) of a row from per-thread running values (_fold over the
    lanes); lanes hold interleaved columns, so the first argmax is the smallest index among
    the lanes that reach the maximum (lane 0's when every value is -inf or NaN)."""
    mm, ss, amm = _fold(m, s, am, 0)
    if NEED_AM:
        amm = tl.where(amm == _NO_AM, tl.min(tl.where(lane == 0, am, _NO_AM), axis=0), amm)
    else:
        amm = tl.full([], -1, tl.int32)
    return mm, ss, tl.sum(sz, axis=0), amm
