"""Pure-PyTorch backend: the executable spec (see :mod:`fusedce.spec` for the math).

Rows are processed in chunks, so at most one fp32 chunk of logits (``rows x V_local``)
exists at a time. ``row_stats`` gives the per-row statistics (a pair (m, s) with
lse = m + log s, z_t, sum w*z, argmax); ``grad`` recomputes z for each chunk and writes

    dx_j = g * (p_j * c_p - c_t * [j = t] - (a / V) * w_j) * dz/dx,   p_j = exp(z_j - m) / s

straight into the gradient buffer (or into the logits themselves with inplace_backward);
``fused`` does both from one softmax per chunk (the gradient written in the forward, for
fp32 logits), and ``plain_loss_rows`` gives only the row losses of a forward that keeps
nothing. The same functions serve a vocabulary shard: ``vocab_start`` maps global target
ids to local columns, and the statistics are combined across ranks by
:mod:`fusedce.distributed`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .layout import as_rows2d, iter_row_chunks, row_slice
from .spec import (LossOptions, RowStats, RowTerms, chain_factor, default_chunk_rows,
                   grad_coefficients, transform)

name = "torch"
supports_fused = True
# the forward keeps the logits (not overwritten) and statistics: a second backward through a
# retained graph recomputes the gradient that the first one handed over
regrad = True
optional_argmax = True  # row_stats(need_am=False) skips the argmax (only the accuracy needs it)


def eager_grad(logits: torch.Tensor, reduced: bool) -> bool:
    """Whether autograd has ``fused`` write the gradient in the forward (one softmax per
    chunk instead of two): for fp32 logits, of a reduced loss (the backward scales it by the
    upstream scalar) or, on CPUs, of per-row losses (the backward scales each row by its
    upstream gradient, which elsewhere would cost a device sync to keep the lazy path's
    zero rows). A low-precision gradient would be rounded twice where it is scaled by
    anything but 1; those take the lazy path (row_stats now, grad in the backward)."""
    return logits.dtype == torch.float32 and (reduced or logits.device.type == "cpu")


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


def _stats(n: int, dev: torch.device, ms: list, ss: list, zts: list, szs: list, ams: list,
           sezs: Optional[list]) -> RowStats:
    """RowStats of n rows from the per-chunk pieces of each field (sz zeros without pieces,
    am -1 without pieces, sez None when ``sezs`` is None)."""
    if n == 0:
        empty = torch.empty(0, device=dev, dtype=torch.float32)
        ms = ss = zts = [empty]
    m, s, zt = _joined(ms), _joined(ss), _joined(zts)
    sz = _joined(szs) if szs else torch.zeros_like(m)
    am = _joined(ams) if ams else torch.full((n,), -1, device=dev, dtype=torch.int64)
    sez = None if sezs is None else _joined(sezs) if sezs else torch.empty_like(m)
    return RowStats(m, s, zt, sz, am, sez)


def _joined(parts: list) -> torch.Tensor:
    """The per-chunk pieces of a row field as one [N] tensor (no copy for one chunk)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


# the smallest p_c at which (z_c, 1 / p_c) stands for a row's (m, s): s then stays <= 2^64,
# so exp(z_j - m) <= 2^64 for every column and sums over any vocabulary stay finite in fp32
_PAIR_MIN_P = 2.0 ** -64


def _sum_from_softmax(p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """s = sum_j exp(z_j - m) of rows whose softmax is ``p`` and maximum ``m``: the largest
    entry of p, at the argmax where z - m is exactly 0, is 1 / s (an all -inf row's NaN
    becomes s = 0)."""
    return p.amax(dim=-1).reciprocal_().masked_fill_(torch.isneginf(m), 0.0)


def _pair_from_softmax(p: torch.Tensor, z: torch.Tensor, zc: torch.Tensor, lc: torch.Tensor,
                       m: Optional[torch.Tensor] = None):
    """A row's statistics pair (m, s) taken at one column c of each row, from its softmax p:
    lse = m + log s is offset-invariant, and with m = z_c it is z_c - log p_c, so s = 1 / p_c.
    Column c is the target's (clamped) column, so the loss log s - (z_t - m) = -log p_t comes
    out of the softmax that s needs anyway, without the row maximum's pass (on CPUs the
    passes over the chunk are the cost). Rows where p_c is tiny (an unlikely target: 1 / p_c
    would lose the other columns' range) or not a number take the row maximum instead (``m``
    when given: z may be overwritten by then); on CPUs the check costs no device sync."""
    pc = p.gather(1, lc).squeeze(1)
    # (the smallest p_c decides for the chunk: one small op; NaN compares False)
    if pc.numel() == 0 or float(pc.amin()) >= _PAIR_MIN_P:
        return zc, pc.reciprocal_()
    ok = pc >= _PAIR_MIN_P
    if m is None:
        m = z.amax(dim=-1)
    return torch.where(ok, zc, m), torch.where(ok, pc.reciprocal_(), _sum_from_softmax(p, m))


def plain_loss_rows(x3: torch.Tensor, target: torch.Tensor,
                    opts: LossOptions) -> Optional[Tuple[torch.Tensor, int]]:
    """The row losses -log p_t of the plain loss (no label smoothing, z-loss or class
    weights; whole rows) without the row statistics, for a forward that keeps nothing (no
    gradient, no aux outputs) on CPUs: one softmax per chunk and a few small ops, which at
    small V is most of the call. Ignored rows give 0. Returns (row losses, the number of
    non-ignored rows, read on the host: free on CPUs), or None where this does not apply:
    not a CPU, a valid target outside [0, V), or a target so unlikely that p_t is tiny (the
    general path takes those rows from the row maximum)."""
    if x3.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    V = x3.shape[-1]
    t = target.long()
    n = t.numel()
    if n == 0:
        return torch.zeros(t.shape, device=x3.device, dtype=torch.float32), 0
    ii = opts.ignore_index
    lo, hi = (int(v) for v in torch.aminmax(t))
    if lo >= 0 and hi < V and not 0 <= ii < V:
        # every id is a class and none can be ignore_index (the common call): one small op
        valid, local, count = None, t, n
    else:
        valid = t != ii
        local = t.clamp(0, max(V - 1, 0))
        # a valid id that the clamp moved lies outside [0, V)
        if not torch.equal(torch.where(valid, local, t), t):
            return None
        count = int(valid.sum())
    lc = local.unsqueeze(1)
    rows = _chunk_rows(x3)
    flat = as_rows2d(x3) if n <= rows else None
    if flat is not None:
        # one chunk (the common small call): no chunk loop
        pt = torch.softmax(transform(flat, opts), dim=-1).gather(1, lc).squeeze(1)
    else:
        parts = []
        for r0, r1, view in iter_row_chunks(x3, rows):
            z = transform(view.reshape(-1, V), opts)
            parts.append(torch.softmax(z, dim=-1).gather(1, lc[r0:r1]).squeeze(1))
        pt = _joined(parts)
    if valid is not None:
        # (ignored rows' p, read at column 0, may be anything: they give 0 and decide
        # nothing; a valid row's NaN compares False)
        pt = torch.where(valid, pt, 1.0)
    if not float(pt.amin()) >= _PAIR_MIN_P:
        return None
    # log(1 / p) as the general path forms log s: the same row losses, +0.0 on ignored rows
    return pt.reciprocal_().log_(), count


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
    # on CPUs the (m, s) pair is taken at the target column (see _pair_from_softmax); elsewhere
    # a host read per chunk would sync the device, and torch.compile cannot branch on it
    at_column = (not need_am and not need_sez and dev.type == "cpu"
                 and not torch.compiler.is_compiling())
    for r0, r1, view in iter_row_chunks(x3, chunk_rows or _chunk_rows(x3)):
        z = transform(view.reshape(-1, V), opts)
        lc = local[r0:r1].unsqueeze(1)
        zc = z.gather(1, lc).squeeze(1)
        zts.append(torch.where(inside[r0:r1], zc, 0.0))
        if at_column:
            # s from torch's fused softmax: faster on CPUs than the sub / exp / sum passes,
            # and than log_softmax
            mc, sc = _pair_from_softmax(torch.softmax(z, dim=-1), z, zc, lc)
            ms.append(mc)
            ss.append(sc)
        else:
            if need_am:
                mc, ac = z.max(dim=-1)
                ams.append(ac + vocab_start if vocab_start else ac)
            else:
                mc = z.amax(dim=-1)
            ms.append(mc)
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
                ss.append(_sum_from_softmax(torch.softmax(z, dim=-1), mc))
        if need_sz:
            szs.append(z.sum(dim=-1) if wl is None else z @ wl)
    return _stats(n, dev, ms, ss, zts, szs, ams, sezs if need_sez else None)


def fused(x3: torch.Tensor, target: torch.Tensor, opts: LossOptions, *, g0: torch.Tensor,
          terms: RowTerms, vocab_size: int, out: torch.Tensor,
          weight_local: Optional[torch.Tensor] = None, need_am: bool = True,
          chunk_rows: Optional[int] = None) -> RowStats:
    """Statistics of every row AND dx for the upstream row gradient g0, from one softmax per
    chunk: the softmax is written into the gradient destination (an fp32 one; a chunk
    temporary for others), the row statistics are read from it, and it is turned into dx in
    place. The lazy path (row_stats in the forward, grad in the backward) runs the softmax
    twice.

    Args:
        x3: logits [B, T, V] (the whole vocabulary: no shard), any strides.
        target: [B*T] ids. g0: [B*T] fp32 upstream row gradient (0 on ignored rows).
        terms: target-only row terms (w_t, total weight W).
        out: [B, T, V] gradient destination; may be ``x3`` itself (in-place backward).
        weight_local: class weights [V] or None.
        need_am: compute the argmax (for accuracy); without it am holds -1.
    Returns:
        RowStats (m, s, zt, sz, am) with [B*T] fields.
    """
    B, T, V = x3.shape
    n = B * T
    dev = x3.device
    valid = target != opts.ignore_index
    local, inside = _local_target(target, valid, 0, V)
    wl = None if weight_local is None else weight_local.float()
    a = opts.label_smoothing
    smooth = a > 0.0
    at_column = not need_am and dev.type == "cpu" and not torch.compiler.is_compiling()
    ms, ss, zts, szs, ams = [], [], [], [], []
    for r0, r1, xv in iter_row_chunks(x3, chunk_rows or _chunk_rows(x3)):
        ov = row_slice(out, r0, r1)
        z = transform(xv.reshape(-1, V), opts)
        direct = _direct(out, ov)
        # with the in-place backward the softmax may overwrite z itself: every read of z
        # comes first
        aliased = direct and z.untyped_storage().data_ptr() == ov.untyped_storage().data_ptr()
        lc = local[r0:r1].unsqueeze(1)
        zc = z.gather(1, lc).squeeze(1)
        zts.append(torch.where(inside[r0:r1], zc, 0.0))
        mc = None
        if need_am:
            mc, ac = z.max(dim=-1)
            ams.append(ac)
        elif aliased or not at_column:
            mc = z.amax(dim=-1)
        if smooth:
            szs.append(z.sum(dim=-1) if wl is None else z @ wl)
        f = chain_factor(z, opts)
        p = _softmax(z, ov, direct)
        if at_column:
            mc, sc = _pair_from_softmax(p, z, zc, lc, mc)
        else:
            sc = _sum_from_softmax(p, mc)
        ms.append(mc)
        ss.append(sc)
        lse = torch.log(sc).add_(mc)
        c_p, c_t = grad_coefficients(lse, terms.rows(r0, r1), opts, vocab_size)
        g = g0[r0:r1]
        zero = _zero_rows(g, lse, dev)
        _finish_rows(p, ov, direct, lc, g * c_p, _target_term(g, c_t, inside[r0:r1]), g,
                     a, vocab_size, wl, f, zero)
        del p, z
    return _stats(n, dev, ms, ss, zts, szs, ams, None)


def _direct(out: torch.Tensor, ov: torch.Tensor) -> bool:
    """Whether a chunk's softmax can be written straight into its gradient rows ``ov``: an
    fp32 2-D contiguous destination (the ops that follow are elementwise, so ov may alias
    the logits in the in-place backward); any other is written from a temporary, then
    copied."""
    return (out.dtype == torch.float32 and ov.dim() == 2 and ov.is_contiguous()
            and not torch.compiler.is_compiling())


def _softmax(z: torch.Tensor, ov: torch.Tensor, direct: bool) -> torch.Tensor:
    """softmax(z) over the rows, into ``ov`` when ``direct`` (no chunk-sized temporary; the
    kernel reads each row before it writes it, so ov may be z itself). torch's fused softmax
    shifts by the row maximum itself, in fewer passes over the chunk than sub, exp and a scale
    (~1.5x faster on CPUs)."""
    if direct:
        return torch.ops.aten._softmax.out(z, -1, False, out=ov)
    return torch.softmax(z, dim=-1)


def _target_term(g: torch.Tensor, c_t: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """-g * c_t on the rows whose target lies here, else 0: the row is written as
    g * c_p * p_j and this is added at the target column, which gives exactly 0 where
    p_t = 1 and c_p = c_t (a one-class row)."""
    return torch.where(inside, torch.mul(g, c_t).neg_(), 0.0)


def _zero_rows(g: torch.Tensor, lse: torch.Tensor,
               dev: torch.device) -> Optional[torch.Tensor]:
    """Rows without upstream gradient (ignored) must get exactly 0 even where their logits are
    NaN or inf (0 * exp(z - m) is NaN there); such rows have a non-finite lse = m + log s.
    They are rare: in eager CPU calls the mask is made only when one exists; on GPUs (no host
    sync) and under torch.compile (no data-dependent branch) always. None: no such row."""
    finite = torch.isfinite(lse)
    if dev.type != "cpu" or torch.compiler.is_compiling() or not bool(finite.all()):
        return (g == 0) & ~finite
    return None


def _finish_rows(p: torch.Tensor, ov: torch.Tensor, direct: bool, lc: torch.Tensor,
                 gp: torch.Tensor, dt: torch.Tensor, g: torch.Tensor, a: float,
                 vocab_size: int, wl: Optional[torch.Tensor], f, zero: Optional[torch.Tensor]):
    """Turn a chunk's p_j (normalised over the whole row, or the shifted exponential that
    gp's 1 / s normalises) into dx_j = gp * p_j + [j = t] dt - g (a / V) w_j, times dz/dx
    (f), and write it into ``ov`` (p is ov itself when ``direct``)."""
    torch.mul(p, gp.unsqueeze(1), out=p)
    p.scatter_add_(1, lc, dt.unsqueeze(1))
    if a > 0.0:
        ga = g.unsqueeze(1) * (a / vocab_size)
        p.sub_(ga if wl is None else ga * wl.unsqueeze(0))
    if f is not None:
        p.mul_(f)
    if zero is not None:
        p.masked_fill_(zero.unsqueeze(1), 0.0)
    if not direct:
        ov.copy_(p.view(ov.shape))


def grad(x3: torch.Tensor, target: torch.Tensor, m: torch.Tensor, s: torch.Tensor,
         g: torch.Tensor, c_p: torch.Tensor, c_t: torch.Tensor, opts: LossOptions, *,
         vocab_size: int, out: torch.Tensor, vocab_start: int = 0,
         weight_local: Optional[torch.Tensor] = None, chunk_rows: Optional[int] = None,
         whole_row: bool = False) -> None:
    """Write dx (in ``out``'s dtype) for the loss spec.

    Args:
        x3: logits [B, T, V_local].
        target, m, s, g, c_p, c_t: [B*T] (global ids; fp32 row statistics pair (m, s) of the
            whole vocabulary, lse = m + log s; upstream row gradient and the coefficients
            of :func:`fusedce.spec.grad_coefficients`).
        vocab_size: the global V (label smoothing spreads a / V over it).
        out: [B, T, V_local] destination; may be ``x3`` itself (in-place backward).
        whole_row: ``x3`` holds every column of each row (no vocabulary shard), so p_j is the
            softmax of its rows.
    """
    B, T, V = x3.shape
    valid = target != opts.ignore_index
    local, inside = _local_target(target, valid, vocab_start, V)
    # p_j = exp(z_j - m) / s. Over the whole vocabulary that is softmax(z). A vocabulary
    # shard needs the whole row's m and s: the shifted exponential, with 1 / s folded into
    # the row factor. (The caller says which: under TP the shard on rank 0 can look like a
    # whole row.)
    gp = g * c_p if whole_row else g * c_p / s
    dt = _target_term(g, c_t, inside)
    wl = None if weight_local is None else weight_local.float()
    zero_rows = _zero_rows(g, torch.log(s).add_(m), x3.device)
    for r0, r1, xv in iter_row_chunks(x3, chunk_rows or _chunk_rows(x3)):
        ov = row_slice(out, r0, r1)
        z = transform(xv.reshape(-1, V), opts)
        direct = _direct(out, ov)
        f = chain_factor(z, opts)
        if whole_row:
            e = _softmax(z, ov, direct)
        else:
            shifted = m[r0:r1].unsqueeze(1)
            e = torch.sub(z, shifted, out=ov) if direct else z - shifted
            e.exp_()
        _finish_rows(e, ov, direct, local[r0:r1].unsqueeze(1), gp[r0:r1], dt[r0:r1],
                     g[r0:r1], opts.label_smoothing, vocab_size, wl, f,
                     None if zero_rows is None else zero_rows[r0:r1])
        # (freed before the next chunk's softmax: one chunk temporary at a time)
        del e, z


def scale_(buf: torch.Tensor, factor: torch.Tensor) -> None:
    """buf *= factor (0-d): the backward of a gradient written in the forward; skipped for 1
    on CPUs (where reading the factor costs no device sync)."""
    if buf.device.type == "cpu" and not torch.compiler.is_compiling() and float(factor) == 1.0:
        return
    buf.mul_(factor.to(buf.dtype))


def scale_rows_(buf3: torch.Tensor, factor: torch.Tensor) -> None:
    """buf3[b, t, :] *= factor[b * T + t]; a row whose factor is 0 becomes exactly 0 even
    where it holds NaN or inf (as the lazy path gives a row without upstream gradient).
    Per-row gradients are written in the forward only on CPUs, where the check for such rows
    costs no device sync."""
    B, T, _ = buf3.shape
    f = factor.view(B, T, 1)
    buf3.mul_(f.to(buf3.dtype))
    zero = f == 0
    # (torch.compile cannot branch on data: the fill always runs there)
    if torch.compiler.is_compiling() or bool(zero.any()):
        buf3.masked_fill_(zero, 0.0)


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
