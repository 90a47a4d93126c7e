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
    """Order-independent SHA-256 of a table's rows (row digests bucketed, then combined)."""
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
    con.execute("BEGIN TRANSACTION")
    try:
        head = con.execute(f"SELECT sequence, record_hash FROM {AUDIT_TABLE} ORDER BY sequence DESC LIMIT 1").fetchone()
        sequence, previous = (head[0] + 1, head[1]) if head else (1, GENESIS_HASH)
        digest = record_hash(previous, body_json)
        record_id = str(uuid.uuid4())
        con.execute(
            f"INSERT INTO {AUDIT_TABLE} VALUES (?, ?, ?, ?, ?, ?)",
            [sequence, record_id, datetime.now(timezone.utc), body_json.decode(), previous, digest],
        )
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return AuditRecord(sequence=sequence, record_id=record_id, record_hash=digest, previous_hash=previous)


def verify_chain(con: duckdb.DuckDBPyConnection) -> tuple[bool, int | None]:
    """(intact, first broken sequence or None). Recomputes every hash from the stored bodies."""
    con.execute(_DDL)
    previous = GENESIS_HASH
    expected_sequence = 1
    for sequence, body, prev_hash, digest in con.execute(
        f"SELECT sequence, body, previous_hash, record_hash FROM {AUDIT_TABLE} ORDER BY sequence"
    ).fetchall():
        body_json = canonical(orjson.loads(body))
        if sequence != expected_sequence or prev_hash != previous or record_hash(previous, body_json) != digest:
            return False, sequence
        previous, expected_sequence = digest, sequence + 1
    return True, None
