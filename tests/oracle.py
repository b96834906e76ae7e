"""fp64 reference for the loss spec (docs/design.md), built on F.cross_entropy.

    loss_row = F.cross_entropy(z, t, weight, label_smoothing, reduction="none") + zl * lse^2
    z = softcap * tanh(logit_scale * x / softcap)  (or logit_scale * x)

Reductions: sum; mean over non-ignored rows (or their target weights), 0 when none;
sum / normalizer. Everything in float64 on the CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def transform64(x, softcap=None, logit_scale=1.0):
    z = x.double() * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def ref_cross_entropy(logits, target, *, weight=None, ignore_index=-100, reduction="mean",
                      normalizer=None, label_smoothing=0.0, z_loss=0.0, softcap=None,
                      logit_scale=1.0, return_rows=False):
    """Loss in float64 (differentiable w.r.t. ``logits``)."""
    V = logits.shape[-1]
    z = transform64(logits, softcap, logit_scale).reshape(-1, V)
    t = target.reshape(-1).long()
    w = None if weight is None else weight.double()
    valid = t != ignore_index
    # ignored rows are masked here, so any ignore_index (even a valid class id) works
    rows = F.cross_entropy(z, torch.where(valid, t, torch.zeros_like(t)), weight=w,
                           reduction="none", label_smoothing=label_smoothing)
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    lse = torch.logsumexp(z, dim=-1)
    if z_loss:
        rows = rows + torch.where(valid, z_loss * lse * lse, torch.zeros_like(lse))
    if return_rows:
        return rows.view(target.shape), lse.view(target.shape)
    if normalizer is not None:
        return rows.sum() / (normalizer.double() if torch.is_tensor(normalizer) else normalizer)
    if reduction == "none":
        return rows.view(target.shape)
    if reduction == "sum":
        return rows.sum()
    if w is None:
        den = valid.sum().double()
    else:
        den = (w[torch.where(valid, t, torch.zeros_like(t))] * valid).sum()
    return rows.sum() / den if den > 0 else rows.sum() * 0.0


def ref_logprobs(logits, target, *, logit_scale=1.0, ignore_index=-100):
    V = logits.shape[-1]
    lp = torch.log_softmax(logits.double() * logit_scale, dim=-1).reshape(-1, V)
    t = target.reshape(-1).long()
    valid = t != ignore_index
    out = lp.gather(1, torch.where(valid, t, torch.zeros_like(t)).unsqueeze(1)).squeeze(1)
    return torch.where(valid, out, torch.zeros_like(out)).view(target.shape)


def ref_entropy(logits, *, logit_scale=1.0):
    lp = torch.log_softmax(logits.double() * logit_scale, dim=-1)
    return -(lp.exp() * lp).sum(-1)


def tol(dtype):
    """Normwise relative tolerance for a result computed from inputs of ``dtype``."""
    return {torch.float64: 1e-6, torch.float32: 1e-5, torch.bfloat16: 2e-2,
            torch.float16: 4e-3}[dtype]


def assert_close_normwise(out, ref, rtol, what="", floor=None):
    out = out.double()
    ref = ref.double()
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} vs {tuple(ref.shape)}"
    assert not torch.isnan(out).any() or torch.isnan(ref).any(), f"{what}: unexpected NaN"
    num = (out - ref).norm()
    # an absolute floor: a reference that is exactly 0 (e.g. the gradient when V = 1) is
    # matched to fp32 rounding, not to a relative 0
    den = ref.norm().clamp_min((1e-3 if floor is None else floor) * max(1, ref.numel()) ** 0.5)
    err = float((num / den).detach()) if ref.numel() else 0.0
    assert err <= rtol, f"{what}: normwise error {err:.3e} > {rtol:.1e}"


def assert_compiled_matches_eager(f, x0, t, upstream: float, backend: str = "inductor"):
    """torch.compile(f, fullgraph=True) and eager f give the same loss and gradient for a
    scaled upstream gradient (validation off, as compiled code runs it)."""
    import fusedce as fce

    with fce.validation(False):
        cf = torch.compile(f, fullgraph=True, backend=backend)
        a = x0.clone().requires_grad_(True)
        la = cf(a, t)
        (la * upstream).backward()
    b = x0.clone().requires_grad_(True)
    lb = f(b, t)
    (lb * upstream).backward()
    assert_close_normwise(la.detach().cpu(), lb.detach().cpu(), 1e-6, "compiled loss")
    assert_close_normwise(a.grad.cpu(), b.grad.cpu(), 1e-6, "compiled grad")
