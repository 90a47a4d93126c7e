"""Clinical validation of held-out predictions against the platform's thresholds."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl
from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve

from clinical_ml.db import transaction
from clinical_ml.policy import Thresholds

MIN_CLASS_COUNT = 10  # a subgroup needs this many positives and negatives for a meaningful AUROC


def sensitivity_at_specificity(y_true: np.ndarray, score: np.ndarray, specificity: float = 0.90) -> float:
    """Highest sensitivity among operating points whose specificity is at least ``specificity``."""
    # Every threshold: the default drops collinear points, and the best point under the
    # specificity bound can be one of them. Tied scores share one threshold (one point).
    fpr, tpr, _ = roc_curve(y_true, score, drop_intermediate=False)
    allowed = fpr <= (1.0 - specificity) + 1e-12
    return float(tpr[allowed].max()) if allowed.any() else 0.0


def calibration_slope(y_true: np.ndarray, score: np.ndarray, iterations: int = 50) -> float:
    """Slope of a logistic recalibration ``logit(P(y)) = a + b * logit(score)`` (Cox 1958),
    fitted by Newton-Raphson without penalty. 1.0 is perfect; < 1 means over-confident."""
    p = np.clip(score, 1e-6, 1 - 1e-6)
    x = np.column_stack([np.ones_like(p), np.log(p / (1 - p))])
    beta = np.zeros(2)
    for _ in range(iterations):
        mu = 1 / (1 + np.exp(-x @ beta))
        w = mu * (1 - mu)
        hessian = x.T @ (x * w[:, None])
        step = np.linalg.solve(hessian + 1e-9 * np.eye(2), x.T @ (y_true - mu))
        beta += step
        if np.abs(step).max() < 1e-10:
            break
    return float(beta[1])


def subgroup_aurocs(predictions: pl.DataFrame, column: str) -> pl.DataFrame:
    rows = []
    for (group,), part in predictions.group_by([column], maintain_order=True):
        y = part["y_true"].to_numpy()
        positives, negatives = int(y.sum()), int(len(y) - y.sum())
        evaluable = positives >= MIN_CLASS_COUNT and negatives >= MIN_CLASS_COUNT
        auroc = float(roc_auc_score(y, part["score"].to_numpy())) if evaluable else None
        rows.append({"attribute": column, "group": str(group), "n": len(y), "positives": positives,
                     "auroc": auroc, "evaluable": evaluable})
    return pl.DataFrame(rows, schema={"attribute": pl.String, "group": pl.String, "n": pl.Int64,
                                      "positives": pl.Int64, "auroc": pl.Float64, "evaluable": pl.Boolean}).sort(
        ["attribute", "group"])


@dataclass
class ValidationReport:
    metrics: pl.DataFrame    # metric, value, rule, passed
    subgroups: pl.DataFrame  # attribute, group, n, positives, auroc, evaluable

    def passed(self, metric: str) -> bool:
        return bool(self.metrics.filter(pl.col("metric") == metric)["passed"][0])

    def rule(self, metric: str) -> str:
        return str(self.metrics.filter(pl.col("metric") == metric)["rule"][0])

    def value(self, metric: str) -> float:
        return float(self.metrics.filter(pl.col("metric") == metric)["value"][0])

    @property
    def all_passed(self) -> bool:
        return bool(self.metrics["passed"].all())


def validate(predictions: pl.DataFrame, cv_auroc_std: float, thresholds: Thresholds = Thresholds(),
             temporal_test_auroc: float = math.nan) -> ValidationReport:
    y = predictions["y_true"].to_numpy()
    s = predictions["score"].to_numpy()
    if len(set(y.tolist())) < 2:
        raise ValueError("held-out set has a single class: AUROC is undefined")
    subgroups = pl.concat([subgroup_aurocs(predictions, c) for c in ("sex", "age_group")])
    gaps = []
    for attribute in ("sex", "age_group"):
        values = subgroups.filter((pl.col("attribute") == attribute) & pl.col("evaluable"))["auroc"]
        gaps.append(float(values.max() - values.min()) if len(values) >= 2 else math.nan)
    worst_gap = max((g for g in gaps if not math.isnan(g)), default=math.nan)
    # A subgroup too small to measure is a subgroup whose performance nobody has checked.
    unevaluable = [f"{r['attribute']}={r['group']} (n={r['n']}, {r['positives']} positives)"
                   for r in subgroups.filter(~pl.col("evaluable")).iter_rows(named=True)]
    gap_rule = f"< {thresholds.max_subgroup_auroc_gap}"
    if unevaluable:
        gap_rule += f"; not evaluable (< {MIN_CLASS_COUNT} positives or negatives): " + ", ".join(unevaluable)

    auroc = float(roc_auc_score(y, s))
    sens = sensitivity_at_specificity(y, s, 0.90)
    slope = calibration_slope(y, s)
    low, high = thresholds.calibration_slope_range
    rows = [
        ("auroc", auroc, f">= {thresholds.min_auroc}", auroc >= thresholds.min_auroc),
        ("sensitivity_at_90_specificity", sens, f">= {thresholds.min_sensitivity_at_90_specificity}",
         sens >= thresholds.min_sensitivity_at_90_specificity),
        ("calibration_slope", slope, f"{low} to {high}", low <= slope <= high),
        # A gap that cannot be measured (too few cases in a subgroup) does not pass.
        ("subgroup_auroc_gap", worst_gap, gap_rule,
         not unevaluable and not math.isnan(worst_gap) and worst_gap < thresholds.max_subgroup_auroc_gap),
        # NaN (fewer than two folds with both classes) is not a pass
        ("cv_auroc_std", cv_auroc_std, f"< {thresholds.max_cv_auroc_std}", cv_auroc_std < thresholds.max_cv_auroc_std),
        # trained on earlier landmarks, tested on later ones: how the model will be used
        ("temporal_test_auroc", temporal_test_auroc, "reported", True),
        ("brier_score", float(brier_score_loss(y, s)), "reported", True),
        ("n_test", float(len(y)), "reported", True),
        ("test_positives", float(y.sum()), "reported", True),
    ]
    metrics = pl.DataFrame(rows, schema={"metric": pl.String, "value": pl.Float64, "rule": pl.String,
                                         "passed": pl.Boolean}, orient="row")
    return ValidationReport(metrics=metrics, subgroups=subgroups)


def save_report(con, model_version: int, report: ValidationReport) -> None:
    """Replace this model version's rows in ml.validation_report / ml.subgroup_performance."""
    con.execute("CREATE SCHEMA IF NOT EXISTS ml")
    con.execute("""CREATE TABLE IF NOT EXISTS ml.validation_report (
        model_version INTEGER, metric VARCHAR, value DOUBLE, rule VARCHAR, passed BOOLEAN)""")
    con.execute("""CREATE TABLE IF NOT EXISTS ml.subgroup_performance (
        model_version INTEGER, attribute VARCHAR, "group" VARCHAR, n BIGINT, positives BIGINT,
        auroc DOUBLE, evaluable BOOLEAN)""")
    with transaction(con):
        for table, frame in (("ml.validation_report", report.metrics), ("ml.subgroup_performance", report.subgroups)):
            con.execute(f"DELETE FROM {table} WHERE model_version = ?", [model_version])
            con.register("report_rows", frame.to_arrow())
            con.execute(f"INSERT INTO {table} SELECT ?, * FROM report_rows", [model_version])
            con.unregister("report_rows")
