#!/usr/bin/env bash
# The whole trainer on one lent GPU (bench/gpu_trainer.py), about 7 minutes: real-shape random-weight
# encoders make a 1328 cache, `mmdit serve` feeds `mmdit train` at the 20B width (8-12 blocks, bf16,
# megatron DistributedOptimizer), compiled and eager, service-fed and random-fed; MFU, step time,
# data wait, peak memory against model/memory.py, the producer's encode throughput.
#
#   bench/wheelhouse.sh                          # here, once: fills .whl/ (megatron-core, diffusers, ...)
#   device run (carry .whl): bench/gpu_trainer.sh "$OUT"
#   bench/gpu_trainer.sh DIR --tiny              # any machine, CPU: the same stages, tiny (the plumbing)
#
# The 17 GB of encoders, the caches and the runs go to a scratch directory on the machine's own disk
# (MMDIT_WORK, default /tmp/mmdit-gpu-trainer), never to $OUT; DIR/gpu_trainer.json is written after
# every stage. Extra arguments go to bench/gpu_trainer.py (--skip eager,640 --budget-s 300 ...).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench/results}}"
shift || true
work="${MMDIT_WORK:-/tmp/mmdit-gpu-trainer}"
site="${MMDIT_SITE:-/tmp/site}"
mkdir -p "$site" "$work"
ln -sfn "$PWD" "$site/mmdit"  # the repository root is the `mmdit` package
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
python=python3
tiny=0
for arg in "$@"; do [ "$arg" = --tiny ] && tiny=1; done
if [ "$tiny" = 1 ]; then
  [ -x .venv/bin/python ] && python=.venv/bin/python  # the development venv, on CPU
else
  $python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
fi
limit=540
[ "$tiny" = 1 ] && limit=1500  # a loaded 2-core machine
timeout "$limit" $python bench/gpu_trainer.py --out "$out" --work "$work" "$@"
