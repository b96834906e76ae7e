"""TRL integration: the log-probs and entropy of TRL's trainers computed by fusedce.

TRL (>= 1.16) gives every trainer's models a fused LM head: ``add_fused_lm_head(model,
temperature, outputs=...)`` replaces ``model.forward`` so that a call with
``fused_lm_head=True`` runs the decoder and returns a ``FusedCausalLMOutput`` (``log_probs``
of the next-token labels, ``entropy``, ``is_top1``, ``mean_logits``, ``log_sum_sq_probs``,
``label_mask``, ``loss``) from the final hidden states and the head's weight, never
building the logits. SFTTrainer, DPOTrainer, KTOTrainer, GRPOTrainer and RLOOTrainer all
train through it (policy and reference model). The projection itself is one autograd
function, which TRL's fused forward looks up in ``trl.trainer.utils`` at every call, with
the hidden states of the scored positions, the head's weight and bias, the labels, the
sampling temperature, the config's final-logit softcap and logit scale, and the outputs
the trainer asked for.

This module computes that projection with fusedce and leaves everything around it to
TRL (the decoder call, label shifting, completion masks, ``num_items_in_batch``, the MoE
auxiliary loss, gathering a sharded head): with ``z = softcap(s * x) / T``,

    log_probs = fusedce.linear_logprobs(h, W, y, bias=b, logit_scale=s/T, softcap=c/T)
    entropy   = the entropy of softmax(z), from the same call (``return_entropy=True``)

since ``(c/T) * tanh((s/T) * x / (c/T)) = c * tanh(s * x / c) / T``: a temperature after a
softcap is a softcap and a scale of their own. Both outputs are differentiable (GRPO's
entropy bonus trains through the entropy). ``is_top1``, ``mean_logits`` and
``log_sum_sq_probs`` feed metrics only (and DPO's WPO weights, without gradient): they come
from one extra no-grad pass over row chunks of the logits when a trainer asks for them
(``mean_logits`` alone, without a softcap, is linear in ``h`` and needs no pass).

Entry points:

* :func:`apply` ``(trainer)`` after the trainer is built: its model (under PEFT, the base
  model) and reference model compute through fusedce. ``apply(model)`` covers one model,
  before or after a trainer wraps it. :func:`revert` undoes either.
* :func:`patch` before building a trainer (scripts that build it for you): every TRL
  fused LM head in the process computes through fusedce. :func:`unpatch` undoes it.
* :func:`count_calls` counts the fusedce calls made inside a ``with`` block, and
  :func:`stats` counts the fused-head calls each path served.

The log (``logging.getLogger("fusedce")``) says which path runs: an info line when a
model's head is taken over and when it first computes (with its temperature, softcap and
scale), a warning whenever a call of TRL's fused head stays on TRL's kernel (a head
fusedce was not applied to, an option fusedce cannot honour, DeepSpeed ZeRO-3, a TRL
version whose fused head is not the one described here) and for trainer options whose loss
does not come from the fused head at all (SFT's label smoothing and ``compute_loss_func``).

Tested with TRL 1.16 and transformers 5.x; TRL is an optional dependency
(``pip install fusedce[trl]``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import weakref
from collections import Counter
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import fusedce as _fce

__all__ = [
    "OUTPUTS",
    "apply",
    "count_calls",
    "head_logprobs",
    "is_applied",
    "is_patched",
    "patch",
    "revert",
    "stats",
    "unpatch",
]

logger = logging.getLogger("fusedce")

#: The per-token outputs of TRL's fused LM head, in the order its autograd function returns
#: them (each None when not asked for).
OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")

# the parameters of TRL's chunked log-prob function (after ctx) that this module reads; a
# TRL whose function takes others is not taken over
_TRL_PARAMS = ("hidden", "weight", "bias", "targets", "temperature", "chunk_size",
               "final_logit_softcapping", "logit_scale", "outputs")
_TRL_NAME = "_ChunkedLogProbFunction"

# id(head weight) -> (weak reference to it, a label for the log)
_HEADS: Dict[int, Tuple[weakref.ref, str]] = {}
_PATCHED = [False]
_STATS: Counter = Counter()
_LOGGED: set = set()


def _once(key, level: int, msg: str) -> None:
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    logger.log(level, msg)


# ------------------------------------------------------------------------------ the math


def _same_dtype(hidden, weight, bias):
    """The operands in one dtype, as TRL's head computes: the autocast dtype under autocast
    (fusedce casts then), else the hidden states' dtype (``cast_lm_head_to_fp32`` passes fp32
    hidden states with a bf16 head)."""
    dev = hidden.device.type
    try:
        autocast = torch.is_autocast_enabled(dev)
    except TypeError:  # pragma: no cover - torch without the device argument
        autocast = torch.is_autocast_enabled()
    if autocast:
        return hidden, weight, bias
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    if bias is not None and bias.dtype != hidden.dtype:
        bias = bias.to(hidden.dtype)
    return hidden, weight, bias


def _transformed(x: torch.Tensor, scale: float, cap: Optional[float]) -> torch.Tensor:
    """z = cap * tanh(scale * x / cap) (or scale * x), in fp32."""
    x = x.float()
    if cap is None:
        return x * scale
    return torch.tanh(x * (scale / cap)) * cap


def _chunk_rows(n: int, v: int, device: torch.device) -> int:
    from fusedce.linear import auto_chunk_rows

    return auto_chunk_rows(max(n, 1), v, torch.float32, device)


@torch.no_grad()
def _metric_outputs(hidden, weight, bias, targets, scale, cap, wanted) -> Dict[str, torch.Tensor]:
    """is_top1, mean_logits and log_sum_sq_probs (no gradient) for the rows of ``hidden``."""
    n, v = hidden.shape[0], weight.shape[0]
    out: Dict[str, torch.Tensor] = {}
    if wanted == {"mean_logits"} and cap is None:
        # the mean of scale * (W h + b) over the vocabulary is linear in h: no logits needed
        w_sum = weight.sum(0, dtype=torch.float32)
        b_sum = 0.0 if bias is None else bias.sum(dtype=torch.float32)
        out["mean_logits"] = (hidden.float() @ w_sum + b_sum) * (scale / v)
        return out
    dev = hidden.device
    if "is_top1" in wanted:
        out["is_top1"] = torch.zeros(n, dtype=torch.bool, device=dev)
    for name in ("mean_logits", "log_sum_sq_probs"):
        if name in wanted:
            out[name] = torch.zeros(n, dtype=torch.float32, device=dev)
    rows = _chunk_rows(n, v, dev)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        z = _transformed(F.linear(hidden[r0:r1], weight, bias), scale, cap)
        if "is_top1" in out:
            # argmax returns the first maximum: a tie with an earlier class is not a hit
            out["is_top1"][r0:r1] = z.argmax(-1) == targets[r0:r1]
        if "mean_logits" in out:
            out["mean_logits"][r0:r1] = z.mean(-1)
        if "log_sum_sq_probs" in out:
            out["log_sum_sq_probs"][r0:r1] = torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1)
    return out


def head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                  bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                  softcap: Optional[float] = None, logit_scale: float = 1.0,
                  outputs: Sequence[str] = ("log_probs",),
                  chunk_size: Any = "auto") -> Tuple[Optional[torch.Tensor], ...]:
    """TRL's fused-head outputs of ``z = softcap(logit_scale * (hidden @ weight.T + bias)) /
    temperature``, computed by fusedce without materialising the logits.

    Args:
        hidden: [N, D] final hidden states of the scored positions.
        weight: [V, D] LM head; bias: optional [V].
        targets: [N] next-token ids (``-100`` rows give 0 and no gradient).
        temperature: sampling temperature T (> 0).
        softcap: final-logit softcap c (z = c * tanh(x / c) before the temperature), or None.
        logit_scale: multiplier of the logits before the softcap (> 0).
        outputs: names among :data:`OUTPUTS`; ``log_probs`` is always computed.
        chunk_size: rows per chunk for fusedce ("auto": its memory budget).
    Returns:
        ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``, [N] each (fp32;
        is_top1 bool), None where not asked for. log_probs and entropy are differentiable
        with respect to hidden, weight and bias; the others carry no gradient.
    """
    unknown = set(outputs) - set(OUTPUTS)
    if unknown:
        raise ValueError(f"unknown outputs {sorted(unknown)}; known: {OUTPUTS}")
    scale = float(logit_scale) / float(temperature)
    cap = None if softcap is None else float(softcap) / float(temperature)
    hidden, weight, bias = _same_dtype(hidden, weight, bias)
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    kw: Dict[str, Any] = dict(bias=bias, logit_scale=scale, softcap=cap, chunk_size=chunk_size,
                              inference_only=not grad)
    if grad and weight.requires_grad and weight.dtype in (torch.bfloat16, torch.float16):
        # one fp32 rounding of the head's gradient, as TRL's kernel accumulates it
        kw["accum_dtype"] = torch.float32
    entropy = None
    if "entropy" in outputs:
        log_probs, entropy = _fce.linear_logprobs(hidden, weight, targets, return_entropy=True,
                                                  **kw)
    else:
        log_probs = _fce.linear_logprobs(hidden, weight, targets, **kw)
    wanted = {"is_top1", "mean_logits", "log_sum_sq_probs"} & set(outputs)
    extra = _metric_outputs(hidden.detach(), weight.detach(),
                            None if bias is None else bias.detach(), targets, scale, cap,
                            wanted) if wanted else {}
    return (log_probs, entropy, extra.get("log_sum_sq_probs"), extra.get("mean_logits"),
            extra.get("is_top1"))


# ------------------------------------------------------------ standing in for TRL's kernel


def _trl_utils():
    import trl.trainer.utils as tu

    return tu


def _trl_fused_forward_code(tu):
    """The code object of the forward TRL's add_fused_lm_head installs (None if not found)."""
    add = getattr(tu, "add_fused_lm_head", None)
    code = getattr(add, "__code__", None)
    if code is None:
        return None
    for const in code.co_consts:
        if inspect.iscode(const) and _TRL_NAME in const.co_names:
            return const
    return None


def _trl_problem(tu, original) -> Optional[str]:
    """Why this TRL's fused head cannot be taken over (None: it can)."""
    if original is None or not hasattr(original, "apply") or not hasattr(original, "forward"):
        return f"trl.trainer.utils has no {_TRL_NAME} autograd function"
    params = tuple(inspect.signature(original.forward).parameters)[1:]
    if params[:len(_TRL_PARAMS)] != _TRL_PARAMS:
        return (f"TRL's {_TRL_NAME} takes {params}, not the {_TRL_PARAMS} this integration "
                "was written for")
    if _trl_fused_forward_code(tu) is None:
        return f"TRL's add_fused_lm_head does not call {_TRL_NAME}"
    return None


def _registered(weight) -> Optional[str]:
    entry = _HEADS.get(id(weight))
    if entry is not None and entry[0]() is weight:
        return entry[1]
    return None


class _FusedceHead:
    """Stands in for TRL's chunked log-prob autograd function in ``trl.trainer.utils``: the
    heads fusedce is applied to (or every head, after :func:`patch`) compute through
    :func:`head_logprobs`, the others through TRL's function."""

    def __init__(self, original):
        self.original = original
        self.signature = inspect.signature(original.forward)

    def __getattr__(self, name):
        return getattr(self.original, name)

    def _why_not(self, a) -> Optional[str]:
        weight, outputs = a["weight"], a.get("outputs", OUTPUTS)
        t, c, s = a["temperature"], a.get("final_logit_softcapping"), a.get("logit_scale", 1.0)
        if hasattr(weight, "ds_id"):
            return ("a DeepSpeed ZeRO-3 head is gathered only while TRL's kernel runs, and "
                    "fusedce's backward reads it again")
        if set(outputs) - set(OUTPUTS):
            return f"outputs {sorted(set(outputs) - set(OUTPUTS))} unknown to fusedce"
        for name, v in (("temperature", t), ("logit_scale", s)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < float("inf"):
                return f"{name}={v!r} (fusedce takes positive finite numbers)"
        if c is not None and (not isinstance(c, (int, float)) or not 0 < c < float("inf")):
            return f"final_logit_softcapping={c!r} (fusedce takes None or a positive number)"
        return None

    def apply(self, *args, **kwargs):
        try:
            a = self.signature.bind(None, *args, **kwargs).arguments
        except TypeError:
            _STATS["trl"] += 1
            _once("bind", logging.WARNING,
                  "fusedce.integrations.trl: TRL's fused LM head was called with arguments "
                  "this integration does not know; TRL's kernel computes it")
            return self.original.apply(*args, **kwargs)
        weight = a["weight"]
        label = "every TRL fused head (patch())" if _PATCHED[0] else _registered(weight)
        if label is None:
            _STATS["trl"] += 1
            _once(("unregistered", id(weight)), logging.WARNING,
                  f"fusedce.integrations.trl: TRL's fused LM head of a model fusedce was not "
                  f"applied to (head {tuple(weight.shape)}) runs TRL's kernel: call "
                  "fusedce.integrations.trl.apply(trainer) after building the trainer (it "
                  "covers the reference model the trainer builds), or patch() before")
            return self.original.apply(*args, **kwargs)
        why = self._why_not(a)
        if why is not None:
            _STATS["trl"] += 1
            _once(("unsupported", label, why), logging.WARNING,
                  f"fusedce.integrations.trl: {label}: {why}; TRL's kernel computes its "
                  "log-probs")
            return self.original.apply(*args, **kwargs)
        outputs = tuple(a.get("outputs", OUTPUTS))
        t, c = a["temperature"], a.get("final_logit_softcapping")
        s = a.get("logit_scale", 1.0)
        _once(("path", label, outputs, t, c, s), logging.INFO,
              f"fusedce.integrations.trl: {label}: {', '.join(outputs)} through "
              f"fusedce.linear_logprobs (temperature={t}, softcap={c}, logit_scale={s})")
        _STATS["fusedce"] += 1
        return head_logprobs(a["hidden"], weight, a["targets"], bias=a.get("bias"),
                             temperature=t, softcap=c, logit_scale=s, outputs=outputs)


def _install() -> bool:
    """Put the stand-in in place of TRL's function (idempotent); False (with a warning) when
    TRL is missing or is not the version this integration knows."""
    try:
        tu = _trl_utils()
    except ImportError:
        logger.warning("fusedce.integrations.trl: trl is not installed; nothing to apply")
        return False
    current = getattr(tu, _TRL_NAME, None)
    if isinstance(current, _FusedceHead):
        return True
    problem = _trl_problem(tu, current)
    if problem is not None:
        import trl

        _once(("trl", problem), logging.WARNING,
              f"fusedce.integrations.trl: {problem} (trl {getattr(trl, '__version__', '?')}); "
              "TRL's own fused LM head runs")
        return False
    setattr(tu, _TRL_NAME, _FusedceHead(current))
    return True


def _uninstall_if_idle() -> None:
    if _PATCHED[0] or any(ref() is not None for ref, _ in _HEADS.values()):
        return
    try:
        tu = _trl_utils()
    except ImportError:
        return
    current = getattr(tu, _TRL_NAME, None)
    if isinstance(current, _FusedceHead):
        setattr(tu, _TRL_NAME, current.original)


# ---------------------------------------------------------------- trainers and models


def _is_trainer(obj) -> bool:
    return not isinstance(obj, torch.nn.Module) and isinstance(getattr(obj, "model", None),
                                                              torch.nn.Module)


def _base_model(model):
    # TRL gives the head to the model under a PEFT wrapper
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _models_of(target) -> List[Tuple[str, torch.nn.Module]]:
    if not _is_trainer(target):
        return [("model", target)]
    found, seen = [], set()
    for attr in ("model", "ref_model", "teacher_model"):
        m = getattr(target, attr, None)
        if isinstance(m, torch.nn.Module) and id(_base_model(m)) not in seen:
            seen.add(id(_base_model(m)))
            found.append((f"trainer.{attr}", m))
    return found


def _is_trl_forward(model) -> bool:
    fn = getattr(model.__dict__.get("forward"), "__func__", None)
    try:
        code = _trl_fused_forward_code(_trl_utils())
    except ImportError:
        return False
    return code is not None and getattr(fn, "__code__", None) is code


def _lift_hf_integration(model, label: str) -> None:
    """fusedce.integrations.transformers.apply() after the trainer was built puts a forward
    without ``fused_lm_head`` above TRL's fused head, so the trainer's fused calls would not
    reach it: that patch is undone (the trainer's losses all come from the fused head)."""
    if "forward" not in model.__dict__ or _is_trl_forward(model):
        return
    try:
        from . import transformers as fce_hf
    except ImportError:  # pragma: no cover - transformers is TRL's dependency
        return
    is_applied, revert = getattr(fce_hf, "is_applied", None), getattr(fce_hf, "revert", None)
    if is_applied is None or revert is None or not is_applied(model):
        return
    revert(model)
    if _is_trl_forward(model):
        logger.warning(
            f"fusedce.integrations.trl: {label}: fusedce.integrations.transformers.apply() "
            "ran after the trainer added TRL's fused LM head and hid it (its fused_lm_head "
            "calls return no log_probs); reverted it: the trainer's log-probs and losses "
            "come from the fused head, which fusedce now computes")


def _trainer_warnings(trainer) -> None:
    args = getattr(trainer, "args", None)
    name = type(trainer).__name__
    if getattr(trainer, "compute_loss_func", None) is not None and hasattr(args, "loss_type"):
        logger.warning(f"fusedce.integrations.trl: {name} with compute_loss_func computes its "
                       "loss from the full logits of the model's own forward, not through "
                       "fusedce; fusedce computes the fused head's metrics only")
    if (getattr(args, "label_smoothing_factor", 0) or 0) > 0 and \
            getattr(args, "loss_type", None) == "nll" and name.startswith("SFT"):
        logger.warning(f"fusedce.integrations.trl: {name} with label_smoothing_factor computes "
                       "its loss from the full logits of the model's own forward, not through "
                       "fusedce; fusedce computes the fused head's metrics only")


def apply(target, *, label: Optional[str] = None):
    """Compute the log-probs and entropy of TRL's fused LM head with fusedce.

    Args:
        target: a TRL trainer (after it is built: its model, or the base model under PEFT,
            and its reference model are covered) or a causal LM (before or after a trainer
            is built around it; a reference model the trainer builds later is not covered,
            and says so in a warning at its first call).
        label: the name the log gives the model (default: its class), followed by its
            attribute on the trainer.
    Returns:
        ``target``. :func:`revert` undoes it. Nothing changes (a warning says why) when TRL
        is missing or its fused head is not the one this integration knows.
    """
    if not _install():
        return target
    heads = []
    for attr, model in _models_of(target):
        base = _base_model(model)
        name = f"{label or type(base).__name__} ({attr})"
        _lift_hf_integration(base, name)
        get_head = getattr(base, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        weight = getattr(head, "weight", None)
        if not isinstance(weight, torch.Tensor):
            logger.warning(f"fusedce.integrations.trl: {name} has no LM head weight "
                           "(get_output_embeddings()); left to TRL")
            continue
        _HEADS[id(weight)] = (weakref.ref(weight), name)
        heads.append(weight)
        if _is_dtensor(weight):
            # TRL gathers a sharded head into a new tensor at every call, which no
            # per-model registry can recognise
            patch()
            logger.info(f"fusedce.integrations.trl: {name} has a DTensor (sharded) LM head, "
                        "gathered by TRL at each call: every TRL fused head now computes "
                        "through fusedce (patch())")
        if _is_trl_forward(base):
            logger.info(f"fusedce.integrations.trl: {name}: TRL's fused LM head computes "
                        "through fusedce")
        elif "forward" in base.__dict__:
            logger.warning(f"fusedce.integrations.trl: {name}.forward is not TRL's fused LM "
                           "head (another wrapper?): fusedce computes its log-probs only if "
                           "that wrapper calls TRL's; stats() counts which path ran")
        else:
            logger.info(f"fusedce.integrations.trl: {name}: the fused LM head TRL adds when "
                        "a trainer is built computes through fusedce")
    if _is_trainer(target):
        _trainer_warnings(target)
    holder = target.__dict__ if hasattr(target, "__dict__") else {}
    holder["_fusedce_trl_heads"] = [weakref.ref(w) for w in heads]
    return target


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def revert(target):
    """Undo :func:`apply` on ``target`` (a trainer or a model); returns it."""
    refs = getattr(target, "__dict__", {}).pop("_fusedce_trl_heads", None)
    if refs is None:
        return target
    for ref in refs:
        w = ref()
        if w is not None and _registered(w) is not None:
            del _HEADS[id(w)]
    _uninstall_if_idle()
    return target


def is_applied(target) -> bool:
    """Whether :func:`apply` covers ``target``'s (or the trainer's model's) LM head."""
    for _, model in _models_of(target):
        head = getattr(_base_model(model), "get_output_embeddings", lambda: None)()
        w = getattr(head, "weight", None)
        if w is not None and _registered(w) is not None:
            return True
    return False


def patch() -> None:
    """Every TRL fused LM head in this process computes through fusedce (models and trainers
    built before or after); :func:`unpatch` undoes it."""
    if _install():
        _PATCHED[0] = True
        logger.info("fusedce.integrations.trl: every TRL fused LM head computes through fusedce")


def unpatch() -> None:
    """Undo :func:`patch` (heads :func:`apply` covers stay covered)."""
    _PATCHED[0] = False
    _uninstall_if_idle()


def is_patched() -> bool:
    return _PATCHED[0]


def stats() -> Counter:
    """How many TRL fused-head calls each path served since import: ``{"fusedce": n,
    "trl": m}`` (a copy)."""
    return Counter(_STATS)


@contextlib.contextmanager
def count_calls() -> Iterator[Counter]:
    """Count the calls of fusedce's public functions made inside the block.

    Yields a Counter keyed by function name (``linear_logprobs``, ``linear_cross_entropy``,
    ``entropy``, ``logprobs``, ``cross_entropy``), filled while the block runs. The
    functions are replaced on the ``fusedce`` package by counting wrappers, so only calls
    made through the package (as this module makes them) are counted.
    """
    counts: Counter = Counter()
    names = ("linear_logprobs", "linear_cross_entropy", "entropy", "logprobs", "cross_entropy")
    saved = {n: getattr(_fce, n) for n in names if hasattr(_fce, n)}

    def counting(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    for n, fn in saved.items():
        setattr(_fce, n, counting(n, fn))
    try:
        yield counts
    finally:
        for n, fn in saved.items():
            setattr(_fce, n, fn)
