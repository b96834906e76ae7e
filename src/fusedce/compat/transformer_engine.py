"""TransformerEngine's parallel cross entropy, on the fusedce core.

Drop-in for ``transformer_engine.pytorch.cross_entropy`` (``parallel_cross_entropy``,
``CrossEntropyFunction``) and ``transformer_engine.pytorch.triton.cross_entropy``
(``cross_entropy_forward``, ``cross_entropy_backward``). For logits x of shape (B, SQ, V)
or (SQ, B, V) (any [..., V] works), targets t and label smoothing a, per row

    loss = (1 - a) * (lse - x_t) + (a / V) * sum_j (lse - x_j),   lse = log sum_j exp(x_j)

computed in fp32 (0 on rows whose target is ``ignore_idx``); ``reduce_loss=True`` gives the
mean over non-ignored rows, otherwise the fp32 per-row losses shaped like the target
(TE itself returns (B, SQ) whatever the target's shape). The gradient,
dx_j = g * ((1 - a) * (p_j - [j = t]) + a * (p_j - 1 / V)) with p = softmax(x), comes back
in the logits' dtype. With ``dist_process_group`` each rank holds a vocabulary shard
(rank r: columns [r * V_local, (r + 1) * V_local)) and targets are global ids; ranks
exchange per-row statistics only. Everything is computed by :func:`fusedce.cross_entropy`.

Differences from TransformerEngine (the signatures and results are the same):

* The autograd forms never write into the caller's logits (TE overwrites them with the
  gradient in the forward). ``cross_entropy_forward`` keeps its documented contract: the
  ``_input`` buffer returns holding the gradient for an upstream gradient of 1.
* No host synchronisation in the computation: TE counts the non-ignored tokens with
  ``.item()`` and checks ``grad_output == 1`` with ``torch.equal``; here both stay on the
  device, so ``is_cg_capturable`` is accepted and has nothing left to switch off. (The
  core's input validation, on by default, syncs once to check the target range;
  ``fusedce.set_validation(False)`` removes it, e.g. for CUDA-graph capture.)
* A per-row ``grad_output`` (``reduce_loss=False``) scales each row by its own value (TE's
  element-mul kernel reads only the first element).
* All ranks ignored under ``reduce_loss=True`` gives loss 0 and gradient 0, not NaN.
* Targets outside [0, V) that are not ``ignore_idx`` raise ValueError (TE gives an
  infinite loss); ``fusedce.set_validation(False)`` skips that device-syncing check.
* Any [..., V] logits and any strides (TE copies inputs whose last dim is strided); a flat
  target with one id per row is accepted, as in TE.
* Label smoothing spreads a / V over the global V also under vocabulary parallelism.
* Uneven vocabulary shards: a keyword-only ``vocab_start`` (this rank's first column;
  TE: always rank * V_local) is accepted by every entry point here (the 8th argument of
  ``CrossEntropyFunction.apply``); DTensor logits sharded on the vocabulary also work.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

import fusedce as _fce
from ._common import inner_backward, inner_forward, target_like, traced_grad

__all__ = [
    "parallel_cross_entropy",
    "CrossEntropyFunction",
    "cross_entropy_forward",
    "cross_entropy_backward",
]


def _core_loss(x: torch.Tensor, target: torch.Tensor, label_smoothing: float, reduce_loss: bool,
               dist_process_group, ignore_idx: int, inplace: bool = False,
               vocab_start: Optional[int] = None) -> torch.Tensor:
    loss = _fce.cross_entropy(x, target_like(target, x), ignore_index=ignore_idx,
                              reduction="mean" if reduce_loss else "none",
                              label_smoothing=label_smoothing, tp_group=dist_process_group,
                              vocab_start=vocab_start, inplace_backward=inplace)
    # reduce_loss=False: one loss per target, shaped like the target (a flat [B * SQ]
    # target gives a flat loss)
    return loss if reduce_loss else loss.reshape(target.shape)


def parallel_cross_entropy(
    inp: Optional[torch.Tensor] = None,
    target: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    reduce_loss: bool = False,
    dist_process_group=None,
    ignore_idx: int = -100,
    is_cg_capturable: bool = False,
    *,
    _input: Optional[torch.Tensor] = None,
    vocab_start: Optional[int] = None,
) -> torch.Tensor:
    """Cross entropy over (possibly vocabulary-parallel) logits, TE's calling convention.

    Same positional order as ``CrossEntropyFunction.apply`` (which older TE releases export
    under this name); ``_input=`` is accepted as the deprecated keyword spelling of ``inp``.

    Args:
        inp: logits (B, SQ, V_local) or (SQ, B, V_local), bf16/fp16/fp32, any strides.
        target: (B, SQ) or (SQ, B) int64/int32 global class ids (or flat, one per row).
        label_smoothing: a in [0, 1].
        reduce_loss: True: mean over non-ignored rows (a scalar); False: per-row losses.
        dist_process_group: the group the vocabulary is split over (None: one device).
        ignore_idx: target value whose rows give 0 loss and 0 gradient.
        is_cg_capturable: accepted; this path never synchronises with the host.
        vocab_start: keyword-only extension: this rank's first global column, for uneven
            shards (default, as TE: rank * V_local).
    Returns:
        fp32 loss: a scalar, or shaped like ``target``.
    """
    if inp is None:
        inp = _input
    elif _input is not None:
        raise TypeError("pass the logits either as inp or as _input, not both")
    if inp is None or target is None:
        raise TypeError("parallel_cross_entropy needs the logits (inp) and the target")
    return _core_loss(inp, target, label_smoothing, bool(reduce_loss), dist_process_group,
                      ignore_idx, vocab_start=vocab_start)


class CrossEntropyFunction(torch.autograd.Function):
    """TE's autograd Function: ``CrossEntropyFunction.apply(_input, target, label_smoothing,
    reduce_loss, dist_process_group, ignore_idx, is_cg_capturable)`` -> fp32 loss.

    The loss and gradient are those of :func:`fusedce.cross_entropy` (see the module
    docstring); the caller's logits are left untouched.
    """

    @staticmethod
    def forward(ctx, _input: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0,
                reduce_loss: bool = False, dist_process_group=None, ignore_idx: int = -100,
                is_cg_capturable: bool = False, vocab_start: Optional[int] = None
                ) -> torch.Tensor:
        """Args as :func:`parallel_cross_entropy`. Returns the fp32 loss."""
        ctx.fce_traced = bool(ctx.needs_input_grad[0]) and torch.compiler.is_compiling()
        if ctx.fce_traced:
            return _traced_forward(ctx, _input, target, float(label_smoothing),
                                   bool(reduce_loss), dist_process_group, ignore_idx,
                                   vocab_start)
        return inner_forward(
            ctx, _input, ctx.needs_input_grad[0],
            lambda x: _core_loss(x, target, label_smoothing, bool(reduce_loss),
                                 dist_process_group, ignore_idx, vocab_start=vocab_start))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        """Gradient w.r.t. ``_input`` (its dtype); None for the other arguments."""
        if getattr(ctx, "fce_traced", False):
            return _traced_backward(ctx, grad_output), None, None, None, None, None, None, None
        dx = inner_backward(ctx, grad_output, "CrossEntropyFunction")
        return dx, None, None, None, None, None, None, None


def _traced_forward(ctx, x, target, a, reduce_loss, group, ignore_idx, vocab_start):
    """CrossEntropyFunction's forward while torch.compile traces it: Dynamo cannot trace the
    autograd.grad of the private graph that the eager form keeps, so the core's per-row
    losses and lse are kept instead and :func:`_traced_backward` writes the spec's gradient
    from them."""
    from .. import distributed

    t = target_like(target, x)
    with torch.no_grad():
        out = _fce.cross_entropy(x, t, ignore_index=ignore_idx, reduction="none",
                                 label_smoothing=a, tp_group=group, vocab_start=vocab_start,
                                 return_aux=True)
    if group is None:
        start, vocab = 0, x.shape[-1]
    else:
        start, vocab = distributed.resolve_layout(group, x.shape[-1], vocab_start)
    valid = t != ignore_idx
    count = valid.sum()
    ctx.fce_args = (a, reduce_loss, start, vocab)
    ctx.save_for_backward(x, t, out.lse, valid, count)
    if reduce_loss:
        return torch.where(count > 0, out.loss.sum() / count.clamp_min(1), 0.0)
    return out.loss.reshape(target.shape)


def _traced_backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
    """g (p_j - (1 - a) [j = t] - a / V) on this rank's columns (the spec's gradient without
    class weights or z-loss), p_j = exp(z_j - lse); 0 on ignored rows."""
    a, reduce_loss, start, vocab = ctx.fce_args
    x, t, lse, valid, count = ctx.saved_tensors
    g = grad_output.float()
    if reduce_loss:
        g = torch.where(count > 0, g / count.clamp_min(1), 0.0).expand(t.shape)
    else:
        g = g.reshape(t.shape)
    return traced_grad(x, t, lse, torch.where(valid, g, 0.0), start, a, vocab, valid)


def cross_entropy_forward(
    _input: torch.Tensor,
    target: torch.Tensor,
    label_smoothing: float = 0.0,
    reduce_loss: bool = False,
    dist_process_group=None,
    ignore_idx: int = -100,
    *,
    vocab_start: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Low-level forward: the loss, and ``_input`` overwritten with d loss / d _input.

    The gradient written is the one for an upstream gradient of 1 (of the mean when
    ``reduce_loss``, of every row otherwise), in ``_input``'s dtype; ignored rows get 0.
    Finish it with :func:`cross_entropy_backward`. ``_input``'s previous contents are gone.

    Args:
        _input: logits (B, SQ, V_local), any strides; overwritten in place.
        target, label_smoothing, reduce_loss, dist_process_group, ignore_idx, vocab_start:
            as :func:`parallel_cross_entropy`.
    Returns:
        (loss, _input): fp32 loss (a scalar or shaped like target), and the very
        tensor passed in, now holding the gradient.
    """
    x = _input.detach()
    alias = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = _core_loss(alias, target, label_smoothing, bool(reduce_loss), dist_process_group,
                          ignore_idx, inplace=True, vocab_start=vocab_start)
        if loss.requires_grad:
            (dx,) = torch.autograd.grad(loss, alias, torch.ones_like(loss))
        else:  # pragma: no cover - the core always attaches a graph here
            dx = torch.zeros_like(x)
    if dx.data_ptr() != x.data_ptr() or dx.stride() != x.stride():
        # a backend that could not write in place: the documented contract still holds
        with torch.no_grad():
            x.copy_(dx)
    return loss.detach(), _input


def cross_entropy_backward(_input: torch.Tensor, grad_output: torch.Tensor,
                           is_cg_capturable: bool = False) -> torch.Tensor:
    """Scale the gradient left in ``_input`` by ``cross_entropy_forward`` by ``grad_output``.

    Args:
        _input: the buffer returned by :func:`cross_entropy_forward`; scaled in place.
        grad_output: the upstream gradient: one value (reduced loss) or one per row.
        is_cg_capturable: accepted; the multiply never synchronises with the host.
    Returns:
        ``_input``, holding the final gradient.
    """
    g = grad_output.detach()
    rows = _input.numel() // max(1, _input.shape[-1]) if _input.dim() else 1
    if g.numel() == 1:
        # a dimensioned fp32 factor keeps the multiply in fp32 for low-precision buffers
        g = g.reshape([1] * _input.dim())
    elif g.numel() == rows:
        g = g.reshape(tuple(_input.shape[:-1]) + (1,))
    else:
        raise ValueError(f"grad_output has {g.numel()} elements; expected 1 or one per row "
                         f"({rows})")
    with torch.no_grad():
        _input.mul_(g.to(device=_input.device, dtype=torch.float32))
    return _input
