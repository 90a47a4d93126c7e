"""Deterministic synthetic FHIR R4 Bulk Data export, shaped like Synthea output.

Each patient gets a latent blood-pressure propensity and risk factors (age, BMI, family history,
diabetes, CKD, smoking) that drive hypertension onset with noise. Blood pressure rises in the
years before diagnosis, so a model can learn real signal from data recorded before an index date
without the task being trivially perfect.

Every patient draws from its own ``random.Random`` seeded by ``(seed, patient number)``: patient
*i* is the same whatever the cohort size, and the whole export is byte-identical for a seed.

The output carries realistic PHI on purpose (names with digits, SSN, MRN, driver's licence,
phone, e-mail, street address with lat/long, mother's maiden name, names inside
``Encounter.subject.display`` and inside note text) so that de-identification is exercised.
"""

from __future__ import annotations

import base64
import math
import random
import uuid
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import orjson

from clinical_ml.ingest import CORE_RESOURCE_TYPES

# Marks every generated Patient, so the published demo de-id key can be refused for real data.
SYNTHETIC_TAG = {"system": "urn:clinical-ml-platform:source", "code": "synthetic"}
US_CORE = "http://hl7.org/fhir/us/core/StructureDefinition"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"

# Resource types written, one file each: the ones every downstream stage reads.
RESOURCE_TYPES = CORE_RESOURCE_TYPES

# (SNOMED code, display, ICD-10 code) for the conditions the generator produces.
CONDITIONS = {
    "hypertension": ("59621000", "Essential hypertension (disorder)", "I10"),
    "hypertension_alt": ("38341003", "Hypertensive disorder, systemic arterial (disorder)", "I10"),
    "diabetes": ("44054006", "Diabetes mellitus type 2 (disorder)", "E11.9"),
    "prediabetes": ("15777000", "Prediabetes (finding)", "R73.03"),
    "ckd": ("433144002", "Chronic kidney disease stage 3 (disorder)", "N18.30"),
    "obesity": ("162864005", "Body mass index 30+ - obesity (finding)", "E66.9"),
    "hyperlipidemia": ("55822004", "Hyperlipidemia (disorder)", "E78.5"),
}

# RxNorm (code, display) per indication.
MEDICATIONS = {
    "hypertension": [
        ("314076", "lisinopril 10 MG Oral Tablet"),
        ("197361", "amlodipine 5 MG Oral Tablet"),
        ("310798", "Hydrochlorothiazide 25 MG Oral Tablet"),
    ],
    "diabetes": [("860975", "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet")],
    "hyperlipidemia": [("259255", "atorvastatin 80 MG Oral Tablet")],
}

SMOKING_STATUS = {
    "current": ("449868002", "Smokes tobacco daily (finding)"),
    "former": ("8517006", "Ex-smoker (finding)"),
    "never": ("266919005", "Never smoked tobacco (finding)"),
}

GIVEN_FEMALE = ["Jane", "Maria", "Linda", "Aisha", "Mei", "Olivia", "Rosa", "Fatima", "Grace", "Ingrid"]
GIVEN_MALE = ["John", "Carlos", "Wei", "Ahmed", "James", "Luis", "Kwame", "Pavel", "Omar", "Henry"]
FAMILY = ["Medhurst", "Okafor", "Nguyen", "Garcia", "Schmidt", "Kowalski", "Haddad", "Smith",
          "Johansson", "Tanaka", "Ramirez", "O'Brien", "VonRueden", "Kunze", "Abernathy"]
STREETS = ["Elm St", "Main Street", "Oak Avenue", "Maple Rd", "Harbor Blvd", "Cedar Lane", "Pine Way"]
# (city, state, zip): a mix that includes 3-digit prefixes Safe Harbor restricts (036, 059, 102,
# 203, 556, 692, 790, 821, 823, 830, 831, 878, 879, 884, 890, 893).
PLACES = [
    ("Boston", "MA", "02115"), ("Worcester", "MA", "01608"), ("Springfield", "MA", "01103"),
    ("Lebanon", "NH", "03603"), ("Newport", "VT", "05901"), ("New York", "NY", "10251"),
    ("Washington", "DC", "20310"), ("Tofte", "MN", "55615"), ("Valentine", "NE", "69201"),
    ("Amarillo", "TX", "79015"), ("Rock Springs", "WY", "82101"), ("Laramie", "WY", "83001"),
    ("Truth or Consequences", "NM", "87901"), ("Las Vegas", "NV", "89001"), ("Elko", "NV", "89301"),
    ("Chicago", "IL", "60611"), ("Atlanta", "GA", "30301"), ("Seattle", "WA", "98101"),
    ("Denver", "CO", "80202"), ("Houston", "TX", "77002"),
]
RACES = [  # (OMB code, display, weight)
    ("2106-3", "White", 0.62), ("2054-5", "Black or African American", 0.14),
    ("2028-9", "Asian", 0.07), ("1002-5", "American Indian or Alaska Native", 0.02),
    ("2131-1", "Other Race", 0.15),
]
PRACTITIONERS = ["Dr. Liane379 Kunze215", "Dr. Omar44 Haddad12", "Dr. Grace7 Tanaka91"]

DATA_START = date(2015, 1, 1)
DATA_END = date(2025, 12, 31)
AGE_ANCHOR = date(2022, 1, 1)  # ages are drawn as of this date


@dataclass(frozen=True)
class CohortSpec:
    """What to generate. ``drift`` shifts distributions the way production data does."""

    n_patients: int = 1000
    seed: int = 42
    drift: bool = False
    # Drift settings: a new BP device that reads high, and an older, heavier population.
    drift_systolic_offset: float = 8.0
    drift_diastolic_offset: float = 5.0
    drift_age_years: float = 8.0
    drift_bmi: float = 1.5


@dataclass
class ExportSummary:
    directory: Path
    files: dict[str, Path]
    counts: dict[str, int]


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _ts(d: date, rng: random.Random) -> str:
    return f"{d.isoformat()}T{rng.randint(7, 18):02d}:{rng.randint(0, 59):02d}:00-05:00"


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _coding(system: str, code: str, display: str) -> dict:
    return {"system": system, "code": code, "display": display}


def _quantity(value: float, unit: str) -> dict:
    return {"value": round(value, 1), "unit": unit, "system": UCUM, "code": unit}


class _PatientWriter:
    """Builds one patient's resources. Kept as a class so the per-resource helpers share state."""

    def __init__(self, spec: CohortSpec, index: int):
        self.spec = spec
        self.rng = random.Random(spec.seed * 1_000_003 + index)
        self.out: dict[str, list[dict]] = {t: [] for t in RESOURCE_TYPES}

    # -- patient-level draws -------------------------------------------------------------
    def build(self) -> dict[str, list[dict]]:
        rng, spec = self.rng, self.spec
        self.pid = _uuid(rng)
        female = rng.random() < 0.51
        age = 18 + rng.betavariate(1.5, 1.9) * 80 + (spec.drift_age_years if spec.drift else 0.0)
        age = min(age, 102.0)
        birth = AGE_ANCHOR - timedelta(days=int(age * 365.25))
        race = rng.choices(RACES, weights=[r[2] for r in RACES])[0]
        hispanic = rng.random() < 0.18
        bmi = min(max(rng.gauss(27.5, 5.0) + (spec.drift_bmi if spec.drift else 0.0), 16.0), 55.0)
        smoking = rng.choices(["current", "former", "never"], weights=[0.15, 0.2, 0.65])[0]
        family_htn = rng.random() < 0.3
        bp_latent = rng.gauss(0.0, 1.0)  # unobserved propensity: drives both BP and onset
        black = race[0] == "2054-5"

        def age_at(d: date) -> float:
            return (d - birth).days / 365.25

        # Comorbidities with onset dates (some before the data window: prevalent).
        def maybe_onset(p: float) -> date | None:
            if rng.random() >= p:
                return None
            return DATA_START + timedelta(days=rng.randint(-2000, (DATA_END - DATA_START).days))

        diabetes = maybe_onset(_sigmoid(-4.2 + 0.04 * (age - 45) + 0.12 * (bmi - 27)))
        prediabetes = None if diabetes else maybe_onset(0.15)
        ckd = maybe_onset(_sigmoid(-4.5 + 0.06 * (age - 50) + (1.0 if diabetes else 0.0)))
        obesity = maybe_onset(0.9) if bmi >= 30 else None
        hyperlipidemia = maybe_onset(_sigmoid(-2.0 + 0.03 * (age - 50)))

        # Death: more likely with age; encounters stop there.
        death = None
        if rng.random() < _sigmoid(-5.5 + 0.07 * (age - 50)):
            death = DATA_START + timedelta(days=rng.randint(365, (DATA_END - DATA_START).days))

        # Hypertension onset: yearly hazard from the risk factors; prevalent cases get an
        # onset before the data window.
        def risk(d: date) -> float:
            return (
                -3.3
                + 0.05 * (age_at(d) - 50)
                + 0.10 * (bmi - 27)
                + 0.8 * family_htn
                + 0.6 * (diabetes is not None and diabetes <= d)
                + 0.7 * (ckd is not None and ckd <= d)
                + 0.4 * (smoking == "current")
                + 0.4 * black
                + 1.1 * bp_latent
                + rng.gauss(0.0, 0.6)
            )

        htn_onset: date | None = None
        if rng.random() < _sigmoid(risk(DATA_START) - 0.6):
            htn_onset = DATA_START - timedelta(days=rng.randint(30, 3000))
        else:
            year_start = DATA_START
            while year_start <= DATA_END:
                if rng.random() < _sigmoid(risk(year_start)):
                    htn_onset = year_start + timedelta(days=rng.randint(0, 364))
                    break
                year_start += timedelta(days=365)
        if death and htn_onset and htn_onset > death:
            htn_onset = None

        self.female, self.birth, self.bmi, self.bp_latent = female, birth, bmi, bp_latent
        self.smoking, self.family_htn, self.htn_onset = smoking, family_htn, htn_onset
        self.diabetes, self.ckd, self.black, self.hyperlipidemia = diabetes, ckd, black, hyperlipidemia
        self.prediabetes = prediabetes
        self.age_at = age_at

        given = rng.choice(GIVEN_FEMALE if female else GIVEN_MALE) + str(rng.randint(1, 999))
        family = rng.choice(FAMILY) + str(rng.randint(1, 999))
        self.display_name = f"{'Mrs.' if female else 'Mr.'} {given} {family}"
        self.given, self.family = given, family
        self.mrn = f"MRN{rng.randint(10_000_000, 99_999_999)}"
        self.ssn = f"{rng.randint(100, 899):03d}-{rng.randint(10, 99):02d}-{rng.randint(1000, 9999):04d}"
        self.phone = f"555-{rng.randint(100, 999):03d}-{rng.randint(1000, 9999):04d}"
        self._patient(race, hispanic, death)

        # Encounter timeline: yearly wellness, extra ambulatory, occasional ED/inpatient.
        start = max(DATA_START, birth + timedelta(days=int(18 * 365.25)))
        end = min(DATA_END, death) if death else DATA_END
        conditions_recorded: set[str] = set()
        day = start + timedelta(days=rng.randint(0, 200))
        visit_rate = 0.8 + 0.5 * (diabetes is not None) + 0.4 * (ckd is not None)
        while day <= end:
            self._encounter(day, "AMB", wellness=True, recorded=conditions_recorded)
            for _ in range(self._poisson(visit_rate)):
                d = day + timedelta(days=rng.randint(20, 340))
                if d <= end:
                    self._encounter(d, "AMB", wellness=False, recorded=conditions_recorded)
            if rng.random() < 0.08:
                d = day + timedelta(days=rng.randint(1, 360))
                if d <= end:
                    self._encounter(d, "EMER", wellness=False, recorded=conditions_recorded)
            if rng.random() < 0.04 + 0.03 * (ckd is not None):
                d = day + timedelta(days=rng.randint(1, 360))
                if d <= end:
                    self._encounter(d, "IMP", wellness=False, recorded=conditions_recorded)
            day += timedelta(days=rng.randint(330, 420))
        # Diagnosis visit for onsets inside the window that no encounter happened to record.
        if htn_onset and start <= htn_onset <= end and "hypertension" not in conditions_recorded:
            self._encounter(htn_onset, "AMB", wellness=False, recorded=conditions_recorded)
        return self.out

    def _poisson(self, lam: float) -> int:
        # Knuth's method: fine for the small rates used here.
        threshold, k, p = math.exp(-lam), 0, 1.0
        while True:
            p *= self.rng.random()
            if p <= threshold:
                return k
            k += 1

    # -- resources -------------------------------------------------------------------------
    def _patient(self, race: tuple, hispanic: bool, death: date | None) -> None:
        rng = self.rng
        city, state, zip_code = rng.choice(PLACES)
        street = f"{rng.randint(1, 9999)} {rng.choice(STREETS)}"
        resource = {
            "resourceType": "Patient",
            "id": self.pid,
            "meta": {"profile": [f"{US_CORE}/us-core-patient"], "tag": [SYNTHETIC_TAG]},
            "text": {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{self.display_name}</div>'},
            "extension": [
                {"url": f"{US_CORE}/us-core-race", "extension": [
                    {"url": "ombCategory", "valueCoding": _coding("urn:oid:2.16.840.1.113883.6.238", race[0], race[1])},
                    {"url": "text", "valueString": race[1]}]},
                {"url": f"{US_CORE}/us-core-ethnicity", "extension": [
                    {"url": "ombCategory", "valueCoding": _coding(
                        "urn:oid:2.16.840.1.113883.6.238",
                        "2135-2" if hispanic else "2186-5",
                        "Hispanic or Latino" if hispanic else "Not Hispanic or Latino")},
                    {"url": "text", "valueString": "Hispanic or Latino" if hispanic else "Not Hispanic or Latino"}]},
                {"url": "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName",
                 "valueString": f"{rng.choice(GIVEN_FEMALE)}{rng.randint(1, 999)} {rng.choice(FAMILY)}{rng.randint(1, 999)}"},
                {"url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace",
                 "valueAddress": {"city": rng.choice(PLACES)[0], "state": state, "country": "US"}},
            ],
            "identifier": [
                {"type": {"coding": [_coding(V2_0203, "MR", "Medical Record Number")]},
                 "system": "http://hospital.example.org/mrn", "value": self.mrn},
                {"type": {"coding": [_coding(V2_0203, "SS", "Social Security Number")]},
                 "system": "http://hl7.org/fhir/sid/us-ssn", "value": self.ssn},
                {"type": {"coding": [_coding(V2_0203, "DL", "Driver's License")]},
                 "system": "urn:oid:2.16.840.1.113883.4.3.25", "value": f"S{rng.randint(10_000_000, 99_999_999)}"},
            ],
            "name": [{"use": "official", "family": self.family, "given": [self.given],
                      "prefix": ["Mrs." if self.female else "Mr."]}],
            "telecom": [
                {"system": "phone", "value": self.phone, "use": "home"},
                {"system": "email", "value": f"{self.given.lower()}.{self.family.lower()}@example.org"},
            ],
            "gender": "female" if self.female else "male",
            "birthDate": self.birth.isoformat(),
            "address": [{
                "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/geolocation", "extension": [
                    {"url": "latitude", "valueDecimal": round(rng.uniform(25, 48), 6)},
                    {"url": "longitude", "valueDecimal": round(rng.uniform(-122, -70), 6)}]}],
                "line": [street], "city": city, "state": state, "postalCode": zip_code, "country": "US"}],
            "maritalStatus": {"coding": [_coding("http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "M", "Married")]},
        }
        if death:
            resource["deceasedDateTime"] = _ts(death, rng)
        self.out["Patient"].append(resource)

    def _systolic(self, d: date) -> float:
        """Latent systolic pressure on day d: age, BMI, propensity, and the pre-diagnosis rise."""
        spec = self.spec
        sbp = 112 + 0.45 * (self.age_at(d) - 40) + 0.7 * (self.bmi - 27) + 7 * self.bp_latent + 3 * self.black
        if self.htn_onset:
            years_to_onset = (self.htn_onset - d).days / 365.25
            if years_to_onset <= 0:
                sbp += 16 - 8 * min(-years_to_onset, 1.0)  # treated after diagnosis
            elif years_to_onset < 4:
                sbp += 16 * (1 - years_to_onset / 4)
        if spec.drift:
            sbp += spec.drift_systolic_offset
        return sbp

    def _encounter(self, d: date, klass: str, wellness: bool, recorded: set[str]) -> None:
        rng = self.rng
        eid = _uuid(rng)
        ref = {"reference": f"Patient/{self.pid}", "display": self.display_name}
        enc_ref = {"reference": f"Encounter/{eid}"}
        end = d + timedelta(days=rng.randint(1, 6)) if klass == "IMP" else d
        types = {
            "AMB": ("162673000", "General examination of patient (procedure)") if wellness
            else ("185345009", "Encounter for symptom (procedure)"),
            "EMER": ("50849002", "Emergency room admission (procedure)"),
            "IMP": ("32485007", "Hospital admission (procedure)"),
        }[klass]
        start_ts = _ts(d, rng)
        self.out["Encounter"].append({
            "resourceType": "Encounter", "id": eid, "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": klass},
            "type": [{"coding": [_coding(SNOMED, *types)], "text": types[1]}],
            "subject": ref,
            "participant": [{"individual": {"reference": f"Practitioner/{rng.randint(1, 40)}",
                                            "display": rng.choice(PRACTITIONERS)}}],
            "period": {"start": start_ts, "end": f"{end.isoformat()}T{start_ts[11:]}"},
            "serviceProvider": {"reference": "Organization/1", "display": "GENERAL HOSPITAL"},
        })

        # Conditions known by this date and not yet recorded get recorded now.
        onsets = {
            "hypertension": self.htn_onset, "diabetes": self.diabetes, "ckd": self.ckd,
            "hyperlipidemia": self.hyperlipidemia, "prediabetes": self.prediabetes,
        }
        for name, onset in onsets.items():
            if onset and onset <= d and name not in recorded:
                recorded.add(name)
                self._condition(name, onset, eid)
                if name in MEDICATIONS:
                    self._medication(name, d, eid)
        if self.bmi >= 30 and "obesity" not in recorded and wellness:
            recorded.add("obesity")
            self._condition("obesity", d, eid)

        # Vitals at every encounter; labs at about half of the wellness visits.
        sbp_true = self._systolic(d)
        sbp = sbp_true + rng.gauss(0, 7)
        dbp = 0.55 * sbp_true + 10 + rng.gauss(0, 6) + (self.spec.drift_diastolic_offset if self.spec.drift else 0.0) * 0.45
        self._bp_panel(d, eid, sbp, dbp)
        self._vital(d, eid, "8867-4", "Heart rate", rng.gauss(74 + 4 * self.bp_latent, 9), "/min")
        if wellness:
            self._vital(d, eid, "39156-5", "Body mass index (BMI) [Ratio]", self.bmi + rng.gauss(0, 0.6), "kg/m2")
            self._smoking(d, eid)
            if rng.random() < 0.6:
                diabetic = self.diabetes is not None and self.diabetes <= d
                ckd = self.ckd is not None and self.ckd <= d
                self._lab(d, eid, "2160-0", "Creatinine [Mass/volume] in Serum or Plasma",
                          rng.gauss(1.6 if ckd else 0.95, 0.2), "mg/dL")
                self._lab(d, eid, "2345-7", "Glucose [Mass/volume] in Serum or Plasma",
                          rng.gauss(150 if diabetic else 92, 15), "mg/dL")
                self._lab(d, eid, "4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood",
                          rng.gauss(7.6 if diabetic else 5.4, 0.4), "%")
            self._note(d, eid, sbp, dbp)

    def _observation(self, d: date, eid: str, code: str, display: str, category: str, **value) -> None:
        self.out["Observation"].append({
            "resourceType": "Observation", "id": _uuid(self.rng), "status": "final",
            "category": [{"coding": [_coding("http://terminology.hl7.org/CodeSystem/observation-category",
                                              category, category.replace("-", " ").title())]}],
            "code": {"coding": [_coding(LOINC, code, display)], "text": display},
            "subject": {"reference": f"Patient/{self.pid}"},
            "encounter": {"reference": f"Encounter/{eid}"},
            "effectiveDateTime": _ts(d, self.rng),
            "issued": f"{d.isoformat()}T20:00:00.000-05:00",
            **value,
        })

    def _bp_panel(self, d: date, eid: str, sbp: float, dbp: float) -> None:
        self._observation(d, eid, "85354-9", "Blood pressure panel with all children optional", "vital-signs",
                          component=[
                              {"code": {"coding": [_coding(LOINC, "8480-6", "Systolic blood pressure")]},
                               "valueQuantity": _quantity(sbp, "mm[Hg]")},
                              {"code": {"coding": [_coding(LOINC, "8462-4", "Diastolic blood pressure")]},
                               "valueQuantity": _quantity(dbp, "mm[Hg]")}])

    def _vital(self, d: date, eid: str, code: str, display: str, value: float, unit: str) -> None:
        self._observation(d, eid, code, display, "vital-signs", valueQuantity=_quantity(value, unit))

    def _lab(self, d: date, eid: str, code: str, display: str, value: float, unit: str) -> None:
        self._observation(d, eid, code, display, "laboratory", valueQuantity=_quantity(max(value, 0.1), unit))

    def _smoking(self, d: date, eid: str) -> None:
        code, display = SMOKING_STATUS[self.smoking]
        self._observation(d, eid, "72166-2", "Tobacco smoking status", "social-history",
                          valueCodeableConcept={"coding": [_coding(SNOMED, code, display)], "text": display})

    def _condition(self, name: str, onset: date, eid: str) -> None:
        rng = self.rng
        key = name
        if name == "hypertension" and rng.random() < 0.3:
            key = "hypertension_alt"  # real data uses both SNOMED codes
        snomed, display, icd = CONDITIONS[key]
        self.out["Condition"].append({
            "resourceType": "Condition", "id": _uuid(rng),
            "clinicalStatus": {"coding": [_coding("http://terminology.hl7.org/CodeSystem/condition-clinical",
                                                   "active", "Active")]},
            "verificationStatus": {"coding": [_coding("http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                                       "confirmed", "Confirmed")]},
            "category": [{"coding": [_coding("http://terminology.hl7.org/CodeSystem/condition-category",
                                              "encounter-diagnosis", "Encounter Diagnosis")]}],
            "code": {"coding": [_coding(SNOMED, snomed, display), _coding(ICD10, icd, display)], "text": display},
            "subject": {"reference": f"Patient/{self.pid}"},
            "encounter": {"reference": f"Encounter/{eid}"},
            "onsetDateTime": _ts(onset, rng),
            "recordedDate": _ts(onset, rng),
        })

    def _medication(self, indication: str, d: date, eid: str) -> None:
        rng = self.rng
        code, display = rng.choice(MEDICATIONS[indication])
        self.out["MedicationRequest"].append({
            "resourceType": "MedicationRequest", "id": _uuid(rng),
            "status": rng.choices(["active", "stopped"], weights=[0.85, 0.15])[0], "intent": "order",
            "medicationCodeableConcept": {"coding": [_coding(RXNORM, code, display)], "text": display},
            "subject": {"reference": f"Patient/{self.pid}"},
            "encounter": {"reference": f"Encounter/{eid}"},
            "authoredOn": _ts(d, rng),
            "requester": {"reference": f"Practitioner/{rng.randint(1, 40)}", "display": rng.choice(PRACTITIONERS)},
        })

    def _note(self, d: date, eid: str, sbp: float, dbp: float) -> None:
        rng = self.rng
        diagnosed = self.htn_onset is not None and self.htn_onset <= d
        history = []
        if diagnosed:
            history.append(rng.choice([
                "History of hypertension, on antihypertensive therapy.",
                "Known hypertension, tolerating medication.",
                "Essential hypertension, controlled.",
            ]))
        elif rng.random() < 0.6:
            history.append(rng.choice([
                "Patient denies a history of hypertension.",
                "No history of high blood pressure.",
                "Negative for hypertension.",
            ]))
        if self.family_htn and rng.random() < 0.7:
            history.append(rng.choice([
                "Family history of hypertension in mother.",
                "Father has hypertension.",
                "Family history: high blood pressure (sister).",
            ]))
        if not diagnosed and sbp >= 135:
            history.append("Elevated blood pressure reading today; recheck advised.")
        if self.diabetes and self.diabetes <= d:
            history.append("Type 2 diabetes, on metformin.")
        smoker = {"current": "Current smoker.", "former": "Former smoker.", "never": "Never smoker."}[self.smoking]
        text = (
            f"{d.strftime('%m/%d/%Y')} Wellness visit for {self.given} {self.family} ({self.mrn}).\n"
            f"Chief complaint: routine follow-up.\n"
            f"History: {' '.join(history) or 'Unremarkable.'} {smoker}\n"
            f"Vitals: BP {sbp:.0f}/{dbp:.0f} mmHg, BMI {self.bmi:.1f}.\n"
            f"Plan: continue current care. Call {self.phone} with questions.\n"
        )
        self.out["DocumentReference"].append({
            "resourceType": "DocumentReference", "id": _uuid(rng), "status": "current",
            "type": {"coding": [_coding(LOINC, "34117-2", "History and physical note")]},
            "category": [{"coding": [_coding(f"{US_CORE.rsplit('/', 1)[0]}/CodeSystem/us-core-documentreference-category",
                                              "clinical-note", "Clinical Note")]}],
            "subject": {"reference": f"Patient/{self.pid}"},
            "date": _ts(d, rng),
            "author": [{"reference": f"Practitioner/{rng.randint(1, 40)}", "display": rng.choice(PRACTITIONERS)}],
            "content": [{"attachment": {"contentType": "text/plain; charset=utf-8",
                                        "data": base64.b64encode(text.encode()).decode()}}],
            "context": {"encounter": [{"reference": f"Encounter/{eid}"}],
                        "period": {"start": _ts(d, rng), "end": _ts(d, rng)}},
        })


def generate_patient(spec: CohortSpec, index: int) -> dict[str, list[dict]]:
    """All resources of patient number ``index`` of the cohort, by resource type."""
    return _PatientWriter(spec, index).build()


def write_bulk_export(directory: str | Path, spec: CohortSpec) -> ExportSummary:
    """Write ``<Type>.000.ndjson`` files for the cohort into ``directory`` (created if needed).

    Files are written to a temporary name and renamed at the end, so a crash never leaves a
    half-written export that looks complete.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = {t: directory / f"{t}.000.ndjson" for t in RESOURCE_TYPES}
    partial = {t: p.with_suffix(".ndjson.partial") for t, p in files.items()}
    counts = dict.fromkeys(RESOURCE_TYPES, 0)
    handles = {t: open(p, "wb") for t, p in partial.items()}
    try:
        for i in range(spec.n_patients):
            for rtype, resources in generate_patient(spec, i).items():
                if resources:
                    handles[rtype].write(b"\n".join(orjson.dumps(r) for r in resources) + b"\n")
                    counts[rtype] += len(resources)
    finally:
        for h in handles.values():
            h.close()
    for rtype in RESOURCE_TYPES:
        partial[rtype].replace(files[rtype])
    return ExportSummary(directory=directory, files=files, counts=counts)


def patient_identifiers(resource: dict) -> dict[str, list[str]]:
    """The direct identifiers of a generated Patient resource, by category (for leak tests)."""
    out: dict[str, list[str]] = {"name": [], "identifier": [], "telecom": [], "address": [], "birth_date": []}
    for name in resource.get("name", []):
        out["name"] += [*name.get("given", []), name.get("family", "")]
    out["identifier"] = [i["value"] for i in resource.get("identifier", [])]
    out["telecom"] = [t["value"] for t in resource.get("telecom", [])]
    for addr in resource.get("address", []):
        out["address"] += addr.get("line", [])
    out["birth_date"] = [resource["birthDate"]]
    return out

