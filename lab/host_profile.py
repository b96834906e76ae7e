"""Where the host time of one fusedce call goes (GPU): torch.profiler over a few calls of
cross_entropy (in place, forward + backward) and of the no_grad forward at N = 16384, bf16,
validation off; prints the host time per call and the ops sorted by self CPU time.

Usage: PYTHONPATH=src python benchmarks/host_profile.py [--V 32000] [--calls 20]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import fusedce as fce


def profile_table(fn, calls: int = 5, rows: int = 25) -> str:
    """torch.profiler's table of ``calls`` calls of fn, by self CPU time."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows,
                                     max_name_column_width=48)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--V", type=int, default=32000)
    ap.add_argument("--N", type=int, default=16384)
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    fce.set_validation(False)
    x = (torch.randn(args.N, args.V, device="cuda") * 2).to(torch.bfloat16).requires_grad_(True)
    t = torch.randint(0, args.V, (args.N,), device="cuda")

    def fb():
        x.grad = None
        fce.cross_entropy(x, t, inplace_backward=True).backward()

    def fb_new():
        x.grad = None
        fce.cross_entropy(x, t).backward()

    def fwd():
        with torch.no_grad():
            fce.cross_entropy(x, t)

    for name, fn in (("forward+backward in place", fb), ("forward+backward new buffer", fb_new),
                     ("forward no_grad", fwd)):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.calls):
            fn()
        host = (time.perf_counter() - t0) / args.calls * 1e3
        torch.cuda.synchronize()
        gpu = (time.perf_counter() - t0) / args.calls * 1e3
        print(f"== {name}: host {host:.3f} ms/call, host+drain {gpu:.3f} ms/call")
        print(profile_table(fn, rows=22))


if __name__ == "__main__":
    main()
