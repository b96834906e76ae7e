"""Fused linear cross-entropy, log-probabilities and entropy of ``hidden @ weight.T + bias``
without the logits.

For hidden rows h_r in R^D, the LM head W [V, D] (optionally a vocabulary shard
W[vocab_start : vocab_start + V_local]) and bias b, the logits x_r = W h_r + b go through
the loss spec of :mod:`fusedce.spec` unchanged:

    loss = reduce_r[ (1 - a) * w_t * (lse_r - z_rt) + (a / V) * sum_j w_j * (lse_r - z_rj)
                     + zl * lse_r^2 ],   z = softcap * tanh(logit_scale * x / softcap)

so ``linear_cross_entropy(h, W, t, bias=b, ...) == cross_entropy(h @ W.T + b, t, ...)``.
Rows are taken in chunks of C rows; only one chunk of logits X_c [C, V_local] ever exists.
With dX_c = dloss/dX_c (what the CE backends write), the gradients are

    dH_c = dX_c @ W          dW = sum_c dX_c^T @ H_c          db = sum_c 1^T dX_c

Two gradient strategies:

* eager (reductions sum / mean / normalizer, when autograd needs a gradient): the upstream
  gradient of a reduced loss is one scalar g, and dloss/dX is known in the forward once the
  mean denominator is (it depends on the targets only). So the forward does, per chunk,
  X_c = H_c W^T (+ b) (one GEMM), the row statistics and dX_c written over X_c itself
  (one fused backend kernel, or row_stats + grad), then dH_c and dW += dX_c^T H_c (two
  GEMMs). The backward only multiplies the stored gradients by g (a device-side no-op
  when g == 1 on the Triton backend). Total: the 3-GEMM floor plus one pass over each
  logits chunk.
* lazy (reduction "none", where every row has its own upstream gradient g_r): dW =
  sum_r g_r * dx_r h_r^T cannot be rescaled after the sum, so the forward keeps only the
  per-row statistics m and s and the backward recomputes X_c chunk by chunk and writes
  dX_c for the true g_r (4 GEMMs in all).

Vocabulary parallelism: each rank holds a row shard of W (and b); per chunk the row
statistics are exchanged with :func:`fusedce.distributed.allgather_stats` (a few floats
per row, never logits), each rank's dH_c is a partial sum over its shard, and dH is
all-reduced over the group (unless ``reduce_hidden_grad=False``).

RL ops (:func:`linear_logprobs`, :func:`linear_entropy`): per-row log p(target) and / or
entropy, each output with its own per-row upstream gradient, so they take the lazy strategy:
the forward forms each chunk's logits once (one GEMM) and keeps m, s, z_t and the centred
entropy sum of every row (see the RL ops section below); the backward recomputes each chunk
(one GEMM), writes dX_c for both outputs' upstream gradients at once (one pass) and forms
only the gradients whose inputs need one (dH, dW, db: up to two GEMMs). With a frozen head
(LoRA), one output and one rank, the forward also writes dH for a unit upstream gradient
(two GEMMs in all) and the backward scales its rows. Under TP the statistics of all rows
are exchanged once per call, after the last chunk.

Determinism: chunks are processed in a fixed order, dW and db are accumulated by GEMMs /
reductions with no atomics, so results are bitwise reproducible on one device.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from . import autograd as _ag
from . import functional as _fn
from . import spec
from .spec import CrossEntropyOutput, InputError, LossOptions

# (named imports: the package attribute ``fusedce.validation`` is the public context manager)
from .validation import (FLOAT_DTYPES, check_group, check_options, check_target,  # noqa: E402
                         check_target_range, check_weight, fingerprint_value, syncing, widened)


def _env_bytes(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(float(raw))
    except ValueError as exc:
        raise ValueError(f"{name} must be a number of bytes, got {raw!r}") from exc
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {raw!r}")
    return value


# Budget for one chunk of logits (in the hidden dtype) when chunk_size="auto". On the GPU
# larger chunks give the dW GEMM a longer inner dimension (K = chunk rows: fewer
# read-modify-write passes over dW, less prologue/epilogue per tile) and the dH GEMM more
# output tiles; measured on an H200 (docs/kernels.md), 250 -> 469 MiB chunks took the
# Gemma-2 shape from 1.29x to 1.20x of the 3-GEMM floor. 480 MiB keeps the extra memory
# under the gradients + 512 MB. Override with FUSEDCE_LINEAR_CHUNK_BYTES (every device)
# or assign these module attributes.
DEFAULT_CHUNK_BYTES: int = _env_bytes("FUSEDCE_LINEAR_CHUNK_BYTES", 480 << 20)
# The CPU path goes through the torch backend, which makes fp32 temporaries of its own
# (sub-chunks of ``spec.default_chunk_rows``); keep its chunks small.
DEFAULT_CHUNK_BYTES_CPU: int = _env_bytes("FUSEDCE_LINEAR_CHUNK_BYTES", 32 << 20)

_ACCUM_DTYPES = (None, torch.float32)


def auto_chunk_rows(n_rows: int, v_local: int, dtype: torch.dtype, device: torch.device,
                    budget_bytes: Optional[int] = None) -> int:
    """Rows per chunk so that one chunk of logits [rows, V_local] fits ``budget_bytes``.

    The budget defaults to :data:`DEFAULT_CHUNK_BYTES` on CUDA and
    :data:`DEFAULT_CHUNK_BYTES_CPU` elsewhere. Chunks are balanced (equal sizes, so no tiny
    last chunk) and rounded to multiples of 64 rows where the budget allows (GEMM tiles).
    """
    if budget_bytes is None:
        budget_bytes = DEFAULT_CHUNK_BYTES if device.type == "cuda" else DEFAULT_CHUNK_BYTES_CPU
    elem = torch.empty((), dtype=dtype).element_size()
    cap = max(1, int(budget_bytes) // max(1, v_local * elem))
    if n_rows <= cap:
        return max(1, n_rows)
    if cap < 64:
        return cap
    # whole 64-row GEMM tiles, then as few, equal chunks as that allows
    cap = cap // 64 * 64
    n_chunks = math.ceil(n_rows / cap)
    return min(cap, (math.ceil(n_rows / n_chunks) + 63) // 64 * 64)


# ---------------------------------------------------------------------------- autograd


@dataclass
class LinearPlan:
    """Everything the autograd function needs besides tensors."""

    opts: LossOptions
    backend: Any
    vocab_size: int  # global V
    chunk_rows: int
    vocab_start: int = 0
    group: Any = None
    normalizer: Any = None
    need_dh: bool = True
    need_dw: bool = True
    need_db: bool = False
    accum_dtype: Optional[torch.dtype] = None  # dW accumulator; None = weight's dtype
    reduce_hidden_grad: bool = True
    need_aux: bool = True  # the accuracy is wanted (backends with optional_argmax skip it else)


def _logits_into(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 out: torch.Tensor) -> None:
    if bias is None:
        torch.mm(h, weight.t(), out=out)
    else:
        torch.addmm(bias, h, weight.t(), out=out)


def _logit_chunks(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  chunk_rows: int, v_local: int):
    """Yield (r0, r1, hidden[r0:r1], logits of those rows) through one reused buffer, so
    that only one chunk of logits [chunk_rows, V_local] ever exists."""
    n = hidden.shape[0]
    rows = min(chunk_rows, max(n, 1))
    buf = torch.empty((rows, v_local), dtype=hidden.dtype, device=hidden.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        x = buf[:r1 - r0]
        _logits_into(hidden[r0:r1], weight, bias, x)
        yield r0, r1, hidden[r0:r1], x


_OUT_DTYPE_MM: Optional[bool] = None  # whether addmm(..., out_dtype=fp32) works on CUDA


def _accumulate_dw(dw: torch.Tensor, dx: torch.Tensor, h: torch.Tensor, first: bool) -> None:
    """dw (+)= dx^T @ h, accumulated in dw's dtype."""
    global _OUT_DTYPE_MM
    if dw.dtype == dx.dtype:
        if first:
            torch.mm(dx.t(), h, out=dw)
        else:
            dw.addmm_(dx.t(), h)
        return
    # fp32 accumulator, low-precision operands: let the GEMM write fp32 directly where the
    # build supports it (CUDA), else upcast the chunk operands (chunk-sized temporaries)
    if dx.is_cuda and _OUT_DTYPE_MM is not False:
        try:
            torch.addmm(dw, dx.t(), h, beta=0.0 if first else 1.0, out_dtype=dw.dtype, out=dw)
            _OUT_DTYPE_MM = True
            return
        except (RuntimeError, TypeError):
            _OUT_DTYPE_MM = False
    if first:
        torch.mm(dx.t().to(dw.dtype), h.to(dw.dtype), out=dw)
    else:
        dw.addmm_(dx.t().to(dw.dtype), h.to(dw.dtype))


def _scale_fn(be):
    if getattr(be, "eager_grad", False) and hasattr(be, "scale_"):
        return be.scale_
    return _ag.scale_


class _Grads:
    """Gradient buffers accumulated chunk by chunk (None where not needed)."""

    def __init__(self, plan: LinearPlan, hidden: torch.Tensor, weight: torch.Tensor,
                 bias: Optional[torch.Tensor]):
        n = hidden.shape[0]
        self.dh = torch.empty_like(hidden) if plan.need_dh else None
        self.dw = None
        if plan.need_dw:
            dt = plan.accum_dtype or weight.dtype
            # zeros only when no chunk will write it (N == 0)
            alloc = torch.zeros if n == 0 else torch.empty
            self.dw = alloc(weight.shape, dtype=dt, device=weight.device)
        self.db = (torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
                   if plan.need_db else None)
        self.first = True

    def add_chunk(self, dx: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                  r0: int, r1: int) -> None:
        if self.dh is not None:
            torch.mm(dx, weight, out=self.dh[r0:r1])
        if self.dw is not None:
            _accumulate_dw(self.dw, dx, h, self.first)
        if self.db is not None:
            self.db += dx.sum(dim=0, dtype=torch.float32)
        self.first = False

    def finish(self, plan: LinearPlan, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        if self.dh is not None and plan.group is not None and plan.reduce_hidden_grad:
            import torch.distributed as dist

            dist.all_reduce(self.dh, group=plan.group)
        dw = self.dw
        if dw is not None and dw.dtype != weight.dtype:
            self.dw = None  # free the accumulator as the cast copy is made
            dw = dw.to(weight.dtype)
        db = None if self.db is None else self.db.to(bias.dtype)
        return self.dh, dw, db


class LinearCrossEntropyFunction(torch.autograd.Function):
    """loss, lse, z-loss part, accuracy of CE(hidden @ weight.T + bias); loss differentiable."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                target: torch.Tensor, class_weight: Optional[torch.Tensor], plan: LinearPlan):
        ctx.set_materialize_grads(False)  # lse, z-loss, accuracy: no zero gradients
        with torch.autocast(hidden.device.type, enabled=False):
            return LinearCrossEntropyFunction._forward(ctx, hidden, weight, bias, target,
                                                       class_weight, plan)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, target, class_weight, plan: LinearPlan):
        opts, be = plan.opts, plan.backend
        n = hidden.shape[0]
        v_local = weight.shape[0]
        V = plan.vocab_size
        t = target
        wl = None if class_weight is None else \
            class_weight[plan.vocab_start:plan.vocab_start + v_local]
        terms = spec.row_terms(t, opts, V, class_weight)
        scale = spec.row_scale(terms, opts, plan.normalizer)
        reduced = opts.reduction != "none" or plan.normalizer is not None
        need_any = plan.need_dh or plan.need_dw or plan.need_db
        eager = need_any and reduced
        fused = eager and plan.group is None and getattr(be, "supports_fused", False)
        g0 = terms.valid.float() * scale if eager else None

        dev = hidden.device
        m = torch.empty(n, device=dev, dtype=torch.float32)
        s = torch.empty_like(m)
        zt = torch.empty_like(m)
        sz = torch.zeros_like(m)
        am = torch.empty(n, device=dev, dtype=torch.int64)
        grads = _Grads(plan, hidden, weight, bias) if eager else None

        need_sz = opts.label_smoothing > 0.0
        # (the argmax costs a full pass of its own on CPUs: only for the accuracy)
        am_kw = {"need_am": plan.need_aux} if getattr(be, "optional_argmax", False) else {}
        for r0, r1, h_c, x in _logit_chunks(hidden, weight, bias, plan.chunk_rows, v_local):
            x3 = x.unsqueeze(0)
            t_c = t[r0:r1]
            if fused:
                st = be.fused(x3, t_c, opts, g0=g0[r0:r1], terms=terms.rows(r0, r1),
                              vocab_size=V, out=x3, weight_local=wl, **am_kw)
            else:
                st = be.row_stats(x3, t_c, opts, vocab_start=plan.vocab_start, weight_local=wl,
                                  need_sz=need_sz, **am_kw)
                if plan.group is not None:
                    from .distributed import allgather_stats

                    st = allgather_stats(st, plan.group)
                if eager:
                    lse_c = spec.lse_of(st)
                    c_p, c_t = spec.grad_coefficients(lse_c, terms.rows(r0, r1),
                                                      opts, V)
                    be.grad(x3, t_c, st.m, st.s, g0[r0:r1], c_p, c_t, opts, vocab_size=V,
                            out=x3, vocab_start=plan.vocab_start, weight_local=wl,
                            whole_row=plan.group is None)
            m[r0:r1] = st.m
            s[r0:r1] = st.s
            zt[r0:r1] = st.zt
            if need_sz:
                sz[r0:r1] = st.sz
            am[r0:r1] = st.am
            if eager:
                grads.add_chunk(x, h_c, weight, r0, r1)

        stats = spec.RowStats(m, s, zt, sz, am)
        loss_rows, lse, zpart = spec.row_loss(stats, terms, opts, V)
        if zpart is None:
            zpart = torch.zeros_like(lse)
        if reduced:
            loss = loss_rows.sum() * scale
            zl = zpart.sum() * scale
        else:
            loss = loss_rows
            zl = zpart
        # (None is no output while torch.compile traces the backward: the tensor then)
        acc = spec.accuracy(am, t, terms.valid) \
            if plan.need_aux or torch.compiler.is_compiling() else None

        ctx.plan = plan
        ctx.eager = eager
        ctx.used = False
        if eager:
            ctx.grads = grads.finish(plan, weight, bias)
        elif need_any:
            ctx.save_for_backward(hidden, weight, bias, t, class_weight, m, s)
        ctx.mark_non_differentiable(*(v for v in (lse, zl, acc) if v is not None))
        return loss, lse, zl, acc

    @staticmethod
    def backward(ctx, grad_loss, _g_lse=None, _g_zl=None, _g_acc=None):
        plan = ctx.plan
        if grad_loss is None:
            return None, None, None, None, None, None
        if ctx.eager:
            if ctx.used:
                raise RuntimeError(
                    "fusedce.linear_cross_entropy: backward through the same loss twice is not "
                    "supported for reduced losses (the gradients are computed in the forward and "
                    "handed over once); recompute the loss for a second backward")
            ctx.used = True
            dh, dw, db = ctx.grads
            ctx.grads = None
            scale_ = _scale_fn(plan.backend)
            g = grad_loss.detach().float().reshape(())
            for buf in (dh, dw, db):
                if buf is not None:
                    scale_(buf, g)
            return dh, dw, db, None, None, None
        hidden, weight, bias, t, class_weight, m, s = ctx.saved_tensors
        with torch.autocast(hidden.device.type, enabled=False):
            dh, dw, db = _lazy_backward(plan, hidden, weight, bias, t, class_weight, m, s,
                                        grad_loss.detach().float().reshape(-1))
        return dh, dw, db, None, None, None


def _lazy_backward(plan: LinearPlan, hidden, weight, bias, t, class_weight, m, s, g_rows):
    """Recompute each logits chunk and write its gradient for per-row upstream g_rows."""
    opts, be = plan.opts, plan.backend
    v_local = weight.shape[0]
    V = plan.vocab_size
    wl = None if class_weight is None else \
        class_weight[plan.vocab_start:plan.vocab_start + v_local]
    terms = spec.row_terms(t, opts, V, class_weight)
    g = g_rows * terms.valid
    c_p, c_t = spec.grad_coefficients(m + torch.log(s), terms, opts, V)
    grads = _Grads(plan, hidden, weight, bias)
    for r0, r1, h_c, x in _logit_chunks(hidden, weight, bias, plan.chunk_rows, v_local):
        x3 = x.unsqueeze(0)
        be.grad(x3, t[r0:r1], m[r0:r1], s[r0:r1], g[r0:r1], c_p[r0:r1], c_t[r0:r1], opts,
                vocab_size=V, out=x3, vocab_start=plan.vocab_start, weight_local=wl,
                whole_row=plan.group is None)
        grads.add_chunk(x, h_c, weight, r0, r1)
    return grads.finish(plan, weight, bias)


# ---------------------------------------------------------------------------- RL ops
#
# Log-probabilities and entropy from hidden states. Per row, from one chunk of logits:
#
#     m = max_j z_j,   s = sum_j exp(z_j - m),   z_t,   u = sum_j exp(z_j - m) (z_j - m)
#     log p_t = (z_t - m) - log s,               H = log s - u / s
#
# Every quantity is a difference to the row maximum, so a common offset of the logits (a
# row whose logits are all ~1e6) changes nothing beyond the rounding of z_j - m; the
# lse - sum_j p_j z_j form loses the whole entropy to the rounding of lse there. Pieces of
# the vocabulary (ranks) combine as m = max_k m_k, f_k = exp(m_k - m):
#
#     s = sum_k f_k s_k,   u = sum_k f_k (u_k + (m_k - m) s_k),   z_t = sum_k z_t,k
#
# With c = u / s = log s - H and upstream row gradients g_t (log-prob; 0 on ignored rows)
# and g_h (entropy), the gradient with respect to z_j is
#
#     dz_j = g_t [j = t] - p_j (g_t - g_h c + g_h (z_j - m)),   p_j = exp((z_j - m) - log s)
#
# (dH/dz_j = -p_j ((z_j - m) - c) is -p_j (z_j - (lse - H)) written without lse), then
# chained through the softcap and logit_scale like every other gradient of the spec.
#
# The torch backend computes both with the PyTorch ops of _chunk_stats / _chunk_grad; a
# kernel backend (Triton) with its statistics kernel (row_stats: its sez is u) and its
# gradient kernels (_kernel_dx), one read of the chunk for the statistics and one
# read-write for dX.

# fp32 temporaries of the chunk math: rows are taken in sub-chunks of at most this many
# bytes per temporary (a chunk of logits is sized for the GEMMs, which want it large; the
# elementwise passes only want their temporaries bounded)
MATH_BYTES_CUDA: int = 64 << 20
MATH_BYTES_CPU: int = 8 << 20


def _math_rows(v_local: int, device: torch.device) -> int:
    budget = MATH_BYTES_CUDA if device.type == "cuda" else MATH_BYTES_CPU
    return max(1, budget // (4 * max(1, v_local)))


def _chunk_stats(x: torch.Tensor, local: Optional[torch.Tensor], inside: Optional[torch.Tensor],
                 opts: LossOptions, want_ent: bool, rows: int, m: torch.Tensor, s: torch.Tensor,
                 zt: torch.Tensor, u: torch.Tensor) -> None:
    """Write m, s, z_t (with a target) and u (with ``want_ent``) of the logits chunk ``x``
    [C, V_local] into the [C] slices given."""
    C = x.shape[0]
    for a in range(0, C, rows):
        b = min(C, a + rows)
        z = spec.transform(x[a:b], opts)  # (x itself for fp32 without transform: read only)
        mc = z.amax(dim=1)
        m[a:b] = mc
        # an all -inf row has no finite maximum to subtract; 0 gives s = 0 and u = 0
        shift = torch.where(torch.isneginf(mc), torch.zeros_like(mc), mc)
        d = z - shift.unsqueeze(1)
        if local is not None:
            zc = z.gather(1, local[a:b].unsqueeze(1)).squeeze(1)
            zt[a:b] = torch.where(inside[a:b], zc, torch.zeros_like(zc))
        if want_ent:
            e = d.exp()
            s[a:b] = e.sum(dim=1)
            # exp(-inf) * -inf is NaN; such a column contributes 0
            d.mul_(e).masked_fill_(e == 0, 0.0)
            u[a:b] = d.sum(dim=1)
        else:
            s[a:b] = d.exp_().sum(dim=1)


def _target_dz(d_t: torch.Tensor, log_s: torch.Tensor, c: Optional[torch.Tensor],
               g_t: torch.Tensor, g_h: Optional[torch.Tensor]) -> torch.Tensor:
    """dz at the target column, g_t (1 - p_t) - g_h p_t ((z_t - m) - c), from d_t = z_t - m:
    1 - p_t as -expm1(log p_t), exact where p_t is near 1 (a confident row), where
    g_t - g_t p_t of two rounded terms loses every digit."""
    log_pt = d_t - log_s
    val = g_t * -torch.expm1(log_pt)
    if g_h is not None:
        p_t = log_pt.exp()
        # p_t = 0 (z_t = -inf): no entropy term, not 0 * inf
        ent = torch.where(p_t == 0, torch.zeros_like(p_t), g_h * p_t * (d_t - c))
        val = val - ent
    return val


def _chunk_grad(x: torch.Tensor, local: Optional[torch.Tensor], inside: Optional[torch.Tensor],
                opts: LossOptions, m: torch.Tensor, log_s: torch.Tensor,
                c: Optional[torch.Tensor], g_t: Optional[torch.Tensor],
                g_h: Optional[torch.Tensor], zero: torch.Tensor, rows: int) -> None:
    """Overwrite the logits chunk ``x`` [C, V_local] with dx for the row coefficients [C]:

        dz_j = g_t [j = t] - p_j (g_t - g_h c + g_h (z_j - m))
        dz_j = g_t [j = t] - p_j g_t                      (g_h None: log-probs only)

    the target column in the form of :func:`_target_dz`. ``g_t`` None: no log-prob term.
    Rows flagged in ``zero`` get exactly 0 (rows without upstream gradient, whatever their
    logits hold: NaN, inf)."""
    C = x.shape[0]
    for a in range(0, C, rows):
        b = min(C, a + rows)
        xv = x[a:b]
        z = spec.transform(xv, opts)
        d = z - m[a:b].unsqueeze(1)
        with_target = g_t is not None and local is not None
        if with_target:
            idx = local[a:b].unsqueeze(1)
            d_t = d.gather(1, idx).squeeze(1)  # (read before d is overwritten)
        p = (d - log_s[a:b].unsqueeze(1)).exp_()
        if g_h is not None:
            gh = g_h[a:b]
            coef = -gh * c[a:b] if g_t is None else g_t[a:b] - gh * c[a:b]
            d.mul_(gh.unsqueeze(1)).add_(coef.unsqueeze(1)).mul_(p)
            # p = 0 where z = -inf: 0 * inf is NaN there; the column's gradient is 0
            out = d.masked_fill_(p == 0, 0.0).neg_()
        else:
            out = p.mul_(-g_t[a:b].unsqueeze(1))
        if with_target:
            val = _target_dz(d_t, log_s[a:b], _sl(c, a, b), g_t[a:b], _sl(g_h, a, b))
            keep = out.gather(1, idx).squeeze(1)
            out.scatter_(1, idx, torch.where(inside[a:b], val, keep).unsqueeze(1))
        f = spec.chain_factor(z, opts)
        if f is not None:
            out.mul_(f)
        out.masked_fill_(zero[a:b].unsqueeze(1), 0.0)
        xv.copy_(out)


def _combine_ranks(m, s, zt, u, group, want_lp: bool, want_ent: bool):
    """The statistics of the whole vocabulary from every rank's piece: one all-gather of
    the packed per-row fields (a few floats per row, never logits)."""
    import torch.distributed as dist

    from . import distributed

    world = dist.get_world_size(group)
    if world == 1:
        return m, s, zt, u
    fields = [m, s] + ([zt] if want_lp else []) + ([u] if want_ent else [])
    allf = distributed.gather_on_comm_device(torch.stack(fields), group, world)  # [W, F, N]
    m_all, s_all = allf[:, 0], allf[:, 1]
    m_tot = m_all.amax(dim=0)
    empty = m_all == float("-inf")  # a piece whose z are all -inf contributes nothing
    gap = torch.where(empty, torch.zeros_like(m_all), m_all - m_tot.unsqueeze(0))
    f = torch.where(empty, torch.zeros_like(m_all), gap.exp())
    s_tot = (f * s_all).sum(dim=0)
    zt_tot = allf[:, 2].sum(dim=0) if want_lp else zt
    u_tot = u
    if want_ent:
        u_all = allf[:, 2 + int(want_lp)]
        u_tot = (f * (u_all + gap * s_all)).sum(dim=0)
    return m_tot, s_tot, zt_tot, u_tot


@dataclass
class RLPlan:
    """Everything :class:`LinearLogprobEntropyFunction` needs besides tensors (the gradient
    fields are named as :class:`LinearPlan`'s: :class:`_Grads` takes either)."""

    opts: LossOptions
    backend: Any
    chunk_rows: int
    want_lp: bool
    want_ent: bool
    vocab_start: int = 0
    group: Any = None
    need_dh: bool = True
    need_dw: bool = True
    need_db: bool = False
    accum_dtype: Optional[torch.dtype] = None
    reduce_hidden_grad: bool = True

    @property
    def eager(self) -> bool:
        """Frozen head (no dW, no db), one output, one rank: the forward also writes the
        gradient of hidden for a unit upstream gradient (dX_c, then dX_c @ W per chunk),
        and the backward scales its rows. Two GEMMs per chunk in all instead of the three of
        recomputing the logits (the floor of a frozen head: LoRA, RL with a fixed head)."""
        return (self.need_dh and not self.need_dw and not self.need_db and self.group is None
                and self.want_lp != self.want_ent)


def _targets_local(t: Optional[torch.Tensor], opts: LossOptions, start: int, v_local: int):
    if t is None:
        return None, None, None
    valid = t != opts.ignore_index
    local, inside = _local_target(t, valid, start, v_local)
    return valid, local, inside


def _local_target(t, valid, start: int, v_local: int):
    loc = t.long() - start
    inside = valid & (loc >= 0) & (loc < v_local)
    return loc.clamp(0, v_local - 1), inside


def _uses_kernels(be) -> bool:
    """Whether the chunk statistics and dX go through the backend's kernels (one read / one
    read-write of the chunk) rather than the PyTorch ops here."""
    return getattr(be, "name", "torch") != "torch"


def _write_dx(plan: RLPlan, x: torch.Tensor, t_c, local_c, inside_c, m_c, s_c, c_c, zt_c, g_t,
              g_h, rows: int) -> None:
    """Overwrite the logits chunk ``x`` [C, V_local] with dx for the upstream row gradients
    ``g_t`` (log-probs, 0 on ignored rows) and ``g_h`` (entropy), either None.

    Kernel backends: one gradient kernel, one read-write of the chunk (see
    :func:`_kernel_dx`). The torch backend: the PyTorch form of :func:`_chunk_grad`.
    """
    if _uses_kernels(plan.backend):
        _kernel_dx(plan, x, t_c, local_c, inside_c, m_c, s_c, c_c, zt_c, g_t, g_h)
        return
    if g_h is None:
        zero = g_t == 0
    elif g_t is None:
        zero = g_h == 0
    else:
        zero = (g_t == 0) & (g_h == 0)
    _chunk_grad(x, local_c, inside_c, plan.opts, m_c, torch.log(s_c), c_c, g_t, g_h, zero,
                rows)


def _kernel_dx(plan: RLPlan, x, t_c, local_c, inside_c, m_c, s_c, c_c, zt_c, g_t, g_h) -> None:
    """dx of the chunk through the backend's kernels.

    Log-probs alone: the CE gradient with c_p = c_t = 1 and g negated (d log p_t / dz). The
    entropy, alone or with the log-probs: the entropy gradient kernel, which writes
    -g p_j ((z_j - m) - k) for a per-row constant k (it takes k as log s - H). With g = g_h
    and k = c - g_t / g_h that is -p_j (g_t - g_h c + g_h (z_j - m)): every column of the
    combined gradient but the target's, which is then written from the row statistics
    (:func:`_target_dz`). Rows whose g_h is 0, or tiny next to g_t, take g = 2^-30 |g_t|:
    their g_h terms lie below fp32 resolution there, and folding g_t into k costs
    ~2^-24 |g_t| whatever the ratio.
    """
    be, opts = plan.backend, plan.opts
    x3 = x.unsqueeze(0)
    if g_h is None:
        ones = torch.ones_like(g_t)
        # (vocab_size enters label smoothing only, which log-probs do not have)
        be.grad(x3, t_c, m_c, s_c, -g_t, ones, ones, opts, vocab_size=x.shape[1], out=x3,
                vocab_start=plan.vocab_start, whole_row=plan.group is None)
        return
    log_s = torch.log(s_c)
    if g_t is None:
        be.entropy_grad(x3, m_c, s_c, log_s - c_c, g_h, opts, out=x3)
        return
    tiny = g_t.abs() * 2.0 ** -30
    g = torch.where(g_h.abs() >= tiny, g_h, tiny)
    # g = 0 only on rows without upstream gradient (the kernel writes 0 there): keep k finite
    k = torch.where(g == 0, torch.zeros_like(c_c), c_c - g_t / g)
    be.entropy_grad(x3, m_c, s_c, log_s - k, g, opts, out=x3)
    val = _target_dz(zt_c - m_c, log_s, c_c, g_t, g_h)
    f = spec.chain_factor(zt_c, opts)
    if f is not None:
        val = val * f
    idx = local_c.unsqueeze(1)
    keep = x.gather(1, idx).squeeze(1)
    x.scatter_(1, idx, torch.where(inside_c & (g_t != 0), val.to(x.dtype), keep).unsqueeze(1))


def _sl(x: Optional[torch.Tensor], r0: int, r1: int) -> Optional[torch.Tensor]:
    return None if x is None else x[r0:r1]


def _kernel_stats(plan: RLPlan, x: torch.Tensor, t_stats: torch.Tensor, r0: int, r1: int,
                  m: torch.Tensor, s: torch.Tensor, zt: torch.Tensor, u: torch.Tensor) -> None:
    """Write rows r0:r1 of m, s, z_t (log-probs) and u (entropy) from the logits chunk ``x``
    through the backend's statistics kernel (one read of the chunk)."""
    st = plan.backend.row_stats(x.unsqueeze(0), t_stats[r0:r1], plan.opts,
                                vocab_start=plan.vocab_start, need_sez=plan.want_ent,
                                need_am=False)
    m[r0:r1], s[r0:r1] = st.m, st.s
    if plan.want_lp:
        zt[r0:r1] = st.zt
    if plan.want_ent:
        u[r0:r1] = st.sez


def _rl_outputs(plan: RLPlan, valid, m: torch.Tensor, s: torch.Tensor, zt: torch.Tensor,
                u: torch.Tensor):
    """The outputs the plan asks for (log-probs first) from the whole rows' statistics, and
    c = u / s (None without the entropy), which the backward takes."""
    log_s = torch.log(s)
    outs = []
    if plan.want_lp:
        # where, not a product: ignored rows give +0.0 whatever their logits hold
        outs.append(torch.where(valid, (zt - m) - log_s, 0.0))
    c = None
    if plan.want_ent:
        c = u / s
        outs.append(log_s - c)
    return outs, c


class LinearLogprobEntropyFunction(torch.autograd.Function):
    """Per-row log p(target) and/or entropy of softmax(z(hidden @ weight.T + bias)), fp32;
    every output differentiable. Returns the outputs the plan asks for, log-probs first."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                target: Optional[torch.Tensor], plan: RLPlan):
        ctx.set_materialize_grads(False)  # an output without upstream gradient is skipped
        with torch.autocast(hidden.device.type, enabled=False):
            return LinearLogprobEntropyFunction._forward(ctx, hidden, weight, bias, target, plan)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, t, plan: RLPlan):
        opts, be = plan.opts, plan.backend
        n = hidden.shape[0]
        v_local = weight.shape[0]
        dev = hidden.device
        want_lp, want_ent = plan.want_lp, plan.want_ent
        valid, local, inside = _targets_local(t, opts, plan.vocab_start, v_local)
        m = torch.empty(n, device=dev, dtype=torch.float32)
        s = torch.empty_like(m)
        zt = torch.zeros_like(m)
        u = torch.zeros_like(m)
        rows = _math_rows(v_local, dev)
        kernels = _uses_kernels(be)
        # the statistics kernel takes a target: ignored everywhere for the entropy alone
        t_stats = t if t is not None or not kernels else \
            torch.full((n,), opts.ignore_index, dtype=torch.int64, device=dev)
        eager = plan.eager
        need_any = plan.need_dh or plan.need_dw or plan.need_db
        dh0 = torch.empty_like(hidden) if eager else None
        g_t0 = valid.float() if eager and want_lp else None
        g_h0 = torch.ones_like(m) if eager and want_ent else None
        for r0, r1, _, x in _logit_chunks(hidden, weight, bias, plan.chunk_rows, v_local):
            if kernels:
                _kernel_stats(plan, x, t_stats, r0, r1, m, s, zt, u)
            else:
                _chunk_stats(x, _sl(local, r0, r1), _sl(inside, r0, r1), opts, want_ent, rows,
                             m[r0:r1], s[r0:r1], zt[r0:r1], u[r0:r1])
            if eager:
                # (one rank: the chunk's statistics are the whole vocabulary's)
                _write_dx(plan, x, _sl(t, r0, r1), _sl(local, r0, r1), _sl(inside, r0, r1),
                          m[r0:r1], s[r0:r1], u[r0:r1] / s[r0:r1], zt[r0:r1],
                          _sl(g_t0, r0, r1), _sl(g_h0, r0, r1), rows)
                torch.mm(x, weight, out=dh0[r0:r1])
        if plan.group is not None:
            m, s, zt, u = _combine_ranks(m, s, zt, u, plan.group, want_lp, want_ent)
        outs, c = _rl_outputs(plan, valid, m, s, zt, u)
        ctx.plan = plan
        if eager:
            ctx.dh0 = dh0
        elif need_any:
            ctx.save_for_backward(hidden, weight, bias, t, m, s, c, zt if want_lp else None)
        return tuple(outs) if len(outs) > 1 else outs[0]

    @staticmethod
    def backward(ctx, *grads):
        plan = ctx.plan
        it = iter(grads)
        g_lp = next(it) if plan.want_lp else None
        g_ent = next(it) if plan.want_ent else None
        none = (None, None, None, None, None)
        if g_lp is None and g_ent is None:
            return none
        if plan.eager:
            g = (g_lp if plan.want_lp else g_ent).detach().float().reshape(-1, 1)
            if not ctx.needs_input_grad[0]:
                return none
            dh0 = ctx.dh0
            # rows without upstream gradient get 0 even where dh0 holds NaN
            dh = torch.where(g != 0, dh0 * g, torch.zeros((), dtype=dh0.dtype,
                                                           device=dh0.device))
            return dh.to(dh0.dtype), None, None, None, None
        hidden, weight, bias, t, m, s, c, zt = ctx.saved_tensors
        need = dataclasses.replace(
            plan, need_dh=plan.need_dh and ctx.needs_input_grad[0],
            need_dw=plan.need_dw and ctx.needs_input_grad[1],
            need_db=plan.need_db and ctx.needs_input_grad[2])
        if not (need.need_dh or need.need_dw or need.need_db):
            return none
        with torch.autocast(hidden.device.type, enabled=False):
            dh, dw, db = _rl_backward(need, hidden, weight, bias, t, m, s, c, zt,
                                      None if g_lp is None else g_lp.detach().float().reshape(-1),
                                      None if g_ent is None else g_ent.detach().float().reshape(-1))
        return dh, dw, db, None, None


def _rl_backward(plan: RLPlan, hidden, weight, bias, t, m, s, c, zt, g_lp, g_ent):
    """Recompute each logits chunk, overwrite it with dx and accumulate dH, dW, db."""
    v_local = weight.shape[0]
    valid, local, inside = _targets_local(t, plan.opts, plan.vocab_start, v_local)
    g_t = None if g_lp is None else torch.where(valid, g_lp, torch.zeros_like(g_lp))
    rows = _math_rows(v_local, hidden.device)
    grads = _Grads(plan, hidden, weight, bias)
    for r0, r1, h_c, x in _logit_chunks(hidden, weight, bias, plan.chunk_rows, v_local):
        _write_dx(plan, x, _sl(t, r0, r1), _sl(local, r0, r1), _sl(inside, r0, r1), m[r0:r1],
                  s[r0:r1], _sl(c, r0, r1), _sl(zt, r0, r1), _sl(g_t, r0, r1),
                  _sl(g_ent, r0, r1), rows)
        grads.add_chunk(x, h_c, weight, r0, r1)
    return grads.finish(plan, weight, bias)


# ---------------------------------------------------------------------------- input checks


def _check_linear_inputs(hidden, weight, bias) -> None:
    if not isinstance(hidden, torch.Tensor):
        raise InputError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise InputError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise InputError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least one dimension (the hidden size D)")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V_local, D] (the LM head), got shape "
                         f"{tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight has shape {tuple(weight.shape)} but hidden's last dimension "
                         f"is {hidden.shape[-1]}: weight must be [V_local, D] with D = "
                         f"hidden.shape[-1]")
    if weight.shape[0] < 1:
        raise ValueError("weight has no rows (an empty vocabulary shard)")
    if weight.dtype != hidden.dtype:
        raise InputError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}; "
                        "cast one of them (or run under torch.autocast)")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise InputError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},) like weight's rows, got "
                             f"{tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise InputError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")


def _check_chunk_size(chunk_size) -> None:
    if chunk_size == "auto":
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be 'auto' or a positive int (rows per chunk), got "
                         f"{chunk_size!r}")


def _check_accum_dtype(accum_dtype, weight_dtype):
    if accum_dtype in ("fp32", "float32"):
        accum_dtype = torch.float32
    if accum_dtype not in _ACCUM_DTYPES and accum_dtype != weight_dtype:
        raise ValueError(f"accum_dtype must be None (the weight's dtype) or torch.float32, got "
                         f"{accum_dtype!r}")
    return None if accum_dtype == weight_dtype else accum_dtype


def _autocast(hidden, weight, bias):
    """Cast like F.linear does under torch.autocast (the operands to the autocast dtype)."""
    dev = hidden.device.type
    try:
        enabled = torch.is_autocast_enabled(dev)
    except TypeError:  # pragma: no cover - older torch: no device argument
        enabled = torch.is_autocast_enabled() if dev == "cuda" else False
    if not enabled:
        return hidden, weight, bias
    try:
        dt = torch.get_autocast_dtype(dev)
    except AttributeError:  # pragma: no cover - older torch
        dt = torch.get_autocast_gpu_dtype() if dev == "cuda" else torch.bfloat16
    cast = [x if not isinstance(x, torch.Tensor) or not x.is_floating_point() else x.to(dt)
            for x in (hidden, weight, bias)]
    return cast[0], cast[1], cast[2]


@dataclass
class _Unpacked:
    """The plain-tensor arguments of a linear call and its vocabulary layout, as
    :func:`_unpack_dtensors` finds them in DTensor inputs."""

    hidden: Any
    weight: Any
    bias: Any
    group: Any
    vocab_start: Any  # as given until the call's checks
    # the validation checks that hidden is the same on every rank of ``group``
    check_hidden: bool = False


def _unpack_dtensors(hidden, weight, bias, tp_group, vocab_start) -> _Unpacked:
    """Plain tensors (hidden, weight, bias), group, vocab_start and whether hidden must be
    checked to be the same on every rank, from DTensor inputs.

    A weight DTensor sharded on dim 0 over a 1-D mesh is a vocabulary shard over that mesh's
    group (DESIGN: DTensor inputs sharded on the vocabulary dim are unpacked automatically).
    An FSDP2 shard looks the same (Shard(0) over the data-parallel mesh) but its ranks hold
    different hidden states; so where neither ``tp_group`` (that mesh's group) nor a
    replicated DTensor ``hidden`` on the mesh says it is a vocabulary shard, the validation
    checks that hidden is the same on every rank (``check_hidden``) and otherwise raises
    what to do. Fully replicated DTensors are unwrapped. Other layouts are refused.
    """
    from .distributed import dtensor_types

    plain = _Unpacked(hidden, weight, bias, tp_group, vocab_start)
    dt = dtensor_types()
    if dt is None:
        return plain
    DTensor, Replicate, Shard = dt
    if not any(isinstance(x, DTensor) for x in (hidden, weight, bias)):
        return plain
    if isinstance(hidden, DTensor) and not _replicated(hidden, DTensor, Replicate):
        raise ValueError(f"hidden is a DTensor with placements {hidden.placements}; only a "
                         "replicated DTensor hidden is taken (pass hidden.to_local() for data "
                         "that differs per rank, or hidden.full_tensor())")
    if _replicated(weight, DTensor, Replicate):
        weight = weight.to_local()
    if _replicated(bias, DTensor, Replicate):
        bias = bias.to_local()
    if not isinstance(weight, DTensor):
        if isinstance(bias, DTensor):
            raise ValueError(f"bias is a DTensor ({bias.placements}) but weight is not")
        return _Unpacked(_to_local(hidden, DTensor), weight, bias, tp_group, vocab_start)
    return _vocab_shard(hidden, weight, bias, tp_group, vocab_start, DTensor, Shard)


def _replicated(x, DTensor, Replicate) -> bool:
    return isinstance(x, DTensor) and all(isinstance(p, Replicate) for p in x.placements)


def _to_local(x, DTensor):
    return x.to_local() if isinstance(x, DTensor) else x


def _vocab_shard(hidden, weight, bias, tp_group, vocab_start, DTensor, Shard) -> _Unpacked:
    """The layout of a DTensor weight that is not replicated: a vocabulary shard over its
    1-D mesh, whose group is the vocabulary group, or an error that says what to do."""
    mesh = weight.device_mesh
    pl = weight.placements
    sharded_rows = (mesh.ndim == 1 and len(pl) == 1 and isinstance(pl[0], Shard)
                    and pl[0].dim in (0, -2))
    mesh_group = mesh.get_group() if mesh.ndim == 1 else None
    hidden_on_mesh = isinstance(hidden, DTensor) and hidden.device_mesh == mesh
    if not sharded_rows or not (tp_group is None or tp_group is mesh_group or hidden_on_mesh):
        raise ValueError(
            f"weight is a DTensor with placements {pl} over {mesh}. fusedce takes a DTensor "
            "weight only as a vocabulary (tensor-parallel) shard: sharded on dim 0 over a 1-D "
            "mesh, whose group is the vocabulary group (tp_group None or "
            "weight.device_mesh.get_group()). " + _FSDP_HINT)
    check_hidden = tp_group is None and not hidden_on_mesh
    if isinstance(bias, DTensor):
        bp = bias.placements
        if bias.device_mesh != mesh or not (len(bp) == 1 and isinstance(bp[0], Shard)):
            raise ValueError(f"bias DTensor ({bp}) must be sharded like weight over its mesh")
        bias = bias.to_local()
    if vocab_start is None:
        # DTensor's Shard follows torch.chunk: ceil(V / world) rows per rank, the tail short
        step = math.ceil(weight.shape[0] / mesh.size())
        vocab_start = min(mesh.get_local_rank() * step, weight.shape[0])
    weight = weight.to_local()
    return _Unpacked(_to_local(hidden, DTensor), weight, bias, mesh_group, vocab_start,
                     check_hidden)


_FSDP_HINT = ("For an FSDP2-sharded LM head, call the loss inside the FSDP-wrapped module's "
              "forward (where FSDP2 has gathered the weight into a plain tensor) or pass "
              "weight.full_tensor(); for a manual TP shard pass weight.to_local() with "
              "tp_group and vocab_start.")

# what the group's validation says when the ranks of a DTensor vocabulary shard pass
# different hidden states
_REPLICATED_WHAT = (
    "hidden: a Shard(0) DTensor weight is taken as a vocabulary (tensor-parallel) shard over "
    "its mesh, whose ranks must all pass the same hidden states; these differ, as under "
    "FSDP2. " + _FSDP_HINT)


def _select_backend(backend: str, hidden: torch.Tensor):
    return _fn.pick_backend(backend, hidden)


# ---------------------------------------------------------------------------- call set-up
#
# The steps that linear_cross_entropy and the RL ops share: this rank's own argument checks
# (under TP with validation their error reaches every rank through _share_error), the
# layout of the vocabulary over the group, and the chunking and gradients of the plan.


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise InputError(f"{name} must be a bool, got {value!r}")


def _check_flags(*flags) -> None:
    for name, value in flags:
        _check_flag(name, value)


def _checked_inputs(hidden, weight, bias, accum_dtype, backend):
    """(hidden, weight, bias, dW accumulator dtype, backend) of a call once checked, the
    operands cast as F.linear casts them under torch.autocast."""
    for name, x in (("hidden", hidden), ("weight", weight)):
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    hidden, weight, bias = _autocast(hidden, weight, bias)
    _check_linear_inputs(hidden, weight, bias)
    accum = _check_accum_dtype(accum_dtype, weight.dtype)
    be = _select_backend(backend, hidden)  # (may refuse: before any collective)
    return hidden, weight, bias, accum, be


def _checked_target(target, hidden: torch.Tensor, ignore_index):
    check_target(target, hidden.shape[:-1], hidden.device)
    return widened(target, ignore_index)


def _checked_start(group, vocab_start):
    """``vocab_start`` as an int under TP; without a group it stays as given (the layout
    refuses any start but 0 there)."""
    if group is None:
        return vocab_start
    from .distributed import checked_vocab_start

    return checked_vocab_start(vocab_start)


def _check_tp_class_weight(group, class_weight) -> None:
    if group is None or class_weight is None:
        return
    # its length is checked against the global V once the layout gives it
    if not isinstance(class_weight, torch.Tensor) or class_weight.dim() != 1:
        raise ValueError("class_weight must be the whole [V] class-weight vector "
                         "(or this rank's [V_local] slice)")


def _unsharded_start(vocab_start) -> int:
    if vocab_start not in (None, 0):
        raise ValueError("vocab_start needs tp_group (a vocabulary shard needs its group)")
    return 0


def _tp_op(op: str, label_smoothing=0.0) -> int:
    """The operation code the ranks of a group must agree on: the entropy, or a cross-entropy
    (log-probs are one without smoothing), smoothed or not."""
    from . import distributed

    if op == "entropy":
        return distributed.OP_ENTROPY
    smoothed = isinstance(label_smoothing, (int, float)) and label_smoothing > 0
    return distributed.OP_CROSS_ENTROPY_SMOOTHED if smoothed else distributed.OP_CROSS_ENTROPY


def _share_error(group, op_code: int, ignore_index, err: BaseException) -> None:
    """Raise this rank's argument error on every rank of ``group``: the group's validation
    hands it to the others, so that no rank is left waiting in a collective."""
    from . import distributed

    distributed.check_tp(group, op=op_code, v_local=0, vocab_start=None, n_rows=0, target=None,
                         ignore_index=ignore_index, local_error=err)


def _fingerprint(*options) -> int:
    """The fingerprint of the options that the ranks of a group must agree on."""
    from . import distributed

    return distributed.options_fingerprint(*map(fingerprint_value, options))


def _ce_tp_layout(group, op_code: int, fp, *, hidden, v_local: int, target,
                  class_weight, vocab_start, ignore_index, check_hidden: bool):
    """(vocab_start, V, class weights) of a vocabulary-parallel cross-entropy: checked on
    every rank where the options' fingerprint ``fp`` is given (validation), else resolved
    from the group; class weights given as this rank's slice come back as the whole [V]
    vector."""
    from . import distributed

    # class weights: the whole [V] vector, or each rank's slice of its rows of the head
    w_sharded = distributed.weight_is_sharded(class_weight, v_local, group)
    if fp is not None:
        start, vocab_size = distributed.check_tp(
            group, op=op_code, v_local=v_local, vocab_start=vocab_start,
            n_rows=target.numel(), target=target, ignore_index=ignore_index,
            weight=class_weight, options=fp, device=hidden.device, weight_sharded=w_sharded,
            replicated=hidden if check_hidden else None, replicated_what=_REPLICATED_WHAT)
    else:
        start, vocab_size = distributed.resolve_layout(
            group, v_local, vocab_start,
            vocab_size=None if class_weight is None or w_sharded else int(class_weight.shape[0]))
    if w_sharded:
        class_weight = distributed.gather_weight(class_weight, group, start, vocab_size)
    return start, vocab_size, class_weight


def _rl_tp_layout(group, op_code: int, fp, *, hidden, v_local: int, target,
                  vocab_start, ignore_index, check_hidden: bool) -> int:
    """vocab_start of this rank's shard in an RL op under TP: checked on every rank where the
    options' fingerprint ``fp`` is given (validation), else resolved from the group (the
    global V is not needed)."""
    from . import distributed

    if fp is None:
        start, _ = distributed.resolve_layout(group, v_local, vocab_start,
                                              need_vocab_size=False)
        return start
    start, _ = distributed.check_tp(
        group, op=op_code, v_local=v_local, vocab_start=vocab_start,
        n_rows=math.prod(hidden.shape[:-1]), target=target, ignore_index=ignore_index,
        options=fp, device=hidden.device, replicated=hidden if check_hidden else None,
        replicated_what=_REPLICATED_WHAT)
    return start


def _as_rows(hidden: torch.Tensor) -> torch.Tensor:
    """hidden as [N, D] rows for the GEMMs: a view where its strides allow, else a copy."""
    D = hidden.shape[-1]
    h2 = hidden.reshape(-1, D)
    if h2.stride(-1) != 1 or (h2.shape[0] > 1 and h2.stride(0) != D):
        h2 = h2.contiguous()
    return h2


def _gemm_weight(weight: torch.Tensor) -> torch.Tensor:
    if weight.stride(-1) != 1 and weight.stride(0) != 1:
        weight = weight.contiguous()  # GEMMs take either row- or column-major heads as they are
    return weight


def _chunk_rows(chunk_size, n: int, v_local: int, hidden: torch.Tensor, group=None,
                vocab_size: int = 0) -> int:
    """Rows per chunk: ``chunk_size`` when given, else sized from this rank's shard, or with
    ``group`` from the mean shard of ``vocab_size`` columns."""
    if chunk_size != "auto":
        return int(chunk_size)
    if group is None:
        return auto_chunk_rows(n, v_local, hidden.dtype, hidden.device)
    # every rank must cut the same chunks (their statistics are exchanged chunk by
    # chunk): size them from the mean shard, the same number on every rank (exactly
    # V_local for even shards; a larger uneven shard goes over the budget by its excess)
    import torch.distributed as dist

    return auto_chunk_rows(n, -(-vocab_size // dist.get_world_size(group)), hidden.dtype,
                           hidden.device)


def _grad_needs(grad_on: bool, hidden, weight, bias) -> dict:
    """The plan's need_dh, need_dw and need_db: the inputs that take a gradient."""
    return {"need_dh": grad_on and hidden.requires_grad,
            "need_dw": grad_on and weight.requires_grad,
            "need_db": grad_on and bias is not None and bias.requires_grad}


# ---------------------------------------------------------------------------- public API


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    class_weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: Union[None, float, torch.Tensor] = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    chunk_size: Union[str, int] = "auto",
    tp_group=None,
    vocab_start: Optional[int] = None,
    reduce_hidden_grad: bool = True,
    accum_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
    return_aux: bool = False,
    inplace_backward: bool = False,
    differentiable_lse: bool = False,
) -> Union[torch.Tensor, CrossEntropyOutput]:
    """Cross-entropy of ``hidden @ weight.T + bias`` without materialising the logits.

    Computes exactly ``cross_entropy(hidden @ weight.T + bias, target, ...)`` (same options,
    class weights named ``class_weight``), holding at most one chunk of logits
    [chunk rows, V_local] at a time. For reduced losses with gradients the forward already
    computes the gradients of hidden, weight and bias (see the module docstring); for
    reduction="none" the backward recomputes the logits chunk by chunk.

    Args:
        hidden: [..., D] fp32/bf16/fp16 hidden states (any strides; copied if not viewable).
        weight: [V_local, D] the LM head (same dtype and device as hidden); with ``tp_group``
            this rank's rows [vocab_start, vocab_start + V_local) of the full head. A DTensor
            sharded on dim 0 over a 1-D mesh is taken as such a shard over its mesh's group
            (``tp_group`` None or that group); unless ``tp_group`` or a replicated DTensor
            ``hidden`` on the mesh says so, the validation checks that every rank passes the
            same hidden states (an FSDP2 shard, whose ranks do not, is refused).
        target: [...] (hidden's leading dims) int64/int32 global class ids.
        bias: optional [V_local] bias (this rank's slice under TP).
        class_weight: optional [V] class weights (the whole vocabulary); under TP that vector
            on every rank or each rank's slice [V_local] (its rows of the head).
        ignore_index, reduction, normalizer, label_smoothing, z_loss, softcap, logit_scale:
            as in :func:`fusedce.cross_entropy`.
        chunk_size: rows per chunk, or "auto": as many rows as fit
            :data:`DEFAULT_CHUNK_BYTES` of logits on CUDA (480 MiB),
            :data:`DEFAULT_CHUNK_BYTES_CPU` elsewhere (32 MiB); env FUSEDCE_LINEAR_CHUNK_BYTES.
        tp_group: process group over which the vocabulary (weight rows) is sharded.
        vocab_start: first global row of this rank's shard (default rank * V_local).
        reduce_hidden_grad: under TP, all-reduce hidden's gradient over ``tp_group`` (True);
            False leaves this rank's partial gradient (Megatron's column-parallel layer
            all-reduces it itself).
        accum_dtype: dtype of the weight-gradient accumulator across chunks: None (the
            weight's dtype: each chunk's GEMM adds into a bf16/fp16 dW) or torch.float32
            (one rounding at the end; costs a [V_local, D] fp32 buffer while the loss runs).
        backend: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" or "torch".
        return_aux: return CrossEntropyOutput(loss, lse, z_loss, accuracy).
        inplace_backward: accepted for symmetry with :func:`fusedce.cross_entropy`; the
            logits chunks are internal, so their gradient always overwrites them in place.
        differentiable_lse: with ``return_aux``, the lse carries gradient (d lse / dz_j = p_j)
            to hidden, weight and bias, for regularisers of your own: it is formed as z_c -
            log p_c for each row's target column c (column 0 on ignored rows) through
            :func:`linear_logprobs`, one more pass over the vocabulary each way.
    Returns:
        The loss, fp32: a scalar, or shaped like ``target`` for reduction="none"; with
        ``return_aux`` a CrossEntropyOutput (lse per row, shaped like target).
    """
    check_group(tp_group)
    u = _unpack_dtensors(hidden, weight, bias, tp_group, vocab_start)
    tp_group = u.group
    # under TP with validation, this rank's own argument errors reach every rank through
    # the group's validation (distributed.check_tp), as in cross_entropy: a bad argument on
    # one rank must not leave the others waiting in a collective
    validate_tp = tp_group is not None and syncing()
    err = None
    try:
        check_options(ignore_index=ignore_index, reduction=reduction,
                      normalizer=normalizer, label_smoothing=label_smoothing,
                      z_loss=z_loss, softcap=softcap, logit_scale=logit_scale,
                      backend=backend)
        _check_chunk_size(chunk_size)
        _check_flags(("return_aux", return_aux), ("inplace_backward", inplace_backward),
                     ("reduce_hidden_grad", reduce_hidden_grad),
                     ("differentiable_lse", differentiable_lse))
        hidden, weight, bias, accum, be = _checked_inputs(u.hidden, u.weight, u.bias,
                                                          accum_dtype, backend)
        target = _checked_target(target, hidden, ignore_index)
        vocab_start = _checked_start(tp_group, u.vocab_start)
        _check_tp_class_weight(tp_group, class_weight)
    except (TypeError, ValueError) as exc:
        if not validate_tp:
            raise
        err = exc
    if tp_group is None:
        start, vocab_size = _unsharded_start(vocab_start), weight.shape[0]
    else:
        op_code = _tp_op("cross_entropy", label_smoothing)
        if err is not None:
            _share_error(tp_group, op_code, ignore_index, err)
        fp = _fingerprint(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale,
                          normalizer, chunk_size, reduce_hidden_grad, return_aux,
                          differentiable_lse, be.name, hidden.dtype) if validate_tp else None
        start, vocab_size, class_weight = _ce_tp_layout(
            tp_group, op_code, fp, hidden=hidden, v_local=weight.shape[0], target=target,
            class_weight=class_weight, vocab_start=vocab_start, ignore_index=ignore_index,
            check_hidden=u.check_hidden)
    v_local = weight.shape[0]
    check_weight(class_weight, vocab_size, hidden.device, name="class_weight")
    if not validate_tp:  # (check_tp has checked the targets on every rank)
        check_target_range(target, vocab_size, ignore_index)

    opts = LossOptions(ignore_index=ignore_index, reduction=reduction,
                       label_smoothing=float(label_smoothing), z_loss=float(z_loss),
                       softcap=None if softcap is None else float(softcap),
                       logit_scale=float(logit_scale))
    h2 = _as_rows(hidden)
    t1 = target.reshape(-1)
    rows = _chunk_rows(chunk_size, h2.shape[0], v_local, hidden, tp_group, vocab_size)
    plan = LinearPlan(
        opts=opts, backend=be, vocab_size=vocab_size,
        chunk_rows=rows, vocab_start=start, group=tp_group, normalizer=normalizer,
        accum_dtype=accum, reduce_hidden_grad=bool(reduce_hidden_grad),
        need_aux=bool(return_aux), **_grad_needs(torch.is_grad_enabled(), hidden, weight, bias))
    weight = _gemm_weight(weight)
    loss, lse, zl, acc = LinearCrossEntropyFunction.apply(h2, weight, bias, t1, class_weight,
                                                          plan)
    if reduction == "none" and normalizer is None:
        loss = loss.view(target.shape)
        zl = zl.view(target.shape)
    if return_aux:
        if differentiable_lse:
            lse = _lse_with_grad(hidden, weight, bias, target, ignore_index=ignore_index,
                                 logit_scale=logit_scale, softcap=softcap, tp_group=tp_group,
                                 start=start, chunk_size=chunk_size, backend=backend)
        return CrossEntropyOutput(loss, lse.view(target.shape), zl, acc)
    return loss


def _lse_with_grad(hidden, weight, bias, target, *, ignore_index, logit_scale, softcap,
                   tp_group, start, chunk_size, backend) -> torch.Tensor:
    """lse per row with its gradient: z_c - log p_c for c the row's target (0 where ignored),
    z_c from one dot product per row, rounded to the hidden dtype as the logits GEMM rounds
    it (under TP its owner's value, summed over the group)."""
    valid = target != ignore_index
    col = torch.where(valid, target, torch.zeros_like(target)).long()
    lp = linear_logprobs(hidden, weight, col, bias=bias, logit_scale=logit_scale,
                         softcap=softcap, ignore_index=-1, tp_group=tp_group,
                         vocab_start=start if tp_group is not None else None,
                         chunk_size=chunk_size, backend=backend)
    local = col - start
    inside = (local >= 0) & (local < weight.shape[0])
    idx = local.clamp(0, max(weight.shape[0] - 1, 0))
    x = (hidden.float() * weight[idx].float()).sum(-1)
    if bias is not None:
        x = x + bias[idx].float()
    z = x.to(hidden.dtype).float() * float(logit_scale)
    if softcap is not None:
        z = torch.tanh(z / float(softcap)) * float(softcap)
    z = torch.where(inside, z, torch.zeros_like(z))
    if tp_group is not None:
        from torch.distributed.nn.functional import all_reduce

        z = all_reduce(z, group=tp_group)
    return z - lp


def _rl_call(op: str, hidden, weight, target, *, bias, logit_scale, softcap, ignore_index,
             return_entropy: bool, tp_group, vocab_start, inference_only, chunk_size,
             reduce_hidden_grad, accum_dtype, backend):
    """Validate, resolve the vocabulary layout and run :class:`LinearLogprobEntropyFunction`.

    ``op`` is "logprobs" (``target`` given; log-probs, with the entropy when
    ``return_entropy``) or "entropy" (``target`` None). Returns the [N] outputs and the
    leading shape of hidden.
    """
    check_group(tp_group)
    u = _unpack_dtensors(hidden, weight, bias, tp_group, vocab_start)
    tp_group = u.group
    # under TP with validation, this rank's argument errors reach every rank through the
    # group's validation, so that no rank is left waiting in a collective
    validate_tp = tp_group is not None and syncing()
    err = None
    try:
        check_options(ignore_index=ignore_index, reduction="none", normalizer=None,
                      label_smoothing=0.0, z_loss=0.0, softcap=softcap,
                      logit_scale=logit_scale, backend=backend)
        _check_flags(("return_entropy", return_entropy), ("inference_only", inference_only),
                     ("reduce_hidden_grad", reduce_hidden_grad))
        _check_chunk_size(chunk_size)
        hidden, weight, bias, accum, be = _checked_inputs(u.hidden, u.weight, u.bias,
                                                          accum_dtype, backend)
        if op == "logprobs":
            target = _checked_target(target, hidden, ignore_index)
        vocab_start = _checked_start(tp_group, u.vocab_start)
    except (TypeError, ValueError) as exc:
        if not validate_tp:
            raise
        err = exc
    if tp_group is None:
        start = _unsharded_start(vocab_start)
        if op == "logprobs":
            check_target_range(target, weight.shape[0], ignore_index)
    else:
        op_code = _tp_op(op)
        if err is not None:
            _share_error(tp_group, op_code, ignore_index, err)
        # every option that changes the collectives (the statistics exchanged, the
        # all-reduce of hidden's gradient) must agree on every rank
        fp = _fingerprint("linear_" + op, ignore_index, softcap, logit_scale, return_entropy,
                          inference_only, reduce_hidden_grad) if validate_tp else None
        start = _rl_tp_layout(tp_group, op_code, fp, hidden=hidden, v_local=weight.shape[0],
                              target=target, vocab_start=vocab_start,
                              ignore_index=ignore_index, check_hidden=u.check_hidden)

    opts = LossOptions(ignore_index=ignore_index, reduction="none",
                       softcap=None if softcap is None else float(softcap),
                       logit_scale=float(logit_scale))
    lead = hidden.shape[:-1]
    h2 = _as_rows(hidden)
    t1 = None if target is None else target.reshape(-1)
    # the statistics are exchanged once for all rows (not per chunk), so ranks may cut
    # different chunks: each sizes them from its own shard
    rows = _chunk_rows(chunk_size, h2.shape[0], weight.shape[0], hidden)
    plan = RLPlan(
        opts=opts, backend=be, chunk_rows=rows, want_lp=op == "logprobs",
        want_ent=op == "entropy" or return_entropy, vocab_start=start, group=tp_group,
        accum_dtype=accum, reduce_hidden_grad=reduce_hidden_grad,
        **_grad_needs(torch.is_grad_enabled() and not inference_only, hidden, weight, bias))
    weight = _gemm_weight(weight)
    out = _rl_apply(h2, weight, bias, t1, plan)
    return (out if isinstance(out, tuple) else (out,)), lead


def _rl_apply(h2, weight, bias, t1, plan: RLPlan):
    """The outputs of :class:`LinearLogprobEntropyFunction` for the plan: through autograd
    where an input needs a gradient, else its forward alone."""
    if plan.need_dh or plan.need_dw or plan.need_db:
        return LinearLogprobEntropyFunction.apply(h2, weight, bias, t1, plan)
    # nothing to differentiate: no graph, nothing kept (the forward keeps nothing on a
    # ctx whose plan needs no gradient)
    with torch.no_grad():
        return LinearLogprobEntropyFunction._forward(types.SimpleNamespace(), h2, weight, bias,
                                                     t1, plan)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    tp_group=None,
    vocab_start: Optional[int] = None,
    inference_only: bool = False,
    chunk_size: Union[str, int] = "auto",
    reduce_hidden_grad: bool = True,
    accum_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
) -> Union[torch.Tensor, tuple]:
    """log softmax(z)[target] per row (and the entropy of softmax(z)), without the logits.

    RL scoring and policy gradients from hidden states: with x = hidden @ weight.T + bias
    and z = softcap * tanh(logit_scale * x / softcap) (z = logit_scale * x without softcap),

        log p_t = (z_t - m) - log s,   H = log s - sum_j p_j (z_j - m),
        m = max_j z_j,  s = sum_j exp(z_j - m),

    both offset-invariant (rows whose logits are all ~1e6 give the right values). One chunk
    of logits [chunk rows, V_local] exists at a time and the forward computes it once (one
    GEMM per chunk, all statistics from it). The backward recomputes each chunk (its GEMM
    again) and forms dH = dX @ W, dW = dX^T @ H and db = 1^T dX, only those whose input
    needs a gradient; with a frozen head (no gradient of weight or bias), one output and
    no ``tp_group``, the forward writes hidden's gradient for a unit upstream gradient
    (two GEMMs per chunk in all) and the backward only scales its rows.

    Args:
        hidden: [..., D] fp32/bf16/fp16 hidden states (any strides; copied if not viewable).
        weight: [V_local, D] the LM head (same dtype and device as hidden); with ``tp_group``
            this rank's rows [vocab_start, vocab_start + V_local) of the full head. A DTensor
            sharded on dim 0 over a 1-D mesh is taken as such a shard over its mesh's group
            (as in :func:`linear_cross_entropy`).
        target: [...] (hidden's leading dims) int64/int32 global class ids.
        bias: optional [V_local] bias (this rank's slice under TP).
        logit_scale: z = logit_scale * x before the softcap; sampling temperature T is
            ``logit_scale=1 / T``.
        softcap: None, or z = softcap * tanh(logit_scale * x / softcap).
        ignore_index: rows whose target equals it give log-prob +0.0 and no gradient
            through the log-prob; their entropy is still that row's entropy (the entropy
            takes no target: mask it yourself where such rows must not count).
        return_entropy: also return the entropy of every row, computed from the same chunks
            of logits (no second pass); differentiable, exact gradient (not detached).
        tp_group: process group over which the vocabulary (weight rows) is sharded; ranks
            exchange a few floats per row (one all-gather per call), never logits.
        vocab_start: first global row of this rank's shard (default rank * V_local).
        inference_only: keep nothing for backward; the results have no graph.
        chunk_size: rows per chunk, or "auto": as many rows as fit
            :data:`DEFAULT_CHUNK_BYTES` of logits on CUDA, :data:`DEFAULT_CHUNK_BYTES_CPU`
            elsewhere (env FUSEDCE_LINEAR_CHUNK_BYTES).
        reduce_hidden_grad: under TP, all-reduce hidden's gradient over ``tp_group`` (True);
            False leaves this rank's partial gradient to the caller.
        accum_dtype: dW accumulator across chunks: None (the weight's dtype) or
            torch.float32 (see :func:`linear_cross_entropy`).
        backend: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" or "torch". Triton
            computes each chunk's statistics in one read and the gradient of one output in
            one read-write; the gradient of both outputs at once is PyTorch ops on the chunk.
    Returns:
        [...] fp32 log-probabilities shaped like ``target``; with ``return_entropy`` a tuple
        (log-probabilities, entropies), both [...] fp32, both differentiable w.r.t. hidden,
        weight and bias (when an upstream gradient reaches both, the backward sums both
        contributions in one recompute).
    """
    outs, lead = _rl_call("logprobs", hidden, weight, target, bias=bias,
                          logit_scale=logit_scale, softcap=softcap, ignore_index=ignore_index,
                          return_entropy=return_entropy, tp_group=tp_group,
                          vocab_start=vocab_start, inference_only=inference_only,
                          chunk_size=chunk_size, reduce_hidden_grad=reduce_hidden_grad,
                          accum_dtype=accum_dtype, backend=backend)
    if return_entropy:
        return outs[0].view(lead), outs[1].view(lead)
    return outs[0].view(lead)


def linear_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    tp_group=None,
    vocab_start: Optional[int] = None,
    inference_only: bool = False,
    chunk_size: Union[str, int] = "auto",
    reduce_hidden_grad: bool = True,
    accum_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Entropy of softmax(z) per row, without the logits, differentiable (not detached).

    With x = hidden @ weight.T + bias and z as in :func:`linear_logprobs`,
    H = log s - sum_j p_j (z_j - m) (m = max_j z_j, s = sum_j exp(z_j - m)): offset-invariant,
    so rows whose logits are all ~1e6 give the right entropy. dH/dz_j = -p_j ((z_j - m) -
    (log s - H)), chained through the softcap and logit_scale. Chunks, GEMMs and memory as in
    :func:`linear_logprobs`.

    Args:
        hidden: [..., D] fp32/bf16/fp16 hidden states.
        weight: [V_local, D] the LM head, or this rank's row shard with ``tp_group`` (a
            Shard(0) DTensor is taken as one, as in :func:`linear_cross_entropy`).
        bias: optional [V_local] bias (this rank's slice under TP).
        logit_scale: z = logit_scale * x before the softcap (temperature T: 1 / T).
        softcap: None, or z = softcap * tanh(logit_scale * x / softcap).
        tp_group: process group over which the vocabulary (weight rows) is sharded.
        vocab_start: accepted for symmetry (the entropy does not depend on the column
            order); checked to tile the vocabulary when given under validation.
        inference_only: keep nothing for backward; the result has no graph.
        chunk_size: rows per chunk, or "auto" (see :func:`linear_logprobs`).
        reduce_hidden_grad: under TP, all-reduce hidden's gradient over ``tp_group``.
        accum_dtype: dW accumulator across chunks: None (the weight's dtype) or
            torch.float32.
        backend: "auto", "triton" or "torch" (as in :func:`linear_logprobs`).
    Returns:
        [...] fp32 entropies (natural log), shaped like hidden's leading dimensions.
    """
    outs, lead = _rl_call("entropy", hidden, weight, None, bias=bias, logit_scale=logit_scale,
                          softcap=softcap, ignore_index=-100, return_entropy=True,
                          tp_group=tp_group, vocab_start=vocab_start,
                          inference_only=inference_only, chunk_size=chunk_size,
                          reduce_hidden_grad=reduce_hidden_grad, accum_dtype=accum_dtype,
                          backend=backend)
    return outs[0].view(lead)
