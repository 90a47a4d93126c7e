"""HIPAA Safe Harbor de-identification of the raw FHIR tables, as set-based DuckDB SQL.

Design: the de-identified tables are a *whitelist projection* of the raw resources. Only the
fields listed here cross the boundary (codes, values, generalized geography and dates, keyed
pseudonyms); every other element (names, telecom, identifiers, photos, narrative ``text``,
extensions, display strings, references' ``display``) and every resource type not projected
here (Practitioner, RelatedPerson, Organization, Device, Claim, ...) is left behind by
construction. Free text is the one exception and is scrubbed: the patient's own names and
identifiers first (from the Patient resource, contacts included), then patterns.

- Pseudonyms: HMAC-SHA256 under a secret key, so the same id and key give the same pseudonym
  in every resource and on every run, and nobody without the key can reverse them.
- Dates: shifted by a per-patient secret offset (intervals within a patient are kept exactly),
  or generalized to 1 January of their year (``date_mode="year"``).
- Birth: year only; patients who are 90 or older at the reference date (today, or the end of
  the record if that is later) are grouped (no year).
- Geography: state and 3-digit zip; "000" for prefixes whose area has <= 20,000 people.
- Malformed shapes (an object where FHIR has an array, a number where it has a string) never
  raise: every cast is a TRY_CAST, so no database error can quote a raw value.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import re
from dataclasses import dataclass, field
from datetime import date
from typing import Literal

import duckdb
import pyarrow as pa

from clinical_ml.codes import RXNORM_SYSTEM, encounter_class_sql
from clinical_ml.db import quote_ident, scratch_catalog, sliced_scan_sql, table_exists, transaction
from clinical_ml.ingest import BOOKKEEPING_TABLES, REF_ID_MACRO

# 3-digit zip prefixes with 20,000 or fewer people (2000 Census), which Safe Harbor maps to 000.
RESTRICTED_ZIP3 = (
    "036", "059", "063", "102", "203", "556", "692", "790", "821",
    "823", "830", "831", "878", "879", "884", "890", "893",
)
DEID_TABLES = ("patient", "encounter", "condition", "observation", "medication_request", "document_reference",
               "annotation")
DateMode = Literal["shift", "year"]

# RE2 (DuckDB's regex engine) has no look-around and its \b and \w are ASCII-only, so "José"
# would have a word boundary inside it. Boundaries are therefore explicit Unicode classes.
_NOT_ALNUM = r"[^\p{L}\p{N}]"
_MONTH_NAMES = ("january|february|march|april|june|july|august|september|october|november|december|"
                "jan|feb|mar|apr|jun|jul|aug|sept|sep|oct|nov|dec")
# "may" is also a verb ("may 2 puffs"): only capitalized "May" is a month where no year follows.
_MONTH = rf"(?:{_MONTH_NAMES}|may)\b\.?"
_MONTH_NO_YEAR = rf"(?:(?i:{_MONTH_NAMES})|May)\b\.?"
_YEAR = r"(?:1[89]|20)\d{2}"
_NAME_WORD = r"\p{Lu}[\p{L}'’-]+"
# A capitalized name word or one the own-identifier pass already replaced, then more words,
# with lower-case particles ("Van der Berg", "de la Cruz").
_NAME_PART = rf"(?:{_NAME_WORD}|\[REDACTED\])"
_NAME = (rf"{_NAME_PART}(?:\s+(?:(?:van|von|der|den|de|del|della|da|di|du|la|le|bin|ibn|al|ter|ten)\s+)*"
         rf"{_NAME_PART}){{0,2}}")

# Scrubbing patterns for free text, applied in order after the patient's own identifiers.
# (RE2 syntax, replacement). Kept as data so tests and the benchmark can report per tag.
NOTE_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"(?i)\b(?:https?://|ftp://|www\.)\S+", "[URL]"),
    (r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}", "[EMAIL]"),
    (r"(?i)\b(?:ip(?: address)?\s*:?\s*)?\d{1,3}(?:\.\d{1,3}){3}\b", "[IP]"),
    (r"\b\d{3}[- ]\d{2}[- ]\d{4}\b", "[SSN]"),
    (r"\b\d{4}[-/.]\d{1,2}[-/.]\d{1,2}(?:[T ][0-9:.]+(?:Z|[+-]\d{2}:?\d{2})?)?\b", "[DATE]"),
    (r"\b\d{1,2}[/.-]\d{1,2}[/.-]\d{2,4}\b", "[DATE]"),
    (rf"(?i)\b{_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}\b", "[DATE]"),
    (rf"(?i)\b\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTH},?\s+\d{{4}}\b", "[DATE]"),
    (rf"(?i)\b{_MONTH},?\s+(?:of\s+)?{_YEAR}\b", "[DATE]"),
    (rf"\b{_MONTH_NO_YEAR}\s+\d{{1,2}}(?:st|nd|rd|th)?\b", "[DATE]"),
    (r"(?i)\bfax\s*[:#.]?\s*(?:\+?1[\s.-]?)?\(?\d{3}\)?[\s.-]?\d{3}[\s.-]?\d{4}\b", "[FAX]"),
    (r"(?:\+?1[\s.-]?)?(?:\(\d{3}\)\s?|\b\d{3}[\s.-])\d{3}[\s.-]\d{4}\b", "[PHONE]"),
    (r"\b(?:(?i:mrn|medical record(?: number| no\.?)?|acct|account(?: number)?|member(?: id)?|subscriber(?: id)?|"
     r"policy|group number|plan id|beneficiary(?: id)?|licen[cs]e|driver'?s licen[cs]e|passport|vin|plate|"
     r"serial(?: number)?|device(?: id)?|implant id|biometric(?: id)?|fingerprint(?: id)?|retina(?:l)?(?: scan)?"
     r"(?: id)?|voice ?print(?: id)?|study id|subject id|social security(?: number)?|ssn)|DL|SN|S/N|ID|UDI|NPI)\b"
     r"\s*(?i:number|no\.?|#|id)?\s*[:#]?\s*\(?[A-Za-z0-9][A-Za-z0-9-]*\d[A-Za-z0-9-]*",
     "[ID]"),
    (r"\b[A-HJ-NPR-Z0-9]{17}\b", "[ID]"),  # a VIN is 17 characters without I, O, Q
    (r"\b[A-Z]{0,4}-?\d{6,}\b", "[ID]"),
    (r"(?i)\b\d{1,6}\s+(?:[NSEW]\.?\s+|north\s+|south\s+|east\s+|west\s+)?(?:\p{Lu}[\p{L}'’]+\s+){1,3}"
     r"(?:St|Street|Ave|Avenue|Rd|Road|Blvd|Boulevard|Ln|Lane|Dr|Drive|Ct|Court|Way|Pl|Place|Ter|Terrace|"
     r"Cir|Circle|Pkwy|Parkway|Hwy|Highway|Sq|Square)\b\.?(?:,?\s+(?:Apt|Apartment|Unit|Suite|Ste|#)\.?\s*[A-Z0-9-]+)?",
     "[ADDRESS]"),
    (r"(?i)\b(?:P\.?O\.?\s+Box|Apt|Apartment|Unit|Suite)\.?\s*#?\s*\d+[A-Z]?\b", "[ADDRESS]"),
    (rf"\b(?i:lives|living|resides|residing|resident|moved|relocated)\s+(?i:in|at|to|of)\s+{_NAME}"
     rf"(?:,\s+\p{{Lu}}\p{{Lu}}\b|,\s+{_NAME})?", "[LOCATION]"),
    (r"\b\d{5}(?:-\d{4})?\b", "[ZIP]"),
    (rf"\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Doctor)\.?\s+{_NAME}", "[NAME]"),
    (rf"\b((?i:wife|husband|son|daughter|mother|father|brother|sister|partner|spouse|fiancée?|friend|"
     rf"neighbou?r|caregiver|guardian|aunt|uncle|cousin|niece|nephew|grandmother|grandfather|grandson|"
     rf"granddaughter)),?\s+(?:is\s+|named\s+)?{_NAME}", r"\1 [NAME]"),
    (r"\b\p{Lu}\p{Ll}+\d+\b", "[NAME]"),  # Synthea-style names with digits ("Medhurst46")
    # Safe Harbor: ages over 89 are aggregated ("93 year-old" -> "[AGE_90_PLUS] year-old").
    (r"(?i)\b(?:9\d|1[0-4]\d)([- ](?:years?|yrs?|yo)(?:[- ]old)?|\s*y\.?\s?o\.?|\s*yo\b)", r"[AGE_90_PLUS]\1"),
    (r"(?i)\b(age[ds]?|aged)(\s*:?\s*)(?:9\d|1[0-4]\d)\b", r"\1\2[AGE_90_PLUS]"),
)
NOTE_TAGS = ("REDACTED", "NAME", "URL", "EMAIL", "SSN", "DATE", "FAX", "PHONE", "IP", "ID", "ADDRESS", "LOCATION",
             "ZIP", "AGE_90_PLUS")

# Patient.identifier type codes (v2-0203) by Safe Harbor category; anything else is "other".
IDENTIFIER_TYPE_CATEGORY = {
    "SS": "ssn", "SB": "ssn",
    "MR": "medical_record_number", "MRT": "medical_record_number",
    "MB": "health_plan_number", "MC": "health_plan_number", "MA": "health_plan_number", "SN": "health_plan_number",
    "AN": "account_number", "BA": "account_number",
    "DL": "license_number", "LN": "license_number", "MD": "license_number", "NPI": "license_number",
}
SAFE_HARBOR_CATEGORIES = (
    "names", "geographic_subdivisions", "dates", "telephone_numbers", "fax_numbers", "email_addresses", "ssn",
    "medical_record_number", "health_plan_number", "account_number", "license_number", "vehicle_identifiers",
    "device_identifiers", "urls", "ip_addresses", "biometric_identifiers", "photos", "other_identifiers",
)


class MissingSecretKey(RuntimeError):
    """Raised when no de-identification key is configured (never includes key material)."""


class DeidentificationError(RuntimeError):
    """A de-identification step failed. The message never carries data values."""


@dataclass
class DeidReport:
    rows_by_table: dict[str, int]
    removed_by_category: dict[str, int]
    orphan_rows_dropped: dict[str, int]
    reference_date: str
    resource_types_left_behind: list[str]
    # MedicationRequests by how their drug was named (inline, contained, reference), and how
    # many name a Medication that could not be found or has no code (not fatal, but counted).
    medications_by_source: dict[str, int] = field(default_factory=dict)
    medication_references_unresolved: int = 0


def pseudonym(key: bytes, kind: str, resource_id: str) -> str:
    """Keyed pseudonym for ``kind/resource_id`` (the same function the SQL uses)."""
    return _KeyedSha256(key).pseudonym(kind, resource_id)


class _KeyedSha256:
    """HMAC-SHA256 under one key for many short messages: the key's padded inner and outer
    states are hashed once and copied per message (what ``hmac.new`` redoes at every call:
    2.4 -> 1.0 us a pseudonym, and the UDF makes one per encounter, condition, document...)."""

    def __init__(self, key: bytes):
        block = hashlib.sha256().block_size
        key = (hashlib.sha256(key).digest() if len(key) > block else key).ljust(block, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))

    def pseudonym(self, kind: str, resource_id: str) -> str:
        return self.pseudonyms([kind], [resource_id])[0]

    def pseudonyms(self, kinds: list, resource_ids: list) -> list:
        """``pseudonym`` of each (kind, id) pair, None for a None id; each kind's prefix is hashed
        once (the SQL UDF calls this for a whole vector)."""
        prefixed: dict[str, object] = {}
        outer, out = self._outer, []
        for kind, resource_id in zip(kinds, resource_ids):
            if resource_id is None:
                out.append(None)
                continue
            if (base := prefixed.get(kind)) is None:
                base = prefixed[kind] = self._inner.copy()
                base.update(f"{kind}/".encode())
            inner, final = base.copy(), outer.copy()
            inner.update(resource_id.encode())
            final.update(inner.digest())
            out.append(final.hexdigest()[:24])
        return out


def date_shift_days(key: bytes, patient_id: str, max_days: int) -> int:
    """Per-patient secret offset in [-max_days, +max_days], never 0 so every date moves."""
    digest = hmac.new(key, f"date-shift/{patient_id}".encode(), hashlib.sha256).digest()
    span = 2 * max_days
    offset = int.from_bytes(digest[:8], "big") % span - max_days
    return offset if offset < 0 else offset + 1


def safe_error_message(error: BaseException) -> str:
    """A database error's first line with every quoted literal removed: DuckDB quotes the
    offending input ("Could not convert string 'Smith' to ..."), which may be PHI."""
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, (duckdb.BinderException, duckdb.ParserException, duckdb.CatalogException)):
        return first[:300]  # about the SQL text, not the data: keep it for whoever has to fix it
    first = re.sub(r"'[^']*'|\"[^\"]*\"", "<value>", first)
    return re.sub(r"(?i)(input|value|string)\s*:.*", r"\1: <value>", first)[:300]


_udf_counter = itertools.count()


def register_functions(con: duckdb.DuckDBPyConnection, key: bytes, max_shift_days: int,
                       date_mode: DateMode = "shift") -> None:
    """Register the keyed functions as vectorized UDFs and the shape-tolerant JSON macros. The
    key lives only in these closures: it never appears in SQL text, so it cannot reach a query
    log or an error message."""
    if date_mode not in ("shift", "year"):
        raise ValueError(f"date_mode must be 'shift' or 'year', not {date_mode!r}")

    keyed = _KeyedSha256(key)

    def _pseudonym(kinds: pa.Array, ids: pa.Array) -> pa.Array:
        return pa.array(keyed.pseudonyms(kinds.to_pylist(), ids.to_pylist()), pa.string())

    def _shift(ids: pa.Array) -> pa.Array:
        return pa.array(
            [None if i is None else date_shift_days(key, i, max_shift_days) for i in ids.to_pylist()], pa.int32()
        )

    # Fresh UDF names behind stable macros: DuckDB cannot always drop a UDF that a connection
    # has used, and a second run on the same connection (another key) must not see the old one.
    suffix = next(_udf_counter)
    con.create_function(f"__pseudonym_{suffix}", _pseudonym, ["VARCHAR", "VARCHAR"], "VARCHAR", type="arrow",
                        side_effects=False)
    con.create_function(f"__date_shift_days_{suffix}", _shift, ["VARCHAR"], "INTEGER", type="arrow", side_effects=False)
    con.execute(f"CREATE OR REPLACE TEMP MACRO pseudonym(kind, id) AS __pseudonym_{suffix}(kind, id)")
    con.execute(f"CREATE OR REPLACE TEMP MACRO date_shift_days(id) AS __date_shift_days_{suffix}(id)")
    register_macros(con, date_mode)


def register_macros(con: duckdb.DuckDBPyConnection, date_mode: DateMode = "shift") -> None:
    """The shape-tolerant JSON helpers (no key needed: the leak scan uses these alone)."""
    macros = [
        REF_ID_MACRO,
        "fhir_date(s) AS TRY_CAST(substr(s, 1, 10) AS DATE)",
        # A FHIR array as JSON[]: [] when absent; a lone object or scalar where FHIR has an array
        # becomes a one-element list, so malformed shapes neither raise nor hide identifiers.
        """json_list(j) AS CASE WHEN j IS NULL OR json_type(j) = 'NULL' THEN []
                                WHEN json_type(j) = 'ARRAY' THEN coalesce(TRY_CAST(j AS JSON[]), [])
                                ELSE [j] END""",
        "str_list(j) AS list_filter(list_transform(json_list(j), lambda x: x->>'$'), lambda x: x IS NOT NULL)",
        f"""codings(j) AS coalesce(TRY(from_json(j, '{json.dumps([_CODING])}')), [])""",
        # The RxNorm coding when there is one, else the first: {system, code}, NULL when none.
        f"""best_coding(j) AS coalesce(list_filter(codings(j), lambda c: c.system = '{RXNORM_SYSTEM}')[1],
                                        codings(j)[1])""",
        f"""deid_date(d, shift) AS {"d + shift" if date_mode == "shift" else "make_date(year(d), 1, 1)"}""",
        # Identifier variants worth matching: the value, and its letters and digits only
        # ("123-45-6789" also as "123456789") when that is long enough to be specific.
        """id_variants(v) AS CASE WHEN length(regexp_replace(v, '[^0-9A-Za-z]', '', 'g')) >= 6
                                  THEN [v, regexp_replace(v, '[^0-9A-Za-z]', '', 'g')] ELSE [v] END""",
        # Name strings and their parts (split on spaces and hyphens: "Müller-Łukasz" -> both halves).
        r"""name_parts(names) AS list_distinct(list_concat(names,
                flatten(list_transform(names, lambda n: string_split_regex(n, '[\s\-]+')))))""",
        # Given and family names (and the name's text). Prefixes and suffixes ("Mr.", "Dr.",
        # "Jr.", "MD") are honorifics and degrees shared by thousands: not identifiers.
        """human_names(j) AS flatten(list_transform(json_list(j), lambda n: list_concat(
                str_list(n->'given'), list_filter([n->>'family', n->>'text'], lambda x: x IS NOT NULL))))""",
        # Whole names as written in text: "Given Family", "Given Middle Family", "Family, Given".
        """full_names(j) AS flatten(list_transform(
                list_filter(json_list(j), lambda n: (n->>'family') IS NOT NULL AND len(str_list(n->'given')) > 0),
                lambda n: [str_list(n->'given')[1] || ' ' || (n->>'family'),
                           array_to_string(str_list(n->'given'), ' ') || ' ' || (n->>'family'),
                           (n->>'family') || ', ' || str_list(n->'given')[1]]))""",
        # ... and the name's text when it has more than one word (a contact is often text only)
        r"""full_name_texts(j) AS list_filter(list_transform(json_list(j), lambda n: n->>'text'),
                lambda t: t IS NOT NULL AND len(regexp_extract_all(t, '[\p{L}\p{N}]+')) >= 2)""",
        """address_parts(j) AS flatten(list_transform(json_list(j), lambda a: list_concat(str_list(a->'line'),
                list_filter([a->>'city', a->>'district', a->>'postalCode', a->>'text'], lambda x: x IS NOT NULL))))""",
        """telecom_values(j) AS list_filter(list_transform(json_list(j), lambda t: t->>'value'), lambda x: x IS NOT NULL)""",
        """identifier_values(j) AS list_filter(list_transform(json_list(j), lambda i: i->>'value'), lambda x: x IS NOT NULL)""",
        # A birth date as written in notes: ISO, 3/4/1950, 03/04/1950, March 4, 1950.
        """date_variants(s) AS CASE WHEN fhir_date(s) IS NULL THEN list_filter([s], lambda x: x IS NOT NULL) ELSE
                [s, strftime(fhir_date(s), '%-m/%-d/%Y'), strftime(fhir_date(s), '%m/%d/%Y'),
                 strftime(fhir_date(s), '%B %-d, %Y')] END""",
    ]
    for macro in macros:
        con.execute(f"CREATE OR REPLACE TEMP MACRO {macro}")


# The top-level Patient fields that de-identification and the leak check read, taken with one
# parse of the resource: `->` parses the whole resource at each use, and the JSON macros use their
# argument several times (deid_patient_src at 10k patients: 1.1 s before, 0.55 s with one parse).
PATIENT_FIELDS = ("name", "telecom", "address", "contact", "identifier", "birthDate", "extension", "photo", "text",
                  "gender", "deceasedDateTime", "deceasedBoolean")


def patient_fields_sql(resource: str) -> str:
    """SQL for the list of a Patient resource's PATIENT_FIELDS (JSON, NULL when absent)."""
    paths = ", ".join(f"'$.{name}'" for name in PATIENT_FIELDS)
    return f"json_extract({resource}, [{paths}])"


def patient_field(fields: str, name: str) -> str:
    """SQL for one field of a ``patient_fields_sql`` list."""
    return f"{fields}[{PATIENT_FIELDS.index(name) + 1}]"


def _patient_identifier_values_sql(fields: str) -> str:
    """Every identifying value of a Patient resource (and its contacts), by category, as a
    STRUCT of lists: the input of both the note scrubber and the leak check. ``fields`` is the
    resource's ``patient_fields_sql`` list."""
    def f(name: str) -> str:
        return patient_field(fields, name)
    contacts = f"json_list({f('contact')})"
    return f"""{{
        'name': name_parts(list_concat(human_names({f('name')}),
                                       flatten(list_transform({contacts}, lambda c: human_names(c->'name'))))),
        'identifier': flatten(list_transform(identifier_values({f('identifier')}), lambda v: id_variants(v))),
        'telecom': flatten(list_transform(list_concat(telecom_values({f('telecom')}),
                    flatten(list_transform({contacts}, lambda c: telecom_values(c->'telecom')))), lambda v: id_variants(v))),
        'address': list_concat(address_parts({f('address')}),
                               flatten(list_transform({contacts}, lambda c: address_parts(c->'address')))),
        'birth_date': date_variants({f('birthDate')}->>'$')
    }}"""


# json_transform shapes (DuckDB parses a resource once into these typed fields; a field of
# another shape becomes NULL, never an error). A measurement is an Observation's value or one of
# its components; `component` stays JSON so that a lone object is still read as a list.
_CODING = {"system": "VARCHAR", "code": "VARCHAR"}
_CODINGS_SHAPE = {"coding": [_CODING]}
_MEASUREMENT = {"code": _CODINGS_SHAPE, "valueQuantity": {"value": "VARCHAR", "unit": "VARCHAR"},
                "valueCodeableConcept": _CODINGS_SHAPE}
_MEASUREMENT_SHAPE = json.dumps(_MEASUREMENT)
_DOCUMENT_SHAPE = json.dumps({"subject": {"reference": "VARCHAR"}, "date": "VARCHAR", "type": _CODINGS_SHAPE,
                              "context": {"period": {"start": "VARCHAR"}, "encounter": "JSON"},
                              "content": [{"attachment": {"data": "VARCHAR"}}]})
_ENCOUNTER_SHAPE = json.dumps({"subject": {"reference": "VARCHAR"}, "class": "JSON", "type": [_CODINGS_SHAPE],
                               "period": {"start": "VARCHAR", "end": "VARCHAR"}, "status": "VARCHAR"})
_CONDITION_SHAPE = json.dumps({"subject": {"reference": "VARCHAR"}, "encounter": {"reference": "VARCHAR"},
                               "code": _CODINGS_SHAPE, "onsetDateTime": "VARCHAR", "onsetPeriod": {"start": "VARCHAR"},
                               "abatementDateTime": "VARCHAR", "abatementPeriod": {"start": "VARCHAR"},
                               # a CodeableConcept in R4, a plain code in STU3 and DSTU2
                               "recordedDate": "VARCHAR", "clinicalStatus": "JSON", "verificationStatus": "JSON"})
_NOTES_AND_IDENTIFIERS_SHAPE = json.dumps({"subject": {"reference": "VARCHAR"}, "note": "JSON", "identifier": "JSON"})
_OBSERVATION_SHAPE = json.dumps({"subject": {"reference": "VARCHAR"}, "encounter": {"reference": "VARCHAR"},
                                 "effectiveDateTime": "VARCHAR", "effectivePeriod": {"start": "VARCHAR"},
                                 "issued": "VARCHAR", **_MEASUREMENT, "component": "JSON"})


_PRE_PATTERNS = 2  # URL and e-mail go first, whole, before the patient's own identifiers cut into them
_RUN = r"[\p{L}\p{N}]+"  # a run of Unicode letters and digits


def _apply_patterns(expr: str, patterns) -> str:
    # One pass per pattern, in order. Merging patterns of the same tag into one alternation was
    # tried and is unsafe: an earlier, shorter match of a later pattern ("Apt 12") consumes the
    # text a longer one needs ("12 Main Street"), and the street name leaks.
    for pattern, tag in patterns:
        expr = f"regexp_replace({expr}, '{pattern.replace(chr(39), chr(39) * 2)}', '{tag}', 'g')"
    return expr


# Notes are scrubbed in buckets of their owners (by hash), so the token tables of one statement
# stay bounded whatever the population: about this many notes a bucket.
NOTES_PER_SCRUB_BUCKET = 50_000


def owner_bucket_sql(expr: str) -> str:
    """SQL for the hash bucket of ``expr`` among ``$buckets`` (compare it with ``$bucket::UBIGINT``).
    The casts matter: a Python int binds as INTEGER, which makes the modulo HUGEINT arithmetic,
    about 80x slower (4 s instead of 0.05 s over 10M rows)."""
    return f"(hash({expr}) % $buckets::UBIGINT)"


def scrub_notes(con: duckdb.DuckDBPyConnection, notes_sql: str, identifiers_sql: str, out_table: str) -> int:
    """Scrub free text, set-based: ``notes_sql`` yields (note_id, owner, note), ``identifiers_sql``
    yields (owner, value), the note owner's own identifying values. Writes TEMP ``out_table``
    (note_id, owner, bucket, note_text) in bucket order and returns the number of buckets
    (``hash(owner) % buckets``: joins with the notes can go bucket by bucket too).

    The owner's identifiers are removed first, by a join rather than a per-note regex (which
    DuckDB would compile once per row): notes and identifiers are both cut into runs of Unicode
    letters and digits, and any sequence of consecutive runs equal (case-insensitively) to an
    identifier's runs is replaced by one [REDACTED], separators included. So "Müller-Łukasz",
    "12 Elm St", "555-010-4477" and "1961/03/14" are found whatever punctuation or case the note
    uses, and "Smith" never matches inside "Smithfield". Then the NOTE_PATTERNS run.

    Notes are cut into maximal runs and maximal separators, which alternate: the run after the
    run at piece ``pos`` is at ``pos + 2``, so matching needs no numbering window. Only notes
    with a match are rebuilt from their pieces. Owners are processed in hash buckets of about
    NOTES_PER_SCRUB_BUCKET notes, each bucket one bounded set of statements.
    """
    notes = con.execute(f"SELECT count(*) FROM ({notes_sql}) WHERE note IS NOT NULL").fetchone()[0]
    buckets = max(1, -(-notes // NOTES_PER_SCRUB_BUCKET))
    # the working tables live in a scratch catalog with small row groups: a bucket is smaller than
    # one default row group, which DuckDB would leave to a single thread (and so it did)
    with scratch_catalog(con, "scrub_work") as catalog:
        work = f"{catalog}.main"
        # the bucket is computed once and the rows stored in its order, so that each bucket's
        # statements read only their own row groups
        con.execute(f"""CREATE TABLE {work}.notes AS
            SELECT note_id, owner, note, {owner_bucket_sql('owner')} AS bucket FROM ({notes_sql}) WHERE note IS NOT NULL
            ORDER BY bucket""", {"buckets": buckets})
        con.execute(f"""CREATE TABLE {work}.identifiers AS
            SELECT owner, row_number() OVER () AS ident_id, runs, len(runs) AS n_runs, {owner_bucket_sql('owner')} AS bucket
            FROM (SELECT DISTINCT owner, regexp_extract_all(lower(trim(value)), '{_RUN}') AS runs
                  FROM ({identifiers_sql}) WHERE value IS NOT NULL AND length(trim(value)) >= 2)
            WHERE len(runs) > 0 ORDER BY bucket""", {"buckets": buckets})
        types = dict(con.execute("SELECT column_name, data_type FROM duckdb_columns() "
                                 "WHERE database_name = ? AND table_name = 'notes'", [catalog]).fetchall())
        con.execute(f"CREATE OR REPLACE TEMP TABLE {out_table} (note_id {types['note_id']}, owner {types['owner']}, "
                    "bucket UBIGINT, note_text VARCHAR)")
        try:
            for bucket in range(buckets):
                _scrub_bucket(con, work, bucket, out_table)
        finally:
            for table in ("scrub_runs", "scrub_matches"):
                con.execute(f"DROP TABLE IF EXISTS {table}")
    return buckets


def _scrub_bucket(con: duckdb.DuckDBPyConnection, work: str, bucket: int, out_table: str) -> None:
    """One bucket of scrub_notes; ``work`` is its scratch schema."""
    params = {"bucket": bucket}
    con.execute(f"""CREATE OR REPLACE TABLE {work}.bucket_notes AS
        SELECT note_id, owner, {_apply_patterns('note', NOTE_PATTERNS[:_PRE_PATTERNS])} AS note
        FROM {work}.notes WHERE bucket = $bucket::UBIGINT""", params)
    con.execute(f"CREATE OR REPLACE TABLE {work}.bucket_identifiers AS SELECT owner, ident_id, runs, n_runs "
                f"FROM {work}.identifiers WHERE bucket = $bucket::UBIGINT", params)
    # The runs of notes whose owner has identifiers, with their piece positions. Pieces alternate
    # run / separator, so the j-th run is piece 2j - 1, or 2j when the note starts with a separator:
    # only the runs are cut out and unnested, not the separators.
    # (runs and matches are TEMP tables: the runs have many rows, so default row groups already
    # spread them over the threads, and writing them to the scratch file cost more than it gained)
    # Only runs that are a run of one of the owner's own identifiers are kept: no other run can
    # be part of a match, and they are most of a note's words.
    con.execute(f"""CREATE OR REPLACE TEMP TABLE scrub_runs AS
        SELECT n.note_id, n.owner, n.pos, n.run FROM (
            SELECT note_id, owner, 2 * j - 1 + sep_first AS pos, lower(run) AS run FROM (
                SELECT note_id, owner, sep_first, unnest(runs) AS run, generate_subscripts(runs, 1) AS j
                FROM (SELECT note_id, owner, regexp_extract_all(note, '{_RUN}') AS runs,
                             CASE WHEN regexp_matches(note, '^{_RUN}') THEN 0 ELSE 1 END AS sep_first
                      FROM {work}.bucket_notes WHERE owner IN (SELECT owner FROM {work}.bucket_identifiers)))) n
        JOIN (SELECT DISTINCT owner, unnest(runs) AS run FROM {work}.bucket_identifiers) i
          ON i.owner = n.owner AND i.run = n.run""")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE scrub_matches AS
        WITH ident_runs AS (
            SELECT owner, ident_id, n_runs, unnest(runs) AS run, generate_subscripts(runs, 1) AS k
            FROM {work}.bucket_identifiers),
        starts AS (
            SELECT r.note_id, r.pos AS first_pos, i.ident_id, i.n_runs
            FROM scrub_runs r JOIN ident_runs i ON i.owner = r.owner AND i.run = r.run AND i.k = 1)
        SELECT s.note_id, s.first_pos, s.first_pos + 2 * (s.n_runs - 1) AS last_pos
        FROM starts s
        JOIN ident_runs i ON i.ident_id = s.ident_id
        JOIN scrub_runs r ON r.note_id = s.note_id AND r.pos = s.first_pos + 2 * (i.k - 1) AND r.run = i.run
        GROUP BY s.note_id, s.first_pos, s.ident_id, s.n_runs HAVING count(*) = s.n_runs""")
    # A matched note is rebuilt from its list of pieces in one row (no unnest, no ordered
    # aggregate: memory stays per note): a redacted piece becomes [REDACTED], or nothing when the
    # piece before it was redacted too (a run of redacted pieces is one tag).
    con.execute(f"""INSERT INTO {out_table}
        WITH redacted AS (
            SELECT note_id, list_distinct(flatten(list(range(first_pos, last_pos + 1)))) AS red
            FROM scrub_matches GROUP BY note_id),
        rebuilt AS (
            SELECT s.note_id, array_to_string(list_transform(
                       regexp_extract_all(s.note, '{_RUN}|[^\p{{L}}\p{{N}}]+'),
                       lambda piece, i: CASE WHEN NOT list_contains(x.red, i) THEN piece
                                             WHEN list_contains(x.red, i - 1) THEN '' ELSE '[REDACTED]' END), '') AS note
            FROM {work}.bucket_notes s JOIN redacted x USING (note_id))
        SELECT s.note_id, s.owner, $bucket::UBIGINT,
               {_apply_patterns('coalesce(b.note, s.note)', NOTE_PATTERNS[_PRE_PATTERNS:])} AS note_text
        FROM {work}.bucket_notes s LEFT JOIN rebuilt b USING (note_id)""", {"bucket": bucket})


def scrub_notes_sql(con: duckdb.DuckDBPyConnection, texts: list[str], own_identifiers: list[list[str]] | None = None) -> list[str]:
    """Scrub free texts with the same SQL the pipeline uses (for tests and the benchmark).
    ``own_identifiers`` are each note's patient's names, identifiers, phones, address parts…"""
    own_identifiers = own_identifiers or [[] for _ in texts]
    table = pa.table({"n": list(range(len(texts))), "note": texts,
                      "tokens": pa.array(own_identifiers, pa.list_(pa.string()))})
    con.register("scrub_input", table)
    try:
        scrub_notes(con, "SELECT n AS note_id, n AS owner, note FROM scrub_input",
                    "SELECT n AS owner, unnest(tokens) AS value FROM scrub_input", "scrub_output")
        scrubbed = dict(con.execute("SELECT note_id, note_text FROM scrub_output").fetchall())
    finally:
        con.unregister("scrub_input")
        con.execute("DROP TABLE IF EXISTS scrub_output")
    return [scrubbed.get(n) for n in range(len(texts))]


def count_real_patients(con: duckdb.DuckDBPyConnection, raw_schema: str = "raw") -> int:
    """Patients not made by the built-in generator (which tags each one): the published demo
    key must never de-identify those, as anyone could reverse its pseudonyms."""
    from clinical_ml.synthetic import SYNTHETIC_TAG

    return con.execute(
        f"""SELECT count(*) FROM {raw_schema}.patient WHERE NOT list_contains(
                list_transform(json_list(resource->'meta'->'tag'), lambda t: (t->>'system') || '|' || (t->>'code')), ?)""",
        [f"{SYNTHETIC_TAG['system']}|{SYNTHETIC_TAG['code']}"]).fetchone()[0]


def age_reference_date(con: duckdb.DuckDBPyConnection, raw_schema: str = "raw") -> date:
    """Today, or the last encounter if the record runs later: a birth year that shows an age
    over 89 *today* is itself an identifier, whenever the record ends."""
    return con.execute(
        f"""SELECT greatest(current_date, coalesce(max(fhir_date(resource->'period'->>'start')), current_date))
            FROM {raw_schema}.encounter"""
    ).fetchone()[0]


def deidentify(
    con: duckdb.DuckDBPyConnection,
    key: bytes,
    raw_schema: str = "raw",
    out_schema: str = "deid",
    lookup_schema: str | None = None,
    max_shift_days: int = 365,
    date_mode: DateMode = "shift",
    reference_date: date | None = None,
    synthetic_only: bool = False,
) -> DeidReport:
    """Build ``out_schema`` tables from the raw tables in one transaction.

    ``reference_date`` is the date at which ages over 89 are grouped (default: today or the end
    of the record, whichever is later); pin it to make a re-run on another day identical.
    ``synthetic_only`` refuses to run if any patient is not from the built-in generator (set it
    when the key is the published demo key). ``lookup_schema`` (default ``raw_schema``) holds the
    tables that references point into, read whole (encounter ids, Medication resources) when
    ``raw_schema`` holds only some of the batch's patients."""
    if not key:
        raise MissingSecretKey("de-identification key is empty")
    register_functions(con, key, max_shift_days, date_mode)
    r = raw_schema
    if synthetic_only and (real := count_real_patients(con, r)):
        raise MissingSecretKey(
            f"The published demo key only de-identifies the built-in synthetic data, but {real} landed patients "
            "did not come from the generator. Set DEID_SECRET_KEY to a long random secret.")
    reference_date = reference_date or age_reference_date(con, r)
    try:
        return _deidentify(con, r, out_schema, reference_date, date_mode, lookup_schema or r)
    except duckdb.Error as error:
        # DuckDB quotes offending values in its messages; they may be PHI. Keep only the shape.
        raise DeidentificationError(f"de-identification failed: {safe_error_message(error)}") from None
    finally:
        for table in ("deid_patient_src", "deid_encounter_keys", "deid_document_src", "deid_annotation_src",
                      "deid_notes_and_identifiers",
                      "deid_notes_scrubbed", "deid_document_fields",
                      "deid_medication_codes"):
            con.execute(f"DROP TABLE IF EXISTS {table}")


def _deidentify(con: duckdb.DuckDBPyConnection, r: str, out_schema: str, reference_date: date,
                date_mode: DateMode = "shift", lookup: str = "raw") -> DeidReport:
    # Patient-level working table: a TEMP table (PHI is written to no persistent table outside `raw`;
    # only the note scrubber's scratch file, removed when it is done, holds note texts besides).
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE deid_patient_src AS
        WITH fields AS (SELECT id, {patient_fields_sql('resource')} AS pf FROM {sliced_scan_sql(con, f'{r}.patient')}),
        base AS (
            SELECT id AS patient_id, pf,
                   fhir_date({patient_field('pf', 'birthDate')}->>'$') AS birth_date,
                   fhir_date({patient_field('pf', 'deceasedDateTime')}->>'$') AS death_date,
                   json_list({patient_field('pf', 'extension')}) AS ext,
                   json_list({patient_field('pf', 'address')}) AS addr,
                   json_list({patient_field('pf', 'contact')}) AS contacts
            FROM fields
        )
        SELECT patient_id,
            pseudonym('Patient', patient_id) AS patient_key,
            date_shift_days(patient_id) AS shift_days,
            {patient_field('pf', 'gender')}->>'$' AS gender,
            birth_date, death_date,
            coalesce(TRY_CAST({patient_field('pf', 'deceasedBoolean')}->>'$' AS BOOLEAN), false) OR death_date IS NOT NULL
                AS deceased,
            -- Age at the reference date, also for the deceased: a birth year that would
            -- indicate an age over 89 today is itself an identifier under Safe Harbor.
            date_diff('year', birth_date, DATE '{reference_date}')
                - CASE WHEN strftime(birth_date, '%m%d') > strftime(DATE '{reference_date}', '%m%d') THEN 1 ELSE 0 END
                AS age_at_reference,
            list_filter(ext, lambda e: e->>'url' LIKE '%us-core-race')[1]->'extension'->0->'valueCoding'->>'display' AS race,
            list_filter(ext, lambda e: e->>'url' LIKE '%us-core-ethnicity')[1]->'extension'->0->'valueCoding'->>'display'
                AS ethnicity,
            addr[1]->>'state' AS state,
            left(regexp_replace(coalesce(addr[1]->>'postalCode', ''), '[^0-9]', '', 'g'), 3) AS zip_digits,
            {_patient_identifier_values_sql('pf')} AS ids,
            -- what is left behind, by Safe Harbor category (for the removal counts)
            len(json_list({patient_field('pf', 'name')})) + len(list_filter(contacts, lambda c: (c->'name') IS NOT NULL)) AS n_names,
            len(addr) + len(list_filter(contacts, lambda c: (c->'address') IS NOT NULL)) AS n_addresses,
            list_transform(list_concat(json_list({patient_field('pf', 'telecom')}), flatten(list_transform(contacts, lambda c: json_list(c->'telecom')))),
                           lambda t: coalesce(t->>'system', 'phone')) AS telecom_systems,
            list_transform(json_list({patient_field('pf', 'identifier')}),
                           lambda i: coalesce(codings(i->'type'->'coding')[1].code, '')) AS identifier_types,
            len(json_list({patient_field('pf', 'photo')})) AS n_photos,
            {patient_field('pf', 'text')} IS NOT NULL AS has_narrative
        FROM base
        """
    )
    # Encounter pseudonyms once per encounter (not once per referencing row), of every encounter
    # a resource may point to (another patient's too: the lookup schema).
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE deid_encounter_keys AS
            SELECT id AS encounter_id, pseudonym('Encounter', id) AS encounter_key FROM {lookup}.encounter"""
    )
    # Documents, each parsed once (it carries its whole text): the fields of deid.document_reference
    # and the note to scrub. `context.encounter` is a list in R4, one Reference in STU3.
    con.execute(f"""CREATE OR REPLACE TEMP TABLE deid_document_src AS
        SELECT 'DocumentReference/' || d.id AS note_id, p.patient_id AS owner,
            pseudonym('DocumentReference', d.id) AS document_key, p.patient_key, k.encounter_key,
            deid_date(coalesce(fhir_date(d.doc.date), fhir_date(d.doc.context.period.start)), p.shift_days) AS document_date,
            d.doc.type.coding[1].code AS type_code,
            TRY(decode(from_base64(d.doc.content[1].attachment.data))) AS note
        FROM (SELECT id, json_transform(resource, '{_DOCUMENT_SHAPE}') AS doc FROM {r}.document_reference) d
        LEFT JOIN deid_encounter_keys k ON k.encounter_id = ref_id(
            CASE json_type(d.doc.context.encounter) WHEN 'ARRAY' THEN d.doc.context.encounter->0->>'reference'
                                                    ELSE d.doc.context.encounter->>'reference' END)
        JOIN deid_patient_src p ON p.patient_id = ref_id(d.doc.subject.reference)""")
    # Condition and Observation `note` (Annotation.text) and `identifier` counts (for the removal
    # counts): few, and only resources whose text may have such a member are parsed.
    side = " UNION ALL ".join(
        f"""SELECT '{rtype}' AS t, id, ref_id(x.subject.reference) AS owner, json_list(x.note) AS notes,
                   len(json_list(x.identifier)) AS n_identifiers
            FROM (SELECT id, json_transform(resource, '{_NOTES_AND_IDENTIFIERS_SHAPE}') AS x FROM {r}.{table}
                  WHERE {_may_have_keys('resource', 'note', 'identifier')})"""
        for rtype, table in (("Condition", "condition"), ("Observation", "observation")))
    con.execute(f"""CREATE OR REPLACE TEMP TABLE deid_notes_and_identifiers AS
        SELECT * FROM ({side}) WHERE len(notes) > 0 OR n_identifiers > 0""")
    con.execute("""CREATE OR REPLACE TEMP TABLE deid_annotation_src AS
        SELECT t || '/' || id || '/' || k AS note_id, owner, note FROM (
            SELECT t, id, owner, unnest(notes)->>'text' AS note, generate_subscripts(notes, 1) AS k
            FROM deid_notes_and_identifiers WHERE len(notes) > 0)""")
    # All notes scrubbed together.
    note_buckets = scrub_notes(con, "SELECT note_id, owner, note FROM deid_document_src UNION ALL "
                               "SELECT note_id, owner, note FROM deid_annotation_src",
                "SELECT patient_id AS owner, unnest(flatten([ids.name, ids.identifier, ids.telecom, ids.address, "
                "ids.birth_date])) AS value FROM deid_patient_src", "deid_notes_scrubbed")

    # Codes of the landed Medication resources (empty when the export has none).
    medication_source = (f"SELECT id AS medication_id, best_coding(resource->'code'->'coding') AS coding "
                         f"FROM {lookup}.medication" if table_exists(con, lookup, "medication") else
                         "SELECT NULL::VARCHAR AS medication_id, NULL::STRUCT(system VARCHAR, code VARCHAR) AS coding LIMIT 0")
    con.execute(f"CREATE OR REPLACE TEMP TABLE deid_medication_codes AS {medication_source}")
    restricted = ", ".join(f"'{z}'" for z in RESTRICTED_ZIP3)
    statements = {
        "patient": f"""
            SELECT patient_key, gender,
                CASE WHEN age_at_reference >= 90 THEN NULL ELSE year(birth_date) END AS birth_year,
                age_at_reference >= 90 AS age_90_or_older,
                deceased,
                deid_date(death_date, shift_days) AS death_date,
                race, ethnicity, state,
                CASE WHEN length(zip_digits) < 3 THEN NULL
                     WHEN zip_digits IN ({restricted}) THEN '000' ELSE zip_digits END AS zip3
            FROM deid_patient_src""",
        "encounter": f"""
            SELECT k.encounter_key, p.patient_key,
                {encounter_class_sql("e.class_code")} AS encounter_class,
                e.class_code AS encounter_class_source,
                e.enc.type[1].coding[1].code AS type_code,
                deid_date(fhir_date(e.enc.period.start), p.shift_days) AS start_date,
                deid_date(fhir_date(e.enc.period."end"), p.shift_days) AS end_date,
                e.enc.status AS status
            FROM (SELECT id, enc, coalesce(enc.class->>'code',                       -- R4 Coding
                                           enc.class->0->'coding'->0->>'code',       -- R5 CodeableConcept[]
                                           CASE WHEN json_type(enc.class) = 'VARCHAR'
                                                THEN enc.class->>'$' END)            -- DSTU2 code string
                          AS class_code
                  FROM (SELECT id, json_transform(resource, '{_ENCOUNTER_SHAPE}') AS enc FROM {r}.encounter)) e
            JOIN deid_patient_src p ON p.patient_id = ref_id(e.enc.subject.reference)
            JOIN deid_encounter_keys k ON k.encounter_id = e.id""",
        "condition": f"""
            SELECT condition_key, patient_key, encounter_key, coding.system AS code_system, coding.code AS code,
                   onset_date, abatement_date, recorded_date, clinical_status, verification_status
            FROM (
                SELECT pseudonym('Condition', c.id) AS condition_key, p.patient_key,
                    k.encounter_key,
                    unnest(coalesce(c.cond.code.coding, [])) AS coding,
                    deid_date(coalesce(fhir_date(c.cond.onsetDateTime), fhir_date(c.cond.onsetPeriod.start)),
                              p.shift_days) AS onset_date,
                    deid_date(coalesce(fhir_date(c.cond.abatementDateTime), fhir_date(c.cond.abatementPeriod.start)),
                              p.shift_days) AS abatement_date,
                    deid_date(fhir_date(c.cond.recordedDate), p.shift_days) AS recorded_date,
                    {_status_code_sql('c.cond.clinicalStatus')} AS clinical_status,
                    {_status_code_sql('c.cond.verificationStatus')} AS verification_status
                FROM (SELECT id, json_transform(resource, '{_CONDITION_SHAPE}') AS cond FROM {r}.condition) c
                LEFT JOIN deid_encounter_keys k ON k.encounter_id = ref_id(c.cond.encounter.reference)
                JOIN deid_patient_src p ON p.patient_id = ref_id(c.cond.subject.reference)
            )""",
        # The largest table: each resource is parsed once, straight into typed fields
        # (json_transform: no JSON text re-parsed per field), and its value and its components
        # become one list of measurements, unnested (a UNION of the two would parse twice).
        "observation": f"""
            WITH fields AS (SELECT json_transform(resource, '{_OBSERVATION_SHAPE}') AS o FROM {r}.observation),
            measurements AS (
                SELECT p.patient_key, k.encounter_key,
                    deid_date(coalesce(fhir_date(o.effectiveDateTime), fhir_date(o.effectivePeriod.start),
                                       fhir_date(o.issued)), p.shift_days) AS effective_date,
                    unnest(list_concat(
                        CASE WHEN o.valueQuantity IS NOT NULL OR o.valueCodeableConcept IS NOT NULL
                             THEN [{{'code': o.code, 'valueQuantity': o.valueQuantity,
                                    'valueCodeableConcept': o.valueCodeableConcept}}] ELSE [] END,
                        -- a lone component object where FHIR has an array still counts
                        CASE json_type(o.component) WHEN 'ARRAY' THEN from_json(o.component, '[{_MEASUREMENT_SHAPE}]')
                                                    WHEN 'OBJECT' THEN [from_json(o.component, '{_MEASUREMENT_SHAPE}')]
                                                    ELSE [] END)) AS m
                -- the encounter keys first: written after the patient join, DuckDB built its
                -- hash table from the (larger) parsed observations, which took 17 of 43 s at 100k
                FROM fields
                LEFT JOIN deid_encounter_keys k ON k.encounter_id = ref_id(o.encounter.reference)
                JOIN deid_patient_src p ON p.patient_id = ref_id(o.subject.reference)
            )
            SELECT patient_key, encounter_key, effective_date,
                coalesce(list_filter(m.code.coding, lambda x: x.system = 'http://loinc.org')[1].code,
                         m.code.coding[1].code) AS code,
                TRY_CAST(m.valueQuantity.value AS DOUBLE) AS value_num,
                m.valueQuantity.unit AS unit,
                m.valueCodeableConcept.coding[1].code AS value_code
            FROM measurements""",
        # The drug is named inline (medicationCodeableConcept) or by reference to a Medication:
        # a contained one ("#id") or a landed Medication resource. Only its code crosses.
        "medication_request": f"""
            WITH requests AS (
                SELECT m.id, m.resource,
                    best_coding(m.resource->'medicationCodeableConcept'->'coding') AS inline_coding,
                    m.resource->'medicationReference'->>'reference' AS med_ref,
                    CASE WHEN NOT starts_with(med_ref, '#') THEN ref_id(med_ref) END AS medication_id
                FROM {r}.medication_request m
            ),
            resolved AS (
                SELECT q.*, coalesce(q.inline_coding,
                    CASE WHEN starts_with(q.med_ref, '#') THEN best_coding(list_filter(
                        json_list(q.resource->'contained'), lambda c: c->>'id' = substr(q.med_ref, 2))[1]->'code'->'coding')
                    END,
                    med.coding) AS coding,
                    CASE WHEN q.inline_coding IS NOT NULL THEN 'inline'
                         WHEN starts_with(q.med_ref, '#') THEN 'contained'
                         WHEN q.med_ref IS NOT NULL THEN 'reference' END AS medication_source
                FROM requests q
                LEFT JOIN deid_medication_codes med USING (medication_id)
            )
            SELECT pseudonym('MedicationRequest', m.id) AS medication_request_key, p.patient_key,
                k.encounter_key,
                m.coding.code AS medication_code, m.coding.system AS medication_system,
                CASE WHEN m.coding.system = '{RXNORM_SYSTEM}' THEN m.coding.code END AS rxnorm_code,
                m.medication_source,
                m.resource->>'status' AS status, m.resource->>'intent' AS intent,
                deid_date(fhir_date(m.resource->>'authoredOn'), p.shift_days) AS authored_date
            FROM resolved m
            LEFT JOIN deid_encounter_keys k ON k.encounter_id = ref_id(m.resource->'encounter'->>'reference')
            JOIN deid_patient_src p ON p.patient_id = ref_id(m.resource->'subject'->>'reference')""",
        # Annotation.text of Conditions and Observations (FHIR `note`): clinical free text,
        # scrubbed like the documents; author and time stay behind.
        "annotation": """
            SELECT split_part(n.note_id, '/', 1) AS source_type,
                   pseudonym(split_part(n.note_id, '/', 1), split_part(n.note_id, '/', 2)) AS source_key,
                   p.patient_key, n.note_text
            FROM deid_notes_scrubbed n JOIN deid_patient_src p ON p.patient_id = n.owner
            WHERE n.note_id NOT LIKE 'DocumentReference/%'""",
    }

    raw_counts = {name: _scalar(con, f"SELECT count(*) FROM {r}.{name}") for name in DEID_TABLES if name != "annotation"}
    left_behind = _resource_tables_left_behind(con, r)
    with transaction(con):
        con.execute(f"CREATE SCHEMA IF NOT EXISTS {out_schema}")
        for name, sql in statements.items():
            con.execute(f"CREATE OR REPLACE TABLE {out_schema}.{name} AS {sql}")
        _deidentify_documents(con, r, out_schema, note_buckets)
        rows, orphans, removed = _deid_counts(con, r, out_schema, raw_counts, restricted, left_behind)
        counts = pa.table({"category": list(removed), "removed": list(removed.values())})
        con.register("removal_counts", counts)
        con.execute(f"CREATE OR REPLACE TABLE {out_schema}.removal_counts AS SELECT * FROM removal_counts")
        # how dates were generalized: features must not place a landmark inside a year whose
        # events all carry 1 January (they would be "before" it though they happened after)
        con.execute(f"CREATE OR REPLACE TABLE {out_schema}.settings AS SELECT ? AS date_mode", [date_mode])
        con.unregister("removal_counts")
    by_source = dict(con.execute(
        f"""SELECT coalesce(medication_source, 'none'), count(*) FROM {out_schema}.medication_request
            GROUP BY ALL ORDER BY 1""").fetchall())
    unresolved = _scalar(con, f"""SELECT count(*) FROM {out_schema}.medication_request
                                  WHERE medication_source IN ('contained', 'reference') AND medication_code IS NULL""")
    return DeidReport(
        medications_by_source=by_source,
        medication_references_unresolved=int(unresolved),
        rows_by_table=rows,
        removed_by_category=removed,
        orphan_rows_dropped=orphans,
        reference_date=str(reference_date),
        resource_types_left_behind=left_behind,
    )


def _deidentify_documents(con: duckdb.DuckDBPyConnection, r: str, out_schema: str, buckets: int) -> None:
    """``document_reference``: the documents' fields, with their scrubbed notes joined bucket by
    bucket (the notes' owner buckets), so no join holds the population's note texts at once."""
    con.execute(f"""CREATE OR REPLACE TEMP TABLE deid_document_fields AS
        SELECT note_id, {owner_bucket_sql('owner')} AS bucket, document_key, patient_key, encounter_key, document_date,
               type_code
        FROM deid_document_src ORDER BY bucket""", {"buckets": buckets})
    con.execute("DROP TABLE deid_document_src")  # the notes' texts: scrubbed by now
    con.execute(f"""CREATE OR REPLACE TABLE {out_schema}.document_reference AS
        SELECT document_key, patient_key, encounter_key, document_date, type_code, NULL::VARCHAR AS note_text
        FROM deid_document_fields LIMIT 0""")
    for bucket in range(buckets):
        con.execute(f"""INSERT INTO {out_schema}.document_reference
            SELECT d.document_key, d.patient_key, d.encounter_key, d.document_date, d.type_code, n.note_text
            FROM (SELECT * FROM deid_document_fields WHERE bucket = $bucket::UBIGINT) d
            LEFT JOIN (SELECT note_id, note_text FROM deid_notes_scrubbed WHERE bucket = $bucket::UBIGINT) n USING (note_id)""",
                    {"bucket": bucket})
    con.execute("DROP TABLE deid_document_fields")


def _status_code_sql(status: str) -> str:
    """SQL: the code of a status member (JSON) sent as a CodeableConcept (R4) or as a code (STU3)."""
    return (f"CASE json_type({status}) WHEN 'VARCHAR' THEN {status}->>'$' "
            f"ELSE codings({status}->'coding')[1].code END")


def _may_have_keys(json_text: str, *keys: str) -> str:
    """SQL: true unless the JSON text ``json_text`` certainly has none of the member names ``keys``
    (plain ASCII names), at the cost of a substring search instead of a parse. A name is written
    either as itself in quotes or with \\u escapes, which JSON allows for any character, so text
    with an escape is always parsed."""
    return "(" + " OR ".join([f"contains({json_text}, '\"{k}\"')" for k in keys] +
                             [f"contains({json_text}, '\\u')"]) + ")"


def _scalar(con: duckdb.DuckDBPyConnection, sql: str):
    return con.execute(sql).fetchone()[0]


def _resource_tables_left_behind(con: duckdb.DuckDBPyConnection, raw_schema: str) -> list[str]:
    """Raw resource tables that no de-identified table projects (they never cross)."""
    projected = set(DEID_TABLES) | {"patient", "medication"}  # a Medication's code crosses via its request
    return [t for (t,) in con.execute(
        """SELECT table_name FROM duckdb_tables() WHERE schema_name = ? AND table_name NOT LIKE '\\_\\_%' ESCAPE '\\'
           ORDER BY table_name""",
        [raw_schema]).fetchall() if t not in projected and t not in BOOKKEEPING_TABLES]


def _deid_counts(con: duckdb.DuckDBPyConnection, r: str, out_schema: str, raw_counts: dict, restricted: str,
                 left_behind: list[str]):
    """Rows per table, rows dropped for lack of a landed patient, and what was removed or
    generalized per Safe Harbor category (structured fields), per tag (notes)."""
    rows = {name: _scalar(con, f"SELECT count(*) FROM {out_schema}.{name}") for name in DEID_TABLES}
    orphans = {name: raw_counts[name] - rows[name] for name in ("encounter", "medication_request", "document_reference")}
    orphans["condition"] = raw_counts["condition"] - _scalar(
        con, f"SELECT count(DISTINCT condition_key) FROM {out_schema}.condition")

    removed = dict.fromkeys(SAFE_HARBOR_CATEGORIES, 0)
    type_cases = " ".join(f"WHEN '{code}' THEN '{cat}'" for code, cat in IDENTIFIER_TYPE_CATEGORY.items())
    for category, count in con.execute(
        f"""SELECT CASE t {type_cases} ELSE 'other_identifiers' END, count(*)
            FROM (SELECT unnest(identifier_types) AS t FROM deid_patient_src) GROUP BY ALL"""
    ).fetchall():
        removed[category] += count
    for system, count in con.execute(
        "SELECT s, count(*) FROM (SELECT unnest(telecom_systems) AS s FROM deid_patient_src) GROUP BY ALL"
    ).fetchall():
        removed[{"fax": "fax_numbers", "email": "email_addresses", "url": "urls"}.get(system, "telephone_numbers")] += count
    names, addresses, photos, narratives, zip000, aged_90, births = con.execute(
        f"""SELECT sum(n_names), sum(n_addresses), sum(n_photos), count(*) FILTER (WHERE has_narrative),
                   count(*) FILTER (WHERE zip_digits IN ({restricted})),
                   count(*) FILTER (WHERE age_at_reference >= 90), count(birth_date)
            FROM deid_patient_src"""
    ).fetchone()
    removed["names"] += int(names or 0)
    removed["geographic_subdivisions"] += int(addresses or 0)
    removed["photos"] += int(photos or 0)
    # `identifier` arrays of the other projected resources (encounter numbers, claim ids, …)
    for table in ("encounter", "medication_request", "document_reference"):
        removed["other_identifiers"] += int(_scalar(
            con, f"SELECT coalesce(sum(len(json_list(resource->'identifier'))), 0) FROM {r}.{table}"))
    removed["other_identifiers"] += int(_scalar(  # conditions and observations: counted with their notes
        con, "SELECT coalesce(sum(n_identifiers), 0) FROM deid_notes_and_identifiers"))
    if "device" in left_behind:
        removed["device_identifiers"] += int(_scalar(con, f"SELECT count(*) FROM {r}.device"))
    removed["dates"] = int(births or 0) + sum(
        _scalar(con, f"SELECT count({col}) FROM {out_schema}.{table}")
        for table, col in [("patient", "death_date"), ("encounter", "start_date"), ("encounter", "end_date"),
                           ("condition", "onset_date"), ("condition", "abatement_date"), ("condition", "recorded_date"),
                           ("observation", "effective_date"), ("medication_request", "authored_date"),
                           ("document_reference", "document_date")]
    )
    removed["narratives_removed"] = int(narratives or 0)
    removed["restricted_zip3_to_000"] = int(zip000 or 0)
    removed["ages_90_plus_grouped"] = int(aged_90 or 0)
    removed["resources_left_behind"] = sum(int(_scalar(con, f"SELECT count(*) FROM {r}.{t}")) for t in left_behind)
    tags = "|".join(NOTE_TAGS)
    for tag, count in con.execute(
        f"""SELECT tag, count(*) FROM (
                SELECT unnest(regexp_extract_all(note_text, '\\[({tags})\\]', 1)) AS tag
                FROM (SELECT note_text FROM {out_schema}.document_reference
                      UNION ALL SELECT note_text FROM {out_schema}.annotation)) GROUP BY tag"""
    ).fetchall():
        removed[f"note_{tag.lower()}"] = count
    return rows, orphans, {k: int(v or 0) for k, v in removed.items()}


# --- leak scan -------------------------------------------------------------------------------

def _identifier_values_sql(con: duckdb.DuckDBPyConnection, raw_schema: str) -> str:
    """Original identifying values from the raw tables, lower-cased, by category, with the
    pseudonymous key of the patient they belong to (``owner_key``) or NULL for global values.

    Scope follows what identifies whom. Strings unique to a person (identifiers, phone and
    e-mail, street lines, full zip, birth date, resource id, full names) count wherever they
    appear. Single name tokens and the city are identifying only next to their own patient:
    "Will", "Hope" or "Boston" in another patient's note names nobody, so they are looked for
    in the owner's rows only (their own notes, their contacts' names included)."""
    existing = {t for (t,) in con.execute(  # views too: raw tables can be views over several batch files
        "SELECT table_name FROM duckdb_tables() WHERE schema_name = ? "
        "UNION SELECT view_name FROM duckdb_views() WHERE schema_name = ?", [raw_schema, raw_schema]).fetchall()}
    def f(name: str) -> str:
        return patient_field("pf", name)
    contacts = f"flatten(list_transform(json_list({f('contact')}), lambda c: json_list(c->'name')))"
    unique_address = (f"flatten(list_transform(json_list({f('address')}), lambda a: list_concat(str_list(a->'line'), "
                      "list_filter([a->>'postalCode', a->>'text'], lambda x: x IS NOT NULL))))")
    local_address = (f"flatten(list_transform(json_list({f('address')}), lambda a: "
                     "list_filter([a->>'city', a->>'district'], lambda x: x IS NOT NULL)))")
    parts = [
        # single name tokens and the city: the owner's rows only
        "SELECT 'name' AS category, unnest(ids.name) AS value, owner_key FROM ids",
        f"SELECT 'address', unnest({local_address}), owner_key FROM ids",
        # unique strings: anywhere
        f"""SELECT 'name', unnest(list_concat(full_names({f('name')}), full_names(to_json({contacts})),
                                           full_name_texts({f('name')}), full_name_texts(to_json({contacts})))),
                   NULL FROM ids""",
        "SELECT 'identifier', unnest(ids.identifier), NULL FROM ids",
        "SELECT 'telecom', unnest(ids.telecom), NULL FROM ids",
        f"SELECT 'address', unnest({unique_address}), NULL FROM ids",
        "SELECT 'birth_date', unnest(ids.birth_date), NULL FROM ids",
        # the raw resource id: derived tables carry pseudonyms only, never a key back into `raw`
        "SELECT 'resource_id', id, NULL FROM ids",
    ]
    for table in ("practitioner", "related_person"):
        if table in existing:
            parts.append(f"SELECT 'name', unnest(list_concat(full_names(resource->'name'), "
                         f"full_name_texts(resource->'name'))), NULL FROM {raw_schema}.{table}")
            parts.append(f"SELECT 'telecom', unnest(telecom_values(resource->'telecom')), NULL FROM {raw_schema}.{table}")
    return f"""
    WITH ids AS MATERIALIZED (SELECT id, pf, pseudonym('Patient', id) AS owner_key, {_patient_identifier_values_sql('pf')} AS ids
                              FROM (SELECT id, {patient_fields_sql('resource')} AS pf
                                    FROM {sliced_scan_sql(con, f'{raw_schema}.patient')}))
    SELECT category, value, owner_key, phrase_runs, array_to_string(phrase_runs, ' ') AS phrase,
           len(phrase_runs) = 1 AND value = phrase_runs[1] AS single_token
    FROM (SELECT DISTINCT category, lower(trim(value)) AS value, owner_key,
                 regexp_extract_all(lower(trim(value)), '[\\p{{L}}\\p{{N}}]+') AS phrase_runs
          FROM ({' UNION ALL '.join(parts)})
          WHERE value IS NOT NULL AND length(trim(value)) >= 3)
    WHERE len(phrase_runs) > 0
    """


def _check_key_reproduces_patient_keys(con: duckdb.DuckDBPyConnection, tables: list[str]) -> None:
    """Scoped values are matched to rows by pseudonym: with another key than the one the tables
    were made with, nothing would match and the scoped checks would pass silently. Refuse."""
    for table in tables:
        schema, name = table.split(".")
        has_key = con.execute("SELECT count(*) FROM duckdb_columns() WHERE database_name = current_database() "
                              "AND schema_name = ? AND table_name = ? "
                              "AND column_name = 'patient_key'", [schema, name]).fetchone()[0]
        if not has_key:
            continue
        rows, matched = con.execute(
            f"""SELECT count(*), count(*) FILTER (WHERE patient_key IN (SELECT owner_key FROM leak_ids))
                FROM (SELECT DISTINCT patient_key FROM {table} WHERE patient_key IS NOT NULL)""").fetchone()
        if rows and not matched:
            raise DeidentificationError(
                f"leak scan: no patient_key of {table} is a pseudonym of a landed patient under this key; "
                "the check needs the key the tables were de-identified with (DEID_SECRET_KEY)")


def find_identifier_leaks(con: duckdb.DuckDBPyConnection, tables: list[str], key: bytes,
                          raw_schema: str = "raw", aggregate: bool = False) -> list[dict]:
    """Scan every text column of ``tables`` for original identifier values.

    Returns one row per (table, column, category) with a hit count, never the values themselves,
    so the result is safe to log and to show as metadata. Texts and values are cut into runs of
    Unicode letters and digits; a one-word identifier must equal such a run (a hash join), a longer
    one ("12 Elm St", "555-010-4477") must appear as consecutive runs, whatever the separators
    ("555 010 4477" counts; "12 Elm Street" does not contain "12 Elm St").
    Values scoped to a patient (name tokens, city) count only in rows of that patient (matched by
    ``patient_key``, which is why the key is needed); a table without ``patient_key`` is checked
    for the unique values only.

    ``aggregate``: the tables hold figures, not records (a validation report, a model card). Values
    without a letter (birth dates, zip codes, phone numbers) are then not looked for: in a large
    population every calendar date is somebody's birth date and every 5-digit number a zip, so
    they would match the landmark dates and counts such a table is made of; names, street lines,
    e-mails and identifiers with letters still count.
    """
    register_functions(con, key, max_shift_days=365)
    findings = []
    tags = "|".join(t.lower() for t in NOTE_TAGS)
    try:
        con.execute(f"CREATE OR REPLACE TEMP TABLE leak_ids AS {_identifier_values_sql(con, raw_schema)}")
        if aggregate:
            con.execute("DELETE FROM leak_ids WHERE NOT regexp_matches(value, '\\p{L}')")
        # the distinct runs of each phrase (a value of several runs), with how many it has
        con.execute("""CREATE OR REPLACE TEMP TABLE leak_phrase_runs AS
                       SELECT category, phrase, owner_key, run, count(*) OVER (PARTITION BY category, phrase, owner_key) AS runs
                       FROM (SELECT DISTINCT category, phrase, owner_key, unnest(phrase_runs) AS run
                             FROM leak_ids WHERE NOT single_token)""")
        # every run an identifier has: a text's other runs cannot be part of a match
        con.execute("""CREATE OR REPLACE TEMP TABLE leak_vocabulary AS
                       SELECT value AS token FROM leak_ids WHERE single_token UNION SELECT run FROM leak_phrase_runs""")
        _check_key_reproduces_patient_keys(con, tables)
        for table in tables:
            schema, name = table.split(".")
            source = f"{quote_ident(schema)}.{quote_ident(name)}"
            columns = dict(con.execute(
                # this database's table only: an attached one may have a schema of the same name
                "SELECT column_name, data_type FROM duckdb_columns() WHERE database_name = current_database() "
                "AND schema_name = ? AND table_name = ?",
                [schema, name]).fetchall())
            owner = quote_ident("patient_key") if columns.get("patient_key") == "VARCHAR" else "NULL::VARCHAR"
            for column in [c for c, t in columns.items() if t == "VARCHAR"]:
                # a column's texts are scanned in buckets of their patients: the token table of a
                # bucket, not of the population, is held at once. What is held is a bucket's
                # distinct (patient, text) pairs, so they set the count: a column of units or codes
                # has 10M rows at 100k patients but a few per patient, and each extra bucket is one
                # more pass over the whole column.
                # A column whose every value is one run (pseudonyms, codes like "male") needs no
                # tokenizing and can hold only one-run phrases: its values are joined as they are.
                pairs, chars, one_run = con.execute(
                    f"SELECT approx_count_distinct(hash({owner}, {quote_ident(column)})), "
                    f"coalesce(sum(strlen({quote_ident(column)})), 0), "
                    f"coalesce(bool_and(regexp_full_match(lower({quote_ident(column)}), '{_RUN}')), false) "
                    f"FROM {source}").fetchone()
                buckets = max(1, -(-int(chars) // LEAK_SCAN_CHARS_PER_BUCKET),
                              -(-int(pairs) // LEAK_SCAN_PAIRS_PER_BUCKET)) if owner != "NULL::VARCHAR" else 1
                hits_of = _leak_hits_of_runs if one_run else _leak_hits
                hits_by_category: dict[str, int] = {}
                for bucket in range(buckets):
                    for category, hits in hits_of(con, source, quote_ident(column), owner, tags, buckets, bucket):
                        hits_by_category[category] = hits_by_category.get(category, 0) + int(hits)
                for category, hits in hits_by_category.items():
                    findings.append({"table": table, "column": column, "category": category, "hits": hits})
    except duckdb.Error as error:
        raise DeidentificationError(f"leak scan failed: {safe_error_message(error)}") from None
    finally:
        con.execute("DROP TABLE IF EXISTS leak_ids")
        con.execute("DROP TABLE IF EXISTS leak_phrase_runs")
        con.execute("DROP TABLE IF EXISTS leak_vocabulary")
    return findings


# How much of one column the leak check scans at once: about 30 MB of text, at most about 1M
# distinct (patient, value) pairs.
LEAK_SCAN_CHARS_PER_BUCKET = 30_000_000
LEAK_SCAN_PAIRS_PER_BUCKET = 1_000_000


# The hits of one-word values among a bucket's `tokens` (owner, token): anyone's unique values,
# and a patient's own (name tokens, city) only in that patient's rows.
_SINGLE_TOKEN_HITS = """SELECT i.category, count(*) FROM leak_ids i JOIN tokens t ON t.token = i.value
            WHERE i.single_token AND i.owner_key IS NULL GROUP BY i.category
            UNION ALL
            SELECT i.category, count(*) FROM leak_ids i JOIN tokens t ON t.token = i.value AND t.owner = i.owner_key
            WHERE i.single_token GROUP BY i.category"""


def _leak_hits_of_runs(con: duckdb.DuckDBPyConnection, table: str, column: str, owner: str, tags: str,
                       buckets: int, bucket: int) -> list[tuple[str, int]]:
    """``_leak_hits`` of a column whose lowercased values are each one run: the same hits. A
    value is its only token and no tag can be in it; of the phrases, only those of one run can
    match ("#QX77" is the phrase "qx77"), and they match where they equal the token."""
    return con.execute(
        f"""WITH tokens AS (
                SELECT DISTINCT {owner} AS owner, lower({column}) AS token
                FROM {table} WHERE {column} IS NOT NULL AND {owner_bucket_sql(owner)} = $bucket::UBIGINT),
            one_run_phrases AS (SELECT DISTINCT category, phrase, owner_key FROM leak_phrase_runs WHERE runs = 1)
            {_SINGLE_TOKEN_HITS}
            UNION ALL
            SELECT p.category, count(*) FROM one_run_phrases p JOIN tokens t ON t.token = p.phrase
            WHERE p.owner_key IS NULL GROUP BY p.category
            UNION ALL
            SELECT p.category, count(*) FROM one_run_phrases p JOIN tokens t ON t.token = p.phrase AND t.owner = p.owner_key
            GROUP BY p.category""",
        {"buckets": buckets, "bucket": bucket}).fetchall()


def _leak_hits(con: duckdb.DuckDBPyConnection, table: str, column: str, owner: str, tags: str, buckets: int,
               bucket: int) -> list[tuple[str, int]]:
    """(category, hits) of one column, for the rows of one patient bucket (``table``, ``column``
    and ``owner`` are quoted SQL).

    A one-word value is a hash join of the texts' runs. A longer value ("12 elm st",
    "555-010-4477") is found where its runs follow each other in a text, whatever separates them
    ("555 010 4477" too). Candidates come from its rarest run in these texts: anchoring on the
    first run joined every text holding "2" to every birth date starting with "2/"."""
    return con.execute(
        f"""WITH texts AS (
                SELECT row_number() OVER () AS text_id, owner, runs
                FROM (SELECT owner, regexp_extract_all(text, '[\\p{{L}}\\p{{N}}]+') AS runs
                      -- the scrubber's own tags ("[PHONE]") are not data: a patient named
                      -- "Phone" must not fail the check on every scrubbed note
                      FROM (SELECT DISTINCT {owner} AS owner,
                                   regexp_replace(lower({column}), '\\[(?:{tags})\\]', ' ', 'g') AS text
                            FROM {table} WHERE {column} IS NOT NULL AND {owner_bucket_sql(owner)} = $bucket::UBIGINT))),
            -- only runs that some identifier has can match: the rest (most of a note's words) are
            -- dropped before the DISTINCT and the joins
            tokens AS (SELECT DISTINCT u.text_id, u.owner, u.token
                       FROM (SELECT text_id, owner, unnest(runs) AS token FROM texts) u
                       JOIN leak_vocabulary v ON v.token = u.token),
            frequency AS (SELECT token, count(*) AS texts FROM tokens GROUP BY token),
            phrases AS (  -- a phrase with a run none of these texts holds cannot be in them
                SELECT p.category, p.phrase, p.owner_key, arg_min(p.run, f.texts) AS anchor
                FROM frequency f JOIN leak_phrase_runs p ON p.run = f.token
                GROUP BY ALL HAVING count(*) = any_value(p.runs))
            {_SINGLE_TOKEN_HITS}
            UNION ALL
            SELECT p.category, count(*) FROM phrases p
            JOIN tokens t ON t.token = p.anchor JOIN texts x ON x.text_id = t.text_id
            WHERE p.owner_key IS NULL AND contains(' ' || array_to_string(x.runs, ' ') || ' ', ' ' || p.phrase || ' ')
            GROUP BY p.category
            UNION ALL
            SELECT p.category, count(*) FROM phrases p
            JOIN tokens t ON t.token = p.anchor AND t.owner = p.owner_key JOIN texts x ON x.text_id = t.text_id
            WHERE contains(' ' || array_to_string(x.runs, ' ') || ' ', ' ' || p.phrase || ' ') GROUP BY p.category""",
        {"buckets": buckets, "bucket": bucket}).fetchall()
