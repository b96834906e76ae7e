"""The aten ops one Triton-backend call makes on the host, counted with a TorchDispatchMode on
the CPU (Triton launches stubbed out, as in host_proxy_cpu.py). On slow GPU hosts every op
costs ~10-20 us of host time before the kernel launch, so this count is what a host-bound
call at V = 32000 pays for (docs/kernels.md). tests/test_launch.py keeps the
counts from growing.

Usage: python benchmarks/host_ops.py
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import fusedce as fce  # noqa: E402
from fusedce.triton import launch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oplog import OpLog  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *a, **k: None


def calls(x: torch.Tensor, t: torch.Tensor) -> dict:
    """The public calls whose host cost matters, by name."""

    def nograd():
        with torch.no_grad():
            fce.cross_entropy(x, t, backend="triton")

    def logprobs():
        fce.logprobs(x, t, inference_only=True, backend="triton")

    def fb_inplace():
        xg = x.detach().requires_grad_(True)
        fce.cross_entropy(xg, t, backend="triton", inplace_backward=True).backward()

    def fb_new():
        xg = x.detach().requires_grad_(True)
        fce.cross_entropy(xg, t, backend="triton").backward()

    return {"no_grad": nograd, "logprobs inference_only": logprobs,
            "fb in place": fb_inplace, "fb new buffer": fb_new}


def count(fn) -> list:
    """The aten ops of one call of ``fn`` (after a warm-up call), launches stubbed out."""
    saved = launch.launcher
    launch.launcher = lambda kernel: _NoLaunch()
    try:
        with fce.validation(False):
            fn()
            with OpLog() as log:
                fn()
    finally:
        launch.launcher = saved
    return log.ops


def main():
    x = torch.randn(256, 64)
    t = torch.randint(0, 64, (256,))
    for name, fn in calls(x, t).items():
        ops = count(fn)
        print(f"{name}: {len(ops)} aten ops: {', '.join(o.replace('aten.', '') for o in ops)}")


if __name__ == "__main__":
    main()
