"""The sweep: every (case, method) measured the same way, failures recorded, never fatal.

Per case: draw the inputs, compute the fp64 reference on a sample (see
:mod:`fusedce.bench.reference`). Per method: one warm-up forward + backward (compilation,
autotuning), fresh inputs, one forward + backward under the peak-memory probe (its output
and sampled gradients give the error), then the timed forward + backward (gradients set
to None between steps) and the timed forward only (``torch.no_grad``, inputs detached).
On the CPU (one process) the timing runs in passes over the case's methods, each pass with
fresh inputs and a warm-up step, the methods' order rotated from pass to pass, and each
method's median taken over all its passes: a burst of load from a neighbour on a shared
machine then falls on every method of the case alike, not on one.

Hardware floors, from the ceilings measured in the same run (B copy bandwidth, F matmul
rate of the dtype), with s = bytes per element of the logits dtype and V_l = V / tp:

    CE, logprobs     forward + backward  2 * s * N * V_l / B      forward only  s * N * V_l / B
    linear CE        forward + backward  3 * 2 * N * D * V_l / F  forward only  2 * N * D * V_l / F

and every time is also given as ratio = time / floor.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import measure
from .methods import Method
from .reference import (Inputs, Reference, make_linear, make_logits, make_targets,
                        reference_linear, reference_logits, rel_err)
from .shapes import Case

LIN = "linear_cross_entropy"


@dataclass
class Result:
    """One row of the benchmark table (times in ms, memory in bytes)."""

    op: str
    shape: str
    n: int
    d: int
    v: int
    dtype: str
    tp: int
    method: str
    family: str
    status: str = "ok"  # ok | OOM | error
    message: str = ""
    fwd_bwd_ms: float = float("nan")
    fwd_ms: float = float("nan")
    peak_bytes: float = float("nan")
    floor_fwd_bwd_ms: float = float("nan")
    floor_fwd_ms: float = float("nan")
    ratio_fwd_bwd: float = float("nan")
    ratio_fwd: float = float("nan")
    err: float = float("nan")
    err_out: float = float("nan")
    err_grad: float = float("nan")
    warmup_s: float = float("nan")
    label: str = ""


@dataclass
class RunInfo:
    """What the table is about: device, versions, ceilings, skipped methods."""

    device: str
    device_name: str
    torch: str
    triton: str
    python: str
    date: str
    world_size: int = 1
    copy_bytes_per_s: float = float("nan")
    matmul_flops: Dict[str, float] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)  # method -> why it did not run
    notes: List[str] = field(default_factory=list)
    wall_s: float = float("nan")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    proc = platform.processor() or platform.machine()
    return f"CPU {proc} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # noqa: BLE001
        return "n/a"


# ---------------------------------------------------------------------------- progress


class Progress:
    """A progress bar on stderr: rich if installed, else tqdm, else plain lines."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self._rich = self._tqdm = None
        if not enabled:
            return
        try:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RP,
                                       TextColumn, TimeElapsedColumn)

            console = Console(stderr=True)
            self._rich = RP(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, transient=True)
            self._rich.start()
            self._task = self._rich.add_task("bench", total=total)
            return
        except Exception:  # noqa: BLE001 - rich missing or no usable console
            self._rich = None
        try:
            from tqdm import tqdm

            self._tqdm = tqdm(total=total, file=sys.stderr, leave=False, desc="bench")
        except Exception:  # noqa: BLE001
            self._tqdm = None

    def step(self, label: str) -> None:
        """Announce the item about to run."""
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task, description=label)
        elif self._tqdm is not None:
            self._tqdm.set_description_str(label)
        else:
            print(f"[{self.done + 1}/{self.total}] {label}", file=sys.stderr, flush=True)

    def advance(self) -> None:
        self.done += 1
        if self._rich is not None:
            self._rich.advance(self._task)
        elif self._tqdm is not None:
            self._tqdm.update(1)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
        elif self._tqdm is not None:
            self._tqdm.close()


# ---------------------------------------------------------------------------- sweep


@dataclass
class SweepConfig:
    device: torch.device
    seed: int = 0
    cpu_min_time_s: float = 0.2
    cpu_min_reps: int = 8
    # CPU timing passes over a case's methods (the time and reps above are split over them)
    cpu_passes: int = 4
    gpu_warmup_ms: float = 25.0
    gpu_rep_ms: float = 100.0
    tp_reps: int = 10
    ceilings: bool = True
    forward_only: bool = True
    error: bool = True
    progress: bool = True
    group: object = None  # process group for vocab-parallel cases
    verbose_errors: bool = False
    # a method whose measured step takes longer than this is timed by that one step only
    slow_step_s: float = 3.0
    # (method, op) pairs left out of this sweep -> why (e.g. slow CPU compiles)
    exclude: Dict[tuple, str] = field(default_factory=dict)


def _shard(case: Case, group) -> tuple:
    """(vocab_start, V_local) of this rank: near-equal contiguous shards in rank order."""
    if case.tp == 1 or group is None:
        return 0, case.v
    import torch.distributed as dist

    rank, ws = dist.get_rank(group), dist.get_world_size(group)
    base, extra = divmod(case.v, ws)
    start = rank * base + min(rank, extra)
    return start, base + (1 if rank < extra else 0)


def _make_inputs(case: Case, cfg: SweepConfig) -> Inputs:
    dev = cfg.device
    start, v_local = _shard(case, cfg.group)
    t = make_targets(case.n, case.v, dev, cfg.seed)
    group = cfg.group if case.tp > 1 else None
    if case.op == LIN:
        h, w = make_linear(case.n, case.d, case.v, case.dtype, dev, cfg.seed,
                           rows=(start, start + v_local))
        return Inputs(t, h=h, w=w, vocab_start=start, group=group)
    x = make_logits(case.n, case.v, case.dtype, dev, cfg.seed, cols=(start, start + v_local))
    return Inputs(t, x=x, vocab_start=start, group=group)


def _reference(case: Case, cfg: SweepConfig) -> Reference:
    dev = cfg.device
    start, v_local = _shard(case, cfg.group)
    t = make_targets(case.n, case.v, dev, cfg.seed)
    if case.op == LIN:
        h, w = make_linear(case.n, case.d, case.v, case.dtype, dev, cfg.seed)
        return reference_linear(h, w, t, cfg.seed)
    return reference_logits(case.op, case.n, case.v, case.dtype, dev, cfg.seed, t,
                            (start, start + v_local))


def _floors(case: Case, info: RunInfo, v_local: int) -> tuple:
    if case.op == LIN:
        rate = info.matmul_flops.get(_dtname(case.dtype), float("nan"))
        one = 2.0 * case.n * case.d * v_local / rate * 1e3
        return 3 * one, one
    s = torch.empty((), dtype=case.dtype).element_size()
    one = s * case.n * v_local / info.copy_bytes_per_s * 1e3
    return 2 * one, one


def _dtname(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _scalar_loss(out: torch.Tensor) -> torch.Tensor:
    return out if out.dim() == 0 else out.sum()


def _errors(case: Case, inp: Inputs, out: torch.Tensor, ref: Reference) -> tuple:
    err_out = rel_err(out.float(), ref.out)
    dev = ref.out.device
    rows = ref.rows.to(dev)
    errs = []
    if case.op == LIN:
        if inp.h.grad is not None:
            errs.append(rel_err(inp.h.grad[rows], ref.grads["h"]))
        if inp.w.grad is not None and ref.cols is not None:
            v_local = inp.w.shape[0]
            cols = ref.cols.to(dev)
            inside = (cols >= inp.vocab_start) & (cols < inp.vocab_start + v_local)
            if bool(inside.any()):
                errs.append(rel_err(inp.w.grad[cols[inside] - inp.vocab_start],
                                    ref.grads["w"][inside]))
        else:
            errs.append(float("inf"))
    else:
        g = inp.x.grad
        errs.append(float("inf") if g is None else rel_err(g[rows], ref.grads["x"]))
    err_grad = max(errs) if errs else float("nan")
    return err_out, err_grad


def _all_max(vals: List[float], cfg: SweepConfig, case: Case) -> List[float]:
    """Element-wise max over the ranks of a vocab-parallel case (NaN-safe)."""
    if case.tp == 1 or cfg.group is None:
        return vals
    import torch.distributed as dist

    dev = cfg.device
    t = torch.tensor([(-1.0 if math.isnan(x) else x) for x in vals], dtype=torch.float64,
                     device=dev)
    nan = torch.tensor([1.0 if math.isnan(x) else 0.0 for x in vals], dtype=torch.float64,
                       device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=cfg.group)
    dist.all_reduce(nan, op=dist.ReduceOp.MAX, group=cfg.group)
    return [float("nan") if n > 0 else float(x) for x, n in zip(t.tolist(), nan.tolist())]


def _interleaved(case: Case, cfg: SweepConfig) -> bool:
    """Whether the case's CPU timing runs in passes over its methods (see the module
    docstring)."""
    return cfg.device.type == "cpu" and case.tp == 1 and cfg.cpu_passes > 1


def _cpu_times(step: Callable[[], object], reset: Callable[[], None], cfg: SweepConfig
               ) -> List[float]:
    """One pass's share of the CPU timing: step times in ms."""
    passes = max(1, cfg.cpu_passes)
    return measure.time_cpu(step, min_time_s=cfg.cpu_min_time_s / passes,
                            min_reps=max(1, -(-cfg.cpu_min_reps // passes)), reset=reset)


def _time(step: Callable[[], object], inp_holder: list, case: Case, cfg: SweepConfig,
          grads: bool, samples: Optional[List[float]] = None) -> float:
    """The step's time in ms; with ``samples`` (an interleaved CPU case) this pass's step
    times are also appended to it."""
    def reset():
        inp_holder[0].zero_grads()

    dev = cfg.device
    if case.tp > 1:
        # a fixed count on every rank keeps the collectives matched
        if dev.type == "cuda":
            return measure.median(measure.time_cuda_fixed(step, cfg.tp_reps, reset=reset))
        ts = []
        for i in range(cfg.tp_reps + 1):
            t0 = time.perf_counter()
            step()
            if i:
                ts.append((time.perf_counter() - t0) * 1e3)
            reset()
        return measure.median(ts)
    if dev.type == "cuda":
        return measure.time_cuda(step, grad_to_none=inp_holder[0].leaves() if grads else (),
                                 warmup_ms=cfg.gpu_warmup_ms, rep_ms=cfg.gpu_rep_ms)
    if samples is not None:
        samples.extend(_cpu_times(step, reset, cfg))
        return measure.median(samples)
    return measure.median(measure.time_cpu(step, min_time_s=cfg.cpu_min_time_s,
                                           min_reps=cfg.cpu_min_reps, reset=reset))


def _fwd_bwd_step(fn: Callable, holder: list) -> Callable[[], torch.Tensor]:
    """One forward + backward of ``fn`` on the inputs in ``holder[0]`` (its output back)."""
    def fwd_bwd():
        out = fn(holder[0])
        _scalar_loss(out).backward()
        return out
    return fwd_bwd


def _fwd_step(fn: Callable, inputs: Inputs) -> Callable[[], torch.Tensor]:
    """One forward of ``fn`` under ``torch.no_grad`` on detached ``inputs``."""
    det = inputs.detached()

    def fwd():
        with torch.no_grad():
            return fn(det)
    return fwd


def run_one(case: Case, method: Method, cfg: SweepConfig, ref: Optional[Reference],
            info: RunInfo, samples: Optional[Dict[str, List[float]]] = None) -> Result:
    """Measure ``method`` on ``case``; any exception becomes the row's status. ``samples``
    (interleaved CPU cases): receives the first pass's step times under "fwd_bwd" and "fwd",
    for :func:`time_again` to add to."""
    if samples is not None:
        samples.update(fwd_bwd=[], fwd=[])
    start, v_local = _shard(case, cfg.group)
    res = Result(case.op, case.shape_str, case.n, case.d, case.v, case.dtype_str, case.tp,
                 method.name, method.family, label=case.label)
    res.floor_fwd_bwd_ms, res.floor_fwd_ms = _floors(case, info, v_local)
    dev = cfg.device
    holder: list = [None]
    try:
        fn = method.build(case, dev)
        fwd_bwd = _fwd_bwd_step(fn, holder)
        holder[0] = _make_inputs(case, cfg).set_requires_grad(True)
        t0 = time.perf_counter()
        fwd_bwd()
        measure.synchronize(dev)
        res.warmup_s = time.perf_counter() - t0
        holder[0].zero_grads()
        if method.inplace:
            holder[0] = None
            holder[0] = _make_inputs(case, cfg).set_requires_grad(True)
        t0 = time.perf_counter()
        peak, _net, out = measure.peak_bytes(fwd_bwd, dev)
        once_s = time.perf_counter() - t0
        res.peak_bytes = float(peak)
        if ref is not None and cfg.error:
            res.err_out, res.err_grad = _errors(case, holder[0], out.detach(), ref)
            res.err = max(res.err_out, res.err_grad)
        del out
        holder[0].zero_grads()
        slow = once_s > cfg.slow_step_s and case.tp == 1
        if slow:
            # keep the sweep's time bounded: one (memory-probed) step is the measurement
            res.fwd_bwd_ms = once_s * 1e3
            res.message = f"slow: timed by one step ({once_s:.1f} s)"
        else:
            res.fwd_bwd_ms = _time(fwd_bwd, holder, case, cfg, grads=True,
                                   samples=None if samples is None else samples["fwd_bwd"])
        holder[0].zero_grads()
        if cfg.forward_only and slow:
            fwd = _fwd_step(fn, holder[0])
            t0 = time.perf_counter()
            fwd()
            measure.synchronize(dev)
            res.fwd_ms = (time.perf_counter() - t0) * 1e3
        elif cfg.forward_only:
            fwd = _fwd_step(fn, holder[0])
            fwd()  # warm-up: a no_grad graph compiles separately under torch.compile
            measure.synchronize(dev)
            res.fwd_ms = _time(fwd, holder, case, cfg, grads=False,
                               samples=None if samples is None else samples["fwd"])
        if samples is not None and slow:
            samples.clear()  # timed by its one step: no further passes
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - a failing method is a result, not a crash
        res.status = "OOM" if measure.is_oom(exc) else "error"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        res.message = f"{type(exc).__name__}: {first}"[:200]
        if cfg.verbose_errors:
            traceback.print_exc(file=sys.stderr)
    finally:
        holder[0] = None
        measure.free_memory(dev, collect=res.status != "ok")
    vals = _all_max([res.fwd_bwd_ms, res.fwd_ms, res.peak_bytes, res.err, res.err_out,
                     res.err_grad, res.warmup_s, 0.0 if res.status == "ok" else
                     (1.0 if res.status == "OOM" else 2.0)], cfg, case)
    (res.fwd_bwd_ms, res.fwd_ms, res.peak_bytes, res.err, res.err_out, res.err_grad,
     res.warmup_s, st) = vals
    if res.status == "ok" and st > 0:
        res.status, res.message = ("OOM" if st == 1.0 else "error"), "failed on another rank"
    if res.status != "ok":
        res.fwd_bwd_ms = res.fwd_ms = res.peak_bytes = float("nan")
        if samples is not None:
            samples.clear()
    _ratios(res)
    return res


def _ratios(res: Result) -> None:
    res.ratio_fwd_bwd = res.fwd_bwd_ms / res.floor_fwd_bwd_ms
    res.ratio_fwd = res.fwd_ms / res.floor_fwd_ms


def time_again(case: Case, method: Method, cfg: SweepConfig, res: Result,
               samples: Dict[str, List[float]]) -> None:
    """A later CPU timing pass of a method that :func:`run_one` measured: fresh inputs, a
    warm-up step, this pass's step times added to ``samples``, and ``res``'s times set to
    the medians over every pass so far. A failure here ends the method's passes (its
    earlier passes stand)."""
    if not samples:
        return
    holder: list = [None]
    try:
        fn = method.build(case, cfg.device)
        fwd_bwd = _fwd_bwd_step(fn, holder)
        holder[0] = _make_inputs(case, cfg).set_requires_grad(True)
        fwd_bwd()
        holder[0].zero_grads()
        res.fwd_bwd_ms = _time(fwd_bwd, holder, case, cfg, grads=True,
                               samples=samples["fwd_bwd"])
        if samples["fwd"]:
            holder[0].zero_grads()
            fwd = _fwd_step(fn, holder[0])
            fwd()
            res.fwd_ms = _time(fwd, holder, case, cfg, grads=False, samples=samples["fwd"])
    except KeyboardInterrupt:
        raise
    except BaseException:  # noqa: BLE001 - the earlier passes' times stand
        samples.clear()
    finally:
        holder[0] = None
        measure.free_memory(cfg.device)
    _ratios(res)


def measure_ceilings(cases: Sequence[Case], cfg: SweepConfig, info: RunInfo) -> None:
    """Copy bandwidth and the matmul rate of every dtype in ``cases`` (and bf16 on CUDA)."""
    dev = cfg.device
    info.copy_bytes_per_s = measure.copy_bandwidth(dev)
    dtypes = {c.dtype for c in cases}
    if dev.type == "cuda":
        dtypes.add(torch.bfloat16)
    for dt in sorted(dtypes, key=str):
        info.matmul_flops[_dtname(dt)] = measure.matmul_rate(dev, dt)


def run_sweep(cases: Sequence[Case], methods: Sequence[Method], cfg: SweepConfig
              ) -> tuple:
    """Measure every applicable method on every case.

    Returns:
        (results: list of Result, info: RunInfo)
    """
    import fusedce

    dev = cfg.device
    ws = 1
    if cfg.group is not None:
        import torch.distributed as dist

        ws = dist.get_world_size(cfg.group)
    info = RunInfo(device=str(dev), device_name=device_name(dev), torch=torch.__version__,
                   triton=_triton_version(), python=platform.python_version(),
                   date=datetime.datetime.now().isoformat(timespec="seconds"), world_size=ws)
    info.notes.append("fusedce runs with validation off (fusedce.set_validation(False)), "
                      "as in production")
    t_start = time.perf_counter()
    if cfg.ceilings:
        measure_ceilings(cases, cfg, info)
    plan = []
    for case in cases:
        runs = []
        for m in methods:
            if not m.applies(case):
                continue
            why = cfg.exclude.get((m.name, case.op)) or m.unavailable(case, dev)
            if why is None:
                runs.append(m)
            else:
                key = m.name if (m.name, case.op) not in cfg.exclude else \
                    f"{m.name} for {case.op}"
                info.skipped.setdefault(key, why)
        plan.append((case, runs))
    bar = Progress(sum(len(r) for _, r in plan), enabled=cfg.progress)
    results: List[Result] = []
    try:
        with fusedce.validation(False):
            for case, runs in plan:
                ref = None
                if cfg.error and runs:
                    try:
                        ref = _reference(case, cfg)
                    except Exception as exc:  # noqa: BLE001
                        if measure.is_oom(exc):
                            info.notes.append(f"{case.op} {case.shape_str}: fp64 reference OOM")
                        else:
                            info.notes.append(f"{case.op} {case.shape_str}: reference failed: "
                                              f"{exc}")
                        measure.free_memory(dev)
                passes = cfg.cpu_passes if _interleaved(case, cfg) else 1
                kept = []
                for m in runs:
                    bar.step(f"{case.op} {case.shape_str} {case.dtype_str} {m.name}")
                    samples: Optional[dict] = {} if passes > 1 else None
                    res = run_one(case, m, cfg, ref, info, samples)
                    results.append(res)
                    kept.append((m, res, samples))
                    bar.advance()
                for p in range(1, passes):
                    # the methods' order rotated from pass to pass
                    for m, res, samples in kept[p % len(kept):] + kept[:p % len(kept)]:
                        time_again(case, m, cfg, res, samples)
                del ref
                measure.free_memory(dev)
    finally:
        bar.close()
    info.wall_s = time.perf_counter() - t_start
    return results, info


def results_as_dicts(results: Sequence[Result]) -> List[dict]:
    return [asdict(r) for r in results]
