"""Classify the condition mentions of real (Synthea) FHIR notes and print the distribution of
their context per condition.

    .venv/bin/python benchmarks/note_context_real_notes.py ../shared/fhir-samples/synthea-bulk-10p

Reads DocumentReference*.ndjson of the folder (note text base64 in content[].attachment.data),
runs the same SQL as the feature pipeline (``note_mentions_sql``) over every note at once.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clinical_ml.db import quote_path  # noqa: E402
from clinical_ml.note_context import CONDITIONS, note_mentions_sql  # noqa: E402


def load_notes(con: duckdb.DuckDBPyConnection, directory: Path) -> int:
    """Table ``notes(note_id, text)``: one row per plain-text attachment of every DocumentReference."""
    files = sorted(str(p) for p in directory.glob("DocumentReference*.ndjson"))
    if not files:
        raise SystemExit(f"no DocumentReference*.ndjson in {directory}")
    listing = ", ".join(quote_path(f) for f in files)
    con.execute(f"""
        CREATE OR REPLACE TABLE notes AS
        SELECT (json ->> 'id') || '#' || n AS note_id,
               decode(from_base64(content ->> '$.attachment.data')) AS text
        FROM (SELECT json, unnest(json_extract(json, '$.content[*]')) AS content,
                     generate_subscripts(json_extract(json, '$.content[*]'), 1) AS n
              FROM read_ndjson_objects([{listing}]))
        WHERE content ->> '$.attachment.data' IS NOT NULL
          AND coalesce(content ->> '$.attachment.contentType', 'text/plain') LIKE 'text/plain%'""")
    return con.execute("SELECT count(*) FROM notes").fetchone()[0]


def distribution(con: duckdb.DuckDBPyConnection) -> list[tuple]:
    """Per condition: mentions, notes, and how many are affirmed-current, negated, historical,
    hypothetical, someone else's (affirmed current = none of the other four)."""
    return con.execute(f"""
        WITH m AS ({note_mentions_sql('notes')})
        SELECT c.condition, count(m.condition) AS mentions, count(DISTINCT m.note_id) AS notes,
               count(*) FILTER (WHERE NOT negated AND NOT historical AND NOT hypothetical
                                AND experiencer = 'patient') AS affirmed_current,
               count(*) FILTER (WHERE negated) AS negated,
               count(*) FILTER (WHERE historical) AS historical,
               count(*) FILTER (WHERE hypothetical) AS hypothetical,
               count(*) FILTER (WHERE experiencer = 'other') AS other
        FROM (SELECT unnest(string_split(?, ',')) AS condition) c LEFT JOIN m USING (condition)
        GROUP BY c.condition ORDER BY c.condition""", [",".join(CONDITIONS)]).fetchall()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    con = duckdb.connect()
    n_notes = load_notes(con, args.directory)
    started = time.perf_counter()
    rows = distribution(con)
    elapsed = time.perf_counter() - started
    header = ("condition", "mentions", "notes", "affirmed_current", "negated", "historical", "hypothetical", "other")
    print(f"{n_notes} notes from {args.directory} classified in {elapsed:.2f}s")
    print(" ".join(f"{h:>16}" for h in header))
    for row in rows:
        print(" ".join(f"{v:>16}" for v in row))
    print(f"total_mentions={sum(r[1] for r in rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
