"""The Triton backend (name "triton"): the backend protocol of :mod:`fusedce.autograd` over the
kernels of :mod:`fusedce.triton` (one family per module: stats, grad, fused, fused_tp; each
holds its kernels, launchers and torch.library ops).

Same math as :mod:`fusedce.spec`: per-row statistics (m, s, z_t, sum w z, argmax[, sum
exp(z - m) z]) that combine across vocabulary pieces, and

    dx_j = g * (p_j * c_p - c_t * [j = t] - (a / V) * w_j) * dz/dx,   p_j = exp(z_j - m) / s.

eager_grad: when autograd needs the gradient, ``fused`` computes the statistics and writes dx
for the upstream row gradient g0 in one pass over the logits; the backward then only scales
it (``scale_`` reads the factor on the device and does nothing when it is 1; ``scale_rows_``
skips rows whose factor is 1). Under no_grad only ``row_stats`` runs (one read).

With FUSEDCE_TRITON_FUSED=0, ``fused`` runs ``row_stats`` + ``grad`` instead, and autograd
skips ``fused_loss`` (``one_kernel``): the same results from two kernels (one more read of
the logits).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .. import spec
from ..layout import as_rows3d
from ..spec import LossOptions, RowStats
from . import configs, launch
# (importing the kernel modules registers their ops and launchers in launch.RAW)
from . import fused as _fused, fused_tp as _fused_tp, grad as _grad, stats as _stats  # noqa: F401
from . import targets as _targets

name = "triton"
eager_grad = True
supports_fused = True
# fused_loss takes peer= (vocabulary parallel statistics exchanged inside the kernel)
supports_peer = True
# row_stats / fused take need_am=False to skip the argmax (it only feeds the accuracy)
optional_argmax = True

# FUSEDCE_TRITON_FUSED=0: stats + grad kernels instead of the fused kernel (same results)
_FUSED = os.environ.get("FUSEDCE_TRITON_FUSED", "1").strip().lower() not in ("0", "false", "no")


try:  # torch >= 2.6: launch wrap_triton kernels directly in eager mode
    from torch._library.triton import set_wrap_triton_enabled as _wrap_enabled
except ImportError:  # pragma: no cover - older torch
    _wrap_enabled = None


def _call(name: str):
    """The registered op while torch.compile traces; in eager mode the launcher itself with
    wrap_triton's higher-order-op dispatch switched off (that dispatch, and the custom-op
    dispatcher, cost ~0.3-1 ms of host time per call: enough to make a step host-bound)."""
    if torch.compiler.is_compiling() or _wrap_enabled is None:
        return getattr(torch.ops.fusedce, name)
    run = _RUNNERS.get(name)
    if run is None:
        run = _RUNNERS[name] = _runner(launch.RAW[name])
    return run


_RUNNERS: dict = {}


def _runner(raw):
    """An eager call of the launcher ``raw``. The opaque ops (the default) launch through
    fusedce's fast launcher whatever wrap_triton's switch says, so only the triton_op form
    turns it off around the call (a context manager: ~2 us of host time)."""

    def run(*args):
        # Triton launches on the current device's stream: make it the logits' device (a
        # process driving several GPUs may call with tensors on another one)
        dev = args[0].device
        if dev.type == "cuda" and dev.index != torch.cuda.current_device():
            with torch.cuda.device(dev):
                return raw(*args)
        return raw(*args)

    if launch.OPAQUE:
        return run

    def run_wrapped(*args):
        with _wrap_enabled(False):
            return run(*args)

    return run_wrapped


def _k(x3: torch.Tensor) -> torch.Tensor:
    """What the ops get for a [B, T, V] view: with B = 1 the [T, V] tensor itself (the kernels
    read it as B = 1). Under torch.compile with symbolic sizes Inductor cannot rebuild the
    functionalised mutation of a (1, s, V) view whose leading stride is the symbol s * V
    (a PyTorch limitation); a [T, V] view keeps both the mutation and the strides plain."""
    return x3[0] if x3.dim() == 3 and x3.shape[0] == 1 else x3


def _vec(t: torch.Tensor, n: int) -> torch.Tensor:
    t = t.float()
    if t.dim() == 0:
        t = t.expand(n)
    return t.reshape(n).contiguous()


def _ids(target: torch.Tensor) -> torch.Tensor:
    if target.dim() == 1 and target.is_contiguous():
        return target  # (no view op: a few us of host time each on slow hosts)
    return target.reshape(-1).contiguous()


def row_stats(x3: torch.Tensor, target: torch.Tensor, opts: LossOptions, *, vocab_start: int = 0,
              weight_local: Optional[torch.Tensor] = None, need_sz: bool = False,
              need_sez: bool = False, need_am: bool = True) -> RowStats:
    """Statistics of the local vocabulary piece for every row (one read of the logits).

    Args:
        x3: logits [B, T, V_local], any strides, fp32/bf16/fp16.
        target: [B*T] global ids, int32/int64.
        weight_local: class weights of the local columns [V_local] (used for sz), or None.
        need_sz / need_sez: compute sum_j w_j z_j / sum_j exp(z_j - m) z_j.
        need_am: compute the argmax (for accuracy); without it am holds -1.
    Returns:
        RowStats with [B*T] fields (fp32; am int64 global column ids; sez None unless asked).
    """
    w = None
    if need_sz and weight_local is not None:
        w = weight_local.float().contiguous()
    m, s, zt, sz, am, sez = _call("tr_row_stats")(
        _k(x3), _ids(target), w, int(vocab_start), int(opts.ignore_index), float(opts.logit_scale),
        opts.softcap, bool(need_sz), bool(need_sez), bool(need_am))
    return RowStats(m, s, zt, sz, am, sez if need_sez else None)


def grad(x3: torch.Tensor, target: torch.Tensor, m: torch.Tensor, s: torch.Tensor,
         g: torch.Tensor, c_p: torch.Tensor, c_t: torch.Tensor, opts: LossOptions, *,
         vocab_size: int, out: torch.Tensor, vocab_start: int = 0,
         weight_local: Optional[torch.Tensor] = None, whole_row: bool = False) -> None:
    """Write dx into ``out`` [B, T, V_local] (may be ``x3``) for per-row m, s (the whole row's
    maximum and sum of exp(z - m)), g, c_p, c_t [B*T]. The kernel forms exp(z - m) / s for
    a shard and a whole row alike, so ``whole_row`` changes nothing here."""
    n = x3.shape[0] * x3.shape[1]
    w = None
    if opts.label_smoothing > 0.0 and weight_local is not None:
        w = weight_local.float().contiguous()
    _call("tr_grad")(
        _k(x3), _ids(target), _vec(m, n), _vec(s, n), _vec(g, n), _vec(c_p, n), _vec(c_t, n),
        _k(out), w,
        int(vocab_start), int(vocab_size), int(opts.ignore_index), float(opts.label_smoothing),
        float(opts.logit_scale), opts.softcap)


def entropy_grad(x3: torch.Tensor, m: torch.Tensor, s: torch.Tensor, ent: torch.Tensor,
                 g: torch.Tensor, opts: LossOptions, *, out: torch.Tensor) -> None:
    """Write dH/dx * g into ``out`` [B, T, V] (may be ``x3``); m, s, ent, g are [B*T] fp32."""
    n = x3.shape[0] * x3.shape[1]
    _call("tr_entropy_grad")(_k(x3), _vec(m, n), _vec(s, n), _vec(ent, n), _vec(g, n), _k(out),
                             float(opts.logit_scale), opts.softcap)


def one_kernel() -> bool:
    """Whether autograd may take ``fused_loss`` (False with FUSEDCE_TRITON_FUSED=0: the
    statistics + gradient kernels, with the row terms around them in PyTorch)."""
    return _FUSED


def fused(x3: torch.Tensor, target: torch.Tensor, opts: LossOptions, *, g0: torch.Tensor,
          terms: spec.RowTerms, vocab_size: int, out: torch.Tensor,
          weight_local: Optional[torch.Tensor], need_am: bool = True) -> RowStats:
    """Statistics of every row AND dx for the upstream row gradient g0, in one kernel.

    Args:
        x3: logits [B, T, V] (the whole vocabulary: no shard), any strides.
        target: [B*T] ids. g0: [B*T] fp32 upstream row gradient (0 on ignored rows).
        terms: target-only row terms (w_t, total weight W).
        out: [B, T, V] gradient destination in the logits' dtype; may be ``x3`` itself.
        weight_local: class weights [V] or None.
        need_am: compute the argmax (for accuracy); without it am holds -1.
    Returns:
        RowStats (m, s, zt, sz, am) with [B*T] fields.
    """
    n = x3.shape[0] * x3.shape[1]
    t = _ids(target)
    smooth = opts.label_smoothing > 0.0
    w = weight_local.float().contiguous() if (smooth and weight_local is not None) else None
    if not _FUSED:
        stats = row_stats(x3, t, opts, weight_local=weight_local, need_sz=smooth,
                          need_am=need_am)
        c_p, c_t = spec.grad_coefficients(spec.lse_of(stats), terms, opts, vocab_size)
        grad(x3, t, stats.m, stats.s, g0, c_p, c_t, opts, vocab_size=vocab_size, out=out,
             weight_local=weight_local)
        return stats
    w_total = None
    if w is not None and isinstance(terms.total_weight, torch.Tensor):
        w_total = terms.total_weight.float().reshape(())
    m, s, zt, sz, am = _call("tr_fused")(
        _k(x3), t, _vec(g0, n), _vec(terms.w_t, n), w, w_total, _k(out), int(opts.ignore_index),
        int(vocab_size), float(opts.label_smoothing), float(opts.z_loss),
        float(opts.logit_scale), opts.softcap, bool(need_am))
    return RowStats(m, s, zt, sz, am)


def target_scan(target: torch.Tensor, ignore_index: int) -> Optional[torch.Tensor]:
    """int64 [3] on the targets' device: the number of rows not ignored, then the smallest
    and largest of the ids and 0 (ignored rows as class 0), from one kernel; None where the
    caller's torch ops serve better (no targets, more than targets.SCAN_MAX of them, or
    torch.compile tracing, whose fused graph takes the ops for free)."""
    n = target.numel()
    if n == 0 or n > _targets.SCAN_MAX or torch.compiler.is_compiling():
        return None
    return _call("tr_target_scan")(_ids(target), int(ignore_index))


def fused_loss(x3: torch.Tensor, target: torch.Tensor, opts: LossOptions, *, vocab_size: int,
               weight: Optional[torch.Tensor], normalizer, out: Optional[torch.Tensor],
               need_am: bool, gathered: Optional[torch.Tensor] = None, vocab_start: int = 0,
               peer=None, counts: Optional[torch.Tensor] = None):
    """The loss rows of the whole vocabulary in one kernel and, when ``out`` is given, their
    gradient (for an upstream gradient of 1 on the reduced loss, or of 1 per row with
    reduction="none") written into it; the row terms and row loss are computed in the kernel,
    so the call is the kernel plus the reductions of its outputs.

    Args:
        x3: logits [B, T, V] (no shard), any strides. target: [B*T] ids.
        weight: class weights [V] or None. normalizer: None, a number or a 0-d tensor.
        out: [B, T, V] gradient destination (may be ``x3``) or None (no gradient).
        need_am: also return the argmax (for accuracy).
        gathered: vocabulary parallel: the all-gathered shard statistics [W, F, B*T]
            (``distributed.gather_packed_stats``); x3 is then this rank's shard, whose first
            column is ``vocab_start``, and weight the whole class-weight vector.
        peer: vocabulary parallel instead of ``gathered``: a :class:`fusedce.peer.PeerExchange`;
            the kernel exchanges the shard statistics with the other ranks' kernels itself.
        counts: the :func:`target_scan` of ``target`` when the caller took one already (its
            count is the mean's denominator), or None.
    Returns:
        (loss, lse, zpart, am): loss [B*T] fp32 row losses times the reduction factor c (so
        that the reduced loss is their sum), lse [B*T], zpart [B*T] (times c) or None without
        z-loss, am [B*T] int64 or None.
    """
    t = _ids(target)
    dev = x3.device
    w = w_total = None
    if weight is not None:
        w = weight.float().contiguous()
    if normalizer is not None:
        mode = 2
        if isinstance(normalizer, torch.Tensor):
            den = (1.0 / normalizer.to(device=dev, dtype=torch.float32)).reshape(())
        else:
            den = torch.full((), 1.0 / float(normalizer), device=dev, dtype=torch.float32)
    elif opts.reduction == "mean":
        mode = 1
        if w is None:
            if counts is None:
                counts = target_scan(t, opts.ignore_index)
            # (the kernel reads the denominator at the pointer: the scan's first element)
            den = (t != opts.ignore_index).sum() if counts is None else counts
        else:
            den = spec.row_terms(t, opts, vocab_size, weight).denom
    else:
        mode, den = 0, None
    if w is not None and opts.label_smoothing > 0.0:
        w_total = w.sum()
    xk = _k(x3)
    args = (xk, t, w, w_total, den)
    tail = (int(opts.ignore_index), int(vocab_size), float(opts.label_smoothing),
            float(opts.z_loss), float(opts.logit_scale), opts.softcap, bool(need_am), mode)
    if peer is not None:
        buf = _k(out) if out is not None else x3.new_empty((1, 1, 1))
        loss, lse, zp, am = _call("tr_fused_loss_peer")(
            xk, t, peer, peer.next_epoch(), w, w_total, den, buf, int(vocab_start), *tail,
            out is not None)
    elif gathered is not None:
        buf = _k(out) if out is not None else x3.new_empty((1, 1, 1))
        loss, lse, zp, am = _call("tr_fused_loss_tp")(
            xk, t, gathered.float().contiguous(), w, w_total, den, buf, int(vocab_start),
            *tail, out is not None)
    elif out is None:
        loss, lse, zp, am = _call("tr_loss_rows")(*args, *tail)
    else:
        loss, lse, zp, am = _call("tr_fused_loss")(*args, _k(out), *tail)
    return loss, lse, (zp if opts.z_loss > 0.0 else None), (am if need_am else None)


def peer_parts(vocab_size: int, world: int, elem_size: int) -> int:
    """Records per rank and row that the in-kernel exchange needs (shard rows cut into that
    many parts; the same on every rank): see configs.peer_parts."""
    return configs.peer_parts(vocab_size, world, elem_size)


def scale_(buf: torch.Tensor, factor0d: torch.Tensor) -> None:
    """buf *= factor (0-d); a device-side no-op when the factor is 1 (no host sync)."""
    f = factor0d if factor0d.dim() == 0 and factor0d.dtype == torch.float32 else \
        factor0d.float().reshape(())
    if buf.dim() == 2:
        _call("tr_scale_")(buf, f)
        return
    x3 = as_rows3d(buf)
    if buf.dim() > 3 and x3._base is None:
        # no [B, T, V] view of this layout exists: scale it as it is
        buf.mul_(f.to(buf.dtype))
        return
    _call("tr_scale_")(_k(x3), f)


def scale_rows_(buf3: torch.Tensor, factor: torch.Tensor) -> None:
    """buf3[b, t, :] *= factor[b * T + t]; rows whose factor is 1 are not touched."""
    n = buf3.shape[0] * buf3.shape[1]
    _call("tr_scale_rows_")(_k(buf3), _vec(factor, n))
