#!/usr/bin/env bash
# Fetch extra peer libraries for the vocab-parallel benchmark (benchmarks/tp_gpu.py) as wheels
# for the GPU machine's Python 3.12 / x86-64 image into .whl/ of this repository, beside the
# ones ../shared/tools/peer-wheels.sh fetches (liger-kernel, cut-cross-entropy).
#
#   megatron-core==0.19.2   cp312 manylinux_2_24/2_28 x86_64 wheel (one small compiled module,
#                           megatron/core/datasets/helpers_cpp, that the benchmark never loads)
#
# Its Requires-Dist (printed below) outside extras: torch>=2.6, numpy, packaging>=24.2; the
# image already holds all three (torch 2.11), and also pyyaml, absl-py, setuptools, sympy,
# networkx, jinja2 and filelock, which `import megatron.core` touches. So only the wheel
# itself travels (--no-deps: nothing else is fetched).
#
# Usage, from the repository root:  tools/peer-wheels-extra.sh
# Then, in a device run that carries .whl:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   torchrun --nproc-per-node 2 benchmarks/tp_gpu.py
set -euo pipefail
if ! git check-ignore -q .whl/probe.whl 2>/dev/null; then  # keep the wheels out of git
  excl=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$excl")" && echo '/.whl/' >> "$excl"
fi
mkdir -p .whl
for pkg in megatron-core==0.19.2; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$pkg"
done
for w in .whl/megatron_core-*.whl; do
  echo "== $w"
  unzip -p "$w" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' || true
done
ls -la .whl
