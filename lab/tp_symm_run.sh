#!/usr/bin/env bash
# Vocab-parallel CE on 2 GPUs: the in-kernel statistics exchange (symmetric memory) against
# the all-gather path, the shard alone and the peers; then the NCCL suite on the exchange.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >/dev/null 2>&1
fi
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/tests
timeout -k 5 ${TP_S:-300} torchrun --nproc-per-node 2 benchmarks/tp_gpu.py --iters ${ITERS:-20} \
  --methods "${METHODS:-local_inplace,selfpeer_inplace,fusedce_inplace,fusedce_gather_inplace,fusedce,liger,megatron}" \
  --configs "${CONFIGS:-}" 2>&1 | grep -v -i warn | tail -${TAIL:-40}
if [ -z "$NO_TESTS" ]; then
  FUSEDCE_DIST_BACKEND=nccl FUSEDCE_TP_EXCHANGE=symm timeout -k 5 150 python3 -m pytest -q \
    -p no:cacheprovider tests/test_distributed.py 2>&1 | grep -E "^E  |passed|failed|Error" | tail -30
fi
