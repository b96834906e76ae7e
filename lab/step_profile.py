"""The GPU kernels of one fusedce forward + backward step, in place and into a new gradient
buffer (bf16, N = 16384), from torch.profiler: what the end-to-end call runs beside the fused
kernel, and how long each kernel takes.

Usage: PYTHONPATH=src python benchmarks/step_profile.py [--V 32000,128256]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))
import fusedce as fce  # noqa: E402,I001
from oplog import OpLog, launches  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--V", default="32000,128256")
    ap.add_argument("--N", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    fce.set_validation(False)  # the production setting, as ce_gpu
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for V in [int(v) for v in args.V.split(",")]:
        src = (torch.randn(args.N, V, device="cuda") * 2).to(torch.bfloat16)
        t = torch.randint(0, V, (args.N,), device="cuda")
        x = src.clone().requires_grad_(True)
        for inplace in (True, False):
            def step():
                x.grad = None
                if inplace:
                    with torch.no_grad():
                        x.copy_(src)
                flush.zero_()
                fce.cross_entropy(x, t, inplace_backward=inplace).backward()

            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with OpLog(keep=launches) as log:
                loss = fce.cross_entropy(x, t, inplace_backward=inplace)
                n_fwd = len(log.ops)
                loss.backward()
            ops = [o.replace("aten.", "").replace(".default", "") for o in log.ops]
            print(f"\n== V={V} {'in place' if inplace else 'new buffer'}: aten ops, forward "
                  f"{ops[:n_fwd]}, backward {ops[n_fwd:]}")
            x.grad = None
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(args.steps):
                    step()
                torch.cuda.synchronize()
            print(f"\n== V={V} {'in place' if inplace else 'new buffer'} "
                  f"(per step, {args.steps} steps)")
            rows = []
            for ev in prof.key_averages():
                if ev.device_type == torch.autograd.DeviceType.CUDA or getattr(
                        ev, "self_device_time_total", 0) > 0:
                    us = getattr(ev, "self_device_time_total", None)
                    if us is None:
                        us = ev.self_cuda_time_total
                    rows.append((us / args.steps, ev.count / args.steps, ev.key[:90]))
            for us, cnt, key in sorted(rows, reverse=True):
                print(f"{us:9.1f} us  x{cnt:4.1f}  {key}")
        del src, x, t
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
