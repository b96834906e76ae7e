"""The ``fusedce`` command line: ``bench``, ``check`` and ``demo``.

    fusedce bench   time / memory / fp64 error of fusedce vs PyTorch eager, torch.compile and
                    the peers (Liger-Kernel, Cut Cross-Entropy, quack when installed), each
                    time as a ratio to the hardware floor (see :mod:`fusedce.bench`)
    fusedce check   every backend on this machine against float64, per option set
    fusedce demo    a tiny LM head: loss + backward, eager vs fusedce, memory saved

Runs on the CPU when there is no GPU (small shapes, seconds) and on CUDA when present.
Launched under torchrun, ``bench`` measures the vocabulary-parallel forms (one shard of the
vocabulary per rank; rank 0 prints and writes).

Every bad argument ends the command with exit status 2 and one line on stderr that names
the option, before any work starts: argparse types check each value on its own, and
:class:`UsageError` carries the checks that need several options (or the machine) at once.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Callable, List, Optional, Sequence

PROG = "fusedce"
BACKENDS = ("torch", "triton")
DEFAULT_OUT = "fusedce-bench-results"
# the presets whose shapes are sized for GPU memory and GPU speed
GPU_PRESETS = ("gpu", "perf")
# no N, D or V beyond this: the kernels index rows and columns with 32-bit offsets
MAX_SIZE = 2**31 - 1


class UsageError(Exception):
    """A bad command-line argument found after parsing: ``option`` and why."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option = option
        self.message = message


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (exit status 2, no usage block)."""

    def error(self, message: str):  # type: ignore[override]
        _fail(self.prog, message)


def _fail(prog: str, message: str):
    one_line = " ".join(str(message).split())
    sys.stderr.write(f"{prog}: error: {one_line} (see '{prog} --help')\n")
    sys.stderr.flush()
    raise SystemExit(2)


def _version() -> str:
    """The installed distribution's version; the package attribute when not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fusedce")
    except PackageNotFoundError:
        import fusedce

        return str(getattr(fusedce, "__version__", "unknown"))


# ---------------------------------------------------------------------------- value types
# Each raises argparse.ArgumentTypeError, which argparse reports as
# "argument --OPTION: message" (so the option is always named).


def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        if v > MAX_SIZE:
            raise argparse.ArgumentTypeError(f"{v} is too large (at most {MAX_SIZE})")
        return v
    parse.__name__ = what
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_vocab_size = _int_at_least(2, "an integer >= 2")


def _seed(text: str) -> int:
    try:
        v = int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {v}")
    return v


def _float_checked(text: str, *, allow_zero: bool) -> float:
    try:
        v = float(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        want = "a finite number >= 0" if allow_zero else "a finite number > 0"
        raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
    return v


def _seconds(text: str) -> float:
    return _float_checked(text, allow_zero=True)


def _positive_float(text: str) -> float:
    return _float_checked(text, allow_zero=False)


def _device_arg(text: str) -> str:
    """auto, cpu, cuda or cuda:N; CUDA only where this torch sees that device."""
    t = text.strip().lower()
    if t in ("auto", "cpu"):
        return t
    m = re.fullmatch(r"cuda(?::(\d+))?", t)
    if m is None:
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build"
        raise argparse.ArgumentTypeError(
            f"{text!r} asked for, but CUDA is not available here (torch {torch.__version__}, "
            f"{build}); use --device cpu")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(
            f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return t


def _items(text: str) -> List[str]:
    items = [p.strip() for p in text.split(",") if p.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def _list_of(check: Callable[[str], object], what: str) -> Callable[[str], List[str]]:
    """argparse type for a comma list whose every item passes ``check`` (ValueError: bad)."""
    def parse(text: str) -> List[str]:
        items = _items(text)
        for item in items:
            try:
                check(item)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
        return items
    parse.__name__ = what
    return parse


def _check_op(item: str) -> None:
    from .bench.shapes import OPS

    if item not in OPS:
        raise ValueError(f"unknown operation {item!r}: choose from {', '.join(OPS)}")


def _check_dtype(item: str) -> None:
    from .bench.shapes import parse_dtype

    parse_dtype(item)


def _check_method(item: str) -> None:
    import fnmatch

    from .bench.methods import all_methods

    names = [m.name for m in all_methods()]
    if not any(fnmatch.fnmatch(n, item) for n in names):
        raise ValueError(f"no method matches {item!r}; known: {', '.join(names)} "
                         f"(see fusedce bench --list)")


def _check_shape(item: str) -> None:
    from .bench.shapes import shape_parts

    shape_parts(item)


def _check_vocab(item: str) -> None:
    from .bench.shapes import parse_vocab

    parse_vocab(item)


def _check_backend(item: str) -> None:
    if item not in BACKENDS:
        raise ValueError(f"unknown backend {item!r}: choose from {', '.join(BACKENDS)}")


def _bxtxv(text: str) -> tuple:
    parts = text.strip().lower().split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape[:2]) < 1 or shape[2] < 2:
        raise argparse.ArgumentTypeError(
            f"expected BxTxV with B, T >= 1 and V >= 2 (e.g. 2x37x1003), got {text!r}")
    if max(shape) > MAX_SIZE:
        raise argparse.ArgumentTypeError(f"{text!r}: sizes must be at most {MAX_SIZE}")
    return shape


def _flat(values: Optional[Sequence[Sequence[str]]]) -> List[str]:
    """The items of an ``append`` option of comma lists, in order, without repeats."""
    out: List[str] = []
    for group in values or []:
        for v in group:
            if v not in out:
                out.append(v)
    return out


# ---------------------------------------------------------------------------- checks


def _dir_problem(path: str) -> Optional[str]:
    """Why a directory cannot be made (or written) at ``path``; None when it can."""
    full = os.path.abspath(path)
    if os.path.lexists(full):
        if not os.path.isdir(full):
            return f"{path!r} exists and is not a directory"
        if not os.access(full, os.W_OK | os.X_OK):
            return f"directory {path!r} is not writable"
        return None
    parent = full
    while not os.path.lexists(parent):
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    if not os.path.isdir(parent):
        return f"cannot create {path!r}: {parent!r} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create {path!r}: directory {parent!r} is not writable"
    return None


def _file_problem(path: str) -> Optional[str]:
    """Why a file cannot be written at ``path`` (its directories made as needed)."""
    full = os.path.abspath(path)
    if os.path.isdir(full):
        return f"{path!r} is a directory"
    if os.path.lexists(full):
        return None if os.access(full, os.W_OK) else f"{path!r} is not writable"
    why = _dir_problem(os.path.dirname(full))
    return None if why is None else f"cannot write {path!r}: {why}"


def _prepare_dir(option: str, path: str) -> None:
    """Make the output directory now, so that a bad path fails before the run, not after."""
    why = _dir_problem(path) if path.strip() else "empty path"
    if why is None:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            why = f"cannot create {path!r}: {exc.strerror or exc}"
    if why:
        raise UsageError(option, why)


def _prepare_file(option: str, path: str) -> None:
    """Check that ``path`` can be written (its directories made), leaving no file behind."""
    why = _file_problem(path) if path.strip() else "empty path"
    if why is None:
        existed = os.path.lexists(path)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "a"):
                pass
            if not existed:
                os.remove(path)
        except OSError as exc:
            why = f"cannot write {path!r}: {exc.strerror or exc}"
    if why:
        raise UsageError(option, why)


def _check_memory(option: str, need: int, what: str) -> None:
    """Refuse CPU work that cannot fit in the memory this machine has free."""
    from .bench.measure import available_host_bytes
    from .bench.report import fmt_bytes

    have = available_host_bytes()
    if have is not None and need > have:
        raise UsageError(option, f"{what} needs about {fmt_bytes(need)} of memory, more than "
                         f"the {fmt_bytes(have)} available on this machine; use smaller sizes")


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
    p.add_argument("--device", type=_device_arg, default="auto",
                   help="auto (CUDA if present, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--preset", choices=("cpu", "gpu", "perf", "models", "tiny"), default=None,
                   help="cpu (default without CUDA), gpu (default with CUDA; needs CUDA), "
                   "perf (the reference shapes: CE at N=16384, V up to 262144, and two linear "
                   "CE heads; ~8 min on one H100/H200; needs CUDA), models, tiny")
    p.add_argument("--op", action="append", type=_list_of(_check_op, "operation list"),
                   help="operations: cross_entropy, linear_cross_entropy, logprobs (comma "
                   "list; default all; perf: CE + linear)")
    p.add_argument("--shape", action="append", type=_list_of(_check_shape, "shape list"),
                   help="NxV (CE, logprobs) or NxDxV (linear CE); V may be a model name "
                   "(llama3, qwen2.5, gemma2, gemma3); comma list; replaces the preset")
    p.add_argument("--vocab", action="append", type=_list_of(_check_vocab, "vocabulary list"),
                   help="vocabulary sizes or model names to sweep (with --tokens, --hidden); "
                   "replaces the preset")
    p.add_argument("--tokens", type=_positive_int, help="N for --vocab (default 4096)")
    p.add_argument("--hidden", type=_positive_int,
                   help="D for linear CE with --vocab / NxV shapes")
    p.add_argument("--dtype", action="append", type=_list_of(_check_dtype, "dtype list"),
                   help="float32, bfloat16, float16 (comma list; also fp32, bf16, fp16)")
    p.add_argument("--methods", action="append", type=_list_of(_check_method, "method list"),
                   help="method names or globs (e.g. 'fusedce-*,eager'); see --list")
    p.add_argument("--list", action="store_true", help="list the methods and exit")
    p.add_argument("--out", default=None,
                   help=f"directory for results.csv, results.json and the plots (default "
                   f"{DEFAULT_OUT})")
    p.add_argument("--no-files", action="store_true", help="write no CSV/JSON/plots")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--markdown", metavar="PATH",
                   help="also write the table as Markdown (for BENCHMARKS.md); '-' = stdout")
    p.add_argument("--no-ceilings", action="store_true",
                   help="skip measuring copy bandwidth / matmul rate (no floor ratios)")
    p.add_argument("--no-forward", action="store_true", help="skip the forward-only timing")
    p.add_argument("--no-error", action="store_true", help="skip the fp64 error check")
    p.add_argument("--min-time", type=_seconds, default=0.1,
                   help="CPU: seconds of repeats per measurement (median taken; >= 0)")
    p.add_argument("--rep-ms", type=_positive_float, default=100.0,
                   help="CUDA: do_bench rep (ms; > 0)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the random inputs (>= 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing methods")


def _bench_preset(args, device, user_sized: bool, has_vocabs: bool) -> str:
    """The preset the options ask for (checked against the device and the other options)."""
    if args.preset is not None and user_sized:
        raise UsageError("--preset", "--shape and --vocab replace the preset's shapes; give "
                         "either a preset or shapes")
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    if device.type != "cuda" and preset in GPU_PRESETS and not user_sized:
        raise UsageError("--preset", f"{preset} runs GPU-sized shapes (up to 16384 x 262144 "
                         "logits) and needs CUDA, but this run is on the CPU; use --preset "
                         "cpu, models or tiny, or --shape")
    if args.tokens is not None and not has_vocabs:
        raise UsageError("--tokens", "sets N for --vocab only (a preset or --shape gives "
                         "its own N)")
    return preset


def _bench_ops(args, preset: str, user_sized: bool) -> list:
    """The operations to measure; --hidden only with a linear op and user shapes."""
    from .bench import shapes

    ops = _flat(args.op)
    if not ops:
        ops = ["cross_entropy", "linear_cross_entropy"] if preset == "perf" else \
            list(shapes.OPS)
    if args.hidden is not None:
        if "linear_cross_entropy" not in ops:
            raise UsageError("--hidden", "only linear_cross_entropy takes a hidden size, and "
                             f"--op is {','.join(ops)}")
        if not user_sized:
            raise UsageError("--hidden", "applies with --vocab or NxV --shape values only (a "
                             "preset gives its own D)")
    return ops


def _bench_dtypes(args) -> list:
    from .bench import shapes

    dtypes = []
    for d in _flat(args.dtype):
        dt = shapes.parse_dtype(d)
        if dt not in dtypes:
            dtypes.append(dt)
    return dtypes


def _user_cases(args, ops, user_shapes, user_vocabs, dtypes, world: int) -> list:
    """The cases of --shape and --vocab (a shape that fits none of the ops is refused)."""
    from .bench import shapes

    cases = []
    for s in user_shapes:
        mine = shapes.custom_cases(ops, shapes=[s], hidden=args.hidden, dtypes=dtypes, tp=world)
        if not mine:
            raise UsageError("--shape", shapes.shape_mismatch(s, ops, args.hidden))
        cases += mine
    cases += shapes.custom_cases(ops, vocabs=user_vocabs, tokens=args.tokens,
                                 hidden=args.hidden, dtypes=dtypes, tp=world)
    return cases


def _bench_cases(args, device, world: int):
    """(preset, cases, source option): the cases the options ask for, checked."""
    import torch

    from .bench import shapes

    user_shapes, user_vocabs = _flat(args.shape), _flat(args.vocab)
    user_sized = bool(user_shapes or user_vocabs)
    preset = _bench_preset(args, device, user_sized, bool(user_vocabs))
    ops = _bench_ops(args, preset, user_sized)
    dtypes = _bench_dtypes(args)
    if user_sized:
        default_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        cases = _user_cases(args, ops, user_shapes, user_vocabs, dtypes or [default_dtype],
                            world)
        return preset, cases, "--shape" if user_shapes else "--vocab"
    cases = []
    for dt in (dtypes or [None]):
        cases += shapes.preset_cases(preset, ops, dt, tp=world)
    return preset, cases, "--preset"


def _bench_plan(cases, methods, device, exclude, methods_given: bool):
    """The (case, method) pairs that will run; a UsageError when there are none."""
    plan, why_not = [], {}
    for case in cases:
        for m in methods:
            if not m.applies(case):
                why_not.setdefault(m.name, f"does not measure {case.op}"
                                   + (" (vocabulary-parallel only)" if m.tp == "yes" else ""))
                continue
            why = exclude.get((m.name, case.op)) or m.unavailable(case, device)
            if why is None:
                plan.append((case, m))
            else:
                why_not.setdefault(m.name, why)
    if not plan:
        reasons = "; ".join(f"{k}: {v}" for k, v in why_not.items())
        raise UsageError("--methods" if methods_given else "--op",
                         f"nothing to run on {device.type}: {reasons}")
    return plan


def _list_methods(args) -> int:
    import torch

    from .bench import methods as M
    from .bench import shapes

    dev = _device(args.device)
    for m in M.all_methods():
        c = shapes.Case(m.ops[0], 8, 64, torch.float32, 8, 2 if m.tp == "yes" else 1)
        why = m.unavailable(c, dev)
        state = "available" if why is None else f"unavailable: {why}"
        print(f"{m.name:<24} {','.join(m.ops):<50} {state}\n{'':<24} {m.description}")
    return 0


def _bench_paths(args):
    """(out, markdown): the output folder and table file, checked (made only later, once
    every other option has passed)."""
    if args.no_files and args.out is not None:
        raise UsageError("--out", "not with --no-files (which writes no files)")
    out = None if args.no_files else (args.out if args.out is not None else DEFAULT_OUT)
    markdown = args.markdown if args.markdown not in (None, "-") else None
    for option, path, problem in (("--out", out, _dir_problem),
                                  ("--markdown", markdown, _file_problem)):
        if path is not None:
            why = problem(path) if path.strip() else "empty path"
            if why:
                raise UsageError(option, why)
    return out, markdown


def _default_excludes(args, device, preset: str, method_patterns) -> dict:
    """(method, op) pairs the default CPU sweep leaves out, with the reason."""
    if not (device.type == "cpu" and preset == "cpu" and not method_patterns
            and not (args.shape or args.vocab)):
        return {}
    # each torch.compile graph costs seconds of C++ compilation on a small CPU: the default
    # CPU sweep compiles only the headline operation
    why = "left out of the default CPU sweep to keep it fast; --methods '*' adds it"
    exclude = {("compile", op): why for op in ("logprobs", "linear_cross_entropy")}
    # PyTorch's chunked linear CE takes tens of seconds per step on a small CPU
    exclude[("torch-lce", "linear_cross_entropy")] = why
    return exclude


def _leave_distributed(group) -> None:
    if group is None or not _OWN_GROUP:
        return
    import torch.distributed as dist

    # rank 0 writes the report while the others would already tear the group down; a gloo
    # group destroyed under a peer still using it can abort the process at exit
    dist.barrier()
    dist.destroy_process_group()
    # under load a gloo rank can still abort at interpreter exit, after all of the above
    # ("terminate called without an active exception" from a C++ static destructor: no
    # Python frame left); the work is done and written, so leave without destructors
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cmd_bench(args) -> int:
    from .bench import methods as M
    from .bench import report, runner

    if args.list:
        return _list_methods(args)
    out, markdown = _bench_paths(args)
    group, device, rank, world = _init_distributed(args.device)
    preset, cases, source = _bench_cases(args, device, world)
    method_patterns = _flat(args.methods)
    methods = M.select_methods(method_patterns or None)
    exclude = _default_excludes(args, device, preset, method_patterns)
    plan = _bench_plan(cases, methods, device, exclude, bool(method_patterns))
    if device.type == "cpu":
        # on CUDA an out-of-memory method is recorded and the sweep goes on; on the CPU the
        # kernel kills the whole process instead, so a case that cannot fit is refused here
        # (CPU ranks under torchrun share this host: each holds its shard)
        case, m = max(plan, key=lambda cm: M.peak_estimate(*cm))
        _check_memory(source, world * M.peak_estimate(case, m),
                      f"{case.op} {case.shape_str} {case.dtype_str} ({m.name})")
    if out is not None:
        _prepare_dir("--out", out)
    if markdown is not None:
        _prepare_file("--markdown", markdown)

    cfg = runner.SweepConfig(exclude=exclude, device=device, seed=args.seed,
                             cpu_min_time_s=args.min_time,
                             gpu_rep_ms=args.rep_ms, ceilings=not args.no_ceilings,
                             forward_only=not args.no_forward, error=not args.no_error,
                             progress=not args.quiet and rank == 0, group=group,
                             verbose_errors=args.verbose)
    results, info = runner.run_sweep(cases, methods, cfg)
    if rank == 0:
        report.print_table(results, info)
        written = report.write_outputs(results, info, out, plots=not args.no_plots,
                                       markdown_path=args.markdown)
        print(f"{len(results)} measurements in {info.wall_s:.1f} s"
              + (f"; wrote {', '.join(written)}" if written else ""))
    _leave_distributed(group)
    return 0


# ---------------------------------------------------------------------------- check / demo

# bytes per logit element that ``check`` holds at its peak: the logits, their float64 copy
# and its gradient, the float64 reference's log-softmax and temporaries, fusedce's gradient
CHECK_BYTES_PER_LOGIT = 64
# the same for ``demo``: its eager baseline keeps fp32 logits, log-softmax and two gradients
DEMO_BYTES_PER_LOGIT = 16


def _check_parser(sub) -> None:
    c = sub.add_parser("check", help="verify every available backend against float64",
                       description="Run every option set (reductions, ignore_index, "
                       "smoothing, z-loss, softcap, class weights, dtypes, in place, "
                       "logprobs, entropy, linear CE) on each backend and compare the loss "
                       "and gradients with float64 references; exit 0 only if all pass.")
    c.add_argument("--device", type=_device_arg, default="auto",
                   help="auto (CUDA if present, else cpu), cpu, cuda or cuda:N; on the CPU "
                   "the Triton backend runs in the Triton interpreter")
    c.add_argument("--backend", action="append", type=_list_of(_check_backend, "backend list"),
                   help="torch, triton (comma list; default: every backend available here)")
    c.add_argument("--quick", action="store_true",
                   help="a few option sets only (seconds with --backend torch)")
    c.add_argument("--shape", type=_bxtxv, default=(2, 37, 1003),
                   help="logits shape BxTxV (default 2x37x1003)")
    c.add_argument("--seed", type=_seed, default=0,
                   help="seed of the random logits and targets (>= 0)")


def cmd_check(args) -> int:
    import torch

    device = _device(args.device)
    if device.type != "cuda":
        # must precede the first import of the Triton kernels
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from .bench.check import available_backends, run_check

    backends = _flat(args.backend)
    avail = available_backends(device)
    for be in backends:
        if avail.get(be) is not None:
            raise UsageError("--backend", f"{be} is not available here: {avail[be]}")
    B, T, V = args.shape
    if device.type == "cpu":
        _check_memory("--shape", B * T * V * CHECK_BYTES_PER_LOGIT, f"logits {B}x{T}x{V}")
    results = run_check(device, backends or None, quick=args.quick, seed=args.seed,
                        shape=args.shape)
    torch.cuda.synchronize() if device.type == "cuda" else None
    return 0 if results and all(r.ok for r in results) else 1


def _demo_parser(sub) -> None:
    d = sub.add_parser("demo", help="tiny LM head: loss + backward, memory saved",
                       description="One forward + backward of an LM head and its loss: "
                       "PyTorch eager, fusedce on the logits (fresh and in-place gradient) "
                       "and fusedce's fused linear CE; prints losses, gradient differences "
                       "and the peak extra memory of each.")
    d.add_argument("--device", type=_device_arg, default="auto",
                   help="auto (CUDA if present, else cpu), cpu, cuda or cuda:N")
    d.add_argument("--batch", type=_positive_int, default=4, help="sequences (default 4)")
    d.add_argument("--seq", type=_positive_int, default=256,
                   help="tokens per sequence (default 256)")
    d.add_argument("--hidden", type=_positive_int, default=256,
                   help="hidden size D (default 256)")
    d.add_argument("--vocab", type=_vocab_size, default=32000,
                   help="vocabulary size V, >= 2 (default 32000)")


def cmd_demo(args) -> int:
    from .bench.demo import run_demo

    device = _device(args.device)
    if device.type == "cpu":
        rows = args.batch * args.seq
        # logits and their temporaries, plus the head, the hidden states and their gradients
        need = rows * args.vocab * DEMO_BYTES_PER_LOGIT + 8 * args.hidden * (args.vocab + rows)
        _check_memory("--batch/--seq/--vocab", need,
                      f"logits {args.batch}x{args.seq}x{args.vocab}")
    run_demo(device, batch=args.batch, seq=args.seq, hidden=args.hidden, vocab=args.vocab)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    # not required=True: a missing command is reported after unknown options (main)
    sub = p.add_subparsers(dest="command", metavar="command",
                           help="bench, check or demo ('fusedce COMMAND --help' for options)")
    _bench_parser(sub)
    _check_parser(sub)
    _demo_parser(sub)
    return p


COMMANDS = {"bench": cmd_bench, "check": cmd_check, "demo": cmd_demo}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``fusedce`` console script; returns the exit code.

    A bad argument raises ``SystemExit(2)`` after one line on stderr naming the option.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    prog = PROG if args.command is None else f"{PROG} {args.command}"
    if extra:
        _fail(prog, f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        _fail(PROG, "argument command: missing; choose from bench, check, demo")
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        _fail(f"{PROG} {args.command}", f"argument {exc.option}: {exc.message}")
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG} {args.command}: interrupted\n")
        return 130
    return 1  # not reached: _fail raises


if __name__ == "__main__":
    sys.exit(main())
