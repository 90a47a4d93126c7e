from dagster import AssetCheckResult, AssetCheckSpec, AssetExecutionContext, MaterializeResult, MetadataValue, asset

from clinical_assets.metadata import counts_table
from clinical_ml.ingest import land_ndjson
from resources.fhir_source import FhirSource
from resources.warehouse import DuckDBWarehouse


@asset(
    group_name="ingestion",
    kinds={"fhir", "duckdb"},
    owners=["team:data-platform"],
    description="FHIR R4 Bulk Data NDJSON landed as raw tables (schema `raw`, PHI: inside the "
    "de-identification boundary). Malformed lines go to `raw.quarantine` with file, line and reason.",
    check_specs=[AssetCheckSpec("lines_reconcile", asset="raw_fhir",
                                description="Every line read is either loaded or quarantined.")],
)
def raw_fhir(context: AssetExecutionContext, fhir_source: FhirSource, warehouse: DuckDBWarehouse) -> MaterializeResult:
    context.log.info(f"Landing FHIR NDJSON from {fhir_source.describe()}")
    directory = fhir_source.export_directory()
    with warehouse.connect() as con:
        report = land_ndjson(con, directory)
    return MaterializeResult(
        metadata={
            "source": fhir_source.describe(),
            "lines_read": report.lines_read,
            "loaded": report.loaded,
            "quarantined": report.quarantined,
            "resources_by_type": counts_table(report.loaded_by_type, "resource type", "rows"),
            "quarantine_reasons": counts_table(report.quarantined_by_reason, "reason", "lines"),
            "files": MetadataValue.json(report.files),
            "skipped_files": MetadataValue.json(report.skipped_files),
        },
        check_results=[AssetCheckResult(
            check_name="lines_reconcile", passed=report.reconciles,
            metadata={"lines_read": report.lines_read, "loaded": report.loaded, "quarantined": report.quarantined},
        )],
    )
