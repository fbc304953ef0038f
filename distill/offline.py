"""The environment that keeps every library offline and quiet.

No network but package registries: Hugging Face libraries must never try a hub,
and Prefect must send no telemetry. The CLI, the benchmarks and the tests all
apply this one mapping; scripts/venv.sh, the Dockerfiles and prefect.yaml set
the same variables for processes that start before Python does.
"""

from __future__ import annotations

import os

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "TOKENIZERS_PARALLELISM": "false",
}


def apply_offline_env() -> None:
    """Set the offline variables that are not already set (an explicit value wins)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
