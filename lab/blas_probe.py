"""The chunk GEMMs of the fused linear CE (logits, dH, dW +=) under cuBLAS and cuBLASLt
(torch.backends.cuda.preferred_blas_library), and the whole function under each, x the
3-GEMM floor. Usage: PYTHONPATH=src python benchmarks/blas_probe.py"""

from __future__ import annotations

import torch
import triton.testing

import fusedce as fce


def bench(fn, rep=150):
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def main():
    fce.set_validation(False)
    bf = torch.bfloat16
    a = torch.randn(8192, 8192, device="cuda", dtype=bf)
    rate = 2 * 8192 ** 3 / (bench(lambda: a @ a, rep=400) * 1e-3) / 1e12
    print(f"matmul 8192^3 bf16 (default blas): {rate:.0f} TFLOP/s", flush=True)
    del a
    rows = []
    for (N, D, V), M in (((8192, 2304, 256000), 960), ((8192, 4096, 128256), 1664),
                         ((8192, 4096, 128256), 2048)):
        torch.manual_seed(0)
        H = torch.randn(N, D, device="cuda", dtype=bf)
        W = torch.randn(V, D, device="cuda", dtype=bf) / D ** 0.5
        dw = torch.randn(V, D, device="cuda", dtype=bf) * 1e-3
        x = torch.randn(M, V, device="cuda", dtype=bf) * 1e-3
        dh = torch.empty(M, D, device="cuda", dtype=bf)
        t = torch.randint(0, V, (N,), device="cuda")
        flop = 2 * M * D * V
        for lib in ("cublas", "cublaslt"):
            torch.backends.cuda.preferred_blas_library(lib)
            t_l = bench(lambda: torch.mm(H[:M], W.t(), out=x))
            t_h = bench(lambda: torch.mm(x, W, out=dh))
            t_w = bench(lambda: dw.addmm_(x.t(), H[:M]))
            t_w2 = bench(lambda: torch.addmm(dw, x.t(), H[:M], out=dw))
            tf = [flop / (v * 1e-3) / 1e12 for v in (t_l, t_h, t_w, t_w2)]
            msg = (f"{N}x{D}x{V} M={M} {lib}: TF/s logits {tf[0]:.0f} dH {tf[1]:.0f} "
                   f"dW+= {tf[2]:.0f} (addmm out= {tf[3]:.0f})")
            if M != 2048:
                hh = H.detach().requires_grad_(True)
                ww = W.detach().requires_grad_(True)

                def fb():
                    hh.grad = ww.grad = None
                    fce.linear_cross_entropy(hh, ww, t).backward()

                fb()
                ms = bench(fb, rep=600)
                floor = 6 * N * D * V / (rate * 1e12) * 1e3
                msg += f"; whole function {ms:.2f} ms = {ms / floor:.3f}x"
            print(msg, flush=True)
            rows.append(msg)
        torch.backends.cuda.preferred_blas_library("cublas")
        del H, W, dw, x, dh
        torch.cuda.empty_cache()
    print("\n".join(rows))


if __name__ == "__main__":
    main()
