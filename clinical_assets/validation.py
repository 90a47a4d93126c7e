from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, MaterializeResult, MetadataValue, asset

from clinical_assets.metadata import markdown_table
from clinical_assets.model import trained_model
from clinical_ml.model_store import latest_model, test_predictions
from clinical_ml.plots import calibration_curve_png, png_markdown, roc_curve_png
from clinical_ml.policy import current_policy
from clinical_ml.validation import ValidationReport, save_report, validate
from resources.mlflow_tracking import MLflowTracking
from resources.warehouse import DuckDBWarehouse

# Asset check name -> metric in the report. Each is a clinical acceptance rule whose threshold
# lives in the policy file (clinical_ml/clinical_policy.toml), not in the name.
VALIDATION_CHECKS = {
    "auroc_gate": "auroc",
    "sensitivity_at_90_specificity_gate": "sensitivity_at_90_specificity",
    "calibration_slope_gate": "calibration_slope",
    "subgroup_auroc_gap_gate": "subgroup_auroc_gap",
    "cv_auroc_std_gate": "cv_auroc_std",
}


def _metric(metrics: dict, name: str) -> float:
    value = metrics.get(name)
    return float("nan") if value is None else float(value)


@asset(
    deps=[trained_model],
    group_name="validation",
    kinds={"duckdb", "scikitlearn"},
    owners=["team:clinical-ml"],
    description="Held-out validation of the latest model against clinical thresholds: AUROC, "
    "sensitivity at 90% specificity, calibration slope, Brier score, AUROC per sex, age group, race and "
    "ethnicity, each with a 95% patient-level bootstrap CI; ROC and calibration curves. "
    "Each threshold is an asset check (judged on the point estimate; the CI is evidence).",
    check_specs=[AssetCheckSpec(name, asset="validation_report",
                                description=f"Clinical threshold on {metric}, from the clinical policy file")
                 for name, metric in VALIDATION_CHECKS.items()],
)
def validation_report(warehouse: DuckDBWarehouse, mlflow: MLflowTracking) -> MaterializeResult:
    policy = current_policy()
    with warehouse.connect() as con:
        model = latest_model(con)
        predictions = test_predictions(con, model.model_version)
        # NaN metrics are stored as JSON null
        report = validate(predictions, _metric(model.metrics, "cv_auroc_std"), policy.validation,
                          temporal_test_auroc=_metric(model.metrics, "temporal_test_auroc"))
        save_report(con, model.model_version, report)
    if model.mlflow_run_id:
        mlflow.log_metrics_to_run(model.mlflow_run_id, {
            f"validation_{row['metric']}{suffix}": row[column] for row in report.metrics.iter_rows(named=True)
            for column, suffix in (("value", ""), ("ci_low", "_ci_low"), ("ci_high", "_ci_high"))
            if row[column] is not None and row[column] == row[column]})
    return MaterializeResult(
        metadata={
            "model_version": model.model_version,
            "all_thresholds_met": report.all_passed,
            "policy_version": policy.version,
            "report": markdown_table(report.metrics),
            "subgroups": markdown_table(report.subgroups),
            "roc_curve": _figure(roc_curve_png(predictions), "ROC curve"),
            "calibration_curve": _figure(calibration_curve_png(predictions), "Calibration curve"),
            "auroc": report.value("auroc"),
            "calibration_slope": report.value("calibration_slope"),
            "bootstrap": f"95% percentile CIs from {report.bootstrap_samples} patient resamples, "
                         f"seed {report.bootstrap_seed}",
        },
        check_results=[_check_result(name, metric, report, policy.version, model.model_version)
                       for name, metric in VALIDATION_CHECKS.items()],
    )


def _figure(png: bytes, title: str) -> MetadataValue:
    return MetadataValue.md(png_markdown(png, title))


def _check_result(name: str, metric: str, report: ValidationReport, policy_version: str,
                  model_version: int) -> AssetCheckResult:
    ci_low, ci_high = report.ci(metric)
    return AssetCheckResult(
        check_name=name, passed=report.passed(metric), severity=AssetCheckSeverity.ERROR,
        description=f"{report.describe(metric)} (policy {policy_version}; the gate judges the value, not the CI)",
        metadata={"value": report.value(metric), "rule": report.rule(metric), "ci_low": ci_low, "ci_high": ci_high,
                  "worst_subgroup": report.worst_subgroup(metric), "policy_version": policy_version,
                  "model_version": model_version})
