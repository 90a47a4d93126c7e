import json

import duckdb
import pytest

import clinical_ml.ingest as ingest
from clinical_ml.ingest import land_ndjson
from tests.conftest import shared_sample


def _write(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_malformed_lines_are_quarantined_with_reason_and_the_rest_loads(tmp_path):
    good = [json.dumps({"resourceType": "Patient", "id": f"p{i}"}).encode() for i in range(5)]
    bad = [
        b'{"resourceType": "Patient", "id": ',           # invalid JSON (truncated)
        b'["not", "an", "object"]',                        # not an object
        b'{"id": "x1"}',                                   # missing resourceType
        b'{"resourceType": "Patient"}',                    # missing id
        b'{"resourceType": "Encounter", "id": "e1"}',      # wrong type for the file
        b'{"resourceType": "Patient", "id": "\xff\xfe"}',  # invalid UTF-8
        b"",                                               # empty line
        b'{"resourceType": "Patient", "id": "p0"}',        # duplicate id
    ]
    _write(tmp_path / "Patient.000.ndjson", good[:3] + bad + good[3:])
    con = duckdb.connect()
    report = land_ndjson(con, tmp_path)

    assert report.lines_read == 13 and report.loaded == 5 and report.quarantined == 8
    assert report.reconciles
    assert con.execute("SELECT list(id ORDER BY id) FROM raw.patient").fetchone()[0] == [f"p{i}" for i in range(5)]
    quarantine = dict(con.execute("SELECT line_no, reason FROM raw.quarantine").fetchall())
    assert quarantine == {
        4: "invalid JSON", 5: "not a JSON object", 6: "missing resourceType", 7: "missing id",
        8: "resourceType does not match file type Patient", 9: "invalid UTF-8", 10: "empty line",
        11: "duplicate id (first occurrence kept)",
    }
    # nothing is lost: the quarantined line itself is kept for inspection
    assert con.execute("SELECT line FROM raw.quarantine WHERE line_no = 6").fetchone()[0] == '{"id": "x1"}'


def test_relanding_the_same_export_gives_the_same_tables(small_export):
    con = duckdb.connect()
    first = land_ndjson(con, small_export)
    snapshot = con.execute("SELECT id, source_file, line_no FROM raw.observation ORDER BY id").fetchall()
    second = land_ndjson(con, small_export)
    assert first.loaded_by_type == second.loaded_by_type
    assert con.execute("SELECT id, source_file, line_no FROM raw.observation ORDER BY id").fetchall() == snapshot


def test_a_failed_landing_leaves_the_previous_tables_intact(tmp_path, small_export, monkeypatch):
    con = duckdb.connect()
    land_ndjson(con, small_export)
    before = con.execute("SELECT count(*) FROM raw.patient").fetchone()[0]

    other = tmp_path / "other"
    other.mkdir()
    (other / "Patient.000.ndjson").write_text('{"resourceType":"Patient","id":"only"}\n')
    real_table_name = ingest.table_name

    def failing_table_name(resource_type):
        if resource_type == "Observation":
            raise RuntimeError("disk full")
        return real_table_name(resource_type)

    monkeypatch.setattr(ingest, "table_name", failing_table_name)
    with pytest.raises(RuntimeError, match="disk full"):
        land_ndjson(con, other)
    assert con.execute("SELECT count(*) FROM raw.patient").fetchone()[0] == before


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="FHIR NDJSON directory not found"):
        land_ndjson(duckdb.connect(), tmp_path / "nope")


@pytest.mark.parametrize("sample", ["synthea-bulk-10p", "synthea-2019-40p"])
def test_real_synthea_ndjson_lands_with_nothing_quarantined(sample):
    directory = shared_sample(sample)
    con = duckdb.connect()
    report = land_ndjson(con, directory)
    expected = sum(sum(1 for _ in open(p, "rb")) for p in directory.glob("[A-Z]*.ndjson"))
    assert report.quarantined == 0
    assert report.loaded == expected == report.lines_read
    assert report.loaded_by_type["Patient"] >= 13
    if sample == "synthea-bulk-10p":
        assert report.skipped_files == ["log.ndjson"]  # the export log is not a resource file


def test_strict_validation_quarantines_invalid_resources_without_echoing_values(tmp_path):
    patients = [
        {"resourceType": "Patient", "id": "ok", "gender": "female", "birthDate": "1970-01-01"},
        {"resourceType": "Patient", "id": "bad-date", "birthDate": "Jane-Doe-born-1970"},
        # an unknown key can itself be data: it must not be echoed either
        {"resourceType": "Patient", "id": "bad-field", "gender": "female", "JaneDoeNotes": "teal"},
    ]
    (tmp_path / "Patient.000.ndjson").write_text("\n".join(json.dumps(p) for p in patients) + "\n")
    con = duckdb.connect()
    report = land_ndjson(con, tmp_path, validate="all")
    assert report.reconciles and report.loaded == 1 and report.quarantined == 2
    reasons = dict(con.execute("SELECT line_no, reason FROM raw.quarantine").fetchall())
    assert reasons[2].startswith("FHIR R4B validation failed at birthDate")
    assert reasons[3] == "FHIR R4B validation failed at <extra>: extra_forbidden"
    assert "Jane" not in reasons[2] + reasons[3]
    # without validation, all three are structurally fine and load
    assert land_ndjson(duckdb.connect(), tmp_path).loaded == 3


def test_an_oversize_line_is_quarantined_and_the_rest_of_the_file_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "MAX_LINE_BYTES", 200)
    big = json.dumps({"resourceType": "Patient", "id": "big", "text": {"div": "x" * 500}})
    small = [json.dumps({"resourceType": "Patient", "id": f"p{i}"}) for i in range(3)]
    (tmp_path / "Patient.000.ndjson").write_text("\n".join([small[0], big, *small[1:]]) + "\n")
    con = duckdb.connect()
    report = land_ndjson(con, tmp_path)
    assert report.reconciles and report.loaded == 3
    assert con.execute("SELECT line_no, reason FROM raw.quarantine").fetchall() == [(2, "line longer than 200 bytes")]


def test_deleted_entries_with_bad_lines_or_unsafe_types_are_quarantined_not_fatal(tmp_path):
    (tmp_path / "Patient.000.ndjson").write_text(
        "\n".join(json.dumps({"resourceType": "Patient", "id": f"p{i}"}) for i in range(3)) + "\n")
    con = duckdb.connect()
    land_ndjson(con, tmp_path)
    (tmp_path / "deleted").mkdir()
    bundle = lambda url: json.dumps({"resourceType": "Bundle", "type": "transaction",  # noqa: E731
                                     "entry": [{"request": {"method": "DELETE", "url": url}}]})
    (tmp_path / "deleted" / "del.ndjson").write_text("\n".join([
        bundle("Patient/p1"),
        "{not json",
        bundle('Patient"; DROP TABLE raw.patient; --/p2'),  # a type that is SQL, not a resource type
        json.dumps([1, 2]),
    ]) + "\n")
    (tmp_path / "Patient.000.ndjson").write_text(
        "\n".join(json.dumps({"resourceType": "Patient", "id": f"p{i}"}) for i in (0, 2)) + "\n")
    report = land_ndjson(con, tmp_path, mode="merge")
    assert report.deleted == 1 and report.reconciles
    assert sorted(i for (i,) in con.execute("SELECT id FROM raw.patient").fetchall()) == ["p0", "p2"]
    reasons = con.execute("SELECT source_file, line_no, reason FROM raw.quarantine WHERE source_file LIKE 'deleted/%' "
                          "ORDER BY line_no").fetchall()
    assert [(f, n) for f, n, _ in reasons] == [("deleted/del.ndjson", 2), ("deleted/del.ndjson", 3),
                                                ("deleted/del.ndjson", 4)]


def test_lines_read_come_from_the_file_not_from_the_classification(tmp_path, monkeypatch):
    lines = [json.dumps({"resourceType": "Patient", "id": f"p{i}"}) for i in range(5)]
    (tmp_path / "Patient.000.ndjson").write_text("\n".join(lines))  # no final newline: still 5 lines
    con = duckdb.connect()
    report = land_ndjson(con, tmp_path)
    assert (report.lines_read, report.loaded, report.reconciles) == (5, 5, True)
    # a landing that lost a line on the way must not reconcile
    original = ingest._settle_stage

    def lose_one(con, schema, rtype, landing_id):
        con.execute(f"""DELETE FROM {ingest._stage(schema, ingest.table_name(rtype))}
                        WHERE line_no = (SELECT max(line_no) FROM {ingest._stage(schema, ingest.table_name(rtype))})""")
        original(con, schema, rtype, landing_id)

    monkeypatch.setattr(ingest, "_settle_stage", lose_one)
    report = land_ndjson(duckdb.connect(), tmp_path)
    assert report.lines_read == 5 and report.loaded == 4 and not report.reconciles


def test_gzipped_ndjson_lands_like_plain_and_unknown_ndjson_files_are_reported(tmp_path):
    import gzip

    lines = [json.dumps({"resourceType": "Patient", "id": f"p{i}"}) for i in range(4)]
    plain, zipped = tmp_path / "plain", tmp_path / "zipped"
    plain.mkdir(), zipped.mkdir()
    (plain / "Patient.000.ndjson").write_text("\n".join(lines) + "\n")
    with gzip.open(zipped / "Patient.000.ndjson.gz", "wt") as handle:
        handle.write("\n".join(lines) + "\n")
    with gzip.open(zipped / "Patient.001.ndjson.gz", "wt") as handle:
        handle.write(json.dumps({"resourceType": "Patient", "id": "p9"}) + "\n{broken\n")
    (zipped / "Patient.000.ndjson.bak").write_text(lines[0] + "\n")
    con = duckdb.connect()
    report = land_ndjson(con, zipped)
    assert (report.lines_read, report.loaded, report.quarantined, report.reconciles) == (6, 5, 1, True)
    assert report.files_read_line_by_line == ["Patient.001.ndjson.gz"]  # the clean one took the fast path
    assert report.skipped_files == ["Patient.000.ndjson.bak"]
    assert con.execute("SELECT line_no, reason FROM raw.quarantine").fetchall() == [(2, "invalid JSON")]
    fast = duckdb.connect()
    land_ndjson(fast, plain)
    assert (con.execute("SELECT count(*) FROM raw.patient WHERE id IN ('p0','p1','p2','p3')").fetchone()
            == fast.execute("SELECT count(*) FROM raw.patient").fetchone())


@pytest.mark.parametrize("insertion_order", [True, False])
def test_every_landed_row_keeps_its_file_and_line_number(tmp_path, insertion_order):
    """Provenance: raw rows point at their exact line, for files larger than two row groups
    (read on several threads) and for a type split over several files, also when DuckDB is
    told it need not keep insertion order."""
    sizes = {"Observation.000.ndjson": 260_000, "Observation.001.ndjson": 7}
    for name, n in sizes.items():
        _write(tmp_path / name, [json.dumps({"resourceType": "Observation", "id": f"{name[12:15]}-{i}",
                                             "status": "final", "valueQuantity": {"value": i % 97}}).encode()
                                 for i in range(1, n + 1)])
    con = duckdb.connect(str(tmp_path / "w.duckdb"), config={"threads": 4, "preserve_insertion_order": insertion_order})
    land_ndjson(con, tmp_path)
    rows = con.execute("SELECT source_file, line_no, id FROM raw.observation").fetchall()
    assert len(rows) == sum(sizes.values())
    assert all(row_id == f"{file[12:15]}-{line}" for file, line, row_id in rows)
