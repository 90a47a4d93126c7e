import numpy as np
import polars as pl
import pytest

from clinical_ml.validation import Thresholds, calibration_slope, sensitivity_at_specificity, validate


def test_sensitivity_at_90_percent_specificity_on_a_known_ranking():
    # 10 negatives scored 0..9, 10 positives scored 8.5..17.5.
    y = np.array([0] * 10 + [1] * 10)
    s = np.array(list(range(10)) + [8.5 + i for i in range(10)], dtype=float)
    # threshold > 8 allows exactly one negative (9) above it -> fpr 0.1, all 10 positives above -> tpr 1.0
    assert sensitivity_at_specificity(y, s, 0.90) == 1.0
    # at specificity 1.0 no negative may pass: threshold > 9 -> positives 9.5.. -> 9 of 10
    assert sensitivity_at_specificity(y, s, 1.0) == 0.9


def test_calibration_slope_detects_over_and_under_confidence():
    rng = np.random.default_rng(0)
    logit = rng.normal(0, 1.5, 20000)
    p = 1 / (1 + np.exp(-logit))
    y = (rng.random(20000) < p).astype(int)
    assert calibration_slope(y, p) == pytest.approx(1.0, abs=0.05)
    overconfident = 1 / (1 + np.exp(-2 * logit))
    assert calibration_slope(y, overconfident) == pytest.approx(0.5, abs=0.05)


def _predictions(n=2000, seed=1, weak_group=None):
    rng = np.random.default_rng(seed)
    sex = rng.choice(["female", "male"], n)
    age = rng.choice(["18-44", "45-64", "65+"], n)
    y = rng.random(n) < 0.2
    signal = np.where(y, 1.0, -1.0) * 1.6
    if weak_group:
        signal = np.where(sex == weak_group, signal * 0.3, signal)
    score = 1 / (1 + np.exp(-(signal + rng.normal(0, 1, n) - 1.4)))
    return pl.DataFrame({"patient_key": [f"k{i}" for i in range(n)], "sex": sex, "age_group": age,
                         "race": "x", "y_true": y.astype(int), "score": score})


def test_report_applies_every_clinical_threshold():
    report = validate(_predictions(), cv_auroc_std=0.01, thresholds=Thresholds())
    assert set(report.metrics["metric"]) >= {"auroc", "sensitivity_at_90_specificity", "calibration_slope",
                                             "subgroup_auroc_gap", "cv_auroc_std", "brier_score"}
    assert report.passed("auroc") and report.value("auroc") > 0.85
    assert report.passed("subgroup_auroc_gap")
    assert not validate(_predictions(), cv_auroc_std=0.05).passed("cv_auroc_std")


def test_a_model_that_fails_one_subgroup_fails_the_gap_rule():
    report = validate(_predictions(weak_group="male"), cv_auroc_std=0.01)
    assert not report.passed("subgroup_auroc_gap") and report.value("subgroup_auroc_gap") > 0.1
    groups = report.subgroups.filter(pl.col("attribute") == "sex")
    assert groups.filter(pl.col("group") == "male")["auroc"][0] < groups.filter(pl.col("group") == "female")["auroc"][0]


def test_sensitivity_uses_every_operating_point_and_treats_ties_as_one():
    # 10 negatives, 10 positives. 5 positives at 0.9 -> (fpr 0, tpr .5); one positive and one
    # negative at 0.8 -> (.1, .6); again at 0.7 -> (.2, .7); the rest at 0.1. The three points
    # are collinear, so roc_curve's default drops (.1, .6), the answer at 90% specificity.
    y = np.array([1] * 5 + [1, 0] + [1, 0] + [1] * 3 + [0] * 8)
    s = np.array([0.9] * 5 + [0.8, 0.8] + [0.7, 0.7] + [0.1] * 11)
    assert sensitivity_at_specificity(y, s, 0.90) == pytest.approx(0.6)
    # a tie straddling the bound: 2 negatives and 2 positives at 0.8 -> (.2, .7) is over the
    # allowed fpr of .1, and the tie cannot be split, so the answer is the point before it
    y = np.array([1] * 5 + [1, 1, 0, 0] + [1] * 3 + [0] * 8)
    s = np.array([0.9] * 5 + [0.8] * 4 + [0.1] * 11)
    assert sensitivity_at_specificity(y, s, 0.90) == pytest.approx(0.5)


def test_a_subgroup_too_small_to_measure_fails_the_gap_rule_and_says_which():
    predictions = _predictions()
    tiny = predictions.head(6).with_columns(pl.lit("other").alias("sex"))
    report = validate(pl.concat([tiny, predictions.slice(6)]), cv_auroc_std=0.01)
    assert not report.passed("subgroup_auroc_gap")
    rule = report.metrics.filter(pl.col("metric") == "subgroup_auroc_gap")["rule"][0]
    assert "not evaluable" in rule and "sex=other (n=6" in rule
