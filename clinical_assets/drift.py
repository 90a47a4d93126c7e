import uuid

from dagster import (AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetExecutionContext, MaterializeResult,
                     MetadataValue, asset)

from clinical_assets.batches import FHIR_BATCHES
from clinical_assets.features import feature_matrix
from clinical_assets.metadata import markdown_table
from clinical_assets.model import trained_model
from clinical_assets.deidentified import leak_check_result
from clinical_ml.batches import downstream_identifier_leaks, model_window
from clinical_ml.drift import drift_table, evidently_report, save_drift_report
from clinical_ml.features import MODEL_FEATURES, read_feature_matrix
from clinical_ml.model_store import serving_model
from clinical_ml.plots import png_markdown, psi_bar_chart_png
from clinical_ml.policy import current_policy
from resources.deid_key import DeidKey
from resources.mlflow_tracking import MLflowTracking
from resources.settings import data_home
from resources.warehouse import DuckDBWarehouse


@asset(
    deps=[feature_matrix, trained_model],
    partitions_def=FHIR_BATCHES,
    group_name="monitoring",
    kinds={"duckdb", "evidently"},
    owners=["team:clinical-ml"],
    description="PSI and KS per model feature between a batch (partition) and the training data of the model in "
    "service (the registry's champion; before any champion, the latest model), plus an Evidently data-drift HTML "
    "report. History in `monitoring.drift_report`. `psi_drift_sensor` requests `retrain` when max PSI exceeds the "
    "clinical policy's threshold (the one this report and its check used); the retrain's window then includes "
    "this batch.",
    check_specs=[AssetCheckSpec("psi_within_policy", asset="drift_report",
                                description="No feature's PSI exceeds the clinical policy's retrain threshold "
                                "(warns; psi_drift_sensor is what acts on it)."),
                 AssetCheckSpec("drift_report_has_no_identifiers", asset="drift_report", blocking=True,
                                description="No original identifier value of any landed batch appears in "
                                "monitoring.drift_report.")],
)
def drift_report(context: AssetExecutionContext, warehouse: DuckDBWarehouse, mlflow: MLflowTracking,
                 deid_key: DeidKey) -> MaterializeResult:
    batch, store = context.partition_key, warehouse.batch_store()
    with warehouse.connect() as con:
        model = serving_model(con, mlflow.alias_version("champion"))
    reference = model_window(store, model.training_window).frame
    with store.read(batch) as con:
        current = read_feature_matrix(con)
    # one threshold for the report, its check and the sensor (which reads it from this metadata)
    policy = current_policy()
    threshold = policy.psi_retrain_threshold
    table = drift_table(reference, current, MODEL_FEATURES, threshold)
    report_id = str(uuid.uuid4())
    html_path = data_home() / "reports" / f"drift-{report_id}.html"
    evidently_psi = evidently_report(reference, current, MODEL_FEATURES, html_path, threshold)
    with warehouse.connect() as con:
        save_drift_report(con, report_id, batch, table, reference_model_version=model.model_version)
    leak_check = leak_check_result(downstream_identifier_leaks(
        store, warehouse.path, ["monitoring.drift_report"], deid_key.key(), aggregate=True), ["monitoring.drift_report"],
        check_name="drift_report_has_no_identifiers")
    drifted = table.filter("drifted")["feature"].to_list()
    max_psi = float(table["psi"].max())
    in_reference = batch in model.training_window["batches"]
    context.log.info(f"Batch {batch} vs model {model.model_version}'s training data: max PSI {max_psi:.3f}; "
                     f"drifted features: {drifted or 'none'}")
    return MaterializeResult(
        check_results=[leak_check, AssetCheckResult(
            check_name="psi_within_policy", passed=not drifted, severity=AssetCheckSeverity.WARN,
            description=f"max PSI {max_psi:.3f} against threshold {threshold} (policy {policy.version}); "
            f"drifted: {', '.join(drifted) or 'none'}",
            metadata={"max_psi": max_psi, "psi_threshold": threshold, "policy_version": policy.version})],
        metadata={
            "report_id": report_id,
            "batch": batch,
            "reference_model_version": model.model_version,
            "reference_batches": MetadataValue.json(model.training_window["batches"]),
            "batch_in_reference": in_reference,
            "current_rows": current.height,
            "max_psi": max_psi,
            "psi_threshold": threshold,
            "policy_version": policy.version,
            "drifted_features": MetadataValue.json(drifted),
            "psi_by_feature": MetadataValue.json(dict(zip(table["feature"], table["psi"]))),
            "evidently_psi_by_feature": MetadataValue.json(evidently_psi),
            "drift_table": markdown_table(table),
            "psi_chart": MetadataValue.md(png_markdown(psi_bar_chart_png(table, threshold), f"PSI per feature, {batch}")),
            "evidently_report": MetadataValue.path(str(html_path)),
        })
