"""The timeline of one default cross_entropy step on a GPU (forward + backward, bf16, new
gradient buffer, validation on and off): when the host launches each kernel and when the GPU
runs it, measured from the end of an L2 flush as do_bench times a step. Shows where the GPU
waits for the host.

Usage: PYTHONPATH=src python lab/ce_timeline.py [--V 32000] [--N 16384]
"""

from __future__ import annotations

import argparse
import torch
from torch.profiler import ProfilerActivity, profile

import fusedce as fce
from fusedce.bench import measure


def step_fn(x, t):
    def step():
        fce.cross_entropy(x, t).backward()
    return step


def timed(step, x):
    """Median ms of one step as do_bench times it (an L2 flush, then events around it)."""
    return measure.time_cuda(step, grad_to_none=[x])


def timeline(step, x, flush):
    for _ in range(3):
        x.grad = None
        step()
    torch.cuda.synchronize()
    x.grad = None
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        flush.zero_()
        step()
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type.name == "CUDA"]
    evs.sort(key=lambda e: e.time_range.start)
    cpu = [e for e in prof.events() if e.device_type.name == "CPU"]
    t0 = min(e.time_range.start for e in cpu)
    launches = sorted((e.time_range.start - t0, e.name) for e in cpu
                      if "LaunchKernel" in e.name or "Memcpy" in e.name or "Memset" in e.name
                      or "EventSynchronize" in e.name or "StreamSynchronize" in e.name)
    print("  host calls (us from the first host event):")
    for ts, name in launches:
        print(f"    {ts:8.1f}  {name}")
    flush_end = evs[0].time_range.end
    print("  GPU (us from the flush's end): start, duration, kernel")
    prev = flush_end
    for e in evs[1:]:
        gap = e.time_range.start - prev
        print(f"    {e.time_range.start - flush_end:8.1f} {e.time_range.elapsed_us():8.1f}"
              f"  (idle {gap:6.1f})  {e.name[:70]}")
        prev = e.time_range.end


def setup():
    """(x, t, floor_ms) from --V / --N: bf16 logits that need a gradient, targets, and the
    forward + backward floor (a copy of the logits' bytes: one read + one write)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--V", type=int, default=32000)
    ap.add_argument("--N", type=int, default=16384)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.N, args.V, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, args.V, (args.N,), device="cuda")
    src = torch.empty(args.N * args.V * 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    floor_ms = timed(lambda: dst.copy_(src), x)
    print(f"{torch.cuda.get_device_name()}: floor (copy of the logits' bytes) "
          f"{floor_ms * 1e3:.1f} us")
    return x, t, floor_ms


def main():
    x, t, floor_ms = setup()
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    step = step_fn(x, t)
    for val in (True, False):
        fce.set_validation(val)
        ms = timed(step, x)
        print(f"validation {'on ' if val else 'off'}: {ms * 1e3:.1f} us = {ms / floor_ms:.3f}x")
    for val in (True, False):
        fce.set_validation(val)
        print(f"== timeline, validation {'on' if val else 'off'}")
        timeline(step, x, flush)


if __name__ == "__main__":
    main()
