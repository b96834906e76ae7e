"""Multi-process test harness: run one function on W ranks of a fresh process group.

    results = run_ranks(fn, world_size, *args)      # [fn(ctx, *args) for each rank]

spawns ``world_size`` processes (torch.multiprocessing, "spawn"), initialises a process
group in each (gloo on the CPU by default; ``backend="nccl"`` or FUSEDCE_DIST_BACKEND=nccl
puts rank r on cuda:r), calls ``fn(ctx, *args)`` with a :class:`RankContext`, and returns
the per-rank results in rank order. A rank that raises, dies or stops making progress fails
the call: the AssertionError carries every failing rank's traceback and, on a timeout, the
last label each rank passed to :func:`progress` (so a hang names its case). ``fn`` and its
arguments must be picklable (module-level functions of an importable module).

Spawning costs a few seconds (each rank imports torch): run many cases per call.
"""

from __future__ import annotations

import os
import queue as queue_mod
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, List, Optional

import torch
import torch.multiprocessing as mp

ENV_BACKEND = "FUSEDCE_DIST_BACKEND"

_progress_queue = None
_progress_rank = None


@dataclass
class RankContext:
    """What a rank function gets: its rank, the world size, backend and device."""

    rank: int
    world_size: int
    backend: str
    device: torch.device


def default_backend() -> str:
    """The process-group backend for tests: $FUSEDCE_DIST_BACKEND, else gloo."""
    return os.environ.get(ENV_BACKEND, "gloo").strip().lower() or "gloo"


def progress(label: str) -> None:
    """Record (from inside a rank) what the rank is doing now; named on a timeout."""
    if _progress_queue is not None:
        _progress_queue.put(("progress", _progress_rank, label))


def _entry(rank, world_size, backend, init_file, timeout_s, fn, args, q):
    global _progress_queue, _progress_rank
    _progress_queue, _progress_rank = q, rank
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        else:
            device = torch.device("cpu")
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))
        try:
            out = fn(RankContext(rank, world_size, backend, device), *args)
        finally:
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group must not hide the result
                pass
        q.put(("result", rank, out))
    except BaseException:  # noqa: BLE001 - everything is reported to the parent
        q.put(("error", rank, traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any,
              backend: Optional[str] = None, timeout: float = 240.0,
              grace: float = 15.0) -> List[Any]:
    """Run ``fn(ctx, *args)`` on ``world_size`` fresh ranks; return their results.

    Args:
        fn: module-level function (RankContext, *args) -> picklable result.
        world_size: number of ranks (processes).
        backend: "gloo" or "nccl" (default: :func:`default_backend`).
        timeout: seconds for the whole run before the ranks are killed.
        grace: once a rank failed, seconds the others get to finish before they are killed
            (they are likely blocked in a collective the failed rank never joined).
    Returns:
        [result of rank 0, ..., result of rank W-1].
    Raises:
        AssertionError with every failing rank's traceback (or its last progress label
        when it hung or died).
    """
    backend = backend or default_backend()
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise RuntimeError(f"nccl with {world_size} ranks needs {world_size} GPUs, "
                           f"found {torch.cuda.device_count()}")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "pg_init")
        procs = [ctx.Process(target=_entry, daemon=True,
                             args=(r, world_size, backend, init_file, timeout, fn, args, q))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results: dict = {}
        errors: dict = {}
        last: dict = {}
        dead_since: dict = {}
        deadline = time.monotonic() + timeout
        try:
            while len(results) + len(errors) < world_size:
                now = time.monotonic()
                if now > deadline:
                    break
                try:
                    kind, rank, payload = q.get(timeout=min(1.0, deadline - now))
                except queue_mod.Empty:
                    # a rank that died without reporting (segfault, os._exit); its last
                    # message may still be in flight, so wait a little before saying so
                    for r, p in enumerate(procs):
                        if p.is_alive() or r in results or r in errors:
                            continue
                        first = dead_since.setdefault(r, now)
                        if now - first > 3.0:
                            errors[r] = (f"rank {r} died with exit code {p.exitcode} "
                                         f"(last progress: {last.get(r)!r})")
                            deadline = min(deadline, time.monotonic() + grace)
                    continue
                if kind == "progress":
                    last[rank] = payload
                elif kind == "result":
                    results[rank] = payload
                else:
                    errors[rank] = payload
                    deadline = min(deadline, time.monotonic() + grace)
        finally:
            for p in procs:
                p.join(timeout=0.1 if errors or len(results) < world_size else 5.0)
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5.0)
        missing = [r for r in range(world_size) if r not in results and r not in errors]
        if errors or missing:
            lines = [f"run_ranks({getattr(fn, '__name__', fn)}, world_size={world_size}, "
                     f"backend={backend}) failed:"]
            for r in sorted(errors):
                lines.append(f"--- rank {r} raised:\n{errors[r]}")
            for r in missing:
                lines.append(f"--- rank {r} timed out or hung (last progress: {last.get(r)!r})")
            raise AssertionError("\n".join(lines))
        return [results[r] for r in range(world_size)]
