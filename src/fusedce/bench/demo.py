"""``fusedce demo``: a tiny language-model head trained for one step, three ways.

hidden h [B, T, D] -> logits x = h W^T [B, T, V] -> loss = mean_r CE(x_r, t_r); backward to
W and h. Compared: PyTorch eager (``F.cross_entropy(x.float(), t)``), fusedce.cross_entropy on
the same logits (fresh gradient, then ``inplace_backward=True``), and, when available,
fusedce.linear_cross_entropy (the logits never exist in full). Prints each loss, its
difference from eager, the gradient difference, and the peak extra memory of the step
(see :mod:`fusedce.bench.measure`).
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from . import measure
from .report import fmt_bytes


def run_demo(device: torch.device, *, batch: int = 4, seq: int = 256, hidden: int = 256,
             vocab: int = 32000, dtype: Optional[torch.dtype] = None, seed: int = 0,
             log: Callable[[str], None] = print) -> List[dict]:
    """Run the demo; returns one dict per variant (name, loss, peak bytes, grad error)."""
    import fusedce as fce

    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    h0 = torch.randn(batch, seq, hidden, generator=g).to(device=device, dtype=dtype)
    head = torch.nn.Linear(hidden, vocab, bias=False).to(device=device, dtype=dtype)
    t = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    t[:, -1] = -100  # the last position has no next token: ignored
    n = batch * seq
    nbytes = n * vocab * torch.empty((), dtype=dtype).element_size()
    log(f"tiny LM head on {device} ({dtype}): hidden [{batch}, {seq}, {hidden}] -> logits "
        f"[{batch}, {seq}, {vocab}] ({fmt_bytes(nbytes)} in {str(dtype).replace('torch.', '')}),"
        " targets with the last position ignored")

    def variant(loss_fn):
        def step():
            h = h0.detach().requires_grad_(True)
            loss = loss_fn(h)
            loss.backward()
            return loss.detach(), h.grad, head.weight.grad
        return step

    def eager(h):
        return F.cross_entropy(head(h).float().flatten(0, 1), t.flatten())

    def fused(h):
        return fce.cross_entropy(head(h), t)

    def fused_inplace(h):
        return fce.cross_entropy(head(h), t, inplace_backward=True)

    variants = [("PyTorch eager F.cross_entropy(logits.float())", eager),
                ("fusedce.cross_entropy", fused),
                ("fusedce.cross_entropy(inplace_backward=True)", fused_inplace)]
    if hasattr(fce, "linear_cross_entropy"):
        variants.append(("fusedce.linear_cross_entropy (no logits)",
                         lambda h: fce.linear_cross_entropy(h, head.weight, t)))
    rows = []
    ref = None
    for name, fn in variants:
        step = variant(fn)
        step()  # warm-up (kernels, autotuning)
        head.weight.grad = None  # freed outside the measured step
        peak, _net, (loss, gh, gw) = measure.peak_bytes(step, device)
        head.weight.grad = None
        if ref is None:
            ref = (loss, gh, gw)
        dl = abs(float(loss) - float(ref[0]))
        dg = max(float((gh.float() - ref[1].float()).abs().max()),
                 float((gw.float() - ref[2].float()).abs().max()))
        rows.append(dict(name=name, loss=float(loss), peak_bytes=peak, loss_diff=dl,
                         grad_diff=dg))
        del gh, gw
        measure.free_memory(device)
    base = rows[0]["peak_bytes"]
    w = max(len(r["name"]) for r in rows)
    log(f"{'variant':<{w}}  {'loss':>9}  {'|dloss|':>8}  {'max|dgrad|':>10}  "
        f"{'peak extra memory':>18}")
    for r in rows:
        saved = 1.0 - r["peak_bytes"] / base if base else 0.0
        if r is rows[0]:
            note = "baseline"
        elif abs(saved) < 0.005:
            note = "same"
        else:
            note = f"{saved:.0%} saved" if saved > 0 else f"{-saved:.0%} more"
        log(f"{r['name']:<{w}}  {r['loss']:9.5f}  {r['loss_diff']:8.1e}  {r['grad_diff']:10.1e}  "
            f"{fmt_bytes(r['peak_bytes']):>10} ({note})")
    log("peak extra memory: allocated during one forward + backward of the head and the loss "
        "(logits and gradients included) beyond what was live before it")
    return rows
