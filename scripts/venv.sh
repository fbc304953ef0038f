# Sourced by scripts/demo.sh and scripts/test.sh: create or refresh .venv/ and
# install what the project needs. Reinstalls only when the dependency files change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
STAMP=.venv/.distill-installed
WANT="$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    .venv/bin/python -m pip install -q --upgrade pip setuptools wheel
    # torch first: 2.13.0 is the local CPU wheel; a bare `torch` would pull CUDA.
    .venv/bin/python -m pip install -q "torch==2.13.0"
    .venv/bin/python -m pip install -q -c requirements.lock -e ".[dev]"
    echo "$WANT" > "$STAMP"
fi
# No network beyond package registries: keep Prefect and the HF libraries offline.
# distill/offline.py (OFFLINE_ENV) is the one home of these values; they are exported here
# as well because this shell starts processes Python never gets to configure first (the
# prefect server and workers, pip) and tests/test_architecture.py checks the two agree.
export DO_NOT_TRACK=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
export PATH="$ROOT/.venv/bin:$PATH"
