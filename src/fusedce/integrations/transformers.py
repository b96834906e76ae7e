"""Hugging Face transformers integration: causal-LM losses computed by fusedce.

For hidden states h [B, S, D], the LM head W [V, D] (bias b) and labels y [B, S], a causal
LM is trained on the next token: position s is scored against y[s+1] and the last
position is ignored (or against ``shift_labels`` when the caller already shifted):

    x[b, s]  = W h[b, s] + b                      (Gemma-2: x = c * tanh(x / c), c the
                                                   final_logit_softcapping)
    loss     = sum over counted rows of (lse - x_t) / N
    N        = num_items_in_batch when given (gradient accumulation), else the number of
               rows whose shifted label is not ignore_index (-100)

exactly transformers' ``ForCausalLMLoss`` (which upcasts the logits to fp32 first).

Two entry points:

* :func:`causal_lm_loss` has the signature of ``ForCausalLMLoss`` and computes it on the
  materialised logits with :func:`fusedce.cross_entropy` (fp32 math, no fp32 copy of the
  logits). Set ``model.loss_function = causal_lm_loss`` or call :func:`register_loss`.
* :func:`apply` patches a model instance so that a forward with labels, in training, calls
  the decoder and then :func:`fusedce.linear_cross_entropy` on (h, W, shifted labels): the
  [B, S, V] logits never exist and ``outputs.logits`` is None. Without labels (inference,
  generation), or with labels in eval mode, the original forward runs unchanged (in eval
  mode with labels the loss comes from :func:`causal_lm_loss`). Architectures are looked
  up by ``config.model_type`` in :data:`ARCHITECTURES` (Llama, Mistral, Qwen2, Qwen3,
  Gemma, Gemma-2); :func:`register` adds others whose causal-LM head follows the same
  pattern (a decoder attribute returning the last hidden state, an ``nn.Linear`` head,
  an optional final-logit softcap in the config).

Tested with transformers 5.23 (the ``forward(..., labels, logits_to_keep, **kwargs)``
convention of transformers >= 4.50); transformers is an optional dependency.
"""

from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Union

import torch
import torch.nn.functional as F

import fusedce as _fce

__all__ = [
    "causal_lm_loss",
    "linear_causal_lm_loss",
    "register_loss",
    "Architecture",
    "ARCHITECTURES",
    "register",
    "apply",
    "revert",
    "is_applied",
]

Count = Union[None, int, float, torch.Tensor]


def _shifted(labels: torch.Tensor, shift_labels: Optional[torch.Tensor], ignore_index: int,
             device: torch.device) -> torch.Tensor:
    if shift_labels is None:
        if labels is None:
            raise ValueError("the causal-LM loss needs labels or shift_labels")
        # position s predicts token s + 1; the last position has none
        shift_labels = F.pad(labels[..., 1:], (0, 1), value=ignore_index)
    return shift_labels.to(device)


def _reduction(num_items_in_batch: Count):
    """(reduction, normalizer) of transformers' fixed_cross_entropy."""
    if num_items_in_batch is None:
        return "mean", None
    if isinstance(num_items_in_batch, torch.Tensor):
        return "sum", num_items_in_batch
    return "sum", float(num_items_in_batch)


def causal_lm_loss(logits: torch.Tensor, labels: Optional[torch.Tensor], vocab_size: int,
                   num_items_in_batch: Count = None, ignore_index: int = -100,
                   shift_labels: Optional[torch.Tensor] = None, **kwargs: Any) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` computed by :func:`fusedce.cross_entropy`.

    Args:
        logits: [B, S, V] (any float dtype; not upcast: the math is fp32 anyway).
        labels: [B, S] unshifted labels (ignored when ``shift_labels`` is given).
        vocab_size: V (the logits' last dim).
        num_items_in_batch: divide the summed loss by it (a number or a tensor) instead of
            taking the mean over counted tokens.
        ignore_index: label value left out. Defaults to -100.
        shift_labels: [B, S] labels already shifted (position s scored against it).
        **kwargs: other loss kwargs transformers passes along; ignored.
    Returns:
        fp32 scalar loss.
    """
    target = _shifted(labels, shift_labels, ignore_index, logits.device)
    reduction, normalizer = _reduction(num_items_in_batch)
    return _fce.cross_entropy(logits.reshape(-1, vocab_size), target.reshape(-1),
                              ignore_index=ignore_index, reduction=reduction,
                              normalizer=normalizer)


def linear_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor,
                          labels: Optional[torch.Tensor], *, bias: Optional[torch.Tensor] = None,
                          softcap: Optional[float] = None, num_items_in_batch: Count = None,
                          ignore_index: int = -100, shift_labels: Optional[torch.Tensor] = None,
                          **kwargs: Any) -> torch.Tensor:
    """The causal-LM loss of ``hidden @ weight.T + bias`` without materialising the logits.

    Args:
        hidden: [B, S, D] final hidden states.
        weight: [V, D] LM head; bias: optional [V].
        labels, num_items_in_batch, ignore_index, shift_labels: as :func:`causal_lm_loss`.
        softcap: final-logit softcapping c (z = c * tanh(x / c)), or None.
        **kwargs: forwarded to :func:`fusedce.linear_cross_entropy` (e.g. ``chunk_size``).
    Returns:
        fp32 scalar loss, equal to ``causal_lm_loss(softcapped logits, labels, V, ...)``.
    """
    target = _shifted(labels, shift_labels, ignore_index, hidden.device)
    reduction, normalizer = _reduction(num_items_in_batch)
    D = hidden.shape[-1]
    return _fce.linear_cross_entropy(hidden.reshape(-1, D), weight, target.reshape(-1),
                                     bias=bias, ignore_index=ignore_index, reduction=reduction,
                                     normalizer=normalizer, softcap=softcap, **kwargs)


def register_loss(name: str = "ForCausalLM") -> None:
    """Make :func:`causal_lm_loss` transformers' loss for ``loss_type == name`` (global).

    Every model whose ``loss_function`` resolves to that entry of
    ``transformers.loss.loss_utils.LOSS_MAPPING`` then uses it (unless the model has its own
    ``loss_function`` set). Prefer ``apply(model)`` or ``model.loss_function =
    causal_lm_loss`` to affect one model only.
    """
    from transformers.loss.loss_utils import LOSS_MAPPING

    LOSS_MAPPING[name] = causal_lm_loss


# ---------------------------------------------------------------------------- patching


@dataclass(frozen=True)
class Architecture:
    """How to reach the pieces of a causal-LM class without its logits.

    decoder_attr: attribute of the CausalLM model holding the decoder stack (called with
        the forward's inputs minus labels; returns the last hidden state first).
    head_attr: attribute holding the LM head (an ``nn.Linear`` [V, D]).
    softcap_attr: config attribute with the final-logit softcap (None: no softcap).
    """

    decoder_attr: str = "model"
    head_attr: str = "lm_head"
    softcap_attr: Optional[str] = None


ARCHITECTURES: Dict[str, Architecture] = {
    "llama": Architecture(),
    "mistral": Architecture(),
    "qwen2": Architecture(),
    "qwen3": Architecture(),
    "gemma": Architecture(),
    "gemma2": Architecture(softcap_attr="final_logit_softcapping"),
}

# forward arguments that belong to the head or the loss, never to the decoder
_HEAD_ARGS = ("labels", "logits_to_keep", "num_logits_to_keep", "return_dict",
              "num_items_in_batch", "shift_labels", "ignore_index")


def register(model_type: str, architecture: Optional[Architecture] = None, **fields: Any) -> None:
    """Add (or replace) the :class:`Architecture` of ``config.model_type == model_type``.

    Args:
        model_type: the config's ``model_type`` (e.g. "phi3").
        architecture: an Architecture, or None to build one from ``fields``.
        **fields: decoder_attr, head_attr, softcap_attr.
    """
    ARCHITECTURES[model_type] = architecture if architecture is not None else \
        Architecture(**fields)


def _lookup(model) -> Architecture:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"fusedce has no fused forward for model_type={model_type!r} "
                         f"(known: {sorted(ARCHITECTURES)}); fusedce.integrations.transformers"
                         ".register(model_type, ...) adds one whose head follows the Llama "
                         "pattern, or pass fused=False to only set the loss function")
    return ARCHITECTURES[model_type]


def _make_forward(model, arch: Architecture, original: Callable, skip_default: Optional[bool]):
    sig = inspect.signature(original)
    var_kw = next((p.name for p in sig.parameters.values()
                   if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    unbound = getattr(original, "__func__", original)
    # the model's own forward is called on ``self``, not on the model apply() saw: a
    # copy.deepcopy of the patched model (a reference or EMA model) rebinds this method to
    # the copy, whose fallbacks must then run on the copy's weights
    own = getattr(original, "__self__", None) is model

    def call_original(self, *args, **kwargs):
        return unbound(self, *args, **kwargs) if own else original(*args, **kwargs)

    @functools.wraps(unbound)
    def forward(self, *args, **kwargs):
        skip = kwargs.pop("skip_logits", skip_default)
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            return call_original(self, *args, **kwargs)
        named = dict(bound.arguments)
        named.update(named.pop(var_kw, None) or {})
        labels = named.get("labels")
        shift_labels = named.get("shift_labels")
        has_labels = labels is not None or shift_labels is not None
        if skip is None:
            skip = self.training and has_labels
        keep = named.get("logits_to_keep", named.get("num_logits_to_keep", 0))
        head = getattr(self, arch.head_attr, None)
        if not (skip and has_labels and isinstance(keep, int) and keep == 0
                and isinstance(head, torch.nn.Linear)):
            return call_original(self, *args, **kwargs)
        return_dict = named.get("return_dict")
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        decoder_args = {k: v for k, v in named.items() if k not in _HEAD_ARGS}
        outputs = getattr(self, arch.decoder_attr)(**decoder_args)
        hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") \
            else outputs[0]
        softcap = getattr(self.config, arch.softcap_attr, None) if arch.softcap_attr else None
        loss = linear_causal_lm_loss(
            hidden, head.weight, labels, bias=head.bias, softcap=softcap,
            num_items_in_batch=named.get("num_items_in_batch"),
            ignore_index=named.get("ignore_index", -100), shift_labels=shift_labels)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        out = CausalLMOutputWithPast(
            loss=loss, logits=None,
            past_key_values=getattr(outputs, "past_key_values", None),
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None))
        return out if return_dict else out.to_tuple()

    return types.MethodType(forward, model)


def apply(model, *, fused: bool = True, loss_function: bool = True,
          skip_logits: Optional[bool] = None):
    """Make a transformers causal LM compute its loss with fusedce.

    Args:
        model: a ``*ForCausalLM`` instance (patched in place; its class is untouched).
        fused: patch ``model.forward`` so that a forward with labels computes the loss with
            :func:`fusedce.linear_cross_entropy` and returns ``logits=None`` (the logits
            are never materialised). Needs ``config.model_type`` in :data:`ARCHITECTURES`.
        loss_function: set ``model.loss_function = causal_lm_loss`` (used whenever the
            logits are materialised: eval with labels, ``logits_to_keep``, fallbacks).
        skip_logits: when to take the fused path: None (default) = in training mode with
            labels; True = whenever labels are given; False = never. A forward call may
            override it with ``skip_logits=...``.
    Returns:
        ``model`` (for chaining). :func:`revert` undoes it.
    """
    if is_applied(model):
        revert(model)
    arch = _lookup(model) if fused else None
    state = {"loss_function": None, "forward": None}
    if loss_function:
        state["loss_function"] = model.__dict__.get("_loss_function", _MISSING)
        try:
            model.loss_function = causal_lm_loss
        except AttributeError as exc:  # transformers < 4.46: no loss_function setter
            raise RuntimeError("this transformers version has no settable "
                               "model.loss_function; pass loss_function=False") from exc
    if fused:
        state["forward"] = model.__dict__.get("forward", _MISSING)
        model.forward = _make_forward(model, arch, model.forward, skip_logits)
    model._fusedce_state = state
    return model


# "no instance attribute before apply()": a string, so that copy.deepcopy of a patched model
# keeps it recognisable (a bare object() would be copied into another object)
_MISSING = "<fusedce: no instance attribute>"


def is_applied(model) -> bool:
    """Whether :func:`apply` patched ``model``."""
    return "_fusedce_state" in getattr(model, "__dict__", {})


def revert(model):
    """Undo :func:`apply` on ``model``; returns it."""
    state = model.__dict__.pop("_fusedce_state", None)
    if state is None:
        return model
    for attr, dict_key in (("forward", "forward"), ("loss_function", "_loss_function")):
        old = state[attr]
        if old is None:
            continue
        if isinstance(old, str) and old == _MISSING:
            model.__dict__.pop(dict_key, None)
        else:
            model.__dict__[dict_key] = old
    return model
