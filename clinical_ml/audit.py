"""Append-only, hash-chained audit records in DuckDB.

Each record stores the SHA-256 of its canonical JSON body together with the previous record's
hash, so changing or deleting any past record breaks the chain at that point.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import duckdb
import orjson

from clinical_ml.db import table_exists, transaction
from clinical_ml.ingest import BOOKKEEPING_TABLES

GENESIS_HASH = "0" * 64
AUDIT_TABLE = "audit.audit_log"

_DDL = f"""
CREATE SCHEMA IF NOT EXISTS audit;
CREATE TABLE IF NOT EXISTS {AUDIT_TABLE} (
    sequence BIGINT PRIMARY KEY,
    record_id VARCHAR NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL,
    body JSON NOT NULL,
    previous_hash VARCHAR NOT NULL,
    record_hash VARCHAR NOT NULL
)
"""


def canonical(body: dict) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY)


def record_hash(previous_hash: str, body_json: bytes) -> str:
    return hashlib.sha256(previous_hash.encode() + b"\n" + body_json).hexdigest()


def table_hash(con: duckdb.DuckDBPyConnection, table: str) -> str:
    """Order-independent SHA-256 of the rows of ``table`` (a table name or a parenthesized
    query): row digests are bucketed, then combined."""
    rows = con.execute(
        f"""WITH h AS (SELECT md5(CAST(t AS VARCHAR)) AS d FROM {table} AS t)
            SELECT left(d, 2) AS bucket, sha256(string_agg(d, '' ORDER BY d)) FROM h GROUP BY bucket ORDER BY bucket"""
    ).fetchall()
    digest = hashlib.sha256()
    for bucket, bucket_hash in rows:
        digest.update(f"{bucket}:{bucket_hash}\n".encode())
    return digest.hexdigest()


@dataclass
class AuditRecord:
    sequence: int
    record_id: str
    record_hash: str
    previous_hash: str


def append_record(con: duckdb.DuckDBPyConnection, body: dict) -> AuditRecord:
    """Append one record in a transaction; the chain head is read inside the same transaction."""
    con.execute(_DDL)
    body_json = canonical(body)
    with transaction(con):
        head = con.execute(f"SELECT sequence, record_hash FROM {AUDIT_TABLE} ORDER BY sequence DESC LIMIT 1").fetchone()
        sequence, previous = (head[0] + 1, head[1]) if head else (1, GENESIS_HASH)
        digest = record_hash(previous, body_json)
        record_id = str(uuid.uuid4())
        con.execute(
            f"INSERT INTO {AUDIT_TABLE} VALUES (?, ?, ?, ?, ?, ?)",
            [sequence, record_id, datetime.now(timezone.utc), body_json.decode(), previous, digest],
        )
    return AuditRecord(sequence=sequence, record_id=record_id, record_hash=digest, previous_hash=previous)


def verify_chain(con: duckdb.DuckDBPyConnection, head: tuple[int, str] | None = None) -> tuple[bool, int | None]:
    """(intact, first broken sequence or None). Recomputes every hash from the stored bodies.

    A chain cannot show that records were cut off its end; ``head`` (the sequence and hash of
    the last record appended, kept outside the table) can: that record must still be there."""
    if not table_exists(con, "audit", "audit_log"):  # read-only connections may verify too: no DDL
        return head is None, (None if head is None else 1)
    previous = GENESIS_HASH
    expected_sequence = 1
    for sequence, body, prev_hash, digest in con.execute(
        f"SELECT sequence, body, previous_hash, record_hash FROM {AUDIT_TABLE} ORDER BY sequence"
    ).fetchall():
        body_json = canonical(orjson.loads(body))
        if sequence != expected_sequence or prev_hash != previous or record_hash(previous, body_json) != digest:
            return False, sequence
        previous, expected_sequence = digest, sequence + 1
        if head and sequence == head[0] and digest != head[1]:
            return False, sequence
    if head and expected_sequence <= head[0]:  # the last appended record is gone
        return False, expected_sequence
    return True, None


def _scalar(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None):
    row = con.execute(sql, params or []).fetchone()
    return row[0] if row else None


def _tables(con: duckdb.DuckDBPyConnection, schema: str) -> list[str]:
    return [f"{schema}.{t}" for (t,) in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE schema_name = ? AND NOT temporary ORDER BY table_name",
        [schema]).fetchall()]


def batch_facts(con: duckdb.DuckDBPyConnection) -> dict:
    """What an audit record states about one data batch (its own file): hashes of its raw input
    and of every derived table, de-identification counts, the cohort definition. No identifier
    values: counts, hashes and codes only."""
    # Raw content only (id and resource), not landing bookkeeping such as the landing id.
    raw_hashes = {t: table_hash(con, f"(SELECT id, resource FROM {t})") for t in _tables(con, "raw")
                  if t.split(".")[1] not in BOOKKEEPING_TABLES}
    facts = {
        "inputs": {
            "raw_tables_sha256": raw_hashes,
            "raw_input_sha256": hashlib.sha256(canonical(raw_hashes)).hexdigest(),
            "lines_read": _scalar(con, "SELECT sum(lines_read) FROM raw.landing_files"),
            "lines_quarantined": _scalar(con, "SELECT count(*) FROM raw.quarantine"),
        },
        "outputs": {"deid_tables_sha256": {t: table_hash(con, t) for t in _tables(con, "deid")}},
    }
    if "deid.removal_counts" in _tables(con, "deid"):
        facts["deidentification"] = dict(con.execute(
            "SELECT category, removed FROM deid.removal_counts ORDER BY category").fetchall())
    if "features.feature_matrix" in _tables(con, "features"):
        facts["outputs"]["feature_matrix_sha256"] = table_hash(con, "features.feature_matrix")
        # the cohort definition the feature matrix was drawn with (landmarks, horizon, lookback, ages)
        facts["cohort"] = orjson.loads(con.execute("SELECT to_json(s) FROM features.feature_spec s").fetchone()[0])
    return facts


def model_facts(con: duckdb.DuckDBPyConnection) -> dict:
    """What an audit record states about the warehouse: the latest model (version, MLflow run,
    data hash, training window), its validation results and the latest drift report."""
    facts: dict = {}
    model = con.execute(
        """SELECT model_version, mlflow_run_id, training_data_hash, model_sha256, metrics, training_window
           FROM ml.models ORDER BY model_version DESC LIMIT 1""").fetchone() if "ml.models" in _tables(con, "ml") else None
    if model:
        version = model[0]
        facts["model"] = {"model_version": version, "mlflow_run_id": model[1], "training_data_hash": model[2],
                          "model_sha256": model[3], "training_metrics": orjson.loads(model[4]),
                          "training_window": orjson.loads(model[5]) if model[5] else None}
        facts["validation"] = {
            metric: {"value": value, "passed": passed}
            for metric, value, passed in con.execute(
                "SELECT metric, value, passed FROM ml.validation_report WHERE model_version = ? ORDER BY metric",
                [version]).fetchall()
        } if _tables(con, "ml").count("ml.validation_report") else {}
    if "monitoring.drift_report" in _tables(con, "monitoring"):
        facts["drift"] = dict(zip(
            ["report_id", "batch", "max_psi", "drifted_features"],
            con.execute(
                """SELECT report_id, any_value(batch), max(psi), list(feature ORDER BY feature) FILTER (WHERE drifted)
                   FROM monitoring.drift_report WHERE report_id = (
                       SELECT report_id FROM monitoring.drift_report ORDER BY created_at DESC LIMIT 1)
                   GROUP BY report_id""").fetchone(),
        ))
    return facts
