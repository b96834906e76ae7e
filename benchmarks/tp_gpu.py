"""Vocab-parallel cross-entropy on GPUs: one process per GPU, NCCL, tensor parallel TP.

Each rank of a TP group holds bf16 logits [N, V / TP] (consecutive vocabulary shards) and the
same global targets; one step is the forward + backward of the mean loss over N tokens.
Floor (docs/performance.md), per rank: read the shard once and write its gradient once,

    floor = 4 bytes * N * (V / TP) / B,     B = measured device-to-device copy bandwidth
                                                (bytes read + written per second),

plus a few floats per token of communication (latency-bound). Measured per rank: the median
step time over fixed iterations enqueued back to back (the same count on every rank, since
every step holds collectives; the slowest rank's median is reported) and the extra peak memory of one step
(max_memory_allocated during the step minus what was allocated before it, inputs included
in the latter). Methods, all in one run:

  fusedce                 fce.cross_entropy(x, t, tp_group=g)  (validation off)
  fusedce inplace         ... inplace_backward=True (the gradient overwrites the logits)
  fusedce validated       ... with validation on (one more small all-gather, a host sync)
  fusedce gather[_inpl.]  ... with FUSEDCE_TP_EXCHANGE=nccl: the shard statistics all-gathered
                          between a statistics kernel and the fused kernel, instead of
                          exchanged inside the fused kernel through symmetric memory
  megatron-core           megatron.core.tensor_parallel.vocab_parallel_cross_entropy
                          (after parallel_state.initialize_model_parallel)
  liger                   liger_kernel LigerVocabParallelCrossEntropy (0.8.5)
  pytorch                 hand-written: fp32 upcast, all-reduced max / sum-exp / target logit,
                          autograd through the rest

Usage (one node, any world size divisible by TP; NCCL_NVLS_ENABLE=0 stays set):
    torchrun --nproc-per-node 2 benchmarks/tp_gpu.py [--tp 2] [--n 16384]
        [--vocab 128256 262144] [--iters 20] [--methods fusedce,liger,...]
Peers are imported when present (see tools/peer-wheels.sh and tools/peer-wheels-extra.sh).
Prints a table on global rank 0 and writes $OUT/tp_gpu.json when OUT is set.
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
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import fusedce as fce  # noqa: E402

GB = 1e9
ALL_METHODS = ("local_inplace", "selfpeer_inplace", "fusedce", "fusedce_inplace", "fusedce_validated", "fusedce_gather",
               "fusedce_gather_inplace", "megatron", "liger", "pytorch")


def log0(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


# ---------------------------------------------------------------------------- measurement


def copy_bandwidth(device, nbytes: int = 4 << 30, reps: int = 10) -> float:
    """Device-to-device copy rate, bytes read + written per second (median of ``reps``)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times)


def time_steps(step, iters: int, warmup: int, group) -> list:
    """Per-step times (ms) over ``iters`` steps enqueued back to back (as do_bench does: the
    host runs ahead of the GPU, so its launch time is hidden whenever the GPU is the slower
    side; a sync per step would add the host's time to every step); every rank runs the
    same count."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    dist.barrier(group=group)
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(iters)]
    for a, b in ev:
        a.record()
        step()
        b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in ev]


def peak_extra(step, device) -> float:
    """Extra peak bytes of one step over what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) - before


# ---------------------------------------------------------------------------- methods


class _SameSum(torch.autograd.Function):
    """All-reduce SUM whose backward is the identity: every rank's loss is the same function
    of the global sum, so each rank's local part gets the gradient of that sum as it is."""

    @staticmethod
    def forward(ctx, x, group):
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, g):
        return g, None


def pytorch_vocab_parallel_ce(x, target, group, vocab_start):
    """Hand-written vocab-parallel CE (mean over rows) in eager PyTorch with autograd."""
    xf = x.float()
    m = xf.detach().amax(dim=-1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    z = xf - m.unsqueeze(-1)
    s = _SameSum.apply(z.exp().sum(dim=-1), group)
    local = target - vocab_start
    inside = (local >= 0) & (local < x.shape[-1])
    zt = z.gather(-1, local.clamp(0, x.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    zt = _SameSum.apply(torch.where(inside, zt, torch.zeros_like(zt)), group)
    return (s.log() - zt).mean()


def make_methods(names, group, tp_rank, v_local, solo=None):
    vocab_start = tp_rank * v_local
    methods = {}

    def local(group1):
        # this rank's shard as a whole vocabulary (targets folded into it): the unsharded
        # kernel (group1 None) or the in-kernel exchange with a group of one (its own
        # records only): what the shard costs without the other rank
        def f(x, t):
            with fce.validation(False):
                return fce.cross_entropy(x, t % v_local, tp_group=group1, inplace_backward=True)
        return f

    if "local_inplace" in names:
        methods["local_inplace"] = local(None)
    if "selfpeer_inplace" in names and solo is not None:
        methods["selfpeer_inplace"] = local(solo)

    def fusedce(inplace, validated, exchange="auto"):
        def f(x, t):
            old = os.environ.get("FUSEDCE_TP_EXCHANGE")
            os.environ["FUSEDCE_TP_EXCHANGE"] = exchange
            try:
                with fce.validation(validated):
                    return fce.cross_entropy(x, t, tp_group=group, inplace_backward=inplace)
            finally:
                if old is None:
                    os.environ.pop("FUSEDCE_TP_EXCHANGE")
                else:
                    os.environ["FUSEDCE_TP_EXCHANGE"] = old
        return f

    if "fusedce" in names:
        methods["fusedce"] = fusedce(False, False)
    if "fusedce_inplace" in names:
        methods["fusedce_inplace"] = fusedce(True, False)
    if "fusedce_validated" in names:
        methods["fusedce_validated"] = fusedce(False, True)
    if "fusedce_gather" in names:
        methods["fusedce_gather"] = fusedce(False, False, "nccl")
    if "fusedce_gather_inplace" in names:
        methods["fusedce_gather_inplace"] = fusedce(True, False, "nccl")
    if "megatron" in names:
        try:
            from megatron.core import parallel_state
            from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

            mgroup = parallel_state.get_tensor_model_parallel_group()

            def mega(x, t):
                return vocab_parallel_cross_entropy(x.view(-1, 1, x.shape[-1]), t.view(-1, 1),
                                                    0.0, mgroup).mean()
            methods["megatron"] = mega
        except Exception as exc:  # noqa: BLE001 - a missing peer is reported, not fatal
            log0(f"megatron-core unavailable: {type(exc).__name__}: {exc}")
    if "liger" in names:
        try:
            from liger_kernel.transformers.vocab_parallel_cross_entropy import (
                LigerVocabParallelCrossEntropy,
            )

            mod = LigerVocabParallelCrossEntropy(reduction="none")

            def liger(x, t):
                return mod(x.view(-1, 1, x.shape[-1]), t.view(-1, 1), tp_group=group).mean()
            methods["liger"] = liger
        except Exception as exc:  # noqa: BLE001
            log0(f"liger vocab-parallel CE unavailable: {type(exc).__name__}: {exc}")
    if "pytorch" in names:
        methods["pytorch"] = lambda x, t: pytorch_vocab_parallel_ce(x, t, group, vocab_start)
    return methods


# ---------------------------------------------------------------------------- main


def init_megatron(tp: int) -> bool:
    try:
        from megatron.core import parallel_state
    except Exception as exc:  # noqa: BLE001
        log0(f"megatron-core not importable: {type(exc).__name__}: {exc}")
        return False
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             create_gloo_process_groups=False)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--vocab", type=int, nargs="+", default=[128256, 262144])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--methods", default=",".join(ALL_METHODS))
    ap.add_argument("--configs", default="",
                    help="fused-kernel configs 'block,warps,per_sm,reverse[,split];...': each adds "
                         "fusedce_inplace@cfg and selfpeer_inplace@cfg")
    args = ap.parse_args()
    names = [m.strip() for m in args.methods.split(",") if m.strip()]

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank)
    dist.init_process_group("nccl", device_id=device)
    world, rank = dist.get_world_size(), dist.get_rank()
    tp = args.tp
    if world % tp:
        raise SystemExit(f"world size {world} is not a multiple of --tp {tp}")
    groups = [dist.new_group(list(range(s, s + tp))) for s in range(0, world, tp)]
    group = groups[rank // tp]
    solos = [dist.new_group([r]) for r in range(world)]  # for selfpeer_inplace
    tp_rank = dist.get_rank(group)
    if "megatron" in names and not init_megatron(tp):
        names.remove("megatron")

    bw = copy_bandwidth(device)
    log0(f"{torch.cuda.get_device_name(device)}; torch {torch.__version__}; world {world}, "
         f"TP {tp}; copy bandwidth {bw / 1e12:.2f} TB/s (rank 0)")
    results = []
    for V in args.vocab:
        if V % tp:
            log0(f"skip V={V}: not divisible by TP={tp}")
            continue
        v_local = V // tp
        methods = make_methods(names, group, tp_rank, v_local, solos[rank])
        for cfg in [c for c in args.configs.split(";") if c.strip()]:
            base_methods = make_methods(["fusedce_inplace", "selfpeer_inplace"], group, tp_rank,
                                        v_local, solos[rank])
            for mname, mfn in base_methods.items():
                methods[f"{mname}@{cfg}"] = _with_config(mfn, cfg)
        gen = torch.Generator(device="cpu").manual_seed(1234 + V)  # same targets on all ranks
        target = torch.randint(0, V, (args.n,), generator=gen).to(device)
        torch.manual_seed(100 + rank)
        base = torch.randn(args.n, v_local, device=device, dtype=torch.bfloat16) * 2.0
        floor_ms = 4.0 * args.n * v_local / bw * 1e3
        losses = {}
        grads = {}  # the first method's gradient: every other one is compared with it
        for name, fn in methods.items():
            x = base.clone().requires_grad_(True)
            try:
                loss = fn(x, target)  # a first call, also the cross-method loss check
                losses[name] = float(loss.detach())
                loss.backward()
                g = x.grad if x.grad is not None else x  # in place: the logits hold it
                if not grads:
                    grads["ref"] = (name, g.detach().clone())
                gdiff = (g.detach().float() - grads["ref"][1].float()).abs().max()
                dist.all_reduce(gdiff, op=dist.ReduceOp.MAX, group=group)
                x.grad = None
                if name.endswith("_inplace"):
                    x = base.clone().requires_grad_(True)  # fresh logits: measure from them

                def step(x=x, fn=fn):
                    x.grad = None
                    fn(x, target).backward()

                extra = peak_extra(step, device)
                times = time_steps(step, args.iters, args.warmup, group)
                med = statistics.median(times)
                meds = [None] * world
                dist.all_gather_object(meds, (med, extra, floor_ms))
                worst = max(m[0] for m in meds)
                results.append(dict(V=V, method=name, ms=worst, ms_rank0=med,
                                    extra_gb=max(m[1] for m in meds) / GB,
                                    floor_ms=max(m[2] for m in meds),
                                    ratio=worst / max(m[2] for m in meds),
                                    loss=losses[name], grad_diff=float(gdiff)))
            except Exception as exc:  # noqa: BLE001 - one method failing must not end the run
                log0(f"{name} V={V} failed: {type(exc).__name__}: {exc}")
                if rank == 0:
                    traceback.print_exc()
                results.append(dict(V=V, method=name, error=f"{type(exc).__name__}: {exc}"))
            finally:
                del x
                torch.cuda.empty_cache()
        del base, grads
        torch.cuda.empty_cache()

    if rank == 0:
        _print_kernel_registers()
        ref = {r["V"]: r.get("loss") for r in results if r["method"] == "fusedce"}
        print(f"\nVocab-parallel CE, TP={tp}, N={args.n}, bf16, forward+backward per step "
              f"(slowest rank's median of {args.iters}); copy {bw / 1e12:.2f} TB/s")
        print(f"{'V':>7} {'method':<18} {'ms':>8} {'x floor':>8} {'floor ms':>9} "
              f"{'extra GB':>9} {'loss - fusedce':>15} {'max|dx - dx_1st|':>17}")
        for r in results:
            if "error" in r:
                print(f"{r['V']:>7} {r['method']:<18} {'failed: ' + r['error'][:60]}")
                continue
            d = r["loss"] - ref[r["V"]] if ref.get(r["V"]) is not None else float("nan")
            print(f"{r['V']:>7} {r['method']:<18} {r['ms']:8.3f} {r['ratio']:7.2f}x "
                  f"{r['floor_ms']:9.3f} {r['extra_gb']:9.3f} {d:15.2e} {r['grad_diff']:17.2e}")
        out = os.environ.get("OUT")
        if out:
            meta = dict(device=torch.cuda.get_device_name(device), torch=torch.__version__,
                        triton=_triton_version(), world=world, tp=tp, n=args.n,
                        iters=args.iters, copy_bw_bytes_per_s=bw,
                        date=datetime.datetime.now().isoformat(timespec="seconds"))
            with open(os.path.join(out, "tp_gpu.json"), "w") as f:
                json.dump(dict(meta=meta, results=results), f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def _with_config(fn, cfg: str):
    """fn with the fused kernel's table overridden by 'block,warps,per_sm,reverse[,split]'
    (split > 1: shard rows cut into that many parts, PEER + SPLIT)."""
    from fusedce.triton import configs

    b, w, p, r, sp = ([int(v) for v in cfg.split(",")] + [1])[:5]
    rc = configs.RowsConfig(block=b, num_warps=w, per_sm=p, reverse=bool(r), split=sp,
                            peer_split=sp > 1)

    def f(x, t):
        configs.set_override(fused=rc)
        try:
            return fn(x, t)
        finally:
            configs.set_override(fused=None)
    return f


def _print_kernel_registers():
    """Registers and spills of every compiled variant of the vocabulary-parallel kernels."""
    try:
        from fusedce.triton import fused_tp

        for kern in (fused_tp._fused_peer_kernel, fused_tp._fused_gathered_kernel):
            for dev, entry in getattr(kern, "device_caches", {}).items():
                for key, k in entry[0].items():
                    print(f"{kern.fn.__name__} variant: warps {k.metadata.num_warps}, "
                          f"regs {k.n_regs}, spills {k.n_spills}")
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        print(f"(kernel registers unavailable: {type(exc).__name__}: {exc})")


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
