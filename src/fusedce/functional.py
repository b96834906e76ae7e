"""Public functions: argument checks, backend choice, dispatch to the autograd functions.

    cross_entropy(x, t) = reduce_rows[ (1 - a) * w_t * (lse - z_t)
                                       + (a / V) * sum_j w_j * (lse - z_j) + zl * lse^2 ]
    logprobs(x, t)      = z_t - lse                      (fp32, 0 on ignored rows)
    entropy(x)          = lse - sum_j softmax(z)_j * z_j (fp32)

with z = softcap * tanh(logit_scale * x / softcap) (or logit_scale * x) and lse the
log-sum-exp of z over the whole (possibly vocab-sharded) vocabulary; see
:mod:`fusedce.spec`. Only this module validates user input.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Optional, Union

import torch

from . import autograd as _ag
from . import torch_backend
from .spec import BACKENDS, REDUCTIONS, CrossEntropyOutput, InputError, LossOptions

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INT_DTYPES = (torch.int64, torch.int32)

_VALIDATE = os.environ.get("FUSEDCE_VALIDATE", "1").strip().lower() not in ("0", "false", "no")


def set_validation(enabled: bool) -> None:
    """Turn the checks that need a device sync (target range, TP layout) on or off.

    On by default; ``FUSEDCE_VALIDATE=0`` in the environment starts with them off. Shape,
    dtype and option checks never sync and always run. Turn validation off for production
    speed and for CUDA-graph capture. Under tensor parallelism the checks (layout, N,
    targets, and each rank's own shape checks) run on every rank through one small
    all-gather, so bad input raises the same exception on every rank; with validation off
    a rank's own shape error raises on that rank alone while the others wait in the next
    collective, and uneven layouts given by ``vocab_start`` are remembered per group: call
    :func:`fusedce.distributed.clear_layout_cache` on every rank when they change.
    """
    global _VALIDATE
    _VALIDATE = bool(enabled)


def validation_enabled() -> bool:
    """Whether the device-syncing checks run."""
    return _VALIDATE


@contextlib.contextmanager
def validation(enabled: bool):
    """Context manager form of :func:`set_validation`."""
    global _VALIDATE
    old = _VALIDATE
    _VALIDATE = bool(enabled)
    try:
        yield
    finally:
        _VALIDATE = old


# ---------------------------------------------------------------------------- checks


def _check_logits(logits, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise InputError(f"{name} must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (the vocabulary)")
    if logits.shape[-1] < 1:
        raise ValueError(f"{name} has an empty vocabulary dimension (shape {tuple(logits.shape)})")


def _check_target(target, lead_shape, device, name: str = "target") -> None:
    if not isinstance(target, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in _INT_DTYPES:
        raise InputError(f"{name} must be int64 or int32, got {target.dtype}")
    if tuple(target.shape) != tuple(lead_shape):
        raise ValueError(f"{name} has shape {tuple(target.shape)} but the logits' leading "
                         f"dimensions are {tuple(lead_shape)}")
    if target.device != device:
        raise ValueError(f"{name} is on {target.device} but the logits are on {device}")


def _check_group(group, name: str = "tp_group") -> None:
    """None or a torch.distributed process group (DeviceMesh users pass mesh.get_group())."""
    if group is None or _compiling():
        return
    pg = getattr(torch.distributed, "ProcessGroup", None) if torch.distributed.is_available() \
        else None
    if pg is None or not isinstance(group, pg):
        raise InputError(f"{name} must be a torch.distributed ProcessGroup or None, got "
                         f"{type(group).__name__}")


def _finite(v) -> bool:
    """math.isfinite for a Python number, written so that torch.compile with dynamic=True can
    trace it (Dynamo makes float arguments symbolic, and math.isfinite returns no tensor)."""
    return v == v and v != math.inf and v != -math.inf


def _compiling() -> bool:
    """Whether host reads of device values are impossible here: torch.compile is tracing,
    or a CUDA graph is being captured (the syncing checks are then skipped, as documented:
    validate eagerly, or keep the inputs in range)."""
    comp = getattr(torch, "compiler", None)
    if comp is not None and hasattr(comp, "is_compiling") and comp.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check_target_range(target: torch.Tensor, vocab_size: int, ignore_index: int,
                        name: str = "target") -> None:
    # under torch.compile a data-dependent raise would break the graph, and a CUDA graph
    # capture cannot sync: the check is skipped there (validate eagerly, or keep the model's
    # targets in range)
    if not _VALIDATE or target.numel() == 0 or _compiling():
        return
    t = target.reshape(-1)
    bad = (t != ignore_index) & ((t < 0) | (t >= vocab_size))
    if bool(bad.any()):
        idx = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} holds {int(t[idx])} at flat position {idx}: class ids must lie "
                         f"in [0, {vocab_size}) or equal ignore_index={ignore_index}")


def _widened(target: Optional[torch.Tensor], ignore_index: int) -> Optional[torch.Tensor]:
    """``target``, as int64 where it is int32 and ignore_index lies outside the int32 range:
    no int32 id can equal such an ignore_index, but compared in int32 it would wrap onto a
    real class id (2**32 -> 0) and drop that class's rows."""
    if (isinstance(target, torch.Tensor) and target.dtype == torch.int32
            and isinstance(ignore_index, int)
            and not -2**31 <= ignore_index < 2**31):
        return target.long()
    return target


def _check_options(*, ignore_index, reduction, normalizer, label_smoothing, z_loss, softcap,
                   logit_scale, backend) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise InputError(f"ignore_index must be an int, got {ignore_index!r}")
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if normalizer is not None:
        if reduction == "none":
            raise ValueError("normalizer cannot be combined with reduction='none'")
        if isinstance(normalizer, torch.Tensor):
            if normalizer.numel() != 1:
                raise ValueError(f"normalizer must be a number or a 0-d tensor, got shape "
                                 f"{tuple(normalizer.shape)}")
            if normalizer.dtype == torch.bool or normalizer.is_complex():
                raise InputError(f"normalizer must be a real number, got {normalizer.dtype}")
            # its value needs a device sync: checked with the other syncing checks
            if _VALIDATE and not _compiling():
                v = float(normalizer.detach().reshape(()))
                if not (_finite(v) and v > 0):
                    raise ValueError(f"normalizer must be positive and finite, got {v!r}")
        elif isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)):
            raise InputError(f"normalizer must be a number or a 0-d tensor, got {normalizer!r}")
        elif not (_finite(normalizer) and normalizer > 0):
            raise ValueError(f"normalizer must be positive and finite, got {normalizer!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise InputError(f"label_smoothing must be a number, got {label_smoothing!r}")
    if not 0.0 <= label_smoothing <= 1.0:  # (1: the uniform target, as F.cross_entropy)
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing!r}")
    for name, v in (("z_loss", z_loss), ("softcap", softcap), ("logit_scale", logit_scale)):
        if isinstance(v, bool):
            raise InputError(f"{name} must be a number, got {v!r}")
    if not isinstance(z_loss, (int, float)) or not (_finite(z_loss) and z_loss >= 0.0):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    if softcap is not None and (not isinstance(softcap, (int, float))
                                or not (_finite(softcap) and softcap > 0.0)):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    if not isinstance(logit_scale, (int, float)) or not (_finite(logit_scale)
                                                         and logit_scale > 0.0):
        raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_weight(weight, vocab_size: int, device, name: str = "weight") -> None:
    if weight is None:
        return
    if not isinstance(weight, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor or None, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor, got {weight.dtype}")
    if tuple(weight.shape) != (vocab_size,):
        raise ValueError(f"{name} must have shape ({vocab_size},) (the whole vocabulary), got "
                         f"{tuple(weight.shape)}")
    if weight.device != device:
        raise ValueError(f"{name} is on {weight.device} but the logits are on {device}")


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pick_backend(backend: str, x: torch.Tensor):
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
        raise RuntimeError(f"backend='triton' is unavailable: {exc}") from exc
    return triton_backend


def _fp(v):
    """An option as it enters the TP options fingerprint: numbers as floats (0 and 0.0 agree),
    tensors by kind, anything else by repr (never raises: bad values are caught by the option
    checks, which run first)."""
    if isinstance(v, torch.Tensor):
        # (a 0-d normalizer: its value, read as the option checks read it, with validation)
        return float(v.detach().reshape(())) if v.numel() == 1 and not _compiling() \
            else "tensor"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v) if float(v) == v else v  # (ints past 2**53 stay exact)
    return repr(v)


def _resolve_tp(logits, tp_group, vocab_start, *, target=None, weight=None,
                ignore_index: int = -100, op: str = "ce", options: tuple = (),
                option_checks=None):
    """Check the tensors and resolve the vocabulary layout; unpacks DTensor inputs.

    Args:
        logits, tp_group, vocab_start, target, weight, ignore_index: as the public functions
            take them (target None for entropy).
        op: "ce", "ce_smoothed" (label smoothing: needs the exact global V) or "entropy".
        options: the loss options, which every rank of a TP group must share (validated).
        option_checks: the caller's option checks; under TP with validation they run inside
            the group's validation, so that a bad option on one rank raises on every rank
            instead of leaving the others waiting in a collective.
    Returns:
        (logits, target, weight, group, vocab_start, V): plain tensors, the group (None
        without TP), this shard's first column and the global vocabulary size. Without
        validation and with explicit uneven shards, V is only exact where it matters (label
        smoothing, class weights); elsewhere it does not enter the result.
    Under TP with validation on, every check runs on every rank through one all-gather
    (:func:`fusedce.distributed.check_tp`), so every rank raises the same exception.
    """
    from . import distributed

    _check_group(tp_group)
    if op != "entropy" and not isinstance(target, torch.Tensor):
        raise InputError(f"target must be a torch.Tensor, got {type(target).__name__}")
    u = distributed.unpack_dtensor(logits, tp_group, vocab_start, target, weight)
    logits, target, weight, tp_group = u.logits, _widened(u.target, ignore_index), u.weight, u.group
    if option_checks is None:
        def option_checks():
            return None
    if tp_group is None:
        option_checks()
        if vocab_start not in (None, 0):
            raise ValueError("vocab_start needs tp_group (a vocabulary shard needs its group)")
        _check_logits(logits)
        v = logits.shape[-1]
        if target is not None:
            _check_target(target, logits.shape[:-1], logits.device)
            _check_weight(weight, v, logits.device)
            _check_target_range(target, v, ignore_index)
        return logits, target, weight, None, 0, v

    # class weights under TP: the whole [V] vector, or each rank's slice shaped like its
    # shard's columns (gathered into the whole vector below)
    w_sharded = (isinstance(logits, torch.Tensor) and logits.dim() >= 1
                 and distributed.weight_is_sharded(weight, logits.shape[-1], tp_group))

    def local_checks():
        option_checks()
        _check_logits(logits)
        if target is not None:
            _check_target(target, logits.shape[:-1], logits.device)
        if weight is not None:
            if isinstance(weight, torch.Tensor) and weight.dim() != 1:
                raise ValueError(f"weight must be the whole [V] class-weight vector (or this "
                                 f"rank's [V_local] slice), got shape {tuple(weight.shape)}")
            # its length is checked against the global V once that is known
            _check_weight(weight, weight.shape[0] if isinstance(weight, torch.Tensor) else 0,
                          logits.device)

    codes = {"ce": distributed.OP_CROSS_ENTROPY,
             "ce_smoothed": distributed.OP_CROSS_ENTROPY_SMOOTHED,
             "entropy": distributed.OP_ENTROPY}
    start, vocab_size = distributed.tp_call_layout(
        tp_group, op=codes[op], logits=logits, vocab_start=u.vocab_start,
        vocab_size=u.vocab_size, target=target, ignore_index=ignore_index, weight=weight,
        # (not while torch.compile traces: the group's validation reads the gathered header
        # on the host, as the single-device target check does, which is skipped there too)
        local_checks=local_checks, validate=_VALIDATE and not _compiling(),
        need_vocab_size=op == "ce_smoothed" and weight is None,
        options=(distributed.options_fingerprint(*map(_fp, options))
                 if _VALIDATE and not _compiling() else 0),
        weight_sharded=w_sharded)
    if w_sharded:
        weight = distributed.gather_weight(weight, tp_group, start, vocab_size)
    if weight is not None:
        _check_weight(weight, vocab_size, logits.device)
        if start + logits.shape[-1] > vocab_size:
            raise ValueError(f"this rank's shard [{start}, {start + logits.shape[-1]}) lies "
                             f"outside the class-weight vector of length {vocab_size}")
    return logits, target, weight, tp_group, start, vocab_size


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
    Returns:
        The loss, fp32: a scalar, or shaped like ``target`` for reduction="none"; with
        ``return_aux`` a CrossEntropyOutput.
    """
    def option_checks():
        _check_options(ignore_index=ignore_index, reduction=reduction, normalizer=normalizer,
                       label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                       logit_scale=logit_scale, backend=backend)

    smoothed = isinstance(label_smoothing, (int, float)) and label_smoothing > 0
    logits, target, weight, group, start, vocab_size = _resolve_tp(
        logits, tp_group, vocab_start, target=target, weight=weight, ignore_index=ignore_index,
        op="ce_smoothed" if smoothed else "ce",
        options=(ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale,
                 normalizer), option_checks=option_checks)
    opts = LossOptions(ignore_index=ignore_index, reduction=reduction,
                       label_smoothing=float(label_smoothing), z_loss=float(z_loss),
                       softcap=None if softcap is None else float(softcap),
                       logit_scale=float(logit_scale))
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    plan = _ag.Plan(opts=opts, backend=_pick_backend(backend, logits), vocab_size=vocab_size,
                    vocab_start=start, group=group, normalizer=normalizer,
                    inplace=bool(inplace_backward), need_grad=need_grad,
                    need_aux=bool(return_aux))
    loss, lse, zl, acc = _ag.apply(_ag.CrossEntropyFunction, plan, logits, target, weight)
    if return_aux:
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
    # 0 - loss rather than -loss: ignored rows give +0.0, not -0.0
    if inference_only:
        with torch.no_grad():
            return 0.0 - cross_entropy(logits, target, ignore_index=ignore_index,
                                       reduction="none", logit_scale=logit_scale,
                                       tp_group=tp_group, vocab_start=vocab_start,
                                       backend=backend)
    return 0.0 - cross_entropy(logits, target, ignore_index=ignore_index, reduction="none",
                               logit_scale=logit_scale, tp_group=tp_group,
                               vocab_start=vocab_start, backend=backend)


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

    logits, _, _, group, start, vocab_size = _resolve_tp(logits, tp_group, vocab_start,
                                                         op="entropy", options=(logit_scale,),
                                                         option_checks=option_checks)
    opts = LossOptions(reduction="none", logit_scale=float(logit_scale))
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    plan = _ag.Plan(opts=opts, backend=_pick_backend(backend, logits), vocab_size=vocab_size,
                    vocab_start=start, group=group, need_grad=need_grad)
    return _ag.apply(_ag.EntropyFunction, plan, logits)
