"""A corpus for measuring de-identification: patients with identifiers in varied formats, and
clinical notes with planted identifiers of every free-text Safe Harbor category.

Deterministic for a seed. Each note records what was planted (category, value, span) and which
clinical phrases must survive scrubbing, so recall per category and the clinical content kept
can be measured on the pipeline's own path (land -> de-identify -> read the scrubbed notes).
"""

from __future__ import annotations

import base64
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, timedelta

import polars as pl

CATEGORIES = (
    "name", "geographic", "date", "phone", "fax", "email", "ssn", "medical_record_number", "health_plan_number",
    "account_number", "license_number", "vehicle_identifier", "device_identifier", "url", "ip_address",
    "biometric_identifier", "other_identifier", "age_90_plus",
)
GIVEN = ["José", "Zoë", "Maria", "Li", "Ahmed", "Siobhán", "Bjørn", "Chloé", "Nguyễn", "Amara", "Dmitri", "Aiyana",
         "Kwame", "Ingrid", "Mateo", "Priya", "Grace", "Oluwaseun", "Hana", "Łucja", "Renée", "Tomasz", "Yusuf"]
FAMILY = ["Müller-Łukasz", "O'Brien", "García", "Okafor", "Nakamura", "Smith", "Van der Berg", "Kowalczyk", "Dubois",
          "Haddad", "Johansson", "MacLeod", "Abernathy", "Øvergaard", "Fitzgerald", "Castillo", "Novák", "Adeyemi"]
STREETS = ["Elm", "Maple", "Oak Hill", "Cedar", "Washington", "Lincoln", "Birch", "Sycamore", "Harbor View"]
STREET_TYPES = ["St", "Street", "Ave", "Avenue", "Rd", "Road", "Lane", "Drive", "Blvd", "Court"]
CITIES = ["Springfield", "Worcester", "Lowell", "Göteborg", "Santa Fe", "Brookline", "Quincy", "Framingham"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
RELATIONS = ["wife", "husband", "daughter", "son", "mother", "sister", "brother", "partner"]
CLINICAL = [
    "denies a history of hypertension", "no chest pain", "blood pressure 142/91", "metformin 500 mg",
    "HbA1c 7.2%", "creatinine 1.1 mg/dL", "BMI 31", "family history of hypertension", "lisinopril 10 mg daily",
    "denies hypertension", "heart rate 78", "glucose 126 mg/dL", "may repeat in 2 weeks", "decreased by 10 mmHg",
    "mother had hypertension", "no shortness of breath", "follow up in 3 months", "BP 128/82",
]


@dataclass
class Planted:
    category: str
    value: str
    start: int
    end: int


@dataclass
class PlantedNote:
    note_id: str
    patient: dict  # the FHIR Patient whose identifiers the pipeline removes from its notes
    text: str
    planted: list[Planted] = field(default_factory=list)
    clinical_terms: list[str] = field(default_factory=list)


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def _date_text(rng: random.Random, d: date) -> str:
    return rng.choice([
        f"{d.month:02d}/{d.day:02d}/{d.year}", f"{d.month}/{d.day}/{d.year % 100:02d}", d.isoformat(),
        f"{d.year}/{d.month:02d}/{d.day:02d}", f"{d.month}.{d.day}.{d.year}", f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
        f"{d.day} {MONTHS[d.month - 1]} {d.year}", f"{MONTHS[d.month - 1]} {d.year}",
        f"{MONTHS[d.month - 1][:3]} {d.day}{'th' if d.day > 3 else ['st', 'nd', 'rd'][d.day - 1]} {d.year}",
    ])


def _phone(rng: random.Random) -> str:
    a, b, c = _digits(rng, 3), _digits(rng, 3), _digits(rng, 4)
    return rng.choice([f"({a}) {b}-{c}", f"{a}-{b}-{c}", f"{a}.{b}.{c}", f"+1 {a} {b} {c}"])


def _patient(rng: random.Random, i: int) -> tuple[dict, dict]:
    given, family = rng.choice(GIVEN), rng.choice(FAMILY)
    ssn = f"{_digits(rng, 3)}-{_digits(rng, 2)}-{_digits(rng, 4)}"
    facts = {
        "given": given, "family": family, "ssn": ssn, "mrn": rng.choice(["", "A", "HX"]) + _digits(rng, 7),
        "phone": _phone(rng), "email": f"{given.lower()}.{i}@example.org".encode("ascii", "ignore").decode(),
        "street": f"{rng.randint(1, 9999)} {rng.choice(STREETS)} {rng.choice(STREET_TYPES)}",
        "city": rng.choice(CITIES), "zip": _digits(rng, 5), "birth": date(1930, 1, 1) + timedelta(days=rng.randint(0, 27000)),
        "contact": rng.choice(GIVEN),
    }
    patient = {
        "resourceType": "Patient", "id": f"corpus-{i}", "birthDate": facts["birth"].isoformat(),
        "name": [{"given": [given], "family": family}],
        "identifier": [{"type": {"coding": [{"code": "SS"}]}, "value": ssn},
                       {"type": {"coding": [{"code": "MR"}]}, "value": facts["mrn"]}],
        "telecom": [{"system": "phone", "value": facts["phone"]}, {"system": "email", "value": facts["email"]}],
        "address": [{"line": [facts["street"]], "city": facts["city"], "postalCode": facts["zip"], "state": "MA"}],
        "contact": [{"relationship": [{"text": "spouse"}], "name": {"given": [facts["contact"]], "family": family}}],
    }
    return patient, facts


def _sentences(rng: random.Random, f: dict) -> list[tuple[str, list[tuple[str, str]]]]:
    """Sentence templates as (text with {0}, {1}… slots, [(category, value), …])."""
    other_name = f"{rng.choice(GIVEN)} {rng.choice(FAMILY)}"
    d = date(2015, 1, 1) + timedelta(days=rng.randint(0, 3000))
    when = _date_text(rng, d)
    age = str(rng.randint(90, 104))
    vin = "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ0123456789") for _ in range(11)) + _digits(rng, 6)
    return [
        ("{0} {1} presented today.", [("name", f["given"]), ("name", f["family"])]),
        ("Seen by Dr. {0} on {1}.", [("name", rng.choice(FAMILY)), ("date", when)]),
        (f"Accompanied by her {rng.choice(RELATIONS)} {{0}}.", [("name", other_name)]),
        ("Emergency contact {0}, phone {1}.", [("name", f["contact"]), ("phone", f["phone"])]),
        ("Lives at {0}, {1} {2}.", [("geographic", f["street"]), ("geographic", f["city"]), ("geographic", f["zip"])]),
        ("DOB {0}.", [("date", _date_text(rng, f["birth"]))]),
        ("Reached at {0}.", [("phone", _phone(rng))]),
        ("Records faxed to fax {0}.", [("fax", _phone(rng))]),
        ("E-mail {0} for results.", [("email", rng.choice([f["email"], f"pt{_digits(rng, 4)}@mail.example.com"]))]),
        (rng.choice(["SSN {0}.", "Social security number {0}."]),
         [("ssn", rng.choice([f["ssn"], f["ssn"].replace("-", " "), f"{_digits(rng, 3)}-{_digits(rng, 2)}-{_digits(rng, 4)}"]))]),
        (rng.choice(["MRN {0}.", "MRN: {0}.", "Medical record number {0}."]),
         [("medical_record_number", rng.choice([f["mrn"], "A" + _digits(rng, 7)]))]),
        (rng.choice(["Member ID {0}.", "Insurance policy # {0}."]),
         [("health_plan_number", rng.choice(["XYZ", "BC", ""]) + _digits(rng, 9))]),
        ("Billing acct {0}.", [("account_number", _digits(rng, 8))]),
        (rng.choice(["DL {0} on file.", "Driver's license no. {0}."]),
         [("license_number", rng.choice("SDB") + _digits(rng, 8))]),
        (rng.choice(["Car VIN {0}.", "Vehicle plate {0}."]),
         [("vehicle_identifier", rng.choice([vin, f"{rng.randint(1, 9)}ABC{_digits(rng, 3)}"]))]),
        ("Pacemaker serial {0} checked.", [("device_identifier", f"SN-{_digits(rng, 5)}-XK")]),
        ("Portal {0}.", [("url", rng.choice([f"https://portal.example.org/patient/{_digits(rng, 5)}",
                                              f"www.example.com/p{_digits(rng, 3)}"]))]),
        ("Logged in from {0}.", [("ip_address", f"{rng.randint(10, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}."
                                                f"{rng.randint(1, 254)}")]),
        ("Fingerprint id {0} verified.", [("biometric_identifier", f"FP-{_digits(rng, 4)}-{_digits(rng, 2)}")]),
        ("Enrolled with study id {0}.", [("other_identifier", f"{_digits(rng, 2)}-{_digits(rng, 4)}-{_digits(rng, 1)}")]),
        (rng.choice(["{0} year-old woman.", "Age {0}.", "A {0} y.o. man.", "Aged {0}."]), [("age_90_plus", age)]),
    ]


def build_corpus(n_notes: int = 2000, seed: int = 7) -> list[PlantedNote]:
    rng = random.Random(seed)
    notes = []
    for i in range(n_notes):
        patient, facts = _patient(rng, i)
        templates = _sentences(rng, facts)
        chosen = rng.sample(templates, k=8)
        clinical = rng.sample(CLINICAL, k=4)
        parts = [(t, v) for t, v in chosen] + [(c.capitalize() + ".", []) for c in clinical]
        rng.shuffle(parts)
        text, planted = "", []
        for template, values in parts:
            pieces = re.split(r"(\{\d\})", template)
            sentence = ""
            for piece in pieces:
                slot = re.fullmatch(r"\{(\d)\}", piece)
                if slot:
                    category, value = values[int(slot.group(1))]
                    start = len(text) + len(sentence)
                    sentence += value
                    planted.append(Planted(category, value, start, start + len(value)))
                else:
                    sentence += piece
            text += sentence + " "
        notes.append(PlantedNote(f"corpus-note-{i}", patient, text.strip(), planted,
                                 [c.capitalize() for c in clinical]))
    return notes


def corpus_resources(notes: list[PlantedNote]) -> list[dict]:
    """The corpus as FHIR resources (Patient + DocumentReference) for the landing path."""
    resources = []
    for note in notes:
        resources.append(note.patient)
        resources.append({
            "resourceType": "DocumentReference", "id": note.note_id, "status": "current",
            "subject": {"reference": f"Patient/{note.patient['id']}"}, "date": "2021-06-01",
            "content": [{"attachment": {"contentType": "text/plain", "data": base64.b64encode(note.text.encode()).decode()}}],
        })
    return resources


_TOKEN = re.compile(r"[^\W_]+")
_TAG = re.compile(r"\[[A-Z_0-9]+\]")  # the scrubber's replacement tags ("[AGE_90_PLUS]") are not data
_YEAR = re.compile(r"(?:1[89]|20)\d{2}")


def identifying_runs(category: str, value: str) -> list[str]:
    """The letter/digit runs of a planted value that must not survive. A year alone is not a
    Safe Harbor identifier (dates are kept to the year), so years are left out for dates."""
    runs = [t.lower() for t in _TOKEN.findall(value)]
    if category == "date":
        runs = [r for r in runs if not _YEAR.fullmatch(r)]
    return runs


def measure_recall(notes: list[PlantedNote], scrubbed: dict[str, str]) -> tuple[pl.DataFrame, float]:
    """Recall per category and the fraction of clinical phrases kept verbatim.

    A planted identifier counts as removed when none of its identifying runs occurs in the
    scrubbed note more often than it occurs in the original note outside all planted spans
    (so "10" in "lisinopril 10 mg" does not count against a planted date, but a surviving
    "4477" of a phone number does)."""
    planted_by_category, removed_by_category = Counter(), Counter()
    kept = total_terms = 0
    for note in notes:
        after = Counter(t.lower() for t in _TOKEN.findall(_TAG.sub(" ", scrubbed[note.note_id])))
        outside, cursor = [], 0
        for p in sorted(note.planted, key=lambda p: p.start):
            outside.append(note.text[cursor:p.start])
            cursor = max(cursor, p.end)
        outside.append(note.text[cursor:])
        baseline = Counter(t.lower() for t in _TOKEN.findall(" ".join(outside)))
        for p in note.planted:
            planted_by_category[p.category] += 1
            if all(after[run] <= baseline[run] for run in identifying_runs(p.category, p.value)):
                removed_by_category[p.category] += 1
        total_terms += len(note.clinical_terms)
        kept += sum(term in scrubbed[note.note_id] for term in note.clinical_terms)
    table = pl.DataFrame(
        [{"category": c, "planted": planted_by_category[c], "removed": removed_by_category[c],
          "recall": removed_by_category[c] / planted_by_category[c] if planted_by_category[c] else None}
         for c in CATEGORIES],
        schema={"category": pl.String, "planted": pl.Int64, "removed": pl.Int64, "recall": pl.Float64},
    )
    return table, kept / total_terms if total_terms else 1.0


def scrub_through_pipeline(notes: list[PlantedNote], key: bytes, directory) -> tuple[dict[str, str], list[dict]]:
    """Land the corpus as NDJSON, de-identify it as the pipeline does, and return each note's
    scrubbed text (by note id) and the leak check's findings over all de-identified tables."""
    import json
    from pathlib import Path

    import duckdb

    from clinical_ml.deid import DEID_TABLES, deidentify, find_identifier_leaks, pseudonym
    from clinical_ml.ingest import land_ndjson

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    by_type: dict[str, list[str]] = {}
    for resource in corpus_resources(notes):
        by_type.setdefault(resource["resourceType"], []).append(json.dumps(resource))
    for rtype, lines in by_type.items():
        (directory / f"{rtype}.000.ndjson").write_text("\n".join(lines) + "\n")
    con = duckdb.connect()
    try:
        land_ndjson(con, directory)
        deidentify(con, key, reference_date=date(2026, 1, 1))
        by_key = dict(con.execute("SELECT document_key, note_text FROM deid.document_reference").fetchall())
        scrubbed = {n.note_id: by_key[pseudonym(key, "DocumentReference", n.note_id)] for n in notes}
        return scrubbed, find_identifier_leaks(con, [f"deid.{t}" for t in DEID_TABLES], key)
    finally:
        con.close()
