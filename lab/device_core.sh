#!/usr/bin/env bash
# One device call: the GPU tests of the core and the reliability guarantees, then the CE
# benchmark (no peers) of the previous commit (lab/prev) and of this tree, alternated twice.
export PYTHONUNBUFFERED=1
R=${OUT:-/tmp/out}; mkdir -p "$R"
nvidia-smi -L | tee "$R/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$R/device.txt"
export PYTHONPATH=$PWD/src:$PWD/tests
timeout ${TESTS_S:-260} python3 -m pytest -q -p no:cacheprovider tests/test_reliability.py tests/test_gpu.py \
  -k "not tp_faults and not recompiles" 2>&1 | grep -E "^(FAILED|ERROR|E  )|passed|failed" | tail -30 | tee "$R/gpu_tests.log"
for i in 1 2; do
  for w in prev new; do
    if [ $w = prev ]; then d=lab/prev; else d=.; fi
    PYTHONPATH=$PWD/$d/src:$PWD/$d/tests timeout 150 python3 $d/benchmarks/ce_gpu.py --no-peers --no-check 2>&1 \
      | grep -v -i warn | tail -24 > "$R/ce_${w}_$i.log"
    echo "== $w $i"; tail -22 "$R/ce_${w}_$i.log"
  done
done
