"""Data drift between the training reference and a current batch: PSI and KS per feature.

PSI bins come from the reference: deciles for continuous features, one bin per value for
features with few distinct values, and a bin of its own for missing values (a feature that
stops being recorded is drift too).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
from scipy.stats import ks_2samp

PSI_FLOOR = 1e-4  # share given to an empty bin so the log term stays finite
MAX_CATEGORICAL_VALUES = 12


def _bin_shares(values: np.ndarray, edges: np.ndarray | None, categories: np.ndarray | None) -> np.ndarray:
    missing = np.isnan(values)
    present = values[~missing]
    if categories is not None:
        counts = np.array([(present == c).sum() for c in categories] + [0])
        counts[-1] = len(present) - counts[:-1].sum()  # values unseen in the reference
    else:
        counts = np.bincount(np.searchsorted(edges, present, side="right"), minlength=len(edges) + 1)
    counts = np.append(counts, missing.sum())
    return counts / max(len(values), 1)


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Population stability index of ``current`` against ``reference`` (NaN = missing)."""
    reference = np.asarray(reference, dtype="float64")
    current = np.asarray(current, dtype="float64")
    ref_present = reference[~np.isnan(reference)]
    distinct = np.unique(ref_present)
    if len(distinct) <= MAX_CATEGORICAL_VALUES:
        edges, categories = None, distinct
    else:
        edges = np.unique(np.quantile(ref_present, np.linspace(0, 1, bins + 1)[1:-1]))
        categories = None
    ref_share = np.maximum(_bin_shares(reference, edges, categories), PSI_FLOOR)
    cur_share = np.maximum(_bin_shares(current, edges, categories), PSI_FLOOR)
    return float(np.sum((cur_share - ref_share) * np.log(cur_share / ref_share)))


def drift_table(reference: pl.DataFrame, current: pl.DataFrame, features: list[str], psi_threshold: float = 0.2) -> pl.DataFrame:
    rows = []
    for name in features:
        ref = reference[name].cast(pl.Float64).fill_null(float("nan")).to_numpy()
        cur = current[name].cast(pl.Float64).fill_null(float("nan")).to_numpy()
        ref_ok, cur_ok = ref[~np.isnan(ref)], cur[~np.isnan(cur)]
        if len(ref_ok) and len(cur_ok):
            ks = ks_2samp(ref_ok, cur_ok)
            ks_stat, ks_p = float(ks.statistic), float(ks.pvalue)
        else:
            ks_stat, ks_p = math.nan, math.nan
        value = psi(ref, cur)
        rows.append({
            "feature": name, "psi": value, "ks_statistic": ks_stat, "ks_pvalue": ks_p,
            "reference_mean": float(np.nanmean(ref)) if len(ref_ok) else None,
            "current_mean": float(np.nanmean(cur)) if len(cur_ok) else None,
            "drifted": value > psi_threshold,
        })
    return pl.DataFrame(rows).sort("psi", descending=True)


def evidently_report(reference: pl.DataFrame, current: pl.DataFrame, features: list[str], path: Path,
                     psi_threshold: float = 0.2) -> dict[str, float]:
    """Save Evidently's data-drift report as HTML; return Evidently's own PSI per column."""
    from evidently import Report
    from evidently.presets import DataDriftPreset

    # Evidently refuses a column that is empty on either side (an export without heart-rate
    # observations, say); our own PSI above still reports it (all-missing is a bin of its own).
    features = [c for c in features if reference[c].null_count() < reference.height
                and current[c].null_count() < current.height]
    report = Report([DataDriftPreset(method="psi", threshold=psi_threshold)], include_tests=True)
    snapshot = report.run(reference_data=reference.select(features).to_pandas(),
                          current_data=current.select(features).to_pandas())
    path.parent.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(path))
    values = {}
    for metric in snapshot.dict().get("metrics", []):
        column = (metric.get("config") or {}).get("column")
        value = metric.get("value")
        if column in features and isinstance(value, (int, float)):
            values[column] = float(value)
    return values


def save_drift_report(con, report_id: str, batch: str, table: pl.DataFrame,
                      reference_model_version: int | None = None) -> None:
    """Append one report's rows to monitoring.drift_report (history is kept)."""
    con.execute("CREATE SCHEMA IF NOT EXISTS monitoring")
    con.execute("""CREATE TABLE IF NOT EXISTS monitoring.drift_report (
        report_id VARCHAR, created_at TIMESTAMPTZ, batch VARCHAR, feature VARCHAR, psi DOUBLE,
        ks_statistic DOUBLE, ks_pvalue DOUBLE, reference_mean DOUBLE, current_mean DOUBLE, drifted BOOLEAN)""")
    con.execute("ALTER TABLE monitoring.drift_report ADD COLUMN IF NOT EXISTS reference_model_version INTEGER")
    con.register("drift_rows", table.to_arrow())
    con.execute(
        """INSERT INTO monitoring.drift_report BY NAME
           SELECT ? AS report_id, current_timestamp AS created_at, ? AS batch, feature, psi, ks_statistic, ks_pvalue,
                  reference_mean, current_mean, drifted, ? AS reference_model_version
           FROM drift_rows""", [report_id, batch, reference_model_version])
    con.unregister("drift_rows")
