"""Public functions: argument checks, backend choice, dispatch to the autograd functions.

    cross_entropy(x, t) = reduce_rows[ (1 - a) * w_t * (lse - z_t)
                                       + (a / V) * sum_j w_j * (lse - z_j) + zl * lse^2 ]
    logprobs(x, t)      = z_t - lse                      (fp32, 0 on ignored rows)
    entropy(x)          = lse - sum_j softmax(z)_j * z_j (fp32)

(formed offset-invariantly from the row maximum m: lse - z_t = (m - z_t) + log s).

with z = softcap * tanh(logit_scale * x / softcap) (or logit_scale * x) and lse the
log-sum-exp of z over the whole (possibly vocab-sharded) vocabulary; see
:mod:`fusedce.spec`. The checks themselves live in :mod:`fusedce.validation`.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch

from . import autograd as _ag
from . import torch_backend
from . import validation as _v
from .spec import CrossEntropyOutput, InputError, LossOptions
from .validation import set_validation, validation, validation_enabled  # noqa: F401

# the checks live in fusedce.validation; these names stay for the modules built on this one
_FLOAT_DTYPES = _v.FLOAT_DTYPES
_INT_DTYPES = _v.INT_DTYPES
_check_logits = _v.check_logits
_check_target = _v.check_target
_check_group = _v.check_group
_finite = _v.finite
_compiling = _v.compiling
_check_target_range = _v.check_target_range
_widened = _v.widened
_check_options = _v.check_options
_check_weight = _v.check_weight
_fp = _v.fingerprint_value


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pick_backend(backend: str, x: torch.Tensor):
    """The backend module a call on ``x`` runs ("auto": Triton on CUDA, torch elsewhere);
    a ValueError / InputError where the choice cannot run here."""
    if backend == "torch":
        return torch_backend
    if backend == "auto" and not x.is_cuda:
        return torch_backend
    if not x.is_cuda and not _triton_interpreting():
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                         "importing fusedce, for CPU tests); use backend='torch' on the CPU")
    if x.dtype == torch.float64:
        if backend == "auto":
            return torch_backend
        raise InputError("backend='triton' takes float32, bfloat16 or float16 logits, not float64")
    try:
        from .triton import backend as triton_backend
    except ImportError as exc:  # pragma: no cover - depends on the platform
        if backend == "auto":
            return torch_backend
        raise ValueError(f"backend='triton' is unavailable: {exc}") from exc
    return triton_backend


def _backend_name(backend, x) -> str:
    """The backend a call resolves to, for the TP options fingerprint (never raises: a bad
    choice is raised by the local checks, inside the shared check)."""
    try:
        return pick_backend(backend, x).name
    except Exception:  # noqa: BLE001
        return f"invalid {backend!r}"


def _resolve_tp(logits, tp_group, vocab_start, *, target=None, weight=None,
                ignore_index: int = -100, op: str = "ce", options: tuple = (),
                option_checks=None, backend="auto",
                target_check: Optional[_v.TargetCheck] = None):
    """Check the tensors and options, resolve the vocabulary layout and the backend; unpacks
    DTensor inputs.

    Args:
        logits, tp_group, vocab_start, target, weight, ignore_index, backend: as the public
            functions take them (target None for entropy).
        op: "ce", "ce_smoothed" (label smoothing: needs the exact global V) or "entropy".
        options: the loss options and flags, which every rank of a TP group must share
            (fingerprinted with the resolved backend and the logits' dtype).
        option_checks: the caller's option checks. Under TP with validation every check
            that can fail on one rank (options, types, shapes, the backend) runs inside the
            group's one shared check, so that a bad argument on one rank raises on every rank
            instead of leaving the others waiting in a collective.
        target_check: a :class:`~fusedce.validation.TargetCheck`: on one device without
            class weights the target-range check runs in it (deferred, its final read left
            to the caller's ``finish()`` so that the caller's kernels queue without a host
            sync, where it was made with ``defer``: for callers that write nothing visible
            before they return), and keeps the backend's target scan for the caller.
    Returns:
        (logits, target, weight, group, vocab_start, V, backend): plain tensors, the group
        (None without TP), this shard's first column, the global vocabulary size and the
        backend module. Without validation and with explicit uneven shards, V is only exact
        where it matters (label smoothing, class weights); elsewhere it does not enter the
        result.
    """
    from . import distributed

    _check_group(tp_group)
    u = distributed.unpack_dtensor(logits, tp_group, vocab_start, target, weight)
    logits, target, weight, tp_group = u.logits, _widened(u.target, ignore_index), u.weight, u.group
    picked = []

    def local_checks():
        if option_checks is not None:
            option_checks()
        _check_logits(logits)
        if op != "entropy":
            _check_target(target, logits.shape[:-1], logits.device)
        picked.append(pick_backend(backend, logits))
        if weight is not None and tp_group is not None:
            if isinstance(weight, torch.Tensor) and weight.dim() != 1:
                raise ValueError(f"weight must be the whole [V] class-weight vector (or this "
                                 f"rank's [V_local] slice), got shape {tuple(weight.shape)}")
            # its length is checked against the global V once that is known
            _check_weight(weight, weight.shape[0] if isinstance(weight, torch.Tensor) else 0,
                          logits.device)

    if tp_group is None:
        local_checks()
        if vocab_start not in (None, 0):
            raise ValueError("vocab_start needs tp_group (a vocabulary shard needs its group)")
        v = logits.shape[-1]
        if target is not None:
            _check_weight(weight, v, logits.device)
            scan = getattr(picked[0], "target_scan", None)
            if target_check is not None and weight is None:
                # (class weights are gathered by target on the host side: checked first)
                target_check.start(target, v, ignore_index, scan=scan)
            else:
                _check_target_range(target, v, ignore_index, scan=scan)
        return logits, target, weight, None, 0, v, picked[0]

    # class weights under TP: the whole [V] vector, or each rank's slice shaped like its
    # shard's columns (gathered into the whole vector below)
    w_sharded = (isinstance(logits, torch.Tensor) and logits.dim() >= 1
                 and distributed.weight_is_sharded(weight, logits.shape[-1], tp_group))
    codes = {"ce": distributed.OP_CROSS_ENTROPY,
             "ce_smoothed": distributed.OP_CROSS_ENTROPY_SMOOTHED,
             "entropy": distributed.OP_ENTROPY}
    syncing = _v.syncing()
    fingerprint = 0
    if syncing:
        fingerprint = distributed.options_fingerprint(
            *map(_fp, options), _backend_name(backend, logits),
            repr(getattr(logits, "dtype", None)))
    start, vocab_size = distributed.tp_call_layout(
        tp_group, op=codes[op], logits=logits, vocab_start=u.vocab_start,
        vocab_size=u.vocab_size, target=target, ignore_index=ignore_index, weight=weight,
        # (not while torch.compile traces: the group's validation reads the gathered header
        # on the host, as the single-device target check does, which is skipped there too)
        local_checks=local_checks, validate=syncing,
        need_vocab_size=op == "ce_smoothed" and weight is None,
        options=fingerprint, weight_sharded=w_sharded)
    if w_sharded:
        weight = distributed.gather_weight(weight, tp_group, start, vocab_size)
    if weight is not None:
        _check_weight(weight, vocab_size, logits.device)
        if start + logits.shape[-1] > vocab_size:
            raise ValueError(f"this rank's shard [{start}, {start + logits.shape[-1]}) lies "
                             f"outside the class-weight vector of length {vocab_size}")
    return logits, target, weight, tp_group, start, vocab_size, picked[0]


# ---------------------------------------------------------------------------- API


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: Union[None, float, torch.Tensor] = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    tp_group=None,
    vocab_start: Optional[int] = None,
    inplace_backward: bool = False,
    return_aux: bool = False,
    backend: str = "auto",
    differentiable_lse: bool = False,
) -> Union[torch.Tensor, CrossEntropyOutput]:
    """Cross-entropy with label smoothing, class weights, z-loss, softcap, in fp32.

    Args:
        logits: [..., V_local] fp32/bf16/fp16, any strides; with ``tp_group`` this rank's
            columns [vocab_start, vocab_start + V_local) of the vocabulary (or a DTensor
            sharded on its last dim).
        target: [...] int64/int32 global class ids (``ignore_index`` rows are skipped).
        weight: optional [V] class weights (the whole vocabulary); under TP either that
            vector on every rank or each rank's slice [V_local], shaped like its shard's
            columns (gathered with one all-reduce).
        ignore_index: target value whose rows give 0 loss and 0 gradient.
        reduction: "none" (per row, fp32, shaped like target), "sum" or "mean" (over
            non-ignored rows, or over their target weights; 0 when all are ignored).
        normalizer: divide the sum by this (float or 0-d tensor) instead of the mean count.
        label_smoothing: a in [0, 1], uniform over all V classes (F.cross_entropy's).
        z_loss: coefficient of lse^2 added per row.
        softcap: z = softcap * tanh(logit_scale * x / softcap) when set.
        logit_scale: z = logit_scale * x (before the softcap).
        tp_group: process group over which the vocabulary is sharded (any rank order of
            the shards; uneven shards need ``vocab_start``). The result is the same on every
            rank; each rank gets the gradient of its own columns. Ranks exchange one
            all-gather of a few floats per token in the forward (with validation on, one
            more small all-gather checks the layout, N and the targets on every rank);
            the backward communicates nothing. DTensor logits sharded on the last dim
            need no tp_group: the result is a plain tensor.
        vocab_start: first global column of this rank's shard (default rank * V_local).
        inplace_backward: write the gradient into the logits buffer (saves N x V memory;
            the logits' contents are gone afterwards).
        return_aux: return CrossEntropyOutput(loss, lse, z_loss, accuracy).
        backend: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" or "torch".
        differentiable_lse: with ``return_aux``, the lse carries gradient (d lse / dz_j = p_j,
            through softcap and logit_scale), for regularisers of your own; it costs one
            more read of the logits in the forward and one in the backward. Not with
            ``inplace_backward``.
    Returns:
        The loss, fp32: a scalar, or shaped like ``target`` for reduction="none"; with
        ``return_aux`` a CrossEntropyOutput.
    """
    return _cross_entropy(
        logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
        normalizer=normalizer, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        logit_scale=logit_scale, tp_group=tp_group, vocab_start=vocab_start,
        inplace_backward=inplace_backward, return_aux=return_aux, backend=backend,
        differentiable_lse=differentiable_lse)


def _cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: Union[None, float, torch.Tensor] = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    tp_group=None,
    vocab_start: Optional[int] = None,
    inplace_backward: bool = False,
    return_aux: bool = False,
    backend: str = "auto",
    differentiable_lse: bool = False,
    extra_checks=None,
) -> Union[torch.Tensor, CrossEntropyOutput]:
    """:func:`cross_entropy`, with ``extra_checks`` (a callable) run among the option
    checks (inside the shared check under TP)."""
    def option_checks():
        _check_options(ignore_index=ignore_index, reduction=reduction, normalizer=normalizer,
                       label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                       logit_scale=logit_scale, backend=backend)
        _v.check_flag(inplace_backward, "inplace_backward")
        _v.check_flag(return_aux, "return_aux")
        _v.check_flag(differentiable_lse, "differentiable_lse")
        if extra_checks is not None:
            extra_checks()
        if differentiable_lse and inplace_backward:
            raise ValueError("differentiable_lse needs the logits after the forward: it cannot "
                             "be combined with inplace_backward=True")

    smoothed = isinstance(label_smoothing, (int, float)) and label_smoothing > 0
    check = _v.TargetCheck(defer=not inplace_backward)
    logits, target, weight, group, start, vocab_size, be = _resolve_tp(
        logits, tp_group, vocab_start, target=target, weight=weight, ignore_index=ignore_index,
        op="ce_smoothed" if smoothed else "ce",
        options=(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale,
                 normalizer, inplace_backward, return_aux, differentiable_lse),
        option_checks=option_checks, backend=backend,
        target_check=check)
    opts = LossOptions(ignore_index=ignore_index, reduction=reduction,
                       label_smoothing=float(label_smoothing), z_loss=float(z_loss),
                       softcap=None if softcap is None else float(softcap),
                       logit_scale=float(logit_scale))
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    plan = _ag.Plan(opts=opts, backend=be, vocab_size=vocab_size, vocab_start=start,
                    group=group, normalizer=normalizer, inplace=bool(inplace_backward),
                    need_grad=need_grad, need_aux=bool(return_aux), target_counts=check.counts)
    loss, lse, zl, acc = _ag.apply(_ag.CrossEntropyFunction, plan, logits, target, weight)
    check.finish()
    if return_aux:
        if differentiable_lse:
            # a second read of the logits (and one in the backward) buys an lse that carries
            # gradient d lse / dz_j = p_j, for regularisers built on it
            lse = _ag.apply(_ag.LseFunction, plan, logits).reshape(lse.shape)
        return CrossEntropyOutput(loss, lse, zl, acc)
    return loss


def logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    logit_scale: float = 1.0,
    ignore_index: int = -100,
    tp_group=None,
    vocab_start: Optional[int] = None,
    inference_only: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """log softmax(logit_scale * logits)[target] per row, fp32, differentiable.

    Args:
        logits: [..., V_local] (a vocabulary shard with ``tp_group``).
        target: [...] int64/int32 global ids; ``ignore_index`` rows give 0 and no gradient.
        inference_only: keep nothing for backward (RL scoring); the result has no graph.
    Returns:
        [...] fp32 log-probabilities of the targets.
    """
    def checks():
        _v.check_flag(inference_only, "inference_only")

    kw = dict(ignore_index=ignore_index, reduction="none", logit_scale=logit_scale,
              tp_group=tp_group, vocab_start=vocab_start, backend=backend, extra_checks=checks)
    # (a non-bool inference_only is raised inside the call's checks, on every TP rank)
    if inference_only is True:
        with torch.no_grad():
            return 0.0 - _cross_entropy(logits, target, **kw)
    # 0 - loss rather than -loss: ignored rows give +0.0, not -0.0
    return 0.0 - _cross_entropy(logits, target, **kw)


def entropy(
    logits: torch.Tensor,
    *,
    logit_scale: float = 1.0,
    tp_group=None,
    vocab_start: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Entropy of softmax(logit_scale * logits) per row, fp32, differentiable.

    Args:
        logits: [..., V_local] (a vocabulary shard with ``tp_group``; ``vocab_start`` is
            accepted for symmetry and not needed).
    Returns:
        [...] fp32 entropies (natural log).
    """
    def option_checks():
        _check_options(ignore_index=-100, reduction="none", normalizer=None,
                       label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=logit_scale,
                       backend=backend)

    logits, _, _, group, start, vocab_size, be = _resolve_tp(
        logits, tp_group, vocab_start, op="entropy", options=(logit_scale,),
        option_checks=option_checks, backend=backend)
    opts = LossOptions(reduction="none", logit_scale=float(logit_scale))
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    plan = _ag.Plan(opts=opts, backend=be, vocab_size=vocab_size, vocab_start=start,
                    group=group, need_grad=need_grad)
    return _ag.apply(_ag.EntropyFunction, plan, logits)
