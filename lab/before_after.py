"""Times the same calls against two source trees, to show a refactor changed no speed.

Usage (GPU):  python lab/before_after.py SRC_DIR [--label NAME]
              run once per tree (each in its own process), e.g. the current src/ and an
              older commit's src/ unpacked with `git archive <commit> src | tar -x -C DIR`.
Prints one JSON line per case: median ms over timed iterations (CUDA events, an L2 flush
before each), and the label.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("--label", default="")
    ap.add_argument("--iters", type=int, default=25)
    ap.add_argument("--N", type=int, default=16384)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    args = ap.parse_args()
    sys.path.insert(0, args.src)
    import torch

    import fusedce as fce

    dev = "cpu" if args.smoke else "cuda"
    flush = torch.empty(64 << 20 if not args.smoke else 1, dtype=torch.int32, device=dev)

    def timed(fn, setup=None):
        for _ in range(3):
            if setup:
                setup()
            fn()
        ts = []
        for _ in range(args.iters if not args.smoke else 2):
            if setup:
                setup()
            flush.zero_()
            if args.smoke:
                import time

                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
                continue
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        return statistics.median(ts)

    def report(case, ms):
        print(json.dumps(dict(label=args.label, case=case, ms=round(ms, 4))), flush=True)

    N = 64 if args.smoke else args.N
    vs = (1000, 4000) if args.smoke else (32000, 128256, 262144)
    for V in vs:
        torch.manual_seed(0)
        base = torch.randn(N, V, device=dev, dtype=torch.bfloat16)
        t = torch.randint(0, V, (N,), device=dev)
        x = base.clone().requires_grad_(True)

        def clear():
            x.grad = None

        report(f"ce default fwd+bwd {N}x{V}",
               timed(lambda: fce.cross_entropy(x, t).backward(), clear))
        report(f"ce fwd no_grad {N}x{V}", timed(lambda: fce.cross_entropy(base, t)))
        y = base.clone()

        def refill():
            with torch.no_grad():
                y.copy_(base)
            y.grad = None
            y.requires_grad_(True)

        def inplace(**kw):
            return lambda: fce.cross_entropy(y, t, inplace_backward=True, **kw).backward()

        report(f"ce inplace fwd+bwd {N}x{V}", timed(inplace(), refill))
        if V == vs[1]:
            report(f"ce inplace options fwd+bwd {N}x{V}",
                   timed(inplace(label_smoothing=0.1, z_loss=1e-4, softcap=30.0), refill))
            report(f"logprobs fwd+bwd {N}x{V}",
                   timed(lambda: fce.logprobs(x, t).sum().backward(), clear))
        del base, x, y
        if not args.smoke:
            torch.cuda.empty_cache()

    n, d, v = (64, 32, 1000) if args.smoke else (8192, 4096, 128256)
    torch.manual_seed(0)
    h = torch.randn(n, d, device=dev, dtype=torch.bfloat16).requires_grad_(True)
    w = (torch.randn(v, d, device=dev) / d ** 0.5).bfloat16().requires_grad_(True)
    t = torch.randint(0, v, (n,), device=dev)

    def clear_hw():
        h.grad = None
        w.grad = None

    report(f"linear_ce fwd+bwd {n}x{d}x{v}",
           timed(lambda: fce.linear_cross_entropy(h, w, t).backward(), clear_hw))

    def lp_ent():
        lp, ent = fce.linear_logprobs(h, w, t, return_entropy=True, logit_scale=1 / 0.7)
        (lp.sum() + 0.01 * ent.sum()).backward()

    report(f"linear_logprobs+entropy fwd+bwd {n}x{d}x{v}", timed(lp_ent, clear_hw))


if __name__ == "__main__":
    main()
