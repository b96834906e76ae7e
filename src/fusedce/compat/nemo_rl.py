"""NeMo RL's vocabulary-parallel log-probabilities, on the fusedce core.

Drop-in for ``nemo_rl.distributed.model_utils`` (``DistributedLogprob``,
``from_parallel_logits_to_logprobs``, ``_compute_distributed_log_softmax``). Each rank
holds the columns [vocab_start_index, vocab_end_index) of logits x [B, S, V_local]; with
lse = log sum_j exp(x_j) over the whole vocabulary (ranks exchange per-row statistics, a
few floats per token, never logits):

    DistributedLogprob:                out[b, s] = x[b, s, t[b, s]] - lse[b, s]       [B, S]
    from_parallel_logits_to_logprobs:  out[b, s] = x[b, s, t[b, s+1]] - lse[b, s]     [B, S-1]
    _compute_distributed_log_softmax:  out[b, s, j] = x[b, s, j] - lse[b, s]          local shard

all fp32, computed by :func:`fusedce.logprobs` / :func:`fusedce.cross_entropy`. The
gradient of a log-probability is d out / d x_j = [j = t] - p_j, in the logits' dtype.

Differences from NeMo RL (the signatures and results are the same):

* Memory: the original keeps the fp32 softmax of the whole shard (B * S * V_local * 4
  bytes) for backward; here only per-row statistics (or, on the Triton backend, the
  gradient itself) are kept, and no fp32 copy of the logits is made.
* ``group=None`` means what torch.distributed means by it: the default (world) group once
  the default process group is initialised with more than one rank, as in the original;
  otherwise one device holding the whole vocabulary.
* Shards may be uneven; ``vocab_end_index - vocab_start_index`` must equal V_local
  (checked), and the shards must tile [0, V) across the group (checked once per layout).
* A target of -100 gives log-probability 0 and no gradient (as in the original, where it
  matches no shard); any other target outside [0, V) raises ValueError instead of silently
  giving 0 (``fusedce.set_validation(False)`` skips that device-syncing check).
* ``from_parallel_logits_to_logprobs`` does not compute the discarded last position (the
  original rolls the target and drops that column afterwards).
* ``_compute_distributed_log_softmax`` always returns fp32 and, as the original, carries no
  gradient.
* Calling backward through ``DistributedLogprob`` run with ``inference_only=True`` raises a
  clear RuntimeError (the original fails unpacking its empty saved tensors).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

import fusedce as _fce

from ..spec import InputError
from ._common import inner_backward, inner_forward, traced_grad

__all__ = [
    "DistributedLogprob",
    "from_parallel_logits_to_logprobs",
    "_compute_distributed_log_softmax",
]

# no vocabulary shard holds this id, so it marks the dropped last position
_NO_TARGET = -100


def _shard_start(vocab_parallel_logits: torch.Tensor, vocab_start_index: int,
                 vocab_end_index: int, group) -> Optional[int]:
    """The core's ``vocab_start`` for this shard (None without a group), after checks."""
    for name, v in (("vocab_start_index", vocab_start_index),
                    ("vocab_end_index", vocab_end_index)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise InputError(f"{name} must be an int, got {v!r}")
    v_local = vocab_parallel_logits.shape[-1]
    if vocab_end_index - vocab_start_index != v_local:
        raise ValueError(f"vocab_end_index - vocab_start_index = {vocab_end_index} - "
                         f"{vocab_start_index} does not match the logits' last dim "
                         f"({v_local})")
    if group is None:
        if vocab_start_index != 0:
            raise ValueError("without a group the logits hold the whole vocabulary, so "
                             f"vocab_start_index must be 0, got {vocab_start_index}")
        return None
    return vocab_start_index


def _group(group):
    """``group``, or for None the default group where torch.distributed runs more than one
    rank (the original's all-reduces take None as the world group); else None (one device)."""
    if group is not None:
        return group
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def _logprobs(x: torch.Tensor, target: torch.Tensor, vocab_start_index: int,
              vocab_end_index: int, group, inference_only: bool) -> torch.Tensor:
    group = _group(group)
    start = _shard_start(x, vocab_start_index, vocab_end_index, group)
    return _fce.logprobs(x, target, ignore_index=_NO_TARGET, tp_group=group, vocab_start=start,
                         inference_only=inference_only)


class DistributedLogprob(torch.autograd.Function):
    """log p(target) over vocabulary-parallel logits: ``apply(vocab_parallel_logits, target,
    vocab_start_index, vocab_end_index, group, inference_only=False)`` -> [B, S] fp32.

    The targets are taken as given (not shifted). ``inference_only=True`` keeps nothing
    for backward.
    """

    @staticmethod
    def forward(ctx: Any, vocab_parallel_logits: torch.Tensor, target: torch.Tensor,
                vocab_start_index: int, vocab_end_index: int,
                group: Optional[torch.distributed.ProcessGroup],
                inference_only: bool = False) -> torch.Tensor:
        """Args: logits [B, S, V_local]; target [B, S] global ids; this rank's columns
        [vocab_start_index, vocab_end_index); the group over which the vocabulary is split.
        Returns [B, S] fp32 log-probabilities."""
        need = bool(ctx.needs_input_grad[0]) and not inference_only
        ctx.fce_traced = need and torch.compiler.is_compiling()
        if ctx.fce_traced:
            # torch.compile traces this backward too, and cannot trace the autograd.grad of
            # the private graph: keep the core's row lse instead (see backward)
            x = vocab_parallel_logits
            grp = _group(group)
            start = _shard_start(x, vocab_start_index, vocab_end_index, grp)
            with torch.no_grad():
                out = _fce.cross_entropy(x, target, ignore_index=_NO_TARGET, reduction="none",
                                         tp_group=grp, vocab_start=start, return_aux=True)
            ctx.fce_start = vocab_start_index if grp is not None else 0
            ctx.save_for_backward(x, target, out.lse)
            return -out.loss  # log p(t) = z_t - lse
        return inner_forward(
            ctx, vocab_parallel_logits, need,
            lambda x: _logprobs(x, target, vocab_start_index, vocab_end_index, group,
                                inference_only=not need))

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor):
        """Gradient w.r.t. the logits (their dtype); None for the other arguments."""
        if getattr(ctx, "fce_traced", False):
            # d log p(t) / dz_j = [j = t] - p_j, p_j = exp(z_j - lse) (the lse of the whole
            # vocabulary, from the core), on this rank's columns
            x, target, lse = ctx.saved_tensors
            dx = traced_grad(x, target, lse, -grad_outputs[0].float(), ctx.fce_start)
            return dx, None, None, None, None, None
        dx = inner_backward(ctx, grad_outputs[0], "DistributedLogprob")
        return dx, None, None, None, None, None


def from_parallel_logits_to_logprobs(vocab_parallel_logits: torch.Tensor, target: torch.Tensor,
                                     vocab_start_index: int, vocab_end_index: int,
                                     group: Optional[torch.distributed.ProcessGroup],
                                     inference_only: bool = False) -> torch.Tensor:
    """Next-token log-probabilities: pass the unshifted targets; they are shifted here.

    Args:
        vocab_parallel_logits: [B, S, V_local] (columns [vocab_start_index, vocab_end_index)).
        target: [B, S] token ids, unshifted (position s is scored against target s + 1).
        vocab_start_index, vocab_end_index: this rank's vocabulary columns.
        group: the process group the vocabulary is split over (None: as in
            _compute_distributed_log_softmax).
        inference_only: keep nothing for backward; the result has no graph.
    Returns:
        [B, S-1] fp32: out[b, s] = log p(target[b, s+1] | vocab_parallel_logits[b, s]).
    """
    if not isinstance(target, torch.Tensor) or target.dim() < 1:
        raise ValueError("target must be a tensor with a sequence dimension")
    # the last position has no next token: mark it ignored instead of rolling a real id in
    shifted = torch.nn.functional.pad(target[..., 1:], (0, 1), value=_NO_TARGET)
    lp = _logprobs(vocab_parallel_logits, shifted, vocab_start_index, vocab_end_index, group,
                   inference_only=inference_only)
    return lp[..., :-1]


def _compute_distributed_log_softmax(vocab_parallel_logits: torch.Tensor,
                                     group: Optional[torch.distributed.ProcessGroup]
                                     ) -> torch.Tensor:
    """fp32 log-softmax of this rank's shard, normalised over the whole vocabulary.

    Args:
        vocab_parallel_logits: [..., V_local], this rank's shard (shards may be uneven: the
            normalisation over the group does not depend on where the columns lie).
        group: the process group the vocabulary is split over (None: the default group
            where torch.distributed runs more than one rank, else one device).
    Returns:
        [..., V_local] fp32, no gradient.
    """
    group = _group(group)
    with torch.no_grad():
        x = vocab_parallel_logits
        # only the per-row lse is wanted: every row ignored, no loss terms computed; the
        # shards are taken in rank order (their widths gathered), so uneven ones tile too
        start = None
        if group is not None and type(x) is torch.Tensor and x.dim() >= 1:
            from .. import distributed

            start = distributed.shard_start(group, x.shape[-1])
        rows = torch.full(x.shape[:-1], _NO_TARGET, dtype=torch.int64, device=x.device)
        lse = _fce.cross_entropy(x, rows, ignore_index=_NO_TARGET, reduction="none",
                                 tp_group=group, vocab_start=start, return_aux=True).lse
        return x.float() - lse.unsqueeze(-1)
