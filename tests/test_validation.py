import base64

import duckdb
import numpy as np
import polars as pl
import pytest
from sklearn.metrics import brier_score_loss, roc_auc_score

from clinical_ml import bootstrap, plots
from clinical_ml.validation import (Thresholds, calibration_slope, operating_point, save_report, sensitivity_at_specificity,
                                    validate)


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
    # a small race category (~1%, a handful of positives): too few to evaluate
    race = rng.choice(["White", "Black or African American", "Asian", "Native Hawaiian"], n, p=[0.6, 0.25, 0.14, 0.01])
    ethnicity = rng.choice(["Not Hispanic or Latino", "Hispanic or Latino", None], n, p=[0.8, 0.15, 0.05])
    return pl.DataFrame({"patient_key": [f"k{i}" for i in range(n)], "sex": sex, "age_group": age,
                         "race": race, "ethnicity": ethnicity, "y_true": y.astype(int), "score": score,
                         "baseline_score": 1 / (1 + np.exp(-(0.5 * signal + rng.normal(0, 1, n) - 1.4)))})


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


BOOTSTRAPPED = ["auroc", "sensitivity_at_90_specificity", "calibration_slope", "subgroup_auroc_gap", "brier_score"]


def _width(report, metric):
    low, high = report.ci(metric)
    return high - low


def test_every_metric_has_a_ci_that_holds_its_value_and_narrows_with_more_data():
    small = validate(_predictions(n=800), cv_auroc_std=0.01)
    large = validate(_predictions(n=8000), cv_auroc_std=0.01)
    for metric in BOOTSTRAPPED:
        for report in (small, large):
            low, high = report.ci(metric)
            assert low <= report.value(metric) <= high, metric
        assert _width(large, metric) < 0.7 * _width(small, metric), metric  # ~1/sqrt(10) in theory
    assert small.ci("cv_auroc_std") == (None, None)  # a spread of folds: nothing to resample
    subgroups = large.subgroups.filter(pl.col("evaluable"))
    assert ((subgroups["ci_low"] <= subgroups["auroc"]) & (subgroups["auroc"] <= subgroups["ci_high"])).all()


def test_the_vectorised_bootstrap_metrics_equal_the_reported_ones_with_unit_weights():
    predictions = _predictions()
    y, s = predictions["y_true"].to_numpy(), predictions["score"].to_numpy().round(2)  # with ties
    ones = np.ones((1, len(y)))
    assert bootstrap.auroc(y, s, ones)[0] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert bootstrap.sensitivity_at_specificity(y, s, ones)[0] == pytest.approx(sensitivity_at_specificity(y, s))
    assert bootstrap.calibration_slope(y, s, ones)[0] == pytest.approx(calibration_slope(y, s), abs=1e-8)
    assert bootstrap.brier_score(y, s, ones)[0] == pytest.approx(brier_score_loss(y, s))
    weights = 1.0 + (np.arange(len(y)) % 3)  # weights act as repeated rows, as in roc_auc_score
    assert bootstrap.auroc(y, s, weights[None, :])[0] == pytest.approx(roc_auc_score(y, s, sample_weight=weights))


def _clustered(patients=100, rows_per_patient=20, seed=5):
    """Each patient's landmarks share one outcome and nearly one score: a patient's rows are
    one piece of evidence, not twenty."""
    rng = np.random.default_rng(seed)
    y = np.repeat(rng.random(patients) < 0.3, rows_per_patient).astype(int)
    score = 1 / (1 + np.exp(-(np.repeat(rng.normal(0, 1.2, patients), rows_per_patient) + 1.2 * y - 1.2
                              + rng.normal(0, 0.05, len(y)))))
    return pl.DataFrame({"patient_key": np.repeat([f"p{i}" for i in range(patients)], rows_per_patient),
                         "sex": np.repeat(rng.choice(["female", "male"], patients), rows_per_patient),
                         "age_group": "45-64", "y_true": y, "score": score})


def test_the_bootstrap_resamples_patients_not_rows():
    predictions = _clustered()
    patients = predictions["patient_key"].to_numpy()
    for weights in bootstrap.patient_resamples(patients, 50, seed=1):
        per_patient = pl.DataFrame({"patient": patients, "w": weights[0]}).group_by("patient").agg(
            pl.col("w").n_unique().alias("distinct"), pl.col("w").first())
        assert (per_patient["distinct"] == 1).all()  # a patient's landmarks are drawn together
        assert per_patient["w"].sum() == 100  # 100 patients drawn, each draw counting all its rows
    by_patient = validate(predictions, cv_auroc_std=0.01)
    # the same rows, each row its own "patient": row resampling, which would overstate the evidence
    by_row = validate(predictions.with_columns(pl.int_range(pl.len()).cast(pl.String).alias("patient_key")), 0.01)
    assert by_patient.value("auroc") == by_row.value("auroc")
    assert _width(by_patient, "auroc") > 3 * _width(by_row, "auroc")  # ~sqrt(20) with 20 rows a patient


def test_the_bootstrap_is_deterministic_for_a_seed():
    predictions = _predictions(n=1000)
    first, again = validate(predictions, 0.01), validate(predictions, 0.01)
    assert first.metrics.equals(again.metrics) and first.subgroups.equals(again.subgroups)
    other = validate(predictions, 0.01, bootstrap_seed=7)
    assert other.value("auroc") == first.value("auroc") and other.ci("auroc") != first.ci("auroc")


def test_race_and_ethnicity_are_reported_with_counts_and_cis_but_not_gated():
    predictions = _predictions(n=4000)
    report = validate(predictions, cv_auroc_std=0.01)
    subgroups = report.subgroups
    assert set(subgroups["attribute"]) == {"sex", "age_group", "race", "ethnicity"}
    race = subgroups.filter(pl.col("attribute") == "race")
    expected = predictions.group_by("race").agg(n=pl.len(), positives=pl.col("y_true").sum()).rename({"race": "group"})
    assert race.select("group", "n", "positives").sort("group").equals(
        expected.with_columns(pl.col("positives").cast(pl.Int64), pl.col("n").cast(pl.Int64)).sort("group"))
    tiny = race.row(by_predicate=pl.col("group") == "Native Hawaiian", named=True)
    assert not tiny["evaluable"] and tiny["auroc"] is None and tiny["ci_low"] is None
    assert race.filter(pl.col("evaluable"))["ci_low"].is_not_null().all()
    # a missing ethnicity is a group of its own, named as the feature matrix names it
    assert "Unknown" in subgroups.filter(pl.col("attribute") == "ethnicity")["group"].to_list()
    # reported with their gap; the tiny category is named but fails nothing
    assert "race=Native Hawaiian" in report.rule("race_auroc_gap") and report.passed("race_auroc_gap")
    assert report.ci("ethnicity_auroc_gap")[0] is not None
    assert report.passed("subgroup_auroc_gap") and "race" not in report.rule("subgroup_auroc_gap")


def test_the_gap_names_its_worst_subgroup():
    report = validate(_predictions(weak_group="male"), cv_auroc_std=0.01)
    assert report.worst_subgroup("subgroup_auroc_gap") == "sex=male"
    description = report.describe("subgroup_auroc_gap")
    assert "worst subgroup sex=male" in description and "95% CI" in description and "rule < 0.05" in description
    assert report.worst_subgroup("auroc") is None


def test_the_report_is_saved_with_its_cis_into_a_warehouse_made_before_them():
    con = duckdb.connect()
    con.execute("""CREATE SCHEMA ml;
        CREATE TABLE ml.validation_report (model_version INTEGER, metric VARCHAR, value DOUBLE, rule VARCHAR,
                                           passed BOOLEAN);
        CREATE TABLE ml.subgroup_performance (model_version INTEGER, attribute VARCHAR, "group" VARCHAR, n BIGINT,
                                              positives BIGINT, auroc DOUBLE, evaluable BOOLEAN);
        INSERT INTO ml.validation_report VALUES (1, 'auroc', 0.9, '>= 0.85', true)""")
    report = validate(_predictions(n=1000), cv_auroc_std=0.01)
    save_report(con, 2, report)
    saved = con.execute("SELECT value, ci_low, ci_high FROM ml.validation_report WHERE model_version = 2 "
                        "AND metric = 'auroc'").fetchone()
    assert saved == (report.value("auroc"), *report.ci("auroc"))
    assert con.execute("SELECT count(*) FROM ml.subgroup_performance WHERE model_version = 2 AND "
                       "evaluable AND ci_low <= auroc AND auroc <= ci_high").fetchone()[0] == \
        report.subgroups["evaluable"].sum()
    assert con.execute("SELECT worst_subgroup FROM ml.validation_report WHERE metric = 'subgroup_auroc_gap'"
                       ).fetchone()[0] == report.worst_subgroup("subgroup_auroc_gap")


def test_plots_are_png_images_embedded_in_markdown():
    predictions = _predictions()
    psi = pl.DataFrame({"feature": ["sbp_mean", "bmi_last", "age"], "psi": [0.31, 0.05, None]})
    for png in (plots.roc_curve_png(predictions), plots.calibration_curve_png(predictions),
                plots.psi_bar_chart_png(psi, threshold=0.2), plots.roc_curve_png(predictions.drop("baseline_score"))):
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) < 100_000
    markdown = plots.png_markdown(png, "ROC curve")
    assert markdown.startswith("![ROC curve](data:image/png;base64,") and markdown.endswith(")")
    assert base64.b64decode(markdown.split(",", 1)[1][:-1]) == png


def test_the_calibration_curve_plots_deciles_of_predicted_risk():
    predictions = _predictions()
    deciles = plots.calibration_deciles(predictions)
    assert deciles.height == 10 and deciles["n"].sum() == predictions.height and (deciles["n"] == 200).all()
    assert deciles["predicted"].is_sorted()
    assert deciles["observed"].dot(deciles["n"]) == pytest.approx(predictions["y_true"].sum())


def test_the_operating_point_is_the_threshold_the_sensitivity_gate_measures():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 2000)
    score = np.clip(0.3 * y + rng.normal(0.35, 0.2, 2000), 0, 1)
    point = operating_point(y, score)
    alert = score >= point["threshold"]
    assert point["sensitivity"] == sensitivity_at_specificity(y, score) == alert[y == 1].mean()
    assert point["specificity"] == 1 - alert[y == 0].mean() >= 0.90
    assert point["alert_rate"] == alert.mean() and point["ppv"] == y[alert].mean()
