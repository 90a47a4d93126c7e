"""The service's settings: environment variables with working local defaults (the same MLflow
store and data folder as the pipeline). Secrets (the de-identification key, tokens) are read
from the environment or a hashed token file, never from here."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from resources.settings import data_home, default_mlflow_tracking_uri

MODES = ("production", "shadow", "canary")


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def _bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    return default if value is None or value == "" else value.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class ServingSettings:
    tracking_uri: str = field(default_factory=default_mlflow_tracking_uri)
    model_name: str = field(default_factory=lambda: _env("SERVING_MODEL_NAME", "hypertension-risk"))
    home: Path = field(default_factory=lambda: Path(_env("SERVING_HOME", str(data_home() / "serving"))))
    # Rollout: the control file overrides these at run time (see serving.control); no restart needed.
    mode: str = field(default_factory=lambda: _env("SERVING_MODE", "production"))
    canary_percent: float = field(default_factory=lambda: float(_env("SERVING_CANARY_PERCENT", "10")))
    kill_switch: bool = field(default_factory=lambda: _bool("SERVING_KILL_SWITCH"))
    control_poll_seconds: float = field(default_factory=lambda: float(_env("SERVING_CONTROL_POLL_SECONDS", "1")))
    # How often the registry's aliases are re-read (a promotion is picked up without a restart).
    reload_seconds: float = field(default_factory=lambda: float(_env("SERVING_RELOAD_SECONDS", "30")))
    max_body_bytes: int = field(default_factory=lambda: int(_env("SERVING_MAX_BODY_BYTES", str(1024 * 1024))))
    max_fhir_body_bytes: int = field(
        default_factory=lambda: int(_env("SERVING_MAX_FHIR_BODY_BYTES", str(8 * 1024 * 1024))))
    tokens_file: Path | None = field(default_factory=lambda: Path(p) if (p := os.environ.get("SERVING_TOKENS_FILE")) else None)
    explain: bool = field(default_factory=lambda: _bool("SERVING_EXPLAIN", True))

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"SERVING_MODE must be one of {', '.join(MODES)}, not {self.mode!r}")
        if not 0 <= self.canary_percent <= 100:
            raise ValueError("SERVING_CANARY_PERCENT must be between 0 and 100")

    @property
    def token_path(self) -> Path:
        return self.tokens_file or self.home / "tokens.json"

    @property
    def control_path(self) -> Path:
        return self.home / "control.json"

    @property
    def log_dir(self) -> Path:
        return Path(_env("SERVING_LOG_DIR", str(self.home / "log")))
