import hashlib

from clinical_ml.synthetic import CohortSpec, generate_patient, write_bulk_export
from tests.conftest import read_resources


def _digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.ndjson"))}


def test_same_seed_gives_byte_identical_export(tmp_path):
    a = write_bulk_export(tmp_path / "a", CohortSpec(n_patients=30, seed=5)).directory
    b = write_bulk_export(tmp_path / "b", CohortSpec(n_patients=30, seed=5)).directory
    c = write_bulk_export(tmp_path / "c", CohortSpec(n_patients=30, seed=6)).directory
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_a_patient_does_not_depend_on_cohort_size():
    assert generate_patient(CohortSpec(n_patients=10, seed=3), 4) == generate_patient(CohortSpec(n_patients=999, seed=3), 4)


def test_export_is_bulk_shaped_with_phi_to_remove(small_export):
    names = sorted(p.name for p in small_export.iterdir())
    assert names == ["Condition.000.ndjson", "DocumentReference.000.ndjson", "Encounter.000.ndjson",
                     "MedicationRequest.000.ndjson", "Observation.000.ndjson", "Patient.000.ndjson"]
    patients = read_resources(small_export, "Patient")
    assert len(patients) == 400
    p = patients[0]
    assert {i["type"]["coding"][0]["code"] for i in p["identifier"]} == {"MR", "SS", "DL"}
    assert p["name"][0]["family"] and p["telecom"][0]["value"] and p["address"][0]["postalCode"]
    assert any(x.get("deceasedDateTime") for x in patients)
    observations = read_resources(small_export, "Observation")
    bp = [o for o in observations if o["code"]["coding"][0]["code"] == "85354-9"]
    assert bp and {c["code"]["coding"][0]["code"] for c in bp[0]["component"]} == {"8480-6", "8462-4"}
    conditions = read_resources(small_export, "Condition")
    htn = [c for c in conditions if c["code"]["coding"][0]["code"] in ("59621000", "38341003")]
    assert 0.1 < len({c["subject"]["reference"] for c in htn}) / 400 < 0.7


def test_drift_option_shifts_blood_pressure_and_age():
    def mean_systolic_and_age(drift):
        sbp, ages = [], []
        for i in range(150):
            out = generate_patient(CohortSpec(seed=9, drift=drift), i)
            ages.append(2022 - int(out["Patient"][0]["birthDate"][:4]))
            sbp += [c["valueQuantity"]["value"] for o in out["Observation"] for c in o.get("component", [])
                    if c["code"]["coding"][0]["code"] == "8480-6"]
        return sum(sbp) / len(sbp), sum(ages) / len(ages)

    base_sbp, base_age = mean_systolic_and_age(False)
    drift_sbp, drift_age = mean_systolic_and_age(True)
    assert drift_sbp - base_sbp > 8
    assert drift_age - base_age > 5
