"""nn.Module forms of the public functions (options fixed at construction).

CrossEntropyLoss(**options)(logits, target) == cross_entropy(logits, target, **options).
LinearCrossEntropyLoss(**options)(hidden, weight, target, bias)
    == linear_cross_entropy(hidden, weight, target, bias=bias, **options).
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch

from .functional import _check_options, cross_entropy
from .linear import _check_chunk_size, linear_cross_entropy

_CHECKED = ("ignore_index", "reduction", "normalizer", "label_smoothing", "z_loss", "softcap",
            "logit_scale", "backend")


def _checked_options(fn, options: dict, tensor_option: str) -> dict:
    """``options`` after the checks a call would make, at construction: an unknown name is a
    TypeError, a bad value the ValueError / TypeError the function raises."""
    params = inspect.signature(fn).parameters
    names = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(options) - (names - {tensor_option, "bias"}))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for {fn.__name__}")
    values = {n: options.get(n, params[n].default) for n in _CHECKED}
    _check_options(**values)
    return options


class CrossEntropyLoss(torch.nn.Module):
    """Module form of :func:`fusedce.cross_entropy`; ``weight`` is registered as a buffer.

    Args:
        **options: any keyword option of :func:`fusedce.cross_entropy`.
    """

    def __init__(self, *, weight: Optional[torch.Tensor] = None, **options):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.options = _checked_options(cross_entropy, options, "weight")

    def forward(self, logits: torch.Tensor, target: torch.Tensor):
        """logits [..., V], target [...] -> the loss (see cross_entropy)."""
        return cross_entropy(logits, target, weight=self.weight, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class LinearCrossEntropyLoss(torch.nn.Module):
    """Module form of :func:`fusedce.linear_cross_entropy` (the loss from hidden states and
    the LM head, never materialising the logits); ``class_weight`` is registered as a buffer.

    Args:
        **options: any keyword option of :func:`fusedce.linear_cross_entropy`.
    """

    def __init__(self, *, class_weight: Optional[torch.Tensor] = None, **options):
        super().__init__()
        self.register_buffer("class_weight", class_weight, persistent=False)
        self.options = _checked_options(linear_cross_entropy, options, "class_weight")
        _check_chunk_size(options.get("chunk_size", "auto"))

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: Optional[torch.Tensor] = None):
        """hidden [..., D], weight [V_local, D], target [...], bias [V_local] -> the loss."""
        return linear_cross_entropy(hidden, weight, target, bias=bias,
                                    class_weight=self.class_weight, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
