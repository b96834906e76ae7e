"""Where the default CE call's time goes with validation on (GPU, bf16, new gradient buffer):
the step timed as do_bench times it (an L2 flush, then events around one step) with the
target-range check in four forms, and the host time of the forward call and of the backward
with the GPU idle before each. Variants: off; on (extremes queued, host waits for the event
after the loss kernels are queued); on without the wait (extremes and copy only); on with
the extremes only (no copy, no wait).

Usage: PYTHONPATH=src python lab/ce_host_cost.py [--V 32000] [--N 16384]
"""

from __future__ import annotations

import statistics
import time

import torch

import fusedce as fce
from fusedce import validation as val
from fusedce.bench import measure

import ce_timeline  # noqa: E402  (beside this file)


REAL = val.start_target_range


def variants():
    real = REAL

    def no_wait(target, vocab_size, ignore_index, name="target"):
        fin = real(target, vocab_size, ignore_index, name)
        return None if fin is None else (lambda: None)

    def extremes_only(target, vocab_size, ignore_index, name="target"):
        if target.numel() == 0 or not val.syncing():
            return None
        val._extremes(target.reshape(-1), ignore_index)
        return None

    return {"off": (False, real), "on": (True, real), "on, no wait": (True, no_wait),
            "on, extremes only": (True, extremes_only)}


def host_times(x, t, reps=50):
    fw, bw = [], []
    for _ in range(reps):
        x.grad = None
        torch.cuda.synchronize()
        a = time.perf_counter()
        loss = fce.cross_entropy(x, t)
        b = time.perf_counter()
        torch.cuda.synchronize()
        c = time.perf_counter()
        loss.backward()
        d = time.perf_counter()
        torch.cuda.synchronize()
        fw.append(b - a)
        bw.append(d - c)
    return statistics.median(fw) * 1e6, statistics.median(bw) * 1e6


def main():
    x, t, floor = ce_timeline.setup()

    def step():
        fce.cross_entropy(x, t).backward()

    import fusedce.functional as fn
    for rnd in range(2):
        for name, (on, start) in variants().items():
            fce.set_validation(on)
            fn._v.start_target_range = start
            for _ in range(3):
                x.grad = None
                step()
            ms = measure.time_cuda(step, grad_to_none=[x])
            hf, hb = host_times(x, t)
            print(f"  {name:18s} step {ms * 1e3:7.1f} us = {ms / floor:.3f}x   host: forward "
                  f"{hf:6.1f} us, backward {hb:6.1f} us")
    fn._v.start_target_range = REAL


if __name__ == "__main__":
    main()
