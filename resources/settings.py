"""Local defaults for every setting, overridable by environment variables (see README)."""

from __future__ import annotations

import os
from pathlib import Path

# The checkout (the project is installed editable); CLINICAL_HOME moves all local state.
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def data_home() -> Path:
    return Path(os.environ.get("CLINICAL_HOME", PROJECT_ROOT / ".data"))


def default_warehouse_path() -> str:
    return os.environ.get("CLINICAL_WAREHOUSE", str(data_home() / "warehouse.duckdb"))


def default_mlflow_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{data_home() / 'mlflow' / 'mlflow.db'}")


def default_mlflow_artifact_root() -> str:
    return os.environ.get("MLFLOW_ARTIFACT_ROOT", str(data_home() / "mlflow" / "artifacts"))


def patient_buckets() -> int:
    """How many patient buckets a batch is de-identified in (CLINICAL_PATIENT_BUCKETS): each is a
    step of its own, so this many can run at once on an executor with workers. Default 1: on one
    machine DuckDB already runs each statement on every core, and each extra bucket costs its
    own passes (4 buckets in one process: 45 s instead of 30 s at 10k patients). It shapes the
    asset graph, so it is read when the definitions load."""
    value = os.environ.get("CLINICAL_PATIENT_BUCKETS", "1")
    if not value.isdigit() or not 1 <= int(value) <= 64:
        raise ValueError(f"CLINICAL_PATIENT_BUCKETS must be a whole number from 1 to 64, not {value!r}")
    return int(value)
