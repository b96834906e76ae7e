"""Print the AOTAutograd forward and backward graphs of a torch.compile'd fusedce call on a
machine without a GPU, to see how the kernels are functionalised: which arguments are cloned
(``tensors_to_clone``), what is saved for the backward, and what the backward launches.

How: meta tensors stand in for CUDA ones, and Triton's driver is replaced by one that reports
an sm_90 target, which is all that the mutation analysis and tracing need. Running the
compiled graph then fails (the Triton wrapper has no meta implementation). That is expected:
only the printed graphs matter.

Usage (a CUDA build of torch, e.g. torch 2.11 with triton 3.6 in a venv; no GPU needed):
    V=50257 N=320 python tools/aot_graphs_offline.py
"""

from __future__ import annotations

import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import fusedce as fce  # noqa: E402
import fusedce.functional as fnc  # noqa: E402
from fusedce.triton import ce  # noqa: E402


sys.path.insert(0, os.path.dirname(__file__))
from compile_offline import _Sm90Driver  # noqa: E402  (Triton's driver, reporting sm_90)


def _printer(tag: str):
    def compile_fn(gm, example_inputs):
        print(f"===== {tag} graph\n{gm.code}")
        return gm
    return compile_fn


def _partition(joint, inputs, **kw):
    from functorch.compile import min_cut_rematerialization_partition

    fw, bw = min_cut_rematerialization_partition(joint, inputs, **kw)
    print(f"===== backward graph (as partitioned)\n{bw.code}")
    return fw, bw


def main() -> None:
    from torch._dynamo.backends.common import aot_autograd
    from triton.runtime.driver import driver

    V = int(os.environ.get("V", "50257"))
    N = int(os.environ.get("N", "320"))
    fce.set_validation(False)
    ce._sm_count = lambda device: 132
    fnc._triton_interpreting = lambda: True  # let backend="triton" take meta tensors
    driver.set_active(_Sm90Driver())

    def f(x, t):
        return fce.cross_entropy(x, t, backend="triton", label_smoothing=0.1, z_loss=1e-4)

    backend = aot_autograd(fw_compiler=_printer("forward"), bw_compiler=_printer("backward"),
                           partition_fn=_partition)
    cf = torch.compile(f, fullgraph=True, dynamic=False, backend=backend)
    x = torch.empty(N, V, device="meta", dtype=torch.bfloat16).requires_grad_(True)
    t = torch.empty(N, device="meta", dtype=torch.int64)
    try:
        cf(x, t).backward()
    except Exception as exc:  # noqa: BLE001 - expected once the graphs are printed
        root = exc
        while root.__cause__ is not None:
            root = root.__cause__
        print("(stopped, as expected, at:", "".join(
            traceback.format_exception_only(type(root), root)).strip()[:300], ")")


if __name__ == "__main__":
    main()
