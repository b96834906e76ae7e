"""``fusedce check``: every backend on this machine against a float64 reference.

For each backend (torch; triton on CUDA, or on the CPU through the Triton interpreter
TRITON_INTERPRET=1) and each option set, the loss (and aux outputs) and the gradient
for a random upstream gradient are compared with float64 references computed from the
same (rounded) inputs:

    loss_row = F.cross_entropy(z, t, weight, label_smoothing, reduction="none") + zl * lse^2
    z = softcap * tanh(logit_scale * x / softcap)  (or logit_scale * x)

reduced by sum / mean (over non-ignored rows or their target weights, 0 when none) /
normalizer; logprobs = z_t - lse; entropy = lse - sum_j p_j z_j. Errors are normwise
relative, ||y - y64|| / max(||y64||, tiny), against dtype-aware tolerances.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

TOL = {  # (loss, gradient) normwise relative tolerances by logits dtype
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (1e-4, 1.2e-2),
    torch.float16: (1e-4, 2e-3),
}


@dataclass
class CheckResult:
    backend: str
    name: str
    ok: bool
    err_out: float
    err_grad: float
    message: str = ""
    seconds: float = 0.0


def _nrel(y: torch.Tensor, ref: torch.Tensor) -> float:
    y = y.detach().double()
    ref = ref.detach().double()
    if y.shape != ref.shape:
        return float("inf")
    if not bool(torch.isfinite(y).all()) and bool(torch.isfinite(ref).all()):
        return float("inf")
    den = float(ref.norm())
    return float((y - ref).norm()) / max(den, 1e-30) if den > 0 else float((y - ref).norm())


def _transform64(x, softcap, logit_scale):
    z = x.double() * logit_scale
    return softcap * torch.tanh(z / softcap) if softcap is not None else z


def ref_loss(x, t, *, weight=None, ignore_index=-100, reduction="mean", normalizer=None,
             label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0):
    """float64 reference of the loss spec (differentiable w.r.t. x)."""
    V = x.shape[-1]
    z = _transform64(x, softcap, logit_scale).reshape(-1, V)
    tt = t.reshape(-1).long()
    valid = tt != ignore_index
    safe = torch.where(valid, tt, torch.zeros_like(tt))
    w = None if weight is None else weight.double()
    rows = F.cross_entropy(z, safe, weight=w, reduction="none", label_smoothing=label_smoothing)
    lse = torch.logsumexp(z, dim=-1)
    if z_loss:
        rows = rows + z_loss * lse * lse
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if normalizer is not None:
        return rows.sum() / float(normalizer)
    if reduction == "none":
        return rows.view(t.shape)
    if reduction == "sum":
        return rows.sum()
    den = valid.double().sum() if w is None else (w[safe] * valid).sum()
    return rows.sum() / den if float(den) > 0 else rows.sum() * 0.0


def _case_list(have_linear: bool) -> List[dict]:
    cases = [
        dict(name="mean"),
        dict(name="sum", kw=dict(reduction="sum")),
        dict(name="none (random upstream grad)", kw=dict(reduction="none")),
        dict(name="ignore_index (30% of rows)", ignore=0.3),
        dict(name="all rows ignored (mean -> 0)", ignore=1.0),
        dict(name="label_smoothing=0.1", kw=dict(label_smoothing=0.1)),
        dict(name="z_loss=1e-3", kw=dict(z_loss=1e-3)),
        dict(name="softcap=20, logit_scale=0.7", kw=dict(softcap=20.0, logit_scale=0.7)),
        dict(name="class weights", weight=True),
        dict(name="weights + smoothing + ignore + z_loss",
             kw=dict(label_smoothing=0.05, z_loss=1e-4), weight=True, ignore=0.2),
        dict(name="normalizer=97.0", kw=dict(normalizer=97.0)),
        dict(name="int32 targets", int32=True),
        dict(name="non-contiguous logits (strided view)", strided=True),
        dict(name="bfloat16 logits", dtype=torch.bfloat16),
        dict(name="float16 logits", dtype=torch.float16),
        dict(name="bfloat16 + smoothing + ignore", dtype=torch.bfloat16,
             kw=dict(label_smoothing=0.1), ignore=0.25),
        dict(name="inplace_backward", kw=dict(inplace_backward=True)),
        dict(name="return_aux (lse, accuracy)", aux=True),
        dict(name="logprobs", op="logprobs"),
        dict(name="entropy", op="entropy"),
    ]
    if have_linear:
        cases.append(dict(name="linear_cross_entropy", op="linear"))
        cases.append(dict(name="linear_cross_entropy bf16 + smoothing", op="linear",
                          dtype=torch.bfloat16, kw=dict(label_smoothing=0.1)))
    return cases


QUICK = {"mean", "none (random upstream grad)", "ignore_index (30% of rows)",
         "label_smoothing=0.1", "bfloat16 logits", "logprobs", "linear_cross_entropy"}


def _run_case(c: dict, backend: str, device: torch.device, B: int, T: int, V: int,
              gen: torch.Generator) -> tuple:
    import fusedce as fce

    dtype = c.get("dtype", torch.float32)
    kw = dict(c.get("kw", {}))
    op = c.get("op", "cross_entropy")
    tol_out, tol_grad = TOL[dtype]

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    t = torch.randint(0, V, (B, T), generator=gen).to(device)
    if c.get("ignore"):
        mask = torch.rand(B, T, generator=gen).to(device) < c["ignore"]
        if c["ignore"] >= 1.0:
            mask[:] = True
        t = torch.where(mask, torch.full_like(t, -100), t)
    if c.get("int32"):
        t = t.int()
    weight = (torch.rand(V, generator=gen) + 0.5).to(device) if c.get("weight") else None

    if op == "linear":
        D = 48
        h = randn(B, T, D).to(dtype).requires_grad_(True)
        w = randn(V, D, scale=2.0 / math.sqrt(D)).to(dtype).requires_grad_(True)
        loss = fce.linear_cross_entropy(h, w, t, backend=backend, **kw)
        loss.backward()
        h64 = h.detach().double().requires_grad_(True)
        w64 = w.detach().double().requires_grad_(True)
        ref = ref_loss(h64 @ w64.T, t, **kw)
        ref.backward()
        e_out = _nrel(loss, ref)
        e_grad = max(_nrel(h.grad, h64.grad), _nrel(w.grad, w64.grad))
        return e_out, e_grad, tol_out, tol_grad

    if c.get("strided"):
        base = randn(T, B, V + 5, 2, scale=2.0).to(dtype)
        x = base[:, :, :V, 0].transpose(0, 1)  # [B, T, V]: padded rows, column stride 2
        x.requires_grad_(True)
    else:
        x = randn(B, T, V, scale=2.0).to(dtype).requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    inplace = kw.get("inplace_backward", False)
    # in-place writes the gradient into the logits: give it its own non-leaf copy
    x_in = x.detach().clone().requires_grad_(True) if inplace else x

    if op == "logprobs":
        y = fce.logprobs(x_in, t, backend=backend)
        z = torch.log_softmax(x64, dim=-1)
        tt = t.long()
        valid = tt != -100
        ref = torch.where(valid, z.gather(-1, torch.where(valid, tt, 0).unsqueeze(-1))
                          .squeeze(-1), torch.zeros_like(tt, dtype=torch.float64))
    elif op == "entropy":
        y = fce.entropy(x_in, backend=backend)
        p = torch.softmax(x64, dim=-1)
        ref = -(p * torch.log_softmax(x64, dim=-1)).sum(-1)
    else:
        out = fce.cross_entropy(x_in, t, weight=weight, backend=backend,
                                return_aux=c.get("aux", False), **kw)
        y = out.loss if c.get("aux") else out
        kw.pop("inplace_backward", None)
        ref = ref_loss(x64, t, weight=weight, **kw)
    gup = None
    if y.dim() > 0:
        gup = torch.randn(y.shape, generator=gen).to(device)
        y.backward(gup)
        ref.backward(gup.double())
    else:
        y.backward()
        ref.backward()
    e_out = _nrel(y, ref)
    if c.get("aux") and op == "cross_entropy":
        lse64 = torch.logsumexp(x64.detach(), dim=-1)
        e_out = max(e_out, _nrel(out.lse, lse64))
        tt = t.long()
        valid = tt != -100
        acc64 = ((x64.detach().argmax(-1) == tt) & valid).double().sum() / max(
            1, int(valid.sum()))
        if abs(float(out.accuracy) - float(acc64)) > 1e-6:
            e_out = float("inf")
    g = x_in.grad
    e_grad = _nrel(g, x64.grad) if g is not None else float("inf")
    return e_out, e_grad, tol_out, tol_grad


def available_backends(device: torch.device) -> Dict[str, Optional[str]]:
    """backend name -> None if it can run here, else why not."""
    out: Dict[str, Optional[str]] = {"torch": None}
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        out["triton"] = "no CUDA and TRITON_INTERPRET is not 1"
        return out
    try:
        import importlib

        importlib.import_module("fusedce.triton.backend")
        out["triton"] = None
    except Exception as exc:  # noqa: BLE001
        out["triton"] = f"fusedce.triton.backend does not import ({type(exc).__name__}: {exc})"
    return out


def run_check(device: torch.device, backends: Optional[Sequence[str]] = None, *,
              quick: bool = False, seed: int = 0, shape=(2, 37, 1003),
              log: Callable[[str], None] = print) -> List[CheckResult]:
    """Run every option set on every available backend; returns the results (also logged)."""
    import fusedce as fce

    have_linear = hasattr(fce, "linear_cross_entropy")
    avail = available_backends(device)
    names = list(backends) if backends else list(avail)
    results: List[CheckResult] = []
    B, T, V = shape
    for be in names:
        why = avail.get(be, f"unknown backend {be!r}")
        if why is not None:
            log(f"{be}: skipped ({why})")
            continue
        where = "CUDA" if device.type == "cuda" else (
            "CPU, Triton interpreter" if be == "triton" else "CPU")
        log(f"backend {be} ({where}), logits [{B}, {T}, {V}]:")
        for c in _case_list(have_linear):
            if quick and c["name"] not in QUICK:
                continue
            gen = torch.Generator()
            gen.manual_seed(seed + hash(c["name"]) % 10_000)
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    # the Triton interpreter evaluates masked-off lanes too (numpy NaN noise)
                    warnings.filterwarnings("ignore", category=RuntimeWarning,
                                            module=r"triton\..*")
                    e_out, e_grad, tol_o, tol_g = _run_case(c, be, device, B, T, V, gen)
                ok = e_out <= tol_o and e_grad <= tol_g
                msg = "" if ok else f"tolerance {tol_o:.0e} / {tol_g:.0e}"
            except Exception as exc:  # noqa: BLE001 - a failing option set is a FAIL line
                e_out = e_grad = float("nan")
                ok = False
                first = (str(exc).strip().splitlines() or [""])[0]
                msg = f"{type(exc).__name__}: {first}"[:160]
            r = CheckResult(be, c["name"], ok, e_out, e_grad, msg, time.perf_counter() - t0)
            results.append(r)
            log(f"  {'PASS' if ok else 'FAIL'}  {c['name']:<40} loss err {e_out:.1e}  "
                f"grad err {e_grad:.1e}  ({r.seconds:.1f}s){'  ' + msg if msg else ''}")
    n_ok = sum(r.ok for r in results)
    log(f"{n_ok} passed, {len(results) - n_ok} failed")
    return results
