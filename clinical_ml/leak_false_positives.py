"""How often the leak check would block on words that are not identifiers, measured on real
notes (benchmarks/leak_check_false_positives.py and tests/test_leak_false_positives.py).

Two readings of one export, both after the pipeline's own landing and de-identification:

- ``blocks``: findings of the leak check the pipeline runs (name tokens scoped to their patient,
  honorifics out, unique strings global);
- ``global_token_hits``: what the earlier rule would have counted: any patient's name token,
  prefix or suffix ("Mr.", "Jr.") as a word in any row.

``with_common_word_names`` makes the hard case real: the same export with every patient renamed
to a name that is also an English word ("Will", "Hope", "May"), as some real patients are.
"""

from __future__ import annotations

import gzip
import shutil
from dataclasses import dataclass
from pathlib import Path

import duckdb
import orjson

from clinical_ml.deid import DEID_TABLES, deidentify, find_identifier_leaks, register_macros
from clinical_ml.ingest import land_ndjson

COMMON_WORD_NAMES = ("Will", "Hope", "May", "Mark", "Grace", "Bill", "Faith", "Joy", "Rose", "Guy", "Art", "Gene",
                     "Sue", "Dawn", "Frank")


@dataclass
class FalsePositiveReading:
    notes: int
    blocks: int                # hits the pipeline's leak check reports (each would stop the graph)
    findings: list[dict]
    global_token_hits: int     # hits under the earlier global-token rule


def with_common_word_names(source: Path, target: Path) -> Path:
    """Copy an NDJSON export, giving every Patient a given name that is also a common word
    (and an honorific prefix); everything else is untouched."""
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if not path.name.startswith("Patient."):
            shutil.copy(path, target / path.name)
            continue
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            patients = [orjson.loads(line) for line in handle if line.strip()]
        for i, patient in enumerate(patients):
            for name in patient.get("name") or []:
                name["given"] = [COMMON_WORD_NAMES[i % len(COMMON_WORD_NAMES)]]
                name["prefix"] = ["Mr." if patient.get("gender") == "male" else "Ms."]
        with opener(target / path.name, "wb") as handle:
            handle.write(b"\n".join(orjson.dumps(p) for p in patients) + b"\n")
    return target


def measure(export_dir: Path, key: bytes) -> FalsePositiveReading:
    con = duckdb.connect()
    try:
        land_ndjson(con, export_dir)
        deidentify(con, key)
        tables = [f"deid.{t}" for t in DEID_TABLES]
        findings = find_identifier_leaks(con, tables, key)
        register_macros(con)
        # the earlier rule: every patient's name words (prefixes and suffixes included), anywhere
        global_hits = con.execute(r"""
            WITH words AS (
                SELECT DISTINCT lower(unnest(regexp_extract_all(w, '[\p{L}\p{N}]+'))) AS word
                FROM (SELECT unnest(list_concat(
                          flatten(list_transform(json_list(resource->'name'), n -> list_concat(
                              str_list(n->'given'), str_list(n->'prefix'), str_list(n->'suffix'),
                              list_filter([n->>'family'], x -> x IS NOT NULL)))),
                          [])) AS w FROM raw.patient)),
            tokens AS (
                SELECT unnest(regexp_extract_all(lower(note_text), '[\p{L}\p{N}]+')) AS token
                FROM (SELECT note_text FROM deid.document_reference UNION ALL SELECT note_text FROM deid.annotation))
            SELECT count(*) FROM tokens JOIN words ON token = word WHERE length(word) >= 2""").fetchone()[0]
        notes = con.execute("SELECT count(*) FROM deid.document_reference WHERE note_text IS NOT NULL").fetchone()[0]
        return FalsePositiveReading(notes=notes, blocks=sum(f["hits"] for f in findings), findings=findings,
                                    global_token_hits=int(global_hits))
    finally:
        con.close()
