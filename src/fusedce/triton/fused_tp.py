"""Fused forward + gradient of cross-entropy over a vocabulary shard (vocabulary parallel):
the kernels, their launchers and the op tr_fused_loss_tp (plus tr_fused_loss_peer, eager
only).

Each rank holds columns [vocab_start, vocab_start + V) of a VG-column vocabulary. The loss
and the gradient need the whole row's statistics, which come from the other ranks either

  GATHERED  all-gathered before the kernel (gat [W, NF, N]: m, s, z_t, argmax bits, sz of
            every shard, one collective), folded here (_fold_gathered); no pass 1; or
  PEER      exchanged by the ranks' kernels themselves, row by row, through symmetric
            memory (fusedce.peer): pass 1 on this shard, the row's record stored into every
            rank's exchange buffer (_publish_row), the other ranks' records awaited and folded
            (_fold_row), then pass 2 re-reads the shard from L2 as the single-device kernel
            does. The programs of the W ranks wait on each other row by row, so the grid is
            persistent (every program resident). Shard rows may be cut into SPLIT parts too,
            every part's record going through the ranks' buffers (slot rank x SPLIT + part,
            every rank's parts folded as one tile, fused._fold_group); every rank cuts its
            shard into the same number of parts, some empty where shards are uneven.

Both write the whole-vocabulary loss rows and this shard's columns of their gradient; the row
passes, the loss and the gradient coefficients are fused.py's.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import configs, launch
from ..peer import PeerExchange
from .common import _NO_AM, _col_off, _combine, _row_ptr, scalars, transform_flags
from .fused import (_first_chunk, _fold_group, _pass1, _record, _reduction_factor, _row_grad,
                    _row_loss_out, _row_target, block_of, kernel_cfg, reduction, split_buffer)

# ----------------------------------------------------------------------------- exchanges


@triton.jit
def _fold_gathered(gat_ptr, row, N, W, NF: tl.constexpr):
    """(m, s, sz, argmax, z_t) of a row from the W shards' statistics gat [W, NF, N]: the
    maximum, every s combined to it, sums of z_t and sz, the smallest id among the shards
    that hold the maximum (shard 0's if none does)."""
    m = tl.load(gat_ptr + row)
    for k in range(1, W):
        m = tl.maximum(m, tl.load(gat_ptr + k * NF * N + row))
    s = 0.0
    zt = 0.0
    sz = 0.0
    am0 = tl.load(gat_ptr.to(tl.pointer_type(tl.int32)) + 3 * N + row)
    am = _NO_AM
    for k in range(0, W):
        base = gat_ptr + k * NF * N + row
        mk = tl.load(base)
        s += _combine(tl.load(base + N), mk, m)
        zt += tl.load(base + 2 * N)
        if NF > 4:
            sz += tl.load(base + 4 * N)
        amk = tl.load(gat_ptr.to(tl.pointer_type(tl.int32)) + k * NF * N + 3 * N + row)
        am = tl.where(mk == m, tl.minimum(am, amk), am)
    am = tl.where(am == _NO_AM, am0, am)
    return m, s, sz, am, zt


@triton.jit
def _publish_row(peers_ptr, row, NX, JB, j, W, rank, epoch, m, s, zt, am, sz,
                 SELF: tl.constexpr):
    """Store this program's statistics of one row into every rank's exchange buffer.

    Each rank's exchange buffer is int64 [2, JB, NX, 8], NX >= rows, JB >= W slots per row
    (symmetric memory: every rank can store into every rank's buffer; peers_ptr holds their
    addresses). The program writes its record of row i (fused._record, tagged with the call's
    epoch) into slot [epoch % 2, j, i] of every other rank's buffer (j = its rank, or with
    SPLIT rank x parts + part, and then of its own rank's buffer too: SELF). Two parities
    suffice: a rank finishes call e + 1 only after every rank started it, i.e. after every
    rank read all of call e's records."""
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
    ``first + q * stride`` (part ``rank``'s own from its registers, the same bits it
    published), waiting for the ones not yet tagged ``tag``; the combine online (s rescaled
    as the maximum grows; exp(0) = 1 exactly, so for W = 2 the result is the two-pass one);
    the argmax is the smallest id among the parts that hold the maximum. Every part folds the
    same values in the same order: the same loss."""
    ep = tl.full([], 0, tl.int64) + tag
    mx = tl.full([], float("-inf"), tl.float32)
    ss = 0.0
    zs = 0.0
    szs = 0.0
    amm = _NO_AM
    for q in range(0, W):
        if q == rank:
            mk, sk, ztk, amk, szk = m, s, zt, am, sz
        else:
            mk, sk, ztk, amk, szk = _await_record(first + q * stride, ep)
        mn = tl.maximum(mx, mk)
        ss = _combine(ss, mx, mn) + _combine(sk, mk, mn)
        amm = tl.where(mk > mx, amk, tl.where(mk == mx, tl.minimum(amm, amk), amm))
        mx = mn
        zs += ztk
        szs += szk
    return mx, ss, szs, amm, zs


# ----------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["N"])
def _fused_gathered_kernel(
    x_ptr, sx, o_ptr, so, T, V, N, P,
    tgt_ptr, ignore_index, w_ptr, wg_ptr, wsum_ptr,
    den_ptr, loss_ptr, lse_ptr, zp_ptr, am_ptr, gat_ptr, vp, sc,
    CFG: tl.constexpr, SOFTCAP: tl.constexpr, SCALE: tl.constexpr, SMOOTH: tl.constexpr,
    SCALE_MODE: tl.constexpr, NF: tl.constexpr,
):
    """GATHERED: the whole-vocabulary loss rows and this shard's gradient from gathered
    statistics. Parameters as fused._fused_rows_kernel's (x, o: this shard's columns; no
    SPLIT), and: w_ptr [V] / wg_ptr [VG]: this shard's / the whole class-weight vector (or
    None); gat_ptr [W, NF, N] fp32: every shard's (m, s, z_t, argmax bits, sz: NF = 5 with
    smoothing, else 4); vp: (vocab_start, VG, W): this shard's first column, the vocabulary
    size, the number of shards.
    """
    BLOCK: tl.constexpr = CFG[0]
    REVERSE: tl.constexpr = CFG[1]
    CG: tl.constexpr = CFG[2]
    COL64X: tl.constexpr = CFG[4]
    COL64O: tl.constexpr = CFG[5]
    R: tl.constexpr = 128 // x_ptr.dtype.element_ty.primitive_bitwidth
    HAS_W: tl.constexpr = w_ptr is not None
    NEED_AM: tl.constexpr = am_ptr is not None
    vocab_start, VG, W = vp
    one_minus_a, a_over_v, zl, zl2, w_total, scale, inv_cap, softcap, rcap = sc
    c = _reduction_factor(den_ptr, SCALE_MODE)
    NT: tl.constexpr = BLOCK // R
    lane = tl.arange(0, NT)
    offs = lane[:, None] * R + tl.arange(0, R)[None, :]
    if HAS_W and SMOOTH:
        wsum = tl.load(wsum_ptr).to(tl.float32)
    else:
        wsum = w_total  # V (W is only used with smoothing)
    for row in range(tl.program_id(0), N, P):
        xb = _row_ptr(x_ptr, row, T, sx[0], sx[1])
        tv = tl.load(tgt_ptr + row).to(tl.int64)
        tloc = tv - vocab_start
        has = (tv != ignore_index) & (tloc >= 0) & (tloc < V)
        tsafe = tl.where(has, tloc, 0)
        m, ss, szs, am, zt = _fold_gathered(gat_ptr, row, N, W, NF)
        sh = tl.where(m == float("-inf"), 0.0, m)
        logs = tl.log(ss)
        lse = sh + logs
        if NEED_AM:
            tl.store(am_ptr + row, am.to(tl.int64))
        g, wt = _row_loss_out(row, tv, sh, logs, zt, szs, c, ignore_index, wg_ptr, VG, wsum, sc,
                              loss_ptr, lse_ptr, zp_ptr, HAS_W, SMOOTH)
        if o_ptr is not None:
            ob = _row_ptr(o_ptr, row, T, so[0], so[1])
            _row_grad(xb, ob, V, offs, w_ptr, sx[2], so[2], g, wt, lse, sh, ss, zt, has, tsafe,
                      wsum, 0.0, sc, BLOCK, REVERSE, CG, SOFTCAP, SCALE, SMOOTH, HAS_W,
                      zp_ptr is not None, COL64X, COL64O, False)


@triton.jit(do_not_specialize=["N", "epoch", "NX", "JB"])
def _fused_peer_kernel(
    x_ptr, sx, o_ptr, so, T, V, N, P,
    tgt_ptr, ignore_index, w_ptr, wg_ptr, wsum_ptr,
    den_ptr, loss_ptr, lse_ptr, zp_ptr, am_ptr,
    xch_ptr, peers_ptr, epoch, NX, JB, vp, loc_ptr, SEGW, sc,
    CFG: tl.constexpr, SOFTCAP: tl.constexpr, SCALE: tl.constexpr, SMOOTH: tl.constexpr,
    SCALE_MODE: tl.constexpr,
):
    """PEER: the whole-vocabulary loss rows and this shard's gradient, the shard statistics
    exchanged with the other ranks' kernels. Parameters as _fused_gathered_kernel's (loc_ptr,
    SEGW, SPLIT as fused._fused_rows_kernel's; loc_ptr holds only the ticket), and: xch_ptr:
    this rank's exchange buffer int64 [2, JB, NX, 8]; peers_ptr [W] int64: every rank's
    buffer address; epoch: this call's number (tags the records; its parity picks the
    buffer half); vp: (vocab_start, VG, W, rank).
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
    vocab_start, VG, W, rank = vp
    one_minus_a, a_over_v, zl, zl2, w_total, scale, inv_cap, softcap, rcap = sc
    if SPLIT > 1:
        pid = tl.atomic_add(loc_ptr, 1).to(tl.int32)
        part = pid % SPLIT
        grp = pid // SPLIT
        PG = P // SPLIT
        c0 = part * SEGW
        VL = tl.minimum(V - c0, SEGW)
        if HAS_W:
            w_ptr += c0
    else:
        part = 0
        grp = tl.program_id(0)
        PG = P
        c0 = 0
        VL = V
    c = _reduction_factor(den_ptr, SCALE_MODE)
    NT: tl.constexpr = BLOCK // R
    lane = tl.arange(0, NT)
    offs = lane[:, None] * R + tl.arange(0, R)[None, :]
    if HAS_W and SMOOTH:
        wsum = tl.load(wsum_ptr).to(tl.float32)
    else:
        wsum = w_total  # V (W is only used with smoothing)
    for row in range(grp, N, PG):
        x0 = c  # (pass 2's first chunk, loaded while the records are awaited)
        xb = _row_ptr(x_ptr, row, T, sx[0], sx[1])
        if SPLIT > 1:
            xb += _col_off(c0, sx[2], COL64X)
        tv = tl.load(tgt_ptr + row).to(tl.int64)
        has, tsafe, zt = _row_target(xb, tv, ignore_index, vocab_start + c0, VL, sx[2], scale,
                                     inv_cap, softcap, SOFTCAP, SCALE)
        m, ss, szs, am = _pass1(xb, VL, offs, lane, w_ptr, sx[2], scale, inv_cap, softcap,
                                BLOCK, R, SOFTCAP, SCALE, SMOOTH, HAS_W, NEED_AM, COL64X)
        if NEED_AM:
            am = (am + c0 + vocab_start).to(tl.int32)
        # slot j = rank (x parts + part with SPLIT: then the rank's own parts read it too)
        _publish_row(peers_ptr, row, NX, JB, rank * SPLIT + part, W, rank, epoch, m, ss, zt,
                     am, szs, SPLIT > 1)
        if o_ptr is not None:
            x0 = _first_chunk(xb, (tv != ignore_index) & (c != 0.0), VL, offs, sx[2], BLOCK,
                              REVERSE, COL64X)
        ep = tl.full([], 0, tl.int64) + epoch
        first = xch_ptr + ((ep & 1) * JB * NX + row) * 8
        stride = (tl.full([], 0, tl.int64) + NX) * 8
        if SPLIT > 1:
            # the W x SPLIT records of the row, rank-major: one tile
            m, ss, szs, am, zt = _fold_group(first, stride, W * SPLIT, P2, rank * SPLIT + part,
                                             epoch, m, ss, zt, am, szs)
        else:
            m, ss, szs, am, zt = _fold_row(first, stride, W, rank, epoch, m, ss, zt, am, szs)
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
                      zp_ptr is not None, COL64X, COL64O, True)


# ----------------------------------------------------------------------------- launchers


def _fused_loss_tp(x3, target, weight, w_total, den, out, vocab_start, ignore_index,
                   vocab_size, label_smoothing, z_loss, logit_scale, softcap, need_am,
                   scale_mode, gathered=None, peer=None, epoch=0):
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
    need_grad = out is not None
    pc = (configs._peer_config(vocab_size, peer.world, x3.element_size())
          if peer is not None and need_grad else None)
    cfg, P, maxnreg = configs.rows_grid(x3, out, softcap, weight, need_grad, peer is not None,
                                        False, traced=False, peer_cfg=pc)
    block = block_of(cfg, x3)
    w_local = None if weight is None else weight[vocab_start:vocab_start + V]
    wsum = w_total if (weight is not None and label_smoothing > 0.0) else None
    den_ptr, mode = reduction(den, scale_mode)
    head = (x3, launch.strides3(x3), out,
            launch.strides3(out) if need_grad else (0, 0, 0), T, V, n)
    rows = (target, ignore_index, w_local, weight, wsum, den_ptr, loss, lse,
            zp if z_loss > 0.0 else None, am if need_am else None)
    sc = scalars(logit_scale, softcap, label_smoothing, vocab_size, z_loss)
    flags = dict(SMOOTH=label_smoothing > 0.0, SCALE_MODE=mode, num_warps=cfg.num_warps,
                 **transform_flags(logit_scale, softcap),
                 **({} if maxnreg is None else {"maxnreg": maxnreg}))
    if gathered is not None:
        launch.launcher(_fused_gathered_kernel)[(P,)](
            *head, P, *rows, gathered, (int(vocab_start), int(vocab_size), gathered.shape[0]),
            sc, CFG=kernel_cfg(cfg, x3, out, block, 1, 1), NF=gathered.shape[1], **flags)
        return loss, lse, zp, am
    # every rank must cut its shard into the same number of parts (the exchange folds
    # world x split records per row): no cap from this shard's width, empty parts allowed
    split = max(1, min(int(cfg.split), configs.MAX_SPLIT))
    if split > 1 and peer.xch.shape[1] < peer.world * split:
        raise ValueError("split: the exchange buffer has too few slots")
    segw = launch.cdiv(launch.cdiv(V, split), block) * block if split > 1 else V
    P = (P // split) * split  # all resident: every row's parts wait
    launch.launcher(_fused_peer_kernel)[(P,)](
        *head, P, *rows, peer.xch, peer.peers, int(epoch), peer.xch.shape[2],
        peer.xch.shape[1], (int(vocab_start), int(vocab_size), int(peer.world), int(peer.rank)),
        split_buffer(1, dev) if split > 1 else None, segw, sc,
        CFG=kernel_cfg(cfg, x3, out, block, split, split * peer.world), **flags)
    return loss, lse, zp, am


@launch.op("fusedce::tr_fused_loss_tp", mutates_args=("out",), opaque=True)
def tr_fused_loss_tp(
    x3: torch.Tensor, target: torch.Tensor, gathered: torch.Tensor, weight: Optional[torch.Tensor],
    w_total: Optional[torch.Tensor], den: Optional[torch.Tensor], out: torch.Tensor,
    vocab_start: int, ignore_index: int, vocab_size: int, label_smoothing: float,
    z_loss: float, logit_scale: float, softcap: Optional[float], need_am: bool,
    scale_mode: int, need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fused.tr_fused_loss for a vocabulary shard x3 [B, T, V_local] (columns [vocab_start,
    vocab_start + V_local) of a vocab_size vocabulary) from the all-gathered shard
    statistics ``gathered`` [W, NF, B*T] (m, s, z_t, argmax bits, sz): the whole-vocabulary
    loss rows, lse, z-loss parts and argmax, and (need_grad) this shard's gradient in
    ``out``. weight: the whole class-weight vector [vocab_size] or None."""
    return _fused_loss_tp(x3, target, weight, w_total, den, out if need_grad else None,
                          vocab_start, ignore_index, vocab_size, label_smoothing, z_loss,
                          logit_scale, softcap, need_am, scale_mode, gathered=gathered)


def tr_fused_loss_peer(
    x3: torch.Tensor, target: torch.Tensor, peer: PeerExchange, epoch: int,
    weight: Optional[torch.Tensor], w_total: Optional[torch.Tensor],
    den: Optional[torch.Tensor], out: torch.Tensor, vocab_start: int, ignore_index: int,
    vocab_size: int, label_smoothing: float, z_loss: float, logit_scale: float,
    softcap: Optional[float], need_am: bool, scale_mode: int, need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """tr_fused_loss_tp with the shard statistics exchanged inside the kernel, row by row,
    through the ranks' exchange buffers (``peer``: its xch is this rank's int64 buffer [2,
    world x parts, >= B*T, 8], parts: configs.peer_parts; peers the buffers' addresses, rank
    order) instead of gathered before it; ``epoch`` this call's number (1 <= epoch < 2**31,
    the same on every rank, consecutive calls alternating in parity: peer.next_epoch()).
    Every rank of the group must make the same call at the same time: the kernel waits for
    the others' rows. Eager only (not registered with torch.library: the epoch changes with
    every call)."""
    if peer.xch.shape[2] < launch.dims3(x3)[0] * launch.dims3(x3)[1]:
        raise ValueError("exchange buffer too small for the rows")
    return _fused_loss_tp(x3, target, weight, w_total, den, out if need_grad else None,
                          vocab_start, ignore_index, vocab_size, label_smoothing, z_loss,
                          logit_scale, softcap, need_am, scale_mode, peer=peer, epoch=epoch)


launch.RAW["tr_fused_loss_peer"] = tr_fused_loss_peer
launch.opaque_only(_fused_gathered_kernel, _fused_peer_kernel)

__all__ = ["tr_fused_loss_tp", "tr_fused_loss_peer"]
