"""The methods a benchmark compares, as adapters with one calling convention.

Every method maps the case's inputs to the quantity that is differentiated:

    cross_entropy:        loss = mean_r CE(x_r, t_r)                      (scalar)
    logprobs:             out_r = log softmax(x_r)[t_r]  (backward of sum_r out_r)
    linear_cross_entropy: loss = mean_r CE(h_r W^T, t_r)                  (scalar)

Methods: fusedce (backend torch / triton, out-of-place or in-place gradient), PyTorch eager
(``F.cross_entropy(logits.float(), t)``, what Hugging Face models do; the bf16 variant
without the upcast), ``torch.compile`` of the eager form, PyTorch's own
``F.linear_cross_entropy`` (chunked options) where it exists, and the peers Liger-Kernel,
Cut Cross-Entropy and quack when they import. Under a process group (torchrun), the
vocab-parallel forms: fusedce with ``tp_group`` and a hand-written PyTorch vocab-parallel CE
(all-reduce of the row max, of the sum of exponentials and of the target logit; the fp32
softmax of the shard kept for backward).
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .reference import Inputs
from .shapes import Case

CE, LIN, LP = "cross_entropy", "linear_cross_entropy", "logprobs"


@dataclass(frozen=True)
class Method:
    """One thing to measure; ``build(case, device)`` returns ``fn(inputs) -> output``."""

    name: str
    ops: tuple
    family: str  # "fusedce" | "pytorch" | "peer"
    build: Callable[[Case, torch.device], Callable[[Inputs], torch.Tensor]]
    description: str = ""
    inplace: bool = False  # the method overwrites the logits with their gradient
    cuda_only: bool = False
    tp: str = "no"  # "no": single device only, "yes": vocab-parallel only, "both"
    requires: Optional[str] = None  # module that must import
    check: Optional[Callable[[Case, torch.device], Optional[str]]] = None

    def applies(self, case: Case) -> bool:
        """Whether this method computes ``case``'s operation in its (TP or not) setting."""
        if case.op not in self.ops:
            return False
        return self.tp == "both" or (self.tp == "yes") == (case.tp > 1)

    def unavailable(self, case: Case, device: torch.device) -> Optional[str]:
        """Why this applicable method cannot run ``case`` on ``device`` (None when it can)."""
        if self.cuda_only and device.type != "cuda":
            return "needs CUDA"
        if self.requires is not None and not module_available(self.requires):
            return f"{self.requires} is not installed"
        if self.check is not None:
            return self.check(case, device)
        return None


_IMPORT_CACHE: dict = {}


def module_available(name: str) -> bool:
    """Whether ``name`` imports (cached; import errors of any kind mean no)."""
    if name not in _IMPORT_CACHE:
        try:
            importlib.import_module(name)
            _IMPORT_CACHE[name] = True
        except Exception:  # noqa: BLE001 - a broken peer install is just "not available"
            _IMPORT_CACHE[name] = False
    return _IMPORT_CACHE[name]


# ---------------------------------------------------------------------------- fusedce


def _triton_check(case: Case, device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return "needs CUDA (the Triton interpreter is for tests, far too slow to time)"
    if not module_available("fusedce.triton.backend"):
        return "fusedce.triton.backend does not import"
    return None


def _linear_check(case: Case, device: torch.device) -> Optional[str]:
    import fusedce

    if not hasattr(fusedce, "linear_cross_entropy") and not module_available("fusedce.linear"):
        return "fusedce.linear_cross_entropy is not available"
    return None


def _fce_linear_fn():
    import fusedce

    fn = getattr(fusedce, "linear_cross_entropy", None)
    if fn is None:
        fn = importlib.import_module("fusedce.linear").linear_cross_entropy
    return fn


def _tp_kwargs(inp: Inputs) -> dict:
    if inp.group is None:
        return {}
    return {"tp_group": inp.group, "vocab_start": inp.vocab_start}


def _fusedce_builder(backend: str, inplace: bool):
    def build(case: Case, device: torch.device):
        import fusedce as fce

        if case.op == CE:
            return lambda inp: fce.cross_entropy(inp.x, inp.t, backend=backend,
                                                 inplace_backward=inplace, **_tp_kwargs(inp))
        if case.op == LP:
            return lambda inp: fce.logprobs(inp.x, inp.t, backend=backend, **_tp_kwargs(inp))
        lce = _fce_linear_fn()
        return lambda inp: lce(inp.h, inp.w, inp.t, backend=backend, **_tp_kwargs(inp))
    return build


def _fusedce_methods() -> List[Method]:
    out = []
    for backend in ("triton", "torch"):
        base = _triton_check if backend == "triton" else None

        def check(case, device, _base=base):
            why = _base(case, device) if _base is not None else None
            if why is None and case.op == LIN:
                why = _linear_check(case, device)
            return why
        out.append(Method(f"fusedce-{backend}", (CE, LP, LIN), "fusedce",
                          _fusedce_builder(backend, False),
                          f"fusedce, {backend} backend (fresh gradient buffer)", tp="both",
                          check=check))
        out.append(Method(f"fusedce-{backend}-inplace", (CE,), "fusedce",
                          _fusedce_builder(backend, True),
                          f"fusedce, {backend} backend, inplace_backward=True", inplace=True,
                          tp="both", check=check))
    return out


# ---------------------------------------------------------------------------- PyTorch


def _eager_ce(inp: Inputs) -> torch.Tensor:
    return F.cross_entropy(inp.x.float(), inp.t)


def _eager_ce_native(inp: Inputs) -> torch.Tensor:
    return F.cross_entropy(inp.x, inp.t)


def _eager_lp(inp: Inputs) -> torch.Tensor:
    return torch.log_softmax(inp.x.float(), dim=-1).gather(1, inp.t.unsqueeze(1)).squeeze(1)


def _eager_lin(inp: Inputs) -> torch.Tensor:
    return F.cross_entropy((inp.h @ inp.w.T).float(), inp.t)


def _eager_for(op: str):
    return {CE: _eager_ce, LP: _eager_lp, LIN: _eager_lin}[op]


def _compiled_builder(case: Case, device: torch.device):
    # each case compiles afresh (static shapes); resetting also keeps dynamo's per-code
    # cache from filling up over a long sweep and silently falling back to eager
    torch._dynamo.reset()
    return torch.compile(_eager_for(case.op), dynamic=False)


def _torch_lce_check(case: Case, device: torch.device) -> Optional[str]:
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn,
                                                             "LinearCrossEntropyOptions"):
        return f"torch {torch.__version__} has no F.linear_cross_entropy with options"
    return None


def _torch_lce_builder(case: Case, device: torch.device):
    opts = torch.nn.LinearCrossEntropyOptions()
    return lambda inp: F.linear_cross_entropy(inp.h, inp.w, inp.t, options=opts)


def _native_check(case: Case, device: torch.device) -> Optional[str]:
    if case.dtype == torch.float32:
        return "same as eager for fp32"
    return None


class _VocabParallelCE(torch.autograd.Function):
    """Hand-written PyTorch vocab-parallel CE / log-prob (the usual Megatron-style recipe).

    Per rank: m = allreduce_max(max_j x_j); s = allreduce_sum(sum_j exp(x_j - m));
    x_t = allreduce_sum(x_t if t in shard else 0); nll = m + log s - x_t. The fp32 softmax of
    the shard is kept for backward: dx = g * (p - onehot).
    """

    @staticmethod
    def forward(ctx, x, t, vocab_start, group):
        import torch.distributed as dist

        xf = x.float()
        m = xf.max(dim=-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        p = (xf - m.unsqueeze(1)).exp_()
        s = p.sum(dim=-1)
        dist.all_reduce(s, group=group)
        local = t - vocab_start
        inside = (local >= 0) & (local < x.shape[-1])
        safe = torch.where(inside, local, torch.zeros_like(local))
        xt = xf.gather(1, safe.unsqueeze(1)).squeeze(1) * inside
        dist.all_reduce(xt, group=group)
        p.div_(s.unsqueeze(1))
        ctx.save_for_backward(p, safe, inside)
        ctx.in_dtype = x.dtype
        return m + s.log() - xt

    @staticmethod
    def backward(ctx, g):
        p, safe, inside = ctx.saved_tensors
        p.scatter_add_(1, safe.unsqueeze(1), -inside.float().unsqueeze(1))
        return (p * g.unsqueeze(1)).to(ctx.in_dtype), None, None, None


def _tp_torch_builder(case: Case, device: torch.device):
    if case.op == CE:
        return lambda inp: _VocabParallelCE.apply(inp.x, inp.t, inp.vocab_start,
                                                  inp.group).mean()
    return lambda inp: -_VocabParallelCE.apply(inp.x, inp.t, inp.vocab_start, inp.group)


def _pytorch_methods() -> List[Method]:
    return [
        Method("eager", (CE, LP, LIN), "pytorch", lambda c, d: _eager_for(c.op),
               "PyTorch eager, logits upcast to fp32 (LIN: matmul in dtype, then CE)"),
        Method("eager-native", (CE,), "pytorch", lambda c, d: _eager_ce_native,
               "PyTorch eager F.cross_entropy on the logits' own dtype", check=_native_check),
        Method("compile", (CE, LP, LIN), "pytorch", _compiled_builder,
               "torch.compile of the eager form"),
        Method("torch-lce", (LIN,), "pytorch", _torch_lce_builder,
               "F.linear_cross_entropy with LinearCrossEntropyOptions()", check=_torch_lce_check),
        Method("pytorch-tp", (CE, LP), "pytorch", _tp_torch_builder,
               "hand-written PyTorch vocab-parallel CE (all-reduce max/sum/target logit)",
               tp="yes"),
    ]


# ---------------------------------------------------------------------------- peers


def _liger_ce_builder(case: Case, device: torch.device):
    from liger_kernel.transformers import LigerCrossEntropyLoss

    mod = LigerCrossEntropyLoss()
    return lambda inp: mod(inp.x, inp.t)


def _liger_flce_builder(case: Case, device: torch.device):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    mod = LigerFusedLinearCrossEntropyLoss()
    return lambda inp: mod(inp.w, inp.h, inp.t)


def _cce_builder(case: Case, device: torch.device):
    from cut_cross_entropy import linear_cross_entropy

    return lambda inp: linear_cross_entropy(inp.h, inp.w, inp.t)


def _quack_builder(inplace: bool):
    def build(case: Case, device: torch.device):
        from quack.cross_entropy import cross_entropy

        params = inspect.signature(cross_entropy).parameters
        kw = {}
        if "inplace_backward" in params:
            kw["inplace_backward"] = inplace
        elif inplace:
            raise RuntimeError("this quack version has no inplace_backward")
        if "reduction" in params:
            kw["reduction"] = "mean"
            return lambda inp: cross_entropy(inp.x, inp.t, **kw)
        return lambda inp: cross_entropy(inp.x, inp.t, **kw).float().mean()
    return build


def _peer_methods() -> List[Method]:
    return [
        Method("liger", (CE,), "peer", _liger_ce_builder,
               "Liger-Kernel LigerCrossEntropyLoss (gradient written over the logits)",
               inplace=True, cuda_only=True, requires="liger_kernel.transformers"),
        Method("liger-flce", (LIN,), "peer", _liger_flce_builder,
               "Liger-Kernel LigerFusedLinearCrossEntropyLoss", cuda_only=True,
               requires="liger_kernel.transformers"),
        Method("cce", (LIN,), "peer", _cce_builder, "Cut Cross-Entropy linear_cross_entropy",
               cuda_only=True, requires="cut_cross_entropy"),
        Method("quack", (CE,), "peer", _quack_builder(False), "quack cross_entropy",
               cuda_only=True, requires="quack.cross_entropy"),
        Method("quack-inplace", (CE,), "peer", _quack_builder(True),
               "quack cross_entropy, inplace_backward=True", inplace=True, cuda_only=True,
               requires="quack.cross_entropy"),
    ]


def peak_estimate(case: Case, method: Method) -> int:
    """Rough bytes ``method`` holds at its peak on ``case`` (inputs included), per rank.

    fusedce in place: the logits; fusedce: the logits and their gradient (linear CE: the
    matrices, their gradients and one chunk of logits); anything else: the logits plus
    fp32 log-probabilities and gradients (12 bytes per logit beyond the inputs' own).
    """
    s = torch.empty((), dtype=case.dtype).element_size()
    v = -(-case.v // max(1, case.tp))
    logits = case.n * v
    if case.op == LIN:
        mats = 2 * s * (case.n * case.d + v * case.d)
        if method.family == "fusedce":
            return mats + min(logits, 2**25) * 4
        return mats + logits * (2 * s + 12)
    if method.family == "fusedce":
        return logits * s * (1 if method.inplace else 2)
    return logits * (2 * s + 12)


def all_methods() -> List[Method]:
    """Every known method, fusedce first."""
    return _fusedce_methods() + _pytorch_methods() + _peer_methods()


def select_methods(patterns: Optional[Sequence[str]] = None) -> List[Method]:
    """Methods whose names match any of ``patterns`` (fnmatch globs; all when None)."""
    methods = all_methods()
    if not patterns:
        return methods
    chosen = [m for m in methods if any(fnmatch.fnmatch(m.name, p) for p in patterns)]
    if not chosen:
        raise ValueError(f"no method matches {list(patterns)}; known: "
                         f"{[m.name for m in methods]}")
    return chosen
