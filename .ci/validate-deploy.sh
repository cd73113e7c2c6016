#!/usr/bin/env bash
# Validate compose.yaml and deploy/k8s/ (called by .ci/run; also fine by hand).
#   compose.yaml  Debian's docker-compose (v1.29: `docker-compose config`, compose-spec schema)
#   deploy/k8s/   kubernetes-validate (PyPI; the Kubernetes OpenAPI schemas, strict)
#   both          the structural checks of tests/deploy/checks.py, always
# A validator that cannot be installed (no apt, no PyPI) is skipped with a note: the
# structural checks still run. A file that fails a validator fails this script.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
K8S_VERSION="${K8S_VERSION:-1.30.0}"  # grpc probes are GA since 1.27
rc=0

if ! command -v docker-compose >/dev/null 2>&1; then
  (timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 300 \
    apt-get install -y -qq docker-compose >/dev/null) 2>&1 | tail -n 3 || true
fi
if command -v docker-compose >/dev/null 2>&1; then
  for profiles in "" "--profile multi-gpu --profile telemetry"; do
    # shellcheck disable=SC2086  # profiles are several words on purpose
    if env -u OTEL_EXPORTER_OTLP_ENDPOINT docker-compose -f compose.yaml $profiles config -q; then
      echo "compose.yaml: docker-compose config ok ${profiles:+($profiles)}"
    else
      echo "compose.yaml: docker-compose config FAILED"; rc=1
    fi
  done
else
  echo "compose.yaml: docker-compose unavailable (apt unreachable?): structural checks only"
fi

if ! "$PY" -c "import kubernetes_validate" 2>/dev/null; then
  timeout 300 "$PY" -m pip install -q kubernetes-validate 2>&1 | tail -n 3 || true
fi
if "$PY" -c "import kubernetes_validate" 2>/dev/null; then
  manifests=$(ls deploy/k8s/*.yaml | grep -v '/kustomization.yaml$')
  # shellcheck disable=SC2086
  if "$PY" -m kubernetes_validate --strict --quiet -k "$K8S_VERSION" $manifests; then
    echo "deploy/k8s: kubernetes-validate ok (Kubernetes $K8S_VERSION, strict)"
  else
    echo "deploy/k8s: kubernetes-validate FAILED"; rc=1
  fi
else
  echo "deploy/k8s: kubernetes-validate unavailable (PyPI unreachable?): structural checks only"
fi

"$PY" -m tests.deploy.checks || rc=1
exit "$rc"
