"""Clinical code lists and vocabularies: defined once, read by de-identification, features
and tests alike. Real exports code the same concept in several systems (SNOMED CT and
ICD-10-CM for diagnoses, two LOINC panels for blood pressure, RxNorm at several levels), so
each list carries every code seen for its concept.
"""

from __future__ import annotations

import re

RXNORM_SYSTEM = "http://www.nlm.nih.gov/research/umls/rxnorm"
LOINC_SYSTEM = "http://loinc.org"

# A code list: exact codes plus ICD-10 prefixes (a prefix matches the code and its children).
HYPERTENSION = {"codes": ("59621000", "38341003", "1201005", "10725009"), "prefixes": ("I10", "I11", "I12", "I13", "I15")}
DIAGNOSES = {
    "dx_diabetes": {"codes": ("44054006", "73211009", "46635009"), "prefixes": ("E10", "E11")},
    "dx_prediabetes": {"codes": ("15777000", "714628002"), "prefixes": ("R73.0",)},
    "dx_ckd": {"codes": ("433144002", "431855005", "431856006", "431857002", "46177005", "709044004"),
               "prefixes": ("N18",)},
    "dx_obesity": {"codes": ("162864005", "408512008", "414916001"), "prefixes": ("E66",)},
    "dx_hyperlipidemia": {"codes": ("55822004", "267432004", "13644009"), "prefixes": ("E78",)},
}
STATIN_RXNORM = ("259255", "617312", "617310", "859747", "859424", "314231")
CURRENT_SMOKER_SNOMED = ("449868002", "77176002", "428041000124106", "65568007", "428061000124105")

# Observation codes (LOINC) behind the vital and lab features.
SYSTOLIC_BP = ("8480-6",)
DIASTOLIC_BP = ("8462-4",)
BMI = ("39156-5",)
HEART_RATE = ("8867-4",)
CREATININE = ("2160-0", "38483-4")
GLUCOSE = ("2345-7", "2339-0")
HBA1C = ("4548-4", "17856-6")
SMOKING_STATUS = ("72166-2",)

# Encounter.class as v3 ActCode (R4), whatever the sender wrote: older Synthea and some EHRs
# send plain words. ACUTE/NONAC are kinds of inpatient encounter. Anything else is UNK, and
# the original value is kept beside it.
ACT_ENCOUNTER_CODES = ("AMB", "EMER", "FLD", "HH", "IMP", "OBSENC", "PRENC", "SS", "VR")
ENCOUNTER_CLASS_ALIASES = {
    "acute": "IMP", "nonac": "IMP", "inpatient": "IMP", "hospitalization": "IMP", "snf": "IMP",
    "ambulatory": "AMB", "outpatient": "AMB", "wellness": "AMB", "urgentcare": "AMB", "office": "AMB",
    "emergency": "EMER", "er": "EMER", "ed": "EMER",
    "home": "HH", "homehealth": "HH", "virtual": "VR", "telemedicine": "VR", "observation": "OBSENC",
    "field": "FLD", "shortstay": "SS", "preadmission": "PRENC",
    **{code.lower(): code for code in ACT_ENCOUNTER_CODES},
}


def sql_literal_list(values) -> str:
    """Constant code values as a SQL list (codes are validated: letters, digits, '.' and '-')."""
    for value in values:
        if not re.fullmatch(r"[A-Za-z0-9.\-]+", value):
            raise ValueError(f"not a code: {value!r}")
    return ", ".join(f"'{v}'" for v in values)


def code_match_sql(code_list: dict, column: str = "code") -> str:
    """SQL predicate: ``column`` is one of the list's codes or starts with one of its prefixes."""
    terms = [f"{column} IN ({sql_literal_list(code_list['codes'])})"] if code_list["codes"] else []
    terms += [f"starts_with({column}, '{p}')" for p in code_list.get("prefixes", ()) if sql_literal_list([p])]
    return "(" + " OR ".join(terms) + ")"


def encounter_class_sql(raw_expression: str) -> str:
    """SQL: the v3 ActCode for a raw Encounter.class code (case-, space- and dash-insensitive)."""
    cases = " ".join(f"WHEN '{alias}' THEN '{code}'" for alias, code in ENCOUNTER_CLASS_ALIASES.items())
    normalized = f"lower(regexp_replace(trim({raw_expression}), '[\\s_-]+', '', 'g'))"
    return f"CASE WHEN {raw_expression} IS NULL THEN NULL ELSE CASE {normalized} {cases} ELSE 'UNK' END END"
