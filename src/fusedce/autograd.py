"""Autograd glue: one torch.autograd.Function per operation, over any backend.

The math lives in :mod:`fusedce.spec`; a backend (``torch_backend`` or
``fusedce.triton.backend``) computes per-row statistics and writes gradients; the
distributed exchange combines statistics across vocabulary shards. Two gradient
strategies:

* lazy (per-row upstream gradients on the Triton backend, the torch backend's
  low-precision logits): the forward keeps only per-row statistics; the backward
  recomputes z chunk by chunk and writes dx = g * dloss_row/dx with the true upstream g.
* eager (a reduced loss on the Triton backend; fp32 logits on the torch backend, per-row
  losses on CPUs too): when autograd will need the gradient, the forward already writes dx
  for an upstream gradient of 1 (scaled by the mean denominator or normalizer, which are
  known from the targets before any kernel runs); the backward multiplies by the upstream
  gradient (per row for per-row losses), a device-side no-op when it is 1 (no host sync).
  A backend with ``regrad`` also keeps the logits (when they are not overwritten), so a
  second backward through a retained graph recomputes.

No Triton code here; validation happens in :mod:`fusedce.functional`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from . import spec
from .layout import as_rows3d
from .spec import LossOptions


@dataclass
class Plan:
    """Everything the autograd functions need besides tensors."""

    opts: LossOptions
    backend: Any
    vocab_size: int  # global V
    vocab_start: int = 0
    group: Any = None
    normalizer: Any = None  # None, float or 0-d tensor
    inplace: bool = False
    need_grad: bool = True
    need_aux: bool = True  # the accuracy is wanted (backends with optional_argmax skip it else)
    # the backend's target scan taken by the range check (int64 [count, lo, hi] on the
    # device), whose count a backend with fused_loss reuses as the mean's denominator
    target_counts: Optional[torch.Tensor] = None


def _exchange(stats: spec.RowStats, group, need_sz: bool = True) -> spec.RowStats:
    if group is None:
        return stats
    from .distributed import allgather_stats

    return allgather_stats(stats, group, need_sz=need_sz)


def _weight_local(weight: Optional[torch.Tensor], plan: Plan, v_local: int):
    if weight is None:
        return None
    return weight[plan.vocab_start:plan.vocab_start + v_local]


def _grad_buffer(logits: torch.Tensor, plan: Plan) -> torch.Tensor:
    return logits if plan.inplace else torch.empty(
        logits.shape, dtype=logits.dtype, device=logits.device)


def _accuracy(plan: Plan, am, t: torch.Tensor, valid: Optional[torch.Tensor],
              device) -> torch.Tensor:
    """The accuracy output (valid: the valid-row mask, or None to derive it from t only when
    the accuracy is wanted: each small op is a launch, and host time per launch matters)."""
    if plan.need_aux:
        return spec.accuracy(am, t, valid if valid is not None else t != plan.opts.ignore_index)
    return _unused(device)


def _unused(device) -> Optional[torch.Tensor]:
    """An output slot nobody reads (the z-loss part and accuracy without return_aux, which
    the public functions drop): None, so neither a launch nor an allocation; while
    torch.compile traces, an unfilled 0-d tensor: Dynamo's speculation of the backward
    retries with the gradients made contiguous and fails on a None output (torch 2.13,
    [B, T, V] logits)."""
    if torch.compiler.is_compiling():
        return torch.empty((), device=device)
    return None


class _NoGradCtx:
    """The ctx of a forward that autograd will never differentiate (no_grad, or inputs that
    need no gradient): its forward runs without Function.apply (a few us of host time per
    call, which a loss call at V = 32000 is bound by)."""

    def set_materialize_grads(self, value: bool) -> None:
        pass

    def save_for_backward(self, *tensors) -> None:
        pass

    def mark_non_differentiable(self, *tensors) -> None:
        pass


def apply(fn, plan: Plan, *args):
    """``fn.apply(*args, plan)``, or its forward called directly when no gradient is needed."""
    if plan.need_grad:
        return fn.apply(*args, plan)
    return fn.forward(_NoGradCtx(), *args, plan)


def _zloss_out(plan: Plan, zpart: Optional[torch.Tensor], reduced: bool, target: torch.Tensor,
               device, scale: Optional[torch.Tensor] = None):
    """The z-loss output: unused without the aux outputs, zeros without z-loss, else its
    rows reduced like the loss (times ``scale`` where the rows are not scaled yet)."""
    if not plan.need_aux:
        return _unused(device)
    if zpart is None:
        return torch.zeros(() if reduced else target.shape, device=device, dtype=torch.float32)
    if not reduced:
        return _shaped(zpart, target)
    return zpart.sum() if scale is None else zpart.sum() * scale


def _shaped(rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row values [N] shaped like ``target`` (no view op when it is 1-D already)."""
    return rows if target.dim() == 1 else rows.view(target.shape)


def _eager_grad(be, logits: torch.Tensor, reduced: bool) -> bool:
    """The backend's ``eager_grad``: a flag (for reduced losses only), or a function of the
    logits and whether the loss is reduced."""
    flag = getattr(be, "eager_grad", False)
    return flag(logits, reduced) if callable(flag) else bool(flag) and reduced


def _scalar(g: torch.Tensor) -> torch.Tensor:
    """An upstream gradient as a 0-d fp32 tensor (itself when it is one already)."""
    return g if g.dim() == 0 and g.dtype == torch.float32 else g.float().reshape(())


def _keep(ctx, plan: Plan, reduced: bool, eager: bool) -> None:
    ctx.plan = plan
    ctx.reduced = reduced
    ctx.eager = eager


def written(x: torch.Tensor) -> None:
    """Tell autograd that a backend overwrote ``x`` (the logits, with inplace_backward): its
    version counter moves, so an op that saved ``x`` for its own backward (exp, tanh, a
    softcap written by hand) raises instead of differentiating garbage. Triton kernels write
    through raw pointers, which autograd cannot see; torch ops bump it themselves and one
    more bump is harmless. While torch.compile traces, the ops' declared mutation does it."""
    if not torch.compiler.is_compiling():
        torch.autograd.graph.increment_version(x)


class CrossEntropyFunction(torch.autograd.Function):
    """loss, lse, z_loss part, accuracy = CE(logits, target); only loss is differentiable."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                plan: Plan):
        # lse, z-loss and accuracy are not differentiable: no zero gradients for them (three
        # fills per backward otherwise)
        ctx.set_materialize_grads(False)
        opts, be = plan.opts, plan.backend
        t = target if target.dim() == 1 else target.reshape(-1)
        reduced = opts.reduction != "none" or plan.normalizer is not None
        plain = getattr(be, "plain_loss_rows", None)
        if (plain is not None and not plan.need_grad and not plan.need_aux
                and plan.group is None and weight is None and opts.label_smoothing == 0.0
                and opts.z_loss == 0.0):
            # a forward that keeps nothing: the backend's row losses without row statistics
            got = plain(as_rows3d(logits), t, opts)
            if got is not None:
                rows, count = got
                if not reduced:
                    return _shaped(rows, target), None, None, None
                total = rows.sum()
                if plan.normalizer is not None:
                    terms = spec.row_terms(t, opts, plan.vocab_size, None)
                    total = total * spec.row_scale(terms, opts, plan.normalizer)
                elif opts.reduction == "mean" and count:
                    # (the host's count: one division, as F.cross_entropy's mean; no rows
                    # counted leaves the sum of zeros, 0)
                    total = total / count
                return total, None, None, None
        # The gradient is written in the forward where the backend takes it there: on the
        # Triton backend where the upstream gradient is one scalar (a reduced loss), which the
        # backward then scales it by. A per-row upstream gradient (reduction="none", e.g. RL
        # advantages) is applied in the backward from the saved statistics instead, so a
        # bf16 / fp16 gradient is rounded once (fp32 on CPUs is written in the forward and
        # scaled per row: no rounding to speak of, one pass instead of a softmax).
        eager = plan.need_grad and _eager_grad(be, logits, reduced)
        one_kernel = hasattr(be, "fused_loss") and getattr(be, "one_kernel", lambda: True)()
        if one_kernel and (eager or not plan.need_grad):
            # (its kernels take [N, V] logits as they are: no [1, N, V] view to make)
            xk = logits if logits.dim() == 2 else as_rows3d(logits)
            return CrossEntropyFunction._forward_one_kernel(ctx, logits, xk, target, t, weight,
                                                            plan, eager)
        x3 = as_rows3d(logits)
        v_local = x3.shape[-1]
        wl = _weight_local(weight, plan, v_local)
        terms = spec.row_terms(t, opts, plan.vocab_size, weight)
        scale = spec.row_scale(terms, opts, plan.normalizer)
        am_kw = {"need_am": plan.need_aux} if getattr(be, "optional_argmax", False) else {}
        gbuf = None
        if eager and plan.group is None and getattr(be, "supports_fused", False):
            g0 = terms.valid.float() * scale
            gbuf = _grad_buffer(logits, plan)
            stats = be.fused(x3, t, opts, g0=g0, terms=terms, vocab_size=plan.vocab_size,
                             out=as_rows3d(gbuf), weight_local=wl, **am_kw)
        else:
            stats = be.row_stats(x3, t, opts, vocab_start=plan.vocab_start, weight_local=wl,
                                 need_sz=opts.label_smoothing > 0.0, **am_kw)
            stats = _exchange(stats, plan.group, need_sz=opts.label_smoothing > 0.0)
        loss_rows, lse, zpart = spec.row_loss(stats, terms, opts, plan.vocab_size)
        if eager and gbuf is None:
            g0 = terms.valid.float() * scale
            c_p, c_t = spec.grad_coefficients(lse, terms, opts, plan.vocab_size)
            gbuf = _grad_buffer(logits, plan)
            be.grad(x3, t, stats.m, stats.s, g0, c_p, c_t, opts, vocab_size=plan.vocab_size,
                    out=as_rows3d(gbuf), vocab_start=plan.vocab_start, weight_local=wl,
                    whole_row=plan.group is None)
        if eager and plan.inplace:
            written(logits)

        if reduced:
            loss = loss_rows.sum() * scale
        else:
            loss = _shaped(loss_rows, target)
        zl = _zloss_out(plan, zpart, reduced, target, lse.device, scale)
        acc = _accuracy(plan, stats.am, t, terms.valid, lse.device)
        _keep(ctx, plan, reduced, eager)
        ctx.again = eager and not plan.inplace and getattr(be, "regrad", False)
        if eager and not ctx.again:
            ctx.save_for_backward(gbuf)
        elif plan.need_grad:
            c_p, c_t = spec.grad_coefficients(lse, terms, opts, plan.vocab_size)
            ctx.save_for_backward(logits, t, stats.m, stats.s, c_p, c_t, scale, terms.valid,
                                  weight)
            if eager:
                # the first backward hands this buffer over; a second one (retain_graph=True)
                # recomputes the gradient from the saved logits, as the lazy path does
                ctx.written = gbuf
        lse_out = _shaped(lse, target)
        ctx.mark_non_differentiable(*(v for v in (lse_out, zl, acc) if v is not None))
        return loss, lse_out, zl, acc

    @staticmethod
    def _forward_one_kernel(ctx, logits, x3, target, t, weight, plan, eager):
        """Backends with ``fused_loss`` (Triton): row terms, row losses and (eager) the
        gradient come out of one kernel; under vocabulary parallelism the ranks' kernels
        exchange the shard statistics themselves (fusedce.peer) or, where that is not
        available, after one all-gather of them. Only the reductions of its outputs remain."""
        opts, be = plan.opts, plan.backend
        reduced = opts.reduction != "none" or plan.normalizer is not None
        gathered = peer = None
        if plan.group is not None and getattr(be, "supports_peer", False):
            # vocabulary parallel, ranks' kernels exchanging the row statistics themselves
            from .peer import exchange_for

            parts = getattr(be, "peer_parts", None)
            es = x3.element_size()
            peer = exchange_for(plan.group, x3.device, t.numel(),
                                (lambda w: parts(plan.vocab_size, w, es)) if parts else 1)
        if plan.group is not None and peer is None:
            # vocabulary parallel: this shard's statistics, one all-gather, then the kernel
            # folds them and writes this shard's gradient
            from .distributed import gather_packed_stats

            smooth = opts.label_smoothing > 0.0
            stats = be.row_stats(x3, t, opts, vocab_start=plan.vocab_start,
                                 weight_local=_weight_local(weight, plan, x3.shape[-1]),
                                 need_sz=smooth, need_am=plan.need_aux)
            gathered = gather_packed_stats(stats, plan.group, need_sz=smooth)
        gbuf = _grad_buffer(logits, plan) if eager else None
        out = None if gbuf is None else gbuf if gbuf.dim() == x3.dim() else as_rows3d(gbuf)
        loss_rows, lse, zpart, am = be.fused_loss(
            x3, t, opts, vocab_size=plan.vocab_size, weight=weight, normalizer=plan.normalizer,
            out=out, need_am=plan.need_aux, gathered=gathered,
            vocab_start=plan.vocab_start, counts=plan.target_counts,
            **({"peer": peer} if peer is not None else {}))
        if eager and plan.inplace:
            written(logits)
        zl = _zloss_out(plan, zpart, reduced, target, lse.device)
        loss = loss_rows.sum() if reduced else _shaped(loss_rows, target)
        acc = _accuracy(plan, am, t, None, lse.device)
        _keep(ctx, plan, reduced, eager)
        if eager:
            ctx.save_for_backward(gbuf)
        lse_out = _shaped(lse, target)
        ctx.mark_non_differentiable(*(v for v in (lse_out, zl, acc) if v is not None))
        return loss, lse_out, zl, acc

    @staticmethod
    def backward(ctx, grad_loss, _g_lse=None, _g_zl=None, _g_acc=None):
        plan = ctx.plan
        if grad_loss is None:
            return None, None, None, None
        written_buf = getattr(ctx, "written", None)
        if written_buf is not None:
            ctx.written = None
            return CrossEntropyFunction._hand_over(ctx, written_buf, grad_loss)
        if ctx.eager and not getattr(ctx, "again", False):
            if getattr(ctx, "consumed", False):
                # the buffer was scaled in place and handed to autograd: a second pass would
                # scale it again and corrupt the first result
                raise RuntimeError("fusedce computed this loss's gradient in the forward; "
                                   "backward through it can run once (recompute the loss to "
                                   "differentiate it again)")
            ctx.consumed = True
            (gbuf,) = ctx.saved_tensors
            return CrossEntropyFunction._hand_over(ctx, gbuf, grad_loss)
        logits, t, m, s, c_p, c_t, scale, valid, weight = ctx.saved_tensors
        g = grad_loss.float()
        g = (g * scale * valid) if ctx.reduced else g.reshape(-1) * valid
        g = g.expand(t.shape).contiguous() if g.dim() == 0 else g
        gbuf = _grad_buffer(logits, plan)
        x3 = as_rows3d(logits)
        wl = _weight_local(weight, plan, x3.shape[-1])
        plan.backend.grad(x3, t, m, s, g, c_p, c_t, plan.opts, vocab_size=plan.vocab_size,
                          out=as_rows3d(gbuf), vocab_start=plan.vocab_start, weight_local=wl,
                          whole_row=plan.group is None)
        if plan.inplace:
            written(logits)
        return gbuf.view_as(gbuf), None, None, None

    @staticmethod
    def _hand_over(ctx, gbuf: torch.Tensor, grad_loss: torch.Tensor):
        """The backward of a gradient written in the forward: scaled by the upstream gradient
        in place and handed to autograd."""
        be = ctx.plan.backend
        if ctx.reduced:
            be.scale_(gbuf, _scalar(grad_loss))
        else:
            be.scale_rows_(as_rows3d(gbuf), grad_loss.float().reshape(-1))
        # a fresh view, so that AccumulateGrad can take the buffer as the leaf's .grad
        # instead of copying it (gbuf may be the leaf itself with inplace_backward)
        return gbuf.view_as(gbuf), None, None, None


class EntropyFunction(torch.autograd.Function):
    """H(softmax(z)) per row, fp32; differentiable."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, plan: Plan):
        x3 = as_rows3d(logits)
        n = x3.shape[0] * x3.shape[1]
        dummy = torch.full((n,), plan.opts.ignore_index, dtype=torch.int64, device=logits.device)
        stats = plan.backend.row_stats(x3, dummy, plan.opts, vocab_start=plan.vocab_start,
                                       need_sez=True)
        stats = _exchange(stats, plan.group)
        ent = spec.entropy_of(stats)
        ctx.plan = plan
        if plan.need_grad:
            ctx.save_for_backward(logits, stats.m, stats.s, ent)
        return ent.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_ent):
        plan = ctx.plan
        logits, m, s, ent = ctx.saved_tensors
        gbuf = _grad_buffer(logits, plan)
        plan.backend.entropy_grad(as_rows3d(logits), m, s, ent, grad_ent.float().reshape(-1),
                                  plan.opts, out=as_rows3d(gbuf))
        return gbuf.view_as(gbuf), None


class LseFunction(torch.autograd.Function):
    """lse = log sum_j exp(z_j) per row, fp32, differentiable (d lse / dz_j = p_j): the
    ``lse`` of ``return_aux`` when it is asked to carry gradient (user regularisers)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, plan: Plan):
        x3 = as_rows3d(logits)
        n = x3.shape[0] * x3.shape[1]
        dummy = torch.full((n,), plan.opts.ignore_index, dtype=torch.int64, device=logits.device)
        stats = plan.backend.row_stats(x3, dummy, plan.opts, vocab_start=plan.vocab_start)
        stats = _exchange(stats, plan.group, need_sz=False)
        ctx.plan = plan
        if plan.need_grad:
            ctx.save_for_backward(logits, stats.m, stats.s)
        return spec.lse_of(stats).view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_lse):
        plan = ctx.plan
        logits, m, s = ctx.saved_tensors
        x3 = as_rows3d(logits)
        n = x3.shape[0] * x3.shape[1]
        g = grad_lse.float().reshape(-1).contiguous()
        # the CE gradient with c_p = 1, c_t = 0 and no smoothing is g * p_j
        opts = replace(plan.opts, label_smoothing=0.0, z_loss=0.0)
        ones = torch.ones(n, device=logits.device, dtype=torch.float32)
        dummy = torch.full((n,), opts.ignore_index, dtype=torch.int64, device=logits.device)
        gbuf = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        plan.backend.grad(x3, dummy, m, s, g, ones, torch.zeros_like(ones), opts,
                          vocab_size=plan.vocab_size, out=as_rows3d(gbuf),
                          vocab_start=plan.vocab_start, whole_row=plan.group is None)
        return gbuf.view_as(gbuf), None


def scale_(buf: torch.Tensor, factor: torch.Tensor) -> None:
    """buf *= factor (0-d tensor), for backends without a device-side early exit."""
    buf.mul_(factor.to(buf.dtype))


def scale_rows_(buf3: torch.Tensor, factor: torch.Tensor) -> None:
    """buf3[b, t, :] *= factor[b * T + t]."""
    B, T, _ = buf3.shape
    buf3.mul_(factor.view(B, T, 1).to(buf3.dtype))
