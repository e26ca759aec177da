#!/usr/bin/env bash
# Create (or update) the work pools that prefect.yaml's deployments target.
#
#   PREFECT_API_URL=http://<server>:4200/api infra/prefect/create-pools.sh [local|gpu|slurm|all]
#
#   rdn-local  process pool: flow runs are subprocesses of a worker on this machine
#   rdn-gpu    kubernetes pool for GPU nodes; job template infra/prefect/base-job-template.json
#              (nvidia.com/gpu, workspace PVC, image from infra/docker/Dockerfile). Its worker
#              runs in the cluster and needs `pip install prefect-kubernetes`.
#   rdn-slurm  process pool served by workers that Slurm jobs start on GPU nodes
#              (see prefect.yaml, "Slurm instead of Kubernetes").
# Then: prefect --no-prompt deploy --name local   (or --name cluster)
set -euo pipefail
cd "$(dirname "$0")/../.."
PREFECT=${PREFECT:-prefect}
which=${1:-all}

if [[ -z "${PREFECT_API_URL:-}" ]]; then
  echo "PREFECT_API_URL is not set: pools would go to a temporary server and vanish." >&2
  echo "Point it at your Prefect server, e.g. PREFECT_API_URL=http://127.0.0.1:4200/api" >&2
  exit 2
fi

if [[ $which == local || $which == all ]]; then
  "$PREFECT" work-pool create rdn-local --type process --overwrite
fi
if [[ $which == gpu || $which == all ]]; then
  "$PREFECT" work-pool create rdn-gpu --type kubernetes \
    --base-job-template infra/prefect/base-job-template.json --overwrite
fi
if [[ $which == slurm || $which == all ]]; then
  "$PREFECT" work-pool create rdn-slurm --type process --overwrite
fi
"$PREFECT" work-pool ls
