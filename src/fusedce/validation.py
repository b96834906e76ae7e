"""Every argument check of the public functions, and the validation switch.

Checks raise before any kernel runs, naming the argument: :class:`fusedce.InputError` (both a
TypeError and a ValueError) for a wrong type or dtype, ValueError for a wrong value. The
checks that read device values (the target range, a tensor normalizer, the TP layout) need
a host sync; they follow the validation switch:

* :func:`set_validation` sets the process default (``FUSEDCE_VALIDATE=0`` starts with it off);
* ``with validation(False):`` overrides it in the current thread or asyncio task only
  (a ``contextvars`` variable), so one thread's block never turns another's checks off.

While torch.compile traces or a CUDA graph is being captured the syncing checks are skipped.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import threading
from typing import Optional

import torch

from .spec import BACKENDS, REDUCTIONS, InputError

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32)

# the largest finite fp32 value and the smallest positive one (a subnormal): options are
# used in fp32 inside the kernels, where a larger value is inf and a smaller one 0
FP32_MAX = 3.4028234663852886e38
FP32_TINY = 1.401298464324817e-45

_DEFAULT = os.environ.get("FUSEDCE_VALIDATE", "1").strip().lower() not in ("0", "false", "no")
_LOCAL: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar("fusedce_validation",
                                                                       default=None)


# ---------------------------------------------------------------------------- the switch


def set_validation(enabled: bool) -> None:
    """Set the process default of the checks that need a device sync (target range, tensor
    normalizer, TP layout).

    On by default; ``FUSEDCE_VALIDATE=0`` in the environment starts with them off. Shape,
    dtype and option checks never sync and always run. Turn validation off for production
    speed and for CUDA-graph capture. A :func:`validation` block overrides the default in
    its own thread or task only. Under tensor parallelism the checks (layout, N, targets,
    options and each rank's own argument checks) run on every rank through one small
    all-gather, so bad input raises the same exception on every rank; with validation off
    a rank's own argument error raises on that rank alone while the others wait in the next
    collective, and uneven layouts given by ``vocab_start`` are remembered per group: call
    :func:`fusedce.distributed.clear_layout_cache` on every rank when they change.
    """
    global _DEFAULT
    _DEFAULT = check_flag(enabled, "enabled")


def validation_enabled() -> bool:
    """Whether the device-syncing checks run here (this thread or task's override, else the
    process default)."""
    local = _LOCAL.get()
    return _DEFAULT if local is None else local


@contextlib.contextmanager
def validation(enabled: bool):
    """Turn the device-syncing checks on or off inside the block, for the current thread or
    asyncio task only (other threads keep the process default of :func:`set_validation`)."""
    token = _LOCAL.set(check_flag(enabled, "enabled"))
    try:
        yield
    finally:
        _LOCAL.reset(token)


def compiling() -> bool:
    """Whether host reads of device values are impossible here: torch.compile is tracing,
    or a CUDA graph is being captured (the syncing checks are then skipped, as documented:
    validate eagerly, or keep the inputs in range)."""
    comp = getattr(torch, "compiler", None)
    if comp is not None and hasattr(comp, "is_compiling") and comp.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def syncing() -> bool:
    """Whether the device-syncing checks run now (validation on and not tracing / capturing;
    the tracing test first, so that Dynamo never traces the context variable, and the CUDA
    capture test last: a few microseconds that a call with validation off does not pay)."""
    if torch.compiler.is_compiling() or not validation_enabled():
        return False
    return not compiling()


# ---------------------------------------------------------------------------- scalars


def finite(v) -> bool:
    """math.isfinite for a Python number, written so that torch.compile with dynamic=True can
    trace it (Dynamo makes float arguments symbolic, and math.isfinite returns no tensor)."""
    return v == v and v != math.inf and v != -math.inf


def check_flag(v, name: str) -> bool:
    """A flag must be a bool (a string such as "False" is truthy and would flip it)."""
    if isinstance(v, bool):
        return v
    if type(v).__name__ == "bool_" and type(v).__module__ == "numpy":
        return bool(v)
    raise InputError(f"{name} must be a bool, got {v!r}")


def as_float(v, name: str) -> float:
    """A real option as a float, finite in fp32 (where the kernels use it)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InputError(f"{name} must be a number, got {v!r}")
    try:
        f = float(v)
    except OverflowError:
        raise ValueError(f"{name} must be finite in float32, got an integer of "
                         f"{len(str(abs(v)))} digits") from None
    if not (finite(f) and -FP32_MAX <= f <= FP32_MAX):
        raise ValueError(f"{name} must be finite in float32 (|{name}| <= {FP32_MAX:.7g}), "
                         f"got {v!r}")
    return f


def _positive(f: float, name: str, given) -> None:
    if not f >= FP32_TINY:
        raise ValueError(f"{name} must be > 0 in float32 (>= {FP32_TINY:.3g}), got {given!r}")


def _reciprocal_finite(f: float, name: str, given, what: str) -> None:
    if not f >= 1.0 / FP32_MAX:
        raise ValueError(f"{name} must be >= {1.0 / FP32_MAX:.4g}: {what} is used in float32 and "
                         f"would overflow, got {given!r}")


# ---------------------------------------------------------------------------- options


def check_ignore_index(ignore_index) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise InputError(f"ignore_index must be an int, got {ignore_index!r}")
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")


def check_reduction(reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_normalizer(normalizer, reduction) -> None:
    """None, a number or a 0-d real tensor, positive with a reciprocal finite in fp32 (a
    tensor's value is read, a device sync, only with validation on)."""
    if normalizer is None:
        return
    if reduction == "none":
        raise ValueError("normalizer cannot be combined with reduction='none'")
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a number or a 0-d tensor, got shape "
                             f"{tuple(normalizer.shape)}")
        if normalizer.dtype == torch.bool or normalizer.is_complex():
            raise InputError(f"normalizer must be a real number, got {normalizer.dtype}")
        if normalizer.is_meta:
            raise InputError("normalizer is a meta tensor (it holds no value)")
        if syncing():
            v = float(normalizer.detach().reshape(()))
            if not (finite(v) and v > 0):
                raise ValueError(f"normalizer must be positive and finite, got {v!r}")
            as_float(v, "normalizer")
            _reciprocal_finite(v, "normalizer", v, "1 / normalizer")
        return
    f = as_float(normalizer, "normalizer")
    if not f > 0:
        raise ValueError(f"normalizer must be positive and finite, got {normalizer!r}")
    _reciprocal_finite(f, "normalizer", normalizer, "1 / normalizer")


def check_label_smoothing(label_smoothing) -> None:
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise InputError(f"label_smoothing must be a number, got {label_smoothing!r}")
    if not 0.0 <= label_smoothing <= 1.0:  # (1: the uniform target, as F.cross_entropy)
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing!r}")


def check_z_loss(z_loss) -> None:
    f = as_float(z_loss, "z_loss")
    if not (f >= 0.0 and 2.0 * f <= FP32_MAX):
        raise ValueError(f"z_loss must be a finite number >= 0 (2 * z_loss finite in float32), "
                         f"got {z_loss!r}")


def check_transform(softcap, logit_scale) -> None:
    """logit_scale > 0 and softcap None or > 0, with 1 / softcap and logit_scale / softcap
    finite in fp32 (the kernels' factors)."""
    scale = as_float(logit_scale, "logit_scale")
    _positive(scale, "logit_scale", logit_scale)
    if softcap is None:
        return
    cap = as_float(softcap, "softcap")
    _positive(cap, "softcap", softcap)
    _reciprocal_finite(cap, "softcap", softcap, "1 / softcap")
    if not scale / cap <= FP32_MAX:
        raise ValueError(f"logit_scale / softcap must be finite in float32, got "
                         f"{logit_scale!r} / {softcap!r}")


def check_backend_name(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_options(*, ignore_index, reduction, normalizer, label_smoothing, z_loss, softcap,
                  logit_scale, backend) -> None:
    """The loss options of :func:`fusedce.cross_entropy` (and of every entry point)."""
    check_ignore_index(ignore_index)
    check_reduction(reduction)
    check_normalizer(normalizer, reduction)
    check_label_smoothing(label_smoothing)
    check_z_loss(z_loss)
    check_transform(softcap, logit_scale)
    check_backend_name(backend)


# ---------------------------------------------------------------------------- tensors


def check_tensor(x, name: str, what: str = "torch.Tensor") -> None:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a {what}, got {type(x).__name__}")
    if x.is_meta:
        raise InputError(f"{name} is a meta tensor (it holds no data): fusedce computes values")


def check_logits(logits, name: str = "logits") -> None:
    check_tensor(logits, name)
    if logits.dtype not in FLOAT_DTYPES:
        raise InputError(f"{name} must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (the vocabulary)")
    if logits.shape[-1] < 1:
        raise ValueError(f"{name} has an empty vocabulary dimension (shape {tuple(logits.shape)})")


def check_target(target, lead_shape, device, name: str = "target") -> None:
    check_tensor(target, name)
    if target.dtype not in INT_DTYPES:
        raise InputError(f"{name} must be int64 or int32, got {target.dtype}")
    if tuple(target.shape) != tuple(lead_shape):
        raise ValueError(f"{name} has shape {tuple(target.shape)} but the logits' leading "
                         f"dimensions are {tuple(lead_shape)}")
    if target.device != device:
        raise ValueError(f"{name} is on {target.device} but the logits are on {device}")


def check_group(group, name: str = "tp_group") -> None:
    """None or a torch.distributed process group (DeviceMesh users pass mesh.get_group())."""
    if group is None or compiling():
        return
    pg = getattr(torch.distributed, "ProcessGroup", None) if torch.distributed.is_available() \
        else None
    if pg is None or not isinstance(group, pg):
        raise InputError(f"{name} must be a torch.distributed ProcessGroup or None, got "
                         f"{type(group).__name__}")


def check_weight(weight, vocab_size: int, device, name: str = "weight") -> None:
    if weight is None:
        return
    check_tensor(weight, name, "torch.Tensor or None")
    if not weight.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor, got {weight.dtype}")
    if tuple(weight.shape) != (vocab_size,):
        raise ValueError(f"{name} must have shape ({vocab_size},) (the whole vocabulary), got "
                         f"{tuple(weight.shape)}")
    if weight.device != device:
        raise ValueError(f"{name} is on {weight.device} but the logits are on {device}")


def check_target_range(target: torch.Tensor, vocab_size: int, ignore_index: int,
                       name: str = "target", scan=None) -> Optional[torch.Tensor]:
    """Class ids in [0, V) or ignore_index (a device sync: with validation on only; under
    torch.compile a data-dependent raise would break the graph and a CUDA graph capture
    cannot sync, so it is skipped there).

    ``scan``: the backend's target scan (``target_scan(t, ignore_index)``: int64 [count,
    lo, hi] on the device from one kernel, or None where it declines), or None. Returns that
    scan when one was taken (the caller reuses its count), else None."""
    if target.numel() == 0 or not syncing():
        return None
    t = target.reshape(-1)
    if scan is None and t.device.type == "cpu":
        # on CPUs host reads are free: the targets' own extremes settle the common call (no
        # id outside [0, V), ignored ones included) in one small op
        lo, hi = (int(v) for v in torch.aminmax(t))
        if lo >= 0 and hi < vocab_size:
            return None
    counts, ext = _scanned_extremes(t, ignore_index, scan)
    # one 16-byte read on the hot path (this check runs on every call)
    lo, hi = ext.tolist()
    if lo < 0 or hi >= vocab_size:
        _raise_out_of_range(t, vocab_size, ignore_index, name)
    return counts


def _extremes(t: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """[min, max] of the flat targets ``t``, ignored rows counted as class 0."""
    return torch.stack(torch.aminmax(torch.where(t == ignore_index, 0, t)))


def _scanned_extremes(t: torch.Tensor, ignore_index: int, scan):
    """(the backend's scan of the flat targets ``t`` or None, int64 [lo, hi] on their
    device): the scan's extremes where ``scan`` gives one, else torch ops'."""
    counts = scan(t, ignore_index) if scan is not None else None
    if counts is None:
        return None, _extremes(t, ignore_index).long()
    return counts, counts[1:]


def _raise_out_of_range(t: torch.Tensor, vocab_size: int, ignore_index: int, name: str):
    bad = (t != ignore_index) & ((t < 0) | (t >= vocab_size))
    idx = int(bad.nonzero()[0, 0])
    raise ValueError(f"{name} holds {int(t[idx])} at flat position {idx}: class ids must lie "
                     f"in [0, {vocab_size}) or equal ignore_index={ignore_index}")


_PINNED = threading.local()


def _pinned_pair(device: torch.device):
    """This thread's two-int64 pinned host buffer for ``device`` and its event, made once: a
    pinned tensor freed while its stream still runs cannot be reused by the caching host
    allocator, so a fresh one per call would page-lock new memory (a slow, synchronizing
    call) every time; a reused event saves its creation on every call."""
    bufs = getattr(_PINNED, "bufs", None)
    if bufs is None:
        bufs = _PINNED.bufs = {}
    pair = bufs.get(device)
    if pair is None:
        pair = bufs[device] = (torch.empty(2, dtype=torch.int64, pin_memory=True),
                               torch.cuda.Event())
    return pair


class TargetCheck:
    """The target-range check of one call. With ``defer`` (calls that write nothing the user
    can see before they return) it runs in two halves: :meth:`start` queues the extremes of
    the targets and their copy to pinned host memory (no host sync); :meth:`finish` reads
    them and raises. Run between the two, the loss kernels queue behind the check instead of
    waiting for the host's read. Only for CUDA targets; elsewhere, and without ``defer``,
    :meth:`start` checks at once (:func:`check_target_range`) and :meth:`finish` does
    nothing; with validation off both do nothing. The kernels must read a bad target safely
    (masked), which every backend's row-target lookup does.

    ``counts``: the backend's target scan when :meth:`start` took one (int64 [count, lo, hi]
    on the device), for the caller to reuse its count; else None."""

    __slots__ = ("defer", "counts", "_pending")

    def __init__(self, defer: bool = True):
        self.defer = defer
        self.counts: Optional[torch.Tensor] = None
        self._pending = None

    def start(self, target: torch.Tensor, vocab_size: int, ignore_index: int,
              name: str = "target", scan=None) -> None:
        """Queue the check (``scan`` as in :func:`check_target_range`)."""
        if target.numel() == 0 or not syncing():
            return
        if not (self.defer and target.is_cuda):
            self.counts = check_target_range(target, vocab_size, ignore_index, name, scan)
            return
        t = target.reshape(-1)
        self.counts, ext = _scanned_extremes(t, ignore_index, scan)
        host, ready = _pinned_pair(target.device)
        host.copy_(ext, non_blocking=True)
        # (the copy runs on the target device's current stream, which need not be the
        # current device's)
        ready.record(torch.cuda.current_stream(target.device))
        self._pending = (t, vocab_size, ignore_index, name, host, ready)

    def finish(self) -> None:
        """Read the queued extremes (waiting for them alone, not for later kernels) and raise
        where a target lies outside [0, V) and is not ignore_index."""
        if self._pending is None:
            return
        t, vocab_size, ignore_index, name, host, ready = self._pending
        self._pending = None
        ready.synchronize()
        lo, hi = host.tolist()
        if lo < 0 or hi >= vocab_size:
            _raise_out_of_range(t, vocab_size, ignore_index, name)


def widened(target: Optional[torch.Tensor], ignore_index: int) -> Optional[torch.Tensor]:
    """``target``, as int64 where it is int32 and ignore_index lies outside the int32 range:
    no int32 id can equal such an ignore_index, but compared in int32 it would wrap onto a
    real class id (2**32 -> 0) and drop that class's rows."""
    if (isinstance(target, torch.Tensor) and target.dtype == torch.int32
            and isinstance(ignore_index, int)
            and not -2**31 <= ignore_index < 2**31):
        return target.long()
    return target


def fingerprint_value(v):
    """An option as it enters the TP options fingerprint: numbers as floats (0 and 0.0 agree),
    tensors by value where readable, dtypes and backends by name, anything else by repr.
    Never raises: bad values are caught by the option checks, which run inside the shared
    check."""
    if isinstance(v, torch.Tensor):
        try:
            if v.numel() == 1 and not v.is_meta and not compiling():
                return float(v.detach().reshape(()))
        except Exception:  # noqa: BLE001 - a value that cannot be read is fingerprinted by kind
            pass
        return "tensor"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        try:
            return float(v) if float(v) == v else v  # (ints past 2**53 stay exact)
        except OverflowError:
            return v
    return repr(v)
