"""NeMo Automodel's cross-entropy losses, on the fusedce core.

Drop-in for ``nemo_automodel.components.loss.te_parallel_ce`` (``TEParallelCrossEntropy``,
``CrossEntropyFunction``, ``parallel_cross_entropy``, ``HAVE_TE_PARALLEL_CE``,
``MISSING_TE_PARALLEL_CE_MSG``) and ``nemo_automodel.components.loss.chunked_ce``
(``ChunkedCrossEntropy``, ``compute_cross_entropy``, ``_compiled_compute_cross_entropy``).
For logits [B, T, V] and labels [B, T], with rows whose label is ``ignore_index`` (or whose
``mask`` is 0) left out,

    loss_row = lse - x_t,      lse = log sum_j exp(x_j)      (fp32)
    "sum":  sum of loss_row (the default of both classes)
    "mean": sum / number of counted rows (0 when there are none)
    "none": loss_row per position, shaped like labels
    num_label_tokens = n ("sum" only): sum / n, and a zero loss (with its graph) when n = 0

all computed by :func:`fusedce.cross_entropy` (its torch backend keeps at most one fp32
chunk of logits; its Triton backend reads the bf16 logits once more for the gradient).

Differences from NeMo Automodel (the signatures and results are the same):

* ``mask`` never writes into the caller's ``labels`` (the originals ``masked_fill_`` them in
  place); the masked labels are a new tensor.
* ``TEParallelCrossEntropy``: no host sync in the computation (``num_label_tokens == 0``
  is decided on the device for tensors; the core's default input validation syncs once,
  ``fusedce.set_validation(False)`` removes it); never unavailable, so
  ``HAVE_TE_PARALLEL_CE`` is True; an invalid ``reduction`` raises ValueError at
  construction instead of after computing the loss.
  Vocabulary shards may be uneven: DTensor logits carry their own column ranges, and a
  keyword-only ``vocab_start`` gives this rank's first column for plain tensors (default,
  as TE: rank * V_local).
* ``ChunkedCrossEntropy``: ``chunk_len`` is accepted and validated; the core chooses its own
  row chunks (bounded fp32 memory whatever the vocabulary). The default "sum" path never
  compiles, as in Automodel; ``compile=True`` with another reduction uses
  ``_compiled_compute_cross_entropy`` (created lazily, falling back to eager with one
  warning when compilation fails). "mean" is the true mean over counted tokens (the
  original sums per-chunk means) and "none" works for any length (the original's chunk
  loop cannot add per-chunk vectors of different lengths). ``num_label_tokens = 0`` gives
  a zero loss instead of NaN.
* ``compute_cross_entropy`` takes the classes on the last dim of any [..., V] logits
  (``F.cross_entropy`` would read dim 1 of a 3-D tensor as the classes).
"""

from __future__ import annotations

import threading
import warnings
from typing import Callable, Optional, Union

import torch

import fusedce as _fce

from ..spec import InputError
from ._common import (
    check_choice,
    divide_by_count,
    local_logits,
    masked_labels,
    plain_tensor,
    target_like,
)
from .transformer_engine import CrossEntropyFunction, parallel_cross_entropy

__all__ = [
    "TEParallelCrossEntropy",
    "CrossEntropyFunction",
    "parallel_cross_entropy",
    "HAVE_TE_PARALLEL_CE",
    "MISSING_TE_PARALLEL_CE_MSG",
    "ChunkedCrossEntropy",
    "compute_cross_entropy",
    "_compiled_compute_cross_entropy",
]

HAVE_TE_PARALLEL_CE = True
MISSING_TE_PARALLEL_CE_MSG = ("fusedce's TE-compatible parallel cross entropy is always "
                              "available (pure PyTorch on the CPU, Triton on CUDA).")

_REDUCTIONS = ("none", "mean", "sum")
Count = Union[None, int, float, torch.Tensor]


def _shape_of(labels) -> tuple:
    """The caller's labels shape ("none" losses come back in it), before any reshaping."""
    return tuple(labels.shape) if isinstance(labels, torch.Tensor) else ()


def _prepare(logits: torch.Tensor, labels: torch.Tensor, mask: Optional[torch.Tensor],
             ignore_index: int) -> torch.Tensor:
    """Labels on the logits' device, viewed with the logits' leading shape, masked."""
    labels = plain_tensor(labels)
    if not isinstance(labels, torch.Tensor):
        raise InputError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.device != logits.device:
        labels = labels.to(logits.device)
    return target_like(masked_labels(labels, mask, ignore_index), logits, "labels")


class TEParallelCrossEntropy:
    """Tensor-parallel cross entropy with TE's semantics (see the module docstring).

    Args:
        ignore_index: label value whose positions are left out. Defaults to -100.
        reduction: "sum" (default), "mean" or "none".
        tp_group: the process group the vocabulary is split over (None: one device, or the
            mesh of DTensor logits sharded on the vocabulary).
        vocab_start: keyword-only extension: this rank's first global column, for uneven
            shards (default: rank * V_local, as TE).
    """

    def __init__(self, ignore_index: int = -100, reduction: str = "sum",
                 tp_group: Optional[torch.distributed.ProcessGroup] = None, *,
                 vocab_start: Optional[int] = None):
        check_choice(reduction, _REDUCTIONS, "reduction")
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.tp_group = tp_group
        self.vocab_start = vocab_start

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor,
                 mask: Optional[torch.Tensor] = None, num_label_tokens: Count = None,
                 loss_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Loss of ``logits`` [B, T, V_local] (or a vocab-sharded DTensor) against ``labels``.

        Args:
            logits: [B, T, V_local] any float dtype and strides.
            labels: [B, T] global class ids.
            mask: optional [B, T], 1 = keep, 0 = leave out (labels are not modified).
            num_label_tokens: "sum" only: divide the sum by it (0 gives a zero loss).
            loss_weights: optional per-position multipliers shaped like labels ("sum" only).
        Returns:
            fp32 loss: a scalar ("sum", "mean") or shaped like labels ("none").
        """
        logits, group = local_logits(logits, self.tp_group)
        shape = _shape_of(labels)
        labels = _prepare(logits, labels, mask, self.ignore_index)
        start = self.vocab_start if group is not None else None

        def core(reduction: str, normalizer=None):
            return _fce.cross_entropy(logits, labels, ignore_index=self.ignore_index,
                                      reduction=reduction, normalizer=normalizer,
                                      tp_group=group, vocab_start=start)

        if loss_weights is not None:
            if self.reduction != "sum":
                raise ValueError("loss_weights is only supported when reduction is 'sum'")
            loss_weights = plain_tensor(loss_weights)
            if tuple(loss_weights.shape) != shape:
                raise ValueError(f"loss_weights.shape must match labels.shape, got "
                                 f"{tuple(loss_weights.shape)} and {shape}")
            rows = core("none") * loss_weights.reshape(labels.shape).to(
                device=logits.device, dtype=torch.float32)
            return divide_by_count(lambda normalizer: rows.sum() if normalizer is None
                                   else rows.sum() / normalizer, num_label_tokens)
        if self.reduction == "none":
            return core("none").reshape(shape)
        if self.reduction != "sum":
            return core(self.reduction)
        return divide_by_count(lambda normalizer: core("sum", normalizer), num_label_tokens)


# ---------------------------------------------------------------------------- chunked_ce


def compute_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                          reduction: str = "sum") -> torch.Tensor:
    """Cross entropy of ``logits`` [..., V] against ``targets`` [...], computed in fp32.

    Args:
        logits: [..., V] (classes on the last dim).
        targets: [...] class ids; ``ignore_index`` positions are left out.
        reduction: "sum" (default), "mean" or "none".
    Returns:
        fp32: the sum (default), the mean over counted positions, or per-position losses.
    """
    return _fce.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)


class _LazyCompiled:
    """``torch.compile(fn, dynamic=True)``, compiled on first call; eager if that fails.

    A failure is told apart from a user error by re-running eagerly: if the eager call
    raises too, that error propagates; otherwise compilation is abandoned with one warning.
    """

    def __init__(self, fn: Callable):
        self.fn = fn
        self.compiled: Optional[Callable] = None
        self.failed = False
        self.__name__ = f"compiled_{fn.__name__}"
        self.__doc__ = fn.__doc__

    def __call__(self, *args, **kwargs):
        if self.failed:
            return self.fn(*args, **kwargs)
        try:
            if self.compiled is None:
                self.compiled = torch.compile(self.fn, dynamic=True)
            return self.compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any compiler failure falls back
            out = self.fn(*args, **kwargs)
            self.failed = True
            warnings.warn(f"torch.compile of {self.fn.__name__} failed "
                          f"({type(exc).__name__}: {exc}); using the eager function",
                          RuntimeWarning, stacklevel=2)
            return out


_compiled_compute_cross_entropy: Optional[Callable] = None
_compile_lock = threading.Lock()


def _get_compiled_compute_cross_entropy() -> Callable:
    """Create ``_compiled_compute_cross_entropy`` on first use (as Automodel does)."""
    global _compiled_compute_cross_entropy
    with _compile_lock:
        if _compiled_compute_cross_entropy is None:
            _compiled_compute_cross_entropy = _LazyCompiled(compute_cross_entropy)
    return _compiled_compute_cross_entropy


class ChunkedCrossEntropy(torch.nn.Module):
    """Cross entropy summed over non-ignored tokens in fp32, memory-bounded.

    Args:
        chunk_len: accepted for compatibility (a positive int); the core picks its own row
            chunks.
        compile: for reductions other than "sum", compute through the lazily compiled
            ``_compiled_compute_cross_entropy`` (the "sum" path never compiles).
        ignore_index: label value whose positions are left out. Defaults to -100.
        reduction: "sum" (default), "mean" or "none".
        inplace_grad: keyword-only; write the logits' gradient into the logits' storage
            (saves one logits-sized buffer; the logits' values are gone after backward).
    """

    def __init__(self, chunk_len: int = 32, compile: bool = True, ignore_index: int = -100,
                 reduction: str = "sum", *, inplace_grad: bool = False):
        super().__init__()
        if isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len < 1:
            raise ValueError(f"chunk_len must be a positive int, got {chunk_len!r}")
        check_choice(reduction, _REDUCTIONS, "reduction")
        self.chunk_len = chunk_len
        self.compile = compile
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.inplace_grad = inplace_grad

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor,
                 mask: Optional[torch.Tensor] = None,
                 num_label_tokens: Count = None) -> torch.Tensor:
        """The seed's signature; runs ``forward`` through nn.Module (hooks included)."""
        return super().__call__(logits, labels, mask, num_label_tokens)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor,
                mask: Optional[torch.Tensor] = None,
                num_label_tokens: Count = None) -> torch.Tensor:
        """Loss of ``logits`` [B, T, V] against ``labels`` [B, T].

        Args:
            logits: [B, T, V] (any [..., V]) float logits, any strides.
            labels: [B, T] class ids (or flat, one per row).
            mask: optional, 1 = keep, 0 = leave out (labels are not modified).
            num_label_tokens: "sum" only: divide the sum by it (0 gives a zero loss).
        Returns:
            fp32: the sum over counted tokens (default), their mean, or per-token losses
            shaped like ``labels`` ("none").
        """
        shape = _shape_of(labels)
        labels = _prepare(logits, labels, mask, self.ignore_index)
        # created on the first call with compile=True, as Automodel does (the "sum" path
        # runs the core and does not call it)
        compiled = _get_compiled_compute_cross_entropy() if self.compile else None
        if self.reduction == "sum":
            return divide_by_count(
                lambda normalizer: _fce.cross_entropy(
                    logits, labels, ignore_index=self.ignore_index, reduction="sum",
                    normalizer=normalizer, inplace_backward=self.inplace_grad),
                num_label_tokens)
        if num_label_tokens is not None:
            raise ValueError("num_label_tokens is only supported when reduction is 'sum'")
        fn = compiled if compiled is not None else compute_cross_entropy
        out = fn(logits, labels, self.ignore_index, self.reduction)
        return out.reshape(shape) if self.reduction == "none" else out

    def extra_repr(self) -> str:
        return (f"chunk_len={self.chunk_len}, compile={self.compile}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}")
