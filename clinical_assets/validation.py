from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, MaterializeResult, asset

from clinical_assets.metadata import markdown_table
from clinical_assets.model import trained_model
from clinical_ml.model_store import latest_model, test_predictions
from clinical_ml.policy import current_policy
from clinical_ml.validation import save_report, validate
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
    "sensitivity at 90% specificity, calibration slope, Brier score, AUROC per sex and age group. "
    "Each threshold is an asset check.",
    check_specs=[AssetCheckSpec(name, asset="validation_report",
                                description=f"Clinical threshold on {metric}, from the clinical policy file")
                 for name, metric in VALIDATION_CHECKS.items()],
)
def validation_report(warehouse: DuckDBWarehouse, mlflow: MLflowTracking) -> MaterializeResult:
    policy = current_policy()
    with warehouse.connect() as con:
        model = latest_model(con)
        # NaN metrics are stored as JSON null
        report = validate(test_predictions(con, model.model_version), _metric(model.metrics, "cv_auroc_std"),
                          policy.validation, temporal_test_auroc=_metric(model.metrics, "temporal_test_auroc"))
        save_report(con, model.model_version, report)
    if model.mlflow_run_id:
        mlflow.log_metrics_to_run(model.mlflow_run_id, {
            f"validation_{row['metric']}": row["value"] for row in report.metrics.iter_rows(named=True)
            if row["value"] == row["value"]})
    return MaterializeResult(
        metadata={
            "model_version": model.model_version,
            "all_thresholds_met": report.all_passed,
            "policy_version": policy.version,
            "report": markdown_table(report.metrics),
            "subgroups": markdown_table(report.subgroups),
            "auroc": report.value("auroc"),
            "calibration_slope": report.value("calibration_slope"),
        },
        check_results=[
            AssetCheckResult(check_name=name, passed=report.passed(metric), severity=AssetCheckSeverity.ERROR,
                             description=f"{metric} {report.value(metric):.4f}, rule {report.rule(metric)} "
                             f"(policy {policy.version})",
                             metadata={"value": report.value(metric), "rule": report.rule(metric),
                                       "policy_version": policy.version, "model_version": model.model_version})
            for name, metric in VALIDATION_CHECKS.items()
        ],
    )
