"""Host-side cost of a Triton-backend call without a GPU: the Python above the kernel
launches, measured on the CPU with every Triton launch replaced by a no-op (the interpreter
mode only lets CPU tensors through). What it leaves out, the Triton launch itself and the
CUDA launches of the small torch ops, is what benchmarks/host_profile.py measures on a GPU.

Usage: python benchmarks/host_proxy_cpu.py [nograd|fb]   (adds a cProfile table)
"""

from __future__ import annotations

import cProfile
import os
import pstats
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import fusedce as fce  # noqa: E402
from fusedce.triton import ce  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *a, **k: None


def main():
    ce._launcher = lambda kernel: _NoLaunch()
    N, V = 4096, 64
    x = torch.randn(N, V)
    t = torch.randint(0, V, (N,))
    torch.set_num_threads(1)

    def nograd():
        with torch.no_grad():
            fce.cross_entropy(x, t, backend="triton")

    def fb():
        xg = x.detach().requires_grad_(True)
        fce.cross_entropy(xg, t, backend="triton", inplace_backward=True).backward()

    calls = {"nograd": nograd, "fb": fb}
    with fce.validation(False):
        for name, f in calls.items():
            for _ in range(50):
                f()
            t0 = time.perf_counter()
            for _ in range(500):
                f()
            print(f"{name}: {(time.perf_counter() - t0) / 500 * 1e6:.1f} us per call")
        if len(sys.argv) > 1:
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(300):
                calls[sys.argv[1]]()
            pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
