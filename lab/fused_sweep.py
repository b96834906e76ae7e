"""Sweep of the fused forward + gradient kernel (fused_rows, ce.RowsConfig; in place, bf16,
N = 16384) against the 4-byte floor, the table's configuration first. Each configuration is
checked against the torch backend (loss rows, sampled gradient rows) before it is timed.

Usage: PYTHONPATH=src:tests python benchmarks/fused_sweep.py [--V 32000,128256,262144]
       [--configs "block,warps,per_sm,stages,reverse,hints[,prefetch,persistent,tvec,split,
       early];..."] [--variants "hints=3;reverse=1,hints=7;..."] [--new]
--variants: the table's own configuration at each V with these fields replaced (after the
configs); --new: each configuration is also timed writing into a new gradient buffer, after
the same restore copy (the in-place penalty, notes/NEXT.md item 1).
Timed: the loss kernel autograd calls (backend.fused_loss, in place, gradient of the mean).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import ce_gpu as cg  # noqa: E402
import fusedce as fce  # noqa: E402,I001
from fusedce import spec  # noqa: E402
from fusedce.triton import backend as tb, ce, fused_rows  # noqa: E402

# block,warps,per_sm,stages,reverse,hints[,prefetch,persistent,tvec,split,early]
DEFAULT = ("4096,8,3,1,1,1,1,1;4096,8,4,1,1,1,1,1;4096,8,4,1,1,1,0,1;4096,8,5,1,1,1,0,1;"
           "2048,4,8,1,1,1,1,1;2048,4,6,1,1,1,1,1;4096,8,1,1,1,1,0,0;4096,8,1,1,1,1,1,0;"
           "2048,4,1,1,1,1,1,0;8192,16,2,1,1,1,1,1;4096,8,3,3,1,1,0,1;4096,8,4,1,0,1,1,1;"
           "4096,8,4,1,1,0,1,1;4096,4,8,1,1,1,0,1")


def parse(spec_s):
    out = []
    for item in spec_s.split(";"):
        v = [int(v) for v in item.split(",")]
        v += [0, 1, 1, 1, 1][len(v) - 6:]  # prefetch, persistent, tvec, split, early
        b, w, p, st, rv, h, pf, pers, tv, sp, ea = v[:11]
        out.append(ce.RowsConfig(block=b, num_warps=w, per_sm=p, stages=st, reverse=bool(rv),
                                 hints=h, prefetch=bool(pf), persistent=bool(pers),
                                 tvec=bool(tv), split=sp, early=bool(ea)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--V", default="32000,128256,262144")
    ap.add_argument("--N", type=int, default=16384)
    ap.add_argument("--configs", default=DEFAULT)
    ap.add_argument("--variants", default="",
                    help="';'-separated field=value lists applied to the table's entry per V")
    ap.add_argument("--new", action="store_true", help="also time into a new buffer")
    ap.add_argument("--max-split", type=int, default=0,
                    help="raise the launcher's cap on SPLIT parts (ce.MAX_SPLIT) for the run")
    args = ap.parse_args()
    if args.max_split:
        fused_rows.MAX_SPLIT = args.max_split
    _, bw = cg.ceilings()
    cg.log(f"copy {bw:.3f} TB/s, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    cands = [None] + (parse(args.configs) if args.configs else [])
    variants = [dict((kv.split("=")[0], int(kv.split("=")[1])) for kv in item.split(","))
                for item in args.variants.split(";") if item]
    table = {}
    for V in [int(v) for v in args.V.split(",")]:
        N = args.N
        x_src, t = cg.make_data(N, V, seed=3)
        floor4 = 4 * N * V / (bw * 1e12) * 1e3
        opts = spec.LossOptions()
        x = x_src.clone()
        x3 = x.unsqueeze(0)
        # reference: the torch backend, reduction none with random upstream gradients
        g = torch.rand(N, device="cuda") + 0.5
        rows = torch.arange(0, N, 61, device="cuda")
        xr = x_src.clone().requires_grad_(True)
        lr = fce.cross_entropy(xr, t, reduction="none", backend="torch", z_loss=1e-4,
                               label_smoothing=0.05)
        lr.backward(g)
        ref_loss, ref_grad = lr.detach(), xr.grad[rows].float()
        del xr, lr

        def restore():
            with torch.no_grad():
                x.copy_(x_src)

        def kernel():
            tb.fused_loss(x3, t, opts, vocab_size=V, weight=None, normalizer=None, out=x3,
                          need_am=False)

        gbuf = torch.empty_like(x3) if args.new else None

        def kernel_new():
            tb.fused_loss(x3, t, opts, vocab_size=V, weight=None, normalizer=None, out=gbuf,
                          need_am=False)

        base = ce.fused_config(V, x_src.element_size())
        named = [(str(c) if c is not None else "table", c) for c in cands]
        for var in variants:
            kw = {k: (bool(v) if isinstance(getattr(base, k), bool) else v)
                  for k, v in var.items()}
            named.append(("table " + ",".join(f"{k}={v}" for k, v in var.items()),
                          dataclasses.replace(base, **kw)))
        for key, c in named:
            ce.set_override(fused=c)
            try:
                restore()
                xg = x.requires_grad_(True)
                loss = fce.cross_entropy(xg, t, reduction="none", inplace_backward=True,
                                         z_loss=1e-4, label_smoothing=0.05)
                loss.backward(g)
                el = cg.rel(loss, ref_loss)
                eg = cg.rel(xg.grad[rows], ref_grad)
                xg.grad = None
                x.requires_grad_(False)
                ms = cg.time_step(kernel, restore, budget_ms=250)
                table.setdefault(key, {})[V] = ms / floor4
                msg = ""
                if gbuf is not None:
                    ms_new = cg.time_step(kernel_new, restore, budget_ms=250)
                    table.setdefault(key + " | new", {})[V] = ms_new / floor4
                    msg = f", new buffer {ms_new:.3f} ms = {ms_new / floor4:.3f}x"
                cg.log(f"V={V} {key} {c}: {ms:.3f} ms = {ms / floor4:.3f}x{msg} "
                       f"(loss {el:.1e}, grad {eg:.1e})")
            except Exception as exc:  # noqa: BLE001
                x.requires_grad_(False)
                cg.log(f"V={V} {c}: FAILED {exc!r}")
            finally:
                ce.set_override(fused=None)
        del x, x3, x_src, gbuf
        torch.cuda.empty_cache()
    cg.log("resources rows kernel:", cg.kernel_resources(fused_rows._fused_rows_kernel))
    cg.log("\nconfig | " + " | ".join(args.V.split(",")))
    for k, row in table.items():
        cg.log(k + " | " + " | ".join(f"{row.get(int(v), float('nan')):.3f}"
                                      for v in args.V.split(",")))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "fused_sweep.json"), "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
