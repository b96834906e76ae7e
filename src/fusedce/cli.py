"""The ``fusedce`` command line: ``bench``, ``check`` and ``demo``.

    fusedce bench   time / memory / fp64 error of fusedce vs PyTorch eager, torch.compile and
                    the peers (Liger-Kernel, Cut Cross-Entropy, quack when installed), each
                    time as a ratio to the PERF.md floor (see :mod:`fusedce.bench`)
    fusedce check   every backend on this machine against float64, per option set
    fusedce demo    a tiny LM head: loss + backward, eager vs fusedce, memory saved

Runs on the CPU when there is no GPU (small shapes, seconds) and on CUDA when present.
Launched under torchrun, ``bench`` measures the vocabulary-parallel forms (one shard of the
vocabulary per rank; rank 0 prints and writes).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise SystemExit(f"fusedce: --device {name!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fusedce: --device cuda but CUDA is not available")
    return dev


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (sizes of the demo and the bench)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _split(values: Optional[Sequence[str]]) -> List[str]:
    out: List[str] = []
    for v in values or []:
        out += [p.strip() for p in v.split(",") if p.strip()]
    return out


# ---------------------------------------------------------------------------- bench


def _init_distributed(device_arg: str):
    """(group, device, rank, world) under torchrun; (None, device, 0, 1) otherwise."""
    import torch

    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws <= 1:
        return None, _device(device_arg), 0, 1
    import torch.distributed as dist

    use_cuda = device_arg != "cpu" and torch.cuda.is_available()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    global _OWN_GROUP
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        _OWN_GROUP = True
    return dist.group.WORLD, device, dist.get_rank(), dist.get_world_size()


# whether the bench created the process group (then it also tears it down and ends the
# process; a caller's group is left alone)
_OWN_GROUP = False


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark fusedce against PyTorch and peers",
                       description="Sweep operations x shapes x dtypes x methods; print a "
                       "table, write CSV/JSON/PNG (and Markdown with --markdown).")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--preset", default=None,
                   help="cpu (default without CUDA), gpu (default with CUDA), perf (the PERF.md "
                   "shapes, ~8 min on one H100/H200), models, tiny")
    p.add_argument("--op", action="append", help="operations: cross_entropy, "
                   "linear_cross_entropy, logprobs (comma list; default all; perf: CE + linear)")
    p.add_argument("--shape", action="append",
                   help="NxV (CE, logprobs) or NxDxV (linear CE); V may be a model name "
                   "(llama3, qwen2.5, gemma2, gemma3); comma list")
    p.add_argument("--vocab", action="append",
                   help="vocabulary sizes or model names to sweep (with --tokens, --hidden)")
    p.add_argument("--tokens", type=_positive_int, help="N for --vocab (default 4096)")
    p.add_argument("--hidden", type=_positive_int,
                   help="D for linear CE with --vocab / NxV shapes")
    p.add_argument("--dtype", action="append", help="float32, bfloat16, float16 (comma list)")
    p.add_argument("--methods", action="append",
                   help="method names or globs (e.g. 'fusedce-*,eager'); see --list")
    p.add_argument("--list", action="store_true", help="list the methods and exit")
    p.add_argument("--out", default="fusedce-bench-results",
                   help="directory for results.csv, results.json and the plots")
    p.add_argument("--no-files", action="store_true", help="write no CSV/JSON/plots")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--markdown", metavar="PATH",
                   help="also write the table as Markdown (for BENCHMARKS.md); '-' = stdout")
    p.add_argument("--no-ceilings", action="store_true",
                   help="skip measuring copy bandwidth / matmul rate (no floor ratios)")
    p.add_argument("--no-forward", action="store_true", help="skip the forward-only timing")
    p.add_argument("--no-error", action="store_true", help="skip the fp64 error check")
    p.add_argument("--min-time", type=float, default=0.1,
                   help="CPU: seconds of repeats per measurement (median taken)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="CUDA: do_bench rep (ms)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing methods")


def cmd_bench(args) -> int:
    import torch

    from .bench import methods as M
    from .bench import report, runner, shapes

    if args.list:
        dev = _device(args.device)
        for m in M.all_methods():
            c = shapes.Case(m.ops[0], 8, 64, torch.float32, 8, 2 if m.tp == "yes" else 1)
            why = m.unavailable(c, dev)
            state = "available" if why is None else f"unavailable: {why}"
            print(f"{m.name:<24} {','.join(m.ops):<50} {state}\n{'':<24} {m.description}")
        return 0

    group, device, rank, world = _init_distributed(args.device)
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    ops = _split(args.op)
    if not ops:
        ops = ["cross_entropy", "linear_cross_entropy"] if preset == "perf" else \
            list(shapes.OPS)
    bad = [o for o in ops if o not in shapes.OPS]
    if bad:
        raise SystemExit(f"fusedce bench: unknown op(s) {bad}; choose from {shapes.OPS}")
    user_shapes, user_vocabs = _split(args.shape), _split(args.vocab)
    default_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    try:
        dtypes = [shapes.parse_dtype(d) for d in _split(args.dtype)]
        if user_shapes or user_vocabs:
            cases = shapes.custom_cases(ops, shapes=user_shapes, vocabs=user_vocabs,
                                        tokens=args.tokens, hidden=args.hidden,
                                        dtypes=dtypes or [default_dtype], tp=world)
        else:
            cases = []
            for dt in (dtypes or [None]):
                cases += shapes.preset_cases(preset, ops, dt, tp=world)
        methods = M.select_methods(_split(args.methods) or None)
    except ValueError as exc:
        raise SystemExit(f"fusedce bench: {exc}") from None
    if not cases:
        raise SystemExit("fusedce bench: no cases (check --op / --shape)")
    exclude = {}
    if device.type == "cpu" and preset == "cpu" and not args.methods and \
            not (user_shapes or user_vocabs):
        # each torch.compile graph costs seconds of C++ compilation on a small CPU: the
        # default CPU sweep compiles only the headline operation
        why = "left out of the default CPU sweep to keep it fast; --methods '*' adds it"
        for op in ("logprobs", "linear_cross_entropy"):
            exclude[("compile", op)] = why
        # PyTorch's chunked linear CE takes tens of seconds per step on a small CPU
        exclude[("torch-lce", "linear_cross_entropy")] = why
    cfg = runner.SweepConfig(exclude=exclude, device=device, seed=args.seed,
                             cpu_min_time_s=args.min_time,
                             gpu_rep_ms=args.rep_ms, ceilings=not args.no_ceilings,
                             forward_only=not args.no_forward, error=not args.no_error,
                             progress=not args.quiet and rank == 0, group=group,
                             verbose_errors=args.verbose)
    results, info = runner.run_sweep(cases, methods, cfg)
    if rank == 0:
        report.print_table(results, info)
        written = report.write_outputs(results, info, None if args.no_files else args.out,
                                       plots=not args.no_plots, markdown_path=args.markdown)
        print(f"{len(results)} measurements in {info.wall_s:.1f} s"
              + (f"; wrote {', '.join(written)}" if written else ""))
    if group is not None and _OWN_GROUP:
        import torch.distributed as dist

        # rank 0 writes the report while the others would already tear the group down; a
        # gloo group destroyed under a peer still using it can abort the process at exit
        dist.barrier()
        dist.destroy_process_group()
        # under load a gloo rank can still abort at interpreter exit, after all of the above
        # ("terminate called without an active exception" from a C++ static destructor: no
        # Python frame left); the work is done and written, so leave without destructors
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


# ---------------------------------------------------------------------------- check / demo


def cmd_check(args) -> int:
    import torch

    device = _device(args.device)
    if device.type != "cuda":
        # must precede the first import of the Triton kernels
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from .bench.check import run_check

    try:
        shape = tuple(int(s) for s in args.shape.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise SystemExit(f"fusedce check: --shape must be BxTxV with positive sizes, got "
                         f"{args.shape!r}")
    results = run_check(device, _split(args.backend) or None, quick=args.quick, seed=args.seed,
                        shape=shape)
    torch.cuda.synchronize() if device.type == "cuda" else None
    return 0 if results and all(r.ok for r in results) else 1


def cmd_demo(args) -> int:
    from .bench.demo import run_demo

    device = _device(args.device)
    run_demo(device, batch=args.batch, seq=args.seq, hidden=args.hidden, vocab=args.vocab)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fusedce", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    _bench_parser(sub)
    c = sub.add_parser("check", help="verify every available backend against float64")
    c.add_argument("--device", default="auto")
    c.add_argument("--backend", action="append", help="torch, triton (default: all available)")
    c.add_argument("--quick", action="store_true", help="a few option sets only")
    c.add_argument("--shape", default="2x37x1003", help="logits shape BxTxV (default 2x37x1003)")
    c.add_argument("--seed", type=int, default=0)
    d = sub.add_parser("demo", help="tiny LM head: loss + backward, memory saved")
    d.add_argument("--device", default="auto")
    d.add_argument("--batch", type=_positive_int, default=4)
    d.add_argument("--seq", type=_positive_int, default=256)
    d.add_argument("--hidden", type=_positive_int, default=256)
    d.add_argument("--vocab", type=_positive_int, default=32000)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``fusedce`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.cmd == "bench":
        return cmd_bench(args)
    if args.cmd == "check":
        return cmd_check(args)
    return cmd_demo(args)


if __name__ == "__main__":
    sys.exit(main())
