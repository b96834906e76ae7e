"""GPU benchmark of RL log-probs + entropy from hidden states, forward + backward.

The policy-gradient step of GRPO/PPO-style trainers: from the final hidden states h [N, D]
and the LM head W [V, D], per token the log-probability of the sampled token and the entropy
of softmax(h W^T / T), both differentiable, then

    loss = sum_i adv_i * logp_i + c * sum_i H_i,    backward to dh and dW,

with T the sampling temperature, adv random advantages and c an entropy coefficient.

Methods (bf16 inputs, each timed on the same tensors):
  fusedce         fusedce.linear_logprobs(h, W, t, return_entropy=True, logit_scale=1/T)
  trl chunked     TRL's ChunkedLogProbFunction (the kernel of its fused LM head; temperature T,
                  outputs log_probs + entropy), when trl is importable
  eager           (h @ W.T) in bf16 -> float / T -> log_softmax, gather, -(p * logp).sum
  torch.compile   the eager function under torch.compile
  liger           Liger-Kernel's LigerFusedLinearScaledCrossEntropyFunction (0.8.5: per-token
                  NLL and entropy from hidden states; a CuTe DSL kernel on SM90, a chunked
                  PyTorch fallback elsewhere); when the dispatched kernel cannot load, its
                  fallback is timed under its own name

Reported per (N, D, V): the median time of forward + backward (CUDA events; each iteration
after untimed gradient clearing and a 256 MiB write that flushes L2), its ratio to the
3-GEMM floor 3 * 2 * N * D * V FLOPs at the bf16 matmul rate of an 8192^3 matmul measured in
this run, the peak memory above the inputs (max_memory_allocated during one step minus what
was allocated before it; the gradients dh and dW are part of it), and errors against an fp32
reference: log-probs and entropies (max abs) and dh on a few rows, dW (normwise relative) on
a few vocabulary rows, the reference computing every row's statistics in fp32 chunks. The
log and the JSON also give the log-prob and entropy errors against the same rows computed
from logits rounded to bf16 (as every method's bf16 GEMM rounds them): what remains there is
a method's own arithmetic.

Usage (GPU):  PYTHONPATH=src python benchmarks/rl_gpu.py
              [--shapes 16384x4096x151936,8192x2304x262144]
              [--methods fusedce,trl,eager,compile,liger] [--T 0.7] [--coef 0.01]
       (CPU check of the script itself, tiny shapes):  ... rl_gpu.py --smoke
Full results go to $OUT/rl_gpu.json when OUT is set; a markdown table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import fusedce as fce  # noqa: E402 - after the path set-up

GIB = 2**30
SHAPES = "16384x4096x151936,8192x2304x262144"
SMOKE_SHAPES = "256x64x1000,128x48x2003"
_FLUSH = [None]


def log(*a):
    print(*a, flush=True)


def is_oom(exc: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def flush_l2(device):
    if device.type != "cuda":
        return
    if _FLUSH[0] is None:
        _FLUSH[0] = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    _FLUSH[0].zero_()


def time_step(step, setup, device, budget_ms=1500.0, min_iters=3, max_iters=20):
    """Median ms of ``step`` over iterations, each after an untimed ``setup`` and L2 flush;
    the iteration count fills ``budget_ms`` (within [min_iters, max_iters])."""
    def once():
        setup()
        flush_l2(device)
        if device.type != "cuda":
            t0 = time.perf_counter()
            step()
            return (time.perf_counter() - t0) * 1e3
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        return a, b

    def ms(x):
        return x if isinstance(x, float) else x[0].elapsed_time(x[1])

    once()  # warm-up beyond the check call: allocator, cuBLAS heuristics
    sync(device)
    first = once()
    sync(device)
    n = int(max(min_iters, min(max_iters, budget_ms / max(ms(first), 1e-3))))
    res = [once() for _ in range(n)]
    sync(device)
    return statistics.median(ms(x) for x in res), n


def peak_extra(step, setup, device):
    """GiB allocated at the peak of one step above what was allocated before it."""
    if device.type != "cuda":
        return None
    setup()
    free_memory(device)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / GIB


def matmul_tflops(device, n):
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    sync(device)
    if device.type == "cuda":
        evs = []
        for _ in range(50):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            a @ b
            e.record()
            evs.append((s, e))
        torch.cuda.synchronize()
        ms = statistics.median(s.elapsed_time(e) for s, e in evs)
    else:
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            a @ b
            ts.append((time.perf_counter() - t0) * 1e3)
        ms = statistics.median(ts)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


# ---------------------------------------------------------------------------- methods


def eager_lp_ent(h, w, t, inv_t: float):
    z = (h @ w.t()).float() * inv_t
    logp = torch.log_softmax(z, dim=-1)
    lp = logp.gather(-1, t.unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent


def trl_function():
    """TRL's chunked log-prob autograd function and the vocabulary chunk its fused head uses."""
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction as fn
    except ImportError:
        from trl.trainer.utils import _ChunkedLogProbFunction as fn
    chunk = 32768
    try:
        import trl.trainer.utils as tu

        chunk = int(getattr(tu, "_CHUNKED_LOGPROB_CHUNK_SIZE", chunk))
    except Exception as exc:  # noqa: BLE001 - its trainer module needs accelerate, datasets
        log(f"  trl.trainer.utils not importable ({type(exc).__name__}); vocabulary chunk "
            f"{chunk}, the value TRL 1.16's fused head passes")
        # the kernel's backward imports one helper from there, which outside DeepSpeed
        # ZeRO-3 returns a null context: stand in for that module with just the helper
        import contextlib
        import types

        stub = types.ModuleType("trl.trainer.utils")
        stub.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
        sys.modules["trl.trainer.utils"] = stub
    return fn, chunk


def liger_functions():
    """(dispatched function, its PyTorch fallback) of Liger's fused linear scaled CE."""
    from liger_kernel.ops import fused_linear_scaled_cross_entropy as m

    return m.LigerFusedLinearScaledCrossEntropyFunction, getattr(
        m, "_FusedLinearPPOFallbackFunction", None)


def build_methods(wanted, T: float, device):
    """name -> fn(h, w, t) returning (logp [N] fp32, entropy [N]); skipped -> reason."""
    inv_t = 1.0 / T
    out, skipped = {}, {}
    if "fusedce" in wanted:
        out["fusedce"] = lambda h, w, t: fce.linear_logprobs(h, w, t, return_entropy=True,
                                                            logit_scale=inv_t)
    if "trl" in wanted:
        try:
            fn, chunk = trl_function()
            import trl

            name = f"trl {trl.__version__} chunked"

            def trl_step(h, w, t, fn=fn, chunk=chunk):
                outs = fn.apply(h, w, None, t, T, chunk, None, 1.0, ("log_probs", "entropy"))
                return outs[0], outs[1]
            out[name] = trl_step
        except Exception as exc:  # noqa: BLE001
            skipped["trl chunked"] = f"trl not importable ({type(exc).__name__}: {exc})"
    if "eager" in wanted:
        out["eager"] = lambda h, w, t: eager_lp_ent(h, w, t, inv_t)
    if "compile" in wanted:
        compiled = torch.compile(eager_lp_ent)
        out["torch.compile"] = lambda h, w, t: compiled(h, w, t, inv_t)
    if "liger" in wanted:
        try:
            fn, fallback = liger_functions()
            from importlib.metadata import version

            ver = version("liger-kernel")

            def liger_step(h, w, t, fn=fn):
                nll, ent = fn.apply(h, w, t, T, -100, 1, True)
                return -nll, ent
            out[f"liger {ver}"] = liger_step
            if fallback is not None:
                def liger_fallback(h, w, t, fn=fallback):
                    nll, ent = fn.apply(h, w, t, T, -100, True)
                    return -nll, ent
                out[f"liger {ver} (PyTorch fallback)"] = liger_fallback
        except Exception as exc:  # noqa: BLE001
            skipped["liger"] = f"fused linear scaled CE (entropy) not importable: {exc}"
    return out, skipped


# ---------------------------------------------------------------------------- reference


def reference(h, w, t, adv, inv_t, coef, rows_i, rows_j, chunk_bytes):
    """fp32 log-probs, entropies and dh on rows ``rows_i``, dW on vocabulary rows ``rows_j``
    (which needs every row's softmax, computed in row chunks of fp32 logits)."""
    N, D = h.shape
    V = w.shape[0]
    wf = w.float()
    dw_j = torch.zeros(len(rows_j), D, dtype=torch.float64, device=h.device)
    lp_i = torch.empty(len(rows_i), dtype=torch.float64, device=h.device)
    ent_i = torch.empty_like(lp_i)
    dh_i = torch.empty(len(rows_i), D, dtype=torch.float64, device=h.device)
    rows = max(1, min(N, chunk_bytes // (V * 4 * 8)))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # a full-precision fp32 reference
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        hc = h[r0:r1].float()
        with torch.enable_grad():
            x = (hc @ wf.t()).requires_grad_(True)
            logp = torch.log_softmax(x * inv_t, dim=-1)
            lp = logp.gather(-1, t[r0:r1].unsqueeze(-1)).squeeze(-1)
            ent = -(logp.exp() * logp).sum(-1)
            loss = (lp * adv[r0:r1]).sum() + coef * ent.sum()
            (dx,) = torch.autograd.grad(loss, x)
        dw_j += (dx[:, rows_j].t() @ hc).double()
        sel = ((rows_i >= r0) & (rows_i < r1)).nonzero().squeeze(-1)
        if sel.numel():
            loc = rows_i[sel] - r0
            lp_i[sel] = lp.detach()[loc].double()
            ent_i[sel] = ent.detach()[loc].double()
            dh_i[sel] = (dx[loc] @ wf).double()
        del x, logp, lp, ent, loss, dx
    torch.backends.cuda.matmul.allow_tf32 = tf32
    # the same rows from logits rounded to bf16 by a bf16 GEMM, as every method computes
    # them: what is left of a method's error then is its own arithmetic
    lp_b, ent_b = eager_lp_ent(h[rows_i], w, t[rows_i], inv_t)
    return dict(lp=lp_i, ent=ent_i, dh=dh_i, dw=dw_j, lp_b=lp_b.double(), ent_b=ent_b.double())


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def errors(lp, ent, h, w, ref, rows_i, rows_j):
    lp_i, ent_i = lp.detach()[rows_i].double(), ent.detach()[rows_i].double()
    out = dict(lp_max_abs=float((lp_i - ref["lp"]).abs().max()),
               ent_max_abs=float((ent_i - ref["ent"]).abs().max()),
               lp_max_abs_bf16_logits=float((lp_i - ref["lp_b"]).abs().max()),
               ent_max_abs_bf16_logits=float((ent_i - ref["ent_b"]).abs().max()))
    out["dh_rel"] = rel(h.grad[rows_i], ref["dh"]) if h.grad is not None else None
    out["dw_rel"] = rel(w.grad[rows_j], ref["dw"]) if w.grad is not None else None
    return out


# ---------------------------------------------------------------------------- main


def run_shape(N, D, V, methods, skipped, args, device, rate):
    torch.manual_seed(0)
    gen = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(N, D, generator=gen).to(device, torch.bfloat16).requires_grad_(True)
    # head scale: logits of std ~2 before the temperature, a peaked softmax as in a policy
    w = (torch.randn(V, D, generator=gen) * (2.0 / D ** 0.5)).to(device, torch.bfloat16)
    w.requires_grad_(True)
    t = torch.randint(0, V, (N,), generator=gen).to(device)
    adv = torch.randn(N, generator=gen).to(device)
    inv_t = 1.0 / args.T
    floor_ms = 6.0 * N * D * V / (rate * 1e12) * 1e3
    grads_gib = (N * D + V * D) * 2 / GIB
    log(f"\n== (N, D, V) = ({N}, {D}, {V}): 3-GEMM floor {floor_ms:.2f} ms; "
        f"gradients dh + dW {grads_gib:.2f} GiB")
    rows_i = torch.linspace(0, N - 1, min(N, args.check_rows), device=device).long()
    rows_j = torch.cat([t[rows_i[:16]], torch.randint(0, V, (112,), generator=gen).to(device)])
    rows_j = torch.unique(rows_j)
    ref = None
    try:
        t0 = time.time()
        ref = reference(h.detach(), w.detach(), t, adv, inv_t, args.coef, rows_i, rows_j,
                        chunk_bytes=4 << 30 if device.type == "cuda" else 64 << 20)
        log(f"  fp32 reference: {time.time() - t0:.1f} s")
    except Exception as exc:  # noqa: BLE001
        log(f"  fp32 reference failed: {type(exc).__name__}: {exc}")
    free_memory(device)

    def setup():
        h.grad = None
        w.grad = None

    res = dict(N=N, D=D, V=V, floor_ms=floor_ms, grads_gib=grads_gib, rows={})
    for name, reason in skipped.items():
        res["rows"][name] = dict(skipped=reason)
    liger_dispatched_ok = False
    for name, fn in methods.items():
        if "fallback" in name and liger_dispatched_ok and not args.liger_fallback:
            continue  # the fallback runs only where the dispatched kernel could not

        def step(fn=fn):
            lp, ent = fn(h, w, t)
            ((lp * adv).sum() + args.coef * ent.float().sum()).backward()

        row = {}
        try:
            setup()
            t0 = time.time()
            lp, ent = fn(h, w, t)  # the first call compiles, then its values are checked
            ((lp * adv).sum() + args.coef * ent.float().sum()).backward()
            sync(device)
            row["first_call_s"] = time.time() - t0
            row["entropy_dtype"] = str(ent.dtype)
            if ref is not None:
                row["errors"] = errors(lp, ent.float(), h, w, ref, rows_i, rows_j)
            del lp, ent
            setup()
            free_memory(device)
            row["peak_extra_gib"] = peak_extra(step, setup, device)
            free_memory(device)
            row["ms"], row["iters"] = time_step(step, setup, device, budget_ms=args.budget_ms)
            row["x_floor"] = row["ms"] / floor_ms
            if name.startswith("liger") and "fallback" not in name:
                liger_dispatched_ok = True
        except Exception as exc:  # noqa: BLE001 - reported per method
            row["error"] = "OOM" if is_oom(exc) else f"{type(exc).__name__}: {exc}"
            if not is_oom(exc):
                row["traceback"] = traceback.format_exc()
        finally:
            setup()
            free_memory(device)
        res["rows"][name] = row
        log(f"  {name:34s} {describe(row)}")
        if "traceback" in row:
            log(row["traceback"])
    return res


def describe(row) -> str:
    if "skipped" in row:
        return f"skipped: {row['skipped']}"
    if "error" in row:
        return row["error"]
    pk = "" if row["peak_extra_gib"] is None else f", +{row['peak_extra_gib']:.2f} GiB"
    e = row.get("errors")
    err = "" if e is None else (
        f"; vs fp32: logp {e['lp_max_abs']:.1e}, H {e['ent_max_abs']:.1e}, dh {e['dh_rel']:.1e}"
        f", dW {e['dw_rel']:.1e}; vs bf16 logits: logp {e['lp_max_abs_bf16_logits']:.1e}, "
        f"H {e['ent_max_abs_bf16_logits']:.1e}")
    return f"{row['ms']:9.2f} ms = {row['x_floor']:.2f}x floor{pk}{err}"


def parse_shapes(s):
    out = []
    for part in s.split(","):
        n, d, v = (int(x) for x in part.lower().split("x"))
        out.append((n, d, v))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=None, help=f"NxDxV,... (default {SHAPES})")
    ap.add_argument("--methods", default="fusedce,trl,eager,compile,liger")
    ap.add_argument("--T", type=float, default=0.7, help="sampling temperature")
    ap.add_argument("--coef", type=float, default=0.01, help="entropy coefficient")
    ap.add_argument("--check-rows", type=int, default=64)
    ap.add_argument("--budget-ms", type=float, default=1500.0,
                    help="timed iterations per method fill about this much GPU time")
    ap.add_argument("--liger-fallback", action="store_true",
                    help="also time Liger's PyTorch fallback where its kernel runs")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    args = ap.parse_args()
    t_start = time.time()
    if args.smoke:
        device = torch.device("cpu")
        shapes = parse_shapes(args.shapes or SMOKE_SHAPES)
        args.budget_ms = min(args.budget_ms, 200.0)
    else:
        assert torch.cuda.is_available(), "needs a CUDA GPU (or --smoke for a CPU check)"
        device = torch.device("cuda")
        shapes = parse_shapes(args.shapes or SHAPES)
    fce.set_validation(False)  # the production setting: no host syncs on the hot path
    wanted = {m.strip() for m in args.methods.split(",") if m.strip()}

    env = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               torch=torch.__version__, fusedce=getattr(fce, "__version__", None),
               date=str(datetime.date.today()), T=args.T, coef=args.coef, smoke=args.smoke)
    for mod, key in (("triton", "triton"), ("trl", "trl"), ("liger-kernel", "liger")):
        try:
            from importlib.metadata import version

            env[key] = version(mod)
        except Exception:  # noqa: BLE001 - not installed
            env[key] = None
    log("env:", env)
    rate = matmul_tflops(device, 8192 if device.type == "cuda" else 512)
    env["matmul_tflops"] = rate
    log(f"bf16 matmul {'8192' if device.type == 'cuda' else '512'}^3: {rate:.3g} TFLOP/s")
    free_memory(device)
    methods, skipped = build_methods(wanted, args.T, device)

    results = []
    for N, D, V in shapes:
        results.append(run_shape(N, D, V, methods, skipped, args, device, rate))
        free_memory(device)  # the shape's tensors went with run_shape's frame

    report = dict(env=env, results=results, wall_s=time.time() - t_start)
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "rl_gpu.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)

    log(f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}, trl {env['trl']}, "
        f"Liger {env['liger']}, {env['date']}; bf16 h and W, T={args.T}, entropy coef "
        f"{args.coef}; forward + backward (dh, dW); floor = 6 N D V FLOPs at {rate:.3g} "
        "TFLOP/s (8192^3 bf16 matmul, this run); extra = peak allocated above the inputs "
        "(the gradients included); errors vs fp32 on sampled rows\n")
    log("| N x D x V | method | ms | x floor | extra GiB | logp err | H err | dh rel | dW rel "
        "| note |")
    log("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        shape = f"{r['N']}x{r['D']}x{r['V']}"
        log(f"| {shape} | 3-GEMM floor | {r['floor_ms']:.2f} | 1.00 | {r['grads_gib']:.2f} "
            "| | | | | extra = the gradients dh + dW alone |")
        for name, row in r["rows"].items():
            if "skipped" in row:
                log(f"| {shape} | {name} | n/a | | | | | | | {row['skipped'][:90]} |")
                continue
            if "error" in row:
                err = row["error"] if row["error"] == "OOM" else "error"
                note = "" if err == "OOM" else row["error"].replace("|", "/")[:90]
                log(f"| {shape} | {name} | {err} | | | | | | | {note} |")
                continue
            e = row.get("errors") or {}

            def f(k, spec=".1e", e=e):
                v = e.get(k)
                return "-" if v is None else format(v, spec)
            pk = "-" if row["peak_extra_gib"] is None else f"{row['peak_extra_gib']:.2f}"
            note = "" if row.get("entropy_dtype") == "torch.float32" else \
                f"entropy returned as {row.get('entropy_dtype', '?').replace('torch.', '')}"
            log(f"| {shape} | {name} | {row['ms']:.2f} | {row['x_floor']:.2f} | {pk} | "
                f"{f('lp_max_abs')} | {f('ent_max_abs')} | {f('dh_rel')} | {f('dw_rel')} | "
                f"{note} |")
    log(f"\nwall {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
