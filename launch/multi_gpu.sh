#!/usr/bin/env bash
# Data-parallel training on the GPUs of one host, or on several hosts under Slurm.
#
# One host: JAX uses every visible GPU; the global batch is split over them (a multiple of the GPU count).
#   launch/multi_gpu.sh CATEGORY WORKDIR DATA_DIR DTD_IMAGES [--config.batch_size=16 ...]
#
# Several hosts (Slurm): one task per host, same command, plus --multihost; jax.distributed.initialize()
# reads the Slurm environment. The work directory must be on a shared file system.
#   srun --nodes=2 --ntasks-per-node=1 launch/multi_gpu.sh CATEGORY WORKDIR DATA_DIR DTD_IMAGES --multihost
set -euo pipefail
if [ $# -lt 4 ]; then sed -n '2,11p' "$0"; exit 2; fi
CAT=$1; WORKDIR=$2; DATA=$3; DTD=$4; shift 4
exec python -m draem_jax.train --config="configs/mvtec.py:$CAT" --workdir="$WORKDIR" \
  --config.data_dir="$DATA" --config.anomaly_source_path="$DTD" "$@"
