import duckdb
import pytest

from clinical_ml.deid import (DEID_TABLES, DeidentificationError, MissingSecretKey, date_shift_days, deidentify, find_identifier_leaks,
                              pseudonym, register_macros, scrub_notes_sql)
from clinical_ml.ingest import land_ndjson
from clinical_ml.synthetic import patient_identifiers
from resources.deid_key import DeidKey
from tests.conftest import TEST_KEY, read_resources, shared_sample


def _all_text(con) -> str:
    """Every value of every de-identified table, as one lower-cased string."""
    parts = []
    for table in DEID_TABLES:
        parts += [str(row) for row in con.execute(f"SELECT * FROM deid.{table}").fetchall()]
    return "\n".join(parts).lower()


def _deidentified_export(export) -> duckdb.DuckDBPyConnection:
    """A connection of its own holding ``export`` landed and de-identified (for tests that change it)."""
    con = duckdb.connect()
    land_ndjson(con, export)
    deidentify(con, TEST_KEY)
    return con


def test_generated_identifiers_appear_nowhere_in_deidentified_tables(deid_con, small_export):
    text = _all_text(deid_con)
    checked = 0
    for patient in read_resources(small_export, "Patient"):
        ids = patient_identifiers(patient)
        for value in ids["name"] + ids["identifier"] + ids["telecom"] + ids["address"] + ids["birth_date"]:
            assert value.lower() not in text, "an original identifier survived de-identification"
            checked += 1
        assert patient["id"] not in text  # resource ids are replaced by pseudonyms
    assert checked > 400 * 8


def test_pseudonyms_are_consistent_across_resources_and_runs(deid_con, small_export):
    patient = read_resources(small_export, "Patient")[0]
    key = pseudonym(TEST_KEY, "Patient", patient["id"])
    assert deid_con.execute("SELECT count(*) FROM deid.patient WHERE patient_key = ?", [key]).fetchone()[0] == 1
    raw_encounters = sum(1 for e in read_resources(small_export, "Encounter")
                         if e["subject"]["reference"] == f"Patient/{patient['id']}")
    assert deid_con.execute("SELECT count(*) FROM deid.encounter WHERE patient_key = ?", [key]).fetchone()[0] == raw_encounters
    # every encounter key used by observations exists in the encounter table (linkage survives)
    assert deid_con.execute("""SELECT count(*) FROM deid.observation o
                               ANTI JOIN deid.encounter e USING (encounter_key)""").fetchone()[0] == 0
    # same key, same pseudonym; another key, another pseudonym
    assert pseudonym(TEST_KEY, "Patient", "abc") == pseudonym(TEST_KEY, "Patient", "abc")
    assert pseudonym(TEST_KEY, "Patient", "abc") != pseudonym(b"another-key-0123456789", "Patient", "abc")


def test_deidentification_is_deterministic(small_export):
    def run():
        con = duckdb.connect()
        land_ndjson(con, small_export)
        deidentify(con, TEST_KEY)
        return con.execute("SELECT * FROM deid.encounter ORDER BY encounter_key").fetchall()

    assert run() == run()


def test_dates_shift_per_patient_keeping_intervals(deid_con, small_export):
    patient = read_resources(small_export, "Patient")[1]
    raw_starts = sorted(e["period"]["start"][:10] for e in read_resources(small_export, "Encounter")
                        if e["subject"]["reference"] == f"Patient/{patient['id']}")
    key = pseudonym(TEST_KEY, "Patient", patient["id"])
    shifted = [r[0] for r in deid_con.execute(
        "SELECT start_date FROM deid.encounter WHERE patient_key = ? ORDER BY start_date", [key]).fetchall()]
    from datetime import date
    raw_dates = [date.fromisoformat(d) for d in raw_starts]
    offset = date_shift_days(TEST_KEY, patient["id"], 365)
    assert offset != 0
    assert [(s - r).days for s, r in zip(shifted, raw_dates)] == [offset] * len(raw_dates)


def test_birth_year_only_ages_over_89_grouped_and_restricted_zips(deid_con, small_export):
    columns = [c for (c,) in deid_con.execute(
        "SELECT column_name FROM duckdb_columns() WHERE table_name = 'patient' AND schema_name = 'deid'").fetchall()]
    assert "birth_date" not in columns and "birth_year" in columns
    rows = deid_con.execute("SELECT birth_year, age_90_or_older, zip3 FROM deid.patient").fetchall()
    assert any(r[1] for r in rows), "the cohort should contain patients aged 90+"
    assert all(r[0] is None for r in rows if r[1])
    assert all(r[0] >= 1935 for r in rows if not r[1])  # anyone born earlier is 90+ by the end of 2025
    raw_zips = {p["address"][0]["postalCode"][:3] for p in read_resources(small_export, "Patient")}
    assert "036" in raw_zips or "059" in raw_zips or "203" in raw_zips
    zips = {r[2] for r in rows}
    assert "000" in zips and not zips & {"036", "059", "063", "102", "203", "556", "692", "790", "821", "823",
                                          "830", "831", "878", "879", "884", "890", "893"}


def test_notes_are_scrubbed_but_keep_their_clinical_meaning():
    con = duckdb.connect()
    text = ("03/14/2021 Seen: John Medhurst46, MRN 12345678, SSN 123-45-6789, phone (555) 010-4477, "
            "john.doe@example.org, lives at 12 Elm St, portal https://portal.example.org/p/1. "
            "Patient denies a history of hypertension. 93 year-old with BP 128/82.")
    (out,) = scrub_notes_sql(con, [text], [["John", "Medhurst46"]])
    for leaked in ["03/14/2021", "John", "Medhurst46", "12345678", "123-45-6789", "010-4477", "john.doe",
                   "12 Elm St", "portal.example.org", "93 year-old"]:
        assert leaked not in out
    assert "Patient denies a history of hypertension" in out
    assert "BP 128/82" in out and "[AGE_90_PLUS] year-old" in out


def test_leak_check_finds_a_planted_identifier_without_revealing_it(small_export):
    con = _deidentified_export(small_export)
    tables = [f"deid.{t}" for t in DEID_TABLES]
    assert find_identifier_leaks(con, tables, TEST_KEY) == []
    ssn = read_resources(small_export, "Patient")[3]["identifier"][1]["value"]
    con.execute("UPDATE deid.document_reference SET note_text = note_text || ' ssn ' || ? WHERE rowid = 0", [ssn])
    findings = find_identifier_leaks(con, tables, TEST_KEY)
    assert findings == [{"table": "deid.document_reference", "column": "note_text", "category": "identifier", "hits": 1}]
    assert ssn not in repr(findings)


def test_leak_check_matches_multi_word_identifiers_by_their_runs_whatever_the_separators(small_export):
    """"999 12 3456" is the SSN "999-12-3456" written otherwise; "999-12-34567" is another number."""
    con = _deidentified_export(small_export)
    tables = ["deid.document_reference"]
    ssn = read_resources(small_export, "Patient")[3]["identifier"][1]["value"]
    assert "-" in ssn
    con.execute("UPDATE deid.document_reference SET note_text = note_text || ' ref ' || ? WHERE rowid = 1",
                [ssn + "7"])
    assert find_identifier_leaks(con, tables, TEST_KEY) == []
    con.execute("UPDATE deid.document_reference SET note_text = note_text || ' (' || ? || ').' WHERE rowid = 2",
                [ssn.replace("-", " ")])
    assert find_identifier_leaks(con, tables, TEST_KEY) == [
        {"table": "deid.document_reference", "column": "note_text", "category": "identifier", "hits": 1}]


def test_one_word_columns_are_checked_like_texts_own_names_only_in_own_rows(small_export, monkeypatch):
    """Columns whose values are single words (keys, statuses) take a shortcut past tokenizing;
    it finds what the general scan finds: an identifier anywhere, a name only in its patient's rows."""
    import clinical_ml.deid as deid

    con = _deidentified_export(small_export)
    tables = [f"deid.{t}" for t in DEID_TABLES]
    patients = read_resources(small_export, "Patient")
    family = patients[5]["name"][0]["family"]
    mrn = next(i["value"] for i in patients[3]["identifier"] if i["value"].isalnum())
    own_key, other_key = (pseudonym(TEST_KEY, "Patient", p["id"]) for p in (patients[5], patients[6]))
    assert con.execute("SELECT count(*) FROM deid.encounter WHERE patient_key IN (?, ?)", [own_key, other_key]).fetchone()[0]
    con.execute("UPDATE deid.encounter SET status = ? WHERE patient_key = ?", [family.upper(), own_key])
    con.execute("UPDATE deid.encounter SET status = ? WHERE patient_key = ?", [family, other_key])  # not theirs
    con.execute("UPDATE deid.condition SET condition_key = ? WHERE rowid = 0", [mrn])
    shortcut = find_identifier_leaks(con, tables, TEST_KEY)
    own_rows = con.execute("SELECT count(DISTINCT status) FROM deid.encounter WHERE patient_key = ?", [own_key]).fetchone()[0]
    assert sorted((f["table"], f["column"], f["category"], f["hits"]) for f in shortcut) == [
        ("deid.condition", "condition_key", "identifier", 1), ("deid.encounter", "status", "name", own_rows)]
    monkeypatch.setattr(deid, "_leak_hits_of_runs", deid._leak_hits)  # the general scan
    assert find_identifier_leaks(con, tables, TEST_KEY) == shortcut


def test_missing_key_is_a_clear_error_without_key_material(monkeypatch):
    monkeypatch.delenv("DEID_SECRET_KEY", raising=False)
    monkeypatch.delenv("CLINICAL_DEMO_MODE", raising=False)
    with pytest.raises(MissingSecretKey, match="DEID_SECRET_KEY is not set"):
        DeidKey().key()
    monkeypatch.setenv("CLINICAL_DEMO_MODE", "1")
    assert DeidKey().key() and DeidKey().is_demo_key()
    monkeypatch.setenv("DEID_SECRET_KEY", "s3cr3t-x")
    with pytest.raises(MissingSecretKey) as err:
        DeidKey().key()
    assert "s3cr3t-x" not in str(err.value)


@pytest.mark.parametrize("sample", ["synthea-bulk-10p", "synthea-2019-40p"])
def test_real_synthea_samples_deidentify_with_no_leaks(sample):
    con = duckdb.connect()
    land_ndjson(con, shared_sample(sample))
    report = deidentify(con, TEST_KEY)
    assert report.rows_by_table["patient"] == con.execute("SELECT count(*) FROM raw.patient").fetchone()[0]
    if sample == "synthea-bulk-10p":
        assert report.rows_by_table["document_reference"] == 1215
    assert report.removed_by_category["names"] > 0 and report.removed_by_category["ssn"] > 0
    assert find_identifier_leaks(con, [f"deid.{t}" for t in DEID_TABLES], TEST_KEY) == []


def test_notes_scrubbed_in_several_owner_buckets_equal_one_bucket(monkeypatch):
    """Bucketing (bounded memory) changes nothing: each note is scrubbed of its own owner's
    identifiers whichever bucket it falls in."""
    import clinical_ml.deid as deid

    texts = [f"Seen by nurse. Patient Ann{i} Quist{i} called from 555-010-{1000 + i}; Ann{i} is well." for i in range(40)]
    owners = [[f"Ann{i} Quist{i}", f"555-010-{1000 + i}"] for i in range(40)]
    con = duckdb.connect()
    one_bucket = scrub_notes_sql(con, texts, owners)
    monkeypatch.setattr(deid, "NOTES_PER_SCRUB_BUCKET", 3)
    many_buckets = scrub_notes_sql(con, texts, owners)
    assert many_buckets == one_bucket
    assert all("Quist" not in t and "555-010" not in t and "Ann" not in t for t in many_buckets)
    assert all("nurse" in t for t in many_buckets)


def test_the_leak_check_in_patient_buckets_finds_what_one_pass_finds(small_export, monkeypatch):
    """Bounded memory (a column's texts scanned per bucket of patients) finds the same leaks,
    a patient's own name included (scoped to their rows, whichever bucket they fall in)."""
    import clinical_ml.deid as deid

    con = _deidentified_export(small_export)
    tables = [f"deid.{t}" for t in DEID_TABLES]
    patients = read_resources(small_export, "Patient")
    ssn = patients[3]["identifier"][1]["value"]
    family = patients[5]["name"][0]["family"]
    own_key = pseudonym(TEST_KEY, "Patient", patients[5]["id"])
    con.execute("UPDATE deid.document_reference SET note_text = note_text || ' ssn ' || ? WHERE rowid = 0", [ssn])
    con.execute("UPDATE deid.document_reference SET note_text = note_text || ' seen with ' || ? "
                "WHERE rowid = (SELECT min(rowid) FROM deid.document_reference WHERE patient_key = ?)", [family, own_key])
    one_pass = find_identifier_leaks(con, tables, TEST_KEY)
    monkeypatch.setattr(deid, "LEAK_SCAN_CHARS_PER_BUCKET", 20_000)  # buckets by text volume
    in_buckets = find_identifier_leaks(con, tables, TEST_KEY)
    assert sorted(map(str, in_buckets)) == sorted(map(str, one_pass))
    monkeypatch.setattr(deid, "LEAK_SCAN_CHARS_PER_BUCKET", 10**12)
    monkeypatch.setattr(deid, "LEAK_SCAN_PAIRS_PER_BUCKET", 500)  # ... and by (patient, value) pairs
    assert sorted(map(str, find_identifier_leaks(con, tables, TEST_KEY))) == sorted(map(str, one_pass))
    assert {(f["category"], f["hits"]) for f in one_pass if f["column"] == "note_text"} >= {("identifier", 1), ("name", 1)}


def test_scrubbing_redacts_exactly_the_identifier_whether_a_note_starts_with_a_word_or_a_separator():
    texts = ["Łukasz Müller-Kowalski, seen today.", "— Łukasz Müller-Kowalski, seen today.",
             "  (Łukasz) seen, then ŁUKASZ again."]
    owners = [["Łukasz Müller-Kowalski"], ["Łukasz Müller-Kowalski"], ["Łukasz"]]
    assert scrub_notes_sql(duckdb.connect(), texts, owners) == [
        "[REDACTED], seen today.", "— [REDACTED], seen today.", "  ([REDACTED]) seen, then [REDACTED] again."]


@pytest.mark.parametrize("reference, expected", [
    ("Patient/123", "123"), ("urn:uuid:abc-1", "abc-1"), ("https://ehr.example.org/fhir/Patient/7", "7"),
    ("Patient/1/_history/2", "1"), ("fhir2Patient/9", "9"), ("a1b/123", "123"),
    ("Patient/", None), ("Patient/1/", None), ("123", None), ("/1", None), ("Patient//1", None), ("#med1", None),
    ("Patient/1/_history/", None), ("x/Patient/1/_history/2/extra", None),
])
def test_reference_ids_resolve_for_every_reference_shape(reference, expected):
    con = duckdb.connect()
    register_macros(con)
    assert con.execute("SELECT ref_id(?::VARCHAR)", [reference]).fetchone()[0] == expected


@pytest.mark.parametrize("note, leaked", [
    ("Moved to Apt 12 Main Street last week.", "Main Street"), ("Unit 5 Maple Drive", "Maple Drive"),
    ("PO Box 14 Elm Road", "Elm Road"), ("Suite 200 Oak Avenue", "Oak Avenue"),
    ("Seen March 12/25/2020.", "25/2020"), ("Seen March 2020-01-05.", "01-05"),
])
def test_overlapping_address_and_date_forms_are_redacted_whole(note, leaked):
    (out,) = scrub_notes_sql(duckdb.connect(), [note])
    assert leaked not in out, out


@pytest.mark.parametrize("key_bytes", [1, 32, 64, 65, 200])
def test_sql_pseudonyms_are_hmac_sha256_for_keys_of_any_length(key_bytes):
    """The SQL function precomputes the key's HMAC pads; keys longer than a SHA-256 block are
    hashed first (RFC 2104). Whatever the key, SQL and Python pseudonyms agree."""
    import hashlib
    import hmac

    key = bytes(range(7, 7 + key_bytes)) if key_bytes < 200 else b"k" * key_bytes
    con = duckdb.connect()
    from clinical_ml.deid import register_functions
    register_functions(con, key, 365)
    ids = ["1", "ü-ß/x", "urn:uuid:0f9c", ""]
    got = [r[0] for r in con.execute("SELECT pseudonym('Patient', id) FROM unnest(?) AS t(id)", [ids]).fetchall()]
    assert got == [hmac.new(key, f"Patient/{i}".encode(), hashlib.sha256).hexdigest()[:24] for i in ids]
