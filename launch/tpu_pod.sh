#!/usr/bin/env bash
# Train one category on a multi-host TPU slice: every worker runs the same command with --multihost
# (jax.distributed.initialize() detects the slice), on one shared work directory.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CATEGORY WORKDIR DATA_DIR DTD_IMAGES [--config.* overrides...]
#
# WORKDIR may be a gs:// bucket path (config, checkpoints, metrics and the report go through etils.epath)
# or a mount shared by all workers. DATA_DIR and DTD_IMAGES are read with ordinary file access: the same
# local or NFS / Filestore path on every worker. The global batch is split over all chips of all hosts;
# keep it a multiple of the chip count (e.g. --config.batch_size=32 on a v4-32's 16 chips, with the
# learning rate scaled as you see fit).
set -euo pipefail
if [ $# -lt 6 ]; then sed -n '2,11p' "$0"; exit 2; fi
TPU=$1; ZONE=$2; CAT=$3; WORKDIR=$4; DATA=$5; DTD=$6; shift 6
# 1) Install on every worker (once).
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command \
  "test -d draem_jax || git clone https://github.com/YOUR_FORK/draem_jax.git; cd draem_jax && pip install -U 'jax[tpu]' && pip install -e ."
# 2) Train: the same command on all workers at once.
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command \
  "cd draem_jax && python -m draem_jax.train --multihost --config=configs/mvtec.py:$CAT --workdir=$WORKDIR --config.data_dir=$DATA --config.anomaly_source_path=$DTD $*"
