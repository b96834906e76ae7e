"""What a transformers causal-LM forward does between its LM head and its loss.

The fused forward of :mod:`fusedce.integrations.transformers` runs a model's own forward
and only replaces two things for one call: the LM head (which returns a small placeholder
instead of the [B, S, V] logits) and ``self.loss_function`` (which returns the loss fusedce
computed from the head's input). Everything else the forward does (the decoder, caches,
router auxiliary losses, hidden states, attentions) runs as written.

That is only equivalent when the forward's code between the head and the loss is a chain
fusedce can reproduce: elementwise scalings (``logits * self.logit_scale``,
``logits / self.config.logits_scaling``, ``self.lm_head(h) * self.model.lm_head_multiplier``),
one tanh softcap (``c * tanh(x / c)``, under any config name), dtype casts, each possibly
under an ``if`` on the configuration, followed by one call of ``self.loss_function(logits,
labels, vocab_size, **kwargs)`` with the forward's own labels and kwargs. This module reads
the forward's source (its syntax tree), checks exactly that, and refuses anything else with
the reason: a transform it cannot read (a module call, vocabulary slicing), a loss computed
another way (``CrossEntropyLoss`` on the logits, several heads), the logits used after the
loss (a z-loss on them), labels rewritten before the loss.

The transforms' values are not copied at analysis time: the expressions (``self.config.x``,
``self.logit_scale``) are evaluated on the model at each call, so a changed config is
followed.
"""

from __future__ import annotations

import ast
import inspect
import math
import operator
import textwrap
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["Refused", "Layout", "analyze_forward", "Transform", "canonical"]


class Refused(ValueError):
    """The model's layout cannot be shown equivalent to a fused linear cross-entropy."""


Cond = Tuple[ast.expr, bool]  # (test, polarity): the statement runs when bool(test) == polarity


@dataclass
class Step:
    """One statement of the head-to-loss chain: ``ops`` run when every cond holds."""

    ops: List[Tuple[str, Optional[ast.expr]]]  # ("mul"|"div", value) / ("tanh"|"cast", None)
    conds: Tuple[Cond, ...] = ()
    line: int = 0
    head: bool = False  # the head's own line: its conditions must hold


@dataclass
class Bind:
    """A local the transforms read (``cap = self.config.logits_soft_cap``)."""

    name: str
    value: ast.expr
    conds: Tuple[Cond, ...] = ()


@dataclass
class Layout:
    """The statically proven shape of a causal-LM forward."""

    qualname: str
    head_attr: str  # the forward calls ``self.<head_attr>(hidden)``
    logits_name: str
    steps: List[Any]  # Bind and Step actions, in source order (the first Step: the head)
    guards: List[Tuple[Tuple[Cond, ...], int, str]] = field(default_factory=list)
    # conditions that must NOT all hold at call time (they guard a use of the logits that
    # fusedce does not reproduce, e.g. a z-loss over all positions); (conds, line, what)
    var_kw: Optional[str] = None
    params: Tuple[str, ...] = ()
    has_return_dict: bool = False
    adds_to_loss: bool = False  # the forward adds terms to the loss after the call


@dataclass(frozen=True)
class Transform:
    """z = softcap * tanh(logit_scale * x / softcap) (softcap None: z = logit_scale * x)."""

    logit_scale: float = 1.0
    softcap: Optional[float] = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.double() * self.logit_scale
        if self.softcap is not None:
            x = self.softcap * torch.tanh(x / self.softcap)
        return x


_CACHE: Dict[Any, Any] = {}


def _unwrap(fn):
    fn = getattr(fn, "__fusedce_original__", fn)
    return inspect.unwrap(fn)


def analyze_forward(fn, qualname: str = "") -> Layout:
    """The :class:`Layout` of a causal-LM ``forward`` function, or :class:`Refused`.

    Cached per function object (refusals too).
    """
    fn = _unwrap(fn)
    key = getattr(fn, "__code__", fn)
    hit = _CACHE.get(key)
    if hit is None:
        try:
            hit = _analyze(fn, qualname or getattr(fn, "__qualname__", str(fn)))
        except Refused as exc:
            hit = exc
        _CACHE[key] = hit
    if isinstance(hit, Refused):
        raise Refused(str(hit))
    return hit


# ---------------------------------------------------------------------------- helpers


def _self_attr(node: ast.AST) -> Optional[str]:
    """``attr`` for ``self.attr``, else None."""
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id == "self"):
        return node.attr
    return None


def _is_loss_call(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and _self_attr(node.func) == "loss_function"


def _names_read(node: ast.AST) -> set:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)
            and isinstance(n.ctx, ast.Load)}


def _flatten(body: Sequence[ast.stmt], conds: Tuple[Cond, ...] = ()):
    """Statements in source order with the ``if`` conditions that enclose them. Other
    compound statements (loops, with, try) are kept whole (marked opaque)."""
    for st in body:
        if isinstance(st, ast.If):
            yield from _flatten(st.body, conds + ((st.test, True),))
            yield from _flatten(st.orelse, conds + ((st.test, False),))
        else:
            opaque = isinstance(st, (ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith,
                                     ast.Try, ast.FunctionDef, ast.ClassDef, ast.Match)
                                ) if hasattr(ast, "Match") else isinstance(
                st, (ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try,
                     ast.FunctionDef, ast.ClassDef))
            yield st, conds, opaque


# ``labels`` is readable only as ``labels is not None`` (true on every fused call)
_EVAL_NAMES = ("self", "torch", "math", "None", "True", "False", "labels")
LABELS_PRESENT = object()
_CMP_OPS = (ast.Is, ast.IsNot, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)
_BIN_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)


def _evaluable(e: ast.AST, bound: set) -> bool:
    """Whether :func:`evaluate` can compute ``e`` from the model alone (config reads,
    attributes, constants), never from the call's tensors."""
    if isinstance(e, ast.Constant):
        return True
    if isinstance(e, ast.Name):
        return e.id in _EVAL_NAMES or e.id in bound
    if isinstance(e, ast.Attribute):
        return _evaluable(e.value, bound)
    if isinstance(e, ast.Call):
        if (isinstance(e.func, ast.Name) and e.func.id == "getattr" and not e.keywords
                and len(e.args) in (2, 3) and isinstance(e.args[1], ast.Constant)
                and isinstance(e.args[1].value, str)):
            return all(_evaluable(a, bound) for a in e.args)
        return (isinstance(e.func, ast.Attribute) and e.func.attr == "get_text_config"
                and not e.args and not e.keywords and _evaluable(e.func.value, bound))
    if isinstance(e, ast.Compare):
        return (all(isinstance(op, _CMP_OPS) for op in e.ops)
                and _evaluable(e.left, bound)
                and all(_evaluable(c, bound) for c in e.comparators))
    if isinstance(e, ast.BoolOp):
        return all(_evaluable(v, bound) for v in e.values)
    if isinstance(e, ast.UnaryOp):
        return isinstance(e.op, (ast.Not, ast.USub, ast.UAdd)) and _evaluable(e.operand, bound)
    if isinstance(e, ast.BinOp):
        return isinstance(e.op, _BIN_OPS) and _evaluable(e.left, bound) and \
            _evaluable(e.right, bound)
    if isinstance(e, ast.NamedExpr):
        if _evaluable(e.value, bound):
            bound.add(e.target.id)
            return True
        return False
    return False


_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.Pow: operator.pow}
_CMP = {ast.Is: operator.is_, ast.IsNot: operator.is_not, ast.Eq: operator.eq,
        ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
        ast.Gt: operator.gt, ast.GtE: operator.ge}


def evaluate(e: ast.AST, env: Dict[str, Any]) -> Any:
    """Evaluate an expression that :func:`_evaluable` accepted; ``env`` holds ``self`` and
    receives walrus bindings."""
    if isinstance(e, ast.Constant):
        return e.value
    if isinstance(e, ast.Name):
        if e.id in env:
            return env[e.id]
        return {"torch": torch, "math": math, "None": None, "True": True,
                "False": False}[e.id]
    if isinstance(e, ast.Attribute):
        return getattr(evaluate(e.value, env), e.attr)
    if isinstance(e, ast.Call):
        if isinstance(e.func, ast.Name):  # getattr(obj, "name"[, default])
            return getattr(*[evaluate(a, env) for a in e.args])
        return getattr(evaluate(e.func.value, env), e.func.attr)()
    if isinstance(e, ast.Compare):
        left = evaluate(e.left, env)
        for op, comp in zip(e.ops, e.comparators):
            right = evaluate(comp, env)
            if not _CMP[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(e, ast.BoolOp):
        result = None
        for v in e.values:
            result = evaluate(v, env)
            if isinstance(e.op, ast.And) and not result:
                return result
            if isinstance(e.op, ast.Or) and result:
                return result
        return result
    if isinstance(e, ast.UnaryOp):
        v = evaluate(e.operand, env)
        return (not v) if isinstance(e.op, ast.Not) else (-v if isinstance(e.op, ast.USub)
                                                           else +v)
    if isinstance(e, ast.BinOp):
        return _BIN[type(e.op)](evaluate(e.left, env), evaluate(e.right, env))
    if isinstance(e, ast.NamedExpr):
        v = evaluate(e.value, env)
        env[e.target.id] = v
        return v
    raise Refused(f"cannot evaluate {ast.unparse(e)}")  # pragma: no cover - checked before


def conds_hold(conds: Sequence[Cond], env: Dict[str, Any]) -> bool:
    for test, polarity in conds:
        if bool(evaluate(test, env)) != polarity:
            return False
    return True


# ---------------------------------------------------------------------------- the chain

_TANH_FUNCS = ("torch.tanh", "nn.functional.tanh", "F.tanh", "torch.nn.functional.tanh")
_CAST_METHODS = ("float", "to", "type_as", "contiguous")


def _chain(e: ast.expr, logits: Optional[str], bound: set):
    """Parse ``e`` as a transform chain over the head call or the logits name.

    Returns (base, ops): base is ("head", attr, call node) or ("var",); None when ``e`` is
    not such a chain.
    """
    ops: List[Tuple[str, Optional[ast.expr]]] = []
    while True:
        if isinstance(e, ast.Name) and logits is not None and e.id == logits:
            return ("var",), ops[::-1]
        if isinstance(e, ast.Call):
            attr = _self_attr(e.func)
            if attr is not None and attr != "loss_function":
                if len(e.args) != 1 or e.keywords or isinstance(e.args[0], ast.Starred):
                    return None
                return ("head", attr, e), ops[::-1]
            f = e.func
            if (isinstance(f, ast.Attribute) and f.attr in _CAST_METHODS
                    and not e.keywords and len(e.args) <= 1
                    and (not e.args or f.attr == "type_as" or _evaluable(e.args[0], set(bound)))):
                ops.append(("cast", None))
                e = f.value
                continue
            if ast.unparse(f) in _TANH_FUNCS and len(e.args) == 1 and not e.keywords:
                ops.append(("tanh", None))
                e = e.args[0]
                continue
            if isinstance(f, ast.Attribute) and f.attr == "tanh" and not e.args:
                ops.append(("tanh", None))
                e = f.value
                continue
            return None
        if isinstance(e, ast.BinOp) and isinstance(e.op, (ast.Mult, ast.Div)):
            if _evaluable(e.right, set(bound)):
                ops.append(("mul" if isinstance(e.op, ast.Mult) else "div", e.right))
                e = e.left
                continue
            if isinstance(e.op, ast.Mult) and _evaluable(e.left, set(bound)):
                ops.append(("mul", e.left))
                e = e.right
                continue
            return None
        return None


def _src(fn) -> Tuple[ast.FunctionDef, int]:
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError) as exc:
        raise Refused(f"its forward's source is not available ({exc})") from exc
    tree = ast.parse(textwrap.dedent(source))
    fdef = tree.body[0]
    if not isinstance(fdef, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise Refused("its forward is not a plain function")
    return fdef, fn.__code__.co_firstlineno - 1


def _stores(st: ast.AST, name: str) -> bool:
    return any(isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Store)
               for n in ast.walk(st))


def _reads(st: ast.AST, name: str) -> List[ast.Name]:
    return [n for n in ast.walk(st) if isinstance(n, ast.Name) and n.id == name
            and isinstance(n.ctx, ast.Load)]


# loss keywords ForCausalLMLoss acts on: fixed by the fused call, so the forward must not set
# them itself (any other keyword reaches fixed_cross_entropy's **kwargs, which ignores it)
_LOSS_ACTS_ON = ("num_items_in_batch", "ignore_index", "shift_labels")


def _analyze(fn, qualname: str) -> Layout:
    fdef, line0 = _src(fn)
    args = fdef.args
    params = tuple(a.arg for a in args.posonlyargs + args.args + args.kwonlyargs)
    var_kw = args.kwarg.arg if args.kwarg is not None else None
    if "labels" not in params:
        raise Refused("its forward takes no labels")

    def where(node) -> str:
        return f"line {line0 + getattr(node, 'lineno', 1)}"

    loss_calls = [n for n in ast.walk(fdef) if _is_loss_call(n)]
    if not loss_calls:
        raise Refused("its forward does not compute the loss with self.loss_function "
                      "(transformers' ForCausalLMLoss): it computes it another way")
    if len(loss_calls) > 1:
        raise Refused("its forward calls self.loss_function more than once")
    call = loss_calls[0]

    flat = list(_flatten(fdef.body))
    loss_at = None
    for i, (st, conds, opaque) in enumerate(flat):
        if any(n is call for n in ast.walk(st)):
            loss_at = i
            if opaque:
                raise Refused(f"its loss is computed inside a loop or block ({where(st)})")
            if not (isinstance(st, ast.Assign) and len(st.targets) == 1
                    and isinstance(st.targets[0], ast.Name) and st.value is call):
                raise Refused(f"its loss call is not a plain assignment ({where(st)})")
            for test, pol in conds:
                if not (pol and ast.unparse(test) == "labels is not None"):
                    raise Refused(f"its loss is computed under the condition "
                                  f"{ast.unparse(test)!r} ({where(st)})")
    assert loss_at is not None
    loss_name = flat[loss_at][0].targets[0].id

    # the call's arguments: (logits, labels, vocab_size, **kwargs)
    slots = ["logits", "labels", "vocab_size"]
    got: Dict[str, ast.expr] = {}
    if len(call.args) > 3 or any(isinstance(a, ast.Starred) for a in call.args):
        raise Refused(f"its loss call takes unexpected positional arguments ({where(call)})")
    for name, a in zip(slots, call.args):
        got[name] = a
    splat = False
    for kw in call.keywords:
        if kw.arg is None:
            if not (isinstance(kw.value, ast.Name) and kw.value.id == var_kw):
                raise Refused(f"its loss call passes **{ast.unparse(kw.value)}, not the "
                              f"forward's own **{var_kw} ({where(call)})")
            splat = True
        elif kw.arg in slots and kw.arg not in got:
            got[kw.arg] = kw.value
        elif kw.arg in _LOSS_ACTS_ON or kw.arg in slots:
            raise Refused(f"its loss call sets {kw.arg}= itself ({where(call)}): the loss "
                          "is not the plain shifted causal-LM loss of its labels")
    if var_kw is not None and not splat:
        raise Refused(f"its loss call does not pass the forward's **{var_kw} "
                      f"(num_items_in_batch would be lost) ({where(call)})")
    logits_node = got.get("logits")
    if not isinstance(logits_node, ast.Name):
        raise Refused(f"its loss call's logits are not a plain variable ({where(call)})")
    if not (isinstance(got.get("labels"), ast.Name) and got["labels"].id == "labels"):
        raise Refused(f"its loss call does not pass the forward's labels ({where(call)})")
    X = logits_node.id

    # labels and kwargs reach the loss unchanged
    for st, conds, opaque in flat[:loss_at]:
        for n in ast.walk(st):
            targets = []
            if isinstance(n, ast.Assign):
                targets = n.targets
            elif isinstance(n, (ast.AugAssign, ast.AnnAssign, ast.NamedExpr)):
                targets = [n.target]
            elif isinstance(n, ast.Delete):
                targets = n.targets
            for t in targets:
                if isinstance(t, ast.Name) and t.id == "labels":
                    v = getattr(n, "value", None)
                    if not (isinstance(v, ast.Call) and isinstance(v.func, ast.Attribute)
                            and v.func.attr == "to" and isinstance(v.func.value, ast.Name)
                            and v.func.value.id == "labels"):
                        raise Refused(f"its forward rewrites the labels before the loss "
                                      f"({where(n)}: {ast.unparse(n)})")
                if isinstance(t, ast.Name) and t.id == var_kw:
                    raise Refused(f"its forward reassigns **{var_kw} before the loss "
                                  f"({where(n)})")
                if (isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name)
                        and t.value.id == var_kw):
                    key = t.slice
                    if not (isinstance(key, ast.Constant) and key.value not in _LOSS_ACTS_ON):
                        raise Refused(f"its forward sets a loss kwarg ({where(n)}: "
                                      f"{ast.unparse(n)})")
            if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                    and isinstance(n.func.value, ast.Name) and n.func.value.id == var_kw
                    and n.func.attr in ("pop", "update", "setdefault", "clear", "popitem")):
                key = n.args[0] if n.args else None
                if not (n.func.attr in ("pop", "setdefault") and isinstance(key, ast.Constant)
                        and key.value not in _LOSS_ACTS_ON):
                    raise Refused(f"its forward changes its **{var_kw} before the loss "
                                  f"({where(n)}: {ast.unparse(n)})")

    # the head assignment, the transforms, and the config reads they use (in order)
    guards: List[Tuple[Tuple[Cond, ...], int, str]] = []
    bound: set = set()
    actions: List[Any] = []
    head_attr = None
    handled = set()
    for i, (st, conds, opaque) in enumerate(flat):
        for test, _ in conds:
            _evaluable(test, bound)  # collects walrus names
        if i > loss_at:
            continue  # a change after the loss only reaches the returned logits
        if (not opaque and isinstance(st, ast.Assign) and len(st.targets) == 1
                and isinstance(st.targets[0], ast.Name) and st.targets[0].id not in (X, "labels")):
            name = st.targets[0].id
            if all(_evaluable(t, set(bound)) for t, _ in conds) and \
                    _evaluable(st.value, set(bound)):
                bound.add(name)
                actions.append(Bind(name, st.value, conds))
            else:
                bound.discard(name)
            continue
        if not _stores(st, X):
            continue
        if opaque:
            raise Refused(f"its logits are computed inside a loop or block ({where(st)})")
        if not (isinstance(st, ast.Assign) and len(st.targets) == 1
                and isinstance(st.targets[0], ast.Name)):
            raise Refused(f"its logits are assigned in an unexpected form ({where(st)}: "
                          f"{ast.unparse(st)})")
        for test, _ in conds:
            if not _evaluable(test, set(bound)):
                raise Refused(f"its logit transform depends on {ast.unparse(test)!r}, "
                              f"which is not read from the configuration ({where(st)})")
        parsed = _chain(st.value, X if head_attr is not None else None, bound)
        if parsed is not None and head_attr is None and parsed[0][0] != "head":
            parsed = None
        if parsed is None or (head_attr is not None and parsed[0][0] != "var"):
            if conds:
                # a branch fusedce cannot reproduce (Llama's pretraining_tp > 1 split head)
                # is fine where the configuration never takes it: a guard, checked per call
                guards.append((conds, line0 + st.lineno, ast.unparse(st).splitlines()[0]))
                handled.add(id(st))
                continue
            if parsed is not None:
                raise Refused(f"its logits go through self.{parsed[0][1]}(...), a module "
                              f"whose transform fusedce cannot read ({where(st)})")
            what = "head" if head_attr is None else "logit transform"
            raise Refused(f"its {what} is not a linear layer followed by scalings, a tanh "
                          f"softcap or casts ({where(st)}: {ast.unparse(st)})")
        base, ops = parsed
        head = head_attr is None
        if head:
            head_attr = base[1]
        actions.append(Step(ops=ops, conds=conds, line=line0 + st.lineno, head=head))
        handled.add(id(st))
    if head_attr is None:
        raise Refused("no head call produces the logits passed to the loss")
    calls = [n for n in ast.walk(fdef) if isinstance(n, ast.Call)
             and _self_attr(n.func) == head_attr]
    if len(calls) != 1:
        raise Refused(f"its forward calls self.{head_attr} {len(calls)} times")
    steps = [a for a in actions if isinstance(a, Step)]
    if sum(op == "tanh" for s in steps for op, _ in s.ops) > 1:
        raise Refused("its logits go through more than one tanh")

    # every other read of the logits: returned, or behind a condition that is false for
    # the model (checked at apply() and at every call)
    adds_to_loss = False
    for i, (st, conds, opaque) in enumerate(flat):
        if id(st) in handled:
            continue
        if i > loss_at and _stores(st, loss_name):
            adds_to_loss = True
        reads = _reads(st, X)
        if not reads:
            continue
        if i == loss_at and len(reads) == 1:
            continue
        if isinstance(st, ast.Return):
            continue
        if any("return_dict" in _names_read(test) for test, _ in conds):
            continue  # builds the tuple output; the fused call asks for a ModelOutput
        if (i > loss_at and not opaque and isinstance(st, ast.Assign)
                and len(st.targets) == 1 and isinstance(st.targets[0], ast.Name)
                and st.targets[0].id != loss_name):
            out_name = st.targets[0].id
            if out_name == X and _chain(st.value, X, bound) is not None:
                continue  # a cast or scaling of the returned logits
            # an output object or tuple that is only returned
            later = [s for s, _, _ in flat[i + 1:] if out_name in _names_read(s)]
            if out_name != X and all(isinstance(s, ast.Return) for s in later):
                continue
        if conds and all(_evaluable(t, set(bound)) for t, _ in conds):
            guards.append((conds, line0 + st.lineno, ast.unparse(st).splitlines()[0]))
            continue
        raise Refused(f"its forward uses the logits beyond the loss ({where(st)}: "
                      f"{ast.unparse(st).splitlines()[0]})")

    return Layout(qualname=qualname, head_attr=head_attr, logits_name=X, steps=actions,
                  guards=guards, var_kw=var_kw, params=params,
                  has_return_dict="return_dict" in params, adds_to_loss=adds_to_loss)


def analyze_head_module(fn) -> str:
    """For a head module whose ``forward`` ends in ``return self.<child>(x)`` (a transform,
    then the vocabulary projection, as BERT's prediction heads), the child's name; the
    projection's output must be returned as it is (casts aside). Else :class:`Refused`."""
    fn = _unwrap(fn)
    key = ("head", getattr(fn, "__code__", fn))
    hit = _CACHE.get(key)
    if hit is None:
        try:
            hit = _analyze_head(fn)
        except Refused as exc:
            hit = exc
        _CACHE[key] = hit
    if isinstance(hit, Refused):
        raise Refused(str(hit))
    return hit


def _analyze_head(fn) -> str:
    fdef, _ = _src(fn)
    flat = list(_flatten(fdef.body))
    if not flat or not isinstance(flat[-1][0], ast.Return) or flat[-1][1] or \
            any(isinstance(st, ast.Return) for st, _, _ in flat[:-1]) or \
            any(op for _, _, op in flat):
        raise Refused("its head module's forward is not a straight line ending in a return")
    value = flat[-1][0].value
    parsed = _chain(value, None, set())
    if parsed is None and isinstance(value, ast.Name):
        name = value.id
        for st, conds, _ in reversed(flat[:-1]):
            if _stores(st, name):
                if not (isinstance(st, ast.Assign) and len(st.targets) == 1):
                    break
                parsed = _chain(st.value, None, set())
                break
    if parsed is None or parsed[0][0] != "head" or any(op != "cast" for op, _ in parsed[1]):
        raise Refused("its head module does not end in a projection whose output it returns")
    attr = parsed[0][1]
    calls = [n for n in ast.walk(fdef) if isinstance(n, ast.Call)
             and _self_attr(n.func) == attr]
    if len(calls) != 1:
        raise Refused(f"its head module calls self.{attr} {len(calls)} times")
    return attr


# ---------------------------------------------------------------------------- runtime


def _number(v: Any, what: str) -> float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise Refused(f"{what} is a tensor of {v.numel()} elements, not a scalar")
        if v.requires_grad:
            raise Refused(f"{what} is a trained parameter (fusedce takes scalar logit "
                          "scales and softcaps, without their gradient)")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise Refused(f"{what} is {type(v).__name__}, not a number")
    v = float(v)
    if not math.isfinite(v) or v == 0.0:
        raise Refused(f"{what} is {v}")
    return v


def canonical(layout: Layout, model) -> Transform:
    """The transform the forward applies to the head's output on this call, as fusedce's
    (logit_scale, softcap)."""
    env: Dict[str, Any] = {"self": model, "labels": LABELS_PRESENT}
    pre, post, capped = 1.0, 1.0, False
    for step in layout.steps:
        if not conds_hold(step.conds, env):
            if isinstance(step, Step) and step.head:
                raise Refused(f"its forward does not call its head for this configuration "
                              f"(line {step.line})")
            continue
        if isinstance(step, Bind):
            env[step.name] = evaluate(step.value, env)
            continue
        for op, node in step.ops:
            if op == "cast":
                continue
            if op == "tanh":
                if capped:
                    raise Refused("the logits go through two tanh")
                capped = True
                continue
            v = _number(evaluate(node, env), ast.unparse(node))
            f = v if op == "mul" else 1.0 / v
            if capped:
                post *= f
            else:
                pre *= f
    for conds, line, what in layout.guards:
        if conds_hold(conds, env):
            raise Refused(f"its forward uses the logits beyond the loss for this "
                          f"configuration (line {line}: {what})")
    if not capped:
        return Transform(logit_scale=pre * post)
    if post <= 0:
        raise Refused(f"its softcap multiplier is {post} (not positive)")
    # p * tanh(s x) == c * tanh(scale * x / c) with c = p, scale = s * p
    return Transform(logit_scale=pre * post, softcap=post)
