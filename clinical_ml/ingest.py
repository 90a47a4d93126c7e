"""Land a directory of FHIR Bulk Data NDJSON files into DuckDB raw tables.

Every line read ends up in exactly one place: a raw table (``raw.<resource_type>``, keyed by
resource id) or the quarantine (``raw.quarantine``, with file, line number and reason). The
whole landing is one transaction: a failure leaves the previous tables untouched.

Speed: a clean file is read by DuckDB's own NDJSON reader (``read_ndjson_objects ... WITH
ORDINALITY``: parallel C++, exact line numbers). Only a file DuckDB rejects (a malformed or
non-UTF-8 line) or one with blank lines is split line by line in Python, so each bad line can be
quarantined with its own reason. Classification is one JSON key extraction per line, in SQL.

A directory may also hold what a Bulk Data export's manifest points to besides outputs:
``deleted/*.ndjson`` (Bundles of DELETE entries, applied to the raw tables) and
``error/*.ndjson`` (OperationOutcomes from the server, kept in ``raw.export_errors``).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import duckdb
import orjson
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
_BOOKKEEPING = ("quarantine", "landing_files", "export_errors")

Mode = Literal["replace", "merge"]


def table_name(resource_type: str) -> str:
    """``MedicationRequest`` -> ``medication_request``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", resource_type).lower()


@dataclass
class LandingReport:
    landing_id: str = ""
    mode: str = "replace"
    lines_read: int = 0
    loaded: int = 0
    quarantined: int = 0
    deleted: int = 0
    export_errors: int = 0
    loaded_by_type: dict[str, int] = field(default_factory=dict)
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)
    files_read_line_by_line: list[str] = field(default_factory=list)

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


_STAGING_DDL = """
CREATE OR REPLACE TEMP TABLE landing_lines (
    source_file VARCHAR, expected_type VARCHAR, line_no BIGINT,
    doc JSON,        -- the parsed resource (NULL when the line is not valid JSON)
    text VARCHAR,    -- the raw line, kept only for lines read one by one
    utf8_ok BOOLEAN,
    keys VARCHAR[],  -- [resourceType, id], extracted once while staging
    reason VARCHAR   -- NULL: the line loads
)
"""
_KEYS = "['$.resourceType', '$.id']"


def _stage_with_duckdb(con: duckdb.DuckDBPyConnection, rtype: str, path: Path) -> bool:
    """Fast path: DuckDB reads and parses the file. False when it needs line-by-line reading."""
    try:
        con.execute(
            f"""INSERT INTO landing_lines
                SELECT ?, ?, ordinality, json, NULL, true, json_extract_string(json, {_KEYS}), NULL
                FROM read_ndjson_objects(?, maximum_object_size = {MAX_LINE_BYTES}) WITH ORDINALITY""",
            [path.name, rtype, str(path)],
        )
    except duckdb.InvalidInputException:
        return False  # a malformed, non-UTF-8 or oversize line somewhere in the file
    # DuckDB skips blank lines, which would shift its numbering. It keeps each object's text
    # byte for byte, so the staged bytes plus one newline per line add up to the file size
    # exactly when there are none (also catching CRLF endings and padded lines).
    rows, text_bytes = con.execute(
        "SELECT count(*), coalesce(sum(strlen(doc)), 0) FROM landing_lines WHERE source_file = ?", [path.name]
    ).fetchone()
    with open(path, "rb") as handle:
        handle.seek(max(path.stat().st_size - 1, 0))
        newlines = rows if handle.read(1) == b"\n" else rows - 1
    if path.stat().st_size != text_bytes + newlines:
        con.execute("DELETE FROM landing_lines WHERE source_file = ?", [path.name])
        return False
    return True


def _split_lines(path: Path):
    """Yield (first line number, list of raw lines) per chunk of the file."""
    line_no = 1
    carry = b""
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            pieces = (carry + chunk).split(b"\n")
            carry = pieces.pop()
            if pieces:  # a chunk without a newline only grows the carried line
                yield line_no, pieces
                line_no += len(pieces)
    if carry:
        yield line_no, [carry]


def _decode(pieces: list[bytes]) -> tuple[list[str], list[bool]]:
    try:
        text = b"\n".join(pieces).decode("utf-8")  # fast path: the chunk is valid UTF-8
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


def _stage_line_by_line(con: duckdb.DuckDBPyConnection, rtype: str, path: Path) -> None:
    for first_line, pieces in _split_lines(path):
        lines, ok = _decode(pieces)
        batch = pa.table({
            "line_no": pa.array(range(first_line, first_line + len(lines)), pa.int64()),
            "line": pa.array(lines, pa.large_string()),
            "utf8_ok": pa.array(ok, pa.bool_()),
        })
        con.register("landing_batch", batch)
        con.execute(
            f"""INSERT INTO landing_lines
                SELECT ?, ?, line_no, doc, line, utf8_ok, CASE WHEN doc IS NOT NULL THEN json_extract_string(doc, {_KEYS}) END, NULL
                FROM (SELECT *, CASE WHEN utf8_ok AND strlen(line) <= {MAX_LINE_BYTES} THEN TRY_CAST(line AS JSON) END AS doc
                      FROM landing_batch)""",
            [path.name, rtype])
        con.unregister("landing_batch")


def _classify(con: duckdb.DuckDBPyConnection) -> None:
    """Give every line that does not load its reason (set-based; the common case is untouched)."""
    con.execute(
        f"""UPDATE landing_lines SET reason = CASE
                WHEN NOT utf8_ok THEN 'invalid UTF-8'
                WHEN strlen(text) > {MAX_LINE_BYTES} THEN 'line longer than {MAX_LINE_BYTES} bytes'
                WHEN trim(coalesce(text, 'x')) = '' THEN 'empty line'
                WHEN doc IS NULL THEN 'invalid JSON'
                WHEN json_type(doc) <> 'OBJECT' THEN 'not a JSON object'
                WHEN coalesce(keys[1], '') = '' THEN 'missing resourceType'
                WHEN keys[1] <> expected_type THEN 'resourceType does not match file type ' || expected_type
                ELSE 'missing id' END
            WHERE NOT (keys[1] IS NOT DISTINCT FROM expected_type AND coalesce(keys[2], '') <> '')"""
    )
    # Duplicate ids are rare: look for them with a hash aggregate, sort only when there are some.
    has_duplicates = con.execute(
        """SELECT count(*) > 0 FROM (SELECT 1 FROM landing_lines WHERE reason IS NULL
                                    GROUP BY expected_type, keys[2] HAVING count(*) > 1)""").fetchone()[0]
    if has_duplicates:
        con.execute(
            """UPDATE landing_lines SET reason = 'duplicate id (first occurrence kept)'
               FROM (SELECT source_file, line_no, row_number() OVER (
                         PARTITION BY expected_type, keys[2] ORDER BY source_file, line_no) AS occurrence
                     FROM landing_lines WHERE reason IS NULL) d
               WHERE d.occurrence > 1 AND landing_lines.source_file = d.source_file
                 AND landing_lines.line_no = d.line_no""")


def _validation_failures(con: duckdb.DuckDBPyConnection, validate: str, sample_size: int) -> None:
    """Quarantine resources that fail the fhir.resources R4B model of their type.

    The reason names the failing element and error type, never the value (values can be PHI,
    and reasons are shown as metadata)."""
    from fhir.resources.R4B import get_fhir_model_class
    from pydantic import ValidationError

    limit = "" if validate == "all" else f"USING SAMPLE {int(sample_size)} ROWS (reservoir, 42)"
    rows = con.execute(
        f"""SELECT source_file, line_no, expected_type, doc::VARCHAR FROM (
                SELECT * FROM landing_lines WHERE reason IS NULL {limit})"""
    ).fetchall()
    failures = []
    for source_file, line_no, rtype, line in rows:
        try:
            get_fhir_model_class(rtype).model_validate_json(line)
        except (ValidationError, KeyError, ValueError) as err:
            detail = "unknown resource type"
            if isinstance(err, ValidationError) and err.errors():
                first = err.errors()[0]
                detail = f"{'.'.join(str(p) for p in first['loc'])}: {first['type']}"
            failures.append((source_file, line_no, f"FHIR R4B validation failed at {detail}"[:200]))
    if failures:
        con.register("validation_failures", pa.table({
            "source_file": [f[0] for f in failures], "line_no": [f[1] for f in failures],
            "reason": [f[2] for f in failures]}))
        con.execute("""UPDATE landing_lines SET reason = v.reason FROM validation_failures v
                       WHERE landing_lines.source_file = v.source_file AND landing_lines.line_no = v.line_no""")
        con.unregister("validation_failures")


def read_deleted(ndjson_dir: Path) -> list[tuple[str, str]]:
    """(resource type, id) of the DELETE entries in ``deleted/*.ndjson`` Bundles."""
    deleted = []
    for path in sorted((ndjson_dir / "deleted").glob("*.ndjson")) if (ndjson_dir / "deleted").is_dir() else []:
        for line in path.read_bytes().splitlines():
            if not line.strip():
                continue
            for entry in orjson.loads(line).get("entry", []):
                request = entry.get("request", {})
                parts = request.get("url", "").strip("/").split("/")
                if request.get("method") == "DELETE" and len(parts) >= 2:
                    deleted.append((parts[-2], parts[-1]))
    return deleted


def land_ndjson(
    con: duckdb.DuckDBPyConnection,
    ndjson_dir: str | Path,
    schema: str = "raw",
    mode: Mode = "replace",
    validate: Literal["none", "sample", "all"] = "none",
    validation_sample_size: int = 200,
) -> LandingReport:
    """Land ``ndjson_dir`` into the ``schema`` raw tables, atomically.

    ``replace`` (a full export: the source's complete current state) replaces the tables;
    ``merge`` (an incremental ``_since`` export) upserts by resource id and applies deletions.
    Landing the same export twice gives the same tables either way.
    """
    ndjson_dir = Path(ndjson_dir)
    if not ndjson_dir.is_dir():
        raise FileNotFoundError(f"FHIR NDJSON directory not found: {ndjson_dir}")
    files, skipped = resource_files(ndjson_dir)
    report = LandingReport(landing_id=str(uuid.uuid4()), mode=mode, files=[p.name for _, p in files],
                           skipped_files=[p.name for p in skipped])

    con.execute(_STAGING_DDL)
    try:
        for rtype, path in files:
            if not _stage_with_duckdb(con, rtype, path):
                report.files_read_line_by_line.append(path.name)
                _stage_line_by_line(con, rtype, path)
        _classify(con)
        if validate != "none":
            _validation_failures(con, validate, validation_sample_size)
        deleted = read_deleted(ndjson_dir)
        errors = _read_export_errors(ndjson_dir)
        types = sorted({t for t, _ in files} | set(CORE_RESOURCE_TYPES) | {t for t, _ in deleted})
        with transaction(con):
            report.deleted = _write_raw_tables(con, schema, types, mode, deleted, report.landing_id)
            _write_bookkeeping(con, schema, mode, report.landing_id, errors)
    finally:
        for temp in ("landing_lines",):
            con.execute(f"DROP TABLE IF EXISTS {temp}")
    return _fill_report(con, schema, types, report, len(errors))


def _write_raw_tables(con, schema: str, types: list[str], mode: Mode, deleted: list[tuple[str, str]],
                      landing_id: str) -> int:
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    existing = {t for (t,) in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE schema_name = ? AND NOT temporary", [schema]).fetchall()}
    if mode == "replace":
        for old in existing:
            con.execute(f'DROP TABLE {schema}."{old}"')
        existing = set()
    new_rows = """SELECT keys[2] AS id, doc AS resource, source_file, line_no, ? AS landing_id
                  FROM landing_lines WHERE reason IS NULL AND expected_type = ?"""
    for rtype in types:
        table = f"{schema}.{table_name(rtype)}"
        if table_name(rtype) not in existing:
            con.execute(f"CREATE TABLE {table} AS {new_rows} ORDER BY source_file, line_no", [landing_id, rtype])
        else:
            # Upsert: the incoming version of a resource replaces the stored one.
            con.execute(f"""DELETE FROM {table} WHERE id IN (
                                SELECT keys[2] FROM landing_lines WHERE reason IS NULL AND expected_type = ?)""",
                        [rtype])
            con.execute(f"INSERT INTO {table} {new_rows} ORDER BY source_file, line_no", [landing_id, rtype])
    removed = 0
    if deleted:
        con.register("deleted_ids", pa.table({"resource_type": [d[0] for d in deleted], "id": [d[1] for d in deleted]}))
        for rtype in sorted({d[0] for d in deleted}):
            removed += con.execute(
                f"""DELETE FROM {schema}.{table_name(rtype)}
                    WHERE id IN (SELECT id FROM deleted_ids WHERE resource_type = ?)""", [rtype]).fetchone()[0]
        con.unregister("deleted_ids")
    return removed


def _read_export_errors(ndjson_dir: Path) -> list[tuple[str, str]]:
    error_dir = ndjson_dir / "error"
    out = []
    for path in sorted(error_dir.glob("*.ndjson")) if error_dir.is_dir() else []:
        out += [(path.name, line.decode("utf-8", errors="replace"))
                for line in path.read_bytes().splitlines() if line.strip()]
    return out


def _write_bookkeeping(con, schema: str, mode: Mode, landing_id: str, errors: list[tuple[str, str]]) -> None:
    """Quarantine, per-file counts and server-reported errors: replaced by a full landing,
    appended by a merge so the history of incremental exports is kept."""
    if mode == "replace":
        for table in _BOOKKEEPING:
            con.execute(f"DROP TABLE IF EXISTS {schema}.{table}")
    con.execute(f"""CREATE TABLE IF NOT EXISTS {schema}.quarantine (landing_id VARCHAR, source_file VARCHAR,
                    line_no BIGINT, resource_type VARCHAR, reason VARCHAR, line VARCHAR)""")
    con.execute(f"""CREATE TABLE IF NOT EXISTS {schema}.landing_files (landing_id VARCHAR, source_file VARCHAR,
                    resource_type VARCHAR, lines_read BIGINT, loaded BIGINT, quarantined BIGINT)""")
    con.execute(f"""CREATE TABLE IF NOT EXISTS {schema}.export_errors (landing_id VARCHAR, source_file VARCHAR,
                    operation_outcome VARCHAR)""")
    con.execute(f"""INSERT INTO {schema}.quarantine
                    SELECT ?, source_file, line_no, expected_type, reason, coalesce(text, doc::VARCHAR)
                    FROM landing_lines WHERE reason IS NOT NULL ORDER BY source_file, line_no""", [landing_id])
    con.execute(f"""INSERT INTO {schema}.landing_files
                    SELECT ?, source_file, expected_type, count(*), count(*) FILTER (WHERE reason IS NULL),
                           count(*) FILTER (WHERE reason IS NOT NULL)
                    FROM landing_lines GROUP BY source_file, expected_type ORDER BY source_file""", [landing_id])
    if errors:
        con.register("export_error_rows", pa.table({"f": [e[0] for e in errors], "o": [e[1] for e in errors]}))
        con.execute(f"INSERT INTO {schema}.export_errors SELECT ?, f, o FROM export_error_rows", [landing_id])
        con.unregister("export_error_rows")


def _fill_report(con, schema: str, types: list[str], report: LandingReport, n_errors: int) -> LandingReport:
    report.lines_read, report.loaded, report.quarantined = con.execute(
        f"""SELECT coalesce(sum(lines_read), 0), coalesce(sum(loaded), 0), coalesce(sum(quarantined), 0)
            FROM {schema}.landing_files WHERE landing_id = ?""", [report.landing_id]).fetchone()
    report.loaded_by_type = {
        rtype: con.execute(f"SELECT count(*) FROM {schema}.{table_name(rtype)}").fetchone()[0] for rtype in types
    }
    report.quarantined_by_reason = dict(con.execute(
        f"""SELECT reason, count(*) FROM {schema}.quarantine WHERE landing_id = ?
            GROUP BY reason ORDER BY count(*) DESC""", [report.landing_id]).fetchall())
    report.export_errors = n_errors
    return report
