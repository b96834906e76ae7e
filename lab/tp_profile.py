"""Where one vocab-parallel CE step spends its time (torchrun, one process per GPU).

Runs fusedce.cross_entropy(tp_group=...) forward+backward on bf16 logits [N, V/world] a few
times under torch.profiler and prints rank 0's CUDA kernel table; the sum of kernel times
against the step's wall time separates the kernels from the host glue and the collective.
"""

import os
import sys
import time

import torch
import torch.distributed as dist

import fusedce as fce


def main():
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    N = int(os.environ.get("N", 16384))
    V = int(sys.argv[1]) if len(sys.argv) > 1 else 128256
    vl = V // world
    fce.set_validation(False)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, vl, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    t = torch.randint(0, V, (N,), device="cuda")

    def step():
        x.grad = None
        fce.cross_entropy(x, t, tp_group=dist.group.WORLD).backward()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 10 * 1e3
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    if rank == 0:
        print(f"V={V} world={world} wall per step {wall:.3f} ms")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
