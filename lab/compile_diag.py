"""Isolate the GPU torch.compile mismatch (notes/NEXT.md item 0): one fresh static compile per
(shape, options, inplace) case, against eager; prints the relative error of the loss and the
gradient per case and keeps going past failures. With DUMP=1 the case named by DUMP_CASE
(index) is compiled again with Inductor's output code logged to stderr.

    PYTHONPATH=src:tests python tools/compile_diag.py
"""

from __future__ import annotations

import os
import sys

import torch

import fusedce as fce


def _data(n, V, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(n, V, device="cuda", generator=gen) * 2.0).to(torch.bfloat16)
    t = torch.randint(0, V, (n,), device="cuda", generator=gen)
    return x, t


def rel(a, b):
    a, b = a.double(), b.double()
    d = (a - b).norm() / b.norm().clamp_min(1e-30)
    return float(d) if torch.isfinite(d) else float("nan")


OPTS = {
    "plain": {},
    "smooth": {"label_smoothing": 0.1},
    "zloss": {"z_loss": 1e-4},
    "ignore": {"_ignore": True},
    "all": {"label_smoothing": 0.1, "z_loss": 1e-4, "_ignore": True},
    "none_red": {"reduction": "none", "_ignore": True},
    "sum_red": {"reduction": "sum"},
}


def case(n, V, name, inplace, seed=0):
    kw = dict(OPTS[name])
    ign = kw.pop("_ignore", False)
    x, t = _data(n, V, seed + n + V)
    if ign:
        t[::10] = -100

    def f(x, t):
        return fce.cross_entropy(x, t, backend="triton", inplace_backward=inplace, **kw)

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, dynamic=False)
    res = []
    for fn in (cf, f):
        leaf = x.clone().requires_grad_(True)
        xi = leaf.clone() if inplace else leaf
        loss = fn(xi, t)
        g = torch.ones_like(loss) * 3.0
        loss.backward(g)
        res.append((loss.detach(), leaf.grad))
    torch.cuda.synchronize()
    return rel(res[0][0], res[1][0]), rel(res[0][1], res[1][1])


def main():
    cases = []
    for n, V in ((320, 32000), (320, 50257), (256, 50257), (320, 131072)):
        for name in OPTS:
            for inplace in (False, True):
                cases.append((n, V, name, inplace))
    only = os.environ.get("CASES")
    if only:
        cases = [cases[int(i)] for i in only.split(",")]
    with fce.validation(False):
        for i, c in enumerate(cases):
            try:
                el, eg = case(*c)
                flag = "BAD" if not (el < 1e-5 and eg < 1e-5) else "ok"
                print(f"{i:3d} {flag:3s} N={c[0]} V={c[1]} {c[2]:9s} inplace={c[3]!s:5s} "
                      f"loss {el:.2e} grad {eg:.2e}", flush=True)
            except Exception as e:  # keep going: the point is the pattern
                print(f"{i:3d} ERR N={c[0]} V={c[1]} {c[2]} inplace={c[3]}: "
                      f"{type(e).__name__}: {str(e)[:200]}", flush=True)
        dump = os.environ.get("DUMP_CASE")
        if dump:
            torch._logging.set_logs(output_code=True)
            print("DUMP", cases[int(dump)], case(*cases[int(dump)]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
