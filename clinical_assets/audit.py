import polars as pl
from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetExecutionContext, MaterializeResult, asset

from clinical_assets.deidentified import deidentified_fhir
from clinical_assets.drift import drift_report
from clinical_assets.features import feature_matrix
from clinical_assets.metadata import markdown_table
from clinical_assets.model import trained_model
from clinical_assets.raw_fhir import raw_fhir
from clinical_assets.validation import validation_report
from clinical_ml.audit import batch_facts, model_facts
from resources.audit_store import AuditStore
from resources.warehouse import DuckDBWarehouse


@asset(
    # not after model_promotion: a refused challenger (a failed blocking gate) must still get its run audited
    deps=[raw_fhir, deidentified_fhir, feature_matrix, trained_model, validation_report, drift_report],
    group_name="audit",
    kinds={"duckdb"},
    owners=["team:compliance"],
    description="One append-only, hash-chained record per run (`audit.audit_log`): the latest model (version, "
    "MLflow run, training data hash and window), validation results, the latest drift summary, and for every "
    "batch it trained on (and the run's own batch) the hashes of raw inputs and derived tables and the "
    "de-identification counts.",
    check_specs=[AssetCheckSpec("audit_chain_intact", asset="audit_record",
                                description="Every record's hash matches its body and the previous hash.")],
)
def audit_record(context: AssetExecutionContext, warehouse: DuckDBWarehouse, audit_store: AuditStore) -> MaterializeResult:
    with warehouse.connect() as con:
        facts = model_facts(con)
    window = (facts.get("model") or {}).get("training_window") or {}
    keys = sorted(set(window.get("batches", [])) | ({context.partition_key} if context.has_partition_key else set()))
    store = warehouse.batch_store()
    batches = {}
    for key in keys:
        with store.read(key) as con:
            batches[key] = batch_facts(con)
    record = audit_store.append({"dagster_run_id": context.run_id, **facts, "batches": batches})
    intact, broken_at = audit_store.verify()
    model = facts.get("model", {})
    hashes = pl.DataFrame({"batch": keys, "raw_input_sha256": [batches[k]["inputs"]["raw_input_sha256"] for k in keys],
                           "feature_matrix_sha256": [batches[k]["outputs"].get("feature_matrix_sha256") for k in keys]},
                          schema={"batch": pl.String, "raw_input_sha256": pl.String, "feature_matrix_sha256": pl.String})
    return MaterializeResult(
        metadata={
            "sequence": record.sequence,
            "record_hash": record.record_hash,
            "previous_hash": record.previous_hash,
            "model_version": model.get("model_version"),
            "mlflow_run_id": model.get("mlflow_run_id"),
            "training_data_sha256": model.get("training_data_hash"),
            "batches": markdown_table(hashes),
        },
        check_results=[AssetCheckResult(check_name="audit_chain_intact", passed=intact,
                                        severity=AssetCheckSeverity.ERROR,
                                        metadata={"first_broken_sequence": broken_at or 0})],
    )
