"""De-identification of one batch in patient buckets: steps that run apart, then one combine.

A batch's patients are split by a hash of their id into ``buckets`` groups. Each bucket is
de-identified (and leak-checked) by a step of its own that reads the batch file read-only and
writes a bucket file of its own, so the buckets of a batch run at the same time on separate
processes or machines (DuckDB: one writer per file, any number of readers). The combine step then
copies the buckets' tables into the batch file's ``deid`` schema, which everything downstream
reads. What must be the same for every bucket (the age reference date, the demo-key check) is
decided once per batch, by ``plan_buckets``.

A resource belongs to the bucket of the patient it is about (``raw.*.patient_id``, set at
landing), so the union of the buckets' tables is the de-identification of the whole batch. What
a resource may point to outside its patient (an encounter id, a Medication resource) and the
identities the leak check looks for are read whole (WHOLE_BATCH_TABLES).
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import duckdb

from clinical_ml.batches import IDENTITY_TABLES
from clinical_ml.db import (DuckDBSettings, attach_read_only, database_lock, open_database, quote_ident, quote_path,
                            transaction)
from clinical_ml.deid import (DEID_TABLES, DateMode, DeidentificationError, DeidReport, MissingSecretKey,
                              age_reference_date, count_real_patients, deidentify, find_identifier_leaks,
                              register_macros, safe_error_message)
from clinical_ml.ingest import add_patient_ids

# Raw tables a bucket reads whole (schema batch_whole): what references point into (another
# patient's encounter, a Medication), and the identities the leak check looks for (a patient's
# phone in another bucket's note is a leak).
WHOLE_BATCH_TABLES = ("encounter", "medication", *IDENTITY_TABLES)
_SOURCE = "bucket_source"  # the in-memory catalog of a bucket step's views over the batch file
_WHOLE = "batch_whole"


@dataclass(frozen=True)
class BucketPlan:
    """What every bucket of one batch shares (no PHI: it travels between steps). ``plan_id``
    is new with every plan: the combine takes only bucket files made under it."""

    buckets: int
    reference_date: date
    patients: int
    plan_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class BucketOutcome:
    """One bucket's de-identification report and leak findings (counts only, never values)."""

    bucket: int
    report: DeidReport
    findings: list[dict]
    deidentification_seconds: float
    leak_check_seconds: float


@dataclass
class CombinedDeid:
    report: DeidReport
    findings: list[dict]
    outcomes: list[BucketOutcome]
    rows_by_bucket: dict[str, int] = field(default_factory=dict)


def bucket_sql(patient_id: str, buckets: int) -> str:
    """SQL for the bucket (0 .. buckets-1) of a row with patient id ``patient_id``; rows about no
    patient (no subject) all fall in bucket 0, so each is counted once."""
    return f"CASE WHEN {patient_id} IS NULL THEN 0 ELSE hash({patient_id}) % {int(buckets)}::UBIGINT END"


def bucket_path(batch_path: Path, bucket: int, buckets: int) -> Path:
    """The bucket's own DuckDB file, in a folder beside the batch file; a batch of one bucket is
    de-identified in the batch file itself (nothing to combine, nothing to copy)."""
    batch_path = Path(batch_path)
    if buckets == 1:
        return batch_path
    return _bucket_folder(batch_path) / f"{bucket + 1:02d}-of-{buckets:02d}.duckdb"


def _bucket_folder(batch_path: Path) -> Path:
    return batch_path.parent / f"{batch_path.stem}.buckets"


def plan_buckets(con: duckdb.DuckDBPyConnection, buckets: int, reference_date: date | None,
                 synthetic_only: bool) -> BucketPlan:
    """Decide once per batch what its buckets share; ``con`` is the batch file, writable (a batch
    landed before ``patient_id`` existed gets the column here, before buckets read it)."""
    if buckets < 1:
        raise ValueError(f"patient buckets must be at least 1, not {buckets}")
    register_macros(con)
    if synthetic_only and (real := count_real_patients(con)):
        raise MissingSecretKey(
            f"The published demo key only de-identifies the built-in synthetic data, but {real} landed patients "
            "did not come from the generator. Set DEID_SECRET_KEY to a long random secret.")
    add_patient_ids(con, "raw")
    patients = con.execute("SELECT count(*) FROM raw.patient").fetchone()[0]
    return BucketPlan(buckets=buckets, reference_date=reference_date or age_reference_date(con), patients=patients)


def remove_stale_buckets(batch_path: Path, plan: BucketPlan) -> list[Path]:
    """Bucket files of an earlier bucket count, with their WAL and lock files (they would never
    be read again, and a WAL left behind would be replayed onto a new file of its name)."""
    folder = _bucket_folder(Path(batch_path))
    keep = {bucket_path(batch_path, b, plan.buckets).name for b in range(plan.buckets)} if plan.buckets > 1 else set()
    stale = [p for p in folder.iterdir() if p.is_file() and ".duckdb" in p.name
             and p.name[:p.name.index(".duckdb") + len(".duckdb")] not in keep] if folder.is_dir() else []
    for path in stale:
        path.unlink()
    return stale


def deidentify_bucket(batch_path: Path, bucket: int, plan: BucketPlan, key: bytes, settings: DuckDBSettings,
                      max_shift_days: int = 365, date_mode: DateMode = "shift") -> BucketOutcome:
    """De-identify and leak-check the patients of one bucket into its own file (schema ``deid``).
    Reads the batch file read-only, so the buckets of a batch can run at the same time. The one
    bucket of a batch not split is the batch file, read and written as it is."""
    if not 0 <= bucket < plan.buckets:
        raise ValueError(f"bucket {bucket} is not one of {plan.buckets}")
    path = bucket_path(batch_path, bucket, plan.buckets)
    split = plan.buckets > 1
    path.parent.mkdir(parents=True, exist_ok=True)
    with ExitStack() as locks:
        if split:  # the batch file before the bucket's: the combine takes them in this order too
            locks.enter_context(database_lock(batch_path, shared=True))
        con = locks.enter_context(open_database(str(path), settings))
        # an earlier run's outcome must not outlive a failure of this one
        con.execute("DROP TABLE IF EXISTS main.bucket_outcome")
        if split:
            attach_read_only(con, batch_path, "batch", locks)
            try:
                _bucket_views(con, bucket, plan.buckets)
            except duckdb.Error as error:
                raise DeidentificationError(f"bucket views failed: {safe_error_message(error)}") from None
        started = time.perf_counter()
        report = deidentify(con, key, max_shift_days=max_shift_days, date_mode=date_mode,
                            reference_date=plan.reference_date, lookup_schema=_WHOLE if split else None)
        deidentified = time.perf_counter()
        findings = find_identifier_leaks(con, [f"deid.{t}" for t in DEID_TABLES], key,
                                         raw_schema=_WHOLE if split else "raw")
        checked = time.perf_counter()
        outcome = BucketOutcome(bucket=bucket, report=report, findings=findings,
                                deidentification_seconds=round(deidentified - started, 2),
                                leak_check_seconds=round(checked - deidentified, 2))
        # the outcome is kept with the bucket's tables: the combine reads it from there, whatever
        # machine made the bucket (an executor need not pass step outputs between steps)
        con.execute("CREATE OR REPLACE TABLE main.bucket_outcome AS SELECT ? AS plan_id, ? AS buckets, "
                    "?::JSON AS outcome", [plan.plan_id, plan.buckets, json.dumps(asdict(outcome))])
        con.execute("DETACH DATABASE IF EXISTS batch")
    return outcome


def read_bucket_outcome(con: duckdb.DuckDBPyConnection, alias: str | None, bucket: int,
                        plan: BucketPlan) -> BucketOutcome:
    """The outcome stored in the bucket file attached as ``alias`` (None: ``con``'s own file),
    refused when it was made under another plan (a stale file of an earlier run)."""
    stored = con.execute("SELECT count(*) FROM duckdb_tables() WHERE database_name = coalesce(?, current_database()) "
                         "AND schema_name = 'main' AND table_name = 'bucket_outcome'", [alias]).fetchone()[0]
    catalog = f"{quote_ident(alias)}." if alias else ""
    row = con.execute(f"SELECT plan_id, buckets, outcome FROM {catalog}main.bucket_outcome").fetchone() \
        if stored else None
    if row is None or (row[0], row[1]) != (plan.plan_id, plan.buckets):
        raise DeidentificationError(f"patient bucket {bucket + 1} of {plan.buckets} was not made under this run's plan: "
                                    "materialize deidentified_fhir again")
    stored = json.loads(row[2])
    outcome = BucketOutcome(**{**stored, "report": DeidReport(**stored["report"])})
    if outcome.bucket != bucket:
        raise DeidentificationError(f"the file of patient bucket {bucket + 1} holds bucket {outcome.bucket + 1}")
    return outcome


def _bucket_views(con: duckdb.DuckDBPyConnection, bucket: int, buckets: int) -> None:
    """In an in-memory catalog: schema ``raw``, the bucket's rows of every raw resource table,
    and schema ``batch_whole``, the WHOLE_BATCH_TABLES whole. The catalog is on the search path,
    so de-identification reads ``raw.observation`` as it does in a batch file."""
    con.execute(f"ATTACH ':memory:' AS {_SOURCE}")
    con.execute(f"CREATE SCHEMA {_SOURCE}.raw")
    con.execute(f"CREATE SCHEMA {_SOURCE}.{_WHOLE}")
    tables = con.execute(
        """SELECT table_name, bool_or(column_name = 'patient_id') FROM duckdb_columns()
           WHERE database_name = 'batch' AND schema_name = 'raw' GROUP BY ALL ORDER BY 1""").fetchall()
    for table, has_patient in tables:
        name = quote_ident(table)
        if not has_patient:  # bookkeeping tables (quarantine, landing files) have no patient
            where = ""
        else:
            where = f" WHERE {bucket_sql('patient_id', buckets)} = {int(bucket)}"
        con.execute(f"CREATE VIEW {_SOURCE}.raw.{name} AS SELECT * FROM batch.raw.{name}{where}")
        if table in WHOLE_BATCH_TABLES:
            con.execute(f"CREATE VIEW {_SOURCE}.{_WHOLE}.{name} AS SELECT * FROM batch.raw.{name}")
    database = con.execute("SELECT current_database()").fetchone()[0]
    # a schema-qualified name is looked up in the search path's entries of that schema name
    con.execute(f"SET search_path = {quote_path(f'{database}.main,{_SOURCE}.raw,{_SOURCE}.{_WHOLE}')}")


def combine_buckets(con: duckdb.DuckDBPyConnection, batch_path: Path, plan: BucketPlan) -> CombinedDeid:
    """Copy the buckets' ``deid`` tables into the batch file (``con``, writable) in one
    transaction, after checking that every bucket was made under ``plan`` and that every landed
    patient is in exactly one bucket. A batch of one bucket has its tables in place already."""
    split = plan.buckets > 1
    aliases = [f"bucket_{b}" for b in range(plan.buckets)] if split else [None]
    prefixes = [f"{a}." if a else "" for a in aliases]  # the catalog of each bucket's tables in SQL
    missing = [b + 1 for b in range(plan.buckets) if not bucket_path(batch_path, b, plan.buckets).exists()]
    if missing:
        raise DeidentificationError(f"patient buckets {missing} of {plan.buckets} have no file: materialize "
                                    "deidentified_fhir again")
    with ExitStack() as locks:
        if split:
            for b, alias in enumerate(aliases):
                attach_read_only(con, bucket_path(batch_path, b, plan.buckets), alias, locks)
        try:
            outcomes = [read_bucket_outcome(con, alias, b, plan) for b, alias in enumerate(aliases)]
            rows_by_bucket = {f"{b + 1:02d}": con.execute(f"SELECT count(*) FROM {p}deid.patient").fetchone()[0]
                              for b, p in enumerate(prefixes)}
            keys = con.execute("SELECT count(DISTINCT patient_key) FROM (" + " UNION ALL ".join(
                f"SELECT patient_key FROM {p}deid.patient" for p in prefixes) + ")").fetchone()[0]
            landed, patients = con.execute("SELECT count(*) FROM raw.patient").fetchone()[0], sum(rows_by_bucket.values())
            if not patients == keys == landed:
                raise DeidentificationError(
                    f"patient buckets do not reconcile: {landed} landed patients, {patients} de-identified rows, "
                    f"{keys} distinct keys (were the buckets made by different versions of the code?)")
            if split:
                with transaction(con):
                    con.execute("CREATE SCHEMA IF NOT EXISTS deid")
                    for table in DEID_TABLES:
                        con.execute(f"CREATE OR REPLACE TABLE deid.{quote_ident(table)} AS " + " UNION ALL ".join(
                            f"SELECT * FROM {p}deid.{quote_ident(table)}" for p in prefixes))
                    con.execute("CREATE OR REPLACE TABLE deid.removal_counts AS SELECT category, sum(removed)::BIGINT "
                                "AS removed FROM (" + " UNION ALL ".join(
                                    f"SELECT category, removed FROM {p}deid.removal_counts" for p in prefixes)
                                + ") GROUP BY category ORDER BY category")
                    con.execute(f"CREATE OR REPLACE TABLE deid.settings AS SELECT * FROM {prefixes[0]}deid.settings")
        except duckdb.Error as error:
            raise DeidentificationError(f"combining the buckets failed: {safe_error_message(error)}") from None
        finally:
            for alias in aliases:
                if alias:
                    con.execute(f"DETACH DATABASE IF EXISTS {alias}")
    return CombinedDeid(report=_sum_reports([o.report for o in outcomes]), findings=_sum_findings(outcomes),
                        outcomes=outcomes, rows_by_bucket=rows_by_bucket)


def _sum_counts(dicts: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            total[k] = total.get(k, 0) + int(v)
    return total


def _sum_reports(reports: list[DeidReport]) -> DeidReport:
    return DeidReport(
        rows_by_table=_sum_counts([r.rows_by_table for r in reports]),
        removed_by_category=_sum_counts([r.removed_by_category for r in reports]),
        orphan_rows_dropped=_sum_counts([r.orphan_rows_dropped for r in reports]),
        reference_date=reports[0].reference_date,
        resource_types_left_behind=sorted({t for r in reports for t in r.resource_types_left_behind}),
        medications_by_source=_sum_counts([r.medications_by_source for r in reports]),
        medication_references_unresolved=sum(r.medication_references_unresolved for r in reports),
    )


def _sum_findings(outcomes: list[BucketOutcome]) -> list[dict]:
    hits = _sum_counts([{(f["table"], f["column"], f["category"]): f["hits"] for f in o.findings} for o in outcomes])
    return [{"table": t, "column": c, "category": k, "hits": n} for (t, c, k), n in sorted(hits.items())]
