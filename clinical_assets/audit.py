from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetExecutionContext, MaterializeResult, asset

from clinical_assets.deidentified import deidentified_fhir
from clinical_assets.drift import drift_report
from clinical_assets.features import feature_matrix
from clinical_assets.model import trained_model
from clinical_assets.raw_fhir import raw_fhir
from clinical_assets.validation import validation_report
from clinical_ml.audit import collect_pipeline_facts
from resources.audit_store import AuditStore
from resources.warehouse import DuckDBWarehouse


@asset(
    deps=[raw_fhir, deidentified_fhir, feature_matrix, trained_model, validation_report, drift_report],
    group_name="audit",
    kinds={"duckdb"},
    owners=["team:compliance"],
    description="One append-only, hash-chained record per run (`audit.audit_log`): hashes of raw "
    "inputs and every derived table, de-identification counts, model version, MLflow run id, "
    "training data hash, validation results and the latest drift summary.",
    check_specs=[AssetCheckSpec("audit_chain_intact", asset="audit_record",
                                description="Every record's hash matches its body and the previous hash.")],
)
def audit_record(context: AssetExecutionContext, warehouse: DuckDBWarehouse, audit_store: AuditStore) -> MaterializeResult:
    with warehouse.connect() as con:
        facts = collect_pipeline_facts(con)
    record = audit_store.append({"dagster_run_id": context.run_id, **facts})
    intact, broken_at = audit_store.verify()
    model = facts.get("model", {})
    return MaterializeResult(
        metadata={
            "sequence": record.sequence,
            "record_hash": record.record_hash,
            "previous_hash": record.previous_hash,
            "model_version": model.get("model_version"),
            "mlflow_run_id": model.get("mlflow_run_id"),
            "raw_input_sha256": facts["inputs"]["raw_input_sha256"],
            "feature_matrix_sha256": facts["outputs"]["feature_matrix_sha256"],
        },
        check_results=[AssetCheckResult(check_name="audit_chain_intact", passed=intact,
                                        severity=AssetCheckSeverity.ERROR,
                                        metadata={"first_broken_sequence": broken_at or 0})],
    )
