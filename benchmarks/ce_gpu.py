"""GPU benchmark of cross-entropy on materialised logits (fusedce.cross_entropy, Triton backend).

Floors (docs/performance.md): forward + backward reads the bf16 logits once and writes the gradient once,
4 bytes per element over the copy bandwidth B measured in this run; forward only (no_grad)
reads them once, 2 bytes per element. Extra peak memory: with inplace_backward, 1 MB + O(N);
without, one logits-sized gradient buffer.

What runs, in one process:
  1. environment and ceilings (device-to-device copy bandwidth, 8192^3 bf16 matmul);
  2. correctness at N x V in bf16: reduction="none" with random upstream gradients, sampled
     rows against the fp64 oracle; the mean loss and its gradient against the torch backend;
  3. (--sweep) fused-kernel configurations (segment, warps, programs per SM, reload) and
     statistics-kernel configurations, in-place forward + backward / forward only;
  4. timing and extra peak memory of every fusedce variant and of the peers: eager
     F.cross_entropy(logits.float(), t), eager bf16, torch.compile of the fp32 form,
     Liger-Kernel (when importable);
  5. a short table, printed last; full numbers to $OUT/ce_gpu.json when OUT is set.

Timing: per iteration, untimed set-up (gradients to None, logits restored for the methods
that overwrite them, a 256 MB write that flushes L2), then CUDA events around one step;
the median over iterations.

Usage: PYTHONPATH=src python benchmarks/ce_gpu.py [--sweep] [--no-peers] [--V 32000,...] [--N 16384]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import fusedce as fce  # noqa: E402,I001
from fusedce.triton import backend as tb, configs, fused, stats  # noqa: E402

GB = 1e9
DEV = "cuda"
_FLUSH = None


def log(*a):
    print(*a, flush=True)


def flush_l2():
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(256 << 20, dtype=torch.uint8, device=DEV)
    _FLUSH.zero_()


def time_step(step, setup=None, iters=None, budget_ms=600.0):
    """Median ms of ``step`` over iterations, each after an untimed ``setup`` and L2 flush."""
    def once():
        if setup is not None:
            setup()
        flush_l2()
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        return a, b

    for _ in range(2):  # warm-up: compilation, allocator
        once()
    torch.cuda.synchronize()
    a, b = once()
    torch.cuda.synchronize()
    est = max(a.elapsed_time(b), 1e-3)
    n = iters or int(max(5, min(40, budget_ms / est)))
    evs = [once() for _ in range(n)]
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in evs)


def host_ms(step, setup=None, iters=5):
    """Median host time to enqueue ``step`` (no sync inside): when it exceeds the GPU time the
    step is host-bound and the GPU idles between launches."""
    import time

    out = []
    for _ in range(iters):
        if setup is not None:
            setup()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        out.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    return statistics.median(out)


def peak_extra(step, setup=None):
    if setup is not None:
        setup()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / GB


def ceilings():
    import triton.testing

    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    tflops = 2 * 8192 ** 3 / (ms * 1e-3) / 1e12
    del a, b
    x = torch.randn(1 << 30, device=DEV, dtype=torch.float32)  # 4 GiB
    y = torch.empty_like(x)
    ms_c = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    tbs = 2 * x.numel() * 4 / (ms_c * 1e-3) / 1e12
    return tflops, tbs


def rel(a, b, rows=1024):
    """||a - b|| / ||b|| in fp64, a few rows at a time (a logits-sized fp64 copy is 34 GB)."""
    a = a.detach().reshape(-1, a.shape[-1]) if a.dim() > 1 else a.detach().reshape(1, -1)
    b = b.detach().reshape(-1, b.shape[-1]) if b.dim() > 1 else b.detach().reshape(1, -1)
    num = den = 0.0
    for r in range(0, a.shape[0], rows):
        x, y = a[r:r + rows].double(), b[r:r + rows].double()
        num += float(((x - y) ** 2).sum())
        den += float((y ** 2).sum())
    return (num / max(den, 1e-60)) ** 0.5


def make_data(N, V, seed=0, ignore_frac=0.05):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    x = (torch.randn(N, V, device=DEV, generator=gen) * 2.0).to(torch.bfloat16)
    t = torch.randint(0, V, (N,), device=DEV, generator=gen)
    drop = torch.rand(N, device=DEV, generator=gen) < ignore_frac
    return x, torch.where(drop, torch.full_like(t, -100), t)


def kernel_resources(fn):
    """[(n_regs, n_spills, shared)] of the compiled variants of a JITFunction (best effort)."""
    out = []
    try:
        for cache in fn.device_caches.values():
            for k in cache[0].values():
                out.append((getattr(k, "n_regs", None), getattr(k, "n_spills", None),
                            k.metadata.shared, k.metadata.num_warps))
    except Exception:  # noqa: BLE001 - diagnostics only
        pass
    return out


# ---------------------------------------------------------------------------- correctness


def correctness(N, V):
    from oracle import ref_cross_entropy

    res = {}
    x, t = make_data(N, V, seed=1)
    g = torch.randn(N, device=DEV)
    xg = x.clone().requires_grad_(True)
    loss = fce.cross_entropy(xg, t, reduction="none")
    loss.backward(g)
    rows = torch.randperm(N, device=DEV)[:192]
    xr = x[rows].double().requires_grad_(True)
    ref = ref_cross_entropy(xr, t[rows], reduction="none")
    ref.backward(g[rows].double())
    res["oracle_loss_rows"] = rel(loss[rows], ref)
    res["oracle_grad_rows"] = rel(xg.grad[rows], xr.grad)
    del xg, xr
    xa = x.clone().requires_grad_(True)
    la = fce.cross_entropy(xa, t, inplace_backward=True, z_loss=1e-4, label_smoothing=0.05)
    la.backward()
    ga = xa.grad
    del xa
    xb = x.clone().requires_grad_(True)
    lb = fce.cross_entropy(xb, t, backend="torch", z_loss=1e-4, label_smoothing=0.05)
    lb.backward()
    res["torch_backend_loss"] = rel(la, lb)
    res["torch_backend_grad"] = rel(ga, xb.grad)
    del xb, ga
    with torch.no_grad():
        ln = fce.cross_entropy(x, t)
        lt = F.cross_entropy(x.float(), t)
    res["no_grad_vs_F"] = rel(ln, lt)
    # run-to-run determinism of the cooperative kernel
    outs = []
    for _ in range(2):
        xd = x.clone().requires_grad_(True)
        ld = fce.cross_entropy(xd, t)
        ld.backward()
        outs.append((ld, xd.grad))
        del xd
    res["bitwise_repeat"] = bool(torch.equal(outs[0][0], outs[1][0])
                                 and torch.equal(outs[0][1], outs[1][1]))
    return res


# ---------------------------------------------------------------------------- methods


def methods(x_src, t, peers):
    """name -> (kind, step, setup); kind: 'fb' (forward + backward) or 'f' (forward only)."""
    out = {}
    x = x_src.clone().requires_grad_(True)
    xd = x_src  # forward-only methods read the untouched source

    def restore():
        x.grad = None
        with torch.no_grad():
            x.copy_(x_src)

    def clear():
        x.grad = None

    def fb(fn, inplace):
        def step():
            fn().backward()
        return ("fb", step, restore if inplace else clear)

    out["fusedce in-place"] = fb(lambda: fce.cross_entropy(x, t, inplace_backward=True), True)
    # the fused kernel alone (what the autograd glue around it costs is the difference)
    from fusedce import spec

    opts = spec.LossOptions()
    terms = spec.row_terms(t, opts, x_src.shape[-1], None)
    g0 = terms.valid.float() * spec.row_scale(terms, opts, None)
    x3 = x.detach().unsqueeze(0)

    def kernel_only():
        tb.fused(x3, t, opts, g0=g0, terms=terms, vocab_size=x_src.shape[-1], out=x3,
                 weight_local=None, need_am=False)
    out["fused kernel alone (in-place)"] = ("fb", kernel_only, restore)
    out["fusedce"] = fb(lambda: fce.cross_entropy(x, t), False)

    def validated(**kw):
        # the library's default setting: the target-range check reads the device
        def call():
            with fce.validation(True):
                return fce.cross_entropy(x, t, **kw)
        return call
    out["fusedce, validation on"] = fb(validated(), False)
    out["fusedce in-place, validation on"] = fb(validated(inplace_backward=True), True)
    out["fusedce in-place, upstream 2"] = fb(
        lambda: 2.0 * fce.cross_entropy(x, t, inplace_backward=True), True)
    out["fusedce none, upstream g"] = ("fb", lambda: fce.cross_entropy(
        x, t, reduction="none", inplace_backward=True).backward(G_ROWS[0]), restore)

    def two_pass():
        tb._FUSED = False
        try:
            fce.cross_entropy(x, t, inplace_backward=True).backward()
        finally:
            tb._FUSED = True
    out["fusedce two-pass (stats + grad kernels)"] = ("fb", two_pass, restore)

    def fwd(fn):
        def step():
            with torch.no_grad():
                fn()
        return ("f", step, None)

    out["fusedce forward (no_grad)"] = fwd(lambda: fce.cross_entropy(xd, t))
    xd3 = xd.unsqueeze(0)
    out["stats kernel alone"] = ("f", lambda: tb.row_stats(xd3, t, opts, need_am=False), None)
    out["fusedce logprobs inference_only"] = ("f", lambda: fce.logprobs(
        xd, t, inference_only=True), None)
    if not peers:
        return out
    out["eager F.ce(x.float())"] = fb(lambda: F.cross_entropy(x.float(), t), False)
    out["eager F.ce bf16"] = fb(lambda: F.cross_entropy(x, t), False)
    cf = torch.compile(lambda a, b: F.cross_entropy(a.float(), b))
    out["torch.compile F.ce(x.float())"] = fb(lambda: cf(x, t), False)
    out["eager forward (no_grad)"] = fwd(lambda: F.cross_entropy(xd.float(), t))
    out["torch.compile forward (no_grad)"] = fwd(lambda: cf(xd, t))
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy

        out["Liger 0.8.5 (in-place)"] = fb(lambda: liger_cross_entropy(x, t), True)
        xl = x_src.clone()  # Liger writes its gradient into the input even in the forward
        out["Liger forward"] = fwd(lambda: liger_cross_entropy(xl, t))
        out["Liger forward"] = (*out["Liger forward"][:2], lambda: xl.copy_(x_src))
    except Exception as exc:  # noqa: BLE001
        log(f"  liger unavailable: {exc!r}")
    return out


G_ROWS = [None]


def sweep_fused(x_src, t, V, floor4):
    """Time fused-kernel configurations (in-place forward + backward) and check each one
    against the table's configuration: loss rows and sampled gradient rows."""
    R_ = configs.RowsConfig
    cands = [R_(4096, 8, 4, reverse=False), R_(8192, 16, 2), R_(4096, 8, 3), R_(8192, 8, 2),
             R_(4096, 8, 1, persistent=False)]
    x = x_src.clone().requires_grad_(True)
    g = torch.rand(x_src.shape[0], device=DEV) + 0.5
    rows = torch.arange(0, x_src.shape[0], 61, device=DEV)

    def restore():
        x.grad = None
        with torch.no_grad():
            x.copy_(x_src)

    def run_none():
        restore()
        loss = fce.cross_entropy(x, t, reduction="none", inplace_backward=True)
        loss.backward(g)
        return loss.detach().clone(), x.grad[rows].float().clone()

    ref_loss, ref_grad = run_none()

    def step():
        fce.cross_entropy(x, t, inplace_backward=True).backward()

    out = []
    for c in cands:
        configs.set_override(fused=c)
        try:
            loss, grad = run_none()
            el, eg = rel(loss, ref_loss), rel(grad, ref_grad)
            ms = time_step(step, restore, budget_ms=300)
            out.append((c, ms, ms / floor4, el, eg))
            log(f"  sweep V={V} {c}: {ms:.3f} ms = {ms / floor4:.3f}x floor "
                f"(vs table: loss {el:.1e}, grad {eg:.1e})")
        except Exception as exc:  # noqa: BLE001
            log(f"  sweep V={V} {c}: FAILED {exc!r}")
        finally:
            configs.set_override(fused=None)
    return out


def sweep_stats(x_src, t, V, floor2):
    rows = []
    for block, nw, pf in [(4096, 4, False), (4096, 4, True), (4096, 8, False), (4096, 8, True),
                          (8192, 8, False), (8192, 8, True), (2048, 4, True), (8192, 4, False),
                          (2048, 2, True)]:
        c = configs.StatsConfig(block=block, num_warps=nw, prefetch=pf)
        configs.set_override(stats=c)
        try:
            with torch.no_grad():
                ms = time_step(lambda: fce.cross_entropy(x_src, t), budget_ms=200)
            rows.append((c, ms, ms / floor2))
            log(f"  sweep-stats V={V} {c}: {ms:.3f} ms = {ms / floor2:.3f}x floor")
        except Exception as exc:  # noqa: BLE001
            log(f"  sweep-stats V={V} {c}: FAILED {exc!r}")
        finally:
            configs.set_override(stats=None)
    return rows


# ---------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--V", default="32000,128256,262144")
    ap.add_argument("--N", type=int, default=16384)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args()
    fce.set_validation(False)  # the production setting: no host syncs on the hot path

    import triton

    props = torch.cuda.get_device_properties(0)
    env = dict(device=torch.cuda.get_device_name(0), sms=props.multi_processor_count,
               l2_mb=getattr(props, "L2_cache_size", 0) / 2**20, torch=torch.__version__,
               triton=triton.__version__, date=str(datetime.date.today()), N=args.N)
    log("env:", env)
    tflops, tbs = ceilings()
    env.update(copy_tbs=tbs, matmul_tflops=tflops)
    log(f"ceilings: copy {tbs:.3f} TB/s, bf16 matmul {tflops:.0f} TFLOP/s")
    report = dict(env=env, shapes={})
    table = []
    N = args.N
    for V in [int(v) for v in args.V.split(",")]:
        floor4 = 4.0 * N * V / (tbs * 1e12) * 1e3
        floor2 = 2.0 * N * V / (tbs * 1e12) * 1e3
        log(f"\n== N={N} V={V}: floor fwd+bwd {floor4:.3f} ms, forward {floor2:.3f} ms")
        rep = dict(floor4_ms=floor4, floor2_ms=floor2)
        if not args.no_check:
            try:
                rep["correctness"] = correctness(N, V)
                log("  correctness:", rep["correctness"])
            except Exception:  # noqa: BLE001
                log(traceback.format_exc())
        torch.cuda.empty_cache()
        x_src, t = make_data(N, V)
        G_ROWS[0] = torch.rand(N, device=DEV) + 0.5
        if args.sweep:
            rep["sweep_fused"] = [(str(c), *rest) for c, *rest in sweep_fused(x_src, t, V, floor4)]
            rep["sweep_stats"] = [(str(c), ms, r) for c, ms, r in sweep_stats(x_src, t, V, floor2)]
        res = {}
        for name, (kind, step, setup) in methods(x_src, t, not args.no_peers).items():
            try:
                ms = time_step(step, setup)
                mem = peak_extra(step, setup)
                hms = host_ms(step, setup)
                fl = floor4 if kind == "fb" else floor2
                res[name] = dict(kind=kind, ms=ms, ratio=ms / fl, peak_gb=mem, host_ms=hms)
                log(f"  {name:42s} {ms:8.3f} ms  {ms / fl:6.2f}x  peak {mem:8.4f} GB"
                    f"  host {hms:6.3f} ms")
                table.append((V, name, kind, ms, ms / fl, mem))
            except Exception as exc:  # noqa: BLE001
                log(f"  {name}: FAILED {exc!r}")
            torch.cuda.empty_cache()
        rep["methods"] = res
        rep["fused_kernel_resources"] = kernel_resources(fused._fused_rows_kernel)
        rep["stats_kernel_resources"] = kernel_resources(stats._stats_kernel)
        log("  fused kernel (regs, spills, smem, warps):", rep["fused_kernel_resources"])
        report["shapes"][V] = rep
        del x_src, t
        torch.cuda.empty_cache()

    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "ce_gpu.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)
    log(f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}; "
        f"copy {tbs:.2f} TB/s, matmul {tflops:.0f} TFLOP/s; N={N}, bf16; "
        "ratio = time / floor (fb: 4 B/elem, f: 2 B/elem)")
    log(f"{'V':>7} {'method':42s} {'kind':4s} {'ms':>8s} {'ratio':>6s} {'peak GB':>8s}")
    for V, name, kind, ms, r, mem in table:
        log(f"{V:7d} {name:42s} {kind:4s} {ms:8.3f} {r:6.2f} {mem:8.4f}")


if __name__ == "__main__":
    main()
