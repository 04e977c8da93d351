#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: every worker runs tools/train.py; jax.distributed.initialize()
# discovers the slice from the TPU metadata (config.train.distributed=True).
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a PROJECT=my-proj \
#   launch/tpu_pod.sh setup                       # copy this repo to every worker and install
#   launch/tpu_pod.sh train configs/umm_1b.py:proxy=segmentation gs://bucket/runs/sgt [--config.optim.lr=3e-5 ...]
#   launch/tpu_pod.sh stop                        # kill training on every worker (SIGTERM => checkpoint)
#
# Workdirs should be on GCS (gs://...) so every worker sees the same checkpoints. Re-running `train`
# with the same workdir resumes from the latest checkpoint (e.g. after a preemption).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REMOTE_DIR=${REMOTE_DIR:-sgt_jax}
HERE=$(cd "$(dirname "$0")/.." && pwd)

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="$1"
}

case "${1:-}" in
  setup)
    tar -C "$HERE" --exclude=.venv --exclude=runs --exclude=.git -czf /tmp/sgt_jax_src.tgz .
    gcloud compute tpus tpu-vm scp /tmp/sgt_jax_src.tgz "$TPU_NAME":/tmp/ --zone="$ZONE" $PROJECT_FLAG --worker=all
    ssh_all "mkdir -p ~/$REMOTE_DIR && tar -C ~/$REMOTE_DIR -xzf /tmp/sgt_jax_src.tgz && cd ~/$REMOTE_DIR && \
      python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
    ;;
  train)
    CONFIG=${2:?config path}; WORKDIR=${3:?workdir}; shift 3
    EXTRA=$(printf ' %q' "$@")
    # nohup + a log per worker so an ssh drop does not kill the run.
    ssh_all "cd ~/$REMOTE_DIR && nohup .venv/bin/python tools/train.py --config=$CONFIG --workdir=$WORKDIR \
      --config.train.distributed=True $EXTRA > train_\$(hostname).log 2>&1 & echo \$! > train.pid"
    echo "started on all workers; logs: ~/$REMOTE_DIR/train_<host>.log"
    ;;
  stop)
    ssh_all "cd ~/$REMOTE_DIR && test -f train.pid && kill -TERM \$(cat train.pid) || true"
    ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=0 \
      --command="tail -n ${2:-50} ~/$REMOTE_DIR/train_*.log"
    ;;
  *)
    sed -n '2,12p' "$0"; exit 1
    ;;
esac
