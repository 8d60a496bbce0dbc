#!/usr/bin/env bash
# Wheels the GPU machine lacks (Python 3.12, manylinux x86-64; it has torch, transformers,
# safetensors, numpy), into .whl/ for bench/gpu_smoke.sh. `--dry-run` prints what it would fetch.
#   bench/wheelhouse.sh [--dry-run] [EXTRA==VERSION ...]
set -euo pipefail
cd "$(dirname "$0")/.."
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
wheels=(megatron-core==0.16.1 hydra-core==1.3.8 omegaconf==2.3.0 webdataset braceexpand diffusers
        importlib_metadata pyarrow prometheus_client pyyaml tqdm "$@")
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
run() { if [ "$dry" = 1 ]; then echo "$*"; else "$@"; fi; }
run mkdir -p .whl
for w in "${wheels[@]}"; do
  run python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d .whl "$w"
done
# antlr4 4.9.3 (hydra's parser) exists only as an sdist: build its pure-python wheel here.
run python3 -m pip wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w .whl
[ "$dry" = 1 ] || du -sh .whl
