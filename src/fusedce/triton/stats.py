"""The statistics kernels (forward only, one read of the logits) and their op tr_row_stats.

_stats_kernel: a program takes one (row, segment); a chunk of BLOCK columns is a
[BLOCK / R, R] tile whose R-column rows sit in single threads, so every thread keeps its own
running (m, s, am, sz, sez) with in-thread reductions and one exp per element (plus one per
R); threads fold once per row. Segments > 1 (few, long rows) write partials that
_fold_kernel combines.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import configs, launch
from .common import (_NO_AM, _chunk_stats, _col_off, _fold, _fold_threads,
                     _rescale_sez, _row_ptr, _sez_step, _z_of, transform_flags)


@triton.jit
def _stats_kernel(
    x_ptr, sxb, sxt, sxv, T, V, S, seg_len,
    tgt_ptr, ignore_index, vocab_start, w_ptr,
    scale, inv_cap, softcap,
    m_ptr, s_ptr, zt_ptr, sz_ptr, am_ptr, sez_ptr,
    BLOCK: tl.constexpr, SOFTCAP: tl.constexpr, SCALE: tl.constexpr,
    NEED_SZ: tl.constexpr, NEED_AM: tl.constexpr, COL64: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """Per-row (or per-segment) statistics of logits x [B, T, V] (any strides).

    x_ptr, sxb, sxt, sxv: logits and their strides; T, V: rows per batch, columns; S,
    seg_len: segments per row and their width (a multiple of BLOCK); tgt_ptr [B*T] global
    target ids, ignore_index, vocab_start (the first column's global id); w_ptr [V] fp32
    class weights of sum w z, or None; scale, inv_cap, softcap: the transform (_z_of);
    m_ptr, s_ptr, zt_ptr, sz_ptr, am_ptr [B*T*S]: maximum, sum of exp(z - m), target z (seg 0
    only), sum w z, first argmax (global id, -1 unless NEED_AM); sez_ptr: sum exp(z - m)
    (z - m), or None. BLOCK: columns per chunk; SOFTCAP, SCALE: the transform; NEED_SZ: sum
    w z; NEED_AM: argmax; COL64: 64-bit column offsets; PREFETCH: the next chunk is loaded
    before the current one is reduced.
    """
    # R contiguous columns per thread: 16-byte loads
    R: tl.constexpr = 128 // x_ptr.dtype.element_ty.primitive_bitwidth
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
            SCALE, NEED_SZ, w_ptr is not None, NEED_AM)
        if sez_ptr is not None:
            sez = _sez_step(sez, s_old, m_old, alpha, z, e, m)

    mm, ss, szs, amm = _fold_threads(m, s, sz, am, lane, NEED_AM)
    tl.store(m_ptr + pid, mm)
    tl.store(s_ptr + pid, ss)
    tl.store(zt_ptr + pid, zt)
    tl.store(sz_ptr + pid, szs)
    if NEED_AM:
        tl.store(am_ptr + pid, amm.to(tl.int64) + vocab_start)
    else:
        tl.store(am_ptr + pid, tl.full([], -1, tl.int64))
    if sez_ptr is not None:
        tl.store(sez_ptr + pid, tl.sum(_rescale_sez(sez, s, m, mm), axis=0))


@triton.jit
def _fold_kernel(
    pm, ps, pzt, psz, pam, psez,
    m_ptr, s_ptr, zt_ptr, sz_ptr, am_ptr, sez_ptr,
    N, S,
    ROWS: tl.constexpr, SP2: tl.constexpr,
):
    """Fold the S segments' partials of each of N rows (_stats_kernel's outputs [N, S]:
    pm, ps, pzt, psz, pam, psez or None) into per-row outputs m_ptr ... sez_ptr [N] (sez_ptr
    None with psez). ROWS: rows per program; SP2: S rounded up to a power of two."""
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    segs = tl.arange(0, SP2)
    rmask = rows < N
    mask = rmask[:, None] & (segs[None, :] < S)
    idx = rows.to(tl.int64)[:, None] * S + segs[None, :]
    m = tl.load(pm + idx, mask=mask, other=float("-inf"))
    amv = tl.load(pam + idx, mask=mask, other=_NO_AM)
    # segments hold increasing columns: the smallest argmax among those holding the maximum
    # is the first of them (segment 0's where none does)
    mm, s, am = _fold(m, tl.load(ps + idx, mask=mask, other=0.0), amv, 1)
    am = tl.where(am == _NO_AM, tl.sum(tl.where(segs[None, :] == 0, amv, 0), axis=1), am)
    zt = tl.sum(tl.load(pzt + idx, mask=mask, other=0.0), axis=1)
    sz = tl.sum(tl.load(psz + idx, mask=mask, other=0.0), axis=1)
    tl.store(m_ptr + rows, mm, mask=rmask)
    tl.store(s_ptr + rows, s, mask=rmask)
    tl.store(zt_ptr + rows, zt, mask=rmask)
    tl.store(sz_ptr + rows, sz, mask=rmask)
    tl.store(am_ptr + rows, am, mask=rmask)
    if sez_ptr is not None:
        sez = tl.sum(_rescale_sez(tl.load(psez + idx, mask=mask, other=0.0),
                                  tl.load(ps + idx, mask=mask, other=0.0), m, mm[:, None]),
                     axis=1)
        tl.store(sez_ptr + rows, sez, mask=rmask)


@launch.op("fusedce::tr_row_stats", mutates_args=())
def tr_row_stats(
    x3: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], vocab_start: int,
    ignore_index: int, logit_scale: float, softcap: Optional[float], need_sz: bool,
    need_sez: bool, need_am: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Statistics (m, s, zt, sz, am, sez) of every row of x3 [B, T, V_local] (sez empty
    unless need_sez; am = -1 unless need_am); target [B*T] global ids; weight [V_local] fp32
    or None."""
    B, T, V = launch.dims3(x3)
    n = B * T
    dev = x3.device
    f32 = torch.float32
    outs = [torch.empty(n, device=dev, dtype=f32) for _ in range(4)]
    am = torch.empty(n, device=dev, dtype=torch.int64)
    sez = torch.empty(n if need_sez else 0, device=dev, dtype=f32)
    if n == 0 or launch.skip(x3):
        return outs[0], outs[1], outs[2], outs[3], am, sez
    cfg = configs.stats_config(V, x3.element_size())
    n_blocks = launch.cdiv(V, cfg.block)
    # enough programs to fill the device: split rows into segments only when rows are few
    want = 8 * launch.sm_count(dev)
    S = max(1, min(n_blocks, launch.cdiv(want, n)))
    seg_len = launch.cdiv(n_blocks, S) * cfg.block
    S = launch.cdiv(V, seg_len)
    if S == 1:
        dst = outs + [am, sez]
    else:
        dst = [torch.empty(n * S, device=dev, dtype=f32) for _ in range(4)]
        dst += [torch.empty(n * S, device=dev, dtype=torch.int64),
                torch.empty(n * S if need_sez else 0, device=dev, dtype=f32)]
    cap = float(softcap) if softcap is not None else 1.0
    r = max(1, 16 // x3.element_size())
    launch.launcher(_stats_kernel)[(n * S,)](
        x3, *launch.strides3(x3), T, V, S, seg_len,
        target, ignore_index, vocab_start, weight,
        float(logit_scale), float(logit_scale) / cap, cap,
        dst[0], dst[1], dst[2], dst[3], dst[4], dst[5] if need_sez else None,
        BLOCK=max(cfg.block, r), NEED_SZ=need_sz, NEED_AM=need_am,
        COL64=launch.col64(V, x3.stride(-1)), PREFETCH=cfg.prefetch,
        num_warps=cfg.num_warps, **transform_flags(logit_scale, softcap),
    )
    if S > 1:
        rows = 64
        launch.launcher(_fold_kernel)[(launch.cdiv(n, rows),)](
            dst[0], dst[1], dst[2], dst[3], dst[4], dst[5] if need_sez else None,
            outs[0], outs[1], outs[2], outs[3], am, sez if need_sez else None,
            n, S, ROWS=rows, SP2=launch.pow2(S), num_warps=4,
        )
    return outs[0], outs[1], outs[2], outs[3], am, sez


__all__ = ["tr_row_stats"]
