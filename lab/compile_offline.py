"""Compile fusedce's Triton kernels for an H100/H200 (sm_90) on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) runs a kernel's Python, so it never sees what only the
compiler rejects (a value whose type differs between the branches of a runtime ``if``, a
loop-carried value that changes type, an unsupported op on a layout); those show up on the
device, one costly call later. This script runs the real launchers on CPU tensors with
Triton's driver replaced by one that reports sm_90, and every launch replaced by
``JITFunction.warmup`` (compile, no launch), down to the cubin through the bundled ptxas.

Usage (the venv of the repo, no GPU; a CUDA build of torch is not needed):
    python tools/compile_offline.py [--V 1000,300000] [--split 4]
Prints one line per compiled case and exits 1 if any failed. Run it under the device's
Triton too (a venv with torch==2.13.0 triton==3.6.0 and PYTHONPATH=src): session 7 found a
layout-pass failure that only Triton 3.6 has (fused_rows._fold_group).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from dataclasses import replace

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))


class _Sm90Driver:
    """The parts of Triton's active driver that compiling asks for."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


class _Warm:
    """kernel[grid](*args, **kw) -> kernel.warmup(*args, grid=grid, **kw): compile only."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        def run(*args, **kw):
            k = self.kernel.warmup(*args, grid=grid, **kw)
            self.log.append((self.kernel.fn.__name__ if hasattr(self.kernel, "fn")
                             else str(self.kernel), sorted(getattr(k, "asm", {}).keys())))
            return k
        return run


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--V", default="1000,300000")
    ap.add_argument("--split", type=int, default=0, help="force a SPLIT part count")
    ap.add_argument("--hints", type=int, default=-1,
                    help="the table's entry with this hints mode (RowsConfig.hints)")
    args = ap.parse_args()
    from triton.runtime.driver import driver

    from fusedce.triton import ce

    driver.set_active(_Sm90Driver())
    log: list = []
    ce._launcher = lambda k: _Warm(k, log)
    ce._sm_count = lambda device: 132
    if args.split:
        from fusedce.triton import fused_rows

        fused_rows.MAX_SPLIT = max(fused_rows.MAX_SPLIT, args.split)
        cfg = ce.RowsConfig(block=8192, num_warps=16, per_sm=2, prefetch=True, reverse=False,
                            tvec=False, split=args.split, peer_split=True)
        ce.set_override(fused=cfg)
    bad = 0
    for V in [int(v) for v in args.V.split(",")]:
        if args.hints >= 0:
            ce.set_override(fused=None)
            ce.set_override(fused=replace(ce.fused_config(V, 2), hints=args.hints))
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(1, 64, V).to(dtype)
            t = torch.randint(0, V, (64,))
            cases = {
                "fused_loss in place": lambda: ce.tr_fused_loss(
                    x, t, None, None, None, x, -100, V, 0.0, 0.0, 1.0, None, False, 1),
                "fused_loss all options": lambda: ce.tr_fused_loss(
                    x, t, torch.rand(V), torch.rand(()), None, torch.empty_like(x), -100, V,
                    0.1, 1e-4, 1.0, 30.0, True, 1),
                "TP exchange (PEER), 2 ranks": lambda: ce.tr_fused_loss_peer(
                    x, t, torch.zeros(2, 2 * ce.peer_parts(2 * V, 2, x.element_size()), 64, 8,
                                      dtype=torch.int64),
                    torch.zeros(2, dtype=torch.int64), 0, 2, 1, None, None, None, x, 0, -100,
                    2 * V, 0.0, 0.0, 1.0, None, False, 1, True),
                "loss rows (no grad)": lambda: ce.tr_loss_rows(
                    x, t, None, None, None, -100, V, 0.0, 0.0, 1.0, None, False, 1),
            }
            for name, fn in cases.items():
                n0 = len(log)
                try:
                    fn()
                    done = [f"{k} ({'+'.join(a)})" for k, a in log[n0:]]
                    print(f"ok   V={V} {str(dtype)[6:]:<9} {name}: {', '.join(done)}")
                except Exception as exc:  # noqa: BLE001 - report every case
                    if len(log) > n0:
                        print(f"ok?  V={V} {name}: compiled {log[n0:]}, then {exc!r:.200}")
                        continue
                    bad += 1
                    print(f"FAIL V={V} {str(dtype)[6:]} {name}: {type(exc).__name__}")
                    traceback.print_exc(limit=3)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
