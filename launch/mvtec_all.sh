#!/usr/bin/env bash
# Train and evaluate DRAEM on all 15 MVTec AD categories, then print a summary beside the paper's numbers.
#
#   launch/mvtec_all.sh DATA_DIR DTD_IMAGES WORKDIR_ROOT [extra --config.* overrides...]
#
# DATA_DIR: the extracted mvtec_anomaly_detection folder; DTD_IMAGES: dtd/images (anomaly sources).
# Categories (draem_jax.published.CATEGORIES) run one after another on all visible devices. On a host
# with several GPUs, set PARALLEL_GPUS=N to run N categories at once, one per GPU (each sees one device).
# Rerunning the script resumes unfinished runs and only re-evaluates finished ones; each category's log
# is appended to WORKDIR_ROOT/<category>.log, and WORKDIR_ROOT/summary.md is regenerated.
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,11p' "$0"; exit 2
fi
DATA_DIR=$1; DTD=$2; ROOT=$3; shift 3
CATEGORIES=$(python -m draem_jax.published)
PARALLEL_GPUS=${PARALLEL_GPUS:-0}

run_one() {  # category [gpu]
  local cat=$1 gpu=${2:-}
  shift 2
  local env_prefix=()
  [ -n "$gpu" ] && env_prefix=(env CUDA_VISIBLE_DEVICES="$gpu")
  "${env_prefix[@]}" python -m draem_jax.train --config="configs/mvtec.py:$cat" --workdir="$ROOT/$cat" \
    --config.data_dir="$DATA_DIR" --config.anomaly_source_path="$DTD" "$@" \
    >> "$ROOT/$cat.log" 2>&1 && echo "done: $cat" || echo "FAILED: $cat (see $ROOT/$cat.log)"
}

mkdir -p "$ROOT"
if [ "$PARALLEL_GPUS" -gt 0 ]; then
  i=0
  for cat in $CATEGORIES; do
    run_one "$cat" $((i % PARALLEL_GPUS)) "$@" &
    i=$((i + 1))
    if [ $((i % PARALLEL_GPUS)) -eq 0 ]; then wait; fi
  done
  wait
else
  for cat in $CATEGORIES; do run_one "$cat" "" "$@"; done
fi
# The summary is this script's own output: replace the previous one.
python -m draem_jax.summary --root="$ROOT" --overwrite
