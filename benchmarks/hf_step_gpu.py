"""One Hugging Face training step (forward + backward) per loss path, on real-shaped models.

Each model is built from a config with random weights (nothing is downloaded), real widths
and vocabularies but only a few decoder layers, so that the LM head and its loss are a
visible share of the step, as they are at the end of a real model's step:

  llama3     Llama-3-8B-like: hidden 4096, intermediate 14336, 32 heads, 8 KV heads, V=128256
  qwen3      Qwen3-8B-like: hidden 4096, intermediate 12288, 32 heads, 8 KV heads, V=151936
  gemma3     Gemma-3-12B-like (gemma3_text): hidden 3840, V=262144, tied head,
             final_logit_softcapping=30.0
  qwen3_moe  Qwen3-30B-A3B-like: hidden 2048, 128 experts (8 per token), V=151936,
             output_router_logits=True (the router auxiliary loss is part of the loss)

Methods, each on a fresh model instance built from the same seed (so the same weights):

  stock    the model's own forward: logits materialised, transformers' ForCausalLMLoss
  fusedce  fusedce.integrations.transformers.apply(model): linear_cross_entropy from the
           hidden states, the logits never exist
  liger    Liger-Kernel's fused linear cross-entropy only: apply_liger_kernel_to_<family>(
           model=model, fused_linear_cross_entropy=True, every other kernel off); "n/a"
           when Liger is not importable or has no function for the family

Every step runs in bf16 weights with gradient checkpointing on and labels = input ids (the
first 32 positions of each sequence, a quarter at most, ignored as a prompt would be). Per method: the loss of
the first step, the norm of all parameter gradients after it (both compared with stock's),
whether the forward returned logits, the median step time over --steps timed steps after
one warm-up step (CUDA events; each step after an untimed zero_grad and a 256 MiB write that
flushes L2), and the peak allocated memory during a timed step (reset_peak_memory_stats
before each). A step that runs out of memory is reported as "OOM".

Usage (GPU):  PYTHONPATH=src python benchmarks/hf_step_gpu.py [--models llama3,qwen3,gemma3,
              qwen3_moe] [--tokens 16384] [--batch 4] [--layers 2] [--steps 3]
              [--methods stock,fusedce,liger]
       (CPU check of the script itself, tiny shapes):  ... hf_step_gpu.py --smoke
Full results go to $OUT/hf_step.json when OUT is set; a markdown table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import inspect
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
_FLUSH = [None]

# real widths, vocabularies and attention layouts; the depth comes from --layers
MODELS = {
    "llama3": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                   max_position_embeddings=8192, tie_word_embeddings=False),
    "qwen3": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                  vocab_size=151936, max_position_embeddings=8192, tie_word_embeddings=False),
    "gemma3": dict(model_type="gemma3_text", hidden_size=3840, intermediate_size=15360,
                   num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                   query_pre_attn_scalar=256, vocab_size=262144, sliding_window=1024,
                   final_logit_softcapping=30.0, max_position_embeddings=8192,
                   tie_word_embeddings=True),
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
                      moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                      num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                      vocab_size=151936, output_router_logits=True, router_aux_loss_coef=0.001,
                      max_position_embeddings=8192, tie_word_embeddings=False),
}
ALIASES = {"llama": "llama3", "gemma": "gemma3", "moe": "qwen3_moe", "qwen_moe": "qwen3_moe"}

# --smoke: the same families at toy widths, small enough for a CPU in seconds
SMOKE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
SMOKE_EXTRA = {"llama3": dict(vocab_size=1000), "qwen3": dict(vocab_size=1200),
               "gemma3": dict(vocab_size=2048, query_pre_attn_scalar=16, sliding_window=16),
               "qwen3_moe": dict(vocab_size=1500, num_experts=8, num_experts_per_tok=2,
                                 moe_intermediate_size=32)}

# Liger's patch function per model_type (its name in liger_kernel.transformers)
LIGER_FN = {"llama": "apply_liger_kernel_to_llama", "qwen3": "apply_liger_kernel_to_qwen3",
            "gemma3_text": "apply_liger_kernel_to_gemma3_text",
            "qwen3_moe": "apply_liger_kernel_to_qwen3_moe",
            "mixtral": "apply_liger_kernel_to_mixtral"}
PROMPT = 32  # ignored label positions at the start of every sequence (a quarter at most)


def log(*a):
    print(*a, flush=True)


def is_oom(exc: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()


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


def make_config(name: str, layers: int, smoke: bool):
    from transformers import AutoConfig

    kw = dict(MODELS[name])
    if smoke:
        kw.update(SMOKE)
        kw.update(SMOKE_EXTRA[name])
    model_type = kw.pop("model_type")
    kw.update(num_hidden_layers=layers, use_cache=False)
    return AutoConfig.for_model(model_type, **kw)


def build_model(config, device, dtype):
    """A fresh model with the seed's weights, in training mode with checkpointing on."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 attn_implementation="sdpa")
    model.to(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def liger_version():
    try:
        from importlib.metadata import version

        return version("liger-kernel")
    except Exception:  # noqa: BLE001 - not installed
        return None


def apply_liger(model, model_type: str):
    """Liger's fused linear cross-entropy on this instance, every other Liger kernel off.
    Returns None when applied, else why not (reported as n/a)."""
    try:
        import liger_kernel.transformers as lt
    except Exception as exc:  # noqa: BLE001
        return f"liger_kernel not importable ({type(exc).__name__})"
    fn = getattr(lt, LIGER_FN.get(model_type, ""), None)
    if fn is None:
        return f"Liger {liger_version()} has no patch function for {model_type}"
    params = inspect.signature(fn).parameters
    if "fused_linear_cross_entropy" not in params or "model" not in params:
        return f"{fn.__name__} takes no fused_linear_cross_entropy/model arguments"
    # only the loss changes: RoPE, norms, MLP kernels (whatever this version names them) off
    kw = {k: False for k, p in params.items() if isinstance(p.default, bool)}
    kw.update(fused_linear_cross_entropy=True, model=model)
    fn(**kw)
    fwd = getattr(model.forward, "__func__", model.forward)
    if "liger" not in (getattr(fwd, "__module__", "") or ""):
        return f"{fn.__name__} left the forward unchanged"
    return None


def grad_norm(model) -> float:
    norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32)
             for p in model.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else float("nan")


def run_method(method, config, ids, labels, device, dtype, steps):
    res = dict(method=method)
    model = out = None
    try:
        model = build_model(config, device, dtype)
        res["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        res["head_checksum"] = float(model.get_output_embeddings().weight.sum(dtype=torch.float32))
        if method == "fusedce":
            from fusedce.integrations import transformers as fce_hf

            fce_hf.apply(model)
        elif method == "liger":
            why = apply_liger(model, config.model_type)
            if why is not None:
                res["na"] = why
                return res

        def step():
            o = model(input_ids=ids, labels=labels, use_cache=False)
            o.loss.backward()
            return o

        # warm-up (Triton compilation, autotuning, allocator); its loss and gradients are
        # the ones compared between methods
        model.zero_grad(set_to_none=True)
        out = step()
        res["loss"] = float(out.loss.detach())
        res["logits"] = None if out.logits is None else list(out.logits.shape)
        aux = getattr(out, "aux_loss", None)
        res["aux_loss"] = None if aux is None else float(aux.detach())
        res["grad_norm"] = grad_norm(model)
        out = None
        model.zero_grad(set_to_none=True)
        free_memory(device)
        res["weights_gib"] = (torch.cuda.memory_allocated() / GIB
                              if device.type == "cuda" else None)
        times, peaks = [], []
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            flush_l2(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                a = torch.cuda.Event(enable_timing=True)
                b = torch.cuda.Event(enable_timing=True)
                a.record()
                step()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
                peaks.append(torch.cuda.max_memory_allocated() / GIB)
            else:
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
        res["step_ms_all"] = times
        res["step_ms"] = statistics.median(times)
        res["peak_gib"] = max(peaks) if peaks else None
    except Exception as exc:  # noqa: BLE001 - reported per method
        if is_oom(exc):
            res["error"] = "OOM"
        else:
            res["error"] = f"{type(exc).__name__}: {exc}"
            res["traceback"] = traceback.format_exc()
    finally:
        out = None
        if model is not None:
            model.zero_grad(set_to_none=True)
        model = None
        free_memory(device)
    return res


def describe(r) -> str:
    if "na" in r:
        return f"n/a ({r['na']})"
    if "error" in r:
        return r["error"]
    peak = "" if r["peak_gib"] is None else f", peak {r['peak_gib']:.2f} GiB"
    return (f"loss {r['loss']:.5f}, |grad| {r['grad_norm']:.4e}, {r['step_ms']:.1f} ms{peak}, "
            f"logits {'none' if r['logits'] is None else r['logits']}")


def compare(rows):
    """Loss and gradient-norm differences from stock, or from fusedce where stock did not
    run (out of memory); fills r['check']."""
    ran = {r["method"]: r for r in rows if "loss" in r}
    base_name = "stock" if "stock" in ran else "fusedce"
    base = ran.get(base_name)
    for r in rows:
        if "loss" not in r or r is base:
            continue
        if base is None:
            r["check"] = "nothing to compare with"
            continue
        dl = abs(r["loss"] - base["loss"]) / max(abs(base["loss"]), 1e-12)
        dg = abs(r["grad_norm"] - base["grad_norm"]) / max(abs(base["grad_norm"]), 1e-12)
        same_w = r.get("head_checksum") == base.get("head_checksum")
        # bf16: the losses differ by the rounding of the logits (and of the softcap, which
        # stock applies in bf16); 1e-2 relative is far above that and far below any error
        ok = dl < 1e-2 and dg < 5e-2 and same_w
        r.update(compared_with=base_name, rel_loss_diff=dl, rel_grad_norm_diff=dg,
                 same_weights=same_w)
        r["check"] = (f"{'ok' if ok else 'MISMATCH'} vs {base_name}: rel. loss diff {dl:.1e}, "
                      f"grad norm {dg:.1e}" + ("" if same_w else ", weights differ"))


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="llama3,qwen3,gemma3,qwen3_moe",
                    help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--methods", default="stock,fusedce,liger")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per step (batch x seq)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    ap.add_argument("--gemma-hidden", type=int, default=3840, choices=(2560, 3840),
                    help="2560: Gemma-3-4B-like widths instead of 12B")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    args = ap.parse_args()
    t_start = time.time()

    import transformers

    if args.gemma_hidden == 2560:
        MODELS["gemma3"].update(hidden_size=2560, intermediate_size=10240,
                                num_attention_heads=8, num_key_value_heads=4)
    if args.smoke:
        device = torch.device("cpu")
        args.tokens, args.batch = min(args.tokens, 64), min(args.batch, 2)
        args.steps = min(args.steps, 2)
    else:
        assert torch.cuda.is_available(), "needs a CUDA GPU (or --smoke for a CPU check)"
        device = torch.device("cuda")
    dtype = torch.bfloat16
    fce.set_validation(False)  # the production setting: no host syncs on the loss path
    seq = args.tokens // args.batch
    names = [ALIASES.get(m.strip(), m.strip()) for m in args.models.split(",") if m.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for n in names:
        if n not in MODELS:
            ap.error(f"unknown model {n!r}; known: {', '.join(MODELS)}")

    env = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               torch=torch.__version__, transformers=transformers.__version__,
               fusedce=getattr(fce, "__version__", None), liger=liger_version(),
               date=str(datetime.date.today()), batch=args.batch, seq=seq,
               layers=args.layers, steps=args.steps, smoke=args.smoke)
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    log("env:", env)

    results = {}
    for name in names:
        config = make_config(name, args.layers, args.smoke)
        V = config.vocab_size
        gen = torch.Generator(device="cpu").manual_seed(1)
        ids = torch.randint(0, V, (args.batch, seq), generator=gen).to(device)
        labels = ids.clone()
        labels[:, :min(PROMPT, seq // 4)] = -100
        log(f"\n== {name} ({config.model_type}): hidden {config.hidden_size}, V={V}, "
            f"{args.layers} layers, {args.batch} x {seq} tokens")
        rows = []
        for method in methods:
            r = run_method(method, config, ids, labels, device, dtype, args.steps)
            rows.append(r)
            log(f"  {method:8s} {describe(r)}")
            if "traceback" in r:
                log(r["traceback"])
        compare(rows)
        for r in rows:
            if "check" in r:
                log(f"  {r['method']:8s} {r['check']}")
        results[name] = dict(model_type=config.model_type, hidden=config.hidden_size,
                             vocab=V, rows=rows)
        del ids, labels
        free_memory(device)

    report = dict(env=env, results=results, wall_s=time.time() - t_start)
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "hf_step.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)

    log(f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}, transformers "
        f"{env['transformers']}, Liger {env['liger']}, {env['date']}; bf16 weights, gradient "
        f"checkpointing, {args.batch} x {seq} tokens, {args.layers} decoder layers; "
        f"median of {args.steps} steps; peak = max_memory_allocated during a step "
        f"(weights, gradients and a 0.25 GiB L2-flush buffer included)\n")
    log("| model | method | step ms | peak GiB | loss | check |")
    log("|---|---|---:|---:|---:|---|")
    for name, rep in results.items():
        label = f"{name} (V={rep['vocab']})"
        for r in rep["rows"]:
            if "na" in r:
                log(f"| {label} | {r['method']} | n/a | n/a | n/a | {r['na']} |")
            elif "error" in r:
                err = r["error"] if r["error"] == "OOM" else "error"
                log(f"| {label} | {r['method']} | {err} | {err} | - | "
                    f"{r['error'][:80] if err != 'OOM' else ''} |")
            else:
                log(f"| {label} | {r['method']} | {fmt(r['step_ms'], '.1f')} | "
                    f"{fmt(r['peak_gib'], '.2f')} | {r['loss']:.4f} | {r.get('check', '')} |")
    log(f"\nwall {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
