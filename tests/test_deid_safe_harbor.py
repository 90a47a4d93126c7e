"""Safe Harbor de-identification over hand-made and property-generated Patient resources:
identifiers in any format, odd shapes, notes in every resource that carries them."""

from __future__ import annotations

import base64
import json
import re
from datetime import date, timedelta
from pathlib import Path

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinical_ml.deid import (DEID_TABLES, RESTRICTED_ZIP3, DeidentificationError, MissingSecretKey, date_shift_days,
                              deidentify, find_identifier_leaks, pseudonym, safe_error_message, scrub_notes_sql)
from clinical_ml.ingest import land_ndjson
from clinical_ml.synthetic import SYNTHETIC_TAG
from tests.conftest import TEST_KEY

REFERENCE = date(2026, 1, 1)
LEAK_TABLES = [f"deid.{t}" for t in DEID_TABLES]


def land(tmp: Path, resources: list[dict]) -> duckdb.DuckDBPyConnection:
    tmp.mkdir(parents=True, exist_ok=True)
    by_type: dict[str, list[dict]] = {}
    for resource in resources:
        by_type.setdefault(resource["resourceType"], []).append(resource)
    for rtype, items in by_type.items():
        (tmp / f"{rtype}.000.ndjson").write_text("\n".join(json.dumps(r) for r in items) + "\n")
    con = duckdb.connect()
    report = land_ndjson(con, tmp)
    assert report.quarantined == 0
    return con


def note(pid: str, doc_id: str, text: str) -> dict:
    return {"resourceType": "DocumentReference", "id": doc_id, "status": "current",
            "subject": {"reference": f"Patient/{pid}"}, "date": "2021-05-01T10:00:00Z",
            "content": [{"attachment": {"contentType": "text/plain",
                                        "data": base64.b64encode(text.encode()).decode()}}]}


def encounter(pid: str, eid: str, start: str, end: str) -> dict:
    return {"resourceType": "Encounter", "id": eid, "status": "finished", "class": {"code": "AMB"},
            "subject": {"reference": f"Patient/{pid}"}, "period": {"start": start, "end": end}}


def deid_text(con) -> str:
    """Every text value of every de-identified table (not reprs: a patient named "True" or
    "None" must not match a boolean or a NULL)."""
    return "\n".join(v for t in DEID_TABLES for row in con.execute(f"SELECT * FROM deid.{t}").fetchall()
                     for v in row if isinstance(v, str)).lower()


def test_accented_and_hyphenated_names_are_scrubbed_and_caught_by_the_leak_check(tmp_path):
    patient = {"resourceType": "Patient", "id": "p1", "birthDate": "1961-03-14",
               "name": [{"given": ["José", "Zoë"], "family": "Müller-Łukasz"}],
               "contact": [{"name": {"given": ["Ångström"], "family": "Ødegård"},
                            "telecom": [{"system": "phone", "value": "555-010-8888"}]}],
               "address": [{"line": ["12 Elm St"], "city": "Göteborg", "postalCode": "02139-4307", "state": "MA"}]}
    text = ("JOSÉ Zoë Müller-Łukasz, DOB 3/14/1961, lives in Göteborg; Müller came with Ødegård "
            "(call 555 010 8888). Denies hypertension.")
    con = land(tmp_path, [patient, note("p1", "d1", text)])
    deidentify(con, TEST_KEY, reference_date=REFERENCE)
    (scrubbed,) = con.execute("SELECT note_text FROM deid.document_reference").fetchone()
    for value in ["josé", "zoë", "müller", "łukasz", "ødegård", "göteborg", "1961", "8888"]:
        assert value not in scrubbed.lower()
    assert "Denies hypertension." in scrubbed
    assert find_identifier_leaks(con, LEAK_TABLES, TEST_KEY) == []
    # a planted accented name is found (RE2's ASCII \w would have cut "josé" into "jos")
    con.execute("UPDATE deid.document_reference SET note_text = note_text || ' seen with josé.'")
    assert [f["category"] for f in find_identifier_leaks(con, LEAK_TABLES, TEST_KEY)] == ["name"]


@pytest.mark.parametrize("category,planted", [
    ("name", "Ångström"), ("address", "Göteborg"), ("address", "02139-4307"), ("telecom", "555-010-8888"),
    ("resource_id", "px-4471"),
])
def test_leak_check_covers_contacts_city_full_zip_and_resource_ids(tmp_path, category, planted):
    patient = {"resourceType": "Patient", "id": "px-4471", "name": [{"family": "Doe"}],
               "contact": [{"name": {"given": ["Ångström"]}, "telecom": [{"system": "phone", "value": "555-010-8888"}]}],
               "address": [{"city": "Göteborg", "postalCode": "02139-4307"}]}
    con = land(tmp_path, [patient, note("px-4471", "d1", "routine visit")])
    deidentify(con, TEST_KEY, reference_date=REFERENCE)
    assert find_identifier_leaks(con, LEAK_TABLES, TEST_KEY) == []
    con.execute("UPDATE deid.document_reference SET note_text = note_text || ' ' || ?", [planted])
    findings = find_identifier_leaks(con, LEAK_TABLES, TEST_KEY)
    assert category in {f["category"] for f in findings}
    assert planted.lower() not in repr(findings).lower()


def test_one_word_columns_find_values_that_are_one_word_only_once_cut(tmp_path, monkeypatch):
    """"#QX77" and "Vasquez." are one run once punctuation is cut: in a column of single words
    (which skips tokenizing) they are found as the general scan finds them, in their owner's rows."""
    import clinical_ml.deid as deid

    patient = {"resourceType": "Patient", "id": "p1", "name": [{"family": "Vasquez.", "given": ["Quentin"]}],
               "identifier": [{"value": "#QX77"}]}
    con = land(tmp_path, [patient])
    own = pseudonym(TEST_KEY, "Patient", "p1")
    con.execute("CREATE TABLE main.t (patient_key VARCHAR, status VARCHAR)")
    con.execute("INSERT INTO main.t VALUES (?, 'QX77'), (?, 'Vasquez'), (?, 'finished'), ('someone-else', 'vasquez')",
                [own, own, own])
    shortcut = find_identifier_leaks(con, ["main.t"], TEST_KEY)
    assert sorted((f["category"], f["hits"]) for f in shortcut) == [("identifier", 1), ("name", 1)]
    monkeypatch.setattr(deid, "_leak_hits_of_runs", deid._leak_hits)  # the general scan
    assert find_identifier_leaks(con, ["main.t"], TEST_KEY) == shortcut


def test_malformed_patient_shapes_neither_raise_nor_hide_identifiers(tmp_path):
    odd = {"resourceType": "Patient", "id": "p1",
           "name": {"given": "Bartholomew", "family": "Quixley"},  # an object where FHIR has an array
           "identifier": "MRN-77001234",  # a string where FHIR has an array of objects
           "telecom": [5550101234, {"system": "email", "value": "bq@example.org"}],
           "address": {"line": "9 Oak Rd", "city": "Lowell", "postalCode": 18510},
           "birthDate": 19610314, "extension": "not-a-list", "contact": [None, "x"]}
    text = "Bartholomew Quixley (bq@example.org) MRN-77001234 at 9 Oak Rd, Lowell."
    con = land(tmp_path, [odd, note("p1", "d1", text)])
    deidentify(con, TEST_KEY, reference_date=REFERENCE)
    (scrubbed,) = con.execute("SELECT note_text FROM deid.document_reference").fetchone()
    for value in ["bartholomew", "quixley", "77001234", "oak rd", "lowell", "bq@"]:
        assert value not in scrubbed.lower()
    assert find_identifier_leaks(con, LEAK_TABLES, TEST_KEY) == []


def test_database_errors_are_reported_without_the_values_they_quote():
    con = duckdb.connect()
    with pytest.raises(duckdb.ConversionException) as err:
        con.execute("SELECT CAST('Quixley' AS INTEGER)")
    assert "Quixley" in str(err.value)  # DuckDB quotes the input …
    assert "Quixley" not in safe_error_message(err.value)  # … our message does not
    assert issubclass(DeidentificationError, RuntimeError)


def test_the_demo_key_is_refused_for_patients_not_made_by_the_generator(tmp_path):
    synthetic = {"resourceType": "Patient", "id": "s1", "meta": {"tag": [SYNTHETIC_TAG]}}
    real = {"resourceType": "Patient", "id": "r1", "name": [{"family": "Quixley"}]}
    con = land(tmp_path / "synthetic", [synthetic])
    deidentify(con, TEST_KEY, synthetic_only=True)  # generated data only: allowed
    con = land(tmp_path / "mixed", [synthetic, real])
    with pytest.raises(MissingSecretKey, match="1 landed patients did not come from the generator") as err:
        deidentify(con, TEST_KEY, synthetic_only=True)
    assert "Quixley" not in str(err.value)
    assert not con.execute("SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'deid'").fetchone()[0]


def test_ages_are_grouped_at_today_not_at_the_end_of_an_old_record(tmp_path):
    # 88 at the last encounter (2010) but 90+ today: the birth year would reveal an age over 89.
    patient = {"resourceType": "Patient", "id": "p1", "birthDate": "1922-06-01"}
    con = land(tmp_path, [patient, encounter("p1", "e1", "2010-01-01", "2010-01-02")])
    report = deidentify(con, TEST_KEY)
    assert report.reference_date >= str(date.today())
    assert con.execute("SELECT birth_year, age_90_or_older FROM deid.patient").fetchone() == (None, True)


def test_condition_and_observation_notes_are_kept_scrubbed(tmp_path):
    patient = {"resourceType": "Patient", "id": "p1", "name": [{"given": ["Quentin"], "family": "Vasquez"}]}
    condition = {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"},
                 "code": {"coding": [{"system": "http://snomed.info/sct", "code": "59621000"}]},
                 "note": [{"text": "Quentin reports home BP 150/95 on 04/02/2021; call 555-010-4477."}],
                 "identifier": {"value": "PROB-77"}}  # one object where FHIR has a list
    observation = {"resourceType": "Observation", "id": "o1", "status": "final", "subject": {"reference": "Patient/p1"},
                   "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                   "valueQuantity": {"value": 150}, "note": [{"text": "Vasquez measured after exercise"}],
                   "identifier": [{"value": "ACC-1"}, {"value": "ACC-2"}]}
    con = land(tmp_path, [patient, condition, observation])
    deidentify(con, TEST_KEY, reference_date=REFERENCE)
    rows = con.execute("SELECT source_type, source_key, patient_key, note_text FROM deid.annotation ORDER BY 1").fetchall()
    assert rows == [
        ("Condition", pseudonym(TEST_KEY, "Condition", "c1"), pseudonym(TEST_KEY, "Patient", "p1"),
         "[REDACTED] reports home BP 150/95 on [DATE]; call [PHONE]."),
        ("Observation", pseudonym(TEST_KEY, "Observation", "o1"), pseudonym(TEST_KEY, "Patient", "p1"),
         "[REDACTED] measured after exercise"),
    ]
    counts = dict(con.execute("SELECT category, removed FROM deid.removal_counts").fetchall())
    assert counts["note_redacted"] == 2 and counts["note_date"] == 1 and counts["note_phone"] == 1
    assert counts["other_identifiers"] == 3  # the condition's and the observation's identifiers, left behind


def test_notes_are_found_when_the_export_escapes_their_member_names(tmp_path):
    # JSON may spell any character of a member name as a \\u escape; such a note is still a note
    # (resources are only parsed when their text may hold a `note` or `identifier` member)
    patient = {"resourceType": "Patient", "id": "p1", "name": [{"given": ["Quentin"], "family": "Vasquez"}]}
    observation = {"resourceType": "Observation", "id": "o1", "status": "final", "subject": {"reference": "Patient/p1"},
                   "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                   "valueQuantity": {"value": 150}, "note": [{"text": "Vasquez measured after exercise"}],
                   "identifier": [{"value": "ACC-1"}]}
    escaped = json.dumps(observation).replace('"note"', '"n\\u006fte"').replace('"identifier"', '"identifie\\u0072"')
    assert '"note"' not in escaped and json.loads(escaped) == observation
    con = land(tmp_path, [patient])
    (tmp_path / "Observation.000.ndjson").write_text(escaped + "\n")
    land_ndjson(con, tmp_path)
    deidentify(con, TEST_KEY, reference_date=REFERENCE)
    assert con.execute("SELECT note_text FROM deid.annotation").fetchall() == [("[REDACTED] measured after exercise",)]
    counts = dict(con.execute("SELECT category, removed FROM deid.removal_counts").fetchall())
    assert counts["other_identifiers"] == 1


def test_dates_can_be_generalized_to_the_year_instead(tmp_path):
    patient = {"resourceType": "Patient", "id": "p1", "birthDate": "1970-02-03"}
    con = land(tmp_path, [patient, encounter("p1", "e1", "2021-05-17T08:00:00Z", "2021-05-19T08:00:00Z")])
    deidentify(con, TEST_KEY, date_mode="year", reference_date=REFERENCE)
    assert con.execute("SELECT start_date, end_date FROM deid.encounter").fetchone() == (date(2021, 1, 1), date(2021, 1, 1))
    with pytest.raises(ValueError):
        deidentify(con, TEST_KEY, date_mode="month")


def test_removal_counts_name_every_safe_harbor_category(tmp_path):
    patient = {"resourceType": "Patient", "id": "p1", "birthDate": "1930-01-01",
               "name": [{"family": "Doe"}], "photo": [{"contentType": "image/png", "data": "AAAA"}],
               "identifier": [
                   {"type": {"coding": [{"code": "SS"}]}, "value": "999-12-3456"},
                   {"type": {"coding": [{"code": "MR"}]}, "value": "MRN-1"},
                   {"type": {"coding": [{"code": "DL"}]}, "value": "S99912345"},
                   {"type": {"coding": [{"code": "MB"}]}, "value": "PLAN-9"},
                   {"value": "other-1"}],
               "telecom": [{"system": "phone", "value": "555-010-1111"}, {"system": "fax", "value": "555-010-2222"},
                           {"system": "email", "value": "a@b.org"}, {"system": "url", "value": "https://x.org/a"}],
               "address": [{"line": ["1 Main St"], "postalCode": "03601"}], "text": {"div": "<div>Doe</div>"}}
    device = {"resourceType": "Device", "id": "dev1", "serialNumber": "SN-1", "patient": {"reference": "Patient/p1"}}
    con = land(tmp_path, [patient, device, encounter("p1", "e1", "2020-01-01", "2020-01-02")])
    report = deidentify(con, TEST_KEY, reference_date=REFERENCE)
    counts = report.removed_by_category
    for category, expected in {"names": 1, "ssn": 1, "medical_record_number": 1, "license_number": 1,
                               "health_plan_number": 1, "other_identifiers": 1, "telephone_numbers": 1,
                               "fax_numbers": 1, "email_addresses": 1, "urls": 1, "photos": 1,
                               "geographic_subdivisions": 1, "device_identifiers": 1, "narratives_removed": 1,
                               "restricted_zip3_to_000": 1, "ages_90_plus_grouped": 1}.items():
        assert counts[category] == expected, category
    assert counts["dates"] >= 3  # birth date, encounter start and end
    assert report.resource_types_left_behind == ["device"]
    stored = dict(con.execute("SELECT category, removed FROM deid.removal_counts").fetchall())
    assert stored == counts


# --- property-based: random identifier formats ------------------------------------------------

LETTERS = "abcdefghijklmnopqrstuvwxyzáéíóúñçøåäöüłßžščęőű"
name_part = st.text(alphabet=LETTERS, min_size=3, max_size=9).map(str.capitalize)
digits = lambda n: st.text(alphabet="0123456789", min_size=n, max_size=n)  # noqa: E731
ssn = st.tuples(digits(3), digits(2), digits(4), st.sampled_from(["-", " ", ""])).map(lambda t: t[3].join(t[:3]))
phone = st.tuples(digits(3), digits(4), st.sampled_from(["({a}) 010-{b}", "{a}-010-{b}", "{a}.010.{b}", "+1 {a} 010 {b}"])
                  ).map(lambda t: t[2].format(a=t[0], b=t[1]))
mrn = st.tuples(st.sampled_from(["", "MRN", "A", "HX-"]), digits(7)).map("".join)
licence = st.tuples(st.sampled_from("ABCDSZ"), digits(8)).map("".join)
birth = st.dates(min_value=date(1915, 1, 1), max_value=date(2010, 12, 31))
zip_code = st.one_of(st.sampled_from(RESTRICTED_ZIP3), digits(3)).flatmap(lambda z: digits(2).map(lambda d: z + d))
date_formats = ["{d:%Y-%m-%d}", "{d.month}/{d.day}/{d.year}", "{d:%m/%d/%Y}", "{d:%B} {d.day}, {d.year}"]

patient_strategy = st.fixed_dictionaries({
    "given": name_part, "family": name_part, "contact": name_part, "ssn": ssn, "phone": phone, "mrn": mrn,
    "licence": licence, "birth": birth, "zip": zip_code, "street": name_part, "house": digits(3),
    "city": name_part, "email_user": st.text(alphabet="abcdefghij", min_size=4, max_size=8),
    "date_format": st.sampled_from(date_formats), "first_visit": st.dates(min_value=date(2015, 1, 1), max_value=date(2022, 1, 1)),
    "gap_days": st.integers(min_value=1, max_value=900), "stay_days": st.integers(min_value=0, max_value=20),
})


def _patient_resources(i: int, p: dict) -> list[dict]:
    pid = f"pt-{i}"
    email = f"{p['email_user']}{i}@example.org"
    resource = {
        "resourceType": "Patient", "id": pid, "birthDate": p["birth"].isoformat(),
        "name": [{"given": [p["given"]], "family": p["family"]}],
        "identifier": [{"type": {"coding": [{"code": "SS"}]}, "value": p["ssn"]},
                       {"type": {"coding": [{"code": "MR"}]}, "value": p["mrn"]},
                       {"type": {"coding": [{"code": "DL"}]}, "value": p["licence"]}],
        "telecom": [{"system": "phone", "value": p["phone"]}, {"system": "email", "value": email}],
        "address": [{"line": [f"{p['house']} {p['street']} Street"], "city": p["city"], "postalCode": p["zip"],
                     "state": "MA"}],
        "contact": [{"name": {"given": [p["contact"]]}}],
    }
    first = p["first_visit"]
    second = first + timedelta(days=p["gap_days"])
    encounters = [encounter(pid, f"{pid}-e{k}", d.isoformat(), (d + timedelta(days=p["stay_days"])).isoformat())
                  for k, d in enumerate([first, second])]
    dob = p["date_format"].format(d=p["birth"])
    text = (f"{p['given']} {p['family']} (DOB {dob}, MRN {p['mrn']}, SSN {p['ssn']}, DL {p['licence']}) "
            f"seen with {p['contact']}. Lives at {p['house']} {p['street']} Street, {p['city']} {p['zip']}. "
            f"Phone {p['phone']}, e-mail {email}. Denies hypertension.")
    return [resource, *encounters, note(pid, f"{pid}-d", text)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(patients=st.lists(patient_strategy, min_size=1, max_size=4))
def test_property_nothing_of_the_original_identifiers_survives(tmp_path_factory, patients):
    resources = [r for i, p in enumerate(patients) for r in _patient_resources(i, p)]
    con = land(tmp_path_factory.mktemp("prop"), resources)
    deidentify(con, TEST_KEY, reference_date=REFERENCE)

    assert find_identifier_leaks(con, LEAK_TABLES, TEST_KEY) == []
    text = deid_text(con)
    words = set(re.findall(r"[^\W_]+", text))  # Unicode letter/digit runs, as in the leak check
    for i, p in enumerate(patients):
        for name in [p["given"], p["family"], p["contact"], p["city"]]:
            assert name.lower() not in words
        # a street's name alone is no identifier (it may be a word of the note, "Ssn"); its line is
        for value in [p["ssn"], p["mrn"], p["licence"], p["phone"], f"{p['email_user']}{i}@", p["birth"].isoformat(),
                      f"pt-{i}", f"{p['house']} {p['street']}"]:
            assert value.lower() not in text

        key = pseudonym(TEST_KEY, "Patient", f"pt-{i}")
        birth_year, aged_90, zip3 = con.execute(
            "SELECT birth_year, age_90_or_older, zip3 FROM deid.patient WHERE patient_key = ?", [key]).fetchone()
        age = REFERENCE.year - p["birth"].year - ((REFERENCE.month, REFERENCE.day) < (p["birth"].month, p["birth"].day))
        assert (birth_year, aged_90) == ((None, True) if age >= 90 else (p["birth"].year, False))
        assert zip3 == ("000" if p["zip"][:3] in RESTRICTED_ZIP3 else p["zip"][:3])

        # pseudonyms link every resource to its patient; dates move by the patient's offset, intervals kept
        rows = con.execute("SELECT start_date, end_date FROM deid.encounter WHERE patient_key = ? ORDER BY start_date",
                           [key]).fetchall()
        assert len(rows) == 2
        offset = timedelta(days=date_shift_days(TEST_KEY, f"pt-{i}", 365))
        assert rows[0][0] == p["first_visit"] + offset
        assert (rows[1][0] - rows[0][0]).days == p["gap_days"]
        assert all((end - start).days == p["stay_days"] for start, end in rows)
        assert con.execute("SELECT count(*) FROM deid.document_reference WHERE patient_key = ?", [key]).fetchone()[0] == 1
    (kept,) = con.execute("SELECT count(*) FROM deid.document_reference WHERE note_text LIKE '%Denies hypertension.'").fetchone()
    assert kept == len(patients)
