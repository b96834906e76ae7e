"""fusedce: cross-entropy, log-probs, entropy and z-loss over huge vocabularies.

    loss = (1 - a) * w_t * (lse - z_t) + (a / V) * sum_j w_j * (lse - z_j) + zl * lse^2

per row, reduced by none/sum/mean/normalizer, computed in fp32 from per-row statistics
that combine across vocabulary blocks, chunks and tensor-parallel ranks (see spec.py);
log-probabilities and entropy from logits or from hidden states (linear_logprobs,
linear_entropy) for RL and preference training.
"""

from .functional import (
    cross_entropy,
    entropy,
    logprobs,
    set_validation,
    validation,
    validation_enabled,
)
from .linear import linear_cross_entropy, linear_entropy, linear_logprobs
from .modules import CrossEntropyLoss, LinearCrossEntropyLoss
from .spec import CrossEntropyOutput, InputError, LossOptions

__all__ = [
    "cross_entropy",
    "logprobs",
    "entropy",
    "CrossEntropyLoss",
    "linear_cross_entropy",
    "linear_logprobs",
    "linear_entropy",
    "LinearCrossEntropyLoss",
    "CrossEntropyOutput",
    "LossOptions",
    "InputError",
    "set_validation",
    "validation",
    "validation_enabled",
]
__version__ = "0.1.0"
