"""The clinical policy file (``clinical_policy.toml``): thresholds defined once, with a version."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DEFAULT_POLICY_FILE = Path(__file__).with_name("clinical_policy.toml")


@dataclass(frozen=True)
class Thresholds:
    min_auroc: float = 0.85
    min_sensitivity_at_90_specificity: float = 0.70
    calibration_slope_range: tuple[float, float] = (0.8, 1.2)
    max_subgroup_auroc_gap: float = 0.05
    max_cv_auroc_std: float = 0.03


@dataclass(frozen=True)
class PromotionRules:
    non_inferiority_margin: float = 0.02
    bootstrap_samples: int = 1000
    bootstrap_seed: int = 20261125


@dataclass(frozen=True)
class ClinicalPolicy:
    version: str
    validation: Thresholds
    psi_retrain_threshold: float
    source: str
    promotion: PromotionRules = PromotionRules()


def policy_file() -> Path:
    return Path(os.environ.get("CLINICAL_POLICY_FILE") or DEFAULT_POLICY_FILE)


def load_policy(path: str | Path | None = None) -> ClinicalPolicy:
    """Read and check a policy file; a missing or out-of-range value is a clear error."""
    path = Path(path) if path is not None else policy_file()
    try:
        data = tomllib.loads(path.read_text())
        v, m = data["validation"], data["monitoring"]
        low, high = (float(x) for x in v["calibration_slope_range"])
        thresholds = Thresholds(
            min_auroc=float(v["min_auroc"]),
            min_sensitivity_at_90_specificity=float(v["min_sensitivity_at_90_specificity"]),
            calibration_slope_range=(low, high),
            max_subgroup_auroc_gap=float(v["max_subgroup_auroc_gap"]),
            max_cv_auroc_std=float(v["max_cv_auroc_std"]))
        p = data["promotion"]
        promotion = PromotionRules(non_inferiority_margin=float(p["non_inferiority_margin"]),
                                   bootstrap_samples=int(p["bootstrap_samples"]), bootstrap_seed=int(p["bootstrap_seed"]))
        policy = ClinicalPolicy(version=str(data["version"]), validation=thresholds,
                                psi_retrain_threshold=float(m["psi_retrain_threshold"]), source=str(path),
                                promotion=promotion)
    except (OSError, KeyError, TypeError, ValueError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"clinical policy {path}: {type(error).__name__}: {error}") from None
    if not (0 < policy.psi_retrain_threshold and 0 <= low < high and 0 < thresholds.min_auroc <= 1
            and 0 <= promotion.non_inferiority_margin < 0.5 and promotion.bootstrap_samples >= 100):
        raise ValueError(f"clinical policy {path}: a threshold is out of range")
    return policy


@lru_cache(maxsize=4)
def _cached(path: str, mtime_ns: int) -> ClinicalPolicy:
    return load_policy(path)


def current_policy() -> ClinicalPolicy:
    """The policy in force (re-read when the file changes)."""
    path = policy_file()
    return _cached(str(path), path.stat().st_mtime_ns if path.exists() else 0)
