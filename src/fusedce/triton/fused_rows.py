"""Fused forward + gradient of cross-entropy, one row per program, second read from L2.

Math (see :mod:`fusedce.spec` and :mod:`fusedce.triton.ce`). Per row with target t, upstream
row gradient g, target weight w_t, class weights w (sum W), smoothing a, z-loss zl:

    pass 1 (DRAM):  m = max_j z_j, s = sum_j exp(z_j - m), z_t, sz = sum_j w_j z_j, argmax
                    lse = m + log s,  nll = (m - z_t) + log s
    pass 2 (L2):    dx_j = g (p_j c_p - c_t [j = t] - (a / V) w_j) dz_j/dx_j,
                    p_j = exp(z_j - m) / s,  c_t = (1 - a) w_t,  c_p = c_t + (a / V) W + 2 zl lse

Why two passes in one program: the gradient needs the whole row's lse before its first
element can be written, so a single-read kernel must hold the row (registers, or partials
exchanged between cooperating programs, which then wait on each other). Here a program
streams its row twice instead: the first read comes from DRAM, the second from L2, where the
row still is if the rows in flight (programs x row bytes) fit in L2. DRAM then sees one read
and one write per element (the 4-byte floor in bf16) and no program ever waits on another.
Pass 2 can walk the row backwards (REVERSE), so that its first chunks are the ones read last
and the reuse distance shrinks for long rows; loads of pass 1 ask L2 to keep the lines
(evict_last), pass 2's loads and stores ask it to drop them first (evict_first).

A chunk is a [BLOCK / R, R] tile whose R contiguous columns sit in one thread (16-byte
loads), so pass 1 keeps per-thread running statistics with in-thread reductions and folds
the threads once per row, as the statistics kernel of ce.py does.

The target column's gradient, gct (p_t - 1) + p_t crest with gct = g c_t and crest = g (c_p -
c_t) (cancellation-free: exactly 0 at V = 1), is either computed inside pass 2's vector (a
compare with the column index and two FMAs per element: TVEC) or, as the table does, stored
once per row after pass 2 and a barrier, from z_t read before pass 2 (in place, the column is
overwritten by then): the same bits, ~3% faster at V = 32000.

Vocabulary parallel, the shard statistics of a row come from the other ranks either
all-gathered before the kernel (GATHERED) or exchanged by the ranks' kernels themselves,
row by row, through symmetric memory (PEER: _publish_row, _fold_row; see fusedce.peer).

Rows too long for their second read to stay in L2 (192-256 KB and over 384 KB in the table)
are cut into S segments, each taken by one program of a group of S that exchange their
segments' statistics the same way, in one zeroed buffer per call (SPLIT: _record,
_fold_group): the rows in flight shrink S-fold, at the price of ~3 us of exchange per row
(notes/KERNELS.md, sessions 4 and 7). Vocabulary parallel with PEER, shard rows can be split
too: every part's record then goes through the ranks' exchange buffers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ce import (_LOG2E, MAX_SPLIT, _cdiv, _chunk_stats, _col_off, _dims3, _exp2, _to_out,
                 _placeholder, _pow2, _row_ptr, _strides3, _z_of)


@triton.jit
def _load1(xb, cols, sxv, V, HINTS: tl.constexpr, COL64: tl.constexpr):
    # pass 1: masked lanes read as -inf (they add nothing to max and sum)
    if HINTS:
        return tl.load(xb + _col_off(cols, sxv, COL64), mask=cols < V, other=float("-inf"),
                       eviction_policy="evict_last")
    return tl.load(xb + _col_off(cols, sxv, COL64), mask=cols < V, other=float("-inf"))


@triton.jit
def _load2(xb, cols, sxv, vend, HINTS: tl.constexpr, COL64: tl.constexpr):
    # pass 2: vend is 0 for rows without upstream gradient (written as zeros, never read)
    if HINTS:
        return tl.load(xb + _col_off(cols, sxv, COL64), mask=cols < vend, other=0.0,
                       eviction_policy="evict_first")
    return tl.load(xb + _col_off(cols, sxv, COL64), mask=cols < vend, other=0.0)


@triton.jit
def _pass1(xb, c0, cend, offs, lane, w_ptr, sxv, scale, inv_cap, softcap,
           BLOCK: tl.constexpr, R: tl.constexpr, HINTS: tl.constexpr,
           PREFETCH: tl.constexpr, STAGES: tl.constexpr, SOFTCAP: tl.constexpr,
           SCALE: tl.constexpr, SMOOTH: tl.constexpr, HAS_W: tl.constexpr,
           NEED_AM: tl.constexpr, COL64X: tl.constexpr, FAST: tl.constexpr):
    """Statistics of columns [c0, cend) of one row: (m, s, sum w z, first argmax)."""
    NT: tl.constexpr = BLOCK // R
    m = tl.full([NT], float("-inf"), tl.float32)
    s = tl.zeros([NT], tl.float32)
    sz = tl.zeros([NT], tl.float32)
    am = tl.zeros([NT], tl.int32)
    if PREFETCH:
        xn = _load1(xb, c0 + offs, sxv, cend, HINTS, COL64X)
    for b0 in tl.range(c0, cend, BLOCK, num_stages=STAGES):
        b0 = tl.multiple_of(b0, BLOCK)
        cols = b0 + offs
        if PREFETCH:
            x = xn
            xn = _load1(xb, cols + BLOCK, sxv, cend, HINTS, COL64X)
        else:
            x = _load1(xb, cols, sxv, cend, HINTS, COL64X)
        z, m, s, sz, am, e, alpha = _chunk_stats(
            x, cols, cend, b0, lane, m, s, sz, am, w_ptr, scale, inv_cap, softcap, R, SOFTCAP,
            SCALE, SMOOTH, HAS_W, NEED_AM, FAST)
    return _fold_threads(m, s, sz, am, lane, NEED_AM)


@triton.jit
def _fold_threads(m, s, sz, am, lane, NEED_AM: tl.constexpr):
    """(m, s, sum w z, first argmax) of a row from the per-thread running values (the spec's
    combine); lanes hold interleaved columns, so the first argmax is the smallest index
    among the lanes that reach the maximum."""
    mm = tl.max(m, axis=0)
    sh = tl.where(mm == float("-inf"), 0.0, mm)
    f = tl.where(m == float("-inf"), 0.0, tl.exp(m - sh))
    ss = tl.sum(s * f, axis=0)
    if NEED_AM:
        amm = tl.min(tl.where(m == mm, am, 2147483647), axis=0)
        amm = tl.where(amm == 2147483647, tl.min(tl.where(lane == 0, am, 2147483647), axis=0),
                       amm)
    else:
        amm = tl.full([], -1, tl.int32)
    return mm, ss, tl.sum(sz, axis=0), amm


@triton.jit
def _pass2(xb, ob, c0, cend, vend, offs, w_ptr, sxv, sov, msh, rs, coef, crest, gsm, gct, tcol,
           scale, inv_cap, softcap, rcap, x0,
           BLOCK: tl.constexpr, HINTS: tl.constexpr, PREFETCH: tl.constexpr,
           STAGES: tl.constexpr, REVERSE: tl.constexpr, SOFTCAP: tl.constexpr,
           SCALE: tl.constexpr, SMOOTH: tl.constexpr, HAS_W: tl.constexpr,
           COL64X: tl.constexpr, COL64O: tl.constexpr, FAST: tl.constexpr,
           TVEC: tl.constexpr, HAS_X0: tl.constexpr):
    """dx of columns [c0, cend) of one row (reads below vend only: 0 = write zeros); with
    TVEC False the target column gets p c_p like the others (the caller rewrites it); with
    HAS_X0 (and PREFETCH) the first chunk was loaded by the caller (x0)."""
    nb = tl.cdiv(cend - c0, BLOCK)
    if REVERSE:
        step = -BLOCK
        first = c0 + (nb - 1) * BLOCK
    else:
        step = BLOCK
        first = c0
    if PREFETCH:
        if HAS_X0:
            xn = x0
        else:
            xn = _load2(xb, first + offs, sxv, vend, HINTS, COL64X)
    for b in tl.range(0, nb, num_stages=STAGES):
        b0 = tl.multiple_of(first + b * step, BLOCK)
        cols = b0 + offs
        mask = cols < cend
        if PREFETCH:
            x = xn
            # the next chunk; walking backwards past c0 its columns are negative, and the
            # bound nb0 (its first column) masks all of them off: nothing is read
            nb0 = b0 + step
            xn = _load2(xb, nb0 + offs, sxv, tl.where(nb0 >= c0, vend, nb0), HINTS, COL64X)
        else:
            x = _load2(xb, cols, sxv, vend, HINTS, COL64X)
        _grad_chunk(x, cols, mask, ob, sov, w_ptr, msh, rs, coef, crest, gsm, gct, tcol, scale,
                    inv_cap, softcap, rcap, HINTS, SOFTCAP, SCALE, SMOOTH, HAS_W, COL64O, FAST,
                    TVEC)


@triton.jit
def _grad_chunk(x, cols, mask, ob, sov, w_ptr, msh, rs, coef, crest, gsm, gct, tcol, scale,
                inv_cap, softcap, rcap, HINTS: tl.constexpr, SOFTCAP: tl.constexpr,
                SCALE: tl.constexpr, SMOOTH: tl.constexpr, HAS_W: tl.constexpr,
                COL64O: tl.constexpr, FAST: tl.constexpr, TVEC: tl.constexpr):
    """Store dx of one chunk x (columns cols, stored where mask) of a row into ob; p = e / s
    with e = exp(z - m) (msh: m; rs: 1 / s; coef: (gct + crest) / s)."""
    z = _z_of(x, scale, inv_cap, softcap, SOFTCAP, SCALE)
    e = _exp2((z - msh) * _LOG2E, FAST)
    # the target column as gct (p - 1) + p crest, which is exactly 0 where it should be
    # (V = 1: p = 1) and cancels no large terms
    if TVEC:
        p = e * rs
        d = tl.where(cols == tcol, gct * (p - 1.0) + p * crest, e * coef)
    else:
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
    if HINTS == 2:
        tl.store(ob + _col_off(cols, sov, COL64O), _to_out(d, ob.dtype.element_ty), mask=mask,
                 cache_modifier=".cs")
    elif HINTS == 3:
        # in place: an evict_first store onto a line pass 2 just read through L1 updates
        # that line there too; .cg only writes L2 (run 55: 1.34x -> 1.32x at 262144)
        tl.store(ob + _col_off(cols, sov, COL64O), _to_out(d, ob.dtype.element_ty), mask=mask,
                 cache_modifier=".cg")
    elif HINTS:
        tl.store(ob + _col_off(cols, sov, COL64O), _to_out(d, ob.dtype.element_ty), mask=mask,
                 eviction_policy="evict_first")
    else:
        tl.store(ob + _col_off(cols, sov, COL64O), _to_out(d, ob.dtype.element_ty), mask=mask)


@triton.jit
def _fold_gathered(gat_ptr, row, N, W, NF: tl.constexpr):
    """(m, s, sz, argmax, z_t) of a row from the W shards' statistics gat [W, NF, N]: the
    maximum, s rescaled to it (a shard whose maximum is -inf adds 0), sums of z_t and sz,
    the smallest id among the shards that hold the maximum (shard 0's if none does)."""
    m = tl.load(gat_ptr + row)
    for k in range(1, W):
        m = tl.maximum(m, tl.load(gat_ptr + k * NF * N + row))
    s = 0.0
    zt = 0.0
    sz = 0.0
    am0 = tl.load(gat_ptr.to(tl.pointer_type(tl.int32)) + 3 * N + row)
    am = 2147483647
    for k in range(0, W):
        base = gat_ptr + k * NF * N + row
        mk = tl.load(base)
        sk = tl.load(base + N)
        f = tl.where(mk == float("-inf"), 0.0, tl.exp(mk - m))
        s += sk * f
        zt += tl.load(base + 2 * N)
        if NF > 4:
            sz += tl.load(base + 4 * N)
        amk = tl.load(gat_ptr.to(tl.pointer_type(tl.int32)) + k * NF * N + 3 * N + row)
        am = tl.where(mk == m, tl.minimum(am, amk), am)
    am = tl.where(am == 2147483647, am0, am)
    return m, s, sz, am, zt


@triton.jit
def _bits64(x):
    # the fp32 bit pattern, zero-extended into the low half of an int64 word
    return x.to(tl.int32, bitcast=True).to(tl.uint32).to(tl.int64)


@triton.jit
def _record(m, s, zt, am, sz, tag):
    """A row's statistics as 8 int64 words (m, s, z_t, argmax, sz, 0, 0, 0), each carrying
    ``tag`` in its high 32 bits and a fp32 / int32 value in its low 32 (see _publish_row)."""
    k = tl.arange(0, 8)
    rec = tl.where(k == 0, _bits64(m), tl.where(k == 1, _bits64(s), tl.where(
        k == 2, _bits64(zt), tl.where(k == 3, am.to(tl.uint32).to(tl.int64), tl.where(
            k == 4, _bits64(sz), 0)))))
    return rec | ((tl.full([], 0, tl.int64) + tag) << 32)


@triton.jit
def _publish_row(peers_ptr, row, NX, JB, j, W, rank, epoch, m, s, zt, am, sz,
                 SELF: tl.constexpr):
    """Store this program's statistics of one row into every rank's exchange buffer.

    Each rank's exchange buffer is int64 [2, JB, NX, 8], NX >= rows, JB >= W slots per row
    (symmetric memory: every rank can store into every rank's buffer; peers_ptr holds their
    addresses). The program writes its record of row i (_record, tagged with the call's
    epoch) into slot [epoch % 2, j, i] of every other rank's buffer (j = its rank, or with
    SPLIT rank x parts + part, and then of its own rank's buffer too: SELF), so a reader
    takes a word as soon as its tag matches: no flag, no fence, no ordering between words.
    Two parities suffice: a rank finishes call e + 1 only after every rank started it, i.e.
    after every rank read all of call e's records."""
    k = tl.arange(0, 8)
    rec = _record(m, s, zt, am, sz, epoch)
    ep = tl.full([], 0, tl.int64) + epoch  # (a plain int in the interpreter)
    row64 = tl.full([], 0, tl.int64) + row
    mine = (((ep & 1) * JB + j) * NX + row64) * 8
    for q in range(0, W):
        if SELF or q != rank:  # (without SELF its own record stays in registers: _fold_row)
            dst = tl.load(peers_ptr + q).to(tl.pointer_type(tl.int64))
            tl.store(dst + mine + k, rec)


@triton.jit
def _await_record(base, ep):
    """The five words of one record (see _publish_row), once all carry the tag ``ep``: scalar
    volatile loads (L2; a cached line could hold another row's record from before it
    arrived), issued together, reissued until every tag matches."""
    w0 = tl.load(base, volatile=True)
    w1 = tl.load(base + 1, volatile=True)
    w2 = tl.load(base + 2, volatile=True)
    w3 = tl.load(base + 3, volatile=True)
    w4 = tl.load(base + 4, volatile=True)
    while (((w0 >> 32) != ep) | ((w1 >> 32) != ep) | ((w2 >> 32) != ep) | ((w3 >> 32) != ep)
           | ((w4 >> 32) != ep)):
        w0 = tl.load(base, volatile=True)
        w1 = tl.load(base + 1, volatile=True)
        w2 = tl.load(base + 2, volatile=True)
        w3 = tl.load(base + 3, volatile=True)
        w4 = tl.load(base + 4, volatile=True)
    return (w0.to(tl.int32).to(tl.float32, bitcast=True),
            w1.to(tl.int32).to(tl.float32, bitcast=True),
            w2.to(tl.int32).to(tl.float32, bitcast=True), w3.to(tl.int32),
            w4.to(tl.int32).to(tl.float32, bitcast=True))


@triton.jit
def _fold_row(first, stride, W, rank, tag, m, s, zt, am, sz):
    """(m, s, sz, argmax, z_t) of one row over W parts, in part order, from the records at
    ``first + q * stride`` (see _record; part ``rank``'s own from its registers, the same bits
    it published), waiting for the ones not yet tagged ``tag``. The fold is _fold_gathered's,
    online: s rescaled as the maximum grows (exp(0) = 1 exactly, so for W = 2 the result is
    the two-pass one); the argmax is the smallest id among the parts that hold the maximum.
    Every part folds the same values in the same order: the same loss."""
    ep = tl.full([], 0, tl.int64) + tag
    mx = tl.full([], float("-inf"), tl.float32)
    ss = 0.0
    zs = 0.0
    szs = 0.0
    amm = 2147483647
    for q in range(0, W):
        if q == rank:
            mk, sk, ztk, amk, szk = m, s, zt, am, sz
        else:
            mk, sk, ztk, amk, szk = _await_record(first + q * stride, ep)
        mn = tl.maximum(mx, mk)
        sh = tl.where(mn == float("-inf"), 0.0, mn)
        fo = tl.where(mx == float("-inf"), 0.0, tl.exp(mx - sh))
        fk = tl.where(mk == float("-inf"), 0.0, tl.exp(mk - sh))
        ss = ss * fo + sk * fk
        amm = tl.where(mk > mx, amk, tl.where(mk == mx, tl.minimum(amm, amk), amm))
        mx = mn
        zs += ztk
        szs += szk
    return mx, ss, szs, amm, zs


@triton.jit
def _fold_group(first, stride, PARTS, P2: tl.constexpr, part, tag, m, s, zt, am, sz):
    """_fold_row for the PARTS programs of a SPLIT group (with PEER: of all ranks' parts):
    the records of all parts at ``first + q * stride`` (tagged ``tag``), polled together (one
    load of the [PARTS, 8] tile per round trip; awaited one by one they would cost PARTS - 1
    round trips per row), this part's own from its registers; then folded as vectors (the
    same reductions, so the same bits, in every part): m = max, s rescaled to it, the
    smallest argmax among the parts holding it, sums of z_t and sz. P2: PARTS rounded up to
    a power of two."""
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
        # below may read another, loaded at another moment (before the record arrived): with
        # 8 parts a few rows in a thousand mixed words of two rows (runs 42-43, notes/
        # KERNELS.md runs 46-47). Every copy reloaded after the barrier sees the records.
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
    amk = tl.where(qv < PARTS, amk, 2147483647)
    mk = tl.where(mine, m, mk)
    sk = tl.where(mine, s, sk)
    ztk = tl.where(mine, zt, ztk)
    amk = tl.where(mine, am, amk)
    szk = tl.where(mine, sz, szk)
    mx = tl.max(mk, axis=0)
    sh = tl.where(mx == float("-inf"), 0.0, mx)
    fk = tl.where(mk == float("-inf"), 0.0, tl.exp(mk - sh))
    amm = tl.min(tl.where(mk == mx, amk, 2147483647), axis=0)
    return mx, tl.sum(sk * fk, axis=0), tl.sum(szk, axis=0), amm, tl.sum(ztk, axis=0)


@triton.jit
def _row_loss_out(row, tv, msh, logs, zt, szs, c, ignore_index, wg_ptr, VG, one_minus_a,
                  a_over_v, zl, wsum, loss_ptr, lse_ptr, zp_ptr, HAS_W: tl.constexpr,
                  SMOOTH: tl.constexpr, ZLOSS: tl.constexpr):
    """Store the row's loss (spec.row_loss) and z-loss part times c, and its lse = m + log s
    (msh: m, 0 for an all -inf row); returns its upstream gradient g = c [t != ignore] and
    target weight w_t. The nll is (m - z_t) + log s: exact for large, close logits."""
    lse = msh + logs
    valid = tv != ignore_index
    if HAS_W:
        # the class weight of the global target (wg: the whole weight vector)
        inrange = valid & (tv >= 0) & (tv < VG)
        wt = tl.load(wg_ptr + tl.where(inrange, tv, 0), mask=inrange,
                     other=0.0).to(tl.float32)
    else:
        wt = tl.where(valid, 1.0, 0.0)
    g = tl.where(valid, c, 0.0)
    lr = ((msh - zt) + logs) * (one_minus_a * wt)
    if SMOOTH:
        lr += a_over_v * (wsum * lse - szs)
    if ZLOSS:
        zp = tl.where(valid, zl * lse * lse, 0.0)
        lr += zp
        tl.store(zp_ptr + row, zp * c)
    # where, not a product: a NaN logit on an ignored row must not leak
    tl.store(loss_ptr + row, tl.where(valid, lr, 0.0) * c)
    tl.store(lse_ptr + row, lse)
    return g, wt


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


@triton.jit(do_not_specialize=["N", "epoch", "NX", "JB"])
def _fused_rows_kernel(
    x_ptr, sxb, sxt, sxv, o_ptr, sob, sot, sov, T, V, N, P,
    tgt_ptr, ignore_index, w_ptr, wsum_ptr, g_ptr, wt_ptr,
    m_ptr, s_ptr, zt_ptr, sz_ptr, am_ptr, loss_ptr, lse_ptr, zp_ptr, den_ptr,
    gat_ptr, W, vocab_start, VG, wg_ptr, xch_ptr, peers_ptr, rank, epoch, NX, JB, loc_ptr,
    SEGW,
    one_minus_a, a_over_v, zl, zl2, w_total, scale, inv_cap, softcap, rcap,
    BLOCK: tl.constexpr, R: tl.constexpr, STAGES: tl.constexpr, REVERSE: tl.constexpr,
    HINTS: tl.constexpr, PREFETCH: tl.constexpr,
    SOFTCAP: tl.constexpr, SCALE: tl.constexpr, SMOOTH: tl.constexpr, HAS_W: tl.constexpr,
    ZLOSS: tl.constexpr, NEED_AM: tl.constexpr, COL64X: tl.constexpr, COL64O: tl.constexpr,
    FAST: tl.constexpr, NEED_GRAD: tl.constexpr, ROW_OUT: tl.constexpr,
    SCALE_MODE: tl.constexpr, GATHERED: tl.constexpr, NF: tl.constexpr, PEER: tl.constexpr,
    TVEC: tl.constexpr, EARLY: tl.constexpr, SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr,
):
    # P programs; program pid takes rows pid, pid + P, ... (P = N: one row each).
    # ROW_OUT = False: statistics out (m, s, z_t, sz, argmax), g and w_t read per row.
    # ROW_OUT = True: the loss itself out (loss row, lse, z-loss part, argmax; the loss rows
    # and z-loss parts already multiplied by the reduction factor c), g = c [t != ignore] and
    # w_t computed here; c = 1 (SCALE_MODE 0), 1 / den if den != 0 else 0 (1: "mean"), or
    # read (2: a normalizer). This saves the ~20 small launches of the row terms and the row
    # loss around the kernel, which at V = 32000 cost more host time than the kernel runs.
    # GATHERED (vocabulary parallel, with ROW_OUT): no pass 1; the row statistics of the W
    # shards, all-gathered as gat [W, NF, N] (m, s, z_t, argmax bits, sz), are folded here
    # (the spec's combine), and pass 2 writes this rank's columns [vocab_start,
    # vocab_start + V) of the gradient of the whole-vocabulary (VG) loss.
    # PEER (vocabulary parallel, with ROW_OUT, instead of GATHERED): pass 1 on this shard,
    # then the row's statistics are exchanged with the other ranks' programs of the same row
    # through symmetric memory (_publish_row, _fold_row) and folded; pass 2 then re-reads the shard
    # from L2, as in the unsharded kernel. The programs of the W ranks wait on each other
    # row by row, so the grid must be persistent (every program resident).
    # SPLIT > 1 (not with GATHERED): the row is cut into SPLIT segments of SEGW columns, each
    # taken by one of SPLIT cooperating programs (a group), which exchange their segments'
    # statistics as PEER ranks do, through loc [1 + 2 * (P / SPLIT) * SPLIT * 8] int64
    # (zeroed by the caller): word 0 is a ticket counter, then slot [k % 2, group, part]
    # holds a part's record of its k-th row, tagged row + 1. Each segment is then short
    # enough for its second read to hit L2 (the rows in flight shrink SPLIT-fold). Programs
    # take their place (group, part) from the ticket in the order they start, so a group's
    # members wait only on programs that are already running or come next. With PEER the
    # segments' records go through the ranks' exchange buffers instead (slot rank x SPLIT +
    # part, every rank's parts folded as one tile); every rank cuts its shard into the same
    # number of segments, some of them empty where shards are uneven (m = -inf, s = 0).
    if SPLIT > 1:
        pid = tl.atomic_add(loc_ptr, 1).to(tl.int32)
        part = pid % SPLIT
        grp = pid // SPLIT
        PG = P // SPLIT
        c0 = part * SEGW
        VL = tl.minimum(V - c0, SEGW)
        w_ptr += c0
    else:
        pid = tl.program_id(0)
        part = 0
        grp = pid
        PG = P
        c0 = 0
        VL = V
    if SCALE_MODE == 1:
        den = tl.load(den_ptr).to(tl.float32)
        c = tl.where(den != 0.0, 1.0 / den, 0.0)
    elif SCALE_MODE == 2:
        c = tl.load(den_ptr).to(tl.float32)
    else:
        c = 1.0
    NT: tl.constexpr = BLOCK // R
    lane = tl.arange(0, NT)
    offs = lane[:, None] * R + tl.arange(0, R)[None, :]
    if HAS_W and SMOOTH:
        wsum = tl.load(wsum_ptr).to(tl.float32)
    else:
        wsum = w_total  # V (W is only used with smoothing)
    for row in range(grp, N, PG):
        x0 = c  # (pass 2's preloaded first chunk in EARLY mode; unused otherwise)
        xb = _row_ptr(x_ptr, row, T, sxb, sxt)
        if SPLIT > 1:
            xb += _col_off(c0, sxv, COL64X)
        tv = tl.load(tgt_ptr + row).to(tl.int64)
        tloc = tv - vocab_start - c0
        has = (tv != ignore_index) & (tloc >= 0) & (tloc < VL)
        tsafe = tl.where(has, tloc, 0)
        if GATHERED:
            m, ss, szs, am, zt = _fold_gathered(gat_ptr, row, N, W, NF)
        else:
            # read before pass 2 overwrites it (in place)
            xt = tl.load(xb + tsafe * sxv, mask=has, other=0.0)
            zt = tl.where(has, _z_of(xt, scale, inv_cap, softcap, SOFTCAP, SCALE), 0.0)
            m, ss, szs, am = _pass1(xb, 0, VL, offs, lane, w_ptr, sxv, scale, inv_cap,
                                    softcap, BLOCK, R, HINTS, PREFETCH, STAGES, SOFTCAP, SCALE,
                                    SMOOTH, HAS_W, NEED_AM, COL64X, FAST)
            if PEER or SPLIT > 1:
                if NEED_AM:
                    am = (am + c0 + vocab_start).to(tl.int32)
                if PEER:
                    # slot j = rank (x parts + part with SPLIT: then the rank's own parts
                    # read it too)
                    _publish_row(peers_ptr, row, NX, JB, rank * SPLIT + part, W, rank, epoch,
                                 m, ss, zt, am, szs, SPLIT > 1)
                else:
                    kk = (row - grp) // PG
                    first = loc_ptr + 1 + ((kk % 2) * PG + grp) * (SPLIT * 8)
                    tl.store(first + part * 8 + tl.arange(0, 8),
                             _record(m, ss, zt, am, szs, row + 1))
                if EARLY:
                    # pass 2's first chunk (its bounds need only the target and c), loaded
                    # while the other parts' records are awaited
                    vend0 = tl.where((tv != ignore_index) & (c != 0.0), VL, 0)
                    if REVERSE:
                        x0 = _load2(xb, (tl.cdiv(VL, BLOCK) - 1) * BLOCK + offs, sxv, vend0,
                                    HINTS, COL64X)
                    else:
                        x0 = _load2(xb, offs, sxv, vend0, HINTS, COL64X)
                if PEER:
                    ep = tl.full([], 0, tl.int64) + epoch
                    first = xch_ptr + ((ep & 1) * JB * NX + row) * 8
                    stride = (tl.full([], 0, tl.int64) + NX) * 8
                    if SPLIT > 1:
                        # the W x SPLIT records of the row, rank-major: one tile
                        m, ss, szs, am, zt = _fold_group(first, stride, W * SPLIT, SPLIT_P2,
                                                         rank * SPLIT + part, epoch, m, ss, zt,
                                                         am, szs)
                    else:
                        m, ss, szs, am, zt = _fold_row(first, stride, W, rank, epoch, m, ss,
                                                       zt, am, szs)
                else:
                    m, ss, szs, am, zt = _fold_group(first, 8, SPLIT, SPLIT_P2, part, row + 1,
                                                     m, ss, zt, am, szs)
        sh = tl.where(m == float("-inf"), 0.0, m)
        logs = tl.log(ss)
        lse = sh + logs
        if NEED_AM or not ROW_OUT:
            tl.store(am_ptr + row, am.to(tl.int64))
        if ROW_OUT:
            g, wt = _row_loss_out(row, tv, sh, logs, zt, szs, c, ignore_index, wg_ptr, VG,
                                  one_minus_a, a_over_v, zl, wsum, loss_ptr, lse_ptr, zp_ptr,
                                  HAS_W, SMOOTH, ZLOSS)
        else:
            tl.store(m_ptr + row, m)
            tl.store(s_ptr + row, ss)
            tl.store(zt_ptr + row, zt)
            tl.store(sz_ptr + row, szs)
            g = tl.load(g_ptr + row)
            wt = tl.load(wt_ptr + row)
        if NEED_GRAD:
            # rows without upstream gradient (ignored) read zeros in pass 2 (vend = 0); with
            # their m and lse taken as 0 and s as 1 their dx is exactly 0 even where their own
            # logits are NaN or inf (0 * exp(z - m) and the z-loss term 2 zl lse would be NaN)
            live = g != 0.0
            lse_g = tl.where(live, lse, 0.0)
            msh = tl.where(live, sh, 0.0)
            rs = 1.0 / tl.where(live, ss, 1.0)
            gct, crest, gsm = _grad_coefs(g, wt, lse_g, one_minus_a, a_over_v, wsum, zl2, scale,
                                          SOFTCAP, SCALE, ZLOSS)
            coef = (gct + crest) * rs
            # rows without upstream gradient are written as zeros, not read
            vend = tl.where(g != 0.0, VL, 0)
            ob = _row_ptr(o_ptr, row, T, sob, sot)
            if SPLIT > 1:
                ob += _col_off(c0, sov, COL64O)
            _pass2(xb, ob, 0, VL, vend, offs, w_ptr, sxv, sov, msh, rs, coef, crest, gsm, gct,
                   tl.where(has, tsafe, -1), scale, inv_cap, softcap, rcap, x0, BLOCK, HINTS,
                   PREFETCH, STAGES, REVERSE, SOFTCAP, SCALE, SMOOTH, HAS_W, COL64X, COL64O, FAST,
                   TVEC, EARLY)
            if not TVEC:
                # the target column, rewritten once the whole row is (the barrier orders it
                # after the vector store of the same column by another thread): the same
                # cancellation-free gct (p - 1) + p crest as in the vector, from z_t, which
                # was read before pass 2 (in place, the column is gone by now); p_t as pass 2
                # computes it (the same expression: the same contraction into an FMA)
                pt = _exp2((zt - msh) * _LOG2E, FAST) * rs
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


def split_buffer(words: int, device) -> torch.Tensor:
    """The zeroed int64 exchange buffer of SPLIT mode (a fresh one per call: an allocation
    and a memset, so the call stays capturable in a CUDA graph and needs no state)."""
    return torch.zeros(words, device=device, dtype=torch.int64)


def launch(x3, out, target, g0, w_t, weight, w_total, m, s, zt, sz, am, *, programs: int,
           block: int, num_warps: int, stages: int, reverse: bool, hints: int, prefetch: int,
           maxnreg, ignore_index: int, vocab_size: int, label_smoothing: float, z_loss: float,
           flags: dict, need_am: bool, col64x: bool, col64o: bool, fast: bool, launcher,
           row_out=None, need_grad: bool = True, scale_mode: int = 0, den=None,
           gathered=None, vocab_start: int = 0, weight_global=None, peer=None,
           tvec: bool = True, split: int = 1, early: bool = True, traced: bool = False):
    """Launch _fused_rows_kernel on ``programs`` programs (inputs checked and outputs
    allocated by the caller: see ce.tr_fused / ce.tr_fused_loss).

    row_out: None (statistics m, s, zt, sz, am out; g0 and w_t given per row) or the tuple
    (loss, lse, zpart) of [N] fp32 outputs (g0, w_t, m, s, zt, sz unused; ``den`` the 0-d
    denominator (scale_mode 1) or factor (scale_mode 2)). gathered: [W, NF, N] fp32 shard
    statistics (vocabulary parallel, with row_out; then ``weight`` is this rank's slice and
    ``weight_global`` the whole vector). peer: (xch, peers, rank, world, epoch), the
    symmetric-memory exchange of PEER mode (vocabulary parallel, with row_out, instead of
    gathered; see _publish_row). split: segments per row (SPLIT), each taken by one of
    ``split`` cooperating programs (not with gathered; with peer the same count on every
    rank, parts of narrow shards empty, and the buffer holds world x split slots);
    ``programs`` is then the number of programs that can be resident at once, and the grid
    min(rows, programs // split) groups of ``split`` (all of them with peer)."""
    B, T, V = _dims3(x3)
    n = B * T
    r = max(1, 16 // x3.element_size())
    if peer is not None:
        # every rank must cut its shard into the same number of parts (the exchange folds
        # world x split records per row): no cap from this shard's width, empty parts allowed
        split = max(1, min(int(split), MAX_SPLIT))
        if split > 1 and peer[0].shape[1] < peer[3] * split:
            raise ValueError("split: the exchange buffer has too few slots")
    else:
        split = max(1, min(int(split), MAX_SPLIT, _cdiv(V, block), int(programs)))
    if split > 1:
        if gathered is not None:
            raise ValueError("split: not with gathered statistics")
        segw = _cdiv(_cdiv(V, split), block) * block
        if peer is None:
            split = _cdiv(V, segw)  # (no empty segment)
            programs = min(n, programs // split) * split
        else:
            programs = (programs // split) * split  # all resident: every row's parts wait
        # (with PEER only the ticket is used)
        loc = split_buffer(1 if peer is not None else 1 + 2 * programs * 8, x3.device)
    else:
        segw, loc = V, None
    a = float(label_smoothing)
    anyf = am if row_out is None else row_out[1]

    def ph(t=None):
        # a pointer the kernel does not use (see ce._placeholder: distinct ones while traced)
        return t if t is not None else _placeholder(anyf, traced)

    if row_out is None:
        loss_p, lse_p, zp_p = ph(), ph(), ph()
    else:
        loss_p, lse_p, zp_p = row_out
        g0, w_t, m, s, zt, sz = ph(), ph(), ph(), ph(), ph(), ph()
    launcher(_fused_rows_kernel)[(programs,)](
        x3, *_strides3(x3), out, *_strides3(out), T, V, n, programs,
        target, ignore_index, ph(weight), ph(w_total), g0, w_t,
        m, s, zt, sz, am, loss_p, lse_p, zp_p, ph(den), ph(gathered),
        gathered.shape[0] if gathered is not None else (peer[3] if peer is not None else 1),
        int(vocab_start), int(vocab_size),
        ph(weight_global if weight_global is not None else weight),
        ph(peer[0] if peer is not None else None), ph(peer[1] if peer is not None else None),
        peer[2] if peer is not None else 0, peer[4] if peer is not None else 0,
        peer[0].shape[2] if peer is not None else 1, peer[0].shape[1] if peer is not None else 1,
        ph(loc), segw,
        1.0 - a, a / vocab_size, float(z_loss), 2.0 * float(z_loss), float(vocab_size),
        flags["scale"], flags["inv_cap"], flags["softcap"], flags["rcap"],
        BLOCK=max(block, r), R=r, STAGES=stages, REVERSE=reverse, HINTS=hints,
        PREFETCH=prefetch, SOFTCAP=flags["SOFTCAP"], SCALE=flags["SCALE"], SMOOTH=a > 0.0,
        HAS_W=weight is not None, ZLOSS=z_loss > 0.0, NEED_AM=need_am, COL64X=col64x,
        COL64O=col64o, FAST=fast, NEED_GRAD=need_grad, ROW_OUT=row_out is not None,
        SCALE_MODE=scale_mode, GATHERED=gathered is not None,
        NF=gathered.shape[1] if gathered is not None else 4, PEER=peer is not None, TVEC=tvec,
        EARLY=((peer is not None or split > 1) and need_grad and bool(prefetch) and early
               and row_out is not None),
        SPLIT=split,
        SPLIT_P2=_pow2(split * (peer[3] if peer is not None else 1)),
        num_warps=num_warps,
        **({} if maxnreg is None else {"maxnreg": maxnreg}),
    )
