#!/bin/bash
# One device call: the target scan's GPU tests, the host-cost probe (validation off / on,
# with and without the scan), the CE benchmark at V = 32000, then the wider GPU suites
# while time remains. Writes its logs to $OUT.
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
lscpu | grep -E "Model name|^CPU\(s\)"
python -c "import torch, triton; print(torch.__version__, triton.__version__)"
FUSEDCE_VERIFY_LAUNCH=1 timeout 150 python -m pytest -q -x -p no:cacheprovider \
    tests/test_triton_kernels.py -k "target_scan or scans_targets or matches_oracle" 2>&1 | tail -3
(cd lab && PYTHONPATH=../src timeout 200 python ce_host_cost.py 2>&1 | tee $OUT/cost.txt)
(cd lab && PYTHONPATH=../src timeout 100 python ce_host_cprofile.py > $OUT/cprof.txt 2>&1)
timeout 150 python benchmarks/ce_gpu.py --V 32000 --no-peers --no-check 2>&1 | tail -22 | tee $OUT/ce.txt
FUSEDCE_VERIFY_LAUNCH=1 timeout "${SUITE_S:-150}" python -m pytest -q -x -p no:cacheprovider \
    tests/test_gpu.py tests/test_launch.py tests/test_reliability.py -k "not tp_faults" 2>&1 | tail -4
