"""The one loss spec: options, per-row statistics, their associative combine, and the
row loss / gradient coefficients that every backend shares.

For one row with logits x in R^V (possibly split over vocabulary pieces), target t:

    z_j  = softcap * tanh(logit_scale * x_j / softcap)      (softcap=None: z_j = logit_scale * x_j)
    lse  = log sum_j exp(z_j)
    loss = (1 - a) * w_t * (lse - z_t) + (a / V) * sum_j w_j * (lse - z_j) + zl * lse^2

A vocabulary piece reduces to the statistics

    m   = max_j z_j                  s  = sum_j exp(z_j - m)
    zt  = z_t if t lies in the piece else 0
    sz  = sum_j w_j * z_j            (w_j = 1 without class weights)
    am  = global index of the first argmax (for accuracy)
    sez = sum_j exp(z_j - m) * (z_j - m)   (entropy only: H = log s - sez / s)

and two pieces combine associatively:

    m = max(m1, m2);  f_k = exp(m_k - m);  s = f_1 s1 + f_2 s2;  zt = zt1 + zt2;
    sz = sz1 + sz2;   am = am2 if m2 > m1 else am1   (pieces in vocabulary order);
    sez = f_1 (sez1 + s1 (m1 - m)) + f_2 (sez2 + s2 (m2 - m))

Blocks in a Triton kernel, chunks in PyTorch and ranks of a process group all use this
combine. From the combined statistics, with W = sum_j w_j:

    lse  = m + log s
    loss = (1 - a) * w_t * ((m - zt) + log s) + (a / V) * (W * lse - sz) + zl * lse^2

The negative log-likelihood is formed as (m - zt) + log s, never (m + log s) - zt: the
difference m - zt is exact where the logits are large and close (a row of equal logits
1e8 gives log V, not 0), so every output is invariant to a common offset of a row's logits
beyond the rounding of the differences. For the same reason the gradient uses the shifted
exponentials and s, never exp(z_j - lse):

    dz_j = g * (p_j * c_p - c_t * [j = t] - (a / V) * w_j),   p_j = exp(z_j - m) / s,
    c_p  = (1 - a) * w_t + (a / V) * W + 2 * zl * lse,         c_t = (1 - a) * w_t,

chained through the softcap and scale: dx_j = dz_j * logit_scale * (1 - (z_j / softcap)^2)
(without softcap: dx_j = dz_j * logit_scale). Ignored rows have g = 0.

Log-probabilities are -((m - z_t) + log s) (the a = zl = 0, unweighted case, with g negated).
Entropy is H = log s - sum_j p_j (z_j - m) = log s - sez / s, with
dH/dz_j = -p_j * ((z_j - m) - (log s - H)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

REDUCTIONS = ("none", "sum", "mean")
BACKENDS = ("auto", "torch", "triton")


class InputError(TypeError, ValueError):
    """A bad argument: the wrong type or dtype of a tensor or option. Both a TypeError and
    a ValueError, so that either ``except`` clause catches it (the spec says bad targets
    raise ValueError; Python raises TypeError for a wrong type)."""


@dataclass(frozen=True)
class LossOptions:
    """Loss options shared by every path (validated by the public functions)."""

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: Optional[float] = None
    logit_scale: float = 1.0


class RowStats(NamedTuple):
    """Per-row statistics of one vocabulary piece; every field is [N] (am int64, rest fp32)."""

    m: torch.Tensor
    s: torch.Tensor
    zt: torch.Tensor
    sz: torch.Tensor
    am: torch.Tensor
    sez: Optional[torch.Tensor] = None  # sum_j exp(z_j - m) * (z_j - m), only for entropy


class CrossEntropyOutput(NamedTuple):
    """Result of ``cross_entropy(..., return_aux=True)``.

    loss: the reduced loss (fp32; shaped like target for reduction="none").
    lse: per-row log-sum-exp, fp32, shaped like target (ignored rows included).
    z_loss: the z-loss part of ``loss``, reduced like it.
    accuracy: fraction of non-ignored rows whose argmax equals the target (0 if none).
    """

    loss: torch.Tensor
    lse: torch.Tensor
    z_loss: torch.Tensor
    accuracy: torch.Tensor


def combine(a: RowStats, b: RowStats) -> RowStats:
    """Combine the statistics of two vocabulary pieces (``a`` before ``b`` in vocab order)."""
    m = torch.maximum(a.m, b.m)
    s = _rescale(a.s, a.m, m) + _rescale(b.s, b.m, m)
    am = torch.where(b.m > a.m, b.am, a.am)
    sez = None
    if a.sez is not None:
        sez = _rescale_sez(a.sez, a.s, a.m, m) + _rescale_sez(b.sez, b.s, b.m, m)
    return RowStats(m, s, a.zt + b.zt, a.sz + b.sz, am, sez)


def combine_stacked(m: torch.Tensor, s: torch.Tensor, zt: torch.Tensor, sz: torch.Tensor,
                    am: torch.Tensor, sez: Optional[torch.Tensor] = None) -> RowStats:
    """Combine K pieces given as [K, N] stacks (in any order of the vocabulary).

    The same combine as :func:`combine`, folded over K at once (the all-gathered statistics
    of the ranks of a process group, whose shards may lie in any rank order). The argmax is
    the smallest global id among the pieces that hold the maximum (piece 0's on NaN rows),
    which is :func:`combine`'s left fold when the pieces are in vocabulary order.
    """
    mmax = m.max(dim=0).values
    s_tot = _rescale(s, m, mmax.unsqueeze(0)).sum(dim=0)
    big = torch.iinfo(am.dtype).max
    cand = torch.where(m == mmax.unsqueeze(0), am, torch.full_like(am, big)).amin(dim=0)
    am_tot = torch.where(cand == big, am[0], cand)
    sez_tot = None if sez is None else _rescale_sez(sez, s, m, mmax.unsqueeze(0)).sum(dim=0)
    return RowStats(mmax, s_tot, zt.sum(dim=0), sz.sum(dim=0), am_tot, sez_tot)


def _rescale(s: torch.Tensor, m_piece: torch.Tensor, m_all: torch.Tensor) -> torch.Tensor:
    # exp(-inf - -inf) is NaN; an empty or all -inf piece contributes 0
    factor = torch.exp(m_piece - m_all)
    return torch.where(m_piece == float("-inf"), torch.zeros_like(s), s * factor)


def _rescale_sez(sez: torch.Tensor, s: torch.Tensor, m_piece: torch.Tensor,
                 m_all: torch.Tensor) -> torch.Tensor:
    # sum exp(z - M) (z - M) = exp(m - M) (sez + s (m - M)); an all -inf piece, or one so far
    # below M that exp(m - M) = 0 (where s (m - M) may overflow), adds 0
    live = m_piece != float("-inf")
    d = torch.where(live, m_piece - m_all, torch.zeros_like(m_piece))
    f = torch.exp(d)
    return torch.where(live & (f > 0), (sez + s * d) * f, torch.zeros_like(sez))


def lse_of(stats: RowStats) -> torch.Tensor:
    """lse = m + log s, fp32 [N]."""
    return stats.m + torch.log(stats.s)


def entropy_of(stats: RowStats) -> torch.Tensor:
    """H = log s - sez / s (offset-invariant), fp32 [N]."""
    return torch.log(stats.s) - stats.sez / stats.s


def transform(x: torch.Tensor, opts: LossOptions) -> torch.Tensor:
    """z = softcap * tanh(scale * x / softcap) (or scale * x), computed in fp32."""
    z = x.float()
    if opts.softcap is not None:
        return torch.tanh(z * (opts.logit_scale / opts.softcap)) * opts.softcap
    if opts.logit_scale != 1.0:
        return z * opts.logit_scale
    return z


def chain_factor(z: torch.Tensor, opts: LossOptions) -> Optional[torch.Tensor | float]:
    """dz/dx given z (None when it is exactly 1)."""
    if opts.softcap is not None:
        return (1.0 - (z / opts.softcap) ** 2) * opts.logit_scale
    if opts.logit_scale != 1.0:
        return opts.logit_scale
    return None


@dataclass
class RowTerms:
    """Per-row quantities that depend only on targets/weights (no logits); all [N] fp32."""

    valid: torch.Tensor  # bool, target != ignore_index
    w_t: torch.Tensor  # class weight of the target (1 without weights), 0 on ignored rows
    denom: torch.Tensor  # 0-d: the "mean" denominator (count or sum of w_t), before clamping
    total_weight: float | torch.Tensor  # W = sum_j w_j

    def rows(self, r0: int, r1: int) -> "RowTerms":
        """The terms of rows [r0, r1) (the totals stay those of all rows)."""
        return RowTerms(self.valid[r0:r1], self.w_t[r0:r1], self.denom, self.total_weight)


def row_terms(target: torch.Tensor, opts: LossOptions, vocab_size: int,
              weight: Optional[torch.Tensor]) -> RowTerms:
    """Target-only row quantities. ``target`` holds global ids, any int dtype, shape [N]."""
    valid = target != opts.ignore_index
    if weight is None:
        w_t = valid.float()
        total = float(vocab_size)
    else:
        safe_t = torch.where(valid, target, torch.zeros_like(target)).long()
        w_t = weight.float().gather(0, safe_t) * valid
        total = weight.float().sum()
    denom = w_t.sum()
    return RowTerms(valid, w_t, denom, total)


def row_loss(stats: RowStats, terms: RowTerms, opts: LossOptions, vocab_size: int):
    """Per-row (loss, lse, zloss_part) in fp32 from combined statistics; ignored rows give 0
    (zloss_part is None without z-loss).

    Written with as few device ops as the options allow: this runs on every call, and at
    small V its launches cost as much as the kernel.
    """
    log_s = torch.log(stats.s)
    lse = stats.m + log_s
    a = opts.label_smoothing
    weighted = isinstance(terms.total_weight, torch.Tensor)
    # lse - z_t formed offset-invariantly as (m - z_t) + log s
    loss = (stats.m - stats.zt) + log_s
    if weighted:
        loss = loss * (terms.w_t * (1.0 - a) if a > 0.0 else terms.w_t)
    elif a > 0.0:
        loss = loss * (1.0 - a)
    if a > 0.0:
        loss = loss + (a / vocab_size) * (terms.total_weight * lse - stats.sz)
    if opts.z_loss > 0.0:
        zpart = torch.where(terms.valid, opts.z_loss * lse * lse, 0.0)
        loss = loss + zpart
    else:
        zpart = None
    # where, not multiply: a NaN logit on an ignored row must not leak, and the
    # NaN of a valid row must stay
    loss = torch.where(terms.valid, loss, 0.0)
    return loss, lse, zpart


def grad_coefficients(lse: torch.Tensor, terms: RowTerms, opts: LossOptions, vocab_size: int):
    """(c_p, c_t) of the gradient formula in the module docstring, each [N] fp32."""
    a = opts.label_smoothing
    if a == 0.0:
        # (the same tensors: no op per call for the plain loss)
        c_t = c_p = terms.w_t
    else:
        c_t = (1.0 - a) * terms.w_t
        c_p = c_t + (a / vocab_size) * terms.total_weight
    if opts.z_loss > 0.0:
        c_p = c_p + 2.0 * opts.z_loss * lse
    return c_p, c_t


def row_scale(terms: RowTerms, opts: LossOptions, normalizer) -> torch.Tensor:
    """0-d fp32 factor that turns the sum of row losses into the reduced loss.

    "sum" and "none": 1; "mean": 1 / denominator, as F.cross_entropy divides (negative
    weight sums included), except 0 for a zero denominator, so that an all-ignored batch (or
    one whose target weights are all 0) gives loss 0 and gradient 0, never NaN; a
    normalizer: 1 / normalizer.
    """
    device = terms.w_t.device
    if normalizer is not None:
        if isinstance(normalizer, torch.Tensor):
            return 1.0 / normalizer.to(device=device, dtype=torch.float32).reshape(())
        # a fill, not torch.tensor(...): no host-to-device copy (CUDA-graph capturable)
        return torch.full((), 1.0 / float(normalizer), device=device, dtype=torch.float32)
    if opts.reduction == "mean":
        d = terms.denom
        return torch.where(d != 0, d.reciprocal(), 0.0)
    return torch.ones((), device=device, dtype=torch.float32)


def accuracy(am: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Fraction of non-ignored rows whose argmax ``am`` equals ``target`` (0 when none), 0-d."""
    nvalid = valid.sum()
    hits = ((am == target.long()) & valid).sum()
    return torch.where(nvalid > 0, hits.float() / nvalid.clamp_min(1).float(), 0.0)


def default_chunk_rows(vocab_size: int, budget_bytes: int = 32 << 20) -> int:
    """Rows per chunk so that one fp32 chunk of logits stays under ``budget_bytes``."""
    return max(1, min(1 << 16, budget_bytes // max(1, 4 * vocab_size)))
