"""GPU benchmark of the fused linear cross-entropy (fusedce.linear_cross_entropy).

Floor (docs/performance.md): forward + backward of CE(hidden @ W^T) needs three GEMMs of 2*N*D*V FLOPs
(logits, dHidden, dW), so floor = 6*N*D*V / R with R the 8192^3 bf16 matmul rate measured in
this run; the extra-memory floor is the gradients (dHidden [N, D] + dW [V, D]) plus O(N).

What runs, in one process:
  1. ceilings: 8192^3 bf16 matmul rate, device-to-device copy bandwidth;
  2. correctness on a smaller shape against an fp32 reference (hidden.float() @ W.float().T,
     F.cross_entropy), several option sets, with normwise errors;
  3. per (N, D, V): forward+backward time (median, triton.testing.do_bench) and extra peak
     memory of fusedce (default, larger chunks, fp32 dW accumulation), the same chunked
     three GEMMs without any CE (what chunking itself costs), matmul + eager fp32 CE,
     Liger's LigerFusedLinearCrossEntropyLoss and Cut Cross-Entropy's linear_cross_entropy;
     forward-only (no_grad) fusedce against the one-GEMM floor;
  4. a short table, printed last. Full numbers go to $OUT/linear_gpu.json when OUT is set.

Usage: PYTHONPATH=src python benchmarks/linear_gpu.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import fusedce as fce  # noqa: E402,I001
from fusedce import linear as fce_linear  # noqa: E402

SHAPES = [(8192, 4096, 128256), (8192, 2304, 256000), (16384, 4096, 151936)]
# extra chunk sizes (rows) timed beside the "auto" choice, up to the whole batch (all
# logits in bf16 at once: what speed the memory buys)
GRID = {(8192, 4096, 128256): (1024, 2048, 4096, 8192),
        (8192, 2304, 256000): (512, 1024, 4096, 8192),
        (16384, 4096, 151936): (2048, 4096, 8192, 16384)}
GB = 1e9


def log(*a):
    print(*a, flush=True)


def bench(fn, warmup=150, rep=1200):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def ceilings():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b, warmup=100, rep=600)
    tflops = 2 * 8192 ** 3 / (ms * 1e-3) / 1e12
    x = torch.randn(1 << 29, device="cuda", dtype=torch.float32)  # 2 GiB
    y = torch.empty_like(x)
    ms_c = bench(lambda: y.copy_(x), warmup=50, rep=300)
    tbs = 2 * x.numel() * 4 / (ms_c * 1e-3) / 1e12
    return tflops, tbs


def rel(a, b):
    a = a.detach().double()
    b = b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------- correctness


def correctness(N=2048, D=1024, V=32003):
    """fusedce (bf16) vs an fp32 reference; returns rows of (case, err loss, dh, dW, db)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    out = []
    cases = [
        ("mean", dict(), None),
        ("mean+bias, chunk 300", dict(chunk_size=300), "bias"),
        ("sum, smoothing+zloss+softcap", dict(reduction="sum", label_smoothing=0.1,
                                              z_loss=1e-4, softcap=30.0), None),
        ("none, random upstream, chunk 700", dict(reduction="none", chunk_size=700), "bias"),
        ("mean, accum fp32", dict(accum_dtype=torch.float32), None),
        ("class weights, normalizer", dict(normalizer=1000.0), "cw"),
    ]
    for name, kw, extra in cases:
        h = (torch.randn(N, D, device="cuda") * 1.0).bfloat16().requires_grad_(True)
        w = (torch.randn(V, D, device="cuda") / D ** 0.5 * 3).bfloat16().requires_grad_(True)
        b = (torch.randn(V, device="cuda") * 0.5).bfloat16().requires_grad_(True) \
            if extra == "bias" else None
        cw = torch.rand(V, device="cuda") + 0.5 if extra == "cw" else None
        t = torch.randint(0, V, (N,), device="cuda")
        t[torch.rand(N, device="cuda") < 0.1] = -100
        loss = fce.linear_cross_entropy(h, w, t, bias=b, class_weight=cw, **kw)
        g = torch.randn(loss.shape, device="cuda") if loss.dim() else torch.tensor(
            1.7, device="cuda")
        loss.backward(g)
        hr = h.detach().float().requires_grad_(True)
        wr = w.detach().float().requires_grad_(True)
        br = None if b is None else b.detach().float().requires_grad_(True)
        logits = hr @ wr.t() + (br if br is not None else 0)
        rkw = {k: v for k, v in kw.items() if k not in ("chunk_size", "accum_dtype")}
        ref = fce_ref_loss(logits, t, cw, **rkw)
        ref.backward(g)
        row = [name, rel(loss, ref), rel(h.grad, hr.grad), rel(w.grad, wr.grad),
               rel(b.grad, br.grad) if b is not None else float("nan")]
        out.append(row)
        log(f"  correctness {name:34s} loss {row[1]:.2e} dh {row[2]:.2e} dW {row[3]:.2e} "
            f"db {row[4]:.2e}")
    return out


def fce_ref_loss(logits, t, cw, reduction="mean", normalizer=None, label_smoothing=0.0,
                 z_loss=0.0, softcap=None):
    z = logits
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = t != -100
    rows = F.cross_entropy(z, torch.where(valid, t, 0), weight=cw, reduction="none",
                           label_smoothing=label_smoothing)
    if z_loss:
        rows = rows + z_loss * torch.logsumexp(z, -1) ** 2
    rows = rows * valid
    if normalizer is not None:
        return rows.sum() / normalizer
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum()


# ---------------------------------------------------------------------------- timing


def chunked_gemms_only(h, w, rows):
    """The three GEMMs in fusedce's chunk loop, without any CE: what chunking costs."""
    n = h.shape[0]
    buf = torch.empty(rows, w.shape[0], device=h.device, dtype=h.dtype)
    dh = torch.empty_like(h)
    dw = torch.empty_like(w)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        x = buf[:r1 - r0]
        torch.mm(h[r0:r1], w.t(), out=x)
        torch.mm(x, w, out=dh[r0:r1])
        if r0 == 0:
            torch.mm(x.t(), h[r0:r1], out=dw)
        else:
            dw.addmm_(x.t(), h[r0:r1])
    return dh, dw


def peers():
    out = {}
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import \
            LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        out["Liger FLCE 0.8.5"] = lambda h, w, t: liger(w, h, t)
    except Exception as exc:  # noqa: BLE001
        log(f"  Liger unavailable: {exc!r}")
    try:
        # Liger's Hopper kernel: per-token NLL from hidden states (SM90 only, CuTe DSL)
        from liger_kernel.ops import fused_linear_scaled_cross_entropy as lsce

        if torch.cuda.get_device_capability() != (9, 0):
            raise RuntimeError("not an SM90 card")
        lsce._load_sm90_function()

        def liger_sm90(h, w, t):
            nll = lsce.LigerFusedLinearScaledCrossEntropyFunction.apply(h, w, t, 1.0, -100, 1,
                                                                         False)
            nll = nll[0] if isinstance(nll, tuple) else nll
            return nll.sum() / (t != -100).sum()
        out["Liger SM90 CuTe 0.8.5"] = liger_sm90
    except Exception as exc:  # noqa: BLE001
        log(f"  Liger SM90 CuTe unavailable: {exc!r}")
    try:
        from cut_cross_entropy import linear_cross_entropy as cce_lce

        out["CCE 25.1.1"] = lambda h, w, t: cce_lce(h, w, t)
    except Exception as exc:  # noqa: BLE001
        log(f"  CCE unavailable: {exc!r}")
    return out


def measure(name, loss_fn, h, w, t, grads_bytes, ref=None, warmup=150, rep=1200):
    """(ms, extra peak GB, errors vs ref) of forward+backward of loss_fn(h, w, t)."""
    def step():
        h.grad = None
        w.grad = None
        loss_fn(h, w, t).backward()

    try:
        step()  # compile / autotune outside the measurements
        torch.cuda.synchronize()
        h.grad = None
        w.grad = None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / GB
        errs = None
        if ref is not None:
            errs = (rel(h.grad, ref[0]), rel(w.grad, ref[1]))
        ms = bench(step, warmup=warmup, rep=rep)
    except Exception as exc:  # noqa: BLE001
        log(f"  {name}: FAILED {exc!r}")
        return None
    finally:
        h.grad = None
        w.grad = None
        torch.cuda.empty_cache()
    log(f"  {name:34s} {ms:8.2f} ms  extra peak {peak:6.2f} GB (grads {grads_bytes / GB:.2f})"
        + ("" if errs is None else f"  err vs eager dh {errs[0]:.1e} dW {errs[1]:.1e}"))
    return dict(ms=ms, peak_gb=peak, errs=errs)


def run_shape(N, D, V, rate, quick=False):
    torch.manual_seed(0)
    h = torch.randn(N, D, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    w = (torch.randn(V, D, device="cuda") / D ** 0.5).bfloat16().requires_grad_(True)
    t = torch.randint(0, V, (N,), device="cuda")
    floor_ms = 6 * N * D * V / (rate * 1e12) * 1e3
    grads_bytes = (N * D + V * D) * 2
    res = dict(N=N, D=D, V=V, floor_ms=floor_ms, grads_gb=grads_bytes / GB, rows={})
    rows = fce_linear.auto_chunk_rows(N, V, torch.bfloat16, torch.device("cuda"))
    be = fce_linear._select_backend("auto", h)
    log(f"\n(N, D, V) = ({N}, {D}, {V}); floor {floor_ms:.2f} ms; auto chunk {rows} rows "
        f"({rows * V * 2 / 2**20:.0f} MiB); "
        f"backend {getattr(be, 'name', be)}")

    # eager reference first: its gradients check every other method at full size
    def eager(h_, w_, t_):
        return F.cross_entropy((h_ @ w_.t()).float(), t_)

    h.grad = w.grad = None
    eager(h, w, t).backward()
    ref = (h.grad.detach().clone(), w.grad.detach().clone())
    h.grad = w.grad = None
    res["rows"]["matmul + eager CE"] = measure("matmul + eager CE", eager, h, w, t, grads_bytes)

    def fused(**kw):
        return lambda h_, w_, t_: fce.linear_cross_entropy(h_, w_, t_, **kw)

    res["rows"]["fusedce (auto)"] = measure("fusedce (auto)", fused(), h, w, t, grads_bytes,
                                            ref)
    if not quick:
        # chunk-size grid (same code path, explicit rows): GEMM efficiency vs memory
        for r_b in GRID.get((N, D, V), ()):
            if r_b == rows:
                continue
            name = f"fusedce rows={r_b} ({r_b * V * 2 / 2**20:.0f} MiB)"
            res["rows"][name] = measure(name, fused(chunk_size=r_b), h, w, t, grads_bytes, ref,
                                        warmup=100, rep=500)
        res["rows"]["fusedce accum fp32"] = measure(
            "fusedce accum fp32", fused(accum_dtype=torch.float32), h, w, t, grads_bytes, ref)
    for r_g in sorted({rows, max(GRID.get((N, D, V), (rows,)))}):
        try:
            ms = bench(lambda r_=r_g: chunked_gemms_only(h.detach(), w.detach(), r_),
                       warmup=100, rep=500)
            name = f"3 GEMMs chunked ({r_g} rows), no CE"
            res["rows"][name] = {"ms": ms, "peak_gb": None, "errs": None}
            log(f"  {name:34s} {ms:8.2f} ms")
        except Exception as exc:  # noqa: BLE001
            log(f"  chunked GEMMs failed: {exc!r}")
    for pname, fn in peers().items():
        res["rows"][pname] = measure(pname, fn, h, w, t, grads_bytes, ref)
    # forward only (RL scoring / evaluation): one GEMM floor
    with torch.no_grad():
        ms_f = bench(lambda: fce.linear_cross_entropy(h, w, t), warmup=100, rep=600)
    res["fwd_only"] = dict(ms=ms_f, floor_ms=floor_ms / 3)
    log(f"  {'fusedce forward only (no_grad)':34s} {ms_f:8.2f} ms (1-GEMM floor "
        f"{floor_ms / 3:.2f})")
    return res


def versions():
    import triton

    v = dict(torch=torch.__version__, triton=triton.__version__, fusedce=fce.__version__,
             device=torch.cuda.get_device_name(), date=str(datetime.date.today()))
    for mod, key in (("liger_kernel", "liger"), ("cut_cross_entropy", "cce")):
        try:
            from importlib.metadata import version

            v[key] = version(mod.replace("_", "-"))
        except Exception:  # noqa: BLE001
            v[key] = None
    return v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip the chunk/accum variants")
    ap.add_argument("--skip-correctness", action="store_true")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    t0 = time.time()
    info = versions()
    log("versions:", info)
    rate, bw = ceilings()
    torch.cuda.empty_cache()
    log(f"ceilings: bf16 matmul 8192^3 {rate:.0f} TFLOP/s, copy {bw:.2f} TB/s")
    corr = [] if args.skip_correctness else correctness()
    results = []
    for N, D, V in SHAPES:
        results.append(run_shape(N, D, V, rate, args.quick))
        torch.cuda.empty_cache()
    summary = dict(info=info, matmul_tflops=rate, copy_tbs=bw, correctness=corr,
                   shapes=results, wall_s=time.time() - t0)
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "linear_gpu.json"), "w") as f:
            json.dump(summary, f, indent=1, default=str)

    log(f"\n== fused linear CE, bf16, fwd+bwd (grads of hidden and head); {info['device']}, "
        f"torch {info['torch']}, triton {info['triton']}; matmul {rate:.0f} TFLOP/s ==")
    log(f"{'N x D x V':22s} {'method':36s} {'ms':>8s} {'x floor':>8s} {'extra GB':>9s} "
        f"{'grads GB':>9s} {'extra-grads MB':>14s}")
    for r in results:
        shape = f"{r['N']}x{r['D']}x{r['V']}"
        log(f"{shape:22s} {'3-matmul floor':36s} {r['floor_ms']:8.2f} {1.0:8.2f}")
        for name, m in r["rows"].items():
            if m is None:
                log(f"{shape:22s} {name:36s}   failed")
                continue
            pk = "" if m["peak_gb"] is None else f"{m['peak_gb']:9.2f}"
            over = "" if m["peak_gb"] is None else \
                f"{(m['peak_gb'] - r['grads_gb']) * 1e3:14.0f}"
            log(f"{shape:22s} {name:36s} {m['ms']:8.2f} {m['ms'] / r['floor_ms']:8.2f} "
                f"{pk:>9s} {r['grads_gb']:9.2f} {over}")
        fo = r["fwd_only"]
        log(f"{shape:22s} {'fusedce fwd only (1-GEMM floor)':36s} {fo['ms']:8.2f} "
            f"{fo['ms'] / fo['floor_ms']:8.2f}")
    log(f"wall {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
