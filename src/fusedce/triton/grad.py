"""The gradient kernels (dx from given row statistics; one read, one write) and the scaling
kernel, with their ops tr_grad, tr_entropy_grad, tr_scale_ and tr_scale_rows_.

_grad_kernel: dx from per-row lse / g / c_p / c_t (CE) or lse / H / g (entropy), for
vocabulary shards, the lazy backward and the two-kernel fallback. _scale_kernel: buf *= f
(one 0-d factor, read on the device: f == 1 touches no memory) or per-row factors (rows with
f == 1 are skipped).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import configs, launch
from .common import INTERPRET, _chain, _col_off, _row_ptr, _to_out, _z_of, transform_flags


@triton.jit
def _grad_kernel(
    x_ptr, sxb, sxt, sxv, o_ptr, sob, sot, sov, T, V,
    tgt_ptr, ignore_index, vocab_start, w_ptr,
    m_ptr, s_ptr, g_ptr, cp_ptr, ct_ptr, ent_ptr,
    a_over_v, scale, inv_cap, softcap, rcap,
    BLOCK: tl.constexpr, SOFTCAP: tl.constexpr, SCALE: tl.constexpr, SMOOTH: tl.constexpr,
    COL64X: tl.constexpr, COL64O: tl.constexpr,
):
    """dx of BLOCK columns of one row (program (row, block)) into o [B, T, V] (may be x).

    x_ptr, sxb, sxt, sxv / o_ptr, sob, sot, sov: logits / gradient and their strides; T, V:
    rows per batch, columns; tgt_ptr [B*T] global target ids (CE; None for the entropy),
    ignore_index, vocab_start (the first column's global id); w_ptr [V] fp32 class weights of
    the smoothing term, or None; m_ptr, s_ptr, g_ptr [B*T]: the row's maximum, sum of exp(z -
    m), upstream gradient (rows with g = 0 are written as zeros, never read); cp_ptr, ct_ptr
    [B*T]: c_p and c_t (CE); ent_ptr [B*T]: the entropy H (entropy gradient), else None;
    a_over_v: a / V; scale, inv_cap, softcap, rcap: the transform (_z_of) and 1 / softcap.
    BLOCK: columns per program; SOFTCAP, SCALE: the transform; SMOOTH: label smoothing;
    COL64X, COL64O: 64-bit column offsets of x / o.
    """
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
    if ent_ptr is not None:
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
            if w_ptr is not None:
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
    """buf [B, T, V] (b_ptr, strides sb, st, sv; T rows per batch, N rows) *= f: one 0-d
    factor f_ptr (PER_ROW False; 1 touches no memory) or f_ptr[row] (rows with 1 skipped);
    P programs loop over the rows; BLOCK columns per chunk; COL64: 64-bit column offsets."""
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


def _launch_grad(x3, out, target, weight, m, s, g, cp, ct, ent, vocab_start, ignore_index,
                 a_over_v, logit_scale, softcap, smooth):
    B, T, V = launch.dims3(x3)
    n = B * T
    if n == 0 or V == 0:
        return
    block = configs.grad_block(V, x3.element_size())
    cap = float(softcap) if softcap is not None else 1.0
    launch.launcher(_grad_kernel)[(n, launch.cdiv(V, block))](
        x3, *launch.strides3(x3), out, *launch.strides3(out), T, V,
        target, ignore_index, vocab_start, weight, m, s, g, cp, ct, ent,
        a_over_v, float(logit_scale), float(logit_scale) / cap, cap, 1.0 / cap,
        BLOCK=block, SMOOTH=smooth, COL64X=launch.col64(V, x3.stride(-1)),
        COL64O=launch.col64(V, out.stride(-1)), num_warps=max(1, min(8, block // 512)),
        **transform_flags(logit_scale, softcap),
    )


@launch.op("fusedce::tr_grad", mutates_args=("out",))
def tr_grad(
    x3: torch.Tensor, target: torch.Tensor, m: torch.Tensor, s: torch.Tensor, g: torch.Tensor,
    c_p: torch.Tensor, c_t: torch.Tensor, out: torch.Tensor, weight: Optional[torch.Tensor],
    vocab_start: int, vocab_size: int, ignore_index: int, label_smoothing: float,
    logit_scale: float, softcap: Optional[float],
) -> None:
    """out [B, T, V_local] = dx of the CE spec for per-row m, s (the whole row's maximum and
    sum of exp(z - m)), g, c_p, c_t ([B*T] fp32). ``out`` may be ``x3`` itself."""
    if launch.skip(x3, out):
        return
    _launch_grad(x3, out, target, weight, m, s, g, c_p, c_t, None, vocab_start, ignore_index,
                 label_smoothing / vocab_size, logit_scale, softcap, label_smoothing > 0.0)


@launch.op("fusedce::tr_entropy_grad", mutates_args=("out",))
def tr_entropy_grad(
    x3: torch.Tensor, m: torch.Tensor, s: torch.Tensor, ent: torch.Tensor, g: torch.Tensor,
    out: torch.Tensor, logit_scale: float, softcap: Optional[float],
) -> None:
    """out [B, T, V] = dH/dx * g for per-row m, s, H, g ([B*T] fp32); ``out`` may be ``x3``."""
    if launch.skip(x3, out):
        return
    _launch_grad(x3, out, None, None, m, s, g, None, None, ent, 0, -100, 0.0, logit_scale,
                 softcap, False)


def _launch_scale(buf3: torch.Tensor, factor: torch.Tensor, per_row: bool) -> None:
    B, T, V = launch.dims3(buf3)
    n = B * T
    if n == 0 or V == 0:
        return
    block = min(4096, launch.pow2(max(V, 16)))
    P = min(n, 8 * launch.sm_count(buf3.device)) if not INTERPRET else min(n, 3)
    launch.launcher(_scale_kernel)[(P,)](
        buf3, *launch.strides3(buf3), T, V, n, factor, P,
        BLOCK=block, PER_ROW=per_row, COL64=launch.col64(V, buf3.stride(-1)),
        num_warps=max(1, min(8, block // 512)),
    )


@launch.op("fusedce::tr_scale_", mutates_args=("buf3",))
def tr_scale_(buf3: torch.Tensor, factor: torch.Tensor) -> None:
    """buf3 [B, T, V] *= factor (0-d fp32, read on the device; 1 touches no memory)."""
    if launch.skip(buf3):
        return
    _launch_scale(buf3, factor, False)


@launch.op("fusedce::tr_scale_rows_", mutates_args=("buf3",))
def tr_scale_rows_(buf3: torch.Tensor, factor: torch.Tensor) -> None:
    """buf3[b, t, :] *= factor[b * T + t] (fp32 [B*T]); rows whose factor is 1 are skipped."""
    if launch.skip(buf3):
        return
    _launch_scale(buf3, factor, True)


__all__ = ["tr_grad", "tr_entropy_grad", "tr_scale_", "tr_scale_rows_"]
