#!/usr/bin/env bash
# The default CE call at V = 32000 with validation on: an older tree (.prev/src) against this
# one, alternated, by benchmarks/ce_gpu.py and lab/ce_timeline.py (GPU).
export PYTHONUNBUFFERED=1
for w in ${ORDER:-prev head prev head}; do
  if [ $w = prev ]; then d=$PWD/.prev; else d=$PWD; fi
  echo "== $w"
  timeout 100 python3 $d/benchmarks/ce_gpu.py --V 32000 --no-peers --no-check 2>&1 \
    | grep -v -i warn | grep -E "floor|fusedce" | tail -10
done
for w in prev head; do
  if [ $w = prev ]; then d=$PWD/.prev/src; else d=$PWD/src; fi
  echo "== timeline $w"
  PYTHONPATH=$d timeout 100 python3 lab/ce_timeline.py 2>&1 | tail -70
done
