"""Timing, peak-memory and ceiling measurements for the benchmark (CPU and CUDA).

Time: on CUDA, ``triton.testing.do_bench(step, return_mode="median")`` (device events, L2
flushed between repetitions, gradients set to None between steps); on the CPU, the median
of repeated wall-clock times ``perf_counter`` around one synchronous step.

Peak extra memory of one step, relative to what was live just before it (inputs count as
"before"):

    CUDA:  max_memory_allocated() - memory_allocated()_before    (after reset_peak_memory_stats)
    CPU:   max_k sum_{i <= k} b_i  over the allocator events b_i (+bytes on allocation,
           -bytes on free) recorded in order by torch.profiler(profile_memory=True)

so both count every tensor allocated during the step (gradients that outlive it included)
at the moment the live total peaked.

Ceilings, measured in the same run:

    copy bandwidth  B = 2 * bytes(buf) / t(dst.copy_(src))     (bytes read + bytes written)
    matmul rate     F = 2 * M^3 / t(A @ B)                    (A, B: M x M in the given dtype)
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import time
from typing import Callable, List, Optional, Sequence

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- time


def time_cpu(step: Callable[[], None], *, min_time_s: float = 0.2, min_reps: int = 3,
             max_reps: int = 50, warmup: int = 0, reset: Optional[Callable[[], None]] = None
             ) -> List[float]:
    """Wall-clock times (ms) of ``step``: at least ``min_reps`` runs and ``min_time_s`` seconds.

    Args:
        step: one synchronous step.
        reset: called between steps, outside the timed region (e.g. ``x.grad = None``).
    Returns:
        The list of per-step times in milliseconds (take the median).
    """
    for _ in range(warmup):
        step()
        if reset is not None:
            reset()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps
                                     or time.perf_counter() - start < min_time_s):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
        if reset is not None:
            reset()
    return times


def time_cuda(step: Callable[[], None], *, grad_to_none: Sequence[torch.Tensor] = (),
              warmup_ms: float = 25.0, rep_ms: float = 100.0, min_reps: int = 5) -> float:
    """Median device time (ms) of ``step`` with ``triton.testing.do_bench``.

    The time budgets grow with the step so that a slow step still gets ``min_reps``
    repetitions (do_bench alone would time a 60 ms step once within 100 ms).
    """
    from triton.testing import do_bench

    a = torch.cuda.Event(enable_timing=True)
    b = torch.cuda.Event(enable_timing=True)
    a.record()
    step()
    b.record()
    torch.cuda.synchronize()
    for t in grad_to_none:
        t.grad = None
    est = a.elapsed_time(b)
    kwargs = dict(warmup=max(warmup_ms, est), rep=max(rep_ms, min_reps * est),
                  grad_to_none=list(grad_to_none) or None)
    try:
        return float(do_bench(step, return_mode="median", **kwargs))
    except TypeError:  # older triton: no return_mode
        return float(do_bench(step, quantiles=[0.5], **kwargs))


def time_cuda_fixed(step: Callable[[], None], reps: int, *, warmup: int = 3,
                    reset: Optional[Callable[[], None]] = None) -> List[float]:
    """Per-step device times (ms) over exactly ``reps`` steps, timed with CUDA events.

    A fixed count (unlike do_bench's self-chosen one) keeps collective calls matched on
    every rank of a process group.
    """
    for _ in range(warmup):
        step()
        if reset is not None:
            reset()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        if reset is not None:
            reset()
        out.append((a, b))
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in out]


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# ---------------------------------------------------------------------------- memory


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_host_bytes() -> Optional[int]:
    """Bytes of host memory a new allocation can still get; None where unknown.

    The smaller of the kernel's MemAvailable and what the cgroup limit (v2 or v1) leaves,
    since inside a container the cgroup's out-of-memory killer acts first.
    """
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        # v1 reports "no limit" as a huge number near 2**63
        if limit is not None and usage is not None and limit < 2**60:
            found.append(max(0, limit - usage))
            break
    return min(found) if found else None


@contextlib.contextmanager
def _quiet_stderr_fd():
    """Silence fd 2 (the profiler's native start/stop log lines), not Python exceptions."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cpu_peak_bytes(step: Callable[[], object]) -> tuple:
    """(peak, net) bytes allocated on the CPU by ``step`` beyond what was live before it.

    Integrates the profiler's allocation events in time order: ``peak`` is the highest live
    total reached during the step, ``net`` what is still live after it (e.g. a gradient).
    Returns (peak_bytes, net_bytes, result_of_step).
    """
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False)
    with _quiet_stderr_fd():
        prof.__enter__()
    try:
        result = step()
    finally:
        with _quiet_stderr_fd():
            prof.__exit__(None, None, None)
    events = []
    for e in prof.profiler.kineto_results.events():
        # only host allocations: a CUDA run never goes through this function
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"):
            events.append((e.start_ns(), e.nbytes()))
    events.sort(key=lambda ev: ev[0])
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, live, result


def cuda_peak_bytes(step: Callable[[], object], device: torch.device) -> tuple:
    """(peak, net, result): CUDA bytes allocated by ``step`` beyond what was live before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    net = torch.cuda.memory_allocated(device) - before
    return peak, net, result


def peak_bytes(step: Callable[[], object], device: torch.device) -> tuple:
    """(peak, net, result) on ``device`` (see :func:`cpu_peak_bytes`, :func:`cuda_peak_bytes`)."""
    if device.type == "cuda":
        return cuda_peak_bytes(step, device)
    return cpu_peak_bytes(step)


# ---------------------------------------------------------------------------- ceilings


def copy_bandwidth(device: torch.device, nbytes: Optional[int] = None) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    if nbytes is None:
        nbytes = (2 << 30) if device.type == "cuda" else (128 << 20)
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        ms = time_cuda(lambda: dst.copy_(src))
    else:
        ms = median(time_cpu(lambda: dst.copy_(src), min_time_s=0.15, min_reps=5, warmup=1))
    return 2.0 * n * 4 / (ms * 1e-3)


def matmul_rate(device: torch.device, dtype: torch.dtype, size: Optional[int] = None) -> float:
    """Measured dense matmul rate in FLOP/s for M x M x M in ``dtype`` (M=8192 on CUDA)."""
    if size is None:
        size = 8192 if device.type == "cuda" else 1024
    if device.type == "cpu" and dtype in (torch.float16,):
        dtype = torch.float32  # CPU fp16 GEMM is not a meaningful ceiling
    a = torch.randn(size, size, device=device, dtype=torch.float32).to(dtype)
    b = torch.randn(size, size, device=device, dtype=torch.float32).to(dtype)
    if device.type == "cuda":
        ms = time_cuda(lambda: a @ b)
    else:
        ms = median(time_cpu(lambda: a @ b, min_time_s=0.1, min_reps=3, warmup=1))
    return 2.0 * size ** 3 / (ms * 1e-3)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error (CUDA or host)."""
    if isinstance(exc, MemoryError):
        return True
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    msg = str(exc).lower()
    return "out of memory" in msg or "can't allocate memory" in msg or "cannot allocate" in msg


def free_memory(device: torch.device, collect: bool = False) -> None:
    """Return cached device blocks; ``collect`` also runs the (slow) cyclic GC.

    Tensors die by reference counting; a full gc pass (hundreds of ms once inductor is
    loaded) is only worth it after a failure, whose traceback may hold them in a cycle.
    """
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
