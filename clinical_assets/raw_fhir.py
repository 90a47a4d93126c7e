from dagster import (AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetExecutionContext, MaterializeResult,
                     MetadataValue, asset)

from clinical_assets.batches import FHIR_BATCHES
from clinical_assets.metadata import counts_table
from clinical_ml.batches import previous_landed, seed_raw_from
from clinical_ml.ingest import export_completeness, land_ndjson, record_completeness
from resources.fhir_source import FhirSource
from resources.warehouse import DuckDBWarehouse


@asset(
    partitions_def=FHIR_BATCHES,
    group_name="ingestion",
    kinds={"fhir", "duckdb"},
    owners=["team:data-platform"],
    description="One data batch (partition) of FHIR R4 Bulk Data NDJSON (from a Bulk Data server, a folder, or "
    "the synthetic generator) landed as raw tables keyed by resource id, in the batch's own DuckDB file (schema "
    "`raw`, PHI: inside the de-identification boundary). Malformed lines go to `raw.quarantine` with file, line "
    "and reason; an incremental (`_since`) export is merged onto the previous batch's tables and applies its "
    "deletions, so every batch is a whole snapshot.",
    check_specs=[AssetCheckSpec("lines_reconcile", asset="raw_fhir",
                                description="Every line read is either loaded or quarantined."),
                 AssetCheckSpec("export_complete", asset="raw_fhir", blocking=True,
                                description="The server reported no export errors (OperationOutcomes in the "
                                "manifest's error files), or no more than FHIR_MAX_EXPORT_ERRORS. Blocking: a "
                                "partial export stops the graph before de-identification.")],
)
def raw_fhir(context: AssetExecutionContext, fhir_source: FhirSource, warehouse: DuckDBWarehouse) -> MaterializeResult:
    store, key = warehouse.batch_store(), context.partition_key
    source = store.source(key)
    described = source.describe() if source.kind != "configured" else fhir_source.describe()
    context.log.info(f"Landing batch {key} from {described}")
    batch = fhir_source.fetch_batch(source, log=context.log.info)
    previous = previous_landed(store, key) if batch.mode == "merge" else None
    with warehouse.connect_batch(key) as con:
        if previous:
            seed_raw_from(con, store, previous)
        report = land_ndjson(con, batch.directory, mode=batch.mode, validate=fhir_source.validation)
        completeness = export_completeness(con, report.landing_id, fhir_source.max_export_errors)
        record_completeness(con, completeness, report.landing_id)
    metadata = {
        "batch": key,
        "source": described,
        "merged_onto_batch": previous or "",
        "mode": report.mode,
        "lines_read": report.lines_read,
        "loaded": report.loaded,
        "quarantined": report.quarantined,
        "deleted": report.deleted,
        "server_errors": report.export_errors,
        "server_errors_by_type": counts_table(completeness.errors_by_type, "resource type", "errors"),
        "resources_by_type": counts_table(report.loaded_by_type, "resource type", "rows"),
        "quarantine_reasons": counts_table(report.quarantined_by_reason, "reason", "lines"),
        "files": MetadataValue.json(report.files),
        "skipped_files": MetadataValue.json(report.skipped_files),
    }
    if batch.export is not None:
        if completeness.complete:  # an incomplete export must not move the _since watermark
            fhir_source.record_landed_export(batch.export)
        metadata["export_transaction_time"] = batch.export.transaction_time
        metadata["export_files"] = MetadataValue.json(
            [{"type": f.resource_type, "kind": f.kind, "sha256": f.sha256, "bytes": f.bytes} for f in batch.export.files])
    return MaterializeResult(
        metadata=metadata,
        check_results=[
            AssetCheckResult(
                check_name="lines_reconcile", passed=report.reconciles,
                metadata={"lines_read": report.lines_read, "loaded": report.loaded, "quarantined": report.quarantined},
            ),
            AssetCheckResult(
                check_name="export_complete", passed=completeness.complete, severity=AssetCheckSeverity.ERROR,
                description=completeness.describe(),
                metadata={"server_errors": completeness.errors, "tolerance": completeness.tolerance,
                          "errors_by_type": counts_table(completeness.errors_by_type, "resource type", "errors")},
            ),
        ],
    )
