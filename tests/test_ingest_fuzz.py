"""Mutated NDJSON never crashes the landing, and every line is accounted for."""

import json

import duckdb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinical_ml.ingest import land_ndjson

VALID = [json.dumps({"resourceType": "Observation", "id": f"o{i}", "status": "final",
                     "valueQuantity": {"value": i}}).encode() for i in range(6)]


def mutate(line: bytes, data) -> bytes:
    kind = data.draw(st.sampled_from(["keep", "truncate", "insert", "delete", "bytes", "swap_type", "drop_id"]))
    if kind == "truncate":
        return line[: data.draw(st.integers(0, len(line)))]
    if kind == "insert":
        at = data.draw(st.integers(0, len(line)))
        return line[:at] + data.draw(st.binary(min_size=1, max_size=8)).replace(b"\n", b"") + line[at:]
    if kind == "delete":
        at = data.draw(st.integers(0, max(len(line) - 1, 0)))
        return line[:at] + line[at + 1:]
    if kind == "bytes":
        return data.draw(st.binary(max_size=40)).replace(b"\n", b"")
    if kind == "swap_type":
        return line.replace(b'"Observation"', b'"Patient"')
    if kind == "drop_id":
        return line.replace(b'"id"', b'"xid"')
    return line


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_ndjson_always_reconciles(tmp_path_factory, data):
    lines = [mutate(line, data) for line in data.draw(st.lists(st.sampled_from(VALID), min_size=1, max_size=12))]
    trailing_newline = data.draw(st.booleans())
    directory = tmp_path_factory.mktemp("fuzz")
    (directory / "Observation.000.ndjson").write_bytes(b"\n".join(lines) + (b"\n" if trailing_newline else b""))
    con = duckdb.connect()

    report = land_ndjson(con, directory)

    expected_lines = len(lines) if trailing_newline or lines[-1] != b"" else len(lines) - 1
    assert report.reconciles and report.lines_read == expected_lines
    loaded = con.execute("SELECT count(*) FROM raw.observation").fetchone()[0]
    quarantined = con.execute("SELECT count(*) FROM raw.quarantine").fetchone()[0]
    assert loaded + quarantined == expected_lines
    # what loaded is a valid Observation with a unique id
    assert con.execute("""SELECT count(*) FROM raw.observation
                          WHERE resource->>'resourceType' <> 'Observation' OR id IS NULL OR id = ''""").fetchone()[0] == 0
    assert con.execute("SELECT count(DISTINCT id) = count(*) FROM raw.observation").fetchone()[0]
