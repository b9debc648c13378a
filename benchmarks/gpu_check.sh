#!/usr/bin/env bash
# One GPU check (benchmarks/gpu_check.py): the CUDA tests, the bootstrapping step of clip_base and clip_large in
# bf16 (online and cached, eager and compiled: steps/s, images/s, MFU) and the loader, in one markdown table.
#
#   bash benchmarks/gpu_check.sh              # on one CUDA GPU, under 8 minutes; writes ./gpu_check.md
#   bash benchmarks/gpu_check.sh --dry-run    # the same code at tiny sizes on a CPU (CI runs it)
#   bash benchmarks/gpu_check.sh --help       # every option
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_check.py" "$@"
