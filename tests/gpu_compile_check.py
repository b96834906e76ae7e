"""One torch.compile'd cross_entropy called over new shapes on a GPU, in bf16, with
smoothing, z-loss and ignored rows, with and without inplace_backward, against eager calls.
Exits 1 on the first mismatch.

Run by tests/test_gpu.py in a subprocess, because the way the ops are registered
(FUSEDCE_COMPILE_OPS=opaque, the default, or triton_op) is fixed when fusedce is imported.
By hand:
    FUSEDCE_COMPILE_OPS=opaque PYTHONPATH=src:tests python tests/gpu_compile_check.py [dynamic]
"""

from __future__ import annotations

import sys

import torch

import fusedce as fce
from oracle import assert_close_normwise

SHAPES = ((256, 32000), (384, 32000), (320, 50257), (512, 131072))


def _data(n, V, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(n, V, device="cuda", generator=gen) * 2.0).to(torch.bfloat16)
    t = torch.randint(0, V, (n,), device="cuda", generator=gen)
    t[::10] = -100
    return x, t


def main() -> int:
    dynamic = None if "dynamic" in sys.argv[1:] else False
    kw = {"label_smoothing": 0.1, "z_loss": 1e-4}
    for inplace in (False, True):
        def f(x, t, inplace=inplace):
            return fce.cross_entropy(x, t, backend="triton", inplace_backward=inplace, **kw)

        torch._dynamo.reset()
        cf = torch.compile(f, fullgraph=True, dynamic=dynamic)
        with fce.validation(False):
            for n, V in SHAPES:
                x, t = _data(n, V, seed=n)
                grads, losses = [], []
                for fn in (cf, f):
                    leaf = x.clone().requires_grad_(True)
                    xi = leaf.clone() if inplace else leaf
                    loss = fn(xi, t)
                    (loss * 3.0).backward()
                    losses.append(loss.detach())
                    grads.append(leaf.grad)
                assert_close_normwise(losses[0], losses[1], 1e-6, f"loss {n} {V} {inplace}")
                assert_close_normwise(grads[0], grads[1], 1e-6, f"grad {n} {V} {inplace}")
                print(f"ok: N={n} V={V} inplace={inplace}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
