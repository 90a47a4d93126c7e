import time

import polars as pl
from dagster import (AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetExecutionContext, MaterializeResult,
                     MetadataValue, asset)

from clinical_assets.batches import FHIR_BATCHES
from clinical_assets.metadata import counts_table, markdown_table
from clinical_assets.raw_fhir import raw_fhir
from clinical_ml.deid import DEID_TABLES, deidentify, find_identifier_leaks
from clinical_ml.ingest import refuse_incomplete_export
from resources.deid_key import DeidKey
from resources.warehouse import DuckDBWarehouse


LEAK_CHECK_DESCRIPTION = (
    "No original identifier of a landed Patient (contacts included) appears in any de-identified text column: "
    "identifiers, phones, e-mails, street lines, full zip, birth dates, resource ids and full names anywhere "
    "(Practitioner/RelatedPerson full names too); single name tokens and the city in the patient's own rows. "
    "Honorifics and degrees are not identifiers. Blocking.")


@asset(
    deps=[raw_fhir],
    partitions_def=FHIR_BATCHES,
    group_name="deidentification",
    kinds={"duckdb"},
    owners=["team:privacy"],
    description="HIPAA Safe Harbor de-identified tables (schema `deid`): a whitelist projection with keyed "
    "pseudonyms, dates shifted per patient (or generalized to year), birth year only, 90+ grouped, 3-digit zip, "
    "scrubbed notes (documents and Condition/Observation notes). Resource types not projected never cross. "
    "Removal counts per Safe Harbor category are in `deid.removal_counts`. Nothing downstream reads `raw`. "
    "Per batch, in the batch's file; pseudonyms are keyed, so a patient keeps one key across batches.",
    check_specs=[AssetCheckSpec("deidentified_fhir_has_no_identifiers", asset="deidentified_fhir", blocking=True,
                                description=LEAK_CHECK_DESCRIPTION)],
)
def deidentified_fhir(context: AssetExecutionContext, warehouse: DuckDBWarehouse, deid_key: DeidKey) -> MaterializeResult:
    key = deid_key.key()
    if deid_key.is_demo_key():
        context.log.warning("Using the published demo de-identification key: synthetic data only.")
    with warehouse.connect_batch(context.partition_key) as con:
        refuse_incomplete_export(con)
        started = time.perf_counter()
        report = deidentify(con, key, max_shift_days=deid_key.date_shift_max_days, date_mode=deid_key.date_mode,
                            reference_date=deid_key.reference_date(), synthetic_only=deid_key.is_demo_key())
        deidentified = time.perf_counter()
        tables = [f"deid.{t}" for t in DEID_TABLES]
        leak_check = leak_check_result(find_identifier_leaks(con, tables, key), tables,
                                       check_name="deidentified_fhir_has_no_identifiers")
        checked = time.perf_counter()
    return MaterializeResult(check_results=[leak_check], metadata={
        # where the step's time goes, for whoever sizes a run (benchmarks/scale.py prints them)
        "deidentification_seconds": MetadataValue.float(round(deidentified - started, 2)),
        "leak_check_seconds": MetadataValue.float(round(checked - deidentified, 2)),
        "rows_by_table": counts_table(report.rows_by_table, "table", "rows"),
        "removed_by_category": counts_table(report.removed_by_category, "category", "removed or generalized"),
        "orphan_rows_dropped": counts_table(report.orphan_rows_dropped, "table", "rows without a landed patient"),
        "medications_by_source": counts_table(report.medications_by_source, "named by", "requests"),
        "medication_references_unresolved": report.medication_references_unresolved,
        "age_reference_date": report.reference_date,
        "date_mode": deid_key.date_mode,
        "resource_types_left_behind": MetadataValue.json(report.resource_types_left_behind),
        "demo_key": deid_key.is_demo_key(),
    })


def leak_check_result(findings: list[dict], tables: list[str], check_name: str | None = None) -> AssetCheckResult:
    """A leak scan's findings as a blocking check result: where and which category, never the values."""
    metadata = {"tables_scanned": len(tables), "hits": sum(f["hits"] for f in findings)}
    if findings:
        metadata["findings"] = markdown_table(pl.DataFrame(findings))
    return AssetCheckResult(check_name=check_name, passed=not findings, severity=AssetCheckSeverity.ERROR,
                            metadata=metadata)
