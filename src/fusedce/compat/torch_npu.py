"""Ascend's ``torch_npu.npu_cross_entropy_loss``, on the fusedce core, z-loss included.

For input x [N, C], target t [N], optional class weights w [C], label smoothing a,
ignore_index and z-loss scale zl, per row (rows whose target is ignore_index give 0):

    lse        = log sum_j exp(x_j)
    loss_row   = (1 - a) * w_t * (lse - x_t) + (a / C) * sum_j w_j * (lse - x_j)
    zloss_row  = zl * lse^2                    (NOT added into loss)
    log_prob   = x - lse                       [N, C]

``loss`` and ``zloss`` are reduced alike: "none" (per row, [N]), "sum", or "mean"
(divided by the number of counted rows, or by the sum of their target weights w_t when
weights are given; 0 when nothing is counted). The loss is exactly ``F.cross_entropy``.
``lse_for_zloss`` is lse per row [N]. All math is fp32 (:func:`fusedce.cross_entropy`);
results come back in the input's dtype, as on the NPU. Only ``loss`` and ``zloss`` carry
gradients: d loss_row / d x_j as ``F.cross_entropy``, d zloss_row / d x_j = 2 zl lse p_j.

Differences from torch_npu (the signature and outputs are the same):

* The z-loss is implemented (on the NPU ``lse_square_scale_for_zloss`` and
  ``return_zloss`` are declared but "not yet supported"): ``zloss`` is returned when
  ``return_zloss=True`` (else an empty tensor), ``lse_for_zloss`` when the scale is
  non-zero (else an empty tensor).
* No limit on N (the NPU allows 1..200000; N = 0 works here) and no restriction on
  changing options when the input requires grad; any [..., C] input with a [...] target is
  accepted (the NPU takes [N, C]); int32 targets work.
* A negative ``ignore_index`` ignores the rows whose target equals it (on the NPU targets
  must lie in [0, C), so it matches nothing: ours is the superset); any other target
  outside [0, C) raises ValueError.
* ``lse_square_scale_for_zloss`` may be any finite value >= 0 (the NPU: [0, 1)); weights
  may be any floating dtype and value.
* Cost: ``log_prob`` is written once (it is part of the result); a differentiable
  ``zloss`` (return_zloss=True, non-zero scale, input requiring grad) takes a second pass
  over the logits, as it has its own gradient.
* "mean"/"sum" results are shaped [1], as the NPU documents.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

import fusedce as _fce
from fusedce import spec as _spec

from ._common import check_choice

__all__ = ["npu_cross_entropy_loss"]

_REDUCTIONS = ("mean", "sum", "none")


def _log_softmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x - lse per row in ``x``'s dtype, one bounded fp32 chunk of rows at a time (torch's
    log_softmax of the chunk: it subtracts the row maximum first, so the differences stay
    exact where the logits are large and close, where x - lse would not: lse is rounded to
    their scale)."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel() == 0:
        return out
    C = x.shape[-1]
    x2 = x.reshape(-1, C)
    o2 = out.view(-1, C)
    step = _spec.default_chunk_rows(C)
    for r0 in range(0, x2.shape[0], step):
        o2[r0:r0 + step] = torch.log_softmax(x2[r0:r0 + step].float(), dim=-1)
    return out


def _mean_factor(target: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int,
                 num_classes: int) -> torch.Tensor:
    """1 / (the "mean" denominator of the loss), 0 when nothing is counted (0-d fp32)."""
    opts = _spec.LossOptions(ignore_index=ignore_index, reduction="mean")
    terms = _spec.row_terms(target.reshape(-1), opts, num_classes, weight)
    return _spec.row_scale(terms, opts, None)


def npu_cross_entropy_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    lse_square_scale_for_zloss: float = 0.0,
    return_zloss: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused log_softmax + nll_loss with an optional z-loss, NPU calling convention.

    Args:
        input: [N, C] float16/bfloat16/float32 logits (any [..., C], any strides).
        target: [N] int64 (or int32) class ids in [0, C), or ignore_index.
        weight: optional [C] class weights.
        reduction: "mean" (default), "sum" or "none".
        ignore_index: target value whose rows are left out. Defaults to -100.
        label_smoothing: a in [0, 1].
        lse_square_scale_for_zloss: zl >= 0, the z-loss coefficient.
        return_zloss: return the reduced z-loss (else an empty tensor).
    Returns:
        (loss, log_prob, zloss, lse_for_zloss), all in the input's dtype:
        loss: [N] for "none", else [1]; differentiable.
        log_prob: [N, C] log-softmax of the input; no gradient.
        zloss: shaped like loss when ``return_zloss`` (differentiable), else empty.
        lse_for_zloss: [N] lse per row when the z-loss scale is non-zero, else empty.
    """
    check_choice(reduction, _REDUCTIONS, "reduction")
    if isinstance(lse_square_scale_for_zloss, bool) or not isinstance(
            lse_square_scale_for_zloss, (int, float)) or not (
            0.0 <= lse_square_scale_for_zloss < float("inf")):
        raise ValueError(f"lse_square_scale_for_zloss must be a finite number >= 0, got "
                         f"{lse_square_scale_for_zloss!r}")
    zl = float(lse_square_scale_for_zloss)
    out = _fce.cross_entropy(input, target, weight=weight, ignore_index=ignore_index,
                             reduction=reduction, label_smoothing=label_smoothing,
                             return_aux=True)
    dtype = input.dtype
    reduced = reduction != "none"
    loss = out.loss.reshape(1) if reduced else out.loss
    lse = out.lse.detach()
    log_prob = _log_softmax_rows(input.detach())

    empty = input.new_empty(0)
    zloss = empty
    if return_zloss:
        zloss = _zloss(input, target, weight, reduction, ignore_index, zl, lse)
        zloss = zloss.reshape(1) if reduced else zloss
        zloss = zloss.to(dtype)
    lse_for_zloss = lse.reshape(-1).to(dtype) if zl != 0.0 else empty
    return loss.to(dtype), log_prob, zloss, lse_for_zloss


def _zloss(x: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
           reduction: str, ignore_index: int, zl: float, lse: torch.Tensor) -> torch.Tensor:
    """zl * lse^2 per counted row, reduced like the loss (fp32)."""
    valid = target != ignore_index
    if zl == 0.0:
        rows = torch.zeros(target.shape, dtype=torch.float32, device=x.device)
        return rows if reduction == "none" else rows.sum()
    num_classes = x.shape[-1]
    factor = None
    if reduction == "mean":
        factor = _mean_factor(target, weight, ignore_index, num_classes)
    if torch.is_grad_enabled() and x.requires_grad:
        # all-zero class weights leave only the z-loss term of the core's row loss, so the
        # core computes zl * lse^2 and its gradient 2 * zl * lse * p in one pass
        none_w = torch.zeros(num_classes, dtype=torch.float32, device=x.device)
        rows_or_sum = _fce.cross_entropy(x, target, weight=none_w, ignore_index=ignore_index,
                                         reduction="none" if reduction == "none" else "sum",
                                         z_loss=zl)
    else:
        rows = torch.where(valid, zl * lse * lse, torch.zeros_like(lse))
        rows_or_sum = rows if reduction == "none" else rows.sum()
    return rows_or_sum * factor if factor is not None else rows_or_sum
