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
loss (a z-loss on them), labels rewritten before the loss. After the loss, a value computed
from the logits is followed through every assignment: it must reach neither the loss nor
the returned output, where the logits themselves may only appear as the output's logits.

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Layout", "Refused", "Transform", "analyze_forward", "canonical"]


class Refused(ValueError):
    """The model's layout cannot be shown equivalent to a fused linear cross-entropy."""


Cond = tuple[ast.expr, bool]  # (test, polarity): the statement runs when bool(test) == polarity


@dataclass
class Step:
    """One statement of the head-to-loss chain: ``ops`` run when every cond holds."""

    ops: list[tuple[str, ast.expr | None]]  # ("mul"|"div", value) / ("tanh"|"cast", None)
    conds: tuple[Cond, ...] = ()
    line: int = 0
    head: bool = False  # the head's own line: its conditions must hold


@dataclass
class Bind:
    """A local the transforms read (``cap = self.config.logits_soft_cap``)."""

    name: str
    value: ast.expr
    conds: tuple[Cond, ...] = ()


@dataclass
class Layout:
    """The statically proven shape of a causal-LM forward."""

    qualname: str
    head_attr: str  # the forward calls ``self.<head_attr>(hidden)``
    logits_name: str
    steps: list[Any]  # Bind and Step actions, in source order (the first Step: the head)
    guards: list[tuple[tuple[Cond, ...], int, str]] = field(default_factory=list)
    # conditions that must NOT all hold at call time (they guard a use of the logits that
    # fusedce does not reproduce, e.g. a z-loss over all positions); (conds, line, what)
    var_kw: str | None = None
    params: tuple[str, ...] = ()
    has_return_dict: bool = False
    adds_to_loss: bool = False  # the forward adds terms to the loss after the call


@dataclass(frozen=True)
class Transform:
    """z = softcap * tanh(logit_scale * x / softcap) (softcap None: z = logit_scale * x)."""

    logit_scale: float = 1.0
    softcap: float | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.double() * self.logit_scale
        if self.softcap is not None:
            x = self.softcap * torch.tanh(x / self.softcap)
        return x


_CACHE: dict[Any, Any] = {}


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


def _self_attr(node: ast.AST) -> str | None:
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


# compound statements whose inside the analysis does not follow: a loop body may run any
# number of times, a ``with``/``try`` may skip or repeat, a nested def runs elsewhere
_OPAQUE = (ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try,
           ast.FunctionDef, ast.ClassDef, ast.Match)


def _flatten(body: Sequence[ast.stmt], conds: tuple[Cond, ...] = ()):
    """Statements in source order with the ``if`` conditions that enclose them. Other
    compound statements (loops, with, try) are kept whole (marked opaque)."""
    for st in body:
        if isinstance(st, ast.If):
            yield from _flatten(st.body, conds + ((st.test, True),))
            yield from _flatten(st.orelse, conds + ((st.test, False),))
        else:
            yield st, conds, isinstance(st, _OPAQUE)


def _single_name_target(st: ast.AST) -> str | None:
    """``x`` for a plain ``x = ...`` statement, else None."""
    if (isinstance(st, ast.Assign) and len(st.targets) == 1
            and isinstance(st.targets[0], ast.Name)):
        return st.targets[0].id
    return None


# ---------------------------------------------------------------------------- expressions
# What the transforms and their conditions may read: only what the model alone determines
# (its configuration and attributes, constants), so that the per-call check computes the
# same values the forward computes. Each expression kind has one checker (_evaluable) and
# one evaluator (evaluate), looked up by node type.

# ``labels`` is readable only as ``labels is not None`` (true on every fused call)
_EVAL_NAMES = ("self", "torch", "math", "None", "True", "False", "labels")
LABELS_PRESENT = object()
_CMP_OPS = (ast.Is, ast.IsNot, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)
_BIN_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)


def _is_getattr_call(e: ast.Call) -> bool:
    """``getattr(obj, "name"[, default])`` with a literal attribute name."""
    return (isinstance(e.func, ast.Name) and e.func.id == "getattr" and not e.keywords
            and len(e.args) in (2, 3) and isinstance(e.args[1], ast.Constant)
            and isinstance(e.args[1].value, str))


def _evaluable_constant(e: ast.Constant, bound: set) -> bool:
    return True


def _evaluable_name(e: ast.Name, bound: set) -> bool:
    return e.id in _EVAL_NAMES or e.id in bound


def _evaluable_attribute(e: ast.Attribute, bound: set) -> bool:
    return _evaluable(e.value, bound)


def _evaluable_call(e: ast.Call, bound: set) -> bool:
    """Only ``getattr`` with a literal name and ``<config>.get_text_config()``: reads that
    have no effect and depend on the model alone."""
    if _is_getattr_call(e):
        return all(_evaluable(a, bound) for a in e.args)
    return (isinstance(e.func, ast.Attribute) and e.func.attr == "get_text_config"
            and not e.args and not e.keywords and _evaluable(e.func.value, bound))


def _evaluable_compare(e: ast.Compare, bound: set) -> bool:
    return (all(isinstance(op, _CMP_OPS) for op in e.ops)
            and _evaluable(e.left, bound)
            and all(_evaluable(c, bound) for c in e.comparators))


def _evaluable_boolop(e: ast.BoolOp, bound: set) -> bool:
    return all(_evaluable(v, bound) for v in e.values)


def _evaluable_unaryop(e: ast.UnaryOp, bound: set) -> bool:
    return isinstance(e.op, (ast.Not, ast.USub, ast.UAdd)) and _evaluable(e.operand, bound)


def _evaluable_binop(e: ast.BinOp, bound: set) -> bool:
    return isinstance(e.op, _BIN_OPS) and _evaluable(e.left, bound) and \
        _evaluable(e.right, bound)


def _evaluable_namedexpr(e: ast.NamedExpr, bound: set) -> bool:
    """A walrus is evaluable where its value is; its name is then bound for what follows
    (``if (c := self.config.cap) is not None: logits = c * ...``)."""
    if _evaluable(e.value, bound):
        bound.add(e.target.id)
        return True
    return False


def _evaluable(e: ast.AST, bound: set) -> bool:
    """Whether :func:`evaluate` can compute ``e`` from the model alone (config reads,
    attributes, constants), never from the call's tensors. Walrus targets of ``e`` are
    added to ``bound``."""
    pair = _NODES.get(type(e))
    return pair is not None and pair[0](e, bound)


_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.Pow: operator.pow}
_CMP = {ast.Is: operator.is_, ast.IsNot: operator.is_not, ast.Eq: operator.eq,
        ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
        ast.Gt: operator.gt, ast.GtE: operator.ge}
_UNARY = {ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos}
# the names evaluate resolves itself; everything else comes from ``env``
_GLOBALS = {"torch": torch, "math": math, "None": None, "True": True, "False": False}


def _evaluate_constant(e: ast.Constant, env: dict[str, Any]) -> Any:
    return e.value


def _evaluate_name(e: ast.Name, env: dict[str, Any]) -> Any:
    if e.id in env:
        return env[e.id]
    return _GLOBALS[e.id]


def _evaluate_attribute(e: ast.Attribute, env: dict[str, Any]) -> Any:
    return getattr(evaluate(e.value, env), e.attr)


def _evaluate_call(e: ast.Call, env: dict[str, Any]) -> Any:
    if isinstance(e.func, ast.Name):  # getattr(obj, "name"[, default])
        return getattr(*[evaluate(a, env) for a in e.args])
    return getattr(evaluate(e.func.value, env), e.func.attr)()  # .get_text_config()


def _evaluate_compare(e: ast.Compare, env: dict[str, Any]) -> Any:
    """A chained comparison, evaluated left to right and stopping at the first false one
    (as Python does: ``a < b < c`` does not evaluate ``c`` when ``a < b`` is false)."""
    left = evaluate(e.left, env)
    for op, comp in zip(e.ops, e.comparators):
        right = evaluate(comp, env)
        if not _CMP[type(op)](left, right):
            return False
        left = right
    return True


def _evaluate_boolop(e: ast.BoolOp, env: dict[str, Any]) -> Any:
    """``and``/``or`` with Python's short circuit and its value (the deciding operand)."""
    stop_when = isinstance(e.op, ast.Or)  # ``and`` stops at a falsy value, ``or`` a truthy
    result = None
    for v in e.values:
        result = evaluate(v, env)
        if bool(result) == stop_when:
            return result
    return result


def _evaluate_unaryop(e: ast.UnaryOp, env: dict[str, Any]) -> Any:
    return _UNARY.get(type(e.op), operator.pos)(evaluate(e.operand, env))


def _evaluate_binop(e: ast.BinOp, env: dict[str, Any]) -> Any:
    return _BIN[type(e.op)](evaluate(e.left, env), evaluate(e.right, env))


def _evaluate_namedexpr(e: ast.NamedExpr, env: dict[str, Any]) -> Any:
    v = evaluate(e.value, env)
    env[e.target.id] = v
    return v


# the expression nodes the analysis follows: (whether evaluable, how to evaluate), one entry
# per node type so that the two always agree
_NODES = {
    ast.Constant: (_evaluable_constant, _evaluate_constant),
    ast.Name: (_evaluable_name, _evaluate_name),
    ast.Attribute: (_evaluable_attribute, _evaluate_attribute),
    ast.Call: (_evaluable_call, _evaluate_call),
    ast.Compare: (_evaluable_compare, _evaluate_compare),
    ast.BoolOp: (_evaluable_boolop, _evaluate_boolop),
    ast.UnaryOp: (_evaluable_unaryop, _evaluate_unaryop),
    ast.BinOp: (_evaluable_binop, _evaluate_binop),
    ast.NamedExpr: (_evaluable_namedexpr, _evaluate_namedexpr),
}


def evaluate(e: ast.AST, env: dict[str, Any]) -> Any:
    """Evaluate an expression that :func:`_evaluable` accepted; ``env`` holds ``self`` and
    receives walrus bindings."""
    pair = _NODES.get(type(e))
    if pair is None:  # pragma: no cover - checked before
        raise Refused(f"cannot evaluate {ast.unparse(e)}")
    return pair[1](e, env)


def conds_hold(conds: Sequence[Cond], env: dict[str, Any]) -> bool:
    for test, polarity in conds:
        if bool(evaluate(test, env)) != polarity:
            return False
    return True


# ---------------------------------------------------------------------------- the chain

_TANH_FUNCS = ("torch.tanh", "nn.functional.tanh", "F.tanh", "torch.nn.functional.tanh")
_CAST_METHODS = ("float", "to", "type_as", "contiguous")
Op = tuple[str, ast.expr | None]  # ("mul"|"div", value) / ("tanh"|"cast", None)


def _peel_call(e: ast.Call, bound: set) -> tuple[Op, ast.expr] | None:
    """The outermost call of a chain as (op, its input): a dtype cast (``x.float()``,
    ``x.to(<config dtype>)``, ``x.type_as(y)``, ``x.contiguous()``) or a tanh (function
    or method); None for any other call."""
    f = e.func
    if (isinstance(f, ast.Attribute) and f.attr in _CAST_METHODS
            and not e.keywords and len(e.args) <= 1
            and (not e.args or f.attr == "type_as" or _evaluable(e.args[0], set(bound)))):
        return ("cast", None), f.value
    if ast.unparse(f) in _TANH_FUNCS and len(e.args) == 1 and not e.keywords:
        return ("tanh", None), e.args[0]
    if isinstance(f, ast.Attribute) and f.attr == "tanh" and not e.args:
        return ("tanh", None), f.value
    return None


def _peel_scaling(e: ast.BinOp, bound: set) -> tuple[Op, ast.expr] | None:
    """The outermost ``x * c``, ``c * x`` or ``x / c`` of a chain as (op, x), where ``c``
    is read from the model alone; None otherwise (``c / x`` is not a scaling of x)."""
    if _evaluable(e.right, set(bound)):
        return ("mul" if isinstance(e.op, ast.Mult) else "div", e.right), e.left
    if isinstance(e.op, ast.Mult) and _evaluable(e.left, set(bound)):
        return ("mul", e.left), e.right
    return None


def _head_call(e: ast.Call) -> bool:
    """A module call the chain can start from: ``self.<attr>(x)``, one plain argument."""
    return len(e.args) == 1 and not e.keywords and not isinstance(e.args[0], ast.Starred)


def _chain(e: ast.expr, logits: str | None, bound: set):
    """Parse ``e`` as a transform chain over the head call or the logits name.

    Returns (base, ops): base is ("head", attr, call node) or ("var",); None when ``e`` is
    not such a chain. The chain is peeled from the outside in, so ``ops`` is collected
    last-applied first and returned in the order the forward applies them.
    """
    ops: list[Op] = []
    while True:
        if isinstance(e, ast.Name) and logits is not None and e.id == logits:
            return ("var",), ops[::-1]
        if isinstance(e, ast.Call):
            attr = _self_attr(e.func)
            if attr is not None and attr != "loss_function":
                return (("head", attr, e), ops[::-1]) if _head_call(e) else None
            peeled = _peel_call(e, bound)
        elif isinstance(e, ast.BinOp) and isinstance(e.op, (ast.Mult, ast.Div)):
            peeled = _peel_scaling(e, bound)
        else:
            return None
        if peeled is None:
            return None
        op, e = peeled
        ops.append(op)


def _src(fn) -> tuple[ast.FunctionDef, int]:
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


def _reads(st: ast.AST, name: str) -> list[ast.Name]:
    return [n for n in ast.walk(st) if isinstance(n, ast.Name) and n.id == name
            and isinstance(n.ctx, ast.Load)]


# loss keywords ForCausalLMLoss acts on: fixed by the fused call, so the forward must not set
# them itself (any other keyword reaches fixed_cross_entropy's **kwargs, which ignores it)
_LOSS_ACTS_ON = ("num_items_in_batch", "ignore_index", "shift_labels")
_LOSS_SLOTS = ("logits", "labels", "vocab_size")  # ForCausalLMLoss's leading parameters
_KWARGS_METHODS = ("pop", "update", "setdefault", "clear", "popitem")


# ---------------------------------------------------------------------------- the forward


@dataclass
class _Forward:
    """The parsed forward and what the analysis has established about it so far."""

    fdef: ast.FunctionDef
    line0: int  # the source line before the ``def``: node line numbers are relative to it
    params: tuple[str, ...]
    var_kw: str | None
    flat: list[tuple[ast.stmt, tuple[Cond, ...], bool]]  # see _flatten
    loss_at: int = -1  # index in ``flat`` of ``<loss_name> = self.loss_function(...)``
    loss_name: str = ""
    logits: str = ""  # the variable passed to the loss as its logits

    def where(self, node) -> str:
        return f"line {self.line0 + getattr(node, 'lineno', 1)}"

    def first_line(self, st: ast.stmt) -> tuple[int, str]:
        """(absolute line, first source line) of a statement, as guards report it."""
        return self.line0 + st.lineno, ast.unparse(st).splitlines()[0]


@dataclass
class _Chain:
    """What the walk over the statements up to the loss collects: the transforms' actions,
    the names they may read, and the guards for branches fusedce cannot reproduce."""

    bound: set = field(default_factory=set)  # locals read from the model alone
    actions: list[Any] = field(default_factory=list)  # Bind and Step, in source order
    guards: list[tuple[tuple[Cond, ...], int, str]] = field(default_factory=list)
    head_attr: str | None = None  # set by the first Step, the head call
    handled: set = field(default_factory=set)  # ids of the statements Steps and guards cover


def _parse_forward(fn) -> _Forward:
    fdef, line0 = _src(fn)
    args = fdef.args
    params = tuple(a.arg for a in args.posonlyargs + args.args + args.kwonlyargs)
    var_kw = args.kwarg.arg if args.kwarg is not None else None
    if "labels" not in params:
        raise Refused("its forward takes no labels")
    return _Forward(fdef=fdef, line0=line0, params=params, var_kw=var_kw,
                    flat=list(_flatten(fdef.body)))


def _the_loss_call(fdef: ast.FunctionDef) -> ast.Call:
    loss_calls = [n for n in ast.walk(fdef) if _is_loss_call(n)]
    if not loss_calls:
        raise Refused("its forward does not compute the loss with self.loss_function "
                      "(transformers' ForCausalLMLoss): it computes it another way")
    if len(loss_calls) > 1:
        raise Refused("its forward calls self.loss_function more than once")
    return loss_calls[0]


def _locate_loss(fw: _Forward, call: ast.Call) -> None:
    """Set ``fw.loss_at``/``fw.loss_name``: the loss must be a plain ``loss = <call>`` that
    runs on every call with labels (under ``labels is not None`` at most)."""
    loss_at = None
    for i, (st, conds, opaque) in enumerate(fw.flat):
        if not any(n is call for n in ast.walk(st)):
            continue
        loss_at = i
        if opaque:
            raise Refused(f"its loss is computed inside a loop or block ({fw.where(st)})")
        if not (_single_name_target(st) is not None and st.value is call):
            raise Refused(f"its loss call is not a plain assignment ({fw.where(st)})")
        for test, pol in conds:
            if not (pol and ast.unparse(test) == "labels is not None"):
                raise Refused(f"its loss is computed under the condition "
                              f"{ast.unparse(test)!r} ({fw.where(st)})")
    assert loss_at is not None
    fw.loss_at = loss_at
    fw.loss_name = fw.flat[loss_at][0].targets[0].id


def _loss_arguments(fw: _Forward, call: ast.Call) -> dict[str, ast.expr]:
    """The call's (logits, labels, vocab_size) by slot; its ``**`` must be the forward's
    own ``**kwargs``, and it must not set what ForCausalLMLoss acts on itself."""
    got: dict[str, ast.expr] = {}
    if len(call.args) > 3 or any(isinstance(a, ast.Starred) for a in call.args):
        raise Refused(f"its loss call takes unexpected positional arguments "
                      f"({fw.where(call)})")
    for name, a in zip(_LOSS_SLOTS, call.args):
        got[name] = a
    splat = False
    for kw in call.keywords:
        if kw.arg is None:
            if not (isinstance(kw.value, ast.Name) and kw.value.id == fw.var_kw):
                raise Refused(f"its loss call passes **{ast.unparse(kw.value)}, not the "
                              f"forward's own **{fw.var_kw} ({fw.where(call)})")
            splat = True
        elif kw.arg in _LOSS_SLOTS and kw.arg not in got:
            got[kw.arg] = kw.value
        elif kw.arg in _LOSS_ACTS_ON or kw.arg in _LOSS_SLOTS:
            raise Refused(f"its loss call sets {kw.arg}= itself ({fw.where(call)}): the loss "
                          "is not the plain shifted causal-LM loss of its labels")
    if fw.var_kw is not None and not splat:
        raise Refused(f"its loss call does not pass the forward's **{fw.var_kw} "
                      f"(num_items_in_batch would be lost) ({fw.where(call)})")
    return got


def _check_loss_call(fw: _Forward, call: ast.Call) -> None:
    """Set ``fw.logits``: the loss is ``self.loss_function(<name>, labels, ...)``."""
    got = _loss_arguments(fw, call)
    logits_node = got.get("logits")
    if not isinstance(logits_node, ast.Name):
        raise Refused(f"its loss call's logits are not a plain variable ({fw.where(call)})")
    if not (isinstance(got.get("labels"), ast.Name) and got["labels"].id == "labels"):
        raise Refused(f"its loss call does not pass the forward's labels ({fw.where(call)})")
    fw.logits = logits_node.id


# ------------------------------------------------------------- labels and kwargs unchanged


def _assigned(n: ast.AST) -> list:
    """The targets a node assigns or deletes (none for other nodes)."""
    if isinstance(n, (ast.Assign, ast.Delete)):
        return n.targets
    if isinstance(n, (ast.AugAssign, ast.AnnAssign, ast.NamedExpr)):
        return [n.target]
    return []


def _is_labels_to(v: Any) -> bool:
    """``labels.to(...)``: moves the labels to the logits' device, values unchanged."""
    return (isinstance(v, ast.Call) and isinstance(v.func, ast.Attribute)
            and v.func.attr == "to" and isinstance(v.func.value, ast.Name)
            and v.func.value.id == "labels")


def _check_target(fw: _Forward, n: ast.AST, t: ast.expr) -> None:
    """Refuse an assignment (target ``t`` of node ``n``) that changes the labels or the
    loss kwargs before the loss."""
    var_kw = fw.var_kw
    if (isinstance(t, ast.Name) and t.id == "labels"
            and not _is_labels_to(getattr(n, "value", None))):
        raise Refused(f"its forward rewrites the labels before the loss "
                          f"({fw.where(n)}: {ast.unparse(n)})")
    if isinstance(t, ast.Name) and t.id == var_kw:
        raise Refused(f"its forward reassigns **{var_kw} before the loss ({fw.where(n)})")
    if (isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name)
            and t.value.id == var_kw):
        key = t.slice
        if not (isinstance(key, ast.Constant) and key.value not in _LOSS_ACTS_ON):
            raise Refused(f"its forward sets a loss kwarg ({fw.where(n)}: {ast.unparse(n)})")


def _check_kwargs_method(fw: _Forward, n: ast.AST) -> None:
    """Refuse ``kwargs.<method>(...)`` that can change what ForCausalLMLoss acts on; a
    ``pop``/``setdefault`` of another literal key leaves it as it is."""
    if not (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and isinstance(n.func.value, ast.Name) and n.func.value.id == fw.var_kw
            and n.func.attr in _KWARGS_METHODS):
        return
    key = n.args[0] if n.args else None
    if not (n.func.attr in ("pop", "setdefault") and isinstance(key, ast.Constant)
            and key.value not in _LOSS_ACTS_ON):
        raise Refused(f"its forward changes its **{fw.var_kw} before the loss "
                      f"({fw.where(n)}: {ast.unparse(n)})")


def _check_inputs_unchanged(fw: _Forward) -> None:
    """The labels and kwargs reach the loss as the forward received them."""
    for st, _, _ in fw.flat[:fw.loss_at]:
        for n in ast.walk(st):
            for t in _assigned(n):
                _check_target(fw, n, t)
            _check_kwargs_method(fw, n)


# ---------------------------------------------------------------- head and transforms


def _bind(ch: _Chain, st: ast.Assign, name: str, conds: tuple[Cond, ...]) -> None:
    """A local the transforms may read where it (and its conditions) come from the model
    alone; any other assignment makes the name unreadable again."""
    if all(_evaluable(t, set(ch.bound)) for t, _ in conds) and \
            _evaluable(st.value, set(ch.bound)):
        ch.bound.add(name)
        ch.actions.append(Bind(name, st.value, conds))
    else:
        ch.bound.discard(name)


def _check_logits_statement(fw: _Forward, ch: _Chain, st: ast.stmt,
                            conds: tuple[Cond, ...], opaque: bool) -> None:
    """A statement assigning the logits before the loss: a plain ``logits = ...``, under
    conditions the model alone decides."""
    if opaque:
        raise Refused(f"its logits are computed inside a loop or block ({fw.where(st)})")
    if _single_name_target(st) is None:
        raise Refused(f"its logits are assigned in an unexpected form ({fw.where(st)}: "
                      f"{ast.unparse(st)})")
    for test, _ in conds:
        if not _evaluable(test, set(ch.bound)):
            raise Refused(f"its logit transform depends on {ast.unparse(test)!r}, "
                          f"which is not read from the configuration ({fw.where(st)})")


def _refuse_step(fw: _Forward, ch: _Chain, st: ast.stmt, parsed) -> None:
    """Why an unconditional logits statement is not part of a chain fusedce reproduces."""
    if parsed is not None and parsed[0][0] == "head":
        raise Refused(f"its logits go through self.{parsed[0][1]}(...), a module "
                      f"whose transform fusedce cannot read ({fw.where(st)})")
    what = "head" if ch.head_attr is None else "logit transform"
    raise Refused(f"its {what} is not a linear layer followed by scalings, a tanh "
                  f"softcap or casts ({fw.where(st)}: {ast.unparse(st)})")


def _logits_step(fw: _Forward, ch: _Chain, st: ast.Assign, conds: tuple[Cond, ...]) -> None:
    """The head call (the first assignment of the logits) or a transform of the logits
    (each later one), as a Step; a branch of neither kind becomes a guard."""
    expected = "head" if ch.head_attr is None else "var"
    parsed = _chain(st.value, None if ch.head_attr is None else fw.logits, ch.bound)
    if parsed is None or parsed[0][0] != expected:
        if not conds:
            _refuse_step(fw, ch, st, parsed)
        # a branch fusedce cannot reproduce (Llama's pretraining_tp > 1 split head)
        # is fine where the configuration never takes it: a guard, checked per call
        ch.guards.append((conds, *fw.first_line(st)))
        ch.handled.add(id(st))
        return
    base, ops = parsed
    head = ch.head_attr is None
    if head:
        ch.head_attr = base[1]
    ch.actions.append(Step(ops=ops, conds=conds, line=fw.line0 + st.lineno, head=head))
    ch.handled.add(id(st))


def _collect_chain(fw: _Forward) -> _Chain:
    """The head assignment, the transforms, and the config reads they use (in order)."""
    ch = _Chain()
    for i, (st, conds, opaque) in enumerate(fw.flat):
        for test, _ in conds:
            _evaluable(test, ch.bound)  # collects walrus names
        if i > fw.loss_at:
            continue  # a change after the loss only reaches the returned logits
        name = None if opaque else _single_name_target(st)
        if name is not None and name not in (fw.logits, "labels"):
            _bind(ch, st, name, conds)
        elif _stores(st, fw.logits):
            _check_logits_statement(fw, ch, st, conds, opaque)
            _logits_step(fw, ch, st, conds)
    return ch


def _check_chain(fw: _Forward, ch: _Chain) -> None:
    """One head, called once, and at most one tanh on the way to the loss."""
    if ch.head_attr is None:
        raise Refused("no head call produces the logits passed to the loss")
    calls = [n for n in ast.walk(fw.fdef) if isinstance(n, ast.Call)
             and _self_attr(n.func) == ch.head_attr]
    if len(calls) != 1:
        raise Refused(f"its forward calls self.{ch.head_attr} {len(calls)} times")
    steps = [a for a in ch.actions if isinstance(a, Step)]
    if sum(op == "tanh" for s in steps for op, _ in s.ops) > 1:
        raise Refused("its logits go through more than one tanh")


# ----------------------------------------------------------------- other uses of the logits


@dataclass
class _Flow:
    """What the statements after the loss make of the logits, in source order: names that
    hold a value computed from them, and names that hold an output built from them as they
    are (``output = (logits,) + outputs[1:]``), which may only be passed on as they are."""

    bound: set  # the chain's locals read from the model alone
    derived: set = field(default_factory=set)
    carriers: set = field(default_factory=set)

    def readable(self) -> set:
        """The locals a condition may read to be evaluated on the model alone."""
        return self.bound - self.derived - self.carriers


def _is_output_class(f: ast.expr) -> bool:
    """A call that builds an output object (``CausalLMOutputWithPast(...)``,
    ``modeling_outputs.X(...)``), not a method of the model."""
    while isinstance(f, ast.Attribute):
        f = f.value
    return isinstance(f, ast.Name) and f.id != "self"


def _is_concat(e: ast.expr) -> bool:
    """``(a,) + b`` or ``b + [a]``: a sequence concatenation, not arithmetic."""
    return (isinstance(e, ast.BinOp) and isinstance(e.op, ast.Add)
            and any(isinstance(x, (ast.Tuple, ast.List)) for x in (e.left, e.right)))


def _held(e: ast.expr, is_field: bool = False) -> dict[int, bool]:
    """The parts of ``e`` that it holds as they are, not computed with: ``e`` itself, the
    branches of a conditional expression, the operands of a tuple concatenation and the
    fields of an output (a tuple's elements, the ``logits=`` of an output object). Maps each
    part's id to whether it is such a field."""
    held = {id(e): is_field}
    if isinstance(e, ast.IfExp):
        parts = [(e.body, is_field), (e.orelse, is_field)]
    elif isinstance(e, (ast.Tuple, ast.List)):
        parts = [(x, True) for x in e.elts]
    elif _is_concat(e):
        parts = [(e.left, False), (e.right, False)]
    elif isinstance(e, ast.Call) and _is_output_class(e.func):
        parts = [(k.value, True) for k in e.keywords if k.arg == "logits"]
    else:
        parts = []
    for part, f in parts:
        held.update(_held(part, f))
    return held


def _passed_on(fw: _Forward, i: int, st: ast.stmt) -> ast.expr | None:
    """The expression of a statement that may pass the logits on as they are: a return's
    value, or after the loss the value of a plain assignment (an output being built)."""
    if isinstance(st, ast.Return):
        return st.value
    name = _single_name_target(st) if i > fw.loss_at else None
    if name is not None and name not in (fw.loss_name, fw.logits):
        return st.value
    return None


def _reads_in(fw: _Forward, flow: _Flow, i: int, st: ast.stmt) -> list[str]:
    """The reads in a statement of the logits or of a value computed from them, other than
    the loss call's one read, a cast of the returned logits after the loss, and the logits
    passed on as they are as an output's logits field."""
    if i == fw.loss_at and len(_reads(st, fw.logits)) == 1:
        return []
    if i > fw.loss_at and _single_name_target(st) == fw.logits:
        parsed = _chain(st.value, fw.logits, flow.readable())
        if parsed is not None and parsed[0][0] == "var":
            return []  # a cast or scaling of the returned logits
    root = _passed_on(fw, i, st)
    held = {} if root is None else _held(root)
    return [n.id for n in ast.walk(st) if isinstance(n, ast.Name)
            and isinstance(n.ctx, ast.Load)
            and (n.id in flow.derived or (n.id == fw.logits and not held.get(id(n)))
                 or (n.id in flow.carriers and id(n) not in held))]


def _derived_reads(fw: _Forward, flow: _Flow, i: int, st: ast.stmt,
                   conds: tuple[Cond, ...]) -> list[str]:
    """What a statement, or a condition it runs under, reads of the logits beyond passing
    them on (see :func:`_reads_in`)."""
    names = flow.derived | flow.carriers | {fw.logits}
    in_conds = [x for test, _ in conds for x in sorted(_names_read(test) & names)]
    return _reads_in(fw, flow, i, st) + in_conds


def _follow(fw: _Forward, flow: _Flow, i: int, st: ast.stmt, conds: tuple[Cond, ...],
            derived: list) -> bool:
    """Follow what a plain assignment after the loss makes of the logits: the names it (or
    a walrus in its conditions) sets hold a value computed from them, or an output holding
    them as they are. False for any other statement that reads them (a return, the loss, a
    call, a loop, an attribute set)."""
    value = None if isinstance(st, ast.Return) else _passed_on(fw, i, st)
    if value is None:
        return not derived
    if derived:
        flow.derived.update(n.id for node in (st, *(t for t, _ in conds))
                            for n in ast.walk(node)
                            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store))
    elif _names_read(value) & (flow.carriers | {fw.logits}):
        flow.carriers.add(_single_name_target(st))
    return True


def _refuse_use(fw: _Forward, st: ast.stmt, conds: tuple[Cond, ...], derived: list) -> None:
    """Why a use of the logits (or of what is computed from them) is not reproduced."""
    via = sorted(set(derived) - {fw.logits})
    how = f" through {', '.join(via)}" if via else ""
    if _stores(st, fw.loss_name):
        how = f": the loss it returns depends on them{how}"
    elif isinstance(st, ast.Return):
        how = f": its returned output depends on them{how} beyond the logits field"
    elif any(set(derived) & _names_read(test) for test, _ in conds):
        how = f": it branches on them{how}"
    raise Refused(f"its forward uses the logits beyond the loss{how} ({fw.where(st)}: "
                  f"{ast.unparse(st).splitlines()[0]})")


def _check_other_uses(fw: _Forward, ch: _Chain) -> bool:
    """Every other read of the logits, or of a value computed from them through any chain
    of assignments: the logits passed on as the output's logits field, a value computed
    from them that reaches neither the loss nor the output, or a statement behind a
    condition that is false for the model (a guard, checked at apply() and at every call;
    a guarded statement never runs on a fused call, so what it computes is not followed).
    Whether the forward adds terms to the loss after the call."""
    adds_to_loss = False
    flow = _Flow(bound=set(ch.bound))
    for i, (st, conds, _) in enumerate(fw.flat):
        if id(st) in ch.handled:
            continue
        if i > fw.loss_at and _stores(st, fw.loss_name):
            adds_to_loss = True
        derived = _derived_reads(fw, flow, i, st, conds)
        if derived and conds and all(_evaluable(t, flow.readable()) for t, _ in conds):
            ch.guards.append((conds, *fw.first_line(st)))
        elif not _follow(fw, flow, i, st, conds, derived):
            _refuse_use(fw, st, conds, derived)
    return adds_to_loss


def _analyze(fn, qualname: str) -> Layout:
    """Prove the forward's head-to-loss code a chain fusedce reproduces, in the order
    the refusal reasons are checked: the loss call, the labels and kwargs it receives,
    the head and transforms, then every other use of the logits."""
    fw = _parse_forward(fn)
    call = _the_loss_call(fw.fdef)
    _locate_loss(fw, call)
    _check_loss_call(fw, call)
    _check_inputs_unchanged(fw)
    ch = _collect_chain(fw)
    _check_chain(fw, ch)
    adds_to_loss = _check_other_uses(fw, ch)
    return Layout(qualname=qualname, head_attr=ch.head_attr, logits_name=fw.logits,
                  steps=ch.actions, guards=ch.guards, var_kw=fw.var_kw, params=fw.params,
                  has_return_dict="return_dict" in fw.params, adds_to_loss=adds_to_loss)


# ---------------------------------------------------------------------------- head modules


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


def _straight_line(fdef: ast.FunctionDef) -> list:
    """The flattened body of a forward without branches, loops or early returns, ending
    in an unconditional return."""
    flat = list(_flatten(fdef.body))
    if not flat or not isinstance(flat[-1][0], ast.Return) or flat[-1][1] or \
            any(isinstance(st, ast.Return) for st, _, _ in flat[:-1]) or \
            any(op for _, _, op in flat):
        raise Refused("its head module's forward is not a straight line ending in a return")
    return flat


def _returned_chain(flat: list):
    """The chain of the returned value: the return's expression, or for ``return name``
    the last assignment of ``name``."""
    value = flat[-1][0].value
    parsed = _chain(value, None, set())
    if parsed is not None or not isinstance(value, ast.Name):
        return parsed
    for st, _, _ in reversed(flat[:-1]):
        if _stores(st, value.id):
            if isinstance(st, ast.Assign) and len(st.targets) == 1:
                return _chain(st.value, None, set())
            return None
    return None


def _analyze_head(fn) -> str:
    fdef, _ = _src(fn)
    parsed = _returned_chain(_straight_line(fdef))
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
    env: dict[str, Any] = {"self": model, "labels": LABELS_PRESENT}
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
