"""Triton kernels (and their launchers, registered as torch.library ops) for cross-entropy,
log-probabilities and entropy on materialised logits [B, T, V] with any strides.

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

Vocabulary pieces (chunks inside a program, segments across programs) fold with the spec's
combine: m = max(m1, m2), s = s1 exp(m1 - m) + s2 exp(m2 - m) (a piece with m = -inf adds 0),
z_t and sz add, am keeps the first piece that holds the maximum, sez_k becomes
exp(m_k - m) (sez_k + s_k (m_k - m)).

Kernels:
  _stats_kernel   forward statistics only (one read). A program takes one (row, segment);
                  a chunk of BLOCK columns is a [BLOCK / R, R] tile whose R-column rows sit
                  in single threads, so every thread keeps its own running (m, s, am, sz,
                  sez) with in-thread reductions and one exp per element (plus one per R);
                  threads fold once per row. Segments > 1 (few, long rows) write partials
                  that _fold_kernel combines.
  _grad_kernel    dx from given per-row lse / g / c_p / c_t (CE) or lse / H / g (entropy):
                  one read, one write (vocabulary shards, lazy backward, fallback).
  _fused_rows_kernel (fused_rows.py)  statistics AND dx: one program per row streams it
                  twice, the second read from L2 (DRAM sees one read and one write).
  _scale_kernel   buf *= f (one 0-d factor, read on the device: f == 1 touches no memory) or
                  per-row factors (rows with f == 1 are skipped).

Offsets are 64-bit per row (b * stride_b + t * stride_t) and 64-bit per column when
(V - 1) * stride_v could pass 2**31.
"""

import os
from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_LOG2E = tl.constexpr(1.4426950408889634)
# the interpreter casts fp32 to bf16 by truncation (the GPU rounds to nearest even)
_ROUND_BF16 = tl.constexpr(INTERPRET)


# ----------------------------------------------------------------------------- jit helpers


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
    if SOFTCAP:
        r = z * rcap
        d = d * (scale * (1.0 - r * r))
    elif SCALE:
        d = d * scale
    return d


@triton.jit
def _exp2(x, FAST: tl.constexpr):
    # ex2.approx.ftz: one MUFU op; the default lowering adds a denormal-range fix-up (three
    # more instructions per element), and results below 2**-126 do not matter here
    if FAST:
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


# ----------------------------------------------------------------------------- statistics


@triton.jit
def _chunk_stats(x, cols, end, c0, lane, m, s, sz, am, w_ptr, scale, inv_cap, softcap,
                 R: tl.constexpr, SOFTCAP: tl.constexpr, SCALE: tl.constexpr,
                 NEED_SZ: tl.constexpr, HAS_W: tl.constexpr, NEED_AM: tl.constexpr,
                 FAST: tl.constexpr):
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
    e = _exp2((z - shift[:, None]) * _LOG2E, FAST)
    alpha = _exp2((m - shift) * _LOG2E, FAST)
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
def _rescale_sez(sez, s, m, mm):
    """A piece's sez (about its own maximum m) about the maximum mm of several pieces."""
    live = m != float("-inf")
    d = tl.where(live, m - tl.where(mm == float("-inf"), 0.0, mm), 0.0)
    f = tl.exp(d)
    # a piece far below the maximum (f = 0) adds 0: s * d may overflow to -inf there
    return tl.where(live & (f > 0.0), (sez + s * d) * f, 0.0)


@triton.jit
def _stats_kernel(
    x_ptr, sxb, sxt, sxv, T, V, S, seg_len,
    tgt_ptr, ignore_index, vocab_start, w_ptr,
    scale, inv_cap, softcap,
    m_ptr, s_ptr, zt_ptr, sz_ptr, am_ptr, sez_ptr,
    BLOCK: tl.constexpr, R: tl.constexpr, SOFTCAP: tl.constexpr, SCALE: tl.constexpr,
    NEED_SZ: tl.constexpr, HAS_W: tl.constexpr, NEED_SEZ: tl.constexpr, NEED_AM: tl.constexpr,
    COL64: tl.constexpr, PREFETCH: tl.constexpr, FAST: tl.constexpr,
):
    # A chunk is a [BLOCK // R, R] tile whose rows of R contiguous columns each sit in one
    # thread: every thread keeps its own running (m, s, am, sz, sez) and folds a chunk with
    # in-thread reductions only (one exp per element plus one per R); threads are combined
    # once per row at the end, so no cross-warp reduction stalls the stream of loads.
    pid = tl.program_id(0)
    row = pid // S
    seg = pid - row * S
    base = _row_ptr(x_ptr, row, T, sxb, sxt)
    NT: tl.constexpr = BLOCK // R
    lane = tl.arange(0, NT)
    offs = lane[:, None] * R + tl.arange(0, R)[None, :]
    start = seg * seg_len
    end = tl.minimum(start + seg_len, V)

    # the target logit (seg 0 only: one scalar load per row)
    tv = tl.load(tgt_ptr + row).to(tl.int64)
    tloc = tv - vocab_start
    has = (tv != ignore_index) & (tloc >= 0) & (tloc < V)
    tsafe = tl.where(has, tloc, 0)
    xt = tl.load(base + tsafe * sxv, mask=has & (seg == 0), other=0.0)
    zt = tl.where(has & (seg == 0), _z_of(xt, scale, inv_cap, softcap, SOFTCAP, SCALE), 0.0)

    m = tl.full([NT], float("-inf"), tl.float32)
    s = tl.zeros([NT], tl.float32)
    sz = tl.zeros([NT], tl.float32)
    sez = tl.zeros([NT], tl.float32)
    am = tl.zeros([NT], tl.int32)
    if PREFETCH:
        c1 = start + offs
        xn = tl.load(base + _col_off(c1, sxv, COL64), mask=c1 < end, other=float("-inf"))
    for c0 in range(start, end, BLOCK):
        # seg_len is a multiple of BLOCK: telling the compiler keeps the loads 16-byte wide
        # and every R-column row of the tile inside one thread
        c0 = tl.multiple_of(c0, BLOCK)
        cols = c0 + offs
        mask = cols < end
        if PREFETCH:
            x = xn
            cn = cols + BLOCK
            xn = tl.load(base + _col_off(cn, sxv, COL64), mask=cn < end, other=float("-inf"))
        else:
            x = tl.load(base + _col_off(cols, sxv, COL64), mask=mask, other=float("-inf"))
        m_old = m
        s_old = s
        z, m, s, sz, am, e, alpha = _chunk_stats(
            x, cols, end, c0, lane, m, s, sz, am, w_ptr, scale, inv_cap, softcap, R, SOFTCAP,
            SCALE, NEED_SZ, HAS_W, NEED_AM, FAST)
        if NEED_SEZ:
            sez = _sez_step(sez, s_old, m_old, alpha, z, e, m)

    # fold the threads: the same combine as for vocabulary pieces
    mm = tl.max(m, axis=0)
    sh = tl.where(mm == float("-inf"), 0.0, mm)
    f = tl.where(m == float("-inf"), 0.0, tl.exp(m - sh))
    tl.store(m_ptr + pid, mm)
    tl.store(s_ptr + pid, tl.sum(s * f, axis=0))
    tl.store(zt_ptr + pid, zt)
    tl.store(sz_ptr + pid, tl.sum(sz, axis=0))
    if NEED_AM:
        # lanes hold interleaved columns: the first argmax is the smallest index among the
        # lanes that reach the maximum (lane 0's when every value is -inf or NaN)
        amm = tl.min(tl.where(m == mm, am, 2147483647), axis=0)
        amm = tl.where(amm == 2147483647, tl.min(tl.where(lane == 0, am, 2147483647), axis=0), amm)
        tl.store(am_ptr + pid, amm.to(tl.int64) + vocab_start)
    else:
        tl.store(am_ptr + pid, tl.full([], -1, tl.int64))
    if NEED_SEZ:
        tl.store(sez_ptr + pid, tl.sum(_rescale_sez(sez, s, m, mm), axis=0))


@triton.jit
def _fold_kernel(
    pm, ps, pzt, psz, pam, psez,
    m_ptr, s_ptr, zt_ptr, sz_ptr, am_ptr, sez_ptr,
    N, S,
    ROWS: tl.constexpr, SP2: tl.constexpr, NEED_SEZ: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    segs = tl.arange(0, SP2)
    rmask = rows < N
    mask = rmask[:, None] & (segs[None, :] < S)
    idx = rows.to(tl.int64)[:, None] * S + segs[None, :]
    m = tl.load(pm + idx, mask=mask, other=float("-inf"))
    mm = tl.max(m, axis=1)
    shift = tl.where(mm == float("-inf"), 0.0, mm)
    f = tl.where(m == float("-inf"), 0.0, tl.exp(m - shift[:, None]))
    s = tl.sum(tl.load(ps + idx, mask=mask, other=0.0) * f, axis=1)
    zt = tl.sum(tl.load(pzt + idx, mask=mask, other=0.0), axis=1)
    sz = tl.sum(tl.load(psz + idx, mask=mask, other=0.0), axis=1)
    # first segment holding the maximum, as a left fold of the pairwise combine
    first = tl.min(tl.where(m == mm[:, None], segs[None, :], SP2), axis=1)
    amv = tl.load(pam + idx, mask=mask, other=0)
    am = tl.sum(tl.where(segs[None, :] == first[:, None], amv, 0), axis=1)
    am = tl.where(first == SP2, tl.sum(tl.where(segs[None, :] == 0, amv, 0), axis=1), am)
    tl.store(m_ptr + rows, mm, mask=rmask)
    tl.store(s_ptr + rows, s, mask=rmask)
    tl.store(zt_ptr + rows, zt, mask=rmask)
    tl.store(sz_ptr + rows, sz, mask=rmask)
    tl.store(am_ptr + rows, am, mask=rmask)
    if NEED_SEZ:
        sez = tl.sum(_rescale_sez(tl.load(psez + idx, mask=mask, other=0.0),
                                  tl.load(ps + idx, mask=mask, other=0.0), m, mm[:, None]),
                     axis=1)
        tl.store(sez_ptr + rows, sez, mask=rmask)


# ----------------------------------------------------------------------------- gradients


@triton.jit
def _grad_kernel(
    x_ptr, sxb, sxt, sxv, o_ptr, sob, sot, sov, T, V,
    tgt_ptr, ignore_index, vocab_start, w_ptr,
    m_ptr, s_ptr, g_ptr, cp_ptr, ct_ptr, ent_ptr,
    a_over_v, scale, inv_cap, softcap, rcap,
    BLOCK: tl.constexpr, SOFTCAP: tl.constexpr, SCALE: tl.constexpr, SMOOTH: tl.constexpr,
    HAS_W: tl.constexpr, ENTROPY: tl.constexpr, COL64X: tl.constexpr, COL64O: tl.constexpr,
):
    row = tl.program_id(0)
    blk = tl.program_id(1)
    g = tl.load(g_ptr + row)
    live = g != 0.0  # rows without upstream gradient (ignored) are not even read
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < V
    xb = _row_ptr(x_ptr, row, T, sxb, sxt)
    x = tl.load(xb + _col_off(cols, sxv, COL64X), mask=cols < tl.where(live, V, 0), other=0.0)
    z = _z_of(x, scale, inv_cap, softcap, SOFTCAP, SCALE)
    # p = exp(z - m) / s, the 1 / s folded into the row factor; rows without upstream
    # gradient read zeros and take m = 0, s = 1 (their dx is 0 whatever m and s hold)
    m = tl.where(live, tl.load(m_ptr + row), 0.0)
    rs = 1.0 / tl.where(live, tl.load(s_ptr + row), 1.0)
    zs = z - m
    e = tl.exp(zs)
    if ENTROPY:
        # sum_j p_j (z_j - m) = log s - H
        mean_zs = tl.where(live, -tl.log(rs) - tl.load(ent_ptr + row), 0.0)
        d = tl.where(e > 0.0, e * (zs - mean_zs), 0.0) * (-g * rs)
    else:
        d = e * (g * tl.load(cp_ptr + row) * rs)
        tv = tl.load(tgt_ptr + row).to(tl.int64)
        tloc = tv - vocab_start
        has = (tv != ignore_index) & (tloc >= 0) & (tloc < V)
        d = tl.where(has & (cols == tloc), d - g * tl.load(ct_ptr + row), d)
        if SMOOTH:
            if HAS_W:
                w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                d -= (g * a_over_v) * w
            else:
                d -= g * a_over_v
    d = _chain(d, z, scale, rcap, SOFTCAP, SCALE)
    d = tl.where(live, d, 0.0)
    ob = _row_ptr(o_ptr, row, T, sob, sot)
    tl.store(ob + _col_off(cols, sov, COL64O), _to_out(d, o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_kernel(
    b_ptr, sb, st, sv, T, V, N, f_ptr, P,
    BLOCK: tl.constexpr, PER_ROW: tl.constexpr, COL64: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    if PER_ROW:
        n_rows = N
    else:
        f0 = tl.load(f_ptr)
        # the factor is read here, on the device: a factor of 1 leaves every row alone
        n_rows = tl.where(f0 != 1.0, N, 0)
    for row in range(pid, n_rows, P):
        if PER_ROW:
            f = tl.load(f_ptr + row)
        else:
            f = f0
        end = tl.where(f != 1.0, V, 0)
        rb = _row_ptr(b_ptr, row, T, sb, st)
        for c0 in range(0, end, BLOCK):
            cols = c0 + offs
            mask = cols < V
            ptrs = rb + _col_off(cols, sv, COL64)
            v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(ptrs, _to_out(v * f, b_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class RowsConfig:
    """Launch parameters of fused_rows._fused_rows_kernel (two passes over a row, the second
    from L2).

    block: columns per chunk; num_warps: warps per program; per_sm: programs per SM (the
    grid is per_sm x SMs, persistent over rows); stages: tl.range software-pipelining depth;
    reverse: pass 2 walks the row backwards; hints: L2 eviction hints on loads and stores
    (1: evict_last / evict_first, 2: streaming stores, 3: stores to L2 only, .cg); prefetch:
    the next chunk's load is issued before the current chunk is reduced; persistent: (S = 1)
    a grid of per_sm x SMs programs looping over rows, else one program per row.
    """

    block: int
    num_warps: int
    per_sm: int
    stages: int = 1
    reverse: bool = True
    hints: int = 1
    prefetch: bool = False
    persistent: bool = True
    # the target column's gradient: in pass 2's vector (True) or one scalar store per row
    # after it (False: two FMAs, a compare and a select less per element)
    tvec: bool = True
    # segments per row, each taken by one of ``split`` cooperating programs that exchange
    # their statistics (fused_rows, SPLIT; with a gradient, not vocabulary parallel): the
    # rows in flight, and so the L2 footprint of the second read, shrink split-fold
    split: int = 1
    # (PEER / SPLIT) pass 2's first chunk loaded while the other parts' records are awaited
    early: bool = True
    # (an override) vocabulary parallel with the in-kernel exchange (PEER), shard rows are
    # split in ``split`` parts too (the table decides by width: _peer_config)
    peer_split: bool = False
    # (persistent, one program per row at a time, not resident) the fewest programs that
    # need as many rounds over the rows as per_sm x SMs programs would (_balanced)
    balance: bool = False


# At most 8 cooperating programs per row (SPLIT), in the table and at launch: the poll of
# the group's records is one [parts, 8] tile (fused_rows._fold_group), which stays small.
# (Runs 42-43 found wrong rows with 8 parts; runs 46-47 traced them to the tile's copies in
# different warps and fixed them; notes/KERNELS.md.)
MAX_SPLIT = 8


@dataclass(frozen=True)
class StatsConfig:
    """Launch parameters of _stats_kernel: BLOCK columns per chunk, warps, prefetch."""

    block: int
    num_warps: int
    prefetch: bool = False


# Fixed tables (measured on an H200, see notes/KERNELS.md); only an explicit override changes
# them (benchmarks use it), nothing autotunes behind the caller's back.
_OVERRIDE: dict = {}


def set_override(**kw) -> None:
    """Override table entries: fused=RowsConfig, stats=StatsConfig, grad_block=int (or None)."""
    for k, v in kw.items():
        if v is None:
            _OVERRIDE.pop(k, None)
        else:
            _OVERRIDE[k] = v


def fused_config(V: int, elem_size: int, in_place: bool = False) -> RowsConfig:
    """Table of the fused kernel's parameters by row bytes (V x element size), measured on an
    H200 (notes/KERNELS.md, run 5): rows up to 96 KB take 4 programs of 8 warps per SM, 16 KB
    chunks prefetched, so that the rows in flight (4 x 132 x 64 KB at V = 32000 in bf16) stay
    in L2 for the second read; longer rows take 2 programs of 16 warps per SM with pass 2
    walking backwards, which keeps the most recently read part of each row in L2. The target
    column is written by a scalar store after pass 2 (run 21: 1.28x -> 1.24x at V = 32000,
    1.37x -> 1.36x / 1.43x -> 1.42x at 128256 / 262144). Rows over 384 KB are cut into
    segments of 128 KB (at most MAX_SPLIT of them), each taken by one of a group of cooperating
    programs (SPLIT; runs 28-31: 1.33-1.38x vs 1.42x at V = 262144; the exchange costs ~3 us a
    row). Rows of 192-256 KB are cut into 4 segments taken as short rows are, 4 programs of 8
    warps per SM (run 47); vocabulary-parallel shards of that common width are split in two
    16-warp parts, which exchange records through the ranks' buffers (_peer_config; runs
    48-51), other shards and statistics-only calls never split (_rows_grid). Run 55: short
    rows walk pass 2 backwards too (the first chunks it reads are still in L1: 1.25x ->
    1.22x at 32000, 1.35x -> 1.29x at 49152, in place); ``in_place`` (the gradient written
    over the logits) rows over 384 KB walk backwards and store around L1 (.cg), which the
    new-buffer call does not gain from (in place 1.34x -> 1.32x at 262144); in place, rows up
    to 96 KB take a balanced grid (_balanced; run 66)."""
    if "fused" in _OVERRIDE:
        return _OVERRIDE["fused"]
    if INTERPRET:
        # small chunks: several per row, so the chunk loops, prefetch and tails are exercised
        return RowsConfig(block=64, num_warps=1, per_sm=1, prefetch=True, tvec=False)
    per_chunk = 8192 // elem_size  # 8 KB of columns per 8 warps
    if V * elem_size <= 96 * 1024:
        return RowsConfig(block=per_chunk, num_warps=8, per_sm=4, prefetch=True, reverse=True,
                          tvec=False, balance=in_place)
    if 192 * 1024 < V * elem_size <= 256 * 1024:
        # 4 segments of <= 64 KB, each taken as a short row is (run 47: 1.30x vs 1.34x at
        # 128256 in bf16, 1.40x vs 1.50x at 100000; 151936 (297 KB) and 65536 gain nothing)
        return RowsConfig(block=per_chunk, num_warps=8, per_sm=4, prefetch=True, reverse=False,
                          tvec=False, split=4)
    if V * elem_size <= 384 * 1024:
        return _long_rows(elem_size)
    return RowsConfig(block=2 * per_chunk, num_warps=16, per_sm=2, prefetch=True,
                      reverse=in_place, hints=3 if in_place else 1, tvec=False,
                      split=min(MAX_SPLIT, -(-V * elem_size // (128 * 1024))))


def _peer_config(vocab_size: int, world: int, elem_size: int) -> Optional[RowsConfig]:
    """The configuration of a vocabulary-parallel call with the in-kernel exchange whose
    shard rows are split (every rank the same: chosen from the common shard width
    ceil(V / world)), or None: where that width is 192-256 KB (where fused_config splits
    unsharded rows), 2 parts of 16-warp programs, 2 per SM (run 51, TP = 2 at V = 262144:
    1.35x in place, against 1.38x with the unsharded entry's 4 parts of 8 warps and 1.39x
    unsplit); an override marked peer_split is taken as it is. world x parts <= 16 (the
    poll's tile)."""
    if "fused" in _OVERRIDE:
        cfg = _OVERRIDE["fused"]
        if not (cfg.split > 1 and cfg.peer_split):
            return None
        cfg = replace(cfg, split=min(cfg.split, MAX_SPLIT))
    elif 192 * 1024 < -(-int(vocab_size) // max(1, int(world))) * elem_size <= 256 * 1024:
        cfg = replace(_long_rows(elem_size), reverse=False, split=2, peer_split=True)
    else:
        return None
    return cfg if world * cfg.split <= 16 else None


def peer_parts(vocab_size: int, world: int, elem_size: int) -> int:
    """Parts per shard row of a vocabulary-parallel call with the in-kernel exchange (the
    same on every rank; see _peer_config): the records per rank its exchange buffer holds."""
    cfg = _peer_config(vocab_size, world, elem_size)
    return 1 if cfg is None else cfg.split


def _long_rows(elem_size: int) -> RowsConfig:
    """The table's entry for long rows without cooperating programs: 16 KB chunks, 2 programs
    of 16 warps per SM, pass 2 backwards (also what vocabulary-parallel shards take)."""
    return RowsConfig(block=2 * (8192 // elem_size), num_warps=16, per_sm=2, prefetch=True,
                      reverse=True, tvec=False)


def stats_config(V: int, elem_size: int) -> StatsConfig:
    """Table of the statistics kernel's parameters: 4096-column chunks (16 KB / 8 KB), 8
    warps, next chunk prefetched; within 1% of the best of the sweep in notes/KERNELS.md."""
    if "stats" in _OVERRIDE:
        return _OVERRIDE["stats"]
    block = min(4096, _pow2(max(V, 16)))
    return StatsConfig(block=block, num_warps=max(1, min(8, block // 512)), prefetch=True)


def _grad_block(V: int, elem_size: int) -> int:
    b = _OVERRIDE.get("grad_block") or (4096 if elem_size <= 2 else 2048)
    return min(b, _pow2(max(V, 16)))


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _cdiv(a: int, b: int) -> int:
    # triton.cdiv / next_power_of_2 are constexpr functions in Triton >= 3.4, a few us of
    # host time per call on the launch path
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length() if n > 1 else 1


def _maxnreg(num_warps: int, per_sm: int) -> int:
    # 64K registers per SM shared by per_sm programs of num_warps * 32 threads, in units of 8
    r = 65536 // (per_sm * num_warps * 32)
    return max(24, min(255, (r // 8) * 8))


def _is_traced(*ts) -> bool:
    """True for fake / functional tensors (torch.compile tracing, meta kernels)."""
    if all(t is None or type(t) is torch.Tensor for t in ts):  # eager: the common case
        return False
    from torch._subclasses.fake_tensor import is_fake

    return any(isinstance(t, torch.Tensor) and is_fake(t) for t in ts)


try:  # torch >= 2.6
    from torch._library.triton import is_wrap_triton_enabled as _wrap_on
except ImportError:  # pragma: no cover - older torch
    _wrap_on = None
# FUSEDCE_FAST_LAUNCH=0: every eager launch through JITFunction.run (see triton/launch.py)
_FAST = os.environ.get("FUSEDCE_FAST_LAUNCH", "1").strip().lower() not in ("0", "false", "no")


def _launcher(kernel):
    """The kernel as torch.compile can capture it (wrap_triton); in eager calls that switched
    wrap_triton off (fusedce.triton.backend._call) its cached compiled variants launched
    directly (fusedce.triton.launch); itself in the interpreter."""
    if INTERPRET:
        return kernel
    if _FAST and (OPAQUE or (_wrap_on is not None and not _wrap_on())):
        # (opaque ops never trace their kernels: _skip stops them on fake tensors)
        from .launch import fast

        return fast(kernel)
    if OPAQUE:
        return kernel
    return torch.library.wrap_triton(kernel)


def _dims3(x: torch.Tensor):
    """(B, T, V) of the kernels' row layout of x: [B, T, V], or [T, V] as B = 1 (the backend
    hands 2-D tensors to the ops where it can: see fusedce.triton.backend._k)."""
    if x.dim() == 2:
        return 1, x.shape[0], x.shape[1]
    return x.shape[0], x.shape[1], x.shape[2]


def _strides3(x: torch.Tensor):
    """(stride_b, stride_t, stride_v) of x in the same layout; a 2-D x has stride_b = 0 (never
    used: B = 1), a multiple of 16 like the strides it stands for, so that Triton's
    alignment specialisation of the row addresses is the same as for the 3-D view."""
    if x.dim() == 2:
        return 0, x.stride(0), x.stride(1)
    return x.stride(0), x.stride(1), x.stride(2)


def _placeholder(t: torch.Tensor, traced: bool) -> torch.Tensor:
    """A tensor for a pointer the kernel does not use: ``t`` itself in eager calls (no
    allocation); while torch.compile traces, a fresh one-element tensor. Functionalisation
    clones each argument it takes to be mutated on its own and copies every clone back, so an
    output also passed as a placeholder could come back with the placeholder's (unwritten)
    clone if Triton's mutation analysis fell back to "every argument is mutated"
    (pytorch/pytorch#196657)."""
    return t.new_empty(1) if traced else t


def _col64(V: int, sv: int) -> bool:
    return (V - 1) * abs(sv) >= 2**31 - 1


def _opts_flags(logit_scale: float, softcap: Optional[float]):
    has_cap = softcap is not None
    cap = float(softcap) if has_cap else 1.0
    return dict(scale=float(logit_scale), inv_cap=float(logit_scale) / cap, softcap=cap,
                rcap=1.0 / cap, SOFTCAP=has_cap, SCALE=(not has_cap) and logit_scale != 1.0)


# ----------------------------------------------------------------------------- ops
# Each op is the launcher, registered as an opaque custom op (torch.library.custom_op) by
# default: compiled graphs call fusedce's own launches (fast launcher, register caps), and
# tracing with fake tensors must not launch: _skip() says so. FUSEDCE_COMPILE_OPS=triton_op
# (GPUs only; read at import) registers them with torch.library.triton_op instead, so that
# Inductor sees and launches the Triton kernels itself. That form is wrong with torch 2.11
# where V is not a multiple of 64 (run 40, notes/KERNELS.md): Inductor pads the row stride of
# the saved gradient buffer, and the functional clone of a mutated view reads the padded
# storage as if it were contiguous, so the backward scales the wrong elements.
def _opaque_ops(setting: Optional[str], interpret: bool) -> bool:
    """Whether the ops are registered as opaque custom ops: always in the interpreter, else
    unless FUSEDCE_COMPILE_OPS is "triton_op" (unset or anything else: opaque)."""
    return interpret or (setting or "opaque").strip().lower() != "triton_op"


OPAQUE = _opaque_ops(os.environ.get("FUSEDCE_COMPILE_OPS"), INTERPRET)


def _skip(*ts) -> bool:
    return OPAQUE and _is_traced(*ts)


# the undecorated launchers, for eager calls (see fusedce.triton.backend._call)
RAW: dict = {}


def _op(name: str, mutates_args):
    """Register ``fn`` as the op ``name``: an opaque custom_op with ``fn`` itself as the fake
    implementation (it launches nothing on fake tensors), or with FUSEDCE_COMPILE_OPS=triton_op
    on GPUs a triton_op (torch.compile traces into its kernels)."""

    def dec(fn):
        RAW[name.split("::")[1]] = fn
        if OPAQUE:
            op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
            op.register_fake(fn)
            return op
        return torch.library.triton_op(name, mutates_args=mutates_args)(fn)

    return dec


@_op("fusedce::tr_row_stats", mutates_args=())
def tr_row_stats(
    x3: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], vocab_start: int,
    ignore_index: int, logit_scale: float, softcap: Optional[float], need_sz: bool,
    need_sez: bool, need_am: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Statistics (m, s, zt, sz, am, sez) of every row of x3 [B, T, V_local] (sez empty
    unless need_sez; am = -1 unless need_am); target [B*T] global ids; weight [V_local] fp32
    or None."""
    B, T, V = _dims3(x3)
    n = B * T
    dev = x3.device
    f32 = torch.float32
    outs = [torch.empty(n, device=dev, dtype=f32) for _ in range(4)]
    am = torch.empty(n, device=dev, dtype=torch.int64)
    sez = torch.empty(n if need_sez else 0, device=dev, dtype=f32)
    if n == 0 or _skip(x3):
        return outs[0], outs[1], outs[2], outs[3], am, sez
    cfg = stats_config(V, x3.element_size())
    n_blocks = _cdiv(V, cfg.block)
    # enough programs to fill the device: split rows into segments only when rows are few
    want = 8 * _sm_count(dev)
    S = max(1, min(n_blocks, _cdiv(want, n)))
    seg_len = _cdiv(n_blocks, S) * cfg.block
    S = _cdiv(V, seg_len)
    if S == 1:
        dst = outs + [am, sez]
    else:
        dst = [torch.empty(n * S, device=dev, dtype=f32) for _ in range(4)]
        dst += [torch.empty(n * S, device=dev, dtype=torch.int64),
                torch.empty(n * S if need_sez else 0, device=dev, dtype=f32)]
    fl = _opts_flags(logit_scale, softcap)
    traced = not INTERPRET and _is_traced(x3)
    w = weight if weight is not None else _placeholder(outs[0], traced)
    r = max(1, 16 // x3.element_size())
    _launcher(_stats_kernel)[(n * S,)](
        x3, *_strides3(x3), T, V, S, seg_len,
        target, ignore_index, vocab_start, w,
        fl["scale"], fl["inv_cap"], fl["softcap"],
        dst[0], dst[1], dst[2], dst[3], dst[4],
        dst[5] if need_sez else _placeholder(outs[0], traced),
        BLOCK=max(cfg.block, r), R=r, SOFTCAP=fl["SOFTCAP"], SCALE=fl["SCALE"],
        NEED_SZ=need_sz, HAS_W=weight is not None, NEED_SEZ=need_sez, NEED_AM=need_am,
        COL64=_col64(V, x3.stride(-1)), PREFETCH=cfg.prefetch, FAST=not INTERPRET,
        num_warps=cfg.num_warps,
    )
    if S > 1:
        rows = 64
        sp2 = _pow2(S)
        _launcher(_fold_kernel)[(_cdiv(n, rows),)](
            dst[0], dst[1], dst[2], dst[3], dst[4],
            dst[5] if need_sez else _placeholder(dst[0], traced),
            outs[0], outs[1], outs[2], outs[3], am,
            sez if need_sez else _placeholder(outs[0], traced),
            n, S, ROWS=rows, SP2=sp2, NEED_SEZ=need_sez, num_warps=4,
        )
    return outs[0], outs[1], outs[2], outs[3], am, sez


def _launch_grad(x3, out, target, weight, m, s, g, cp, ct, ent, vocab_start, ignore_index,
                 a_over_v, logit_scale, softcap, smooth, entropy):
    B, T, V = _dims3(x3)
    n = B * T
    if n == 0 or V == 0:
        return
    block = _grad_block(V, x3.element_size())
    fl = _opts_flags(logit_scale, softcap)
    dummy = m
    _launcher(_grad_kernel)[(n, _cdiv(V, block))](
        x3, *_strides3(x3),
        out, *_strides3(out), T, V,
        target if target is not None else dummy, ignore_index, vocab_start,
        weight if weight is not None else dummy,
        m, s, g, cp if cp is not None else dummy, ct if ct is not None else dummy,
        ent if ent is not None else dummy,
        a_over_v, fl["scale"], fl["inv_cap"], fl["softcap"], fl["rcap"],
        BLOCK=block, SOFTCAP=fl["SOFTCAP"], SCALE=fl["SCALE"], SMOOTH=smooth,
        HAS_W=weight is not None, ENTROPY=entropy, COL64X=_col64(V, x3.stride(-1)),
        COL64O=_col64(V, out.stride(-1)), num_warps=max(1, min(8, block // 512)),
    )


@_op("fusedce::tr_grad", mutates_args=("out",))
def tr_grad(
    x3: torch.Tensor, target: torch.Tensor, m: torch.Tensor, s: torch.Tensor, g: torch.Tensor,
    c_p: torch.Tensor, c_t: torch.Tensor, out: torch.Tensor, weight: Optional[torch.Tensor],
    vocab_start: int, vocab_size: int, ignore_index: int, label_smoothing: float,
    logit_scale: float, softcap: Optional[float],
) -> None:
    """out [B, T, V_local] = dx of the CE spec for per-row m, s (the whole row's maximum and
    sum of exp(z - m)), g, c_p, c_t ([B*T] fp32). ``out`` may be ``x3`` itself."""
    if _skip(x3, out):
        return
    _launch_grad(x3, out, target, weight, m, s, g, c_p, c_t, None, vocab_start, ignore_index,
                 label_smoothing / vocab_size, logit_scale, softcap, label_smoothing > 0.0,
                 False)


@_op("fusedce::tr_entropy_grad", mutates_args=("out",))
def tr_entropy_grad(
    x3: torch.Tensor, m: torch.Tensor, s: torch.Tensor, ent: torch.Tensor, g: torch.Tensor,
    out: torch.Tensor, logit_scale: float, softcap: Optional[float],
) -> None:
    """out [B, T, V] = dH/dx * g for per-row m, s, H, g ([B*T] fp32); ``out`` may be ``x3``."""
    if _skip(x3, out):
        return
    _launch_grad(x3, out, None, None, m, s, g, None, None, ent, 0, -100, 0.0, logit_scale,
                 softcap, False, True)


@_op("fusedce::tr_fused", mutates_args=("out",))
def tr_fused(
    x3: torch.Tensor, target: torch.Tensor, g0: torch.Tensor, w_t: torch.Tensor,
    weight: Optional[torch.Tensor], w_total: Optional[torch.Tensor], out: torch.Tensor,
    ignore_index: int, vocab_size: int, label_smoothing: float, z_loss: float,
    logit_scale: float, softcap: Optional[float], need_am: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Statistics (m, s, zt, sz, am) of every row of x3 [B, T, V] and, in the same pass,
    out = dx for the upstream row gradient g0 [B*T]; w_t [B*T] target weights; weight [V]
    fp32 class weights and w_total (0-d, their sum) or None. ``out`` may be ``x3``; am = -1
    unless need_am."""
    B, T, V = _dims3(x3)
    n = B * T
    dev = x3.device
    f32 = torch.float32
    m, s, zt, sz = (torch.empty(n, device=dev, dtype=f32) for _ in range(4))
    am = torch.empty(n, device=dev, dtype=torch.int64)
    if n == 0 or _skip(x3, out):
        return m, s, zt, sz, am
    cfg, P, maxnreg = _rows_grid(x3, out, softcap, weight, True)
    from . import fused_rows  # it imports this module's jit helpers

    fused_rows.launch(
        x3, out, target, g0, w_t, weight, w_total, m, s, zt, sz, am, programs=P,
        block=min(cfg.block, _pow2(max(V, 16))), num_warps=cfg.num_warps,
        stages=cfg.stages, reverse=cfg.reverse, hints=cfg.hints, prefetch=cfg.prefetch,
        maxnreg=maxnreg, ignore_index=ignore_index, vocab_size=vocab_size,
        label_smoothing=label_smoothing, z_loss=z_loss, flags=_opts_flags(logit_scale, softcap),
        need_am=need_am, col64x=_col64(V, x3.stride(-1)), col64o=_col64(V, out.stride(-1)),
        fast=not INTERPRET, launcher=_launcher, tvec=cfg.tvec, split=cfg.split,
        early=cfg.early, traced=not INTERPRET and _is_traced(x3, out))
    return m, s, zt, sz, am


def _rows_grid(x3: torch.Tensor, out: torch.Tensor, softcap, weight, need_grad: bool,
               resident: bool = False, splittable: bool = True,
               traced: Optional[bool] = None, peer_cfg: Optional[RowsConfig] = None):
    """(config, programs, maxnreg) of the fused rows kernel for this call; ``resident``: a
    persistent grid whose programs are all resident at once (they wait on other ranks');
    ``splittable``: SPLIT mode is possible (not vocabulary parallel); ``traced``: the
    caller's _is_traced(x3, out), if it has it (one check per call on the hot path);
    ``peer_cfg``: (PEER with a gradient) the split configuration every rank takes
    (_peer_config), or None."""
    B, T, V = _dims3(x3)
    n = B * T
    if traced is None:
        traced = _is_traced(x3, out)
    cfg = fused_config(V, x3.element_size(),
                       in_place=need_grad and not traced and out.data_ptr() == x3.data_ptr())
    if peer_cfg is not None and need_grad:
        # PEER with split shard rows: the configuration every rank takes
        cfg = peer_cfg
    elif cfg.split > 1 and (resident or not splittable or not need_grad):
        # the long-row entry without cooperating programs (an override only loses its parts)
        cfg = (replace(cfg, split=1, reverse=True) if "fused" in _OVERRIDE or INTERPRET
               else _long_rows(x3.element_size()))
    if resident:
        cfg = replace(cfg, persistent=True)
    elif not need_grad and not INTERPRET and "fused" not in _OVERRIDE:
        # statistics only: no second read, so no L2 budget; one program per row and no
        # register cap lets the hardware keep as many resident as fit (the statistics
        # kernel's setting, 0.95-1.02x of the 2-byte floor)
        cfg = RowsConfig(block=8192 // x3.element_size(), num_warps=8, per_sm=1, prefetch=1,
                         persistent=False)
    if softcap is not None or weight is not None:
        # more live values per element (z for the softcap chain, class weights): give each
        # program twice the registers rather than spill
        cfg = replace(cfg, per_sm=max(1, cfg.per_sm // 2))
    if cfg.split > 1:
        # the cooperating programs: the launcher takes min(rows, P / split) groups of split
        P = 3 * cfg.split if INTERPRET else cfg.per_sm * _sm_count(x3.device)
    elif INTERPRET:
        P = min(n, 3)
    elif not cfg.persistent:
        P = n
    else:
        P = min(n, cfg.per_sm * _sm_count(x3.device))
        if cfg.balance and not resident:
            P = _balanced(n, P)
    maxnreg = None
    if cfg.persistent and not INTERPRET and not traced:
        # under torch.compile the launch carries no register cap (it is only a hint for
        # occupancy: programs that wait on others take their places from a ticket)
        maxnreg = _maxnreg(cfg.num_warps, cfg.per_sm)
    return cfg, P, maxnreg


def _balanced(n: int, slots: int) -> int:
    """The fewest programs that take ``n`` rows round-robin in as many rounds as ``slots``
    programs would: N = 16384 rows on 4 x 132 slots -> 512 programs of 32 rows, where 528
    leave 512 of them idle through the 32nd round (run 66: in place 1.224x -> 1.207-1.210x
    at V = 32000, 1.264x -> 1.258-1.261x at N = 8192; into a new buffer it lost 0.01-0.02x,
    so the table asks for it in place only)."""
    if n <= 0 or slots <= 0:
        return max(slots, 0)
    return _cdiv(n, _cdiv(n, slots))


def _fused_loss(x3, target, weight, w_total, den, out, ignore_index, vocab_size,
                label_smoothing, z_loss, logit_scale, softcap, need_grad, need_am, scale_mode,
                gathered=None, vocab_start=0, peer=None):
    B, T, V = _dims3(x3)
    n = B * T
    dev = x3.device
    f32 = torch.float32
    loss = torch.empty(n, device=dev, dtype=f32)
    lse = torch.empty(n, device=dev, dtype=f32)
    zp = torch.empty(n if z_loss > 0.0 else 0, device=dev, dtype=f32)
    am = torch.empty(n if need_am else 0, device=dev, dtype=torch.int64)
    if n == 0 or _skip(x3, out):
        return loss, lse, zp, am
    traced = not INTERPRET and _is_traced(x3, out)
    pc = (_peer_config(vocab_size, peer[3], x3.element_size())
          if peer is not None and need_grad else None)
    cfg, P, maxnreg = _rows_grid(x3, out, softcap, weight, need_grad, peer is not None,
                                 gathered is None and peer is None, traced=traced,
                                 peer_cfg=pc)
    from . import fused_rows

    w_local = None if weight is None else weight[vocab_start:vocab_start + V]
    fused_rows.launch(
        x3, out, target, None, None, w_local, w_total, None, None, None, None,
        am if need_am else _placeholder(lse, traced), programs=P,
        block=min(cfg.block, _pow2(max(V, 16))), num_warps=cfg.num_warps,
        stages=cfg.stages, reverse=cfg.reverse, hints=cfg.hints, prefetch=cfg.prefetch,
        maxnreg=maxnreg, ignore_index=ignore_index, vocab_size=vocab_size,
        label_smoothing=label_smoothing, z_loss=z_loss, flags=_opts_flags(logit_scale, softcap),
        need_am=need_am, col64x=_col64(V, x3.stride(-1)), col64o=_col64(V, out.stride(-1)),
        fast=not INTERPRET, launcher=_launcher,
        row_out=(loss, lse, zp if z_loss > 0.0 else _placeholder(lse, traced)),
        need_grad=need_grad,
        scale_mode=scale_mode, den=den, gathered=gathered, vocab_start=vocab_start,
        traced=traced,
        weight_global=weight, peer=peer, tvec=cfg.tvec,
        split=cfg.split, early=cfg.early)
    return loss, lse, zp, am


@_op("fusedce::tr_fused_loss", mutates_args=("out",))
def tr_fused_loss(
    x3: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
    w_total: Optional[torch.Tensor], den: Optional[torch.Tensor], out: torch.Tensor,
    ignore_index: int, vocab_size: int, label_smoothing: float, z_loss: float,
    logit_scale: float, softcap: Optional[float], need_am: bool, scale_mode: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CE loss of every row of x3 [B, T, V] and, in the same pass, out = its gradient.

    Returns (loss, lse, zpart, am), [B*T] fp32 (zpart empty unless z_loss > 0, am int64
    empty unless need_am); loss and zpart are multiplied by the reduction factor c, and out
    holds c * dloss_row/dx: c = 1 (scale_mode 0), 1 / den if den != 0 else 0 (1, den the 0-d
    "mean" denominator), or den itself (2, a normalizer's reciprocal). weight [V] fp32 class
    weights with w_total (0-d, their sum), or None. ``out`` may be ``x3``."""
    return _fused_loss(x3, target, weight, w_total, den, out, ignore_index, vocab_size,
                       label_smoothing, z_loss, logit_scale, softcap, True, need_am,
                       scale_mode)


@_op("fusedce::tr_loss_rows", mutates_args=())
def tr_loss_rows(
    x3: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
    w_total: Optional[torch.Tensor], den: Optional[torch.Tensor], ignore_index: int,
    vocab_size: int, label_smoothing: float, z_loss: float, logit_scale: float,
    softcap: Optional[float], need_am: bool, scale_mode: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """tr_fused_loss without the gradient (one read of the logits)."""
    return _fused_loss(x3, target, weight, w_total, den, x3, ignore_index, vocab_size,
                       label_smoothing, z_loss, logit_scale, softcap, False, need_am,
                       scale_mode)


@_op("fusedce::tr_fused_loss_tp", mutates_args=("out",))
def tr_fused_loss_tp(
    x3: torch.Tensor, target: torch.Tensor, gathered: torch.Tensor, weight: Optional[torch.Tensor],
    w_total: Optional[torch.Tensor], den: Optional[torch.Tensor], out: torch.Tensor,
    vocab_start: int, ignore_index: int, vocab_size: int, label_smoothing: float,
    z_loss: float, logit_scale: float, softcap: Optional[float], need_am: bool,
    scale_mode: int, need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """tr_fused_loss for a vocabulary shard x3 [B, T, V_local] (columns [vocab_start,
    vocab_start + V_local) of a vocab_size vocabulary) from the all-gathered shard
    statistics ``gathered`` [W, NF, B*T] (m, s, z_t, argmax bits, sz): the whole-vocabulary
    loss rows, lse, z-loss parts and argmax, and (need_grad) this shard's gradient in
    ``out``. weight: the whole class-weight vector [vocab_size] or None."""
    return _fused_loss(x3, target, weight, w_total, den, out, ignore_index, vocab_size,
                       label_smoothing, z_loss, logit_scale, softcap, need_grad, need_am,
                       scale_mode, gathered=gathered, vocab_start=vocab_start)


def tr_fused_loss_peer(
    x3: torch.Tensor, target: torch.Tensor, xch: torch.Tensor, peers: torch.Tensor, rank: int,
    world: int, epoch: int, weight: Optional[torch.Tensor], w_total: Optional[torch.Tensor],
    den: Optional[torch.Tensor], out: torch.Tensor, vocab_start: int, ignore_index: int,
    vocab_size: int, label_smoothing: float, z_loss: float, logit_scale: float,
    softcap: Optional[float], need_am: bool, scale_mode: int, need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """tr_fused_loss_tp with the shard statistics exchanged inside the kernel, row by row,
    through symmetric memory instead of gathered before it: ``xch`` is this rank's int64
    exchange buffer [2, world x parts, >= B*T, 8] (parts: peer_parts, where shard rows are
    cut into parts; else 1), ``peers`` the int64 addresses of the ``world``
    ranks' buffers (rank order), ``epoch`` this call's number (1 <= epoch < 2**31, the same
    on every rank, consecutive calls alternating in parity). Every rank of the group must
    make the same call at the same time: the kernel waits for the others' rows. Eager only
    (not registered with torch.library: the epoch changes with every call)."""
    if xch.shape[2] < _dims3(x3)[0] * _dims3(x3)[1]:
        raise ValueError("exchange buffer too small for the rows")
    return _fused_loss(x3, target, weight, w_total, den, out, ignore_index, vocab_size,
                       label_smoothing, z_loss, logit_scale, softcap, need_grad, need_am,
                       scale_mode, vocab_start=vocab_start,
                       peer=(xch, peers, int(rank), int(world), int(epoch)))


RAW["tr_fused_loss_peer"] = tr_fused_loss_peer


def _launch_scale(buf3: torch.Tensor, factor: torch.Tensor, per_row: bool) -> None:
    B, T, V = _dims3(buf3)
    n = B * T
    if n == 0 or V == 0:
        return
    block = min(4096, _pow2(max(V, 16)))
    P = min(n, 8 * _sm_count(buf3.device)) if not INTERPRET else min(n, 3)
    _launcher(_scale_kernel)[(P,)](
        buf3, *_strides3(buf3), T, V, n, factor, P,
        BLOCK=block, PER_ROW=per_row, COL64=_col64(V, buf3.stride(-1)),
        num_warps=max(1, min(8, block // 512)),
    )


@_op("fusedce::tr_scale_", mutates_args=("buf3",))
def tr_scale_(buf3: torch.Tensor, factor: torch.Tensor) -> None:
    """buf3 [B, T, V] *= factor (0-d fp32, read on the device; 1 touches no memory)."""
    if _skip(buf3):
        return
    _launch_scale(buf3, factor, False)


@_op("fusedce::tr_scale_rows_", mutates_args=("buf3",))
def tr_scale_rows_(buf3: torch.Tensor, factor: torch.Tensor) -> None:
    """buf3[b, t, :] *= factor[b * T + t] (fp32 [B*T]); rows whose factor is 1 are skipped."""
    if _skip(buf3):
        return
    _launch_scale(buf3, factor, True)


__all__ = [
    "RowsConfig", "StatsConfig", "fused_config", "stats_config", "set_override",
    "tr_row_stats", "tr_grad", "tr_entropy_grad", "tr_fused", "tr_fused_loss", "tr_loss_rows",
    "tr_fused_loss_tp", "tr_fused_loss_peer",
    "tr_scale_", "tr_scale_rows_",
]
