"""What real EHR exports send that our generator does not: drugs named by reference, plain-word
encounter classes, honorifics in names, patients whose names are common words."""

from __future__ import annotations

from clinical_ml.codes import RXNORM_SYSTEM
from clinical_ml.deid import deidentify, find_identifier_leaks, pseudonym
from clinical_ml.features import FeatureSpec, build_feature_matrix
from tests.conftest import TEST_KEY
from tests.test_deid_safe_harbor import LEAK_TABLES, REFERENCE, encounter, land, note

NDC = "http://hl7.org/fhir/sid/ndc"


def patient(pid: str, given: str, family: str, prefix: str = "Mr.", **extra) -> dict:
    return {"resourceType": "Patient", "id": pid, "gender": "male", "birthDate": "1960-02-03",
            "name": [{"prefix": [prefix], "given": [given], "family": family, "suffix": ["Jr."]}], **extra}


def request(rid: str, pid: str, **drug) -> dict:
    return {"resourceType": "MedicationRequest", "id": rid, "status": "active", "intent": "order",
            "subject": {"reference": f"Patient/{pid}"}, "authoredOn": "2019-03-01", **drug}


def coding(system: str, code: str) -> dict:
    return {"coding": [{"system": system, "code": code}]}


def test_medication_references_resolve_to_the_drug_code(tmp_path):
    resources = [
        patient("p1", "Arlo", "Quenby"),
        {"resourceType": "Medication", "id": "m-statin", "code": coding(RXNORM_SYSTEM, "259255")},
        {"resourceType": "Medication", "id": "m-uncoded", "status": "active"},
        request("r-inline", "p1", medicationCodeableConcept={
            "coding": [{"system": NDC, "code": "0071-0155-23"}, {"system": RXNORM_SYSTEM, "code": "314231"}]}),
        request("r-ref", "p1", medicationReference={"reference": "Medication/m-statin"}),
        request("r-contained", "p1", contained=[{"resourceType": "Medication", "id": "med1",
                                                 "code": coding(RXNORM_SYSTEM, "617312")}],
                medicationReference={"reference": "#med1"}),
        request("r-ndc-only", "p1", medicationCodeableConcept=coding(NDC, "0093-7146-56")),
        request("r-dangling", "p1", medicationReference={"reference": "Medication/not-landed"}),
        request("r-uncoded", "p1", medicationReference={"reference": "Medication/m-uncoded"}),
    ]
    con = land(tmp_path, resources)
    report = deidentify(con, TEST_KEY, reference_date=REFERENCE)
    rows = {key: rest for key, *rest in con.execute(
        "SELECT medication_request_key, rxnorm_code, medication_code, medication_system, medication_source "
        "FROM deid.medication_request").fetchall()}
    by_id = {rid: rows[pseudonym(TEST_KEY, "MedicationRequest", rid)] for rid in
             ("r-inline", "r-ref", "r-contained", "r-ndc-only", "r-dangling", "r-uncoded")}
    assert by_id["r-inline"] == ["314231", "314231", RXNORM_SYSTEM, "inline"]  # RxNorm preferred over NDC
    assert by_id["r-ref"] == ["259255", "259255", RXNORM_SYSTEM, "reference"]
    assert by_id["r-contained"] == ["617312", "617312", RXNORM_SYSTEM, "contained"]
    assert by_id["r-ndc-only"] == [None, "0093-7146-56", NDC, "inline"]
    assert by_id["r-dangling"] == [None, None, None, "reference"]
    # a dangling or uncoded reference is counted, not fatal
    assert report.medication_references_unresolved == 2
    assert report.medications_by_source == {"contained": 1, "inline": 2, "reference": 3}
    assert "medication" not in report.resource_types_left_behind


def test_medication_features_use_the_resolved_code(tmp_path):
    resources = [patient("p1", "Arlo", "Quenby"),
                 {"resourceType": "Medication", "id": "m-statin", "code": coding(RXNORM_SYSTEM, "259255")},
                 request("r1", "p1", medicationReference={"reference": "Medication/m-statin"}),
                 encounter("p1", "e1", "2018-01-01", "2018-01-01"), encounter("p1", "e2", "2023-06-01", "2023-06-01")]
    con = land(tmp_path, resources)
    deidentify(con, TEST_KEY, reference_date=REFERENCE)
    shifted_request = con.execute("SELECT authored_date FROM deid.medication_request").fetchone()[0]
    landmark = shifted_request.replace(year=shifted_request.year + 1, day=1)
    frame = build_feature_matrix(con, FeatureSpec(landmarks=(landmark,)))
    assert frame.select("on_statin", "n_distinct_medications").row(0) == (1, 1)


def test_plain_word_encounter_classes_are_recognised(tmp_path):
    def visit(eid, klass, system=None):
        e = encounter("p1", eid, "2019-01-01", "2019-01-02")
        e["class"] = {"code": klass, **({"system": system} if system else {})}
        return e

    con = land(tmp_path, [patient("p1", "Arlo", "Quenby"), visit("e1", "emergency"), visit("e2", "inpatient"),
                          visit("e3", "ambulatory"), visit("e4", "EMER", "http://terminology.hl7.org/CodeSystem/v3-ActCode"),
                          visit("e5", "daytime"), {**encounter("p1", "e6", "2019-01-01", "2019-01-02"), "class": "inpatient"}])
    deidentify(con, TEST_KEY, reference_date=REFERENCE)
    got = dict(con.execute("SELECT encounter_class_source, encounter_class FROM deid.encounter").fetchall())
    assert got == {"emergency": "EMER", "inpatient": "IMP", "ambulatory": "AMB", "EMER": "EMER", "daytime": "UNK"}
    assert con.execute("SELECT count(*) FROM deid.encounter WHERE encounter_class = 'IMP'").fetchone()[0] == 2


def test_leak_check_blocks_on_identifiers_only(tmp_path):
    """Honorifics and a common-word first name in another patient's note are not leaks; a full
    name of another patient still is; the patient's own first name in their own note is scrubbed."""
    will = patient("p-will", "Will", "Harkness")
    hope = patient("p-hope", "Hope", "Vantongeren", prefix="Mrs.")
    notes = [
        note("p-will", "d1", "Mr. Harkness seen today. Will return in 3 months; we hope BP improves. Denies hypertension."),
        note("p-hope", "d2", "Mrs. Vantongeren, Jr. clinic. Will follow up. MD reviewed."),
    ]
    con = land(tmp_path, [will, hope, *notes])
    deidentify(con, TEST_KEY, reference_date=REFERENCE)
    texts = dict(con.execute("SELECT patient_key, note_text FROM deid.document_reference").fetchall())
    own = texts[pseudonym(TEST_KEY, "Patient", "p-will")]
    assert "Harkness" not in own and "Will return" not in own  # the patient's own first name is scrubbed there
    other = texts[pseudonym(TEST_KEY, "Patient", "p-hope")]
    assert "Will follow up" in other and "Jr. clinic" in other and "MD reviewed" in other  # honorifics are text
    assert find_identifier_leaks(con, LEAK_TABLES, TEST_KEY) == []
    # an honorific or degree, even in the patient's own row, is no identifier
    con.execute("UPDATE deid.document_reference SET note_text = 'Mr. [NAME] seen; Jr. resident and MD present.' "
                "WHERE patient_key = ?", [pseudonym(TEST_KEY, "Patient", "p-will")])
    assert find_identifier_leaks(con, LEAK_TABLES, TEST_KEY) == []

    # the other patient's full name in a note is a leak, in any table that holds text
    con.execute("UPDATE deid.document_reference SET note_text = note_text || ' Seen with Will Harkness.' "
                "WHERE patient_key = ?", [pseudonym(TEST_KEY, "Patient", "p-hope")])
    findings = find_identifier_leaks(con, LEAK_TABLES, TEST_KEY)
    assert findings == [{"table": "deid.document_reference", "column": "note_text", "category": "name", "hits": 1}]
    # and a single name token of a patient in their own row is one too
    con.execute("UPDATE deid.document_reference SET note_text = 'Seen: harkness' WHERE patient_key = ?",
                [pseudonym(TEST_KEY, "Patient", "p-will")])
    assert {f["category"] for f in find_identifier_leaks(con, LEAK_TABLES, TEST_KEY)} == {"name"}
    assert sum(f["hits"] for f in find_identifier_leaks(con, LEAK_TABLES, TEST_KEY)) == 2


def test_a_table_without_patient_key_is_checked_for_unique_values(tmp_path):
    con = land(tmp_path, [patient("p-will", "Will", "Harkness", telecom=[{"system": "phone", "value": "555-010-4477"}])])
    deidentify(con, TEST_KEY, reference_date=REFERENCE)
    con.execute("CREATE SCHEMA ml; CREATE TABLE ml.notes AS SELECT 'Will do. harkness' AS t UNION ALL SELECT 'call 555-010-4477'")
    assert find_identifier_leaks(con, ["ml.notes"], TEST_KEY) == [
        {"table": "ml.notes", "column": "t", "category": "telecom", "hits": 1}]


def test_a_name_written_only_as_text_is_a_full_name_everywhere(tmp_path):
    texted = {"resourceType": "Patient", "id": "p-text", "name": [{"text": "Zebulon Quixote"}],
              "contact": [{"name": {"text": "Marisol Quintanilla"}}]}
    other = patient("p-other", "Hope", "Varga")
    con = land(tmp_path, [texted, other, note("p-other", "d1", "Routine visit.")])
    deidentify(con, TEST_KEY, reference_date=REFERENCE)
    assert find_identifier_leaks(con, LEAK_TABLES, TEST_KEY) == []
    for planted in ("Seen with Zebulon Quixote.", "Seen with Marisol Quintanilla."):
        con.execute("UPDATE deid.document_reference SET note_text = ?", [planted])
        assert [f["category"] for f in find_identifier_leaks(con, LEAK_TABLES, TEST_KEY)] == ["name"]


def test_the_leak_check_refuses_a_key_that_does_not_match_the_tables(tmp_path):
    import pytest

    from clinical_ml.deid import DeidentificationError

    con = land(tmp_path, [patient("p-will", "Will", "Harkness"), note("p-will", "d1", "Routine visit.")])
    deidentify(con, TEST_KEY, reference_date=REFERENCE)
    with pytest.raises(DeidentificationError, match="key the tables were de-identified with"):
        find_identifier_leaks(con, LEAK_TABLES, b"another-key-0123456789abcdef")


def observation(oid: str, **fields) -> dict:
    return {"resourceType": "Observation", "id": oid, "status": "final", "subject": {"reference": "Patient/p1"},
            "effectiveDateTime": "2019-05-06", **fields}


def test_observation_values_and_components_survive_odd_shapes(tmp_path):
    loinc = "http://loinc.org"
    resources = [
        patient("p1", "Arlo", "Quenby"),
        # LOINC preferred over a local code listed first; a numeric value sent as a string
        observation("o-local-first", code={"coding": [{"system": "urn:local", "code": "BP-S"},
                                                      {"system": loinc, "code": "8480-6"}]},
                    valueQuantity={"value": "131", "unit": "mm[Hg]"}),
        # one component sent as an object instead of a list, and a panel with a coded component
        observation("o-lone-component", code=coding(loinc, "85354-9"),
                    component={"code": coding(loinc, "8462-4"), "valueQuantity": {"value": 84}}),
        observation("o-panel", code=coding(loinc, "72166-2"),
                    component=[{"code": coding(loinc, "8480-6"), "valueQuantity": {"value": 142.5}},
                               {"code": coding(loinc, "72166-2"), "valueCodeableConcept": coding("urn:snomed", "8517006")}]),
        # a coding object where FHIR has a list, a value that is not a number, a date only in `issued`
        observation("o-odd", code={"coding": {"system": loinc, "code": "2339-0"}}, valueQuantity={"value": [1]},
                    effectiveDateTime=None, issued="2020-01-02T03:04:05Z"),
        # FHIR JSON has no nulls: a null value, or a component that is not an object, measures nothing
        observation("o-null-value", code=coding(loinc, "8480-6"), valueQuantity=None),
        observation("o-scalar-component", code=coding(loinc, "85354-9"), component="n/a"),
    ]
    con = land(tmp_path, resources)
    deidentify(con, TEST_KEY, reference_date=REFERENCE)
    rows = sorted(con.execute("SELECT code, value_num, unit, value_code, effective_date IS NOT NULL "
                              "FROM deid.observation").fetchall(), key=str)
    assert rows == sorted([("8480-6", 131.0, "mm[Hg]", None, True),
                           ("8462-4", 84.0, None, None, True),
                           ("8480-6", 142.5, None, None, True),
                           ("72166-2", None, None, "8517006", True),
                           (None, None, None, None, True)], key=str)


def test_condition_statuses_are_read_as_r4_concepts_and_as_stu3_codes(tmp_path):
    # STU3 (and DSTU2) servers send Condition.clinicalStatus / verificationStatus as plain codes;
    # a refuted diagnosis must stay recognisable whichever version sent it
    def condition(cid: str, **status) -> dict:
        return {"resourceType": "Condition", "id": cid, "subject": {"reference": "Patient/p1"},
                "code": coding("http://snomed.info/sct", "59621000"), "onsetDateTime": "2019-01-01", **status}

    ver = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
    con = land(tmp_path, [
        patient("p1", "Arlo", "Quenby"),
        condition("c-r4", clinicalStatus=coding("http://terminology.hl7.org/CodeSystem/condition-clinical", "active"),
                  verificationStatus=coding(ver, "refuted")),
        condition("c-stu3", clinicalStatus="resolved", verificationStatus="refuted"),
        condition("c-none"),
    ])
    deidentify(con, TEST_KEY, reference_date=REFERENCE)
    rows = con.execute("SELECT condition_key, clinical_status, verification_status FROM deid.condition").fetchall()
    assert sorted(rows, key=str) == sorted([(pseudonym(TEST_KEY, "Condition", "c-r4"), "active", "refuted"),
                                            (pseudonym(TEST_KEY, "Condition", "c-stu3"), "resolved", "refuted"),
                                            (pseudonym(TEST_KEY, "Condition", "c-none"), None, None)], key=str)
