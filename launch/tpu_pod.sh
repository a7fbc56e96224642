#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: the identical `unclip-jax train` command on every worker
# (gcloud ... ssh --worker=all). jax.distributed finds the workers itself on a TPU VM
# (unclip_jax.parallel.distributed.detect_cluster -> "tpu"); no coordinator flags are needed.
#
#   export TPU_NAME=my-v4-32 ZONE=us-central2-b PROJECT=my-project   # PROJECT optional
#   launch/tpu_pod.sh --setup                      # once: clone/update the repo, pip install
#   launch/tpu_pod.sh --config glide_base64 --workdir /mnt/shared/runs/glide64 [--set k=v ...]
#   launch/tpu_pod.sh --stop                       # SIGTERM: save and stop on every worker
#   ACCELERATOR_TYPE=v5p-32 launch/tpu_pod.sh --dry-run --config ... --workdir ...
#       prints the gcloud commands and each worker's jax.distributed settings, runs nothing
#
# The workdir must be one folder that every worker sees (an NFS/Filestore mount, or a gcsfuse
# mount of a bucket): orbax writes one checkpoint from all hosts, and process 0 writes metrics,
# TensorBoard events and samples there. gs:// URLs are not supported by the loop yet.
# Training runs under nohup; its output goes to ~/unclip-jax-train.log on each worker.
# Variables: REPO_DIR (default ~/unclip-jax), REPO_URL (for --setup), PYTHON (default python3),
# PLAN_PYTHON (the dry run's local python, with unclip-jax installed; default python3).
# Rerunning the same command resumes from the workdir's latest checkpoint (also after a
# preemption: SIGTERM saves and exits 0).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM's name}"
: "${ZONE:?set ZONE to the TPU VM's zone}"
REPO_DIR="${REPO_DIR:-~/unclip-jax}"
PYTHON="${PYTHON:-python3}"
DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
[[ $# -gt 0 ]] || { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

on_all_workers() {
  if [[ $DRY_RUN == 1 ]]; then  # the command as it would run, quoted for a shell
    echo "gcloud compute tpus tpu-vm ssh ${TPU_NAME@Q} --zone ${ZONE@Q}${PROJECT:+ --project ${PROJECT@Q}} --worker=all --command ${1@Q}"
    return 0
  fi
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} \
    --worker=all --command "$1"
}

print_plan() {  # each worker's jax.distributed settings, for the dry run
  [[ $DRY_RUN == 1 ]] || return 0
  if [[ -z "${ACCELERATOR_TYPE:-}" ]]; then
    echo "set ACCELERATOR_TYPE (e.g. v5p-32) to see each worker's jax.distributed settings"
    return 0
  fi
  echo "per worker of $TPU_NAME ($ACCELERATOR_TYPE; IPs are placeholders: on the slice jax reads them from the metadata server):"
  "${PLAN_PYTHON:-python3}" -m unclip_jax.parallel.launch_plan tpu --accelerator-type "$ACCELERATOR_TYPE" \
    ${WORKER_IPS:+--worker-ips "$WORKER_IPS"}
}

case "$1" in
  --setup)
    : "${REPO_URL:?set REPO_URL to clone the repository from}"
    on_all_workers "set -e; [ -d $REPO_DIR ] || git clone $REPO_URL $REPO_DIR; cd $REPO_DIR &&\
 git pull --ff-only && $PYTHON -m pip install -U 'jax[tpu]' && $PYTHON -m pip install -e ."
    ;;
  --stop)
    # SIGTERM: every process saves a checkpoint of the current step and exits 0.
    on_all_workers "[ -f ~/unclip-jax-train.pid ] && kill -TERM \$(cat ~/unclip-jax-train.pid) || true"
    ;;
  *)
    # Quote the train flags once here so every worker runs exactly the same command.
    train_args=$(printf '%q ' "$@")
    on_all_workers "cd $REPO_DIR && nohup unclip-jax -v train $train_args> ~/unclip-jax-train.log\
 2>&1 < /dev/null & echo \$! > ~/unclip-jax-train.pid; sleep 2; tail -n 5 ~/unclip-jax-train.log"
    if [[ $DRY_RUN == 1 ]]; then print_plan; exit 0; fi
    echo "started on every worker of $TPU_NAME; follow with:"
    echo "  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone $ZONE --worker=0 --command 'tail -f ~/unclip-jax-train.log'"
    ;;
esac
