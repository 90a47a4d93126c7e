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
