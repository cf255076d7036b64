#!/usr/bin/env bash
# Plain torchrun launcher (no Slurm), single or multi-node with a c10d rendezvous.
#
#   one node:   bash launch/torchrun.sh stage=1 data.path=/data/shards
#   two nodes:  on each node  NNODES=2 MASTER_ADDR=node0 bash launch/torchrun.sh stage=3 ...
#
# NPROC_PER_NODE (default: visible GPUs, else 1), NNODES (1), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500),
# RDZV_ID (helios), HELIOS_PYTHON (python). Arguments are Hydra overrides for train_helios.py; every node
# must pass the same ones (and the same hydra.run.dir on a shared file system).
set -euo pipefail
PY=${HELIOS_PYTHON:-python}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then NPROC_PER_NODE=$(nvidia-smi -L | wc -l); else NPROC_PER_NODE=1; fi
fi
exec "$PY" -m torch.distributed.run \
  --nnodes="${NNODES:-1}" --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv_backend=c10d --rdzv_endpoint="${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" \
  --rdzv_id="${RDZV_ID:-helios}" \
  train_helios.py "$@"
