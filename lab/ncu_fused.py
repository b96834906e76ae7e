"""One fused CE call (bf16, N = 16384) per V, in place or (``new``) into a new gradient
buffer, for Nsight Compute:

    ncu --kernel-name regex:_fused_rows_kernel --launch-skip 1 --launch-count 1 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \\
        python3 benchmarks/ncu_fused.py 262144 [new]
"""

import sys

import torch

sys.path.insert(0, "src")
import fusedce as fce  # noqa: E402

V = int(sys.argv[1]) if len(sys.argv) > 1 else 128256
INPLACE = not (len(sys.argv) > 2 and sys.argv[2] == "new")
N = 16384
fce.set_validation(False)
t = torch.randint(0, V, (N,), device="cuda")
for _ in range(2):  # the first launch compiles; ncu skips it
    x = (torch.randn(N, V, device="cuda") * 2).to(torch.bfloat16).requires_grad_(True)
    fce.cross_entropy(x, t, inplace_backward=INPLACE).backward()
torch.cuda.synchronize()
