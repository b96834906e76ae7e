"""Host-side cost of a Triton-backend call without a GPU: the Python above the kernel
launches, measured on the CPU with every Triton kernel launch replaced by a no-op (the interpreter
mode only lets CPU tensors through). What it
leaves out, the Triton launch itself and the CUDA launches of the small torch ops, is what
lab/ce_host_cprofile.py measures on a GPU.

Usage: python lab/host_proxy_cpu.py [nograd|fb] [on]   (adds a cProfile table)
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
from fusedce.triton import launch  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *a, **k: None


def main():
    # the ops run as on a GPU up to the kernel launch, which does nothing
    launch.launcher = lambda kernel: _NoLaunch()
    N, V = int(os.environ.get("N", 16)), 64
    x = torch.randn(N, V)
    t = torch.randint(0, V, (N,))
    # the target scan's launch does nothing either: its result, as the kernel would give it
    # (the range check reads it)
    from fusedce.triton import backend as tb
    scan = torch.tensor([N, 0, V - 1])
    tb.target_scan = lambda target, ignore_index: scan
    torch.set_num_threads(1)

    def nograd():
        with torch.no_grad():
            fce.cross_entropy(x, t, backend="triton")

    xg = x.detach().requires_grad_(True)

    def fb():
        xg.grad = None
        fce.cross_entropy(xg, t, backend="triton").backward()

    calls = {"nograd": nograd, "fb": fb}
    on = len(sys.argv) > 2 and sys.argv[2] == "on"
    with fce.validation(on):
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
            pstats.Stats(pr).sort_stats(os.environ.get("SORT", "tottime")).print_stats(40)


if __name__ == "__main__":
    main()
