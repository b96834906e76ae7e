"""Where one call's host time goes on a GPU host, piece by piece: the whole call (forward +
backward in place, new buffer, no_grad forward), the Triton launch of the fused kernel
through JITFunction.run against launching its cached CompiledKernel directly, and the small
torch ops around it; then cProfile and torch.profiler tables of the no_grad call.

Usage: PYTHONPATH=src python benchmarks/host_split.py [--V 32000 128256] [--N 16384]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import os
import sys

import torch

import fusedce as fce
from fusedce.triton import ce

sys.path.insert(0, os.path.dirname(__file__))
from host_profile import profile_table  # noqa: E402


def cprofile_table(fn, calls: int, rows: int = 22) -> None:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    pstats.Stats(pr).sort_stats("tottime").print_stats(rows)


def host_us(fn, iters=100, reps=5):
    """Median over reps of the mean host time per call (no sync inside a rep)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        out.append((time.perf_counter() - t0) / iters * 1e6)
        torch.cuda.synchronize()
    out.sort()
    return out[len(out) // 2]


def gpu_us(fn, iters=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--V", type=int, nargs="+", default=[32000, 128256])
    ap.add_argument("--N", type=int, default=16384)
    args = ap.parse_args()
    fce.set_validation(False)
    dev = "cuda"
    rows = []
    for V in args.V:
        N = args.N
        x = (torch.randn(N, V, device=dev) * 2).to(torch.bfloat16).requires_grad_(True)
        t = torch.randint(0, V, (N,), device=dev)

        def fb_inplace():
            x.grad = None
            fce.cross_entropy(x, t, inplace_backward=True).backward()

        def fb_new():
            x.grad = None
            fce.cross_entropy(x, t).backward()

        def fwd():
            with torch.no_grad():
                fce.cross_entropy(x, t)

        for name, fn in (("fb in place", fb_inplace), ("fb new buffer", fb_new),
                         ("no_grad", fwd)):
            rows.append((V, name, host_us(fn), gpu_us(fn)))

        # the fused kernel's launch alone, recorded from one no_grad call
        rec = {}
        real = ce._launcher

        def recorder(kernel):
            w = real(kernel)

            class G:
                def __getitem__(self, grid):
                    def call(*a, **kw):
                        rec.setdefault("k", (kernel, grid, a, kw))
                        return w[grid](*a, **kw)
                    return call
            return G()

        ce._launcher = recorder
        for fn in (fwd, fb_inplace):
            rec.clear()
            fn()
            kernel, grid, a, kw = rec["k"]
            ce._launcher = real
            from torch._library.triton import set_wrap_triton_enabled

            def via_wrap():
                with set_wrap_triton_enabled(False):
                    torch.library.wrap_triton(kernel)[grid](*a, **kw)

            def via_jit():
                kernel[grid](*a, **kw)

            device = torch.cuda.current_device()
            binder = kernel.device_caches[device][4]

            def bind_only():
                binder(*a, **kw)

            compiled = kernel[grid](*a, **kw)
            bound, _, _ = binder(*a, **kw)
            vals = tuple(bound.values())

            grid3 = (grid[0], 1, 1)

            def direct():
                compiled[grid3](*vals)

            stream = torch.cuda.current_stream().cuda_stream
            fnh, meta = compiled.function, compiled.packed_metadata
            g0 = grid[0]

            def raw():
                compiled.run(g0, 1, 1, stream, fnh, meta, None, None, None, *vals)

            tag = "no_grad" if fn is fwd else "fb"
            for name, f in (("launch via wrap_triton", via_wrap), ("launch via JIT", via_jit),
                            ("binder only", bind_only), ("CompiledKernel[grid]", direct),
                            ("CompiledKernel.run", raw)):
                rows.append((V, f"{tag}: {name}", host_us(f), float("nan")))
            ce._launcher = recorder
        ce._launcher = real

        n = N
        tt = t

        def small_empty():
            for _ in range(4):
                torch.empty(n, device=dev)

        def small_count():
            (tt != -100).sum()

        lr = torch.randn(n, device=dev)

        def small_sum():
            lr.sum()

        for name, f in (("4 x torch.empty(N)", small_empty), ("(t != ii).sum()", small_count),
                        ("rows.sum()", small_sum)):
            rows.append((V, name, host_us(f), float("nan")))

        if V == args.V[0]:
            for title, f in (("no_grad call", fwd), ("fb in place", fb_inplace)):
                print(f"== cProfile, {title}, V={V}, 200 calls")
                cprofile_table(f, 200)
            print(profile_table(fb_inplace))
        x = None  # (the closures above are done with it)
        torch.cuda.empty_cache()

    from fusedce.triton import launch

    print("fast launcher:", launch.stats(), "hooks:", launch._hooked())
    print("\n== host time per call (us), GPU time per call (us)")
    print(f"{'V':>7} {'what':<40} {'host us':>9} {'gpu us':>9}")
    for V, name, h, g in rows:
        print(f"{V:>7} {name:<40} {h:9.1f} {g:9.1f}")


if __name__ == "__main__":
    main()
