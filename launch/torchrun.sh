#!/usr/bin/env bash
# Plain torchrun launcher (no Slurm), single or multi-node with a c10d rendezvous.
#
#   one node:   bash launch/torchrun.sh stage=1 data.path=/data/shards
#   two nodes:  on each node  NNODES=2 MASTER_ADDR=node0 bash launch/torchrun.sh stage=3 ...
#
# NPROC_PER_NODE (default: visible GPUs, else 1), NNODES (1), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500),
# RDZV_ID, HELIOS_PYTHON (python). Arguments are Hydra overrides for train_helios.py; every node must pass the
# same ones. Each launch is a new run: the run dir defaults to outputs/stage<N>-<phase>/<RDZV_ID>, and RDZV_ID
# defaults to a new id per launch on one node (several nodes: give every node the same RDZV_ID). To continue a
# run, launch again with its hydra.run.dir=... (resume=latest is the default) or its RDZV_ID.
set -euo pipefail
PY=${HELIOS_PYTHON:-python}
if [ -z "${RDZV_ID:-}" ]; then
  if [ "${NNODES:-1}" != 1 ]; then
    echo "error: NNODES=${NNODES} needs RDZV_ID, the same on every node (e.g. RDZV_ID=\$(date +%s) on one," \
         "then that value on the others)" >&2
    exit 2
  fi
  RDZV_ID="helios-$(date +%Y%m%d-%H%M%S)-$$"
fi
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then NPROC_PER_NODE=$(nvidia-smi -L | wc -l); else NPROC_PER_NODE=1; fi
fi
exec "$PY" -m torch.distributed.run \
  --nnodes="${NNODES:-1}" --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv_backend=c10d --rdzv_endpoint="${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" \
  --rdzv_id="$RDZV_ID" \
  -m helios.train "$@"
