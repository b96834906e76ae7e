#!/usr/bin/env bash
# One device call: GPU tests, the CE benchmark (benchmarks/ce_gpu.py, optional fused-kernel
# sweep with FUSED_SWEEP=configs), NCCL tests, the vocab-parallel benchmark (2 GPUs) and `fusedce bench
# --preset perf` (GPU 0), peers installed from carried wheels; everything tarred into $OUT.
# PARTS (default all: tests,host,ce,sweep,nccl,tp,bench) picks parts, to fit one device call.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/tests
R=${OUT:-/tmp/out}/run; mkdir -p "$R"
PARTS=${PARTS:-tests,host,ce,sweep,nccl,tp,bench}
want() { case ",$PARTS," in *",$1,"*) return 0;; esac; return 1; }
nvidia-smi -L | tee "$R/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$R/device.txt"
want tests && FUSEDCE_VERIFY_LAUNCH=1 timeout ${GPU_TESTS_S:-480} python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_launch.py tests/test_triton_kernels.py tests/test_core.py 2>&1 | grep -E "^(FAILED|XPASS|ERROR)|passed|failed" | tail -12 | tee "$R/gpu_tests.log"
want host && timeout 90 python3 lab/host_profile.py 2>&1 | grep -E "^==|Self CPU time total|cudaLaunchKernel|cuLaunchKernelEx" | tee "$R/host_profile.log"
want ce && timeout ${CE_GPU_S:-150} python3 benchmarks/ce_gpu.py 2>&1 | grep -v -i warn | tail -40 | tee "$R/ce_gpu.log"
if want sweep && [ -n "$FUSED_SWEEP" ]; then
  timeout 120 python3 lab/fused_sweep.py --V "${SWEEP_V:-128256,262144}" --configs "$FUSED_SWEEP" 2>&1 | grep -v -i warn | tail -12 | tee "$R/fused_sweep.log"
fi
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  want nccl && for ex in symm nccl; do  # the in-kernel exchange, then the all-gather path
    echo "FUSEDCE_TP_EXCHANGE=$ex" | tee -a "$R/nccl_tests.log"
    FUSEDCE_VERIFY_LAUNCH=1 FUSEDCE_DIST_BACKEND=nccl FUSEDCE_TP_EXCHANGE=$ex timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_distributed.py 2>&1 | grep -E "^E  |passed|failed" | tail -40 | tee -a "$R/nccl_tests.log"
  done
  want tp && timeout 200 torchrun --nproc-per-node 2 benchmarks/tp_gpu.py 2>&1 | grep -v -i -E "warn|variant" | tail -28 | tee "$R/tp.log"
fi
want bench && timeout ${BENCH_CE_S:-240} python3 -m fusedce.cli bench --preset perf --op cross_entropy --out "$R/ce" --markdown "$R/ce/table.md" 2>&1 | tail -30 | tee "$R/bench_ce.log"
want bench && timeout ${BENCH_LIN_S:-150} python3 -m fusedce.cli bench --preset perf --op linear_cross_entropy --no-plots --out "$R/lin" --markdown "$R/lin/table.md" 2>&1 | tail -20 | tee "$R/bench_lin.log"
tar -C "$R/.." -czf "${OUT:-/tmp/out}/results.tgz" run
