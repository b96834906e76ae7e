"""Fused forward + gradient of cross-entropy on one device: the kernels, their launchers and
the ops tr_fused_loss, tr_loss_rows (loss rows out) and tr_fused (row statistics out).

Math (see :mod:`fusedce.spec` and :mod:`fusedce.triton.common`). Per row with target t,
upstream row gradient g, target weight w_t, class weights w (sum W), smoothing a, z-loss zl:

    pass 1 (DRAM):  m = max_j z_j, s = sum_j exp(z_j - m), z_t, sz = sum_j w_j z_j, argmax
                    lse = m + log s,  nll = (m - z_t) + log s
    pass 2 (L2):    dx_j = g (p_j c_p - c_t [j = t] - (a / V) w_j) dz_j/dx_j,
                    p_j = exp(z_j - m) / s,  c_t = (1 - a) w_t,  c_p = c_t + (a / V) W + 2 zl lse

Why two passes in one program: the gradient needs the whole row's lse before its first
element can be written, so a single-read kernel must hold the row (registers, or partials
exchanged between cooperating programs, which then wait on each other). Here a program
streams its row twice instead: the first read comes from DRAM, the second from L2, where the
row still is if the rows in flight (programs x row bytes) fit in L2. DRAM then sees one read
and one write per element (the 4-byte floor in bf16). Pass 2 can walk the row backwards
(REVERSE), so that its first chunks are the ones read last and the reuse distance shrinks
for long rows; loads of pass 1 ask L2 to keep the lines (evict_last), pass 2's loads and
stores ask it to drop them first (evict_first; CG: stores to L2 only).

A chunk is a [BLOCK / R, R] tile whose R contiguous columns sit in one thread (16-byte
loads), so pass 1 keeps per-thread running statistics with in-thread reductions and folds
the threads once per row (common._fold_threads), as the statistics kernel does.

The target column's gradient, gct (p_t - 1) + p_t crest with gct = g c_t and crest = g (c_p -
c_t) (cancellation-free: exactly 0 at V = 1), is stored once per row after pass 2 and a
barrier, from z_t read before pass 2 (in place, the column is overwritten by then); pass 2
writes p c_p there like everywhere else.

Rows too long for their second read to stay in L2 are cut into SPLIT segments, each taken by
one program of a group of SPLIT that exchange their segments' statistics (records, folded by
_fold_group) in one zeroed buffer per call: the rows in flight shrink SPLIT-fold, at the
price of ~3 us of exchange per row. The vocabulary-parallel kernels (fused_tp.py) reuse the
row passes and the records.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import configs, launch
from .common import (_LOG2E, _NO_AM, _chunk_stats, _col_off, _exp2, _fold,
                     _fold_threads, _row_ptr, _to_out, _z_of, scalars, transform_flags)

# ----------------------------------------------------------------------------- row passes


@triton.jit
def _load1(xb, cols, sxv, V, COL64: tl.constexpr):
    # pass 1: masked lanes read as -inf (they add nothing to max and sum)
    return tl.load(xb + _col_off(cols, sxv, COL64), mask=cols < V, other=float("-inf"),
                   eviction_policy="evict_last")


@triton.jit
def _load2(xb, cols, sxv, vend, COL64: tl.constexpr):
    # pass 2: vend is 0 for rows without upstream gradient (written as zeros, never read)
    return tl.load(xb + _col_off(cols, sxv, COL64), mask=cols < vend, other=0.0,
                   eviction_policy="evict_first")


@triton.jit
def _pass1(xb, cend, offs, lane, w_ptr, sxv, scale, inv_cap, softcap,
           BLOCK: tl.constexpr, R: tl.constexpr, SOFTCAP: tl.constexpr, SCALE: tl.constexpr,
           SMOOTH: tl.constexpr, HAS_W: tl.constexpr, NEED_AM: tl.constexpr,
           COL64X: tl.constexpr):
    """Statistics of columns [0, cend) of one row: (m, s, sum w z, first argmax), the next
    chunk loaded before the current one is reduced."""
    NT: tl.constexpr = BLOCK // R
    m = tl.full([NT], float("-inf"), tl.float32)
    s = tl.zeros([NT], tl.float32)
    sz = tl.zeros([NT], tl.float32)
    am = tl.zeros([NT], tl.int32)
    xn = _load1(xb, offs, sxv, cend, COL64X)
    # num_stages=1: no software pipelining (the prefetch above is the pipeline)
    for b0 in tl.range(0, cend, BLOCK, num_stages=1):
        b0 = tl.multiple_of(b0, BLOCK)
        cols = b0 + offs
        x = xn
        xn = _load1(xb, cols + BLOCK, sxv, cend, COL64X)
        z, m, s, sz, am, e, alpha = _chunk_stats(
            x, cols, cend, b0, lane, m, s, sz, am, w_ptr, scale, inv_cap, softcap, R, SOFTCAP,
            SCALE, SMOOTH, HAS_W, NEED_AM)
    return _fold_threads(m, s, sz, am, lane, NEED_AM)


@triton.jit
def _pass2(xb, ob, cend, vend, offs, w_ptr, sxv, sov, msh, coef, gsm, scale, inv_cap,
           softcap, rcap, x0,
           BLOCK: tl.constexpr, REVERSE: tl.constexpr, CG: tl.constexpr,
           SOFTCAP: tl.constexpr, SCALE: tl.constexpr, SMOOTH: tl.constexpr,
           HAS_W: tl.constexpr, COL64X: tl.constexpr, COL64O: tl.constexpr,
           HAS_X0: tl.constexpr):
    """dx of columns [0, cend) of one row, the target column as p c_p like the others (the
    caller rewrites it); reads below vend only (0: writes zeros); with HAS_X0 the first
    chunk was loaded by the caller (x0)."""
    nb = tl.cdiv(cend, BLOCK)
    if REVERSE:
        step = -BLOCK
        first = (nb - 1) * BLOCK
    else:
        step = BLOCK
        first = 0
    if HAS_X0:
        xn = x0
    else:
        xn = _load2(xb, first + offs, sxv, vend, COL64X)
    # num_stages=1: no software pipelining (the prefetch is the pipeline)
    for b in tl.range(0, nb, num_stages=1):
        b0 = tl.multiple_of(first + b * step, BLOCK)
        cols = b0 + offs
        mask = cols < cend
        x = xn
        # the next chunk; walking backwards past column 0 its columns are negative, and the
        # bound nb0 (its first column) masks all of them off: nothing is read
        nb0 = b0 + step
        xn = _load2(xb, nb0 + offs, sxv, tl.where(nb0 >= 0, vend, nb0), COL64X)
        _grad_chunk(x, cols, mask, ob, sov, w_ptr, msh, coef, gsm, scale, inv_cap, softcap,
                    rcap, CG, SOFTCAP, SCALE, SMOOTH, HAS_W, COL64O)


@triton.jit
def _grad_chunk(x, cols, mask, ob, sov, w_ptr, msh, coef, gsm, scale, inv_cap, softcap, rcap,
                CG: tl.constexpr, SOFTCAP: tl.constexpr, SCALE: tl.constexpr,
                SMOOTH: tl.constexpr, HAS_W: tl.constexpr, COL64O: tl.constexpr):
    """Store dx of one chunk x (columns cols, stored where mask) of a row into ob: e c_p / s
    with e = exp(z - m) (msh: m; coef: (gct + crest) / s), less the smoothing term."""
    z = _z_of(x, scale, inv_cap, softcap, SOFTCAP, SCALE)
    e = _exp2((z - msh) * _LOG2E)
    d = e * coef
    if SMOOTH:
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            d -= gsm * w
        else:
            d -= gsm
    if SOFTCAP:
        r = z * rcap
        d = d * (scale * (1.0 - r * r))
    if CG:
        # in place: an evict_first store onto a line pass 2 just read through L1 updates
        # that line there too; .cg only writes L2
        tl.store(ob + _col_off(cols, sov, COL64O), _to_out(d, ob.dtype.element_ty), mask=mask,
                 cache_modifier=".cg")
    else:
        tl.store(ob + _col_off(cols, sov, COL64O), _to_out(d, ob.dtype.element_ty), mask=mask,
                 eviction_policy="evict_first")


@triton.jit
def _grad_coefs(g, wt, lse, one_minus_a, a_over_v, wsum, zl2, scale, SOFTCAP: tl.constexpr,
                SCALE: tl.constexpr, ZLOSS: tl.constexpr):
    """(g c_t, g (c_p - c_t), g a / V) of a row, times the logit scale where it is a plain
    factor: c_t = (1 - a) w_t, c_p - c_t = (a / V) W + 2 zl lse."""
    rest = a_over_v * wsum
    if ZLOSS:
        rest += zl2 * lse
    gct = g * (one_minus_a * wt)
    crest = g * rest
    gsm = g * a_over_v
    if not SOFTCAP:
        if SCALE:
            crest = crest * scale
            gsm = gsm * scale
            gct = gct * scale
    return gct, crest, gsm


@triton.jit
def _row_grad(xb, ob, VL, offs, w_ptr, sxv, sov, g, wt, lse, sh, ss, zt, has, tsafe, wsum, x0,
              sc, BLOCK: tl.constexpr, REVERSE: tl.constexpr, CG: tl.constexpr,
              SOFTCAP: tl.constexpr, SCALE: tl.constexpr, SMOOTH: tl.constexpr,
              HAS_W: tl.constexpr, ZLOSS: tl.constexpr, COL64X: tl.constexpr,
              COL64O: tl.constexpr, HAS_X0: tl.constexpr):
    """Write dx of a row's columns [0, VL) (xb, ob: its logits and gradient; w_ptr its class
    weights) for its upstream gradient g, target weight wt and statistics (lse, sh: m or 0
    for an all -inf row, ss: s, zt: z_t; has / tsafe: whether and where its target column
    is here); x0: pass 2's first chunk (HAS_X0); sc: common.scalars."""
    one_minus_a, a_over_v, zl, zl2, w_total, scale, inv_cap, softcap, rcap = sc
    # rows without upstream gradient (ignored) read zeros in pass 2 (vend = 0); with their
    # m and lse taken as 0 and s as 1 their dx is exactly 0 even where their own logits are
    # NaN or inf (0 * exp(z - m) and the z-loss term 2 zl lse would be NaN)
    live = g != 0.0
    lse_g = tl.where(live, lse, 0.0)
    msh = tl.where(live, sh, 0.0)
    rs = 1.0 / tl.where(live, ss, 1.0)
    gct, crest, gsm = _grad_coefs(g, wt, lse_g, one_minus_a, a_over_v, wsum, zl2, scale,
                                  SOFTCAP, SCALE, ZLOSS)
    coef = (gct + crest) * rs
    # rows without upstream gradient are written as zeros, not read
    vend = tl.where(g != 0.0, VL, 0)
    _pass2(xb, ob, VL, vend, offs, w_ptr, sxv, sov, msh, coef, gsm, scale, inv_cap, softcap,
           rcap, x0, BLOCK, REVERSE, CG, SOFTCAP, SCALE, SMOOTH, HAS_W, COL64X, COL64O,
           HAS_X0)
    # the target column, rewritten once the whole row is (the barrier orders it after the
    # vector store of the same column by another thread): the cancellation-free gct (p - 1)
    # + p crest, from z_t, which was read before pass 2 (in place, the column is gone by
    # now); p_t as pass 2 computes it (the same expression: the same contraction into an FMA)
    pt = _exp2((zt - msh) * _LOG2E) * rs
    dt = gct * (pt - 1.0) + pt * crest
    if SMOOTH:
        if HAS_W:
            dt -= gsm * tl.load(w_ptr + tsafe, mask=has, other=0.0).to(tl.float32)
        else:
            dt -= gsm
    if SOFTCAP:
        rt = zt * rcap
        dt = dt * (scale * (1.0 - rt * rt))
    tl.debug_barrier()
    tl.store(ob + tsafe * sov, _to_out(dt, ob.dtype.element_ty), mask=has)


@triton.jit
def _row_target(xb, tv, ignore_index, t0, VL, sxv, scale, inv_cap, softcap,
                SOFTCAP: tl.constexpr, SCALE: tl.constexpr):
    """(has, tsafe, z_t) of a row whose target id is tv: whether its column (tv - t0) is among
    this program's VL columns, that column (0 where not), and its z (0 where not; read before
    pass 2 overwrites it in place)."""
    tloc = tv - t0
    has = (tv != ignore_index) & (tloc >= 0) & (tloc < VL)
    tsafe = tl.where(has, tloc, 0)
    xt = tl.load(xb + tsafe * sxv, mask=has, other=0.0)
    return has, tsafe, tl.where(has, _z_of(xt, scale, inv_cap, softcap, SOFTCAP, SCALE), 0.0)


@triton.jit
def _row_loss_out(row, tv, msh, logs, zt, szs, c, ignore_index, wg_ptr, VG, wsum, sc,
                  loss_ptr, lse_ptr, zp_ptr, HAS_W: tl.constexpr, SMOOTH: tl.constexpr):
    """Store the row's loss (spec.row_loss) and z-loss part (zp_ptr, or None) times c, and its
    lse = m + log s (msh: m, 0 for an all -inf row); returns its upstream gradient g = c [t !=
    ignore] and target weight w_t (wg_ptr: the whole class-weight vector of VG). The nll is
    (m - z_t) + log s: exact for large, close logits."""
    one_minus_a, a_over_v, zl, zl2, w_total, scale, inv_cap, softcap, rcap = sc
    lse = msh + logs
    valid = tv != ignore_index
    if HAS_W:
        # the class weight of the global target
        inrange = valid & (tv >= 0) & (tv < VG)
        wt = tl.load(wg_ptr + tl.where(inrange, tv, 0), mask=inrange,
                     other=0.0).to(tl.float32)
    else:
        wt = tl.where(valid, 1.0, 0.0)
    g = tl.where(valid, c, 0.0)
    lr = ((msh - zt) + logs) * (one_minus_a * wt)
    if SMOOTH:
        lr += a_over_v * (wsum * lse - szs)
    if zp_ptr is not None:
        zp = tl.where(valid, zl * lse * lse, 0.0)
        lr += zp
        tl.store(zp_ptr + row, zp * c)
    # where, not a product: a NaN logit on an ignored row must not leak
    tl.store(loss_ptr + row, tl.where(valid, lr, 0.0) * c)
    tl.store(lse_ptr + row, lse)
    return g, wt


@triton.jit
def _reduction_factor(den_ptr, SCALE_MODE: tl.constexpr):
    """c: 1 (SCALE_MODE 0), 1 / den if den != 0 else 0 (1: "mean"), or den itself (2)."""
    if SCALE_MODE == 1:
        den = tl.load(den_ptr).to(tl.float32)
        c = tl.where(den != 0.0, 1.0 / den, 0.0)
    elif SCALE_MODE == 2:
        c = tl.load(den_ptr).to(tl.float32)
    else:
        c = 1.0
    return c


@triton.jit
def _first_chunk(xb, ok, VL, offs, sxv, BLOCK: tl.constexpr, REVERSE: tl.constexpr,
                 COL64X: tl.constexpr):
    """Pass 2's first chunk of a row (its bounds need only whether the row has a gradient,
    ``ok``), loaded while other programs' records are awaited."""
    vend0 = tl.where(ok, VL, 0)
    if REVERSE:
        return _load2(xb, (tl.cdiv(VL, BLOCK) - 1) * BLOCK + offs, sxv, vend0, COL64X)
    return _load2(xb, offs, sxv, vend0, COL64X)


# ----------------------------------------------------------------------------- records


@triton.jit
def _bits64(x):
    # the fp32 bit pattern, zero-extended into the low half of an int64 word
    return x.to(tl.int32, bitcast=True).to(tl.uint32).to(tl.int64)


@triton.jit
def _record(m, s, zt, am, sz, tag):
    """A row's statistics as 8 int64 words (m, s, z_t, argmax, sz, 0, 0, 0), each carrying
    ``tag`` in its high 32 bits and a fp32 / int32 value in its low 32, so that a reader takes
    a word as soon as its tag matches: no flag, no fence, no ordering between words."""
    k = tl.arange(0, 8)
    rec = tl.where(k == 0, _bits64(m), tl.where(k == 1, _bits64(s), tl.where(
        k == 2, _bits64(zt), tl.where(k == 3, am.to(tl.uint32).to(tl.int64), tl.where(
            k == 4, _bits64(sz), 0)))))
    return rec | ((tl.full([], 0, tl.int64) + tag) << 32)


@triton.jit
def _fold_group(first, stride, PARTS, P2: tl.constexpr, part, tag, m, s, zt, am, sz):
    """(m, s, sz, argmax, z_t) of a row over the PARTS records at ``first + q * stride``
    (tagged ``tag``; part ``part``'s own from its registers), polled together (one load of
    the [PARTS, 8] tile per round trip; awaited one by one they would cost PARTS - 1 round
    trips per row), then folded as a vector (_fold: the same reductions, so the same bits, in
    every part): m = max, s combined to it, the smallest argmax among the parts holding it,
    sums of z_t and sz. P2: PARTS rounded up to a power of two."""
    q = tl.arange(0, P2)[:, None]
    k = tl.arange(0, 8)[None, :]
    ep = tl.full([], 0, tl.int64) + tag
    ptrs = first + q * stride + k
    real = (q < PARTS) & (k < 5)
    need = real & (q != part)
    # (a do-while: with the load before the loop and the reload below, Triton 3.6's layout
    # pass fails on some small tiles and warp counts)
    w = tl.zeros([P2, 8], tl.int64)
    stale = 1
    while stale > 0:
        w = tl.load(ptrs, mask=real, other=0, volatile=True)
        stale = tl.max(tl.where(need & ((w >> 32) != ep), 1, 0))
    if P2 * 8 > 32:
        # The tile is held by more threads than one warp has lanes, several copies of each
        # word in different warps. The loop's test saw every tag in one copy, but the folds
        # below may read another, loaded at another moment (before the record arrived), and
        # mix words of two rows. Every copy reloaded after the barrier sees the records.
        tl.debug_barrier()
        w = tl.load(ptrs, mask=real, other=0, volatile=True)
    lo = w.to(tl.int32)
    f = lo.to(tl.float32, bitcast=True)
    mk = tl.sum(tl.where(k == 0, f, 0.0), axis=1)
    sk = tl.sum(tl.where(k == 1, f, 0.0), axis=1)
    ztk = tl.sum(tl.where(k == 2, f, 0.0), axis=1)
    amk = tl.sum(tl.where(k == 3, lo, 0), axis=1)
    szk = tl.sum(tl.where(k == 4, f, 0.0), axis=1)
    qv = tl.arange(0, P2)
    mine = qv == part
    mk = tl.where(qv < PARTS, mk, float("-inf"))
    amk = tl.where(qv < PARTS, amk, _NO_AM)
    mk = tl.where(mine, m, mk)
    sk = tl.where(mine, s, sk)
    ztk = tl.where(mine, zt, ztk)
    amk = tl.where(mine, am, amk)
    szk = tl.where(mine, sz, szk)
    mx, ss, amm = _fold(mk, sk, amk, 0)
    return mx, ss, tl.sum(szk, axis=0), amm, tl.sum(ztk, axis=0)


@triton.jit
def _split_place(loc_ptr, V, P, SEGW, SPLIT: tl.constexpr):
    """(part, group, groups, first column, columns) of this program. With SPLIT > 1 programs
    take their place from the ticket (word 0 of loc) in the order they start, so a group's
    members wait only on programs that are already running or come next."""
    if SPLIT > 1:
        pid = tl.atomic_add(loc_ptr, 1).to(tl.int32)
        part = pid % SPLIT
        grp = pid // SPLIT
        PG = P // SPLIT
        c0 = part * SEGW
        VL = tl.minimum(V - c0, SEGW)
    else:
        pid = tl.program_id(0)
        part = 0
        grp = pid
        PG = P
        c0 = 0
        VL = V
    return part, grp, PG, c0, VL


# ----------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["N"])
def _fused_rows_kernel(
    x_ptr, sx, o_ptr, so, T, V, N, P,
    tgt_ptr, ignore_index, w_ptr, wsum_ptr, VG,
    den_ptr, loss_ptr, lse_ptr, zp_ptr, am_ptr, loc_ptr, SEGW, sc,
    CFG: tl.constexpr, SOFTCAP: tl.constexpr, SCALE: tl.constexpr, SMOOTH: tl.constexpr,
    SCALE_MODE: tl.constexpr,
):
    """The loss rows of logits x [B, T, V] and, in the same pass, their gradient.

    P programs; program pid takes rows pid, pid + P, ... (P = N: one row each), or with
    SPLIT > 1 groups of SPLIT programs take rows, each program a segment of SEGW columns.
    Parameters:
      x_ptr, sx       logits and their strides (b, t, v)
      o_ptr, so       the gradient (may be x) and its strides, or None (no gradient: one read)
      T, V, N, P      rows per batch, columns, rows, programs
      tgt_ptr         [N] target ids; ignore_index: rows with it give 0 loss and gradient
      w_ptr           [VG] fp32 class weights, or None
      wsum_ptr        their sum W (0-d fp32; with smoothing), or None
      VG              the vocabulary size
      den_ptr         the reduction's 0-d denominator (SCALE_MODE 1) or factor (2), or None
      loss_ptr        [N] fp32 loss rows times the reduction factor c
      lse_ptr         [N] fp32 lse
      zp_ptr          [N] fp32 z-loss parts times c, or None (no z-loss)
      am_ptr          [N] int64 argmax, or None
      loc_ptr         SPLIT's zeroed exchange buffer [1 + 2 * (P / SPLIT) * SPLIT * 8] int64
                      (word 0 a ticket counter, then slot [k % 2, group, part] a part's
                      record of its group's k-th row, tagged row + 1), or None
      SEGW            SPLIT's segment width (a multiple of BLOCK)
      sc              common.scalars: (1 - a, a / V, zl, 2 zl, V, scale, scale / cap, cap,
                      1 / cap)
      CFG             (BLOCK, REVERSE, CG, SPLIT, COL64X, COL64O, P2): configs.RowsConfig's
                      block, reverse, cg_stores, split; 64-bit column offsets of x / o; the
                      records of a row rounded up to a power of two
      SOFTCAP, SCALE  the transform (common._z_of)
      SMOOTH          label smoothing
      SCALE_MODE      the reduction factor c = 1 (0), 1 / den if den != 0 else 0 (1:
                      "mean"), or den (2: a normalizer's reciprocal)
    """
    BLOCK: tl.constexpr = CFG[0]
    REVERSE: tl.constexpr = CFG[1]
    CG: tl.constexpr = CFG[2]
    SPLIT: tl.constexpr = CFG[3]
    COL64X: tl.constexpr = CFG[4]
    COL64O: tl.constexpr = CFG[5]
    P2: tl.constexpr = CFG[6]
    R: tl.constexpr = 128 // x_ptr.dtype.element_ty.primitive_bitwidth
    HAS_W: tl.constexpr = w_ptr is not None
    NEED_AM: tl.constexpr = am_ptr is not None
    one_minus_a, a_over_v, zl, zl2, w_total, scale, inv_cap, softcap, rcap = sc
    part, grp, PG, c0, VL = _split_place(loc_ptr, V, P, SEGW, SPLIT)
    wg_ptr = w_ptr
    if SPLIT > 1 and HAS_W:
        w_ptr += c0
    c = _reduction_factor(den_ptr, SCALE_MODE)
    NT: tl.constexpr = BLOCK // R
    lane = tl.arange(0, NT)
    offs = lane[:, None] * R + tl.arange(0, R)[None, :]
    if HAS_W and SMOOTH:
        wsum = tl.load(wsum_ptr).to(tl.float32)
    else:
        wsum = w_total  # V (W is only used with smoothing)
    for row in range(grp, N, PG):
        x0 = c  # (pass 2's preloaded first chunk with SPLIT; unused otherwise)
        xb = _row_ptr(x_ptr, row, T, sx[0], sx[1])
        if SPLIT > 1:
            xb += _col_off(c0, sx[2], COL64X)
        tv = tl.load(tgt_ptr + row).to(tl.int64)
        has, tsafe, zt = _row_target(xb, tv, ignore_index, c0, VL, sx[2], scale, inv_cap,
                                     softcap, SOFTCAP, SCALE)
        m, ss, szs, am = _pass1(xb, VL, offs, lane, w_ptr, sx[2], scale, inv_cap, softcap,
                                BLOCK, R, SOFTCAP, SCALE, SMOOTH, HAS_W, NEED_AM, COL64X)
        if SPLIT > 1:
            if NEED_AM:
                am = (am + c0).to(tl.int32)
            kk = (row - grp) // PG
            first = loc_ptr + 1 + ((kk % 2) * PG + grp) * (SPLIT * 8)
            tl.store(first + part * 8 + tl.arange(0, 8), _record(m, ss, zt, am, szs, row + 1))
            if o_ptr is not None:
                x0 = _first_chunk(xb, (tv != ignore_index) & (c != 0.0), VL, offs, sx[2],
                                  BLOCK, REVERSE, COL64X)
            m, ss, szs, am, zt = _fold_group(first, 8, SPLIT, P2, part, row + 1, m, ss, zt,
                                             am, szs)
        sh = tl.where(m == float("-inf"), 0.0, m)
        logs = tl.log(ss)
        lse = sh + logs
        if NEED_AM:
            tl.store(am_ptr + row, am.to(tl.int64))
        g, wt = _row_loss_out(row, tv, sh, logs, zt, szs, c, ignore_index, wg_ptr, VG, wsum, sc,
                              loss_ptr, lse_ptr, zp_ptr, HAS_W, SMOOTH)
        if o_ptr is not None:
            ob = _row_ptr(o_ptr, row, T, so[0], so[1])
            if SPLIT > 1:
                ob += _col_off(c0, so[2], COL64O)
            _row_grad(xb, ob, VL, offs, w_ptr, sx[2], so[2], g, wt, lse, sh, ss, zt, has,
                      tsafe, wsum, x0, sc, BLOCK, REVERSE, CG, SOFTCAP, SCALE, SMOOTH, HAS_W,
                      zp_ptr is not None, COL64X, COL64O, SPLIT > 1)


@triton.jit(do_not_specialize=["N"])
def _fused_stats_kernel(
    x_ptr, sx, o_ptr, so, T, V, N, P,
    tgt_ptr, ignore_index, w_ptr, wsum_ptr, g_ptr, wt_ptr,
    m_ptr, s_ptr, zt_ptr, sz_ptr, am_ptr, loc_ptr, SEGW, sc,
    CFG: tl.constexpr, SOFTCAP: tl.constexpr, SCALE: tl.constexpr, SMOOTH: tl.constexpr,
    ZLOSS: tl.constexpr, NEED_AM: tl.constexpr,
):
    """The statistics of the rows of logits x [B, T, V] and, in the same pass, their gradient
    for given upstream row gradients: _fused_rows_kernel's rows, with (in place of its loss
    outputs and reduction) g_ptr, wt_ptr [N] fp32: each row's upstream gradient and target
    weight, read; m_ptr, s_ptr, zt_ptr, sz_ptr [N] fp32, am_ptr [N] int64: maximum, sum of
    exp(z - m), target z, sum w z, argmax (-1 unless NEED_AM), written; ZLOSS: z-loss (its
    2 zl lse term in c_p). o_ptr is never None here.
    """
    BLOCK: tl.constexpr = CFG[0]
    REVERSE: tl.constexpr = CFG[1]
    CG: tl.constexpr = CFG[2]
    SPLIT: tl.constexpr = CFG[3]
    COL64X: tl.constexpr = CFG[4]
    COL64O: tl.constexpr = CFG[5]
    P2: tl.constexpr = CFG[6]
    R: tl.constexpr = 128 // x_ptr.dtype.element_ty.primitive_bitwidth
    HAS_W: tl.constexpr = w_ptr is not None
    one_minus_a, a_over_v, zl, zl2, w_total, scale, inv_cap, softcap, rcap = sc
    part, grp, PG, c0, VL = _split_place(loc_ptr, V, P, SEGW, SPLIT)
    if SPLIT > 1 and HAS_W:
        w_ptr += c0
    NT: tl.constexpr = BLOCK // R
    lane = tl.arange(0, NT)
    offs = lane[:, None] * R + tl.arange(0, R)[None, :]
    if HAS_W and SMOOTH:
        wsum = tl.load(wsum_ptr).to(tl.float32)
    else:
        wsum = w_total  # V (W is only used with smoothing)
    for row in range(grp, N, PG):
        xb = _row_ptr(x_ptr, row, T, sx[0], sx[1])
        if SPLIT > 1:
            xb += _col_off(c0, sx[2], COL64X)
        tv = tl.load(tgt_ptr + row).to(tl.int64)
        has, tsafe, zt = _row_target(xb, tv, ignore_index, c0, VL, sx[2], scale, inv_cap,
                                     softcap, SOFTCAP, SCALE)
        m, ss, szs, am = _pass1(xb, VL, offs, lane, w_ptr, sx[2], scale, inv_cap, softcap,
                                BLOCK, R, SOFTCAP, SCALE, SMOOTH, HAS_W, NEED_AM, COL64X)
        if SPLIT > 1:
            if NEED_AM:
                am = (am + c0).to(tl.int32)
            kk = (row - grp) // PG
            first = loc_ptr + 1 + ((kk % 2) * PG + grp) * (SPLIT * 8)
            tl.store(first + part * 8 + tl.arange(0, 8), _record(m, ss, zt, am, szs, row + 1))
            m, ss, szs, am, zt = _fold_group(first, 8, SPLIT, P2, part, row + 1, m, ss, zt,
                                             am, szs)
        sh = tl.where(m == float("-inf"), 0.0, m)
        logs = tl.log(ss)
        lse = sh + logs
        tl.store(am_ptr + row, am.to(tl.int64))
        tl.store(m_ptr + row, m)
        tl.store(s_ptr + row, ss)
        tl.store(zt_ptr + row, zt)
        tl.store(sz_ptr + row, szs)
        g = tl.load(g_ptr + row)
        wt = tl.load(wt_ptr + row)
        ob = _row_ptr(o_ptr, row, T, so[0], so[1])
        if SPLIT > 1:
            ob += _col_off(c0, so[2], COL64O)
        _row_grad(xb, ob, VL, offs, w_ptr, sx[2], so[2], g, wt, lse, sh, ss, zt, has, tsafe,
                  wsum, 0.0, sc, BLOCK, REVERSE, CG, SOFTCAP, SCALE, SMOOTH, HAS_W, ZLOSS,
                  COL64X, COL64O, False)


# ----------------------------------------------------------------------------- launchers


def split_buffer(words: int, device) -> torch.Tensor:
    """The zeroed int64 exchange buffer of SPLIT (a fresh one per call: an allocation and a
    memset, so the call stays capturable in a CUDA graph and needs no state)."""
    return torch.zeros(words, device=device, dtype=torch.int64)


def block_of(cfg: configs.RowsConfig, x3: torch.Tensor) -> int:
    """BLOCK of a launch: the configuration's, at most the row rounded up to a power of two,
    at least one 16-byte vector per thread."""
    r = max(1, 16 // x3.element_size())
    return max(min(cfg.block, launch.pow2(max(x3.shape[-1], 16))), r)


def kernel_cfg(cfg: configs.RowsConfig, x3: torch.Tensor, out: Optional[torch.Tensor],
               block: int, split: int, records: int) -> tuple:
    """The CFG constexpr of a fused kernel: (BLOCK, REVERSE, CG, SPLIT, COL64X, COL64O, P2)."""
    V = x3.shape[-1]
    return (block, bool(cfg.reverse), bool(cfg.cg_stores), int(split),
            launch.col64(V, x3.stride(-1)),
            out is not None and launch.col64(V, out.stride(-1)), launch.pow2(records))


def split_grid(V: int, n: int, block: int, programs: int, split: int):
    """(split, segment width, programs, exchange words) of a single-device launch asked for
    ``split`` cooperating programs per row on ``programs`` resident ones: at most MAX_SPLIT
    parts, no empty segment, min(rows, programs // split) groups of split."""
    split = max(1, min(int(split), configs.MAX_SPLIT, launch.cdiv(V, block), int(programs)))
    if split == 1:
        return 1, V, programs, 0
    segw = launch.cdiv(launch.cdiv(V, split), block) * block
    split = launch.cdiv(V, segw)
    programs = min(n, programs // split) * split
    return split, segw, programs, 1 + 2 * programs * 8


def reduction(den, scale_mode: int):
    """(den_ptr, SCALE_MODE): no tensor for a factor of 1."""
    return (den if scale_mode else None), scale_mode


def _fused_loss(x3, target, weight, w_total, den, out, ignore_index, vocab_size,
                label_smoothing, z_loss, logit_scale, softcap, need_am, scale_mode):
    B, T, V = launch.dims3(x3)
    n = B * T
    dev = x3.device
    f32 = torch.float32
    loss = torch.empty(n, device=dev, dtype=f32)
    lse = torch.empty(n, device=dev, dtype=f32)
    zp = torch.empty(n if z_loss > 0.0 else 0, device=dev, dtype=f32)
    am = torch.empty(n if need_am else 0, device=dev, dtype=torch.int64)
    if n == 0 or launch.is_traced(x3, out):
        return loss, lse, zp, am
    cfg, P, maxnreg = configs.rows_grid(x3, out, softcap, weight, out is not None,
                                        traced=False)
    block = block_of(cfg, x3)
    split, segw, P, words = split_grid(V, n, block, P, cfg.split if out is not None else 1)
    den_ptr, mode = reduction(den, scale_mode)
    launch.launcher(_fused_rows_kernel)[(P,)](
        x3, launch.strides3(x3), out, launch.strides3(out) if out is not None else (0, 0, 0),
        T, V, n, P, target, ignore_index, weight,
        w_total if (weight is not None and label_smoothing > 0.0) else None, int(vocab_size),
        den_ptr, loss, lse, zp if z_loss > 0.0 else None, am if need_am else None,
        split_buffer(words, dev) if split > 1 else None, segw,
        scalars(logit_scale, softcap, label_smoothing, vocab_size, z_loss),
        CFG=kernel_cfg(cfg, x3, out, block, split, split), SMOOTH=label_smoothing > 0.0,
        SCALE_MODE=mode, num_warps=cfg.num_warps, **transform_flags(logit_scale, softcap),
        **({} if maxnreg is None else {"maxnreg": maxnreg}),
    )
    return loss, lse, zp, am


@launch.op("fusedce::tr_fused_loss", mutates_args=("out",), opaque=True)
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
                       label_smoothing, z_loss, logit_scale, softcap, need_am, scale_mode)


@launch.op("fusedce::tr_loss_rows", mutates_args=(), opaque=True)
def tr_loss_rows(
    x3: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
    w_total: Optional[torch.Tensor], den: Optional[torch.Tensor], ignore_index: int,
    vocab_size: int, label_smoothing: float, z_loss: float, logit_scale: float,
    softcap: Optional[float], need_am: bool, scale_mode: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """tr_fused_loss without the gradient (one read of the logits)."""
    return _fused_loss(x3, target, weight, w_total, den, None, ignore_index, vocab_size,
                       label_smoothing, z_loss, logit_scale, softcap, need_am, scale_mode)


@launch.op("fusedce::tr_fused", mutates_args=("out",), opaque=True)
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
    B, T, V = launch.dims3(x3)
    n = B * T
    dev = x3.device
    f32 = torch.float32
    m, s, zt, sz = (torch.empty(n, device=dev, dtype=f32) for _ in range(4))
    am = torch.empty(n, device=dev, dtype=torch.int64)
    if n == 0 or launch.is_traced(x3, out):
        return m, s, zt, sz, am
    cfg, P, maxnreg = configs.rows_grid(x3, out, softcap, weight, True, traced=False)
    block = block_of(cfg, x3)
    split, segw, P, words = split_grid(V, n, block, P, cfg.split)
    launch.launcher(_fused_stats_kernel)[(P,)](
        x3, launch.strides3(x3), out, launch.strides3(out), T, V, n, P, target, ignore_index,
        weight, w_total if (weight is not None and label_smoothing > 0.0) else None, g0, w_t,
        m, s, zt, sz, am, split_buffer(words, dev) if split > 1 else None, segw,
        scalars(logit_scale, softcap, label_smoothing, vocab_size, z_loss),
        CFG=kernel_cfg(cfg, x3, out, block, split, split), SMOOTH=label_smoothing > 0.0,
        ZLOSS=z_loss > 0.0, NEED_AM=need_am, num_warps=cfg.num_warps,
        **transform_flags(logit_scale, softcap),
        **({} if maxnreg is None else {"maxnreg": maxnreg}),
    )
    return m, s, zt, sz, am


launch.opaque_only(_fused_rows_kernel, _fused_stats_kernel)

__all__ = ["tr_fused_loss", "tr_loss_rows", "tr_fused"]
