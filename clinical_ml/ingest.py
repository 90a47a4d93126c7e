"""Land a directory of FHIR Bulk Data NDJSON files into DuckDB raw tables.

Every line read ends up in exactly one place: a raw table (``raw.<resource_type>``, keyed by
resource id) or the quarantine (``raw.quarantine``, with file, line number and reason). The
whole landing is one transaction: a failure leaves the previous tables untouched.

Speed and memory: a clean file is read by DuckDB's own NDJSON reader (``read_ndjson_objects
... WITH ORDINALITY``: parallel C++, exact line numbers) straight into an on-disk staging table
shaped like the raw table, one file at a time; a full export then swaps the staging tables in by
rename (no copy). Only a file DuckDB rejects (a malformed or non-UTF-8 line) or one with blank
lines is split line by line in Python, so each bad line can be quarantined with its own reason.

A directory may also hold what a Bulk Data export's manifest points to besides outputs:
``deleted/*.ndjson`` (Bundles of DELETE entries, applied to the raw tables) and
``error/*.ndjson`` (OperationOutcomes from the server, kept in ``raw.export_errors``).
"""

from __future__ import annotations

import gzip
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import duckdb
import orjson
import pyarrow as pa

from clinical_ml.db import quote_ident, table_exists, transaction

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
# Landing bookkeeping kept beside the resource tables in `raw` (not resources: never hashed as
# input, never counted as a resource type left behind by de-identification).
BOOKKEEPING_TABLES = ("quarantine", "landing_files", "export_errors", "export_completeness")
_TYPE_NAME = re.compile(r"[A-Z][A-Za-z]{1,63}")
# Resource types an error's free text may name (the ones a Bulk export of this platform asks for
# and the common others); "Failed to export Condition resources" names Condition.
_KNOWN_TYPES = frozenset(CORE_RESOURCE_TYPES) | {
    "Medication", "Procedure", "Immunization", "AllergyIntolerance", "DiagnosticReport", "CarePlan", "Goal",
    "Organization", "Practitioner", "PractitionerRole", "Location", "Device", "Claim", "ExplanationOfBenefit",
    "ImagingStudy", "Group", "RelatedPerson", "Coverage", "ServiceRequest", "MedicationAdministration",
    "MedicationStatement", "MedicationDispense", "Specimen", "Provenance", "CareTeam", "EpisodeOfCare"}
MAX_LINE_BYTES = 16 * 1024 * 1024  # a single resource larger than this is quarantined
_CHUNK_BYTES = 64 * 1024 * 1024
_RESOURCE_FILE = re.compile(r"^([A-Z][A-Za-z]+)(?:\.[^.]+)*?\.ndjson(?:\.gz)?$")

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
    """(resource type, path) for each ``<Type>[.nnn].ndjson`` file (or ``.ndjson.gz``); other
    NDJSON-looking files are reported as skipped (e.g. a Bulk export's ``log.ndjson``)."""
    found, skipped = [], []
    for path in sorted(Path(ndjson_dir).iterdir()):
        if not path.is_file():
            continue
        match = _RESOURCE_FILE.match(path.name)
        if match:
            found.append((match.group(1), path))
        elif ".ndjson" in path.name:
            skipped.append(path)
    return found, skipped


_SUBJECT_REFERENCE = "$.subject.reference"
_KEYS = f"['$.resourceType', '$.id', '{_SUBJECT_REFERENCE}']"
# The id of a reference: "Patient/1", "https://host/fhir/Patient/1", ".../Patient/1/_history/2",
# "urn:uuid:1". The common shapes skip the regex (a quarter of its cost, on every reference).
REF_ID_MACRO = r"""ref_id(r) AS
    CASE WHEN r LIKE 'urn:uuid:%' THEN substr(r, 10)
         WHEN NOT contains(r, '/_history/') AND regexp_full_match(split_part(r, '/', -2), '[A-Za-z]+')
              THEN nullif(split_part(r, '/', -1), '')
         ELSE nullif(regexp_extract(r, '([A-Za-z]+)/([^/]+?)(/_history/[^/]+)?$', 2), '') END"""


def _patient_id_sql(is_patient: bool, id_sql: str = "keys[2]", subject_reference_sql: str = "keys[3]") -> str:
    """The id of the patient a resource is about: a Patient's own id, else the id of its
    ``subject`` reference (what de-identification joins on); by default from a parsed line's
    ``keys``. Landed as ``patient_id`` so that a patient's resources can be picked out by patient
    bucket without parsing them again."""
    return id_sql if is_patient else f"ref_id({subject_reference_sql})"


def _register_ref_id(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(f"CREATE OR REPLACE TEMP MACRO {REF_ID_MACRO}")


_STAGE_PREFIX = "__landing_"


def _open(path: Path):
    """The file's bytes, gunzipped when it is ``.gz`` (Bulk Data folders are often compressed)."""
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _content_size_and_last_byte(path: Path) -> tuple[int, bytes]:
    if not path.name.endswith(".gz"):
        size = path.stat().st_size
        with open(path, "rb") as handle:
            handle.seek(max(size - 1, 0))
            return size, handle.read(1)
    size, last = 0, b""
    with gzip.open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            size, last = size + len(chunk), chunk[-1:]
    return size, last


def _stage(schema: str, name: str) -> str:
    return f'{schema}."{_STAGE_PREFIX}{name}"'


def _object_reason(resource_type: str) -> str:
    """Why a parsed line (``doc``, ``keys``) does not load, or NULL when it does. The type is
    inlined as a literal: it comes from a file name matched by ``[A-Z][A-Za-z]+``."""
    expected = f"'{resource_type}'"
    # DuckDB's maximum_object_size only sizes its read buffer: the limit is enforced here.
    return f"""CASE
        WHEN strlen(doc) > {MAX_LINE_BYTES} THEN 'line longer than {MAX_LINE_BYTES} bytes'
        WHEN keys[1] IS NOT DISTINCT FROM {expected} AND coalesce(keys[2], '') <> '' THEN NULL
        WHEN json_type(doc) <> 'OBJECT' THEN 'not a JSON object'
        WHEN coalesce(keys[1], '') = '' THEN 'missing resourceType'
        WHEN keys[1] <> {expected} THEN 'resourceType does not match file type ' || {expected}
        ELSE 'missing id' END"""


def _create_stages(con: duckdb.DuckDBPyConnection, schema: str, types: list[str]) -> None:
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    for rtype in types:
        con.execute(f"""CREATE OR REPLACE TABLE {_stage(schema, table_name(rtype))} (
            id VARCHAR, resource JSON, source_file VARCHAR, line_no BIGINT, landing_id VARCHAR, reason VARCHAR,
            patient_id VARCHAR)""")
    con.execute(f"""CREATE OR REPLACE TABLE {_stage(schema, 'quarantine')} (landing_id VARCHAR, source_file VARCHAR,
                    line_no BIGINT, resource_type VARCHAR, reason VARCHAR, line VARCHAR)""")


def _drop_stages(con: duckdb.DuckDBPyConnection, schema: str) -> None:
    for (name,) in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE schema_name = ? AND starts_with(table_name, ?)",
        [schema, _STAGE_PREFIX]).fetchall():
        con.execute(f'DROP TABLE IF EXISTS {schema}."{name}"')


def _stage_with_duckdb(con: duckdb.DuckDBPyConnection, schema: str, rtype: str, path: Path,
                       landing_id: str) -> int | None:
    """Fast path: DuckDB reads and parses the file into the staging table; returns the file's
    line count, proven by its size. None when the file needs line-by-line reading (nothing of
    it is then left staged)."""
    stage = _stage(schema, table_name(rtype))
    # WITH ORDINALITY numbers the lines but makes DuckDB read, parse and write the file on one
    # thread. When DuckDB keeps insertion order (its default), the rows are appended in file
    # order on all threads instead and numbered from their rowids below.
    in_order = bool(con.execute("SELECT current_setting('preserve_insertion_order')").fetchone()[0])
    numbered = "" if in_order else "WITH ORDINALITY"
    try:
        con.execute(
            f"""INSERT INTO {stage}
                SELECT keys[2], doc, ?, {"NULL" if in_order else "ordinality"}, ?, {_object_reason(rtype)},
                       {_patient_id_sql(rtype == "Patient")}
                FROM (SELECT *, json AS doc, json_extract_string(json, {_KEYS}) AS keys
                      FROM read_ndjson_objects(?, maximum_object_size = {MAX_LINE_BYTES}) {numbered})""",
            [path.name, landing_id, str(path)],
        )
    except duckdb.InvalidInputException:
        return None  # a malformed, non-UTF-8 or oversize line somewhere: the insert did not happen
    # DuckDB skips blank lines, which would shift the numbering. It keeps each object's text
    # byte for byte, so the staged bytes plus one newline per line add up to the file size
    # exactly when there are none (also catching CRLF endings and padded lines).
    rows, text_bytes, first_rowid, last_rowid = con.execute(
        f"SELECT count(*), coalesce(sum(strlen(resource)), 0), min(rowid), max(rowid) FROM {stage} WHERE source_file = ?",
        [path.name]).fetchone()
    size, last_byte = _content_size_and_last_byte(path)
    newlines = rows if last_byte == b"\n" else rows - 1
    if size != text_bytes + newlines or (rows and last_rowid - first_rowid + 1 != rows):
        con.execute(f"DELETE FROM {stage} WHERE source_file = ?", [path.name])
        return None
    if in_order:
        con.execute(f"UPDATE {stage} SET line_no = rowid - $first + 1 WHERE source_file = $file",
                    {"first": first_rowid, "file": path.name})
    return rows


def _split_lines(path: Path):
    """Yield (first line number, list of raw lines) per chunk of the file."""
    line_no = 1
    carry = b""
    with _open(path) as handle:
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


def _stage_line_by_line(con: duckdb.DuckDBPyConnection, schema: str, rtype: str, path: Path, landing_id: str) -> int:
    """Slow path: split the file into lines ourselves; returns the number of lines read."""
    stage, quarantine = _stage(schema, table_name(rtype)), _stage(schema, "quarantine")
    n_lines = 0
    for first_line, pieces in _split_lines(path):
        n_lines += len(pieces)
        lines, ok = _decode(pieces)
        con.register("landing_batch", pa.table({
            "line_no": pa.array(range(first_line, first_line + len(lines)), pa.int64()),
            "line": pa.array(lines, pa.large_string()),
            "utf8_ok": pa.array(ok, pa.bool_()),
        }))
        con.execute(
            f"""CREATE OR REPLACE TEMP TABLE landing_parsed AS
                SELECT *, CASE WHEN doc IS NOT NULL THEN json_extract_string(doc, {_KEYS}) END AS keys
                FROM (SELECT *, CASE WHEN utf8_ok AND strlen(line) <= {MAX_LINE_BYTES}
                                     THEN TRY_CAST(line AS JSON) END AS doc FROM landing_batch)""")
        con.unregister("landing_batch")
        con.execute(
            f"""INSERT INTO {stage} SELECT keys[2], doc, ?, line_no, ?, NULL, {_patient_id_sql(rtype == "Patient")} FROM landing_parsed
                WHERE coalesce(doc IS NOT NULL AND keys[1] = ? AND coalesce(keys[2], '') <> '', false)""",
            [path.name, landing_id, rtype])
        con.execute(
            f"""INSERT INTO {quarantine}
                SELECT ?, ?, line_no, ?, CASE
                    WHEN NOT utf8_ok THEN 'invalid UTF-8'
                    WHEN strlen(line) > {MAX_LINE_BYTES} THEN 'line longer than {MAX_LINE_BYTES} bytes'
                    WHEN trim(line) = '' THEN 'empty line'
                    WHEN doc IS NULL THEN 'invalid JSON'
                    ELSE {_object_reason(rtype)} END, line
                FROM landing_parsed
                WHERE NOT coalesce(doc IS NOT NULL AND keys[1] = ? AND coalesce(keys[2], '') <> '', false)""",
            [landing_id, path.name, rtype, rtype])
    con.execute("DROP TABLE IF EXISTS landing_parsed")
    return n_lines


def _settle_stage(con: duckdb.DuckDBPyConnection, schema: str, rtype: str, landing_id: str) -> None:
    """Move the staged lines that do not load (bad objects, duplicate ids) to the quarantine.
    Both are rare, so each is first looked for with a cheap scan or hash aggregate."""
    stage, quarantine = _stage(schema, table_name(rtype)), _stage(schema, "quarantine")
    if con.execute(f"SELECT count(*) FROM {stage} WHERE reason IS NOT NULL").fetchone()[0]:
        con.execute(f"""INSERT INTO {quarantine} SELECT ?, source_file, line_no, ?, reason, resource::VARCHAR
                        FROM {stage} WHERE reason IS NOT NULL""", [landing_id, rtype])
        con.execute(f"DELETE FROM {stage} WHERE reason IS NOT NULL")
    if con.execute(f"SELECT count(*) FROM (SELECT 1 FROM {stage} GROUP BY id HAVING count(*) > 1)").fetchone()[0]:
        con.execute(
            f"""UPDATE {stage} SET reason = 'duplicate id (first occurrence kept)'
                FROM (SELECT source_file, line_no, row_number() OVER (
                          PARTITION BY id ORDER BY source_file, line_no) AS occurrence FROM {stage}) d
                WHERE d.occurrence > 1 AND {stage}.source_file = d.source_file AND {stage}.line_no = d.line_no""")
        _settle_stage(con, schema, rtype, landing_id)


def _validation_failures(con: duckdb.DuckDBPyConnection, schema: str, rtype: str, validate: str,
                         sample_size: int) -> None:
    """Mark staged resources that fail the fhir.resources R4B model of their type.

    The reason names the failing element and error type, never the value (values can be PHI,
    and reasons are shown as metadata)."""
    from fhir.resources.R4B import get_fhir_model_class
    from pydantic import ValidationError

    stage = _stage(schema, table_name(rtype))
    limit = "" if validate == "all" else f"USING SAMPLE {int(sample_size)} ROWS (reservoir, 42)"
    rows = con.execute(f"SELECT source_file, line_no, resource::VARCHAR FROM (SELECT * FROM {stage} {limit})").fetchall()
    try:
        model = get_fhir_model_class(rtype)
    except KeyError:
        return  # not an R4B resource type we can check; the structural checks still applied
    failures = []
    for source_file, line_no, text in rows:
        try:
            model.model_validate_json(text)
        except ValidationError as err:
            first = err.errors()[0] if err.errors() else {"loc": (), "type": "invalid"}
            detail = f"{_safe_location(first['loc'], first['type'])}: {first['type']}"
            failures.append((source_file, line_no, f"FHIR R4B validation failed at {detail}"[:200]))
        except Exception as err:  # a validator that raised something else: the type only, never the text
            failures.append((source_file, line_no, f"FHIR R4B validation failed: {type(err).__name__}"))
    if failures:
        con.register("validation_failures", pa.table({
            "source_file": [f[0] for f in failures], "line_no": [f[1] for f in failures],
            "reason": [f[2] for f in failures]}))
        con.execute(f"""UPDATE {stage} SET reason = v.reason FROM validation_failures v
                        WHERE {stage}.source_file = v.source_file AND {stage}.line_no = v.line_no""")
        con.unregister("validation_failures")


_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")


def _safe_location(loc: tuple, error_type: str) -> str:
    """An error location without anything that may be data: an unknown key (extra_forbidden)
    is the resource's own text, and so is any segment that does not look like a field name."""
    parts = [str(p) if isinstance(p, int) or _FIELD_NAME.fullmatch(str(p)) else "<key>" for p in loc]
    if error_type == "extra_forbidden" and parts:
        parts[-1] = "<extra>"
    return ".".join(parts)


_FIELD_NAME = re.compile(r"[a-z_][A-Za-z0-9_]{0,63}")


def read_deleted(ndjson_dir: Path) -> tuple[list[tuple[str, str]], list[tuple[str, int, str, str]]]:
    """(resource type, id) of the DELETE entries in ``deleted/*.ndjson`` Bundles, and the lines
    that could not be used, as (file, line number, reason, line) for the quarantine. A resource
    type must look like one (``[A-Z][A-Za-z]+``): it names a table in SQL."""
    deleted, bad = [], []
    folder = ndjson_dir / "deleted"
    for path in sorted(folder.glob("*.ndjson")) if folder.is_dir() else []:
        name = f"deleted/{path.name}"
        for line_no, line in enumerate(path.read_bytes().split(b"\n"), start=1):
            if not line.strip():
                continue
            text = line.decode("utf-8", errors="replace")
            try:
                bundle = orjson.loads(line)
                entries = bundle.get("entry", []) if isinstance(bundle, dict) else None
                if not isinstance(entries, list):
                    raise ValueError("not a Bundle with an entry list")
            except (orjson.JSONDecodeError, ValueError) as err:
                reason = "invalid JSON" if isinstance(err, orjson.JSONDecodeError) else str(err)
                bad.append((name, line_no, f"deleted: {reason}", text))
                continue
            for entry in entries:
                request = entry.get("request") if isinstance(entry, dict) else None
                if not isinstance(request, dict) or request.get("method") != "DELETE":
                    continue
                parts = str(request.get("url", "")).strip("/").split("/")
                if len(parts) >= 2 and _RESOURCE_TYPE.fullmatch(parts[-2]) and parts[-1]:
                    deleted.append((parts[-2], parts[-1]))
                else:
                    bad.append((name, line_no, "deleted: DELETE entry without a <Type>/<id> url", text))
    return deleted, bad


def _read_export_errors(ndjson_dir: Path) -> list[tuple[str, str]]:
    error_dir = ndjson_dir / "error"
    out = []
    for path in sorted(error_dir.glob("*.ndjson")) if error_dir.is_dir() else []:
        out += [(path.name, line.decode("utf-8", errors="replace"))
                for line in path.read_bytes().splitlines() if line.strip()]
    return out


@dataclass
class ExportCompleteness:
    """What the server said it could not export, for one landing."""

    errors: int                       # OperationOutcomes in the error files with an error or fatal issue
    errors_by_type: dict[str, int]    # resource type named by an issue ("unspecified" if none)
    tolerance: int
    outcomes: int = 0                 # all OperationOutcomes, warnings and information included

    @property
    def complete(self) -> bool:
        return self.errors <= self.tolerance

    def describe(self) -> str:
        if not self.errors:
            return "the server reported no export errors"
        named = ", ".join(f"{t} {n}" for t, n in sorted(self.errors_by_type.items()))
        return (f"the server reported {self.errors} export error(s) ({named}); tolerance {self.tolerance}: "
                f"{'accepted as partial data' if self.complete else 'the export is incomplete'}")


def record_completeness(con: duckdb.DuckDBPyConnection, completeness: "ExportCompleteness", landing_id: str,
                        schema: str = "raw") -> None:
    """Keep the verdict on the latest landing beside the raw tables: de-identification refuses
    to read an incomplete export in any later run too (a blocking check only blocks its own run)."""
    con.execute(f"""CREATE OR REPLACE TABLE {schema}.export_completeness AS
                    SELECT ? AS landing_id, current_timestamp AS checked_at, ? AS errors, ? AS tolerance,
                           ? AS complete, ? AS summary""",
                [landing_id, completeness.errors, completeness.tolerance, completeness.complete,
                 completeness.describe()])


class IncompleteExportError(RuntimeError):
    """The landed export is missing what the server could not export."""


def refuse_incomplete_export(con: duckdb.DuckDBPyConnection, schema: str = "raw") -> None:
    """Raise if the latest landing was judged an incomplete export (see record_completeness)."""
    row = (con.execute(f"SELECT complete, summary FROM {schema}.export_completeness").fetchone()
           if table_exists(con, schema, "export_completeness") else None)
    if row is not None and not row[0]:
        raise IncompleteExportError(f"the landed export is incomplete: {row[1]}. Land a complete export, or accept "
                                    "partial data with FHIR_MAX_EXPORT_ERRORS.")


def export_completeness(con: duckdb.DuckDBPyConnection, landing_id: str, tolerance: int = 0,
                        schema: str = "raw") -> ExportCompleteness:
    """Count a landing's server-reported errors per resource type: the type an issue names in
    ``expression`` (``Condition`` or ``Condition.code``), else one named in its diagnostics."""
    rows = (con.execute(f"SELECT operation_outcome FROM {schema}.export_errors WHERE landing_id = ?",
                        [landing_id]).fetchall() if table_exists(con, schema, "export_errors") else [])
    by_type: dict[str, int] = {}
    errors = 0
    for (text,) in rows:
        try:
            outcome = orjson.loads(text)
        except orjson.JSONDecodeError:
            outcome = {}
        issues = outcome.get("issue") if isinstance(outcome, dict) else None
        issues = [i if isinstance(i, dict) else {} for i in issues] if isinstance(issues, list) else []
        # an outcome of warnings or information only (lenient handling notes) is no failure
        if issues and all(i.get("severity") in ("warning", "information") for i in issues):
            continue
        errors += 1
        named = set()
        for issue in issues:
            expressions = issue.get("expression") if isinstance(issue.get("expression"), list) else []
            named |= {e.split(".")[0] for e in expressions if isinstance(e, str) and _TYPE_NAME.fullmatch(e.split(".")[0])}
            diagnostics = issue.get("diagnostics") if isinstance(issue.get("diagnostics"), str) else ""
            named |= {t for t in re.findall(r"\b[A-Z][a-z]+(?:[A-Z][a-z]+)+\b|\b[A-Z][a-z]{3,}\b", diagnostics)
                      if t in _KNOWN_TYPES}
        for rtype in sorted(named) or ["unspecified"]:
            by_type[rtype] = by_type.get(rtype, 0) + 1
    return ExportCompleteness(errors=errors, errors_by_type=by_type, tolerance=tolerance, outcomes=len(rows))


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
    deleted, bad_deletions = read_deleted(ndjson_dir)
    errors = _read_export_errors(ndjson_dir)
    types = sorted({t for t, _ in files} | set(CORE_RESOURCE_TYPES) | {t for t, _ in deleted})

    _drop_stages(con, schema)  # leftovers of a crashed landing
    _register_ref_id(con)
    try:
        _create_stages(con, schema, types)
        # Lines per file as read (before any line is classified), so a line lost between
        # reading and landing breaks the reconciliation instead of vanishing from both sides.
        line_counts: dict[str, tuple[str, int]] = {}
        for rtype, path in files:
            n_lines = _stage_with_duckdb(con, schema, rtype, path, report.landing_id)
            if n_lines is None:
                report.files_read_line_by_line.append(path.name)
                n_lines = _stage_line_by_line(con, schema, rtype, path, report.landing_id)
            line_counts[path.name] = (rtype, n_lines)
        for rtype in types:
            if validate != "none":
                _validation_failures(con, schema, rtype, validate, validation_sample_size)
            _settle_stage(con, schema, rtype, report.landing_id)
            con.execute(f"ALTER TABLE {_stage(schema, table_name(rtype))} DROP COLUMN reason")
        if bad_deletions:
            con.executemany(f"INSERT INTO {_stage(schema, 'quarantine')} VALUES (?, ?, ?, 'Bundle', ?, ?)",
                            [(report.landing_id, *b) for b in bad_deletions])
        _count_files(con, schema, types, report.landing_id, line_counts)
        if mode == "merge":
            add_patient_ids(con, schema)  # merged onto tables landed before the column existed
        with transaction(con):
            report.deleted = _commit_raw_tables(con, schema, types, mode, deleted)
            _commit_bookkeeping(con, schema, mode, report.landing_id, errors)
    finally:
        _drop_stages(con, schema)
        con.execute("DROP TABLE IF EXISTS landing_file_counts")
    return _fill_report(con, schema, types, report, len(errors))


def _count_files(con: duckdb.DuckDBPyConnection, schema: str, types: list[str], landing_id: str,
                 line_counts: dict[str, tuple[str, int]]) -> None:
    loaded = " UNION ALL ".join(
        f"SELECT source_file, '{t}' AS resource_type, count(*) AS n FROM {_stage(schema, table_name(t))} GROUP BY source_file"
        for t in types)
    con.register("file_line_counts", pa.table({"source_file": list(line_counts),
                                               "file_type": [t for t, _ in line_counts.values()],
                                               "n": [n for _, n in line_counts.values()]}))
    try:
        con.execute(
            f"""CREATE OR REPLACE TEMP TABLE landing_file_counts AS
                WITH loaded AS ({loaded}),
                     quarantined AS (SELECT source_file, resource_type, count(*) AS n
                                     FROM {_stage(schema, 'quarantine')} GROUP BY ALL),
                     counted AS (SELECT source_file, coalesce(l.resource_type, q.resource_type) AS resource_type,
                                        coalesce(l.n, 0) AS loaded, coalesce(q.n, 0) AS quarantined
                                 FROM loaded l FULL OUTER JOIN quarantined q USING (source_file, resource_type))
                SELECT ? AS landing_id, source_file, coalesce(c.resource_type, f.file_type) AS resource_type,
                       -- lines of resource files come from the bytes; deleted/ lines are only quarantined ones
                       coalesce(f.n, c.loaded + c.quarantined) AS lines_read, coalesce(c.loaded, 0) AS loaded,
                       coalesce(c.quarantined, 0) AS quarantined
                FROM counted c FULL OUTER JOIN file_line_counts f USING (source_file)
                ORDER BY source_file""", [landing_id])
    finally:
        con.unregister("file_line_counts")


def add_patient_ids(con: duckdb.DuckDBPyConnection, schema: str = "raw") -> list[str]:
    """Give the resource tables of a batch landed before ``patient_id`` existed that column (an
    incremental export merges onto such a batch; de-identification by patient bucket reads it).
    Returns the tables changed."""
    missing = [t for (t,) in con.execute(
        """SELECT table_name FROM duckdb_columns() WHERE schema_name = $schema AND column_name = 'resource'
           AND database_name = current_database() AND NOT starts_with(table_name, $stage)
           EXCEPT SELECT table_name FROM duckdb_columns() WHERE schema_name = $schema AND column_name = 'patient_id'
           AND database_name = current_database() ORDER BY 1""",
        {"schema": schema, "stage": _STAGE_PREFIX}).fetchall()]
    if missing:
        _register_ref_id(con)
        with transaction(con):
            for table in missing:
                target = f"{quote_ident(schema)}.{quote_ident(table)}"
                con.execute(f"ALTER TABLE {target} ADD COLUMN patient_id VARCHAR")
                expression = _patient_id_sql(table == table_name("Patient"), "id",
                                             f"json_extract_string(resource, '{_SUBJECT_REFERENCE}')")
                con.execute(f"UPDATE {target} SET patient_id = {expression}")
    return missing


def _commit_raw_tables(con, schema: str, types: list[str], mode: Mode, deleted: list[tuple[str, str]]) -> int:
    existing = {t for (t,) in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE schema_name = ? AND NOT starts_with(table_name, ?)",
        [schema, _STAGE_PREFIX]).fetchall()}
    if mode == "replace":
        for old in existing:
            con.execute(f'DROP TABLE {schema}."{old}"')
        existing = set()
    for rtype in types:
        name, stage = table_name(rtype), _stage(schema, table_name(rtype))
        if name not in existing:
            con.execute(f'ALTER TABLE {stage} RENAME TO "{name}"')  # metadata only: no copy
        else:
            # Upsert: the incoming version of a resource replaces the stored one.
            con.execute(f"DELETE FROM {schema}.{name} WHERE id IN (SELECT id FROM {stage})")
            con.execute(f"INSERT INTO {schema}.{name} SELECT * FROM {stage} ORDER BY source_file, line_no")
    removed = 0
    if deleted:
        con.register("deleted_ids", pa.table({"resource_type": [d[0] for d in deleted], "id": [d[1] for d in deleted]}))
        for rtype in sorted({d[0] for d in deleted}):
            removed += con.execute(
                f"""DELETE FROM {schema}.{table_name(rtype)}
                    WHERE id IN (SELECT id FROM deleted_ids WHERE resource_type = ?)""", [rtype]).fetchone()[0]
        con.unregister("deleted_ids")
    return removed


def _commit_bookkeeping(con, schema: str, mode: Mode, landing_id: str, errors: list[tuple[str, str]]) -> None:
    """Quarantine, per-file counts and server-reported errors: replaced by a full landing,
    appended by a merge so the history of incremental exports is kept."""
    con.execute(f"""CREATE TABLE IF NOT EXISTS {schema}.quarantine (landing_id VARCHAR, source_file VARCHAR,
                    line_no BIGINT, resource_type VARCHAR, reason VARCHAR, line VARCHAR)""")
    con.execute(f"""CREATE TABLE IF NOT EXISTS {schema}.landing_files (landing_id VARCHAR, source_file VARCHAR,
                    resource_type VARCHAR, lines_read BIGINT, loaded BIGINT, quarantined BIGINT)""")
    con.execute(f"""CREATE TABLE IF NOT EXISTS {schema}.export_errors (landing_id VARCHAR, source_file VARCHAR,
                    operation_outcome VARCHAR)""")
    con.execute(f"""INSERT INTO {schema}.quarantine SELECT * FROM {_stage(schema, 'quarantine')}
                    ORDER BY source_file, line_no""")
    con.execute(f"INSERT INTO {schema}.landing_files SELECT * FROM landing_file_counts")
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
