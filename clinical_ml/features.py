"""Clinical feature matrix for hypertension risk, from the de-identified tables.

One row per patient at an index date. Every feature uses only data recorded strictly before
the index date; the label is a hypertension diagnosis within the prediction horizon after it.
Patients already diagnosed on or before the index date are excluded, and so are patients with
no follow-up encounter in the horizon (their outcome is unknown, not negative).

Notes are read with a NegEx-style rule set over sentences: "denies a history of hypertension"
is a negated mention, "mother has hypertension" is family history, neither counts as an
affirmed mention.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

import duckdb
import pandera.polars as pa
import polars as pl

from clinical_ml.db import transaction

HYPERTENSION_CODE_SQL = "(code IN ('59621000', '38341003', '1201005', '10725009') OR code LIKE 'I10%' OR code LIKE 'I11%' OR code LIKE 'I12%' OR code LIKE 'I13%' OR code LIKE 'I15%')"
DIAGNOSIS_FLAGS = {
    "dx_diabetes": "code IN ('44054006', '73211009', '46635009') OR code LIKE 'E10%' OR code LIKE 'E11%'",
    "dx_prediabetes": "code IN ('15777000', '714628002') OR code LIKE 'R73.0%'",
    "dx_ckd": "code IN ('433144002', '431855005', '431856006', '431857002', '46177005', '709044004') OR code LIKE 'N18%'",
    "dx_obesity": "code IN ('162864005', '408512008', '414916001') OR code LIKE 'E66%'",
    "dx_hyperlipidemia": "code IN ('55822004', '267432004', '13644009') OR code LIKE 'E78%'",
}
STATIN_RXNORM = ("259255", "617312", "617310", "859747", "859424", "314231")
CURRENT_SMOKER_SNOMED = ("449868002", "77176002", "428041000124106", "65568007", "428061000124105")

# Sentence-level mention rules (RE2). Order of precedence: family history, negated, affirmed.
HTN_TERM = r"(?i)\b(hypertension|hypertensive|high blood pressure|htn|elevated blood pressure)\b"
FAMILY_CUE = r"(?i)\b(family history|fhx|mother|father|sister|brother|parents?|siblings?|grandmother|grandfather|maternal|paternal|aunt|uncle)\b"
NEGATION_BEFORE_TERM = (
    r"(?i)\b(denies|denied|deny|no|not|negative for|without|free of|absence of|rules? out|ruled out)\b"
    r"[^.;]{0,60}\b(hypertension|hypertensive|high blood pressure|htn|elevated blood pressure)\b"
)

MODEL_FEATURES = [
    "age_at_index", "sex_female",
    "sbp_last", "sbp_mean_1y", "sbp_mean_3y", "sbp_max_3y", "sbp_slope_per_year", "dbp_last", "dbp_mean_3y",
    "n_bp_readings_3y", "bmi_last", "heart_rate_mean_3y", "creatinine_last", "glucose_last", "hba1c_last",
    "current_smoker", *DIAGNOSIS_FLAGS.keys(), "n_distinct_medications", "on_statin",
    "encounters_1y", "ed_visits_3y", "inpatient_stays_3y",
    "note_htn_affirmed", "note_htn_negated", "note_family_history_htn",
]
SUBGROUP_COLUMNS = ["sex", "age_group", "race"]


@dataclass(frozen=True)
class FeatureSpec:
    index_date: date = date(2022, 1, 1)
    horizon_days: int = 730
    lookback_days: int = 1095
    min_age: int = 18


def classify_mentions_sql(text_column: str) -> str:
    """SQL: a list of structs {sentence, status} for hypertension mentions in ``text_column``,
    status one of 'family', 'negated', 'affirmed'."""
    return f"""list_transform(
        list_filter(regexp_split_to_array({text_column}, '[.;!?\\n]+'),
                    lambda s: regexp_matches(s, '{HTN_TERM}')),
        lambda s: CASE WHEN regexp_matches(s, '{FAMILY_CUE}') THEN 'family'
                       WHEN regexp_matches(s, '{NEGATION_BEFORE_TERM}') THEN 'negated'
                       ELSE 'affirmed' END)"""


def classify_mentions(con: duckdb.DuckDBPyConnection, texts: list[str]) -> list[list[str]]:
    """Statuses of hypertension mentions per text (the SQL the pipeline uses, callable in tests)."""
    rel = con.execute(
        f"SELECT {classify_mentions_sql('t')} FROM (SELECT unnest(?::VARCHAR[]) AS t, generate_subscripts(?::VARCHAR[], 1) AS i) ORDER BY i",
        [texts, texts],
    )
    return [row[0] for row in rel.fetchall()]


def build_feature_matrix_sql(spec: FeatureSpec, schema: str = "deid") -> str:
    idx = f"DATE '{spec.index_date.isoformat()}'"
    look = f"({idx} - INTERVAL {spec.lookback_days} DAY)"
    horizon_end = f"({idx} + INTERVAL {spec.horizon_days} DAY)"
    dx_cols = ",\n".join(f"bool_or({cond})::INTEGER AS {name}" for name, cond in DIAGNOSIS_FLAGS.items())
    statins = ", ".join(f"'{c}'" for c in STATIN_RXNORM)
    smokers = ", ".join(f"'{c}'" for c in CURRENT_SMOKER_SNOMED)
    return f"""
    WITH conditions AS (
        -- Refuted or entered-in-error diagnoses are not diagnoses. A condition is dated by its
        -- onset, else by when it was recorded; it counts as known at the index date only if it
        -- had also been recorded by then (a back-dated onset entered later is future knowledge).
        SELECT *, coalesce(onset_date, recorded_date) AS dated,
               coalesce(onset_date, recorded_date) < {idx} AND coalesce(recorded_date < {idx}, true) AS known_at_index
        FROM {schema}.condition
        WHERE coalesce(verification_status NOT IN ('refuted', 'entered-in-error'), true)
    ),
    htn AS (
        -- An undated hypertension diagnosis cannot be placed before or after the index date:
        -- such patients are left out rather than guessed into either class.
        SELECT patient_key, min(dated) AS htn_onset, bool_or(dated IS NULL) AS htn_undated FROM conditions
        WHERE {HYPERTENSION_CODE_SQL} GROUP BY patient_key
    ),
    enc AS (
        SELECT patient_key,
            count(*) FILTER (WHERE start_date < {idx} AND start_date >= {idx} - INTERVAL 365 DAY) AS encounters_1y,
            count(*) FILTER (WHERE start_date < {idx} AND start_date >= {look} AND encounter_class = 'EMER') AS ed_visits_3y,
            count(*) FILTER (WHERE start_date < {idx} AND start_date >= {look} AND encounter_class = 'IMP') AS inpatient_stays_3y,
            count(*) FILTER (WHERE start_date < {idx} AND start_date >= {look}) AS encounters_lookback,
            count(*) FILTER (WHERE start_date > {idx} AND start_date <= {horizon_end}) AS encounters_horizon
        FROM {schema}.encounter GROUP BY patient_key
    ),
    obs AS (
        SELECT patient_key, code, value_num, value_code, effective_date,
               date_diff('day', {idx}, effective_date) / 365.25 AS years_before
        FROM {schema}.observation WHERE effective_date < {idx} AND effective_date >= {look}
    ),
    vitals AS (
        SELECT patient_key,
            arg_max(value_num, effective_date) FILTER (WHERE code = '8480-6') AS sbp_last,
            avg(value_num) FILTER (WHERE code = '8480-6' AND effective_date >= {idx} - INTERVAL 365 DAY) AS sbp_mean_1y,
            avg(value_num) FILTER (WHERE code = '8480-6') AS sbp_mean_3y,
            max(value_num) FILTER (WHERE code = '8480-6') AS sbp_max_3y,
            regr_slope(value_num, years_before) FILTER (WHERE code = '8480-6') AS sbp_slope_per_year,
            arg_max(value_num, effective_date) FILTER (WHERE code = '8462-4') AS dbp_last,
            avg(value_num) FILTER (WHERE code = '8462-4') AS dbp_mean_3y,
            count(*) FILTER (WHERE code = '8480-6') AS n_bp_readings_3y,
            arg_max(value_num, effective_date) FILTER (WHERE code = '39156-5') AS bmi_last,
            avg(value_num) FILTER (WHERE code = '8867-4') AS heart_rate_mean_3y,
            arg_max(value_num, effective_date) FILTER (WHERE code IN ('2160-0', '38483-4')) AS creatinine_last,
            arg_max(value_num, effective_date) FILTER (WHERE code IN ('2345-7', '2339-0')) AS glucose_last,
            arg_max(value_num, effective_date) FILTER (WHERE code IN ('4548-4', '17856-6')) AS hba1c_last,
            arg_max(value_code, effective_date) FILTER (WHERE code = '72166-2') AS smoking_status
        FROM obs GROUP BY patient_key
    ),
    dx AS (
        SELECT patient_key, {dx_cols}
        FROM conditions WHERE known_at_index GROUP BY patient_key
    ),
    meds AS (
        SELECT patient_key, count(DISTINCT rxnorm_code) AS n_distinct_medications,
               bool_or(rxnorm_code IN ({statins}))::INTEGER AS on_statin
        FROM {schema}.medication_request WHERE authored_date < {idx} GROUP BY patient_key
    ),
    mentions AS (
        SELECT patient_key, unnest({classify_mentions_sql('note_text')}) AS status
        FROM {schema}.document_reference WHERE document_date < {idx}
    ),
    notes AS (
        SELECT patient_key,
            count(*) FILTER (WHERE status = 'affirmed') AS note_htn_affirmed,
            count(*) FILTER (WHERE status = 'negated') AS note_htn_negated,
            (count(*) FILTER (WHERE status = 'family') > 0)::INTEGER AS note_family_history_htn
        FROM mentions GROUP BY patient_key
    ),
    cohort AS (
        SELECT p.patient_key, p.gender AS sex, p.race,
            -- Safe Harbor hides the birth year of anyone 90+ today; they are counted as 90 at
            -- the index date too (an over-estimate by at most the years since the index date).
            CASE WHEN p.birth_year IS NULL AND p.age_90_or_older THEN 90
                 ELSE least(year({idx}) - p.birth_year, 90) END AS age_at_index,
            h.htn_onset, e.*  EXCLUDE (patient_key)
        FROM {schema}.patient p
        JOIN enc e USING (patient_key)
        LEFT JOIN htn h USING (patient_key)
        WHERE (p.death_date IS NULL OR p.death_date > {idx})
          AND e.encounters_lookback > 0 AND e.encounters_horizon > 0
          AND (h.htn_onset IS NULL OR h.htn_onset > {idx}) AND NOT coalesce(h.htn_undated, false)
    )
    SELECT
        c.patient_key,
        DATE '{spec.index_date.isoformat()}' AS index_date,
        c.sex, coalesce(c.race, 'Unknown') AS race,
        CASE WHEN c.age_at_index < 45 THEN '18-44' WHEN c.age_at_index < 65 THEN '45-64' ELSE '65+' END AS age_group,
        c.age_at_index::INTEGER AS age_at_index,
        (c.sex = 'female')::INTEGER AS sex_female,
        v.sbp_last, v.sbp_mean_1y, v.sbp_mean_3y, v.sbp_max_3y, v.sbp_slope_per_year, v.dbp_last, v.dbp_mean_3y,
        coalesce(v.n_bp_readings_3y, 0) AS n_bp_readings_3y,
        v.bmi_last, v.heart_rate_mean_3y, v.creatinine_last, v.glucose_last, v.hba1c_last,
        coalesce(v.smoking_status IN ({smokers}), false)::INTEGER AS current_smoker,
        {", ".join(f"coalesce(d.{n}, 0) AS {n}" for n in DIAGNOSIS_FLAGS)},
        coalesce(m.n_distinct_medications, 0) AS n_distinct_medications,
        coalesce(m.on_statin, 0) AS on_statin,
        c.encounters_1y, c.ed_visits_3y, c.inpatient_stays_3y,
        coalesce(n.note_htn_affirmed, 0) AS note_htn_affirmed,
        coalesce(n.note_htn_negated, 0) AS note_htn_negated,
        coalesce(n.note_family_history_htn, 0) AS note_family_history_htn,
        (c.htn_onset IS NOT NULL AND c.htn_onset <= {horizon_end})::INTEGER AS label
    FROM cohort c
    LEFT JOIN vitals v USING (patient_key)
    LEFT JOIN dx d USING (patient_key)
    LEFT JOIN meds m USING (patient_key)
    LEFT JOIN notes n USING (patient_key)
    WHERE c.age_at_index >= {spec.min_age}
    ORDER BY c.patient_key
    """


class FeatureMatrixSchema(pa.DataFrameModel):
    """What a valid feature matrix looks like; checked on every materialization."""

    patient_key: str = pa.Field(unique=True, nullable=False, str_length={"min_value": 8})
    sex: str = pa.Field(nullable=True)
    age_group: str = pa.Field(isin=["18-44", "45-64", "65+"])
    age_at_index: int = pa.Field(ge=18, le=90)
    sex_female: int = pa.Field(isin=[0, 1])
    sbp_last: float = pa.Field(nullable=True, ge=40, le=300)
    sbp_mean_3y: float = pa.Field(nullable=True, ge=40, le=300)
    dbp_last: float = pa.Field(nullable=True, ge=10, le=200)
    bmi_last: float = pa.Field(nullable=True, ge=8, le=100)
    n_bp_readings_3y: int = pa.Field(ge=0)
    encounters_1y: int = pa.Field(ge=0)
    note_htn_affirmed: int = pa.Field(ge=0)
    note_htn_negated: int = pa.Field(ge=0)
    note_family_history_htn: int = pa.Field(isin=[0, 1])
    label: int = pa.Field(isin=[0, 1])

    class Config:
        strict = False  # other feature columns are allowed; these are the ones with rules
        coerce = True


def build_feature_matrix(
    con: duckdb.DuckDBPyConnection, spec: FeatureSpec, source_schema: str = "deid"
) -> pl.DataFrame:
    """Compute and validate the feature matrix (not written anywhere)."""
    frame = con.execute(build_feature_matrix_sql(spec, source_schema)).pl()
    return FeatureMatrixSchema.validate(frame, lazy=True)


def write_feature_matrix(con: duckdb.DuckDBPyConnection, frame: pl.DataFrame, spec: FeatureSpec) -> None:
    """Replace features.feature_matrix and features.feature_spec together."""
    with transaction(con):
        con.execute("CREATE SCHEMA IF NOT EXISTS features")
        con.register("feature_frame", frame.to_arrow())
        con.execute("CREATE OR REPLACE TABLE features.feature_matrix AS SELECT * FROM feature_frame")
        con.unregister("feature_frame")
        con.execute(
            "CREATE OR REPLACE TABLE features.feature_spec AS SELECT ?::DATE AS index_date, ? AS horizon_days, "
            "? AS lookback_days, ? AS min_age",
            [spec.index_date, spec.horizon_days, spec.lookback_days, spec.min_age])


def read_feature_spec(con: duckdb.DuckDBPyConnection) -> FeatureSpec:
    index_date, horizon, lookback, min_age = con.execute("SELECT * FROM features.feature_spec").fetchone()
    return FeatureSpec(index_date=index_date, horizon_days=horizon, lookback_days=lookback, min_age=min_age)


def read_feature_matrix(con: duckdb.DuckDBPyConnection) -> pl.DataFrame:
    return con.execute("SELECT * FROM features.feature_matrix ORDER BY patient_key").pl()
