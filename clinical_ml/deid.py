"""HIPAA Safe Harbor de-identification of the raw FHIR tables, as set-based DuckDB SQL.

Design: the de-identified tables are a *whitelist projection* of the raw resources. Only the
fields listed here cross the boundary (codes, values, generalized geography and dates, keyed
pseudonyms); every other element (names, telecom, identifiers, photos, narrative ``text``,
extensions, display strings) is left behind by construction. Free-text notes are the one
exception and are scrubbed: the patient's own names and identifiers first, then patterns.

- Pseudonyms: HMAC-SHA256 under a secret key, so the same id and key give the same pseudonym
  in every resource and on every run, and nobody without the key can reverse them.
- Dates: shifted by a per-patient secret offset (intervals within a patient are kept exactly).
- Birth: year only; patients aged 90 or more at the end of the record are grouped (no year).
- Geography: state and 3-digit zip; "000" for prefixes whose area has <= 20,000 people.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import duckdb
import pyarrow as pa

from clinical_ml.db import transaction

# 3-digit zip prefixes with 20,000 or fewer people (2000 Census), which Safe Harbor maps to 000.
RESTRICTED_ZIP3 = (
    "036", "059", "063", "102", "203", "556", "692", "790", "821",
    "823", "830", "831", "878", "879", "884", "890", "893",
)
HYPERTENSION_CODES = ("59621000", "38341003", "I10")
DEID_TABLES = ("patient", "encounter", "condition", "observation", "medication_request", "document_reference")

# Scrubbing patterns for free text, applied in order after the patient's own identifiers.
# (RE2 syntax, replacement tag). Kept as data so tests and the benchmark can report per tag.
NOTE_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"(?i)\b(?:https?://|www\.)\S+", "[URL]"),
    (r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}", "[EMAIL]"),
    (r"\b\d{3}-\d{2}-\d{4}\b", "[SSN]"),
    (r"\b\d{4}-\d{2}-\d{2}(?:[T ][0-9:.]+(?:Z|[+-]\d{2}:?\d{2})?)?\b", "[DATE]"),
    (r"\b\d{1,2}[/-]\d{1,2}[/-]\d{2,4}\b", "[DATE]"),
    (r"(?i)\b(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?\s+\d{1,2}(?:st|nd|rd|th)?,?\s+\d{4}\b",
     "[DATE]"),
    (r"(?i)\b\d{1,2}\s+(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?,?\s+\d{4}\b", "[DATE]"),
    (r"(?:\+?1[\s.-]?)?\(?\b\d{3}\)?[\s.-]?\d{3}[\s.-]\d{4}\b", "[PHONE]"),
    (r"\b\d{1,3}(?:\.\d{1,3}){3}\b", "[IP]"),
    (r"(?i)\b(?:MRN|medical record(?: number)?|acct|account|member id|policy|licen[cs]e|DL)\s*(?:number|no\.?|#)?\s*[:#]?\s*[A-Z0-9-]*\d[A-Z0-9-]{3,}",
     "[ID]"),
    (r"\b[A-Z]{0,4}\d{6,}\b", "[ID]"),
    (r"\b\d{1,6}\s+(?:[A-Z][A-Za-z']+\s+){1,3}(?:St|Street|Ave|Avenue|Rd|Road|Blvd|Boulevard|Ln|Lane|Dr|Drive|Ct|Court|Way|Pl|Place|Ter|Terrace)\b\.?",
     "[ADDRESS]"),
    (r"\b\d{5}(?:-\d{4})?\b", "[ZIP]"),
    (r"\b(?:Mr|Mrs|Ms|Miss|Dr)\.?\s+[A-Z][A-Za-z'-]+(?:\s+[A-Z][A-Za-z'-]+)?", "[NAME]"),
    (r"\b[A-Z][a-z]+\d+\b", "[NAME]"),  # Synthea-style names with digits ("Medhurst46")
    # Safe Harbor: ages over 89 are aggregated ("93 year-old" -> "[AGE_90_PLUS] year-old").
    (r"(?i)\b(?:9\d|1[0-4]\d)([- ](?:years?|yrs?)[- ]old)\b", r"[AGE_90_PLUS]\1"),
)


class MissingSecretKey(RuntimeError):
    """Raised when no de-identification key is configured (never includes key material)."""


@dataclass
class DeidReport:
    rows_by_table: dict[str, int]
    removed_by_category: dict[str, int]
    orphan_rows_dropped: dict[str, int]
    reference_date: str


def pseudonym(key: bytes, kind: str, resource_id: str) -> str:
    """Keyed pseudonym for ``kind/resource_id`` (the same function the SQL uses)."""
    return hmac.new(key, f"{kind}/{resource_id}".encode(), hashlib.sha256).hexdigest()[:24]


def date_shift_days(key: bytes, patient_id: str, max_days: int) -> int:
    """Per-patient secret offset in [-max_days, +max_days], never 0 so every date moves."""
    digest = hmac.new(key, f"date-shift/{patient_id}".encode(), hashlib.sha256).digest()
    span = 2 * max_days
    offset = int.from_bytes(digest[:8], "big") % span - max_days
    return offset if offset < 0 else offset + 1


def register_functions(con: duckdb.DuckDBPyConnection, key: bytes, max_shift_days: int) -> None:
    """Register the keyed functions as vectorized UDFs. The key lives only in these closures:
    it never appears in SQL text, so it cannot reach a query log or an error message."""

    def _pseudonym(kinds: pa.Array, ids: pa.Array) -> pa.Array:
        return pa.array(
            [None if i is None else pseudonym(key, k, i) for k, i in zip(kinds.to_pylist(), ids.to_pylist())],
            pa.string(),
        )

    def _shift(ids: pa.Array) -> pa.Array:
        return pa.array(
            [None if i is None else date_shift_days(key, i, max_shift_days) for i in ids.to_pylist()], pa.int32()
        )

    for name in ("pseudonym", "date_shift_days"):
        try:
            con.remove_function(name)
        except Exception:  # not registered yet on this connection
            pass
    con.create_function("pseudonym", _pseudonym, ["VARCHAR", "VARCHAR"], "VARCHAR", type="arrow", side_effects=False)
    con.create_function("date_shift_days", _shift, ["VARCHAR"], "INTEGER", type="arrow", side_effects=False)
    con.execute(
        r"""CREATE OR REPLACE TEMP MACRO ref_id(r) AS
            CASE WHEN r LIKE 'urn:uuid:%' THEN substr(r, 10)
                 ELSE nullif(regexp_extract(r, '([A-Za-z]+)/([^/]+?)(/_history/[^/]+)?$', 2), '') END"""
    )
    con.execute("CREATE OR REPLACE TEMP MACRO fhir_date(s) AS TRY_CAST(substr(s, 1, 10) AS DATE)")
    con.execute(
        """CREATE OR REPLACE TEMP MACRO codings(j) AS
           coalesce(from_json(j, '[{"system":"VARCHAR","code":"VARCHAR"}]'), [])"""
    )


def _scrub_expression(column: str, pattern_column: str) -> str:
    expr = f"CASE WHEN {pattern_column} IS NULL THEN {column} ELSE regexp_replace({column}, {pattern_column}, '[REDACTED]', 'g') END"
    for pattern, tag in NOTE_PATTERNS:
        escaped = pattern.replace("'", "''")
        expr = f"regexp_replace({expr}, '{escaped}', '{tag}', 'g')"
    return expr


def scrub_notes_sql(con: duckdb.DuckDBPyConnection, texts: list[str], own_identifiers: list[list[str]] | None = None) -> list[str]:
    """Scrub free texts with the same SQL the pipeline uses (for tests and the benchmark)."""
    own_identifiers = own_identifiers or [[] for _ in texts]
    table = pa.table({"n": list(range(len(texts))), "note": texts, "tokens": own_identifiers})
    con.register("scrub_input", table)
    try:
        rows = con.execute(
            f"""WITH p AS (SELECT n, note, {_identifier_pattern_sql('tokens')} AS pattern FROM scrub_input)
                SELECT {_scrub_expression('note', 'pattern')} FROM p ORDER BY n"""
        ).fetchall()
    finally:
        con.unregister("scrub_input")
    return [r[0] for r in rows]


def _identifier_pattern_sql(tokens_column: str) -> str:
    """A case-insensitive alternation of the (regex-escaped) identifier tokens, or NULL."""
    escaped = rf"""list_transform(list_filter({tokens_column}, lambda t: t IS NOT NULL AND length(trim(t)) >= 2),
                    lambda t: regexp_replace(trim(t), '([\\^$.|?*+()\[\]{{}}])', '\\\1', 'g'))"""
    return f"""CASE WHEN len({escaped}) > 0
               THEN '(?i)\\b(?:' || array_to_string(list_reverse(list_sort({escaped})), '|') || ')\\b' END"""


def deidentify(
    con: duckdb.DuckDBPyConnection,
    key: bytes,
    raw_schema: str = "raw",
    out_schema: str = "deid",
    max_shift_days: int = 365,
) -> DeidReport:
    """Build ``out_schema`` tables from the raw tables in one transaction."""
    if not key:
        raise MissingSecretKey("de-identification key is empty")
    register_functions(con, key, max_shift_days)
    r = raw_schema
    reference_date = con.execute(
        f"""SELECT coalesce(max(fhir_date(resource->'period'->>'start')), current_date)
            FROM {r}.encounter"""
    ).fetchone()[0]

    # Patient-level working table: stays in a TEMP table (PHI never written outside `raw`).
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE deid_patient_src AS
        WITH base AS (
            SELECT id AS patient_id, resource AS r,
                   fhir_date(resource->>'birthDate') AS birth_date,
                   fhir_date(resource->>'deceasedDateTime') AS death_date,
                   CAST(resource->'extension' AS JSON[]) AS ext,
                   CAST(resource->'address' AS JSON[]) AS addr
            FROM {r}.patient
        )
        SELECT patient_id,
            pseudonym('Patient', patient_id) AS patient_key,
            date_shift_days(patient_id) AS shift_days,
            r->>'gender' AS gender,
            birth_date, death_date,
            coalesce(TRY_CAST(r->>'deceasedBoolean' AS BOOLEAN), false) OR death_date IS NOT NULL AS deceased,
            -- Age as of the end of the record, also for the deceased: a birth year that would
            -- indicate an age over 89 today is itself an identifier under Safe Harbor.
            date_diff('year', birth_date, DATE '{reference_date}')
                - CASE WHEN strftime(birth_date, '%m%d') > strftime(DATE '{reference_date}', '%m%d') THEN 1 ELSE 0 END
                AS age_at_reference,
            list_filter(ext, lambda e: e->>'url' LIKE '%us-core-race')[1]->'extension'->0->'valueCoding'->>'display' AS race,
            list_filter(ext, lambda e: e->>'url' LIKE '%us-core-ethnicity')[1]->'extension'->0->'valueCoding'->>'display'
                AS ethnicity,
            addr[1]->>'state' AS state,
            left(regexp_replace(coalesce(addr[1]->>'postalCode', ''), '[^0-9]', '', 'g'), 3) AS zip_digits,
            -- the patient's own identifiers, to remove from their notes
            list_concat(
                flatten(list_transform(CAST(r->'name' AS JSON[]), n ->
                    list_concat(coalesce(CAST(n->'given' AS VARCHAR[]), []), [n->>'family'],
                                string_split(coalesce(n->>'text', ''), ' ')))),
                list_transform(CAST(r->'identifier' AS JSON[]), lambda i: i->>'value'),
                list_transform(CAST(r->'telecom' AS JSON[]), lambda t: t->>'value'),
                flatten(list_transform(addr, lambda a: coalesce(CAST(a->'line' AS VARCHAR[]), []))),
                [r->>'birthDate']
            ) AS own_identifiers,
            coalesce(len(CAST(r->'name' AS JSON[])), 0) AS n_names,
            coalesce(len(CAST(r->'identifier' AS JSON[])), 0) AS n_identifiers,
            coalesce(len(CAST(r->'telecom' AS JSON[])), 0) AS n_telecom,
            coalesce(len(addr), 0) AS n_addresses,
            coalesce(len(CAST(r->'photo' AS JSON[])), 0) AS n_photos,
            (r->'text') IS NOT NULL AS has_narrative
        FROM base
        """
    )
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE deid_patient_src AS
            SELECT *, {_identifier_pattern_sql('own_identifiers')} AS identifier_pattern FROM deid_patient_src"""
    )

    # Encounter pseudonyms once per encounter (not once per referencing row).
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE deid_encounter_keys AS
            SELECT id AS encounter_id, pseudonym('Encounter', id) AS encounter_key FROM {r}.encounter"""
    )
    restricted = ", ".join(f"'{z}'" for z in RESTRICTED_ZIP3)
    statements = {
        "patient": f"""
            SELECT patient_key, gender,
                CASE WHEN age_at_reference >= 90 THEN NULL ELSE year(birth_date) END AS birth_year,
                age_at_reference >= 90 AS age_90_or_older,
                deceased,
                death_date + shift_days AS death_date,
                race, ethnicity, state,
                CASE WHEN length(zip_digits) < 3 THEN NULL
                     WHEN zip_digits IN ({restricted}) THEN '000' ELSE zip_digits END AS zip3
            FROM deid_patient_src""",
        "encounter": f"""
            SELECT k.encounter_key, p.patient_key,
                coalesce(e.resource->'class'->>'code', e.resource->'class'->0->'coding'->0->>'code') AS encounter_class,
                codings(e.resource->'type'->0->'coding')[1].code AS type_code,
                fhir_date(e.resource->'period'->>'start') + p.shift_days AS start_date,
                fhir_date(e.resource->'period'->>'end') + p.shift_days AS end_date,
                e.resource->>'status' AS status
            FROM {r}.encounter e JOIN deid_patient_src p ON p.patient_id = ref_id(e.resource->'subject'->>'reference')
            JOIN deid_encounter_keys k ON k.encounter_id = e.id""",
        "condition": f"""
            SELECT condition_key, patient_key, encounter_key, coding.system AS code_system, coding.code AS code,
                   onset_date, abatement_date, clinical_status, verification_status
            FROM (
                SELECT pseudonym('Condition', c.id) AS condition_key, p.patient_key,
                    k.encounter_key,
                    unnest(codings(c.resource->'code'->'coding')) AS coding,
                    coalesce(fhir_date(c.resource->>'onsetDateTime'), fhir_date(c.resource->'onsetPeriod'->>'start'),
                             fhir_date(c.resource->>'recordedDate')) + p.shift_days AS onset_date,
                    coalesce(fhir_date(c.resource->>'abatementDateTime'),
                             fhir_date(c.resource->'abatementPeriod'->>'start')) + p.shift_days AS abatement_date,
                    codings(c.resource->'clinicalStatus'->'coding')[1].code AS clinical_status,
                    codings(c.resource->'verificationStatus'->'coding')[1].code AS verification_status
                FROM {r}.condition c
                JOIN deid_patient_src p ON p.patient_id = ref_id(c.resource->'subject'->>'reference')
                LEFT JOIN deid_encounter_keys k ON k.encounter_id = ref_id(c.resource->'encounter'->>'reference')
            )""",
        "observation": f"""
            WITH obs AS (
                SELECT p.patient_key,
                    k.encounter_key,
                    o.resource AS r,
                    coalesce(fhir_date(o.resource->>'effectiveDateTime'),
                             fhir_date(o.resource->'effectivePeriod'->>'start'),
                             fhir_date(o.resource->>'issued')) + p.shift_days AS effective_date
                FROM {r}.observation o
                JOIN deid_patient_src p ON p.patient_id = ref_id(o.resource->'subject'->>'reference')
                LEFT JOIN deid_encounter_keys k ON k.encounter_id = ref_id(o.resource->'encounter'->>'reference')
            ),
            components AS (
                SELECT patient_key, encounter_key, effective_date,
                       unnest(CAST(r->'component' AS JSON[])) AS c
                FROM obs WHERE (r->'component') IS NOT NULL
            )
            SELECT patient_key, encounter_key, effective_date,
                coalesce(list_filter(codings(r->'code'->'coding'), lambda x: x.system = 'http://loinc.org')[1].code,
                         codings(r->'code'->'coding')[1].code) AS code,
                TRY_CAST(r->'valueQuantity'->>'value' AS DOUBLE) AS value_num,
                r->'valueQuantity'->>'unit' AS unit,
                codings(r->'valueCodeableConcept'->'coding')[1].code AS value_code
            FROM obs WHERE (r->'valueQuantity') IS NOT NULL OR (r->'valueCodeableConcept') IS NOT NULL
            UNION ALL
            SELECT patient_key, encounter_key, effective_date,
                coalesce(list_filter(codings(c->'code'->'coding'), lambda x: x.system = 'http://loinc.org')[1].code,
                         codings(c->'code'->'coding')[1].code),
                TRY_CAST(c->'valueQuantity'->>'value' AS DOUBLE),
                c->'valueQuantity'->>'unit',
                codings(c->'valueCodeableConcept'->'coding')[1].code
            FROM components""",
        "medication_request": f"""
            SELECT pseudonym('MedicationRequest', m.id) AS medication_request_key, p.patient_key,
                k.encounter_key,
                codings(m.resource->'medicationCodeableConcept'->'coding')[1].code AS rxnorm_code,
                m.resource->>'status' AS status, m.resource->>'intent' AS intent,
                fhir_date(m.resource->>'authoredOn') + p.shift_days AS authored_date
            FROM {r}.medication_request m
            JOIN deid_patient_src p ON p.patient_id = ref_id(m.resource->'subject'->>'reference')
            LEFT JOIN deid_encounter_keys k ON k.encounter_id = ref_id(m.resource->'encounter'->>'reference')""",
        "document_reference": f"""
            WITH docs AS (
                SELECT pseudonym('DocumentReference', d.id) AS document_key, p.patient_key, p.identifier_pattern,
                    k.encounter_key,
                    coalesce(fhir_date(d.resource->>'date'), fhir_date(d.resource->'context'->'period'->>'start'))
                        + p.shift_days AS document_date,
                    codings(d.resource->'type'->'coding')[1].code AS type_code,
                    TRY(decode(from_base64(d.resource->'content'->0->'attachment'->>'data'))) AS note
                FROM {r}.document_reference d
                JOIN deid_patient_src p ON p.patient_id = ref_id(d.resource->'subject'->>'reference')
                LEFT JOIN deid_encounter_keys k
                    ON k.encounter_id = ref_id(d.resource->'context'->'encounter'->0->>'reference')
            )
            SELECT document_key, patient_key, encounter_key, document_date, type_code,
                   {_scrub_expression('note', 'identifier_pattern')} AS note_text
            FROM docs""",
    }

    raw_counts = {
        name: con.execute(f"SELECT count(*) FROM {r}.{name}").fetchone()[0] for name in DEID_TABLES
    }
    try:
        with transaction(con):
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {out_schema}")
            for name, sql in statements.items():
                con.execute(f"CREATE OR REPLACE TABLE {out_schema}.{name} AS {sql}")
            rows, orphans, removed = _deid_counts(con, out_schema, raw_counts, restricted)
            counts = pa.table({"category": list(removed), "removed": list(removed.values())})
            con.register("removal_counts", counts)
            con.execute(f"CREATE OR REPLACE TABLE {out_schema}.removal_counts AS SELECT * FROM removal_counts")
            con.unregister("removal_counts")
    finally:
        con.execute("DROP TABLE IF EXISTS deid_patient_src")
        con.execute("DROP TABLE IF EXISTS deid_encounter_keys")
    return DeidReport(
        rows_by_table=rows,
        removed_by_category=removed,
        orphan_rows_dropped=orphans,
        reference_date=str(reference_date),
    )


def _deid_counts(con: duckdb.DuckDBPyConnection, out_schema: str, raw_counts: dict, restricted: str):
    """Rows per table, rows dropped for lack of a landed patient, and what was removed per category."""
    rows = {name: con.execute(f"SELECT count(*) FROM {out_schema}.{name}").fetchone()[0] for name in DEID_TABLES}
    orphans = {}
    for name in ("encounter", "medication_request", "document_reference"):
        orphans[name] = raw_counts[name] - rows[name]
    orphans["condition"] = raw_counts["condition"] - con.execute(
        f"SELECT count(DISTINCT condition_key) FROM {out_schema}.condition").fetchone()[0]

    removed = dict(zip(
        ["names", "identifiers", "telecom", "addresses_generalized", "photos", "narratives",
         "restricted_zip3_to_000", "ages_90_plus_grouped", "birth_dates_to_year"],
        con.execute(
            f"""SELECT sum(n_names), sum(n_identifiers), sum(n_telecom), sum(n_addresses), sum(n_photos),
                       count(*) FILTER (WHERE has_narrative),
                       count(*) FILTER (WHERE zip_digits IN ({restricted})),
                       count(*) FILTER (WHERE age_at_reference >= 90),
                       count(*) FILTER (WHERE birth_date IS NOT NULL)
                FROM deid_patient_src"""
        ).fetchone(),
    ))
    removed["dates_shifted"] = sum(
        con.execute(f"SELECT count({col}) FROM {out_schema}.{table}").fetchone()[0]
        for table, col in [("patient", "death_date"), ("encounter", "start_date"), ("condition", "onset_date"),
                           ("observation", "effective_date"), ("medication_request", "authored_date"),
                           ("document_reference", "document_date")]
    )
    note_tags = con.execute(
        f"""SELECT tag, count(*) FROM (
                SELECT unnest(regexp_extract_all(note_text, '\\[(REDACTED|NAME|URL|EMAIL|SSN|DATE|PHONE|IP|ID|ADDRESS|ZIP|AGE_90_PLUS)\\]', 1)) AS tag
                FROM {out_schema}.document_reference) GROUP BY tag"""
    ).fetchall()
    for tag, count in note_tags:
        removed[f"note_{tag.lower()}"] = count
    return rows, orphans, {k: int(v or 0) for k, v in removed.items()}


# --- leak scan -------------------------------------------------------------------------------

def _identifier_values_sql(raw_schema: str) -> str:
    """Original identifier values from the raw Patient resources, lower-cased, by category."""
    p = f"{raw_schema}.patient"
    return f"""
    SELECT DISTINCT category, lower(trim(value)) AS value FROM (
        SELECT 'name' AS category, unnest(list_concat(
            flatten(list_transform(CAST(resource->'name' AS JSON[]), lambda n: coalesce(CAST(n->'given' AS VARCHAR[]), []))),
            list_transform(CAST(resource->'name' AS JSON[]), lambda n: n->>'family'))) AS value FROM {p}
        UNION ALL SELECT 'identifier', unnest(list_transform(CAST(resource->'identifier' AS JSON[]), lambda i: i->>'value')) FROM {p}
        UNION ALL SELECT 'telecom', unnest(list_transform(CAST(resource->'telecom' AS JSON[]), lambda t: t->>'value')) FROM {p}
        UNION ALL SELECT 'address', unnest(flatten(list_transform(CAST(resource->'address' AS JSON[]),
                                                   lambda a: coalesce(CAST(a->'line' AS VARCHAR[]), [])))) FROM {p}
        UNION ALL SELECT 'birth_date', resource->>'birthDate' FROM {p}
    ) WHERE value IS NOT NULL AND length(trim(value)) >= 3
    """


def find_identifier_leaks(con: duckdb.DuckDBPyConnection, tables: list[str], raw_schema: str = "raw") -> list[dict]:
    """Scan every text column of ``tables`` for original identifier values.

    Returns one row per (table, column, category) with a hit count, never the values themselves,
    so the result is safe to log and to show as metadata. Single-word identifiers are matched
    against the texts' whitespace tokens (a hash join); identifiers containing spaces (street
    lines, some phone formats) are matched by substring.
    """
    con.execute(f"CREATE OR REPLACE TEMP TABLE leak_ids AS {_identifier_values_sql(raw_schema)}")
    findings = []
    try:
        for table in tables:
            schema, name = table.split(".")
            columns = [c for (c,) in con.execute(
                "SELECT column_name FROM duckdb_columns() WHERE schema_name = ? AND table_name = ? AND data_type = 'VARCHAR'",
                [schema, name]).fetchall()]
            for column in columns:
                rows = con.execute(
                    f"""WITH texts AS (
                            SELECT row_number() OVER () AS text_id, text
                            FROM (SELECT DISTINCT lower("{column}") AS text FROM {table} WHERE "{column}" IS NOT NULL)),
                        tokens AS (
                            SELECT DISTINCT text_id,
                                regexp_replace(unnest(string_split_regex(text, '\\s+')), '^[^\\w]+|[^\\w]+$', '', 'g') AS token
                            FROM texts),
                        ids AS (SELECT *, string_split(value, ' ')[1] AS first_token FROM leak_ids)
                        -- one-word identifiers: equal to a token
                        SELECT i.category, count(*) FROM ids i JOIN tokens t ON t.token = i.value
                        WHERE i.value NOT LIKE '% %' GROUP BY i.category
                        UNION ALL
                        -- several words: substring check, only in texts holding the first word
                        SELECT i.category, count(*) FROM ids i
                        JOIN tokens t ON t.token = i.first_token
                        JOIN texts x ON x.text_id = t.text_id AND contains(x.text, i.value)
                        WHERE i.value LIKE '% %' GROUP BY i.category"""
                ).fetchall()
                for category, hits in rows:
                    findings.append({"table": table, "column": column, "category": category, "hits": int(hits)})
    finally:
        con.execute("DROP TABLE IF EXISTS leak_ids")
    return findings
