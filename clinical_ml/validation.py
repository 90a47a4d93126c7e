"""Clinical validation of held-out predictions against the platform's thresholds."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import polars as pl
from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve

from clinical_ml import bootstrap
from clinical_ml.db import transaction
from clinical_ml.policy import Thresholds

MIN_CLASS_COUNT = 10  # a subgroup needs this many positives and negatives for a meaningful AUROC
# Subgroup attributes. Sex and age group are gated (subgroup_auroc_gap): every site has enough
# cases in each. Race and ethnicity are reported with their gap (race_auroc_gap,
# ethnicity_auroc_gap) but not gated: their categories are often tiny in real data, and a gate
# that fails whenever one is not evaluable would fail every model there and so say nothing.
GATED_SUBGROUPS = ("sex", "age_group")
REPORTED_SUBGROUPS = ("race", "ethnicity")
# Bootstrap CIs are evidence for a reviewer; a few hundred replicates give stable 95% bounds
# (to ~0.005 AUROC) in well under a second on 10k rows. Fixed seed: the same report every run.
BOOTSTRAP_SAMPLES = 200
BOOTSTRAP_SEED = 20261126
# The operating point the sensitivity gate is measured at, and the one the service alerts at.
OPERATING_SPECIFICITY = 0.90


def _best_point(y_true: np.ndarray, score: np.ndarray, specificity: float) -> tuple[float, float, float]:
    """(sensitivity, specificity, threshold) of the point with the highest sensitivity among
    those whose specificity is at least ``specificity``."""
    # Every threshold: the default drops collinear points, and the best point under the
    # specificity bound can be one of them. Tied scores share one threshold (one point).
    fpr, tpr, thresholds = roc_curve(y_true, score, drop_intermediate=False)
    allowed = np.flatnonzero(fpr <= (1.0 - specificity) + 1e-12)  # never empty: the first point has fpr 0
    best = allowed[np.argmax(tpr[allowed])]
    return float(tpr[best]), float(1.0 - fpr[best]), float(thresholds[best])


def sensitivity_at_specificity(y_true: np.ndarray, score: np.ndarray,
                               specificity: float = OPERATING_SPECIFICITY) -> float:
    """Highest sensitivity among operating points whose specificity is at least ``specificity``."""
    return _best_point(y_true, score, specificity)[0]


def operating_point(y_true: np.ndarray, score: np.ndarray, specificity: float = OPERATING_SPECIFICITY) -> dict:
    """The alert threshold: a score at or above it alerts. The point the sensitivity gate
    measures (see ``sensitivity_at_specificity``), with what it achieved there."""
    y_true, score = np.asarray(y_true), np.asarray(score)
    sensitivity, achieved, threshold = _best_point(y_true, score, specificity)
    threshold = min(threshold, 1.0)  # roc_curve's first threshold is +inf (nobody alerts)
    alert = score >= threshold
    return {"threshold": threshold, "target_specificity": specificity, "sensitivity": sensitivity,
            "specificity": achieved, "ppv": float(y_true[alert].mean()) if alert.any() else None,
            "alert_rate": float(alert.mean())}


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


def _bootstrap(predictions: pl.DataFrame, subgroups: pl.DataFrame, samples: int, seed: int) -> dict:
    """Replicate values of each overall metric (by name) and each evaluable subgroup's AUROC (by
    (attribute, group)), all from the same patient resamples."""
    y, s = predictions["y_true"].to_numpy(), predictions["score"].to_numpy()
    masks = {(r["attribute"], r["group"]): (predictions[r["attribute"]] == r["group"]).to_numpy()
             for r in subgroups.filter(pl.col("evaluable")).iter_rows(named=True)}
    chunks = []
    for weights in bootstrap.patient_resamples(predictions["patient_key"].to_numpy(), samples, seed):
        chunks.append({
            "auroc": bootstrap.auroc(y, s, weights),
            "sensitivity_at_90_specificity": bootstrap.sensitivity_at_specificity(y, s, weights, OPERATING_SPECIFICITY),
            "calibration_slope": bootstrap.calibration_slope(y, s, weights),
            "brier_score": bootstrap.brier_score(y, s, weights),
            **{key: bootstrap.auroc(y[mask], s[mask], weights[:, mask]) for key, mask in masks.items()},
        })
    return {key: np.concatenate([chunk[key] for chunk in chunks]) for key in chunks[0]}


def _gap(subgroups: pl.DataFrame, replicates: dict, attribute: str) -> tuple[float, np.ndarray, str | None]:
    """AUROC gap (best - worst evaluable group) of one attribute, its replicates, and the worst group.
    A max - min over noisy groups is biased upward, more so with small groups: its CI leans
    high, which for a fairness figure errs on the cautious side."""
    groups = subgroups.filter((pl.col("attribute") == attribute) & pl.col("evaluable")).sort("auroc")
    if groups.height < 2:
        return math.nan, np.full(len(replicates["auroc"]), np.nan), None
    per_group = np.vstack([replicates[(attribute, g)] for g in groups["group"]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a replicate where every group lost a class
        gaps = np.nanmax(per_group, axis=0) - np.nanmin(per_group, axis=0)
    return float(groups["auroc"].max() - groups["auroc"].min()), gaps, f"{attribute}={groups['group'][0]}"


def _unevaluable(subgroups: pl.DataFrame, attributes) -> str:
    """A subgroup too small to measure is a subgroup whose performance nobody has checked: say which."""
    names = [f"{r['attribute']}={r['group']} (n={r['n']}, {r['positives']} positives)" for r in
             subgroups.filter(pl.col("attribute").is_in(list(attributes)) & ~pl.col("evaluable")).iter_rows(named=True)]
    return f"not evaluable (< {MIN_CLASS_COUNT} positives or negatives): " + ", ".join(names) if names else ""


def _interval(row: dict) -> str:
    return "" if row["ci_low"] is None else f", 95% CI {row['ci_low']:.4f} to {row['ci_high']:.4f}"


def _ci(values: np.ndarray) -> tuple[float | None, float | None]:
    low, high = bootstrap.percentile_ci(values)
    return (None, None) if math.isnan(low) else (low, high)


METRICS_SCHEMA = {"metric": pl.String, "value": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64,
                  "rule": pl.String, "passed": pl.Boolean, "worst_subgroup": pl.String}
SUBGROUPS_SCHEMA = {"attribute": pl.String, "group": pl.String, "n": pl.Int64, "positives": pl.Int64,
                    "auroc": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64, "evaluable": pl.Boolean}


@dataclass
class ValidationReport:
    metrics: pl.DataFrame    # metric, value, ci_low, ci_high (95% patient bootstrap), rule, passed, worst_subgroup
    subgroups: pl.DataFrame  # attribute, group, n, positives, auroc, ci_low, ci_high, evaluable
    bootstrap_samples: int = BOOTSTRAP_SAMPLES
    bootstrap_seed: int = BOOTSTRAP_SEED

    def _row(self, metric: str) -> dict:
        return self.metrics.row(by_predicate=pl.col("metric") == metric, named=True)

    def passed(self, metric: str) -> bool:
        return bool(self._row(metric)["passed"])

    def rule(self, metric: str) -> str:
        return str(self._row(metric)["rule"])

    def value(self, metric: str) -> float:
        return float(self._row(metric)["value"])

    def ci(self, metric: str) -> tuple[float | None, float | None]:
        row = self._row(metric)
        return row["ci_low"], row["ci_high"]

    def worst_subgroup(self, metric: str) -> str | None:
        return self._row(metric)["worst_subgroup"]

    def describe(self, metric: str) -> str:
        """One line for a reviewer: value, CI, rule and (for a gap) the subgroup at its low end."""
        row = self._row(metric)
        text = f"{metric} {row['value']:.4f}{_interval(row)}, rule {row['rule']}"
        if row["worst_subgroup"]:
            attribute, group = row["worst_subgroup"].split("=", 1)
            worst = self.subgroups.row(by_predicate=(pl.col("attribute") == attribute) & (pl.col("group") == group),
                                       named=True)
            text += (f"; worst subgroup {row['worst_subgroup']} "
                     f"(n={worst['n']}, AUROC {worst['auroc']:.4f}{_interval(worst)})")
        return text

    @property
    def all_passed(self) -> bool:
        return bool(self.metrics["passed"].all())


def validate(predictions: pl.DataFrame, cv_auroc_std: float, thresholds: Thresholds = Thresholds(),
             temporal_test_auroc: float = math.nan, bootstrap_samples: int = BOOTSTRAP_SAMPLES,
             bootstrap_seed: int = BOOTSTRAP_SEED) -> ValidationReport:
    """Point estimates judged against the thresholds, each with a 95% CI from a bootstrap that
    resamples patients (``patient_key``), and AUROC per subgroup of sex, age group, race and
    ethnicity (race and ethnicity when the predictions carry them)."""
    y = predictions["y_true"].to_numpy()
    s = predictions["score"].to_numpy()
    if len(set(y.tolist())) < 2:
        raise ValueError("held-out set has a single class: AUROC is undefined")
    attributes = [*GATED_SUBGROUPS, *(a for a in REPORTED_SUBGROUPS if a in predictions.columns)]
    # a missing category is a group of its own, named as the feature matrix names it
    predictions = predictions.with_columns(pl.col(attributes).cast(pl.String).fill_null("Unknown"))
    subgroups = pl.concat([subgroup_aurocs(predictions, a) for a in attributes])

    auroc = float(roc_auc_score(y, s))
    sens = sensitivity_at_specificity(y, s, OPERATING_SPECIFICITY)
    slope = calibration_slope(y, s)
    brier = float(brier_score_loss(y, s))
    replicates = _bootstrap(predictions, subgroups, bootstrap_samples, bootstrap_seed)
    cis = [_ci(replicates[(r["attribute"], r["group"])]) if r["evaluable"] else (None, None)
           for r in subgroups.iter_rows(named=True)]
    subgroups = subgroups.with_columns(
        pl.Series("ci_low", [c[0] for c in cis], pl.Float64), pl.Series("ci_high", [c[1] for c in cis], pl.Float64),
    ).select(list(SUBGROUPS_SCHEMA))

    # The gated gap is the widest of sex's and age group's; its worst subgroup is the lowest
    # evaluable group of that attribute (the group that makes the gate fail; another attribute
    # may have a lower AUROC with a narrower gap). Each replicate takes its own widest gap.
    gated = [_gap(subgroups, replicates, a) for a in GATED_SUBGROUPS]
    measured = [g for g in gated if not math.isnan(g[0])]
    gap, _, gap_worst = max(measured, key=lambda g: g[0], default=(math.nan, None, None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        gap_replicates = np.nanmax(np.vstack([g[1] for g in gated]), axis=0)
    unevaluable = _unevaluable(subgroups, GATED_SUBGROUPS)
    gap_rule = f"< {thresholds.max_subgroup_auroc_gap}" + (f"; {unevaluable}" if unevaluable else "")

    low, high = thresholds.calibration_slope_range
    no_ci = (None, None)
    # Gates judge the point estimate, as the policy states its thresholds; the CI is evidence
    # for the reviewer (a point just above a threshold with a CI far below it reads differently).
    rows = [
        ("auroc", auroc, *_ci(replicates["auroc"]), f">= {thresholds.min_auroc}", auroc >= thresholds.min_auroc, None),
        ("sensitivity_at_90_specificity", sens, *_ci(replicates["sensitivity_at_90_specificity"]),
         f">= {thresholds.min_sensitivity_at_90_specificity}", sens >= thresholds.min_sensitivity_at_90_specificity,
         None),
        ("calibration_slope", slope, *_ci(replicates["calibration_slope"]), f"{low} to {high}",
         low <= slope <= high, None),
        # A gap that cannot be measured (too few cases in a subgroup) does not pass.
        ("subgroup_auroc_gap", gap, *_ci(gap_replicates), gap_rule,
         not unevaluable and not math.isnan(gap) and gap < thresholds.max_subgroup_auroc_gap, gap_worst),
        # NaN (fewer than two folds with both classes) is not a pass; no CI: it is a spread of folds
        ("cv_auroc_std", cv_auroc_std, *no_ci, f"< {thresholds.max_cv_auroc_std}",
         cv_auroc_std < thresholds.max_cv_auroc_std, None),
        # trained on earlier landmarks, tested on later ones: how the model will be used
        ("temporal_test_auroc", temporal_test_auroc, *no_ci, "reported", True, None),
        ("brier_score", brier, *_ci(replicates["brier_score"]), "reported", True, None),
    ]
    for attribute in REPORTED_SUBGROUPS:
        if attribute not in attributes:
            rows.append((f"{attribute}_auroc_gap", math.nan, *no_ci, f"reported; no {attribute} in the predictions",
                         True, None))
            continue
        value, replicate_gaps, worst = _gap(subgroups, replicates, attribute)
        too_small = _unevaluable(subgroups, [attribute])
        rows.append((f"{attribute}_auroc_gap", value, *_ci(replicate_gaps),
                     "reported" + (f"; {too_small}" if too_small else ""), True, worst))
    rows += [
        ("n_test", float(len(y)), *no_ci, "reported", True, None),
        ("test_patients", float(predictions["patient_key"].n_unique()), *no_ci, "reported", True, None),
        ("test_positives", float(y.sum()), *no_ci, "reported", True, None),
    ]
    metrics = pl.DataFrame(rows, schema=METRICS_SCHEMA, orient="row")
    return ValidationReport(metrics=metrics, subgroups=subgroups, bootstrap_samples=bootstrap_samples,
                            bootstrap_seed=bootstrap_seed)


_DDL = """
CREATE SCHEMA IF NOT EXISTS ml;
CREATE TABLE IF NOT EXISTS ml.validation_report (
    model_version INTEGER, metric VARCHAR, value DOUBLE, rule VARCHAR, passed BOOLEAN);
CREATE TABLE IF NOT EXISTS ml.subgroup_performance (
    model_version INTEGER, attribute VARCHAR, "group" VARCHAR, n BIGINT, positives BIGINT,
    auroc DOUBLE, evaluable BOOLEAN);
-- bootstrap CIs and the worst subgroup, added to warehouses made before them
ALTER TABLE ml.validation_report ADD COLUMN IF NOT EXISTS ci_low DOUBLE;
ALTER TABLE ml.validation_report ADD COLUMN IF NOT EXISTS ci_high DOUBLE;
ALTER TABLE ml.validation_report ADD COLUMN IF NOT EXISTS worst_subgroup VARCHAR;
ALTER TABLE ml.subgroup_performance ADD COLUMN IF NOT EXISTS ci_low DOUBLE;
ALTER TABLE ml.subgroup_performance ADD COLUMN IF NOT EXISTS ci_high DOUBLE;
"""


def save_report(con, model_version: int, report: ValidationReport) -> None:
    """Replace this model version's rows in ml.validation_report / ml.subgroup_performance."""
    con.execute(_DDL)
    with transaction(con):
        for table, frame in (("ml.validation_report", report.metrics), ("ml.subgroup_performance", report.subgroups)):
            con.execute(f"DELETE FROM {table} WHERE model_version = ?", [model_version])
            con.register("report_rows", frame.to_arrow())
            # by name: columns added later sit at the end of an older table
            con.execute(f"INSERT INTO {table} BY NAME SELECT ?::INTEGER AS model_version, * FROM report_rows",
                        [model_version])
            con.unregister("report_rows")
