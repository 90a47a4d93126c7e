import time

import polars as pl
from dagster import (AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetIn, In, MaterializeResult,
                     MetadataValue, Nothing, OpExecutionContext, Out, graph_asset, op)

from clinical_assets.batches import FHIR_BATCHES
from clinical_assets.metadata import counts_table, markdown_table
from clinical_ml.deid import DEID_TABLES
from clinical_ml.deid_buckets import (BucketPlan, combine_buckets, deidentify_bucket, plan_buckets,
                                      remove_stale_buckets)
from clinical_ml.ingest import refuse_incomplete_export
from resources.deid_key import DeidKey
from resources.settings import patient_buckets
from resources.warehouse import DuckDBWarehouse


LEAK_CHECK_DESCRIPTION = (
    "No original identifier of a landed Patient (contacts included) appears in any de-identified text column: "
    "identifiers, phones, e-mails, street lines, full zip, birth dates, resource ids and full names anywhere "
    "(Practitioner/RelatedPerson full names too); single name tokens and the city in the patient's own rows. "
    "Honorifics and degrees are not identifiers. Blocking.")


PATIENT_BUCKETS = patient_buckets()
DEID_TABLE_NAMES = [f"deid.{t}" for t in DEID_TABLES]


@op(ins={"raw_fhir": In(Nothing)}, description="Decide once per batch what its patient buckets share: the age "
    "reference date (90+ grouping) and the demo-key check. Refuses an incomplete export.")
def plan_patient_buckets(context: OpExecutionContext, warehouse: DuckDBWarehouse, deid_key: DeidKey) -> BucketPlan:
    if deid_key.is_demo_key():
        context.log.warning("Using the published demo de-identification key: synthetic data only.")
    with warehouse.connect_batch(context.partition_key) as con:
        refuse_incomplete_export(con)
        plan = plan_buckets(con, PATIENT_BUCKETS, deid_key.reference_date(), synthetic_only=deid_key.is_demo_key())
    remove_stale_buckets(warehouse.batch_store().path(context.partition_key), plan)
    return plan


def _bucket_op(bucket: int):
    @op(name=f"deidentify_patient_bucket_{bucket + 1:02d}", out=Out(Nothing),
        description=f"De-identify and leak-check patient bucket {bucket + 1} of {PATIENT_BUCKETS} into its own file "
        "(with its report: the combine reads it from there), reading the batch file read-only; the buckets run at "
        "once on an executor with workers.")
    def deidentify_patient_bucket(context: OpExecutionContext, plan: BucketPlan, warehouse: DuckDBWarehouse,
                                  deid_key: DeidKey) -> None:
        outcome = deidentify_bucket(warehouse.batch_store().path(context.partition_key), bucket, plan, deid_key.key(),
                                    warehouse.duckdb_settings(), max_shift_days=deid_key.date_shift_max_days,
                                    date_mode=deid_key.date_mode)
        context.log.info(f"bucket {bucket + 1}/{plan.buckets}: {outcome.report.rows_by_table.get('patient', 0)} patients, "
                         f"{outcome.deidentification_seconds} s de-identification, {outcome.leak_check_seconds} s leak check")
    return deidentify_patient_bucket


BUCKET_OPS = [_bucket_op(b) for b in range(PATIENT_BUCKETS)]


@op(ins={"buckets": In(Nothing)}, out={"result": Out(Nothing), "check": Out(Nothing)},
    description="Copy the buckets' tables into the batch file's `deid` schema in one transaction, once every "
    "landed patient is in exactly one bucket; report the leak check of all buckets.")
def combine_patient_buckets(context: OpExecutionContext, plan: BucketPlan, warehouse: DuckDBWarehouse,
                            deid_key: DeidKey):
    started = time.perf_counter()
    with warehouse.connect_batch(context.partition_key) as con:
        combined = combine_buckets(con, warehouse.batch_store().path(context.partition_key), plan)
    report, outcomes = combined.report, combined.outcomes
    yield MaterializeResult(check_results=[
        leak_check_result(combined.findings, DEID_TABLE_NAMES, check_name="deidentified_fhir_has_no_identifiers")],
        metadata={
        # where the step's time goes, for whoever sizes a run (benchmarks/scale.py prints them):
        # the buckets' sums (they may have run at once), and the combine
        "deidentification_seconds": MetadataValue.float(round(sum(o.deidentification_seconds for o in outcomes), 2)),
        "leak_check_seconds": MetadataValue.float(round(sum(o.leak_check_seconds for o in outcomes), 2)),
        "combine_seconds": MetadataValue.float(round(time.perf_counter() - started, 2)),
        "patient_buckets": plan.buckets,
        "patients_by_bucket": counts_table(combined.rows_by_bucket, "bucket", "patients"),
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


@graph_asset(
    ins={"raw_fhir": AssetIn()},
    partitions_def=FHIR_BATCHES,
    group_name="deidentification",
    kinds={"duckdb"},
    owners=["team:privacy"],
    description="HIPAA Safe Harbor de-identified tables (schema `deid`): a whitelist projection with keyed "
    "pseudonyms, dates shifted per patient (or generalized to year), birth year only, 90+ grouped, 3-digit zip, "
    "scrubbed notes (documents and Condition/Observation notes). Resource types not projected never cross. "
    "Removal counts per Safe Harbor category are in `deid.removal_counts`. Nothing downstream reads `raw`. "
    "Per batch, in the batch's file; pseudonyms are keyed, so a patient keeps one key across batches. "
    "Made in patient buckets (CLINICAL_PATIENT_BUCKETS steps, each with its own file, run at once on an "
    "executor with workers), then combined.",
    check_specs=[AssetCheckSpec("deidentified_fhir_has_no_identifiers", asset="deidentified_fhir", blocking=True,
                                description=LEAK_CHECK_DESCRIPTION)],
)
def deidentified_fhir(raw_fhir):
    plan = plan_patient_buckets(raw_fhir)
    return combine_patient_buckets(plan, buckets=[bucket(plan) for bucket in BUCKET_OPS])


def leak_check_result(findings: list[dict], tables: list[str], check_name: str | None = None) -> AssetCheckResult:
    """A leak scan's findings as a blocking check result: where and which category, never the values."""
    metadata = {"tables_scanned": len(tables), "hits": sum(f["hits"] for f in findings)}
    if findings:
        metadata["findings"] = markdown_table(pl.DataFrame(findings))
    return AssetCheckResult(check_name=check_name, passed=not findings, severity=AssetCheckSeverity.ERROR,
                            metadata=metadata)
