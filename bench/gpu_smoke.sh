#!/usr/bin/env bash
# The GPU smoke run (bench/gpu_smoke.py), ready for a lent GPU machine: Python 3.12 with CUDA torch,
# transformers and safetensors, no internet. mmdit's other dependencies travel as wheels in .whl/
# (bench/wheelhouse.sh builds them here); the device tool carries .whl and the working tree.
#
#   bench/wheelhouse.sh                      # here, once: fills .whl/
#   device run (carry .whl): bench/gpu_smoke.sh "$OUT"
#
# Fails loudly: a missing wheel, no GPU, or any failed check exits non-zero with its reason.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench/results}}"
site="${MMDIT_SITE:-/tmp/site}"
mkdir -p "$site"
ln -sfn "$PWD" "$site/mmdit"  # the repository root is the `mmdit` package
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch, mmdit.consumer.trainer; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
timeout 600 python3 bench/gpu_smoke.py --out "$out"
