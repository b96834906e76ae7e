"""Where the fused linear CE loses time against the 3-GEMM floor: the three GEMMs of one
chunk timed alone over a grid of row counts (--grid), and linear_cross_entropy over a grid of
chunk sizes.

Per (N, D, V) and rows M (bf16): the logits GEMM X = H_M W^T (M x V x D), dH = dX W
(M x D, K = V: few output tiles, so its rate depends on M) and dW += dX^T H_M (V x D, K = M:
a read-modify-write of dW), as TFLOP/s against the 8192^3 matmul rate of the same run.
Then forward+backward of linear_cross_entropy (x the 3-GEMM floor) for each chunk size, with
the gradients compared against the first one's.

Usage: PYTHONPATH=src python benchmarks/linear_probe.py [--grid]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import fusedce as fce  # noqa: E402

GRID = {(8192, 2304, 256000): (256, 384, 448, 512, 576, 640, 768, 896, 960, 1024),
        (8192, 4096, 128256): (512, 640, 768, 1024, 1152, 1280, 1536, 1664, 2048)}
# chunk rows of the whole function (run 65: dH in row blocks, DH_ROWS, was tried and lost)
CHUNKS = {(8192, 2304, 256000): ("auto", 832, 896, 960, 1024),
          (8192, 4096, 128256): ("auto", 1152, 1280, 1536, 1664, 1792, 1920, 2048)}


def bench(fn, rep=120):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def gemm_grid(N, D, V, rate, rows):
    bf = torch.bfloat16
    H = torch.randn(N, D, device="cuda", dtype=bf)
    W = torch.randn(V, D, device="cuda", dtype=bf) / D ** 0.5
    dw = torch.empty(V, D, device="cuda", dtype=bf)
    x = torch.randn(max(rows), V, device="cuda", dtype=bf) * 1e-3
    dh = torch.empty(max(rows), D, device="cuda", dtype=bf)
    out = []
    for M in rows:
        flop = 2 * M * D * V
        t_l = bench(lambda: torch.mm(H[:M], W.t(), out=x[:M]))
        t_h = bench(lambda: torch.mm(x[:M], W, out=dh[:M]))
        t_w = bench(lambda: dw.addmm_(x[:M].t(), H[:M]))
        tf = [flop / (v * 1e-3) / 1e12 for v in (t_l, t_h, t_w)]
        out.append((M, t_l, t_h, t_w, tf))
        print(f"{N}x{D}x{V} M={M}: ms {t_l:.3f} {t_h:.3f} {t_w:.3f}  TF/s "
              + " ".join(f"{v:.0f}" for v in tf), flush=True)
    return out


def full(N, D, V, rate, chunks):
    bf = torch.bfloat16
    torch.manual_seed(0)
    H = torch.randn(N, D, device="cuda", dtype=bf)
    W = torch.randn(V, D, device="cuda", dtype=bf) / D ** 0.5
    t = torch.randint(0, V, (N,), device="cuda")
    floor = 6 * N * D * V / (rate * 1e12) * 1e3
    ref = None
    out = []
    for chunk in chunks:
        hh = H.detach().requires_grad_(True)
        ww = W.detach().requires_grad_(True)

        def fb():
            hh.grad = ww.grad = None
            fce.linear_cross_entropy(hh, ww, t, chunk_size=chunk).backward()

        fb()
        g = (hh.grad.clone(), ww.grad.clone())
        if ref is None:
            ref = g
        err = max(float((a.float() - b.float()).abs().max() / b.float().abs().max())
                  for a, b in zip(g, ref))
        ms = bench(fb, rep=800)
        out.append((chunk, ms, ms / floor, err))
        print(f"{N}x{D}x{V} chunk={chunk}: {ms:.2f} ms {ms / floor:.3f}x err={err:.1e}",
              flush=True)
    return out


def main():
    fce.set_validation(False)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    rate = 2 * 8192 ** 3 / (bench(lambda: a @ a, rep=400) * 1e-3) / 1e12
    print(f"matmul 8192^3 bf16: {rate:.0f} TFLOP/s", flush=True)
    a = None
    grids, fulls = {}, {}
    for shape, rows in GRID.items() if "--grid" in sys.argv else ():
        grids[shape] = gemm_grid(*shape, rate, rows)
        torch.cuda.empty_cache()
    for shape, chunks in CHUNKS.items():
        fulls[shape] = full(*shape, rate, chunks)
        torch.cuda.empty_cache()
    print("\n| shape | M | logits ms | dH ms | dW+= ms | TF/s logits / dH / dW+= |")
    for shape, rows in grids.items():
        for M, t_l, t_h, t_w, tf in rows:
            print(f"| {'x'.join(map(str, shape))} | {M} | {t_l:.3f} | {t_h:.3f} | {t_w:.3f} | "
                  + " / ".join(f"{v:.0f}" for v in tf) + " |")
    print("\n| shape | chunk rows | fb ms | x floor | grads vs the first (normwise) |")
    for shape, rows in fulls.items():
        for chunk, ms, x, err in rows:
            print(f"| {'x'.join(map(str, shape))} | {chunk} | {ms:.2f} | {x:.3f} | {err:.1e} |")


if __name__ == "__main__":
    main()
