"""NeMo RL's vocabulary-parallel log-probabilities and entropy, on the fusedce core.

Drop-in for ``nemo_rl.distributed.model_utils``: ``DistributedLogprob``,
``ChunkedDistributedLogprob``, ``ChunkedDistributedGatherLogprob``,
``ChunkedDistributedEntropy``, ``from_parallel_logits_to_logprobs``,
``get_next_token_logprobs_from_logits`` and ``_compute_distributed_log_softmax``, with
NeMo RL's signatures, argument order and results (``TrainingSamplingParams`` mirrors
``nemo_rl.algorithms.logits_sampling_utils``'s dataclass; any object with ``top_k``,
``top_p`` and ``temperature`` attributes is accepted in its place).

Each rank holds the columns [vocab_start_index, vocab_end_index) of logits x [B, S, V_local];
with lse = log sum_j exp(x_j) over the whole vocabulary (ranks exchange per-row statistics, a
few floats per token, never logits):

    DistributedLogprob, ChunkedDistributedLogprob:  out[b, s] = x[b, s, t[b, s]] - lse[b, s]
    ChunkedDistributedGatherLogprob:        out[b, s, k] = x[b, s, i[b, s, k]] - lse[b, s]
    ChunkedDistributedEntropy:              out[b, s] = sum_j p_j log p_j  (minus the entropy)
    from_parallel_logits_to_logprobs:       out[b, s] = x[b, s, t[b, s+1]] - lse[b, s]  [B, S-1]
    get_next_token_logprobs_from_logits:    the same, for every layout NeMo RL dispatches on
    _compute_distributed_log_softmax:       out[b, s, j] = x[b, s, j] - lse[b, s]

all fp32, from :func:`fusedce.logprobs` / :func:`fusedce.entropy` /
:func:`fusedce.cross_entropy`; gradients in the logits' dtype.

Sampling parameters (``sampling_params``), as NeMo RL applies them:

* ``temperature`` is not applied here: NeMo RL's trainers divide the logits by it in place
  before they call these functions, and the functions themselves never read it. Dividing
  again would score a different distribution, so it is ignored, as in the original.
* ``top_k`` (on when > 0) keeps the columns whose logit is >= the k-th largest of the row
  over the whole vocabulary (ties with it are kept); ``top_k`` >= V keeps every column.
* ``top_p`` (on when != 1.0), applied after top-k to the softmax over the columns top-k
  kept: sorting those probabilities ascending, a column is kept when the cumulative sum up
  to it exceeds 1 - top_p; the largest logit is always kept.
* The filtered columns become -inf before the log-softmax, so a target that is filtered
  out gets log-probability -inf, and no filtered column receives gradient.

Under vocabulary parallelism the two cuts are found from per-row statistics, not from
gathered rows: top-k from each rank's k largest logits (one all-gather of k floats per
row), top-p by a radix search over the bit patterns of the fp32 logits (four all-reduces of
258 floats per row, each counting the probability mass in 256 ranges of values). The cut
is a threshold on the logit value, so any number of shards, even uneven, give the same
columns as one device.

Context parallelism (``cp_group`` of size C > 1): the logits hold 2 C load-balanced pieces
of the sequence (this rank's pieces r and 2C - 1 - r, each S_local / 2 long); the targets
(the whole sequence) are shifted, padded with ``vocab_parallel_logits.shape[1] * C -
target.shape[1]`` positions, cut the same way, and the result is all-gathered over the cp
group back into sequence order. As in NeMo RL, the gradient of that all-gather sums the
upstream gradients of every cp rank before each rank takes its own pieces.

Differences from NeMo RL (the signatures and results are the same):

* Memory: ``DistributedLogprob`` keeps no fp32 softmax of the shard (the original keeps
  B * S * V_local * 4 bytes); the chunked Functions keep the logits (as the original) and
  per-row statistics, and recompute one chunk at a time in backward. fp32 copies are of
  one chunk (or one block of 256 rows in the top-k / top-p search) at most.
* The dropped last position and context-parallel padding are not scored (the original
  scores a wrapped-around or padding id there and drops the result).
* ``from_parallel_logits_to_logprobs`` takes the vocabulary group as NeMo RL's current
  ``tp_group`` (positional or keyword) or as its earlier keyword ``group=``.
* ``group=None`` / ``tp_group=None`` means what torch.distributed means by it: the default
  (world) group once the default process group is initialised with more than one rank, as
  in the original; otherwise one device holding the whole vocabulary.
* Shards may be uneven; ``vocab_end_index - vocab_start_index`` must equal V_local
  (checked), and the shards must tile [0, V) across the group (checked once per layout).
  With top-k / top-p NeMo RL needs even shards and B * S (and chunk_size * B) divisible by
  the group size; here neither is needed.
* Top-p's cumulative sums are taken in fp32 in another order than the original's sorted
  ``cumsum`` (in the logits' dtype), so a column whose cumulative mass lies within rounding
  of 1 - top_p can fall on the other side; equal logits at the cut are kept or dropped
  together (the original's sort may split them).
* A target (or gather index) of -100 gives log-probability 0 and no gradient (as in the
  original, where it matches no shard); any other target outside [0, V) raises ValueError
  instead of silently giving 0 (``fusedce.set_validation(False)`` skips that check; the
  gather then gives 0 for it, as the original, with no gradient, where the original's
  backward still subtracts its share of the softmax).
* ``get_next_token_logprobs_from_logits``: no fp32 copy of the logits (the result is fp32
  anyway); DTensor logits sharded unevenly by torch.chunk get their true column offsets
  (the original assumes V divisible by the group); a ``context_parallel_group`` without a
  vocabulary group is honoured (the original ignores it there).
* ``_compute_distributed_log_softmax`` always returns fp32 and, as the original, carries no
  gradient.
* Backward through a result computed with ``inference_only=True`` raises a clear
  RuntimeError (the original fails unpacking its empty saved tensors).
* Only ``DistributedLogprob`` compiles with ``torch.compile(fullgraph=True)``; the chunked
  Functions and the top-k / top-p searches run eagerly (their loops graph-break).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

import fusedce as _fce

from ..spec import InputError
from ._common import inner_backward, inner_forward, traced_grad

__all__ = [
    "ChunkedDistributedEntropy",
    "ChunkedDistributedGatherLogprob",
    "ChunkedDistributedLogprob",
    "DistributedLogprob",
    "TrainingSamplingParams",
    "_compute_distributed_log_softmax",
    "from_parallel_logits_to_logprobs",
    "get_next_token_logprobs_from_logits",
]

# no vocabulary shard holds this id, so it marks positions without a target (the dropped
# last position, context-parallel padding)
_NO_TARGET = -100

# rows per block of the top-k / top-p search: bounds its fp32 and int64 temporaries to a
# few times 256 rows of the shard, and is the same on every rank (the blocks' collectives
# must pair up even where shards have different widths)
_FILTER_ROWS = 256

_INT32_MIN = -(2 ** 31)


class _Required:
    def __repr__(self) -> str:
        return "<required>"


# tp_group's default: NeMo RL requires it, and group= (the earlier name) can stand in for it
_REQUIRED: Any = _Required()


@dataclass
class TrainingSamplingParams:
    """The sampling parameters NeMo RL scores log-probabilities with.

    Args:
        top_k: keep the k largest logits of each row (None or <= 0: off).
        top_p: keep the nucleus of this probability mass (1.0: off).
        temperature: what the caller divides the logits by before scoring (not applied by
            the functions of this module, as in NeMo RL).
    """

    top_k: int | None = None
    top_p: float = 1.0
    temperature: float = 1.0


# ---------------------------------------------------------------------------- arguments


def _shard_start(vocab_parallel_logits: torch.Tensor, vocab_start_index: int,
                 vocab_end_index: int, group) -> int | None:
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
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def _world(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool):
        raise InputError(f"{name} must be a positive int, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise InputError(f"{name} must be a positive int, got {value!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def _filter_args(sampling_params) -> tuple[int | None, float | None]:
    """(top_k, top_p) where each filter is on, else None; as NeMo RL decides it: top-k when
    top_k > 0, top-p when top_p is not 1.0. The temperature is not read (see the module)."""
    if sampling_params is None:
        return None, None
    if isinstance(sampling_params, Mapping):
        top_k, top_p = sampling_params.get("top_k"), sampling_params.get("top_p", 1.0)
    else:
        top_k = getattr(sampling_params, "top_k", None)
        top_p = getattr(sampling_params, "top_p", 1.0)
    k = p = None
    if top_k is not None:
        if isinstance(top_k, bool):
            raise InputError(f"sampling_params.top_k must be an int or None, got {top_k!r}")
        try:
            top_k = operator.index(top_k)
        except TypeError:
            raise InputError(f"sampling_params.top_k must be an int or None, got "
                             f"{top_k!r}") from None
        k = top_k if top_k > 0 else None
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
            raise InputError(f"sampling_params.top_p must be a float, got {top_p!r}")
        if math.isnan(top_p):
            raise ValueError("sampling_params.top_p is NaN")
        p = float(top_p) if top_p != 1.0 else None
    return k, p


# ---------------------------------------------------------------------------- top-k / top-p


def _order_key(xf: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered as the fp32 values ``xf`` (-0.0 and +0.0 share one key)."""
    bits = (xf + 0.0).view(torch.int32).to(torch.int64)
    # negative floats order backwards by their bit pattern: flip their magnitude bits
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


_NEG_INF_KEY = int(_order_key(torch.tensor([-math.inf])).item())


def _key_value(key: torch.Tensor) -> torch.Tensor:
    """fp32 value of an int64 key from :func:`_order_key`; keys at or below -inf's are -inf."""
    bits = torch.where(key < 0, key ^ 0x7FFFFFFF, key).to(torch.int32).view(torch.float32)
    return torch.where(key <= _NEG_INF_KEY, torch.full_like(bits, -math.inf), bits)


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and _world(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _top_k_cut(xf: torch.Tensor, group, top_k: int) -> torch.Tensor:
    """[r, 1] fp32: the k-th largest logit of each row over the whole vocabulary (-inf when
    the vocabulary has fewer than k columns)."""
    r, v = xf.shape
    kl = min(top_k, v)
    vals = xf.topk(kl, dim=-1).values
    if kl < top_k:
        vals = torch.cat([vals, vals.new_full((r, top_k - kl), -math.inf)], dim=-1)
    if _world(group) > 1:
        # each rank's k largest hold the row's k largest
        parts = [torch.empty_like(vals) for _ in range(_world(group))]
        dist.all_gather(parts, vals.contiguous(), group=group)
        vals = torch.cat(parts, dim=-1).topk(top_k, dim=-1).values
    return vals[:, top_k - 1:top_k]


def _top_p_cut(xf: torch.Tensor, group, top_p: float) -> torch.Tensor:
    """[r, 1] int64 key of the smallest kept logit of each row under top-p over ``xf``
    (filtered columns already -inf).

    Kept are the columns whose key is >= the smallest key kappa with mass(key <= kappa) >
    1 - top_p, or with kappa >= the row's largest key (the largest logit is always kept):
    a predicate monotone in kappa, so kappa is found a byte at a time from the top of its
    32-bit range, each byte from one all-reduced histogram of probability mass over 256
    ranges (plus the mass below the current prefix).
    """
    r = xf.shape[0]
    m = _all_reduce(xf.amax(dim=-1, keepdim=True), dist.ReduceOp.MAX, group)
    e = torch.exp(xf - m)
    s = _all_reduce(e.sum(dim=-1, keepdim=True), dist.ReduceOp.SUM, group)
    prob = e / s
    del e
    # unsigned form of the keys, in [0, 2^32)
    u = _order_key(xf) - _INT32_MIN
    u_max = _order_key(m) - _INT32_MIN
    thr = 1.0 - top_p
    prefix = torch.zeros(r, 1, dtype=torch.int64, device=xf.device)
    byte = torch.arange(256, dtype=torch.int64, device=xf.device)
    for shift in (24, 16, 8, 0):
        high = u >> (shift + 8)
        # bucket 0: keys below the prefix; 1 + next byte: keys that share it; 257: above
        bucket = torch.where(high == prefix, 1 + ((u >> shift) & 255),
                             torch.where(high < prefix, 0, 257))
        hist = torch.zeros(r, 258, dtype=torch.float32, device=xf.device)
        hist.scatter_add_(1, bucket, prob)
        del bucket, high
        hist = _all_reduce(hist, dist.ReduceOp.SUM, group)
        # mass of every key <= (prefix, b, all ones below)
        mass = hist[:, :257].cumsum(dim=-1)[:, 1:]
        top = (((prefix << 8) | byte) << shift) | ((1 << shift) - 1)
        ok = (mass > thr) | (top >= u_max)
        # the first byte that satisfies it (one always does: the prefix's all-ones key does)
        prefix = (prefix << 8) | ok.int().argmax(dim=-1, keepdim=True)
    return prefix + _INT32_MIN


@torch.no_grad()
def _threshold(x: torch.Tensor, group, top_k: int | None,
               top_p: float | None) -> torch.Tensor:
    """[..., 1] fp32 per row of ``x``: top-k and top-p keep exactly the columns >= it."""
    v = x.shape[-1]
    rows = x.reshape(-1, v)
    cuts: list[torch.Tensor] = []
    for i in range(0, rows.shape[0], _FILTER_ROWS):
        xf = rows[i:i + _FILTER_ROWS].float()
        cut = torch.full((xf.shape[0], 1), _INT32_MIN, dtype=torch.int64, device=x.device)
        if top_k is not None:
            kth = _top_k_cut(xf, group, top_k)
            cut = _order_key(kth)
            xf = xf.masked_fill(xf < kth, -math.inf)
        if top_p is not None:
            cut = torch.maximum(cut, _top_p_cut(xf, group, top_p))
        cuts.append(_key_value(cut))
    if not cuts:
        return x.new_empty(x.shape[:-1] + (1,), dtype=torch.float32)
    return torch.cat(cuts).view(x.shape[:-1] + (1,))


def _masked(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``x`` with the columns below the per-row threshold ``tau`` set to -inf (they get no
    gradient through it)."""
    return x.masked_fill(x < tau, -math.inf)


# ---------------------------------------------------------------------------- core calls


def _core_logprobs(x: torch.Tensor, target: torch.Tensor, start: int | None, group,
                   inference_only: bool) -> torch.Tensor:
    return _fce.logprobs(x, target, ignore_index=_NO_TARGET, tp_group=group,
                         vocab_start=start, inference_only=inference_only)


def _logprobs(x: torch.Tensor, target: torch.Tensor, vocab_start_index: int,
              vocab_end_index: int, group, inference_only: bool) -> torch.Tensor:
    group = _group(group)
    start = _shard_start(x, vocab_start_index, vocab_end_index, group)
    return _core_logprobs(x, target, start, group, inference_only)


def _seq_slices(n: int, chunk_size: int) -> list[slice]:
    return [slice(s, min(n, s + chunk_size)) for s in range(0, n, chunk_size)]


def _need_seq_dim(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{what}: the logits must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{what}: the logits need a sequence and a vocabulary dimension, "
                         f"got shape {tuple(x.shape)}")


def _not_kept(ctx, what: str) -> None:
    if not getattr(ctx, "fce_kept", False):
        raise RuntimeError(f"{what}: nothing was kept for backward (the forward ran with "
                           "inference_only=True or without an input that requires grad)")


def _token_logprobs(x: torch.Tensor, target: torch.Tensor, start: int | None, group,
                    chunk_size: int | None, top_k: int | None, top_p: float | None,
                    inference_only: bool) -> torch.Tensor:
    """log p(target) per row of ``x`` (group already resolved), filtered by top-k / top-p
    where on, in sequence chunks where ``chunk_size`` is given."""
    if chunk_size is not None:
        if inference_only:
            # no graph at all, as the unchunked inference_only result
            with torch.no_grad():
                return _ChunkedTokenLogprob.apply(x, target, start, group, chunk_size, top_k,
                                                  top_p, True)
        return _ChunkedTokenLogprob.apply(x, target, start, group, chunk_size, top_k, top_p,
                                          False)
    if top_k is None and top_p is None:
        return _core_logprobs(x, target, start, group, inference_only)
    tau = _threshold(x, group, top_k, top_p)
    if inference_only:
        with torch.no_grad():
            return _core_logprobs(_masked(x, tau), target, start, group, True)
    return _core_logprobs(_masked(x, tau), target, start, group, False)


# ---------------------------------------------------------------------------- chunked bodies
#
# The chunked Functions keep the logits (as NeMo RL's) and per-row statistics; backward
# recomputes one chunk at a time through the core's own autograd, so at most one chunk's
# gradient and temporaries exist besides the returned gradient.


def _logprob_chunks_forward(ctx, x, target, start, group, chunk_size, top_k, top_p,
                            inference_only, what):
    _need_seq_dim(x, what)
    chunk_size = _positive_int(chunk_size, "chunk_size")
    n = x.shape[-2]
    out = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    taus = []
    filtering = top_k is not None or top_p is not None
    with torch.no_grad():
        for sl in _seq_slices(n, chunk_size):
            xc, tc = x[..., sl, :], target[..., sl]
            if filtering:
                taus.append(_threshold(xc, group, top_k, top_p))
                xc = _masked(xc, taus[-1])
            out[..., sl] = _core_logprobs(xc, tc, start, group, True)
    ctx.fce_kept = bool(ctx.needs_input_grad[0]) and not inference_only
    if ctx.fce_kept:
        tau = torch.cat(taus, dim=-2) if taus else None
        ctx.save_for_backward(x, target, tau)
        ctx.fce_args = (start, group, chunk_size)
    return out


def _logprob_chunks_backward(ctx, grad, what):
    _not_kept(ctx, what)
    x, target, tau = ctx.saved_tensors
    start, group, chunk_size = ctx.fce_args
    dx = torch.empty_like(x)
    for sl in _seq_slices(x.shape[-2], chunk_size):
        alias = x[..., sl, :].detach().requires_grad_(True)
        with torch.enable_grad():
            xc = alias if tau is None else _masked(alias, tau[..., sl, :])
            lp = _core_logprobs(xc, target[..., sl], start, group, False)
        (d,) = torch.autograd.grad(lp, alias, grad[..., sl])
        dx[..., sl, :] = d
    return dx


class _ChunkedTokenLogprob(torch.autograd.Function):
    """The chunked log-probabilities with top-k / top-p (group already resolved)."""

    @staticmethod
    def forward(ctx, x, target, start, group, chunk_size, top_k, top_p, inference_only):
        return _logprob_chunks_forward(ctx, x, target, start, group, chunk_size, top_k,
                                       top_p, inference_only, "from_parallel_logits_to_logprobs")

    @staticmethod
    def backward(ctx, grad):
        dx = _logprob_chunks_backward(ctx, grad, "from_parallel_logits_to_logprobs")
        return dx, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------- Functions


class DistributedLogprob(torch.autograd.Function):
    """log p(target) over vocabulary-parallel logits: ``apply(vocab_parallel_logits, target,
    vocab_start_index, vocab_end_index, group, inference_only=False)`` -> [B, S] fp32.

    The targets are taken as given (not shifted). ``inference_only=True`` keeps nothing
    for backward.
    """

    @staticmethod
    def forward(ctx: Any, vocab_parallel_logits: torch.Tensor, target: torch.Tensor,
                vocab_start_index: int, vocab_end_index: int,
                group: torch.distributed.ProcessGroup | None,
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


class ChunkedDistributedLogprob(torch.autograd.Function):
    """log p(target) over vocabulary-parallel logits, a chunk of the sequence at a time:
    ``apply(vocab_parallel_logits, target, vocab_start_index, vocab_end_index, chunk_size,
    tp_group, inference_only=False)`` -> [B, S] fp32.

    The same values as :class:`DistributedLogprob`; it keeps the logits instead of any
    per-token softmax and recomputes one chunk at a time in backward.
    """

    @staticmethod
    def forward(ctx: Any, vocab_parallel_logits: torch.Tensor, target: torch.Tensor,
                vocab_start_index: int, vocab_end_index: int, chunk_size: int,
                tp_group: torch.distributed.ProcessGroup | None,
                inference_only: bool = False) -> torch.Tensor:
        """Args:
            vocab_parallel_logits: [B, S, V_local], columns [vocab_start_index,
                vocab_end_index) of the vocabulary.
            target: [B, S] global token ids (not shifted); -100 gives 0.
            vocab_start_index, vocab_end_index: this rank's columns.
            chunk_size: sequence positions per chunk.
            tp_group: the group the vocabulary is split over (None: the default group where
                torch.distributed runs more than one rank, else one device).
            inference_only: keep nothing for backward.
        Returns:
            [B, S] fp32 log-probabilities.
        """
        group = _group(tp_group)
        start = _shard_start(vocab_parallel_logits, vocab_start_index, vocab_end_index, group)
        return _logprob_chunks_forward(ctx, vocab_parallel_logits, target, start, group,
                                       chunk_size, None, None, inference_only,
                                       "ChunkedDistributedLogprob")

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor):
        """Gradient w.r.t. the logits (their dtype); None for the other arguments."""
        dx = _logprob_chunks_backward(ctx, grad_outputs[0], "ChunkedDistributedLogprob")
        return dx, None, None, None, None, None, None


class ChunkedDistributedGatherLogprob(torch.autograd.Function):
    """Log-probabilities at K given token ids per position: ``apply(vocab_parallel_logits,
    global_indices, vocab_start_index, vocab_end_index, chunk_size, tp_group,
    inference_only=False)`` -> [B, S, K] fp32, out[b, s, k] = log p(global_indices[b, s, k]).

    One per-row lse per position from the core (per-row statistics over the group), the K
    logits from the rank that holds each id (one all-reduce of K values per position);
    backward writes d/dx_j = sum_k g_k ([j = i_k] - p_j) from the kept lse, one chunk at a
    time.
    """

    @staticmethod
    def forward(ctx: Any, vocab_parallel_logits: torch.Tensor, global_indices: torch.Tensor,
                vocab_start_index: int, vocab_end_index: int, chunk_size: int,
                tp_group: torch.distributed.ProcessGroup | None,
                inference_only: bool = False) -> torch.Tensor:
        """Args:
            vocab_parallel_logits: [B, S, V_local], columns [vocab_start_index,
                vocab_end_index) of the vocabulary.
            global_indices: [B, S, K] global token ids (any K); -100 gives 0.
            vocab_start_index, vocab_end_index: this rank's columns.
            chunk_size: sequence positions per chunk.
            tp_group: the group the vocabulary is split over (None as in
                :class:`ChunkedDistributedLogprob`).
            inference_only: keep nothing for backward.
        Returns:
            [B, S, K] fp32 log-probabilities.
        """
        what = "ChunkedDistributedGatherLogprob"
        x = vocab_parallel_logits
        _need_seq_dim(x, what)
        if not isinstance(global_indices, torch.Tensor) or global_indices.is_floating_point() \
                or global_indices.is_complex() or global_indices.dtype == torch.bool:
            raise InputError(f"{what}: global_indices must be an integer tensor")
        if global_indices.dim() != x.dim() or global_indices.shape[:-1] != x.shape[:-1]:
            raise ValueError(f"{what}: global_indices has shape {tuple(global_indices.shape)}; "
                             f"the logits {tuple(x.shape)} need [..., S, K] with the same "
                             "leading dimensions")
        chunk_size = _positive_int(chunk_size, "chunk_size")
        group = _group(tp_group)
        start = _shard_start(x, vocab_start_index, vocab_end_index, group)
        offset = 0 if start is None else start
        v_local = x.shape[-1]
        out = torch.empty(global_indices.shape, dtype=torch.float32, device=x.device)
        lse = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
        valid = torch.empty(global_indices.shape, dtype=torch.bool, device=x.device)
        check = _fce.validation_enabled() and not torch.compiler.is_compiling()
        with torch.no_grad():
            for sl in _seq_slices(x.shape[-2], chunk_size):
                xc, ic = x[..., sl, :], global_indices[..., sl, :].long()
                rows = torch.full(xc.shape[:-1], _NO_TARGET, dtype=torch.int64, device=x.device)
                lse[..., sl] = _fce.cross_entropy(
                    xc, rows, ignore_index=_NO_TARGET, reduction="none", tp_group=group,
                    vocab_start=start, return_aux=True).lse
                local = ic - offset
                inside = (local >= 0) & (local < v_local)
                vals = xc.gather(-1, local.clamp(0, v_local - 1)).float()
                both = torch.stack([torch.where(inside, vals, 0.0), inside.float()])
                # each id lies in one shard: the sum over ranks is its logit, and the count
                # of ranks that hold it tells an id outside the vocabulary
                both = _all_reduce(both, dist.ReduceOp.SUM, group)
                ok = both[1] > 0
                if check:
                    bad = ~ok & (ic != _NO_TARGET)
                    # the same on every rank (after the all-reduce): all raise together
                    if bool(bad.any()):
                        raise ValueError(f"{what}: global_indices hold ids outside the "
                                         f"vocabulary, e.g. {int(ic[bad][0])} (only -100 "
                                         "marks a position to skip)")
                valid[..., sl, :] = ok
                out[..., sl, :] = torch.where(ok, both[0] - lse[..., sl].unsqueeze(-1), 0.0)
        ctx.fce_kept = bool(ctx.needs_input_grad[0]) and not inference_only
        if ctx.fce_kept:
            ctx.save_for_backward(x, global_indices, lse, valid)
            ctx.fce_args = (offset, chunk_size)
        return out

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor):
        """Gradient w.r.t. the logits (their dtype); None for the other arguments."""
        _not_kept(ctx, "ChunkedDistributedGatherLogprob")
        x, global_indices, lse, valid = ctx.saved_tensors
        offset, chunk_size = ctx.fce_args
        grad = grad_outputs[0]
        v_local = x.shape[-1]
        dx = torch.empty_like(x)
        for sl in _seq_slices(x.shape[-2], chunk_size):
            g = torch.where(valid[..., sl, :], grad[..., sl, :].float(), 0.0)
            p = torch.exp(x[..., sl, :].float() - lse[..., sl].unsqueeze(-1))
            d = p.mul_(-g.sum(dim=-1, keepdim=True))
            local = global_indices[..., sl, :].long() - offset
            inside = (local >= 0) & (local < v_local)
            d.scatter_add_(-1, local.clamp(0, v_local - 1), torch.where(inside, g, 0.0))
            dx[..., sl, :] = d
        return dx, None, None, None, None, None, None


class ChunkedDistributedEntropy(torch.autograd.Function):
    """sum_j p_j log p_j per position (minus the entropy, as NeMo RL's H_all), over
    vocabulary-parallel logits, a chunk of the sequence at a time: ``apply(
    vocab_parallel_logits, chunk_size, tp_group, inference_only=False)`` -> [B, S] fp32.
    """

    @staticmethod
    def forward(ctx: Any, vocab_parallel_logits: torch.Tensor, chunk_size: int,
                tp_group: torch.distributed.ProcessGroup | None,
                inference_only: bool = False) -> torch.Tensor:
        """Args:
            vocab_parallel_logits: [B, S, V_local], this rank's shard (uneven shards work:
                the shards are taken in rank order).
            chunk_size: sequence positions per chunk.
            tp_group: the group the vocabulary is split over (None as in
                :class:`ChunkedDistributedLogprob`).
            inference_only: keep nothing for backward.
        Returns:
            [B, S] fp32, sum_j p_j log p_j (<= 0).
        """
        what = "ChunkedDistributedEntropy"
        x = vocab_parallel_logits
        _need_seq_dim(x, what)
        chunk_size = _positive_int(chunk_size, "chunk_size")
        group = _group(tp_group)
        out = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
        with torch.no_grad():
            for sl in _seq_slices(x.shape[-2], chunk_size):
                out[..., sl] = -_fce.entropy(x[..., sl, :], tp_group=group)
        ctx.fce_kept = bool(ctx.needs_input_grad[0]) and not inference_only
        if ctx.fce_kept:
            ctx.save_for_backward(x)
            ctx.fce_args = (group, chunk_size)
        return out

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor):
        """Gradient w.r.t. the logits (their dtype); None for the other arguments."""
        _not_kept(ctx, "ChunkedDistributedEntropy")
        (x,) = ctx.saved_tensors
        group, chunk_size = ctx.fce_args
        grad = grad_outputs[0]
        dx = torch.empty_like(x)
        for sl in _seq_slices(x.shape[-2], chunk_size):
            alias = x[..., sl, :].detach().requires_grad_(True)
            with torch.enable_grad():
                h = _fce.entropy(alias, tp_group=group)
            (d,) = torch.autograd.grad(h, alias, -grad[..., sl])
            dx[..., sl, :] = d
        return dx, None, None, None


# ---------------------------------------------------------------------------- sequence layout


class _CPGather(torch.autograd.Function):
    """[..., L] per cp rank (its load-balanced pieces r and 2C - 1 - r) -> [..., C * L] in
    sequence order; backward sums the upstream gradients over the cp group (the gradient of
    an all-gather whose every rank's output feeds the loss) and takes this rank's pieces."""

    @staticmethod
    def forward(ctx, x, cp_group):
        cp, rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
        parts = [torch.empty_like(x) for _ in range(cp)]
        dist.all_gather(parts, x.contiguous(), group=cp_group)
        h = x.shape[-1] // 2
        pieces: list[Any] = [None] * (2 * cp)
        for r, part in enumerate(parts):
            pieces[r], pieces[2 * cp - 1 - r] = part[..., :h], part[..., h:]
        ctx.fce_cp = (cp_group, cp, rank, h)
        return torch.cat(pieces, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        cp_group, cp, rank, h = ctx.fce_cp
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=cp_group)
        mine = torch.cat([grad[..., rank * h:(rank + 1) * h],
                          grad[..., (2 * cp - 1 - rank) * h:(2 * cp - rank) * h]], dim=-1)
        return mine, None


def _next_token(x: torch.Tensor, target: torch.Tensor, start: int | None, group, cp_group,
                chunk_size: int | None, top_k: int | None, top_p: float | None,
                inference_only: bool, what: str) -> torch.Tensor:
    """[..., T - 1] fp32: log p(target[s + 1] | x at s) over the whole sequence, for logits
    holding this rank's vocabulary columns (``group`` resolved) and, with a cp group of
    size C > 1, its two load-balanced pieces of the sequence."""
    _need_seq_dim(x, what)
    if not isinstance(target, torch.Tensor) or target.dim() < 1:
        raise ValueError(f"{what}: target must be a tensor with a sequence dimension")
    cp = _world(cp_group)
    s_local = x.shape[-2]
    full = s_local * cp
    n = target.shape[-1]
    if n < 1 or n > full:
        raise ValueError(f"{what}: target has {n} positions but the logits hold {s_local} per "
                         f"context-parallel rank ({cp} ranks): need 1 <= {n} <= {full}")
    if target.device != x.device:
        target = target.to(x.device)
    # the last position has no next token and the padding none at all: mark them ignored
    # instead of scoring a real id and dropping it
    shifted = target.new_full(target.shape[:-1] + (full,), _NO_TARGET)
    shifted[..., :n - 1] = target[..., 1:]
    if cp > 1:
        if s_local % 2:
            raise ValueError(f"{what}: context parallelism splits the sequence into 2 * {cp} "
                             f"load-balanced pieces, so each rank's {s_local} positions must "
                             "be even")
        h, r = s_local // 2, dist.get_rank(cp_group)
        shifted = torch.cat([shifted[..., r * h:(r + 1) * h],
                             shifted[..., (2 * cp - 1 - r) * h:(2 * cp - r) * h]], dim=-1)
    lp = _token_logprobs(x, shifted, start, group, chunk_size, top_k, top_p, inference_only)
    if cp > 1:
        lp = _CPGather.apply(lp, cp_group)
    return lp[..., :n - 1]


def from_parallel_logits_to_logprobs(vocab_parallel_logits: torch.Tensor, target: torch.Tensor,
                                     vocab_start_index: int, vocab_end_index: int,
                                     tp_group: torch.distributed.ProcessGroup | None = _REQUIRED,
                                     inference_only: bool = False,
                                     cp_group: torch.distributed.ProcessGroup | None = None,
                                     chunk_size: int | None = None,
                                     sampling_params: Any | None = None, *,
                                     group: torch.distributed.ProcessGroup | None = _REQUIRED
                                     ) -> torch.Tensor:
    """Next-token log-probabilities: pass the unshifted targets; they are shifted here.

    Args:
        vocab_parallel_logits: [B, S_local, V_local] (columns [vocab_start_index,
            vocab_end_index); with ``cp_group`` of size C > 1, this rank's two load-balanced
            pieces of the sequence, S_local = 2 * piece).
        target: [B, S] token ids, unshifted (position s is scored against target s + 1);
            S <= S_local * C (the rest is padding).
        vocab_start_index, vocab_end_index: this rank's vocabulary columns.
        tp_group: the process group the vocabulary is split over (None: the default group
            where torch.distributed runs more than one rank, else one device). Required,
            unless given as ``group``.
        inference_only: keep nothing for backward; the result has no graph.
        cp_group: the context-parallel group (None or size 1: the logits hold the whole
            sequence).
        chunk_size: sequence positions per chunk (as :class:`ChunkedDistributedLogprob`);
            None computes them all at once.
        sampling_params: top_k / top_p filtering (``TrainingSamplingParams`` or any object
            with those attributes); its temperature is not applied (see the module).
        group: NeMo RL's earlier name for ``tp_group`` (keyword only).
    Returns:
        [B, S-1] fp32: out[b, s] = log p(target[b, s+1] | vocab_parallel_logits[b, s]).
    """
    if group is not _REQUIRED:
        if tp_group is not _REQUIRED and tp_group is not group:
            raise TypeError("from_parallel_logits_to_logprobs: pass the vocabulary group once, "
                            "as tp_group (NeMo RL's current name) or group (its earlier one)")
        tp_group = group
    elif tp_group is _REQUIRED:
        raise TypeError("from_parallel_logits_to_logprobs() missing required argument: "
                        "'tp_group' (or its earlier name, group=)")
    top_k, top_p = _filter_args(sampling_params)
    if chunk_size is not None:
        chunk_size = _positive_int(chunk_size, "chunk_size")
    grp = _group(tp_group)
    start = _shard_start(vocab_parallel_logits, vocab_start_index, vocab_end_index, grp)
    return _next_token(vocab_parallel_logits, target, start, grp, cp_group, chunk_size, top_k,
                       top_p, inference_only, "from_parallel_logits_to_logprobs")


def _is_dtensor(x) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        return False
    return isinstance(x, DTensor)


def _dtensor_shard(logits):
    """(local logits, vocabulary group or None, vocab_start) of DTensor logits: the mesh
    dimension that shards the last dim is the vocabulary group (its torch.chunk columns,
    even or not); without one, the local tensor holds the whole vocabulary."""
    from torch.distributed.tensor import Shard

    from .. import distributed

    last = logits.dim() - 1
    if any(isinstance(p, Shard) and p.dim in (-1, last) for p in logits.placements):
        u = distributed.unpack_dtensor(logits, None)
        return u.logits, u.group, u.vocab_start
    return logits.to_local(), None, None


def _dtensor_next_token(logits, input_ids, seq_index, chunk_size, top_k, top_p):
    """NeMo RL's DTensor path: targets (a DTensor whose mesh has a "cp" dimension when the
    sequence is context-parallel, laid out in ``seq_index`` order) shifted in sequence
    order, scored on the local shard, and gathered back in sequence order."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    what = "get_next_token_logprobs_from_logits"
    x, group, start = _dtensor_shard(logits)
    inference_only = not torch.is_grad_enabled()
    mesh = input_ids.device_mesh if isinstance(input_ids, DTensor) else None
    names = getattr(mesh, "mesh_dim_names", None) or ()
    if mesh is None or "cp" not in names or mesh.size(names.index("cp")) <= 1:
        t = input_ids.full_tensor() if isinstance(input_ids, DTensor) else input_ids
        t = t.to(x.device)
        return _next_token(x, t, start, group, None, chunk_size, top_k, top_p,
                           inference_only, what)
    if seq_index is None:
        raise ValueError(f"{what}: seq_index must be given for context-parallel DTensor "
                         "input_ids (the order their sequence is laid out in)")
    placements = input_ids.placements
    seq_index = seq_index.to(x.device).long()
    order = torch.argsort(seq_index)
    natural = input_ids.full_tensor().to(x.device)[:, order]
    shifted = natural.new_full(natural.shape, _NO_TARGET)
    shifted[:, :-1] = natural[:, 1:]
    local = distribute_tensor(shifted[:, seq_index], mesh, placements).to_local()
    lp = _token_logprobs(x, local, start, group, chunk_size, top_k, top_p, inference_only)
    lp = DTensor.from_local(lp, mesh, placements, run_check=False).full_tensor()[:, order]
    return lp[:, :-1]


def get_next_token_logprobs_from_logits(
        input_ids: torch.Tensor, next_token_logits: torch.Tensor,
        seq_index: torch.Tensor | None = None, vocab_parallel_rank: int | None = None,
        vocab_parallel_group: torch.distributed.ProcessGroup | None = None,
        context_parallel_group: torch.distributed.ProcessGroup | None = None,
        sampling_params: Any | None = None,
        chunk_size: int | None = None) -> torch.Tensor:
    """log p(input_ids[:, s + 1] | next_token_logits[:, s]) for whatever layout the logits
    have, as NeMo RL dispatches:

    * ``vocab_parallel_group`` given: the logits are this rank's equal vocabulary shard,
      columns [rank * V_local, (rank + 1) * V_local) with ``vocab_parallel_rank``, and with
      ``context_parallel_group`` its load-balanced sequence pieces (as
      :func:`from_parallel_logits_to_logprobs`); ``chunk_size`` applies when no top-k /
      top-p filtering is on.
    * DTensor logits: the mesh dimension that shards the vocabulary is the group (uneven
      torch.chunk shards too); ``input_ids`` as a DTensor on a mesh with a "cp" dimension
      of size > 1 is context-parallel in ``seq_index`` order; backward keeps nothing when
      grad mode is off.
    * Otherwise the logits hold the whole vocabulary (and, with ``context_parallel_group``,
      this rank's load-balanced pieces of the sequence).

    Args:
        input_ids: [B, S] token ids, unshifted (a DTensor in the DTensor path).
        next_token_logits: [B, S, V] logits, or a shard of them as above.
        seq_index: [S] the sequence position each column of a context-parallel DTensor
            ``input_ids`` holds.
        vocab_parallel_rank: this rank's index in ``vocab_parallel_group`` (required with it).
        vocab_parallel_group: the group the vocabulary is split over.
        context_parallel_group: the group the sequence is split over.
        sampling_params: top_k / top_p filtering (the temperature is not applied).
        chunk_size: sequence positions per chunk in the vocabulary-parallel path.
    Returns:
        [B, S - 1] fp32 log-probabilities.
    """
    what = "get_next_token_logprobs_from_logits"
    top_k, top_p = _filter_args(sampling_params)
    if vocab_parallel_group is not None:
        if vocab_parallel_rank is None:
            raise ValueError(f"{what}: vocab_parallel_rank must be given with "
                             "vocab_parallel_group")
        rank = operator.index(vocab_parallel_rank)
        v_local = next_token_logits.shape[-1]
        # chunking applies only without filtering, as in NeMo RL
        use_chunks = chunk_size is not None and top_k is None and top_p is None
        logprobs = from_parallel_logits_to_logprobs(
            next_token_logits, input_ids, rank * v_local, (rank + 1) * v_local,
            tp_group=vocab_parallel_group, inference_only=False,
            cp_group=context_parallel_group, chunk_size=chunk_size if use_chunks else None,
            sampling_params=sampling_params)
        return logprobs[:, :input_ids.shape[1] - 1]
    if _is_dtensor(next_token_logits):
        return _dtensor_next_token(next_token_logits, input_ids, seq_index, None, top_k, top_p)
    cp_group = context_parallel_group if _world(context_parallel_group) > 1 else None
    return _next_token(next_token_logits, input_ids, None, None, cp_group, None, top_k, top_p,
                       False, what)


def _compute_distributed_log_softmax(vocab_parallel_logits: torch.Tensor,
                                     group: torch.distributed.ProcessGroup | None
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
        if type(x) is not torch.Tensor or not x.is_floating_point() or x.dim() < 1 \
                or x.shape[-1] == 0:
            lse = _fce.cross_entropy(x, rows, ignore_index=_NO_TARGET, reduction="none",
                                     tp_group=group, vocab_start=start, return_aux=True).lse
            return x.float() - lse.unsqueeze(-1)
        # shifted by the row maximum first, so that x - lse keeps the differences exact
        # where the logits are large and close (lse itself is rounded to the logits' scale)
        m = x.amax(dim=-1).float()
        if group is not None:
            torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        xs = x.float() - m.unsqueeze(-1)
        lse = _fce.cross_entropy(xs, rows, ignore_index=_NO_TARGET, reduction="none",
                                 tp_group=group, vocab_start=start, return_aux=True).lse
        return xs.sub_(lse.unsqueeze(-1))
