"""Benchmark inputs (deterministic, random, never zeros) and fp64 references on a sample.

Logits x [N, V] are drawn in row blocks, block b from its own seed, as 2 * randn in fp32
rounded to the benchmark dtype, so any rank can regenerate any block (a vocab shard is
x[:, start:end]). Targets are uniform in [0, V). The linear case draws hidden h [N, D] =
randn and head W [V, D] = 2 * randn / sqrt(D) (logits of standard deviation ~2).

References, in float64 from the same rounded inputs, for mean-reduced CE:

    lse_r = log sum_j exp(x_rj),  loss = (1/N) sum_r (lse_r - x_{r,t_r})
    dloss/dx_rj = (softmax(x_r)_j - [j = t_r]) / N                    (rows r in a sample S)

logprobs: out_r = x_{r,t_r} - lse_r with gradient [j = t_r] - softmax(x_r)_j of sum_r out_r.
Linear CE: x = h W^T, dh_r = dx_r W (r in S), dW_c = sum_r dx_rc h_r (columns c in a sample C).
Errors are max-norm relative: err = max|y - y_ref| / max|y_ref| per output, the worst one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import torch

LOGIT_SCALE = 2.0


@dataclass
class Inputs:
    """Tensors of one case on one rank."""

    t: torch.Tensor  # [N] int64 global ids
    x: Optional[torch.Tensor] = None  # [N, V_local] logits
    h: Optional[torch.Tensor] = None  # [N, D]
    w: Optional[torch.Tensor] = None  # [V_local, D]
    vocab_start: int = 0
    group: object = None

    def leaves(self) -> List[torch.Tensor]:
        return [a for a in (self.x, self.h, self.w) if a is not None]

    def set_requires_grad(self, flag: bool) -> "Inputs":
        for a in self.leaves():
            a.requires_grad_(flag)
        return self

    def zero_grads(self) -> None:
        for a in self.leaves():
            a.grad = None

    def detached(self) -> "Inputs":
        """The same tensors without autograd (for forward-only runs)."""
        return Inputs(self.t, *(None if a is None else a.detach() for a in (self.x, self.h,
                                                                            self.w)),
                      vocab_start=self.vocab_start, group=self.group)


def _block_rows(v: int, device: torch.device) -> int:
    budget = (256 << 20) if device.type == "cuda" else (32 << 20)
    return max(1, budget // (4 * v))


def logits_blocks(n: int, v: int, dtype: torch.dtype, device: torch.device, seed: int
                  ) -> Iterator[Tuple[int, int, torch.Tensor]]:
    """Yield (r0, r1, x[r0:r1] full width in ``dtype``), the same on every rank."""
    rows = _block_rows(v, device)
    g = torch.Generator(device=device)
    for b, r0 in enumerate(range(0, n, rows)):
        r1 = min(n, r0 + rows)
        g.manual_seed(seed * 1_000_003 + b)
        blk = torch.randn(r1 - r0, v, generator=g, device=device, dtype=torch.float32)
        yield r0, r1, blk.mul_(LOGIT_SCALE).to(dtype)


def make_targets(n: int, v: int, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device)
    g.manual_seed(seed * 7919 + 1)
    return torch.randint(0, v, (n,), generator=g, device=device, dtype=torch.int64)


def make_logits(n: int, v: int, dtype: torch.dtype, device: torch.device, seed: int,
                cols: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """x [N, c1 - c0] = columns [c0, c1) of the deterministic logits (all when cols=None)."""
    c0, c1 = cols if cols is not None else (0, v)
    out = torch.empty(n, c1 - c0, dtype=dtype, device=device)
    for r0, r1, blk in logits_blocks(n, v, dtype, device, seed):
        out[r0:r1] = blk[:, c0:c1]
    return out


def make_linear(n: int, d: int, v: int, dtype: torch.dtype, device: torch.device, seed: int,
                rows: Optional[Tuple[int, int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(h [N, D], W[r0:r1] [V_local, D]) of the deterministic linear case."""
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + 17)
    h = torch.randn(n, d, generator=g, device=device, dtype=torch.float32).to(dtype)
    r0, r1 = rows if rows is not None else (0, v)
    w = torch.empty(r1 - r0, d, dtype=dtype, device=device)
    # W in row blocks with their own seeds, so a shard is generated without the rest
    step = max(1, (64 << 20) // (4 * d))
    scale = 2.0 / math.sqrt(d)
    for b, b0 in enumerate(range(0, v, step)):
        b1 = min(v, b0 + step)
        if b1 <= r0 or b0 >= r1:
            continue
        g.manual_seed(seed * 1_000_003 + 10_000 + b)
        blk = torch.randn(b1 - b0, d, generator=g, device=device, dtype=torch.float32)
        lo, hi = max(b0, r0), min(b1, r1)
        w[lo - r0:hi - r0] = blk[lo - b0:hi - b0].mul_(scale).to(dtype)
    return h, w


def sample_rows(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator()
    g.manual_seed(seed + 99)
    return torch.randperm(n, generator=g)[:min(n, k)].sort().values


@dataclass
class Reference:
    """fp64 reference of one case: outputs and sampled gradients (on the case's device)."""

    out: torch.Tensor  # scalar loss (CE, linear) or [N] log-probs
    rows: torch.Tensor  # sampled row ids S (cpu int64)
    grads: Dict[str, torch.Tensor] = field(default_factory=dict)  # name -> fp64 sample
    cols: Optional[torch.Tensor] = None  # sampled global vocab ids C (linear dW)


def reference_logits(op: str, n: int, v: int, dtype: torch.dtype, device: torch.device,
                     seed: int, t: torch.Tensor, cols: Tuple[int, int], k_rows: int = 32
                     ) -> Reference:
    """fp64 reference for cross_entropy (mean) / logprobs on the deterministic logits."""
    rows = sample_rows(n, k_rows, seed)
    rows_dev = rows.to(device)
    c0, c1 = cols
    per_row = torch.empty(n, dtype=torch.float64, device=device)
    gx = torch.empty(len(rows), c1 - c0, dtype=torch.float64, device=device)
    for r0, r1, blk in logits_blocks(n, v, dtype, device, seed):
        z = blk.double()
        lse = torch.logsumexp(z, dim=-1)
        zt = z.gather(1, t[r0:r1].unsqueeze(1)).squeeze(1)
        per_row[r0:r1] = lse - zt
        sel = ((rows_dev >= r0) & (rows_dev < r1)).nonzero().squeeze(1)
        if sel.numel():
            local = rows_dev[sel] - r0
            p = torch.exp(z[local] - lse[local].unsqueeze(1))
            p.scatter_add_(1, t[rows_dev[sel]].unsqueeze(1),
                           -torch.ones(len(sel), 1, dtype=torch.float64, device=device))
            gx[sel] = p[:, c0:c1]
        del z
    if op == "logprobs":
        return Reference(-per_row, rows, {"x": -gx})
    return Reference(per_row.mean(), rows, {"x": gx / n})


def reference_linear(h: torch.Tensor, w_full: torch.Tensor, t: torch.Tensor, seed: int,
                     k_rows: int = 16, k_cols: int = 64) -> Reference:
    """fp64 reference for mean-reduced linear CE: loss, dh on sampled rows, dW on sampled cols."""
    device = h.device
    n, v = h.shape[0], w_full.shape[0]
    rows = sample_rows(n, k_rows, seed)
    g = torch.Generator()
    g.manual_seed(seed + 5)
    cols = torch.randperm(v, generator=g)[:min(v, k_cols)].sort().values
    cols_dev = cols.to(device)
    h64, w64 = h.double(), w_full.double()
    step = max(1, (512 << 20) // (8 * v))
    total = torch.zeros((), dtype=torch.float64, device=device)
    dh = torch.empty(len(rows), h.shape[1], dtype=torch.float64, device=device)
    dw = torch.zeros(len(cols), h.shape[1], dtype=torch.float64, device=device)
    rows_dev = rows.to(device)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        z = h64[r0:r1] @ w64.T
        lse = torch.logsumexp(z, dim=-1)
        tt = t[r0:r1]
        total += (lse - z.gather(1, tt.unsqueeze(1)).squeeze(1)).sum()
        pc = torch.exp(z[:, cols_dev] - lse.unsqueeze(1))
        pc -= (tt.unsqueeze(1) == cols_dev.unsqueeze(0)).double()
        dw += pc.T @ h64[r0:r1]
        sel = ((rows_dev >= r0) & (rows_dev < r1)).nonzero().squeeze(1)
        if sel.numel():
            local = rows_dev[sel] - r0
            p = torch.exp(z[local] - lse[local].unsqueeze(1))
            p.scatter_add_(1, tt[local].unsqueeze(1),
                           -torch.ones(len(sel), 1, dtype=torch.float64, device=device))
            dh[sel] = p @ w64
        del z
    return Reference(total / n, rows, {"h": dh / n, "w": dw / n}, cols)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max|y - ref| / max|ref| (inf when y is non-finite or the shapes differ)."""
    y = y.detach().double().reshape(ref.shape) if y.numel() == ref.numel() else None
    if y is None:
        return float("inf")
    if not bool(torch.isfinite(y).all()):
        return float("inf")
    den = ref.abs().max().clamp_min(1e-300)
    return float((y - ref).abs().max() / den)
