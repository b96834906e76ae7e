"""Hugging Face transformers integration: causal-LM losses computed by fusedce.

For hidden states h [B, S, D] entering the LM head W [V, D] (bias b) and labels y [B, S], a
causal LM is trained on the next token: position s is scored against y[s+1] and the last
position is ignored (or against ``shift_labels`` when the caller already shifted):

    x[b, s] = W h[b, s] + b
    z       = c * tanh(a * x / c)   (c: a final-logit softcap under any config name;
                                     a: the product of the forward's logit scalings)
    loss    = sum over counted rows of (lse(z) - z_t) / N
    N       = num_items_in_batch when given (gradient accumulation), else the number of
              rows whose shifted label is not ignore_index (-100)

exactly transformers' ``ForCausalLMLoss``. The fused forward computes it with
:func:`fusedce.linear_cross_entropy`, one chunk of logits at a time: the [B, S, V] logits
never exist and ``outputs.logits`` is None.

How: the model's own forward runs, unchanged, with two things replaced for that one call:
its LM head module (which computes the fused loss from its input and returns a placeholder)
and ``self.loss_function`` (which hands that loss back). So everything else the forward
does or returns is kept as written: the decoder, caches, hidden states and attentions when
asked, vision towers, router auxiliary losses added with their coefficient,
``num_items_in_batch``, ``shift_labels``. What the forward does between the head and the loss
(scalings, softcaps) is read from its source by :mod:`._hf_layout` and checked at
:func:`apply`: a model it cannot prove equivalent is refused there with the reason.

Entry points:

* :func:`apply` (one model instance, or a PEFT model: before or after ``get_peft_model``),
  :func:`revert`, :func:`is_applied`; ``apply(model, verify=True)`` also runs one tiny
  forward and backward both ways and compares them.
* :func:`patch` (classes: ``patch("llama")``, ``patch()`` for every family, for code that
  builds the model itself), :func:`unpatch` or the returned handle's ``undo()``.
* :func:`describe` says what a model's fused path does, or raises :class:`UnsupportedModel`.
* :func:`causal_lm_loss` (a drop-in for ``ForCausalLMLoss`` on materialised logits) and
  :func:`linear_causal_lm_loss` (the same from hidden states).

Inference (no labels) always runs the original forward. With labels the fused path runs in
training mode (``skip_logits=True`` / ``False`` per call or at :func:`apply` overrides it);
``reduction="none"`` returns per-token losses [B, S] instead of their mean.

Works with transformers >= 4.46 (tested down to 4.46.3 and up to 5.x); transformers is an
optional dependency.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import logging
import types
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

import fusedce as _fce

from . import _hf_layout as _layout
from ._hf_layout import Refused as UnsupportedModel

__all__ = [
    "causal_lm_loss",
    "linear_causal_lm_loss",
    "register_loss",
    "apply",
    "revert",
    "is_applied",
    "describe",
    "patch",
    "unpatch",
    "PatchHandle",
    "UnsupportedModel",
    "Architecture",
    "register",
]

logger = logging.getLogger("fusedce.integrations.transformers")

Count = Union[None, int, float, torch.Tensor]

# loss kwargs of ForCausalLMLoss that the fused loss honours
_LOSS_KEYS = ("num_items_in_batch", "ignore_index", "shift_labels")


@functools.lru_cache(maxsize=None)
def _loss_keys() -> Tuple[str, ...]:
    """The loss kwargs the installed ForCausalLMLoss acts on (``shift_labels`` came after
    4.46: before it, a ``shift_labels`` kwarg is ignored by the loss, so by the fused one)."""
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:  # pragma: no cover
        return _LOSS_KEYS
    params = inspect.signature(ForCausalLMLoss).parameters
    return tuple(k for k in _LOSS_KEYS if k in params)


# ---------------------------------------------------------------------------- losses


def _shifted(labels: Optional[torch.Tensor], shift_labels: Optional[torch.Tensor],
             ignore_index: int, device: torch.device) -> torch.Tensor:
    if shift_labels is None:
        if labels is None:
            raise ValueError("the causal-LM loss needs labels or shift_labels")
        # position s predicts token s + 1; the last position has none
        shift_labels = F.pad(labels[..., 1:], (0, 1), value=ignore_index)
    return shift_labels.to(device)


def _reduction(num_items_in_batch: Count, reduction: str = "mean"):
    """(reduction, normalizer) of transformers' fixed_cross_entropy."""
    if reduction == "none":
        return "none", None
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
                          softcap: Optional[float] = None, logit_scale: float = 1.0,
                          num_items_in_batch: Count = None, ignore_index: int = -100,
                          shift_labels: Optional[torch.Tensor] = None, reduction: str = "mean",
                          **kwargs: Any) -> torch.Tensor:
    """The causal-LM loss of ``softcap(logit_scale * (hidden @ weight.T + bias))`` without
    materialising the logits.

    Args:
        hidden: [B, S, D] final hidden states.
        weight: [V, D] LM head; bias: optional [V].
        labels, num_items_in_batch, ignore_index, shift_labels: as :func:`causal_lm_loss`.
        softcap: final-logit softcapping c (z = c * tanh(x / c)), or None.
        logit_scale: multiplies the logits (before the softcap).
        reduction: "mean" (transformers' loss: the mean, or the sum over
            ``num_items_in_batch``) or "none" (per-position losses shaped like the labels,
            0 where ignored; ``num_items_in_batch`` is not applied).
        **kwargs: forwarded to :func:`fusedce.linear_cross_entropy` (e.g. ``chunk_size``).
    Returns:
        fp32 loss, equal to ``causal_lm_loss(transformed logits, labels, V, ...)``.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    target = _shifted(labels, shift_labels, ignore_index, hidden.device)
    red, normalizer = _reduction(num_items_in_batch, reduction)
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.to(hidden.device)  # as transformers moves it to the loss
    D = hidden.shape[-1]
    loss = _fce.linear_cross_entropy(hidden.reshape(-1, D), weight, target.reshape(-1),
                                     bias=bias, ignore_index=ignore_index, reduction=red,
                                     normalizer=normalizer, softcap=softcap,
                                     logit_scale=logit_scale, **kwargs)
    return loss.view(target.shape) if red == "none" else loss


def register_loss(name: str = "ForCausalLM") -> None:
    """Make :func:`causal_lm_loss` transformers' loss for ``loss_type == name`` (global).

    Every model whose ``loss_function`` resolves to that entry of
    ``transformers.loss.loss_utils.LOSS_MAPPING`` then uses it (unless the model has its own
    ``loss_function`` set). Prefer ``apply(model)`` to affect one model only.
    """
    from transformers.loss.loss_utils import LOSS_MAPPING

    LOSS_MAPPING[name] = causal_lm_loss


# ---------------------------------------------------------------------------- options


@dataclass(frozen=True)
class _Options:
    skip_logits: Optional[bool] = None
    reduction: str = "mean"
    chunk_size: Union[str, int] = "auto"

    def __post_init__(self):
        if self.reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' (transformers' loss) or 'none' "
                             f"(per-token losses), got {self.reduction!r}")
        if self.skip_logits not in (None, True, False):
            raise ValueError(f"skip_logits must be None, True or False, got "
                             f"{self.skip_logits!r}")


# ---------------------------------------------------------------------------- the head


def _peft_types():
    import sys

    if "peft" not in sys.modules:
        return None, None
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover - other peft layouts
        return None, None
    return LoraLinear, ModulesToSaveWrapper


def _plain_linear(m) -> bool:
    return isinstance(m, torch.nn.Linear) and type(m).forward is torch.nn.Linear.forward


def _inner_head(module, path: str) -> Tuple[Any, str]:
    """Follow head modules that end in a projection (BERT-style prediction heads) down to
    the module fusedce replaces: a linear layer or a PEFT wrapper of one."""
    LoraLinear, MTS = _peft_types()
    for _ in range(4):
        if _plain_linear(module) or (LoraLinear is not None and isinstance(
                module, (LoraLinear, MTS))):
            return module, path
        if isinstance(module, torch.nn.Linear):
            raise UnsupportedModel(
                f"the head {path} is a {type(module).__name__} (a linear layer with its own "
                "forward, e.g. quantized): fusedce needs its weight as a plain tensor")
        fwd = type(module).forward
        try:
            child = _layout.analyze_head_module(fwd)
        except UnsupportedModel as exc:
            raise UnsupportedModel(f"the head {path} is a {type(module).__name__}, not a "
                                   f"linear layer ({exc})") from None
        module = getattr(module, child)
        path = f"{path}.{child}"
    raise UnsupportedModel(f"the head {path} is nested too deeply")


def _check_effective(module, path: str) -> None:
    """Raise UnsupportedModel where :func:`_effective` could not express ``module``."""
    LoraLinear, MTS = _peft_types()
    if _plain_linear(module):
        return
    if MTS is not None and isinstance(module, MTS):
        _check_effective(_mts_active(module), path + " (modules_to_save)")
        return
    if LoraLinear is not None and isinstance(module, LoraLinear):
        _check_effective(module.get_base_layer(), path + ".base_layer")
        if module.disable_adapters or module.merged:
            return
        if getattr(module, "fan_in_fan_out", False):
            raise UnsupportedModel(f"the LoRA head {path} has fan_in_fan_out=True")
        for a in module.active_adapters:
            if a not in module.lora_A:
                continue
            if a in getattr(module, "lora_variant", {}):
                raise UnsupportedModel(f"the LoRA head {path} uses a LoRA variant (DoRA or "
                                       f"another) for adapter {a!r}")
            for part in (module.lora_A[a], module.lora_B[a]):
                if not _plain_linear(part):
                    raise UnsupportedModel(f"the LoRA head {path} has a "
                                           f"{type(part).__name__} adapter layer")
            if module.lora_A[a].bias is not None:
                raise UnsupportedModel(f"the LoRA head {path} has a bias in lora_A")
        return
    raise UnsupportedModel(f"the head {path} is a {type(module).__name__}, not a linear layer")


def _mts_active(module):
    if module.disable_adapters or not module.active_adapters or any(
            a not in module.modules_to_save for a in module.active_adapters):
        return module.original_module
    return module.modules_to_save[module.active_adapters[0]]


def _effective(module, x: torch.Tensor):
    """(x', W, b) with ``module(x) == x' @ W.T + b``, differentiable in every parameter.

    A LoRA head ``base(x) + s * B(A(dropout(x)))`` is the single linear map of
    ``x' = [x, s * A(dropout(x))]`` through ``W = [W_base, B]`` (exact, dropout included: the
    adapter path calls the same dropout module once, as the layer's forward does).
    """
    LoraLinear, MTS = _peft_types()
    if _plain_linear(module):
        return x, module.weight, module.bias
    if MTS is not None and isinstance(module, MTS):
        return _effective(_mts_active(module), x)
    # a LoRA layer (checked by _check_effective)
    base = module.get_base_layer()
    x0, w, b = _effective(base, x)
    if module.disable_adapters or module.merged:
        return x0, w, b
    xs, ws = [x0], [w]
    for a in module.active_adapters:
        if a not in module.lora_A:
            continue
        lora_a, lora_b = module.lora_A[a], module.lora_B[a]
        s = module.scaling[a]
        xa = x.to(lora_a.weight.dtype)
        xs.append((lora_a(module.lora_dropout[a](xa)) * s).to(x0.dtype))
        ws.append(lora_b.weight.to(w.dtype))
        if lora_b.bias is not None:
            extra = (lora_b.bias * s).to(w.dtype)
            b = extra if b is None else b + extra
    return torch.cat(xs, dim=-1), torch.cat(ws, dim=1), b


# ---------------------------------------------------------------------------- analysis


def _hf_model(model):
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and type(model).__module__.startswith("peft"):
        return get_base()
    return model


def _class_original(cls):
    """The forward function a class had before :func:`patch`."""
    fwd = cls.forward
    return getattr(fwd, "__fusedce_original__", fwd)


def _loss_function_ok(model) -> None:
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:  # pragma: no cover - transformers without loss_utils
        return
    lf = model.__dict__.get("_loss_function", None)
    if lf is None:
        try:
            lf = model.loss_function
        except AttributeError:
            return
    lf = getattr(lf, "func", lf)
    if lf is not ForCausalLMLoss and lf is not causal_lm_loss:
        name = getattr(lf, "__qualname__", type(lf).__name__)
        raise UnsupportedModel(f"its loss_function is {name}, not transformers' "
                               "ForCausalLMLoss (loss_type "
                               f"{getattr(model, 'loss_type', None)!r})")


@dataclass
class _Plan:
    layout: _layout.Layout
    path: Tuple[str, ...]  # attributes from the model to the module fusedce replaces


def _plan(model, original=None) -> _Plan:
    """Check everything that can be checked without running the model; raise
    :class:`UnsupportedModel` with the reason."""
    cls = type(model)
    name = cls.__name__
    try:
        if original is None:
            original = _class_original(cls)
        layout = _layout.analyze_forward(original, f"{name}.forward")
        _loss_function_ok(model)
        head = getattr(model, layout.head_attr, None)
        if head is None:
            raise UnsupportedModel(f"it has no self.{layout.head_attr}")
        module, path = _inner_head(head, layout.head_attr)
        _check_effective(module, path)
        count = sum(1 for _, m in model.named_modules(remove_duplicate=False) if m is module)
        if count != 1:
            raise UnsupportedModel(f"its head {path} is registered {count} times (a module "
                                   "shared with another part of the model)")
        _layout.canonical(layout, model)
    except UnsupportedModel as exc:
        model_type = getattr(getattr(model, "config", None), "model_type", "?")
        raise UnsupportedModel(f"{name} ({model_type}): {exc}") from None
    return _Plan(layout=layout, path=tuple(path.split(".")))


def describe(model) -> str:
    """What the fused path does for ``model`` (a transformers or PEFT model), e.g.
    ``"LlamaForCausalLM: head lm_head, logit_scale=1.0, softcap=None"``; raises
    :class:`UnsupportedModel` with the reason where :func:`apply` would."""
    hf = _hf_model(model)
    plan = _plan(hf, _instance_original(hf))
    t = _layout.canonical(plan.layout, hf)
    extra = ", adds to the loss after it (e.g. router auxiliary loss)" if \
        plan.layout.adds_to_loss else ""
    return (f"{type(hf).__name__}: head {'.'.join(plan.path)}, logit_scale={t.logit_scale}, "
            f"softcap={t.softcap}{extra}")


# ---------------------------------------------------------------------------- the call

# the head's placeholder output: a few logits of known values, so that the loss hook sees
# what the forward did to them and checks it is the transform the loss used
_PROBE = (-37.5, -2.5, 1.25, 50.0)


class _Capture:
    """State of one fused call."""

    def __init__(self, model, plan: _Plan, opts: _Options, transform, labels, loss_kw):
        self.model = model
        self.plan = plan
        self.opts = opts
        self.transform = transform
        self.labels = labels
        self.loss_kw = loss_kw
        self.head_calls = 0
        self.loss_calls = 0
        self.loss = None
        self.vocab = None
        self.probe = None
        self.seen = None

    def head_forward(self, module):
        def forward(x, *args, **kwargs):
            if args or kwargs:
                raise RuntimeError("fusedce: the LM head was called with extra arguments")
            self.head_calls += 1
            if self.head_calls > 1:
                raise RuntimeError(f"fusedce: {type(self.model).__name__} called its LM head "
                                   "twice in one forward")
            kw = self.loss_kw
            x2, w, b = _effective(module, x)
            self.vocab = w.shape[0]
            self.loss = linear_causal_lm_loss(
                x2, w, self.labels, bias=b, softcap=self.transform.softcap,
                logit_scale=self.transform.logit_scale,
                num_items_in_batch=kw.get("num_items_in_batch"),
                ignore_index=kw.get("ignore_index", -100), shift_labels=kw.get("shift_labels"),
                reduction=self.opts.reduction, chunk_size=self.opts.chunk_size)
            dtype = _autocast_dtype(x.device.type) if _autocast_on(x.device.type) else w.dtype
            self.probe = _probe(dtype, x.device).expand(*x.shape[:-1], len(_PROBE)).clone()
            return self.probe
        return forward

    def loss_function(self, logits=None, labels=None, vocab_size=None, *args, **kwargs):
        self.loss_calls += 1
        name = type(self.model).__name__
        if self.head_calls != 1 or self.loss is None:
            raise RuntimeError(f"fusedce: {name} computed its loss without calling its LM head")
        if labels is not self.labels and not (
                isinstance(labels, torch.Tensor) and isinstance(self.labels, torch.Tensor)
                and labels.shape == self.labels.shape
                and torch.equal(labels.to(self.labels.device), self.labels)):
            raise RuntimeError(f"fusedce: {name} passed other labels to its loss than its "
                               "forward got")
        for key in _loss_keys():
            if kwargs.get(key) is not self.loss_kw.get(key):
                raise RuntimeError(f"fusedce: {name} passed another {key} to its loss")
        if isinstance(vocab_size, int) and vocab_size != self.vocab:
            raise RuntimeError(f"fusedce: {name} scores its logits over vocab_size="
                               f"{vocab_size}, but its head has {self.vocab} rows")
        self._check_transform(logits)
        self.seen = logits
        if self.opts.reduction == "none":
            # terms the forward adds to its loss (router auxiliary losses) land on this
            # scalar and are dropped: the per-token losses are the cross-entropy alone
            return torch.zeros((), dtype=torch.float32, device=self.loss.device)
        return self.loss

    def _check_transform(self, logits):
        name = type(self.model).__name__
        if not isinstance(logits, torch.Tensor) or logits.shape[-1:] != (len(_PROBE),):
            raise RuntimeError(f"fusedce: {name} reshaped its logits before the loss")
        # the forward's code applies the same transform for the same values: checking it
        # once per model and transform is enough, and keeps the (syncing) read of the
        # probe out of every training step
        key = (self.transform, self.probe.dtype, str(self.opts.reduction))
        if self.model.__dict__.get("_fusedce_checked") == key:
            return
        got = logits.reshape(-1, len(_PROBE))[:1].double()
        if got.numel() == 0:
            return
        want = self.transform(torch.tensor(_PROBE, dtype=self.probe.dtype)).to(got.device)
        rtol = 1e-5 if self.probe.dtype in (torch.float32, torch.float64) else 3e-2
        err = (got[0] - want).abs().max().item()
        if not err <= rtol * want.abs().max().item():
            raise RuntimeError(
                f"fusedce: {name} transformed its logits differently from what its forward's "
                f"code reads as (logit_scale={self.transform.logit_scale}, softcap="
                f"{self.transform.softcap}): {got[0].tolist()} vs {want.tolist()}. Please "
                "report this; revert(model) runs the original forward.")
        self.model.__dict__["_fusedce_checked"] = key


_PROBES: Dict[Tuple[torch.dtype, str], torch.Tensor] = {}


def _probe(dtype, device) -> torch.Tensor:
    key = (dtype, str(device))
    t = _PROBES.get(key)
    if t is None:
        t = _PROBES[key] = torch.tensor(_PROBE, dtype=dtype, device=device)
    return t


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # pragma: no cover - older torch: no device argument
        return torch.is_autocast_enabled() if device_type == "cuda" else False


def _autocast_dtype(device_type: str):
    try:
        return torch.get_autocast_dtype(device_type)
    except AttributeError:  # pragma: no cover - older torch
        return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.bfloat16


_SLOTTED: set = set()


def _loss_function_slot(cls) -> None:
    """Make ``model.loss_function`` settable per instance on ``cls``.

    transformers >= 4.48 reads an instance's ``_loss_function`` first (its property has a
    setter); 4.46 and 4.47 always return the shared ``LOSS_MAPPING`` entry. There the
    property is replaced once, on the class that defines it, by one that reads the instance
    attribute first and falls back to the original getter: the same behaviour for every
    model that does not set it.
    """
    if cls in _SLOTTED:
        return
    for klass in cls.__mro__:
        prop = klass.__dict__.get("loss_function")
        if prop is None:
            continue
        if isinstance(prop, property) and prop.fset is None:
            getter = prop.fget

            def fget(self, _getter=getter):
                value = self.__dict__.get("_loss_function")
                return value if value is not None else _getter(self)

            def fset(self, value):
                self.__dict__["_loss_function"] = value

            setattr(klass, "loss_function", property(fget, fset, doc=prop.__doc__))
        break
    _SLOTTED.add(cls)


@contextlib.contextmanager
def _swapped(model, cap: _Capture):
    """Replace the head's forward and the loss function for one call."""
    _loss_function_slot(type(model))
    owner = model
    for attr in cap.plan.path:
        owner = getattr(owner, attr)
    head = owner
    # accelerate's hooks live in the instance's forward and call ``_old_forward``: replace
    # that one, so that device placement and offloading still run around the head
    slot = "_old_forward" if "_old_forward" in head.__dict__ else "forward"
    saved_head = head.__dict__.get(slot, _MISSING)
    saved_loss = model.__dict__.get("_loss_function", _MISSING)
    head.__dict__[slot] = cap.head_forward(head)
    model.__dict__["_loss_function"] = cap.loss_function
    try:
        yield
    finally:
        for obj, key, old in ((head, slot, saved_head), (model, "_loss_function", saved_loss)):
            if isinstance(old, str) and old == _MISSING:
                obj.__dict__.pop(key, None)
            else:
                obj.__dict__[key] = old


def _bind(original, args, kwargs):
    """(labels, loss kwargs, logits_to_keep) of a forward call, or None if it does not
    bind."""
    sig = _signature(original)
    try:
        bound = sig.bind(None, *args, **kwargs)
    except TypeError:
        return None
    named = dict(bound.arguments)
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(named.pop(p.name, None) or {})
    loss_kw = {k: named[k] for k in _loss_keys() if k in named}
    keep = named.get("logits_to_keep", named.get("num_logits_to_keep", 0))
    return named.get("labels"), loss_kw, keep


@functools.lru_cache(maxsize=None)
def _signature(fn):
    return inspect.signature(fn)


def _warn_once(model, key: str, message: str) -> None:
    seen = model.__dict__.setdefault("_fusedce_warned", set())
    if key not in seen:
        seen.add(key)
        logger.warning(message)


def _call(self, original, opts: _Options, args, kwargs):
    """A forward call of a patched model (instance or class)."""
    skip = kwargs.pop("skip_logits", None)
    if skip is None:
        skip = opts.skip_logits
    bound = _bind(original, args, kwargs)
    if bound is None:
        return original(self, *args, **kwargs)
    labels, loss_kw, keep = bound
    if skip is None:
        skip = self.training or opts.reduction == "none"
    if not (skip and labels is not None and isinstance(keep, int) and keep == 0):
        return original(self, *args, **kwargs)
    try:
        plan = _cached_plan(self, original)
        transform = _layout.canonical(plan.layout, self)
    except UnsupportedModel as exc:
        _warn_once(self, "refused", f"fusedce: the original forward runs (logits "
                   f"materialised): {exc}")
        return original(self, *args, **kwargs)
    if not self.__dict__.get("_fusedce_logged"):
        self.__dict__["_fusedce_logged"] = True
        logger.info("fusedce: %s computes its loss with fusedce.linear_cross_entropy "
                    "(head %s, logit_scale=%s, softcap=%s, reduction=%s)",
                    type(self).__name__, ".".join(plan.path), transform.logit_scale,
                    transform.softcap, opts.reduction)
    cap = _Capture(self, plan, opts, transform, labels, loss_kw)
    with _swapped(self, cap):
        out = original(self, *args, **kwargs)
    if cap.loss_calls != 1:
        raise RuntimeError(f"fusedce: {type(self).__name__}'s forward called its loss "
                           f"{cap.loss_calls} times")
    return _finish(out, cap)


def _finish(out, cap: _Capture):
    per_token = cap.loss if cap.opts.reduction == "none" else None
    if isinstance(out, tuple):
        # (loss, logits, ...): the tuple form of the output skips None entries
        if len(out) < 2 or not _is_placeholder(out[1], cap):
            raise RuntimeError("fusedce: unexpected tuple output of the fused forward")
        return ((per_token if per_token is not None else out[0]),) + tuple(out[2:])
    logits = out.get("logits") if hasattr(out, "get") else getattr(out, "logits", None)
    if logits is not None:
        if not _is_placeholder(logits, cap):
            raise RuntimeError("fusedce: the fused forward returned logits it did not make")
        collections.OrderedDict.__delitem__(out, "logits")
        object.__setattr__(out, "logits", None)
    if per_token is not None:
        out["loss"] = per_token
    return out


def _is_placeholder(t, cap: _Capture) -> bool:
    return t is cap.seen or t is cap.probe or (
        isinstance(t, torch.Tensor) and t.shape[-1:] == (len(_PROBE),))


def _cached_plan(model, original) -> _Plan:
    """The plan of ``model``, re-derived when its head module changed (get_peft_model
    after apply(), a new adapter)."""
    key = _head_key(model, original)
    state = model.__dict__.get("_fusedce_plan")
    if state is not None and state[0] == key:
        if isinstance(state[1], UnsupportedModel):
            raise UnsupportedModel(str(state[1]))
        return state[1]
    try:
        plan = _plan(model, original)
    except UnsupportedModel as exc:
        model.__dict__["_fusedce_plan"] = (key, exc)
        raise
    model.__dict__["_fusedce_plan"] = (key, plan)
    return plan


def _head_key(model, original):
    try:
        layout = _layout.analyze_forward(original)
    except UnsupportedModel:
        return (id(original),)
    head = getattr(model, layout.head_attr, None)
    # a loss function set after apply() is checked again
    key = [id(original), id(head), type(head), id(model.__dict__.get("_loss_function"))]
    LoraLinear, MTS = _peft_types()
    m = head
    while m is not None and LoraLinear is not None and isinstance(m, (LoraLinear, MTS)):
        if isinstance(m, MTS):
            key.append((m.disable_adapters, tuple(m.active_adapters)))
            m = _mts_active(m)
        else:
            key.append((m.disable_adapters, m.merged, tuple(m.active_adapters),
                        tuple(m.lora_A.keys()), tuple(getattr(m, "lora_variant", {}))))
            m = m.get_base_layer()
        key.append(id(m))
    return tuple(key)


# ---------------------------------------------------------------------------- instances

# "no instance attribute before apply()": a string, so that copy.deepcopy of a patched model
# keeps it recognisable (a bare object() would be copied into another object)
_MISSING = "<fusedce: no instance attribute>"


def _instance_original(model):
    """The unpatched forward function of ``model``'s class."""
    return _class_original(type(model))


# classes whose ``forward`` is fusedce's dispatcher -> the attribute it replaced
_DISPATCHERS: Dict[type, Any] = {}
# classes patched by patch() -> (options, handle)
_CLASS_OPTIONS: Dict[type, Tuple[_Options, "PatchHandle"]] = {}
# live models with apply() state (a class keeps its dispatcher while any is alive)
_APPLIED: "weakref.WeakSet" = weakref.WeakSet()


def _class_options(cls) -> Optional[_Options]:
    for klass in cls.__mro__:
        entry = _CLASS_OPTIONS.get(klass)
        if entry is not None:
            return entry[0]
    return None


def _make_forward(original):
    """The dispatcher that stands in for a class's forward: a model with apply() state or
    of a patch()ed class takes :func:`_call`; any other runs ``original`` as it is. The
    state is data in the instance (picklable; copied with the model by copy.deepcopy and by
    DataParallel's replicas), so every copy runs on its own weights."""
    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        state = self.__dict__.get("_fusedce_state")
        opts = state["options"] if state is not None else _class_options(type(self))
        if opts is None:
            return original(self, *args, **kwargs)
        return _call(self, original, opts, args, kwargs)

    forward.__fusedce_original__ = original
    return forward


def _install(cls) -> None:
    """Put the dispatcher on ``cls`` (once)."""
    if cls in _DISPATCHERS and getattr(cls.__dict__.get("forward"), "__fusedce_original__",
                                       None) is not None:
        return
    original = _class_original(cls)
    _DISPATCHERS[cls] = cls.__dict__.get("forward", _MISSING)
    cls.forward = _make_forward(original)


def _restore_classes() -> None:
    """Give classes their own forward back where nothing uses the dispatcher any more."""
    if len(_APPLIED):
        return
    for cls in list(_DISPATCHERS):
        if _class_options(cls) is not None:
            continue
        old = _DISPATCHERS.pop(cls)
        if getattr(cls.__dict__.get("forward"), "__fusedce_original__", None) is None:
            continue  # replaced by someone else since
        if isinstance(old, str) and old == _MISSING:
            delattr(cls, "forward")
        else:
            setattr(cls, "forward", old)


def apply(model, *, verify: bool = False, reduction: str = "mean",
          skip_logits: Optional[bool] = None, chunk_size: Union[str, int] = "auto",
          fused: bool = True, loss_function: bool = True):
    """Make a transformers causal LM (or vision-language model) compute its training loss
    with :func:`fusedce.linear_cross_entropy`, never materialising the logits.

    Args:
        model: a ``*ForCausalLM`` / ``*ForConditionalGeneration`` instance, or a PEFT model
            wrapping one (apply() may come before or after ``get_peft_model``). The options
            are stored in the instance; its class's ``forward`` becomes a dispatcher that
            runs the original forward for every model without them.
        verify: run one tiny forward and backward (2 x 8 tokens) with the original and the
            fused path and compare the loss and the gradients of the head's input and
            parameters; raise :class:`UnsupportedModel` (and leave the model unpatched)
            when they differ.
        reduction: "mean" (transformers' loss) or "none": a fused call returns the
            per-position losses [B, S] (position s scored against label s + 1, 0 where
            ignored) as ``outputs.loss``, for callers that weight tokens themselves; terms
            the forward adds to its loss (router auxiliary losses) are left out of it (they
            stay in ``outputs.aux_loss``), and ``num_items_in_batch`` is not applied. With
            "none" the fused path also runs in eval mode.
        skip_logits: when to take the fused path: None (default) = training mode with
            labels; True = whenever labels are given; False = never. A forward call may
            override it with ``skip_logits=...``.
        chunk_size: rows per chunk of logits, or "auto" (see
            :func:`fusedce.linear_cross_entropy`).
        fused: False leaves the forward alone (only ``loss_function`` is set).
        loss_function: also set ``model.loss_function = causal_lm_loss``, which computes
            the loss where logits are materialised (eval with labels, ``logits_to_keep``).
    Returns:
        ``model`` (for chaining). :func:`revert` undoes it.
    Raises:
        UnsupportedModel: the model's forward or head cannot be shown equivalent (the
            message says why); the model is left as it was.
    """
    opts = _Options(skip_logits=skip_logits, reduction=reduction, chunk_size=chunk_size)
    hf = _hf_model(model)
    if is_applied(hf):
        revert(hf)
    original = _instance_original(hf)
    if fused:
        plan = _plan(hf, original)  # raises with the reason
        hf.__dict__["_fusedce_plan"] = (_head_key(hf, original), plan)
    state = {"options": opts if fused else None, "loss_function": None, "old_forward": None}
    if loss_function:
        _loss_function_slot(type(hf))
        state["loss_function"] = hf.__dict__.get("_loss_function", _MISSING)
        hf.loss_function = causal_lm_loss
    if fused:
        _install(type(hf))
        old = hf.__dict__.get("_old_forward")
        func = getattr(old, "__func__", None)
        if old is not None and func is original:
            # accelerate's hooks (device_map) call the forward they wrapped: route that
            # through the dispatcher too
            state["old_forward"] = old
            hf.__dict__["_old_forward"] = types.MethodType(type(hf).forward, hf)
        elif "forward" in hf.__dict__ and getattr(func, "__fusedce_original__", None) is None:
            logger.warning("fusedce: %s has an instance attribute `forward` set by other "
                           "code, which may bypass the fused forward", type(hf).__name__)
    hf.__dict__["_fusedce_state"] = state
    _APPLIED.add(hf)
    if fused and verify:
        try:
            _verify(hf, original, opts)
        except BaseException:
            revert(hf)
            raise
    return model


def is_applied(model) -> bool:
    """Whether :func:`apply` patched ``model`` (or the model inside a PEFT wrapper)."""
    return "_fusedce_state" in getattr(_hf_model(model), "__dict__", {})


def revert(model):
    """Undo :func:`apply` on ``model``; returns it."""
    hf = _hf_model(model)
    state = hf.__dict__.pop("_fusedce_state", None)
    for key in ("_fusedce_plan", "_fusedce_logged", "_fusedce_warned", "_fusedce_checked"):
        hf.__dict__.pop(key, None)
    _APPLIED.discard(hf)
    if state is None:
        return model
    old = state.get("loss_function")
    if old is not None:
        if isinstance(old, str) and old == _MISSING:
            hf.__dict__.pop("_loss_function", None)
        else:
            hf.__dict__["_loss_function"] = old
    if state.get("old_forward") is not None:
        hf.__dict__["_old_forward"] = state["old_forward"]
    return model


# ---------------------------------------------------------------------------- verify


def _token_ids_to_avoid(config) -> set:
    """Special ids a tiny verification batch must not contain (image / audio / video
    placeholders would make a multimodal forward look for features)."""
    ids = set()
    seen = set()

    def walk(cfg):
        if id(cfg) in seen or cfg is None:
            return
        seen.add(id(cfg))
        for key, value in vars(cfg).items():
            if isinstance(value, int) and not isinstance(value, bool) and (
                    key.endswith("_token_id") or key.endswith("_token_index")
                    or key.endswith("_token")):
                ids.add(value)
            elif isinstance(value, (list, tuple)) and key.endswith("_token_ids"):
                ids.update(v for v in value if isinstance(v, int))
            elif hasattr(value, "to_dict") and hasattr(value, "model_type"):
                walk(value)

    walk(config)
    return ids


def _verify(model, original, opts: _Options) -> None:
    plan = _cached_plan(model, original)
    owner = model
    for attr in plan.path:
        owner = getattr(owner, attr)
    head = owner
    w = _effective(head, torch.zeros(1, _in_features(head), device=_param_device(head),
                                     dtype=_param_dtype(head)))[1]
    V = w.shape[0]
    try:
        device = model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        device = w.device
    avoid = _token_ids_to_avoid(model.config)
    allowed = torch.tensor([i for i in range(min(V, 4096)) if i not in avoid])
    g = torch.Generator().manual_seed(0)
    ids = allowed[torch.randint(0, len(allowed), (2, 8), generator=g)].to(device)
    labels = ids.clone()
    labels[0, :2] = -100
    seen: List[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    params = [p for p in head.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            ref = original(model, input_ids=ids, labels=labels)
            ref_loss = ref["loss"] if not isinstance(ref, tuple) else ref[0]
            if opts.reduction == "none":
                logits = ref["logits"] if not isinstance(ref, tuple) else ref[1]
                t = _shifted(labels, None, -100, logits.device)
                ref_loss = F.cross_entropy(logits.float().flatten(0, -2), t.flatten(),
                                           reduction="none").view(t.shape)
            h_ref = seen[-1]
            inputs = [h_ref] + params if h_ref.requires_grad else params
            g_ref = torch.autograd.grad(ref_loss.sum(), inputs, allow_unused=True) \
                if inputs else []
            try:
                out = model(input_ids=ids, labels=labels, skip_logits=True)
            except RuntimeError as exc:  # a check of the fused call failed
                raise UnsupportedModel(f"{type(model).__name__}: verify: the fused forward "
                                       f"failed: {exc}") from exc
            loss = out["loss"] if not isinstance(out, tuple) else out[0]
            h = seen[-1]
            inputs = [h] + params if h.requires_grad else params
            g_out = torch.autograd.grad(loss.sum(), inputs, allow_unused=True) \
                if inputs else []
    finally:
        hook.remove()
        model.train(was_training)
    low = w.dtype not in (torch.float32, torch.float64)
    rtol = 3e-2 if low else 1e-4
    name = type(model).__name__

    def close(a, b, what):
        a = a.detach().double()
        b = b.detach().double()
        den = b.norm().clamp_min(1e-6 * max(1, b.numel()) ** 0.5)
        err = ((a - b).norm() / den).item()
        if not err <= rtol:
            raise UnsupportedModel(f"{name}: verify: the fused {what} differs from the "
                                   f"original's (normwise error {err:.2e} > {rtol:.0e})")

    close(loss, ref_loss, "loss")
    for i, (a, b) in enumerate(zip(g_out, g_ref)):
        if a is None or b is None:
            if (a is None) != (b is None):
                raise UnsupportedModel(f"{name}: verify: a gradient is missing on one side")
            continue
        close(a, b, "gradient of the head's input" if i == 0 and len(g_out) > len(params)
              else "gradient of a head parameter")
    logger.info("fusedce: %s verified (loss %.6g vs %.6g)", name, float(loss.detach().sum()),
                float(ref_loss.detach().sum()))


def _in_features(module) -> int:
    m = module
    LoraLinear, MTS = _peft_types()
    while not _plain_linear(m):
        m = _mts_active(m) if MTS is not None and isinstance(m, MTS) else m.get_base_layer()
    return m.in_features


def _param_device(module):
    return next(module.parameters()).device


def _param_dtype(module):
    return next(module.parameters()).dtype


# ---------------------------------------------------------------------------- classes


class PatchHandle:
    """What :func:`patch` did: ``patched`` (model type -> the classes patched for it: a
    causal LM and an image-text-to-text class may share a type), ``refused`` (model type ->
    reason); ``undo()`` (or leaving a ``with`` block) unpatches those classes."""

    def __init__(self):
        self.patched: Dict[str, Tuple[type, ...]] = {}
        self.refused: Dict[str, str] = {}

    def _drop(self, cls) -> None:
        self.patched = {k: tuple(c for c in v if c is not cls)
                        for k, v in self.patched.items()}
        self.patched = {k: v for k, v in self.patched.items() if v}

    def undo(self) -> None:
        for classes in self.patched.values():
            for cls in classes:
                entry = _CLASS_OPTIONS.get(cls)
                if entry is not None and entry[1] is self:
                    del _CLASS_OPTIONS[cls]
        self.patched.clear()
        _restore_classes()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()

    def __repr__(self):
        return (f"PatchHandle(patched={sorted(self.patched)}, "
                f"refused={sorted(self.refused)})")


def _family_classes(model_types: Iterable[Any]) -> List[Tuple[str, Any]]:
    """(model type, class or import error) for the given model types (or classes); every
    causal-LM and image-text-to-text family of the installed transformers when empty."""
    import transformers
    from transformers.models.auto import modeling_auto as auto

    mappings = [getattr(auto, n) for n in (
        "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
        "MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES") if hasattr(auto, n)]
    names: Dict[str, List[str]] = {}
    for m in mappings:
        for mt, cn in m.items():
            for c in (cn if isinstance(cn, (list, tuple)) else (cn,)):
                if c not in names.setdefault(mt, []):
                    names[mt].append(c)
    wanted = list(model_types) or list(names)
    out: List[Tuple[str, Any]] = []
    for mt in wanted:
        if isinstance(mt, type):
            out.append((getattr(getattr(mt, "config_class", None), "model_type", None)
                        or mt.__name__, mt))
            continue
        if mt not in names:
            raise ValueError(f"transformers {transformers.__version__} has no causal-LM or "
                             f"image-text-to-text model type {mt!r}")
        for cn in names[mt]:
            try:
                out.append((mt, getattr(transformers, cn)))
            except Exception as exc:  # a family whose optional dependency is missing
                out.append((mt, exc))
    return out


def patch(*model_types: Any, reduction: str = "mean", skip_logits: Optional[bool] = None,
          chunk_size: Union[str, int] = "auto") -> PatchHandle:
    """Patch model classes, so that every model of those families, built afterwards by any
    code (``from_pretrained``, a Trainer, TRL, a YAML-driven trainer), takes the fused path.

    Args:
        *model_types: ``config.model_type`` names ("llama", "qwen3_moe", "llava") or model
            classes; none = every causal-LM and image-text-to-text family of the installed
            transformers (imports them all: about ten seconds).
        reduction, skip_logits, chunk_size: as :func:`apply` (apply() on an instance
            overrides them for that instance).
    Returns:
        A :class:`PatchHandle`: ``patched`` and ``refused`` (with the reasons) per model
        type; ``handle.undo()``, ``unpatch(handle)`` or ``with patch(...):`` reverts it.

    A family whose forward cannot be shown equivalent is not patched (listed in
    ``refused``); naming one raises :class:`UnsupportedModel`. Checks that need an instance
    (the head's type, a PEFT adapter on it, a config flag that sends the logits elsewhere)
    run at the first fused call of each model: where they fail, that model logs a warning
    and runs its original forward.
    """
    opts = _Options(skip_logits=skip_logits, reduction=reduction, chunk_size=chunk_size)
    handle = PatchHandle()
    explicit = bool(model_types)
    for mt, cls in _family_classes(model_types):
        if isinstance(cls, Exception):
            handle.refused[mt] = f"cannot be imported ({cls})"
            continue
        original = _class_original(cls)
        try:
            _layout.analyze_forward(original, f"{cls.__name__}.forward")
        except UnsupportedModel as exc:
            handle.refused[mt] = f"{cls.__name__}: {exc}"
            if explicit:
                raise UnsupportedModel(f"{cls.__name__} ({mt}): {exc}") from None
            continue
        previous = _CLASS_OPTIONS.get(cls)
        if previous is not None and previous[1] is not handle:
            previous[1]._drop(cls)  # patched before: this handle takes the class over
        _install(cls)
        _CLASS_OPTIONS[cls] = (opts, handle)
        if cls not in handle.patched.get(mt, ()):
            handle.patched[mt] = handle.patched.get(mt, ()) + (cls,)
    return handle


def unpatch(handle: Optional[PatchHandle] = None) -> None:
    """Undo :func:`patch`: one handle, or every class-level patch when None."""
    if handle is not None:
        handle.undo()
        return
    for h in {entry[1] for entry in _CLASS_OPTIONS.values()}:
        h.undo()
    _restore_classes()


# ---------------------------------------------------------------------------- deprecated


@dataclass(frozen=True)
class Architecture:
    """Deprecated: apply() reads every family's layout from its forward."""

    decoder_attr: str = "model"
    head_attr: str = "lm_head"
    softcap_attr: Optional[str] = None


def register(model_type: str, architecture: Optional[Architecture] = None,
             **fields: Any) -> None:
    """Deprecated and without effect: apply() reads every family's head, logit transforms
    and loss from its forward's code (a per-family table could be silently wrong)."""
    warnings.warn("fusedce.integrations.transformers.register() is no longer needed: "
                  "apply() reads every family's layout from its forward (or refuses it "
                  "with the reason)", DeprecationWarning, stacklevel=2)

