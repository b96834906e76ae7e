"""Where the host time of the default cross_entropy call goes on a GPU host (bf16, new
gradient buffer, validation on and off): cProfile of the forward calls and of the backward
calls separately, the GPU synchronised between them, sorted by own time.

Usage: PYTHONPATH=src python lab/ce_host_cprofile.py [--V 32000] [--N 16384]
"""

from __future__ import annotations

import cProfile
import io
import pstats

import torch

import fusedce as fce

import ce_timeline  # noqa: E402  (beside this file)


def run(x, t, calls=200):
    fw, bw = cProfile.Profile(), cProfile.Profile()
    for _ in range(calls):
        x.grad = None
        torch.cuda.synchronize()
        fw.enable()
        loss = fce.cross_entropy(x, t)
        fw.disable()
        torch.cuda.synchronize()
        bw.enable()
        loss.backward()
        bw.disable()
    torch.cuda.synchronize()
    return fw, bw


def table(prof, calls, rows=32):
    out = io.StringIO()
    st = pstats.Stats(prof, stream=out)
    print(f"    total {st.total_tt / calls * 1e6:.1f} us per call")
    st.sort_stats("tottime").print_stats(rows)
    print("\n".join("    " + ln for ln in out.getvalue().splitlines()[6:] if ln.strip()))


def main():
    x, t, _ = ce_timeline.setup()
    for on in (True, False):
        fce.set_validation(on)
        run(x, t, 20)
        fw, bw = run(x, t)
        print(f"== validation {'on' if on else 'off'}: forward")
        table(fw, 200)
        print(f"== validation {'on' if on else 'off'}: backward")
        table(bw, 200)


if __name__ == "__main__":
    main()
