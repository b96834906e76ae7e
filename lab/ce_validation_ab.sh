#!/usr/bin/env bash
# The default CE call at V = 32000 with validation on: two trees (.prev and .side, each with
# src/ and benchmarks/), alternated, by benchmarks/ce_gpu.py (GPU).
export PYTHONUNBUFFERED=1
for w in ${ORDER:-.prev .side .prev .side}; do
  echo "== $w"
  timeout 100 python3 $PWD/$w/benchmarks/ce_gpu.py --V 32000 --no-peers --no-check 2>&1 \
    | grep -v -i warn | grep -E "floor|fusedce" | tail -10
done
