"""Pure-PyTorch backend: the executable spec (see :mod:`fusedce.spec` for the math).

Rows are processed in chunks, so at most one fp32 chunk of logits (``rows x V_local``)
exists at a time. The forward keeps only the per-row statistics (m, s, z_t, sum w*z,
argmax); the backward recomputes z for each chunk and writes

    dx_j = g * (p_j * c_p - c_t * [j = t] - (a / V) * w_j) * dz/dx,   p_j = exp(z_j - m) / s

straight into the gradient buffer (or into the logits themselves with inplace_backward).
The same functions serve a vocabulary shard: ``vocab_start`` maps global target ids to
local columns, and the statistics are combined across ranks by :mod:`fusedce.distributed`.
"""

from __future__ import annotations

from typing import Optional

import torch

from .layout import iter_row_chunks, row_slice
from .spec import LossOptions, RowStats, chain_factor, default_chunk_rows, transform

name = "torch"
supports_fused = False
optional_argmax = True  # row_stats(need_am=False) skips the argmax (only the accuracy needs it)


def _chunk_rows(x3: torch.Tensor) -> int:
    """Rows per chunk: 32 MB of fp32 logits on GPUs, 8 MB on CPUs, where the chunk's passes
    then run from the last-level cache and its temporaries stay below glibc's mmap threshold
    (no page faults per chunk): 5-14% faster than 32 MB chunks on a 2-core CPU at V =
    32000-128256."""
    V = x3.shape[-1]
    return default_chunk_rows(V, (8 << 20) if x3.device.type == "cpu" else (32 << 20))


def _local_target(target: torch.Tensor, valid: torch.Tensor, vocab_start: int, v_local: int):
    """(each row's target column in this piece, clamped into it; whether it lies there)."""
    t = target.long()
    if vocab_start:
        t = t - vocab_start
    local = t.clamp(0, max(v_local - 1, 0))
    # clamping moves exactly the ids outside [0, v_local)
    return local, (local == t) & valid


def _joined(parts: list) -> torch.Tensor:
    """The per-chunk pieces of a row field as one [N] tensor (no copy for one chunk)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def row_stats(x3: torch.Tensor, target: torch.Tensor, opts: LossOptions, *, vocab_start: int = 0,
              weight_local: Optional[torch.Tensor] = None, need_sz: bool = False,
              need_sez: bool = False, chunk_rows: Optional[int] = None,
              need_am: bool = True) -> RowStats:
    """Statistics of the local vocabulary piece for every row.

    Args:
        x3: logits [B, T, V_local], any strides and float dtype.
        target: [B*T] global ids (ignored rows hold opts.ignore_index).
        weight_local: class weights of the local columns [V_local], or None.
        need_sz: compute sum_j w_j z_j (label smoothing).
        need_sez: compute sum_j exp(z_j - m) (z_j - m) (entropy).
        need_am: compute the argmax (else am holds -1).
    Returns:
        RowStats with [B*T] fields (fp32; am int64 global column ids).
    """
    B, T, V = x3.shape
    n = B * T
    dev = x3.device
    valid = target != opts.ignore_index
    local, inside = _local_target(target, valid, vocab_start, V)
    wl = None if weight_local is None else weight_local.float()
    # each chunk's fields are kept and joined once (one chunk, the common small case, costs
    # no copies: each small op is a few microseconds, as much as a small chunk's passes)
    ms, ss, zts, szs, ams, sezs = [], [], [], [], [], []
    for r0, r1, view in iter_row_chunks(x3, chunk_rows or _chunk_rows(x3)):
        z = transform(view.reshape(-1, V), opts)
        if need_am:
            mc, ac = z.max(dim=-1)
            ams.append(ac + vocab_start if vocab_start else ac)
        else:
            mc = z.amax(dim=-1)
        if need_sez:
            # an all -inf row has no finite shift; use 0 so that s = 0 and lse = -inf
            shift = torch.where(torch.isneginf(mc), 0.0, mc)
            zs = z - shift.unsqueeze(1)
            e = zs.exp()
            ss.append(e.sum(dim=-1))
            # (z - m) exp(z - m) with exp(-inf) = 0 must give 0, not NaN
            sezs.append(torch.where(e > 0, e * zs, 0.0).sum(dim=-1))
            del e, zs
        else:
            # s = sum_j exp(z_j - m) from torch's fused softmax (faster on CPUs than the sub /
            # exp / sum passes, and than log_softmax): its largest entry, at the argmax where
            # z - m is exactly 0, is 1 / s (an all -inf row's NaN becomes s = 0)
            p_max = torch.softmax(z, dim=-1).amax(dim=-1)
            ss.append(p_max.reciprocal_().masked_fill_(torch.isneginf(mc), 0.0))
        ms.append(mc)
        zc = z.gather(1, local[r0:r1].unsqueeze(1)).squeeze(1)
        zts.append(torch.where(inside[r0:r1], zc, 0.0))
        if need_sz:
            szs.append(z.sum(dim=-1) if wl is None else z @ wl)
    if n == 0:
        empty = torch.empty(0, device=dev, dtype=torch.float32)
        ms = ss = zts = [empty]
    m, s, zt = _joined(ms), _joined(ss), _joined(zts)
    sz = _joined(szs) if szs else torch.zeros_like(m)
    am = _joined(ams) if ams else torch.full((n,), -1, device=dev, dtype=torch.int64)
    sez = None if not need_sez else _joined(sezs) if sezs else torch.empty_like(m)
    return RowStats(m, s, zt, sz, am, sez)


def grad(x3: torch.Tensor, target: torch.Tensor, m: torch.Tensor, s: torch.Tensor,
         g: torch.Tensor, c_p: torch.Tensor, c_t: torch.Tensor, opts: LossOptions, *,
         vocab_size: int, out: torch.Tensor, vocab_start: int = 0,
         weight_local: Optional[torch.Tensor] = None, chunk_rows: Optional[int] = None,
         whole_row: bool = False) -> None:
    """Write dx (in ``out``'s dtype) for the loss spec.

    Args:
        x3: logits [B, T, V_local].
        target, m, s, g, c_p, c_t: [B*T] (global ids; fp32 row maximum and sum of
            exp(z - m) over the whole vocabulary, upstream row gradient and the coefficients
            of :func:`fusedce.spec.grad_coefficients`).
        vocab_size: the global V (label smoothing spreads a / V over it).
        out: [B, T, V_local] destination; may be ``x3`` itself (in-place backward).
        whole_row: ``x3`` holds every column of each row (no vocabulary shard), so m and s
            are its own row statistics.
    """
    B, T, V = x3.shape
    valid = target != opts.ignore_index
    local, inside = _local_target(target, valid, vocab_start, V)
    a = opts.label_smoothing
    # p_j = exp(z_j - m) / s. Over the whole vocabulary that is softmax(z): torch's fused
    # softmax shifts by the row maximum itself (offset-invariant) in fewer passes over the
    # chunk than sub, exp and a scale (~1.5x faster on CPUs). A vocabulary shard needs the
    # whole row's m and s: the shifted exponential, with 1 / s folded into the row factor.
    # (The caller says which: under TP the shard on rank 0 can look like a whole row.)
    gp = g * c_p if whole_row else g * c_p / s
    # the row is written as g * c_p * p_j; the target column then gets -g * c_t added, which
    # gives exactly 0 where p_t = 1 and c_p = c_t (a one-class row)
    dt = torch.where(inside, torch.mul(g, c_t).neg_(), 0.0)
    wl = None if weight_local is None else weight_local.float()
    # rows without upstream gradient (ignored) get exactly 0 even where their logits are NaN
    # or inf (0 * exp(z - m) is NaN there); such rows have a non-finite lse = m + log s. They
    # are rare: in eager CPU calls the fill runs only when one exists; on GPUs (no host sync)
    # and under torch.compile (no data-dependent branch) always
    finite = torch.isfinite(torch.log(s).add_(m))
    always = x3.device.type != "cpu" or torch.compiler.is_compiling()
    zero_rows = (g == 0) & ~finite if always or not bool(finite.all()) else None
    for r0, r1, xv in iter_row_chunks(x3, chunk_rows or _chunk_rows(x3)):
        ov = row_slice(out, r0, r1)
        z = transform(xv.reshape(-1, V), opts)
        # an fp32 2-D destination is computed in place (elementwise ops only, so ov aliasing
        # z in the in-place backward is safe); any other is written from e, then copied
        direct = out.dtype == torch.float32 and ov.dim() == 2
        if whole_row:
            if direct and ov.is_contiguous() and not torch.compiler.is_compiling():
                # the softmax straight into the destination (no chunk-sized temporary; the
                # kernel reads each row's elements before it writes them, so ov may be z)
                e = torch.ops.aten._softmax.out(z, -1, False, out=ov)
            else:
                e = torch.softmax(z, dim=-1)
        else:
            shifted = m[r0:r1].unsqueeze(1)
            e = torch.sub(z, shifted, out=ov) if direct else z - shifted
            e.exp_()
        d = ov if direct else e
        torch.mul(e, gp[r0:r1].unsqueeze(1), out=d)
        d.scatter_add_(1, local[r0:r1].unsqueeze(1), dt[r0:r1].unsqueeze(1))
        if a > 0.0:
            ga = g[r0:r1].unsqueeze(1) * (a / vocab_size)
            d.sub_(ga if wl is None else ga * wl.unsqueeze(0))
        f = chain_factor(z, opts)
        if f is not None:
            d.mul_(f)
        if zero_rows is not None:
            d.masked_fill_(zero_rows[r0:r1].unsqueeze(1), 0.0)
        if not direct:
            ov.copy_(d.view(ov.shape))
        # (freed before the next chunk's softmax: one chunk temporary at a time)
        del e, d


def entropy_grad(x3: torch.Tensor, m: torch.Tensor, s: torch.Tensor, ent: torch.Tensor,
                 g: torch.Tensor, opts: LossOptions, *, out: torch.Tensor,
                 chunk_rows: Optional[int] = None) -> None:
    """Write dH/dx scaled by g: dz_j = -g * p_j * ((z_j - m) - (log s - H)), p_j = exp(z_j - m) / s
    (m, s: the row maximum and sum of exp(z - m) over the whole vocabulary)."""
    B, T, V = x3.shape
    mean_zs = torch.log(s) - ent  # sum_j p_j (z_j - m)
    coef = -g / s
    rows = chunk_rows or _chunk_rows(x3)
    for r0, r1, xv in iter_row_chunks(x3, rows):
        ov = row_slice(out, r0, r1)
        z = transform(xv.reshape(-1, V), opts)
        zs = z - m[r0:r1].unsqueeze(1)
        e = zs.exp()
        centred = zs - mean_zs[r0:r1].unsqueeze(1)
        d = torch.where(e > 0, e * centred, 0.0).mul_(coef[r0:r1].unsqueeze(1))
        f = chain_factor(z, opts)
        if f is not None:
            d.mul_(f)
        ov.copy_(d.view(ov.shape))
