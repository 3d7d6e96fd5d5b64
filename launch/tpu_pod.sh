#!/usr/bin/env bash
# Train on a multi-host Cloud TPU VM slice (v4/v5e/v5p/v6e): the same command runs on every
# worker; igpo_jax.runtime.distributed.initialize() (first thing in train's main) finds the other hosts
# from the TPU metadata, so no coordinator address is needed.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a bash launch/tpu_pod.sh \
#       --config=configs/qwen2_5_7b_igpo.py --config.model.path=/ckpt/Qwen2.5-7B-Instruct
#
# Prerequisites: the repository checked out at the same path ($REPO_DIR) on every worker (e.g.
# `gcloud compute tpus tpu-vm scp --worker=all` or a shared disk), model weights and data at paths
# every worker can read, and `bash launch/install.sh && pip install "jax[tpu]==0.10.2"` run once on
# all workers (SETUP=1 below does that). Plan memory first: python -m igpo_jax.plan --device=v5p ...
# Logs: each worker prints to its own ssh stream; gcloud prefixes lines with the worker id.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
REPO_DIR="${REPO_DIR:-~/igpo_jax}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}

ARGS=$(printf '%q ' "$@")
SETUP_CMD="true"
if [[ "${SETUP:-0}" == "1" ]]; then
  SETUP_CMD="bash launch/install.sh && python3 -m pip install -q 'jax[tpu]==0.10.2'"
fi

# --worker=all runs the command on every host of the slice at once; all must start for the
# process group to form (initialize() waits for them).
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all \
  --command="cd $REPO_DIR && $SETUP_CMD && python3 -m igpo_jax.train $ARGS"
