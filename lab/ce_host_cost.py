"""Where the default CE call's time goes with validation on (GPU, bf16, new gradient buffer):
the step timed as do_bench times it (an L2 flush, then events around one step) with
validation off and on, with and without the backend's target scan (one kernel for the
extremes and the mean's count; without it, torch ops), and on without the host's wait for
the check; and the host time of the forward call and of the backward with the GPU idle
before each.

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


def variants():
    """name -> (validation, target scan on, host waits for the check)."""
    return {"off": (False, True, True), "off, no scan": (False, False, True),
            "on": (True, True, True), "on, no scan": (True, False, True),
            "on, no wait": (True, True, False)}


def _no_wait(self):
    self._pending = None


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

    from fusedce.triton import backend as tb

    scan, finish = tb.target_scan, val.TargetCheck.finish
    for rnd in range(2):
        for name, (on, use_scan, wait) in variants().items():
            fce.set_validation(on)
            tb.target_scan = scan if use_scan else (lambda t, ii: None)
            val.TargetCheck.finish = finish if wait else _no_wait
            for _ in range(3):
                x.grad = None
                step()
            ms = measure.time_cuda(step, grad_to_none=[x])
            hf, hb = host_times(x, t)
            print(f"  {name:18s} step {ms * 1e3:7.1f} us = {ms / floor:.3f}x   host: forward "
                  f"{hf:6.1f} us, backward {hb:6.1f} us")
    tb.target_scan, val.TargetCheck.finish = scan, finish


if __name__ == "__main__":
    main()
