"""Land a directory of FHIR Bulk Data NDJSON files into DuckDB raw tables.

Every line read ends up in exactly one place: a raw table (``raw.<resource_type>``) or the
quarantine (``raw.quarantine``, with file, line number and reason). Python only splits files
into lines (a C-level ``bytes.split``); validation and classification are set-based SQL.
The whole landing is one transaction: a failure leaves the previous tables untouched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa

from clinical_ml.db import transaction

# Resource types every downstream stage expects; their raw tables exist (maybe empty) after
# any landing so that a source without, say, Observation still flows through the graph.
CORE_RESOURCE_TYPES = (
    "Patient",
    "Encounter",
    "Condition",
    "Observation",
    "MedicationRequest",
    "DocumentReference",
)
MAX_LINE_BYTES = 16 * 1024 * 1024  # a single resource larger than this is quarantined
_CHUNK_BYTES = 64 * 1024 * 1024
_RESOURCE_FILE = re.compile(r"^([A-Z][A-Za-z]+)(?:\.[^.]+)*\.ndjson$")


def table_name(resource_type: str) -> str:
    """``MedicationRequest`` -> ``medication_request``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", resource_type).lower()


@dataclass
class LandingReport:
    lines_read: int = 0
    loaded: int = 0
    quarantined: int = 0
    loaded_by_type: dict[str, int] = field(default_factory=dict)
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)

    @property
    def reconciles(self) -> bool:
        return self.lines_read == self.loaded + self.quarantined


def resource_files(ndjson_dir: Path) -> tuple[list[tuple[str, Path]], list[Path]]:
    """(resource type, path) for each ``<Type>[.nnn].ndjson`` file; other files are skipped
    (e.g. a Bulk export's ``log.ndjson``)."""
    found, skipped = [], []
    for path in sorted(Path(ndjson_dir).iterdir()):
        if not path.is_file():
            continue
        match = _RESOURCE_FILE.match(path.name)
        if match:
            found.append((match.group(1), path))
        elif path.suffix == ".ndjson":
            skipped.append(path)
    return found, skipped


def _split_lines(path: Path):
    """Yield (first line number, list of str|None lines, list of utf8-ok flags) per chunk."""
    line_no = 1
    carry = b""
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(_CHUNK_BYTES)
            if not chunk:
                break
            pieces = (carry + chunk).split(b"\n")
            carry = pieces.pop()
            yield line_no, pieces
            line_no += len(pieces)
    if carry:
        yield line_no, [carry]


def _decode(pieces: list[bytes]) -> tuple[list[str], list[bool]]:
    try:
        # Fast path: a whole chunk of valid UTF-8 decodes in one call.
        text = b"\n".join(pieces).decode("utf-8")
        return text.split("\n"), [True] * len(pieces)
    except UnicodeDecodeError:
        lines, ok = [], []
        for piece in pieces:
            try:
                lines.append(piece.decode("utf-8"))
                ok.append(True)
            except UnicodeDecodeError:
                lines.append(piece.decode("utf-8", errors="replace"))
                ok.append(False)
        return lines, ok


_STAGING_DDL = """
CREATE OR REPLACE TEMP TABLE landing_lines (
    source_file VARCHAR, expected_type VARCHAR, line_no BIGINT, line VARCHAR, utf8_ok BOOLEAN
)
"""

_CLASSIFY_SQL = f"""
CREATE OR REPLACE TEMP TABLE landing_classified AS
WITH parsed AS (
    -- one JSON parse per line: both keys in a single extraction
    SELECT *, CASE WHEN utf8_ok AND json_valid(line) AND json_type(line) = 'OBJECT'
                   THEN json_extract_string(line, ['$.resourceType', '$.id']) END AS keys
    FROM landing_lines
),
checked AS (
    SELECT * EXCLUDE (keys), keys[1] AS resource_type, keys[2] AS resource_id,
        CASE
            WHEN NOT utf8_ok THEN 'invalid UTF-8'
            WHEN strlen(line) > {MAX_LINE_BYTES} THEN 'line longer than {MAX_LINE_BYTES} bytes'
            WHEN trim(line) = '' THEN 'empty line'
            WHEN NOT json_valid(line) THEN 'invalid JSON'
            WHEN json_type(line) <> 'OBJECT' THEN 'not a JSON object'
            WHEN coalesce(keys[1], '') = '' THEN 'missing resourceType'
            WHEN keys[1] <> expected_type THEN 'resourceType does not match file type ' || expected_type
            WHEN coalesce(keys[2], '') = '' THEN 'missing id'
        END AS reason
    FROM parsed
),
ranked AS (
    SELECT *,
        CASE WHEN reason IS NULL THEN row_number() OVER (
            PARTITION BY expected_type, CASE WHEN reason IS NULL THEN resource_id END
            ORDER BY source_file, line_no) END AS occurrence
    FROM checked
)
SELECT source_file, expected_type, line_no, line, resource_id,
    CASE WHEN reason IS NULL AND occurrence > 1 THEN 'duplicate id (first occurrence kept)' ELSE reason END AS reason
FROM ranked
"""


def land_ndjson(con: duckdb.DuckDBPyConnection, ndjson_dir: str | Path, schema: str = "raw") -> LandingReport:
    """Replace the ``schema`` raw tables with the contents of ``ndjson_dir``, atomically."""
    ndjson_dir = Path(ndjson_dir)
    if not ndjson_dir.is_dir():
        raise FileNotFoundError(f"FHIR NDJSON directory not found: {ndjson_dir}")
    files, skipped = resource_files(ndjson_dir)
    report = LandingReport(files=[p.name for _, p in files], skipped_files=[p.name for p in skipped])

    con.execute(_STAGING_DDL)
    for rtype, path in files:
        for first_line, pieces in _split_lines(path):
            lines, ok = _decode(pieces)
            batch = pa.table({
                "line_no": pa.array(range(first_line, first_line + len(lines)), pa.int64()),
                "line": pa.array(lines, pa.large_string()),
                "utf8_ok": pa.array(ok, pa.bool_()),
            })
            con.register("landing_batch", batch)
            con.execute("INSERT INTO landing_lines SELECT ?, ?, * FROM landing_batch", [path.name, rtype])
            con.unregister("landing_batch")
    con.execute(_CLASSIFY_SQL)

    types = sorted({t for t, _ in files} | set(CORE_RESOURCE_TYPES))
    try:
        with transaction(con):
            _replace_raw_tables(con, schema, types)
    finally:
        con.execute("DROP TABLE IF EXISTS landing_lines")
        con.execute("DROP TABLE IF EXISTS landing_classified")
    return _report(con, schema, types, report)


def _replace_raw_tables(con: duckdb.DuckDBPyConnection, schema: str, types: list[str]) -> None:
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    for (old,) in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE schema_name = ? AND NOT temporary", [schema]
    ).fetchall():
        con.execute(f'DROP TABLE {schema}."{old}"')
    for rtype in types:
        con.execute(
            f"""CREATE TABLE {schema}.{table_name(rtype)} AS
                SELECT resource_id AS id, line::JSON AS resource, source_file, line_no
                FROM landing_classified WHERE reason IS NULL AND expected_type = ?
                ORDER BY source_file, line_no""",
            [rtype],
        )
    con.execute(
        f"""CREATE TABLE {schema}.quarantine AS
            SELECT source_file, line_no, expected_type AS resource_type, reason, line
            FROM landing_classified WHERE reason IS NOT NULL ORDER BY source_file, line_no"""
    )
    con.execute(
        f"""CREATE TABLE {schema}.landing_files AS
            SELECT source_file, expected_type AS resource_type, count(*) AS lines_read,
                   count(*) FILTER (WHERE reason IS NULL) AS loaded,
                   count(*) FILTER (WHERE reason IS NOT NULL) AS quarantined
            FROM landing_classified GROUP BY ALL ORDER BY source_file"""
    )


def _report(con: duckdb.DuckDBPyConnection, schema: str, types: list[str], report: LandingReport) -> LandingReport:
    report.lines_read, report.loaded, report.quarantined = con.execute(
        f"SELECT coalesce(sum(lines_read), 0), coalesce(sum(loaded), 0), coalesce(sum(quarantined), 0) "
        f"FROM {schema}.landing_files"
    ).fetchone()
    report.loaded_by_type = {
        rtype: con.execute(f"SELECT count(*) FROM {schema}.{table_name(rtype)}").fetchone()[0] for rtype in types
    }
    report.quarantined_by_reason = dict(
        con.execute(
            f"SELECT reason, count(*) FROM {schema}.quarantine GROUP BY reason ORDER BY count(*) DESC"
        ).fetchall()
    )
    return report
