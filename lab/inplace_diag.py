"""Why is the in-place call slower than the new-buffer one in ce_gpu (notes/NEXT.md item 1)?

ncu (run 44) saw both calls move the same bytes in the same time at V = 262144, but ce_gpu
times in place 1.37x against 1.30x with a new gradient buffer. The two differ, outside the
call, in what runs on the GPU just before it: in place, the logits are restored (an N x V
copy) before the L2 flush; new buffer, only the flush. This script times the same step after
different preludes, each untimed and followed by the L2 flush and the start event:

  restore          the logits restored by a copy (as ce_gpu)
  restore+idle     the same, then the GPU sleeps ~2 ms (the host also gets ahead)
  pool             K restored copies prepared in a batch; each step takes the next copy (no
                   copy right before it)
  copy elsewhere   (new buffer) an N x V copy between two scratch buffers before the flush

for the in-place call, the fused kernel alone (in place) and the new-buffer call, so the
difference between preludes says whether the gap is the kernel, the harness, or the host.

Usage: PYTHONPATH=src:tests python benchmarks/inplace_diag.py [--V 32000,262144]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import fusedce as fce  # noqa: E402,I001
from fusedce import spec  # noqa: E402
from fusedce.triton import backend as tb  # noqa: E402

DEV = "cuda"
_FLUSH = None


def flush_l2():
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(256 << 20, dtype=torch.uint8, device=DEV)
    _FLUSH.zero_()


def timed(step, prelude, iters=20, idle_cycles=0):
    """Median ms of step over iters, each after prelude(i) (untimed), the flush and an
    optional GPU sleep."""
    def once(i):
        prelude(i)
        flush_l2()
        if idle_cycles:
            torch.cuda._sleep(idle_cycles)
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        step(i)
        b.record()
        return a, b

    for i in range(2):
        once(i)
    torch.cuda.synchronize()
    evs = [once(i) for i in range(iters)]
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in evs)


def host_ms(step, prelude, iters=7):
    out = []
    for i in range(iters):
        prelude(i)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(i)
        out.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--V", default="32000,262144")
    ap.add_argument("--N", type=int, default=16384)
    ap.add_argument("--pool", type=int, default=4)
    args = ap.parse_args()
    fce.set_validation(False)
    x = torch.empty(1 << 28, device=DEV)
    y = torch.empty_like(x)
    ms = []
    for _ in range(3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        torch.cuda.synchronize()
        ms.append(a.elapsed_time(b))
    tbs = 2 * x.numel() * 4 / (min(ms) * 1e-3) / 1e12
    del x, y
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; copy {tbs:.2f} TB/s")
    rows = []
    for V in [int(v) for v in args.V.split(",")]:
        N = args.N
        floor = N * V * 4 / (tbs * 1e12) * 1e3
        gen = torch.Generator(device=DEV).manual_seed(0)
        src = (torch.randn(N, V, device=DEV, generator=gen) * 2).to(torch.bfloat16)
        t = torch.randint(0, V, (N,), device=DEV, generator=gen)
        pool = [src.clone().requires_grad_(True) for _ in range(args.pool)]
        xs = pool[0]
        scratch = [torch.empty_like(src), torch.empty_like(src)]
        opts = spec.LossOptions()
        terms = spec.row_terms(t, opts, V, None)
        g0 = terms.valid.float() * spec.row_scale(terms, opts, None)

        def restore(i):
            xs.grad = None
            with torch.no_grad():
                xs.copy_(src)

        def restore_pool_batch():
            with torch.no_grad():
                for p in pool:
                    p.grad = None
                    p.copy_(src)

        def nothing(i):
            pass

        def clear(i):
            xs.grad = None

        def copy_elsewhere(i):
            xs.grad = None
            scratch[1].copy_(scratch[0])

        def inplace(i):
            fce.cross_entropy(xs, t, inplace_backward=True).backward()

        def inplace_pool(i):
            p = pool[i % len(pool)]
            fce.cross_entropy(p, t, inplace_backward=True).backward()

        def newbuf(i):
            fce.cross_entropy(xs, t).backward()

        def kernel(i):
            x3 = xs.detach().unsqueeze(0)
            tb.fused(x3, t, opts, g0=g0, terms=terms, vocab_size=V, out=x3,
                     weight_local=None, need_am=False)

        gbuf = torch.empty_like(src).unsqueeze(0)

        def kernel_new(i):
            tb.fused(xs.detach().unsqueeze(0), t, opts, g0=g0, terms=terms, vocab_size=V,
                     out=gbuf, weight_local=None, need_am=False)

        def loss_kernel(i):
            x3 = xs.detach().unsqueeze(0)
            tb.fused_loss(x3, t, opts, vocab_size=V, weight=None, normalizer=None, out=x3,
                          need_am=False)

        def loss_kernel_new(i):
            tb.fused_loss(xs.detach().unsqueeze(0), t, opts, vocab_size=V, weight=None,
                          normalizer=None, out=gbuf, need_am=False)

        def pooled(step_fn):
            # K steps on K fresh copies per batch, the batch restore untimed
            vals = []
            for _ in range(5):
                restore_pool_batch()
                torch.cuda.synchronize()
                evs = []
                for i in range(len(pool)):
                    flush_l2()
                    a = torch.cuda.Event(enable_timing=True)
                    b = torch.cuda.Event(enable_timing=True)
                    a.record()
                    step_fn(i)
                    b.record()
                    evs.append((a, b))
                torch.cuda.synchronize()
                vals += [a.elapsed_time(b) for a, b in evs]
            return statistics.median(vals)

        cases = [
            ("in place | restore", lambda: timed(inplace, restore)),
            ("in place | restore+idle", lambda: timed(inplace, restore, idle_cycles=4_000_000)),
            ("in place | pool", lambda: pooled(inplace_pool)),
            ("kernel in place | restore", lambda: timed(kernel, restore)),
            ("kernel in place | restore+idle", lambda: timed(kernel, restore,
                                                              idle_cycles=4_000_000)),
            ("kernel new buffer | restore", lambda: timed(kernel_new, restore)),
            ("loss kernel in place | restore", lambda: timed(loss_kernel, restore)),
            ("loss kernel new buffer | restore", lambda: timed(loss_kernel_new, restore)),
            ("new buffer | clear", lambda: timed(newbuf, clear)),
            ("new buffer | clear+idle", lambda: timed(newbuf, clear, idle_cycles=4_000_000)),
            ("new buffer | copy elsewhere", lambda: timed(newbuf, copy_elsewhere)),
        ]
        for name, fn in cases:
            try:
                v = fn()
                rows.append((V, name, v, v / floor))
                print(f"V={V:>6} {name:<32} {v:7.3f} ms {v / floor:6.3f}x", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"V={V:>6} {name:<32} failed: {type(e).__name__}: {e}", flush=True)
        print(f"V={V:>6} host ms: in place {host_ms(inplace, restore):.3f}, new buffer "
              f"{host_ms(newbuf, clear):.3f}, kernel {host_ms(kernel, restore):.3f}", flush=True)
        del pool, xs, scratch, src, gbuf
        torch.cuda.empty_cache()
    print("\n| V | prelude | ms | x floor |\n|---|---|---|---|")
    for V, name, v, r in rows:
        print(f"| {V} | {name} | {v:.3f} | {r:.3f}x |")


if __name__ == "__main__":
    main()
