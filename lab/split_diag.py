"""Diagnose SPLIT with more than 4 parts per row (notes/NEXT.md item 0; runs 42-43 found a few
wrong loss rows in a thousand with 8 parts). On a GPU:

    PYTHONPATH=src:tests python tools/split_diag.py [--parts 8] [--V 262144] [--dtype fp32]

raises the launcher's cap (fused_rows.MAX_SPLIT, imported from ce) for the run, computes the
loss rows (reduction "none") with the table's long-row configuration cut into --parts
segments, and for every row that differs from the torch backend tests which single fault
explains it (``explain``):
  * z_t lost or counted twice (got - ref = -z_t or +z_t);
  * one part's record taken from another row of the same group (rows r +- k P_G, k = 1, 2:
    a slot read before it was rewritten, or after it was rewritten for a later row).
``explain`` is pure PyTorch on the CPU (tests/test_tools.py checks it on synthetic faults).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch


def segment_stats(row: torch.Tensor, bounds: list[int], target: int):
    """Per segment of one row of scores (fp64): (m_q, s_q = sum exp(z - m_q), z_t in q or 0)."""
    out = []
    for q in range(len(bounds) - 1):
        z = row[bounds[q]:bounds[q + 1]].double()
        m = float(z.max())
        s = float(torch.exp(z - m).sum())
        zt = float(row[target]) if bounds[q] <= target < bounds[q + 1] else 0.0
        out.append((m, s, zt))
    return out


def fold_loss(parts) -> float:
    """lse - z_t from per-part (m, s, z_t), as the kernel folds them (no smoothing / z-loss)."""
    m = max(p[0] for p in parts)
    s = sum(p[1] * math.exp(p[0] - m) for p in parts)
    return m + math.log(s) - sum(p[2] for p in parts)


def explain(get, n_rows: int, row: int, got: float, bounds: list[int], groups: int,
            tol: float = 1e-3) -> list[str]:
    """The single faults (see the module docstring) that turn row ``row``'s loss into ``got``;
    ``get(r)`` gives row r's scores [V] and target, ``groups`` rows apart within a group."""
    x_r, t_r = get(row)
    mine = segment_stats(x_r, bounds, t_r)
    ref = fold_loss(mine)
    found = []
    zt = sum(p[2] for p in mine)
    if abs(got - (ref + zt)) < tol:
        found.append("z_t lost")
    if abs(got - (ref - zt)) < tol:
        found.append("z_t counted twice")
    for k in (-2, -1, 1, 2):
        other = row + k * groups
        if not 0 <= other < n_rows:
            continue
        x_o, t_o = get(other)
        theirs = segment_stats(x_o, bounds, t_o)
        for q in range(len(mine)):
            mixed = list(mine)
            mixed[q] = theirs[q]
            if abs(got - fold_loss(mixed)) < tol:
                found.append(f"part {q} from row {row}{k:+d}*{groups}")
    return found


def split_bounds(V: int, parts: int, block: int) -> list[int]:
    """Segment bounds as fused_rows.launch cuts a row: ceil(V / parts) rounded up to blocks."""
    per = -(-V // parts)
    segw = -(-per // block) * block
    return list(range(0, V, segw)) + [V]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", type=int, default=8)
    ap.add_argument("--V", type=int, default=262144)
    ap.add_argument("--N", type=int, default=4096)
    ap.add_argument("--dtype", default="fp32")
    args = ap.parse_args()
    import fusedce as fce
    from fusedce.triton import ce, fused_rows

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    es = torch.finfo(dtype).bits // 8
    gen = torch.Generator(device="cuda").manual_seed(5)
    x = (torch.randn(args.N, args.V, device="cuda", generator=gen) * 2.0).to(dtype)
    t = torch.randint(0, args.V, (args.N,), device="cuda", generator=gen)
    fused_rows.MAX_SPLIT = args.parts
    cfg = ce.fused_config(args.V, es)
    ce.set_override(fused=ce.RowsConfig(block=cfg.block, num_warps=cfg.num_warps,
                                        per_sm=cfg.per_sm, prefetch=True, reverse=False,
                                        tvec=False, split=args.parts))
    fce.set_validation(False)
    P = cfg.per_sm * ce._sm_count(x.device)
    groups = min(args.N, P // args.parts)
    block = min(cfg.block, 1 << (args.V - 1).bit_length())
    bounds = split_bounds(args.V, args.parts, block)
    segw = bounds[1]
    print(f"V={args.V} {args.dtype} parts={len(bounds) - 1} segw={segw} groups={groups} "
          f"block={block} warps={cfg.num_warps} per_sm={cfg.per_sm}", flush=True)
    ref = fce.cross_entropy(x, t, backend="torch", reduction="none")
    bad_total = 0
    for rep in range(3):
        # with a gradient wanted: SPLIT is the fused (loss + gradient) kernel's mode; a
        # forward without one takes the statistics kernel, which never splits
        xi = x.clone().requires_grad_(True)
        got = fce.cross_entropy(xi, t, backend="triton", reduction="none",
                                inplace_backward=bool(rep % 2)).detach()
        del xi
        bad = torch.nonzero((got - ref).abs() > 1e-4 * (1 + ref.abs())).flatten().tolist()
        bad_total += len(bad)
        print(f"repeat {rep}: {len(bad)} bad rows", flush=True)
        def get(r):
            return x[r].float().cpu(), int(t[r])

        for r in bad[:12]:
            why = explain(get, args.N, r, float(got[r]), bounds, groups)
            print(f"  row {r} (group {r % groups}, iteration {r // groups}): got "
                  f"{float(got[r]):.5f} ref {float(ref[r]):.5f} -> {why or 'unexplained'}",
                  flush=True)
    return 1 if bad_total else 0


if __name__ == "__main__":
    sys.exit(main())
