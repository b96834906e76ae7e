#!/usr/bin/env bash
# Measurement calls for the tables in BENCHMARKS.md, split to fit two back-to-back device
# calls: the CuTe DSL wheels (92 MB) are over one call's carry and travel in two parts.
#   PHASE=1 (carry .whl .cute1 .pre): GPU tests, before/after of a refactor (.pre/src vs src),
#           the HF training step;
#   PHASE=2 (carry .cute2): linear CE and RL log-prob + entropy tables with Liger's SM90 kernel;
#   PHASE=3 (carry .whl .base): the CE call with validation on, .base (an older tree with
#           this benchmarks/ce_gpu.py) against this one, alternated; TRL's chunked log-probs.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
R=${OUT:-/tmp/out}; mkdir -p "$R"
nvidia-smi -L | tee "$R/device.txt"
if [ "$PHASE" = 3 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
fi
if [ "$PHASE" = 1 ]; then
  mkdir -p /tmp/cute && cp .cute1/* /tmp/cute/
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
fi
if [ "$PHASE" = 2 ]; then
  cat /tmp/cute/libs.part.* .cute2/libs.part.* > /tmp/cute/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
  rm -f /tmp/cute/libs.part.*
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/cute/*.whl || echo "cute install failed"
fi
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD/src:$PWD/tests
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$R/device.txt"
if [ "$PHASE" = 1 ]; then
  timeout ${TESTS_S:-200} python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_launch.py \
    2>&1 | grep -E "^(FAILED|ERROR)|passed|failed" | tail -20 | tee "$R/gpu_tests.log"
  for w in pre head pre head; do
    if [ $w = pre ]; then d=.pre/src; else d=src; fi
    PYTHONPATH=/tmp/site timeout 70 python3 lab/before_after.py $d --label $w 2>&1 | grep '^{' | tee -a "$R/before_after.jsonl"
  done
  timeout ${HF_S:-200} python3 benchmarks/hf_step_gpu.py 2>&1 | grep -v -i warn | tail -30 | tee "$R/hf_step.log"
fi
if [ "$PHASE" = 2 ]; then
  timeout ${LIN_S:-220} python3 benchmarks/linear_gpu.py --skip-correctness 2>&1 | grep -v -i warn | tail -60 | tee "$R/linear.log"
  timeout ${RL_S:-250} python3 benchmarks/rl_gpu.py 2>&1 | grep -v -i warn | tail -40 | tee "$R/rl.log"
fi
if [ "$PHASE" = 3 ]; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k bad_target 2>&1 | grep -E "^(FAILED|ERROR|E  )|passed|failed" | tail -12 | tee "$R/gpu_tests.log"
  for w in ${ORDER:-base head base head}; do
    if [ $w = base ]; then d=.base; else d=.; fi
    echo "== $w" | tee -a "$R/ce_validation.log"
    PYTHONPATH=/tmp/site:$PWD/$d/src:$PWD/$d/tests timeout 100 python3 $d/benchmarks/ce_gpu.py --V 32000 --no-peers --no-check 2>&1 | grep -v -i warn | grep -E "floor|fusedce|kernel" | tail -16 | tee -a "$R/ce_validation.log"
  done
  timeout ${RL_S:-220} python3 benchmarks/rl_gpu.py --methods fusedce,trl 2>&1 | grep -v -i warn | tail -14 | tee "$R/rl_trl.log"
fi
