"""Clinical feature matrix for hypertension risk, from the de-identified tables.

A landmark cohort: one row per (patient, landmark date), at landmarks every
``landmark_interval_months`` across the span the data covers (or pinned dates). For each pair:

- eligible: adult at the landmark, alive, never diagnosed with hypertension on or before it (an
  undated hypertension diagnosis excludes the patient from every landmark), at least one
  encounter in the lookback window, and **observed through the horizon** (a last encounter on
  or after landmark + horizon);
- censoring rule: a patient whose record ends (or who dies) before the horizon is over is
  *unknown*, not negative, and is left out at that landmark, whatever happened; because the rule
  does not look at the outcome, it does not raise or lower the prevalence;
- label: a first hypertension diagnosis in (landmark, landmark + horizon];
- features: only data dated strictly before the landmark.

All landmarks are computed in one set-based pass: a (patient, landmark) table range-joined to
the event tables. Notes are read with the ConText-style classifier of ``note_context`` for each
condition the model uses: "denies a history of hypertension" is a negated mention, "mother has
hypertension" is family history, "history of hypertension" is historical and "rule out
diabetes" hypothetical; only the rest (the patient's, current, asserted) counts as affirmed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import date

import duckdb
import pandera.polars as pa
import polars as pl

from clinical_ml import codes
from clinical_ml.codes import code_match_sql, sql_literal_list
from clinical_ml.db import quote_ident, table_exists, transaction
from clinical_ml.note_context import CONDITIONS, note_mentions_sql

HYPERTENSION_CODE_SQL = code_match_sql(codes.HYPERTENSION)
DIAGNOSIS_FLAGS = {name: code_match_sql(code_list) for name, code_list in codes.DIAGNOSES.items()}

# Per condition of the note features (note_context.CONDITION_TERMS): affirmed current mentions
# (the patient's, not negated, not hypothetical, not historical: "history of X" says nothing of
# now and is left out), negated mentions (the patient's), and family history (someone else's,
# asserted: "no family history of X" is not family history). Only notes dated before the landmark.
NOTE_FEATURES = [name for c in CONDITIONS
                 for name in (f"note_{c}_affirmed", f"note_{c}_negated", f"note_family_history_{c}")]
# What a mention says, one label per mention; the order of the WHENs is the precedence.
MENTION_STATUS_SQL = """CASE WHEN experiencer = 'other' THEN
                                 CASE WHEN NOT negated AND NOT hypothetical THEN 'family' ELSE 'other' END
                            WHEN negated THEN 'negated'
                            WHEN hypothetical THEN 'hypothetical'
                            WHEN historical THEN 'historical'
                            ELSE 'affirmed' END"""

MODEL_FEATURES = [
    "age_at_index", "sex_female",
    "sbp_last", "sbp_mean_1y", "sbp_mean_3y", "sbp_max_3y", "sbp_slope_per_year", "dbp_last", "dbp_mean_3y",
    "n_bp_readings_3y", "bmi_last", "heart_rate_mean_3y", "creatinine_last", "glucose_last", "hba1c_last",
    "current_smoker", *DIAGNOSIS_FLAGS.keys(), "n_distinct_medications", "on_statin",
    "encounters_1y", "ed_visits_3y", "inpatient_stays_3y",
    *NOTE_FEATURES,
]
SUBGROUP_COLUMNS = ["sex", "age_group", "race", "ethnicity"]
ROW_KEY = ["patient_key", "landmark_date"]


@dataclass(frozen=True)
class FeatureSpec:
    """How the landmark cohort is drawn. ``landmarks=None``: derived from the data (see
    ``resolve_landmarks``); a tuple of dates pins them."""

    landmarks: tuple[date, ...] | None = None
    landmark_interval_months: int = 12
    max_landmarks: int = 10
    horizon_days: int = 730
    lookback_days: int = 1095
    min_age: int = 18

    def __post_init__(self):
        for name in ("landmark_interval_months", "max_landmarks", "horizon_days", "lookback_days"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1")


@dataclass(frozen=True)
class LandmarkPlan:
    landmarks: tuple[date, ...]
    data_start: date | None  # first encounter in the (de-identified, date-shifted) data
    data_end: date | None    # where the data ends (see resolve_landmarks)
    derived: bool

    def describe_span(self) -> str:
        if self.data_end is None:
            return "the data has no dated encounters"
        return f"data runs {self.data_start} to about {self.data_end} (de-identified dates)"


def _add_months(day: date, months: int) -> date:
    total = day.year * 12 + day.month - 1 + months
    return date(total // 12, total % 12 + 1, 1)


def _date_mode(con: duckdb.DuckDBPyConnection, schema: str) -> str:
    """How de-identification generalized dates (``shift`` when it did not say)."""
    if not table_exists(con, schema, "settings"):
        return "shift"
    return con.execute(f"SELECT date_mode FROM {quote_ident(schema)}.settings").fetchone()[0]


def resolve_landmarks(con: duckdb.DuckDBPyConnection, spec: FeatureSpec, schema: str = "deid") -> LandmarkPlan:
    """Landmark dates for ``spec``: pinned ones as given; else, on the first of a month, the
    latest landmark whose horizon the data still covers (data end - horizon), then every
    ``landmark_interval_months`` back, at most ``max_landmarks``, none earlier than data
    start + lookback (a landmark needs history behind it)."""
    # Data end: the median last encounter of the patients seen in the final two years. Not the
    # latest date: per-patient date shifting spreads the true end over +/- the shift range, and
    # a landmark placed from the latest shifted date would leave nearly everyone censored.
    year_dates = _date_mode(con, schema) == "year"
    if year_dates and (spec.landmark_interval_months % 12
                       or any((d.month, d.day) != (1, 1) for d in spec.landmarks or ())):
        # every date of a year sits on its 1 January: a landmark inside a year would see that
        # whole year's events as "before" it
        raise ValueError("the de-identified dates are generalized to the year (DEID_DATE_MODE=year): landmarks "
                         "must fall on 1 January and landmark_interval_months be a multiple of 12")
    start, end = con.execute(f"""
        WITH last AS (SELECT max(start_date) AS last_seen FROM {quote_ident(schema)}.encounter GROUP BY patient_key)
        SELECT (SELECT min(start_date) FROM {quote_ident(schema)}.encounter),
               quantile_disc(last_seen, 0.5) FILTER (WHERE last_seen >= (SELECT max(last_seen) FROM last) - 730)
        FROM last""").fetchone()
    if spec.landmarks is not None:
        return LandmarkPlan(tuple(sorted(set(spec.landmarks))), start, end, derived=False)
    if end is None:
        return LandmarkPlan((), start, end, derived=True)
    last = date.fromordinal(end.toordinal() - spec.horizon_days)
    last = date(last.year, 1, 1) if year_dates else date(last.year, last.month, 1)
    earliest = start.toordinal() + spec.lookback_days
    landmarks = []
    for k in range(spec.max_landmarks):
        landmark = _add_months(last, -k * spec.landmark_interval_months)
        if landmark.toordinal() < earliest:
            break
        landmarks.append(landmark)
    return LandmarkPlan(tuple(sorted(landmarks)), start, end, derived=True)


def classify_mentions(con: duckdb.DuckDBPyConnection, texts: list[str]) -> list[list[tuple[str, str]]]:
    """(condition, status) of every mention per text, in text order: the SQL the pipeline uses,
    callable in tests. Status: affirmed, negated, historical, hypothetical, family, other."""
    rows = con.execute(f"""
        WITH classify_input AS (SELECT unnest($texts::VARCHAR[]) AS text,
                                       generate_subscripts($texts::VARCHAR[], 1)::VARCHAR AS note_id)
        SELECT note_id, condition, {MENTION_STATUS_SQL} FROM ({note_mentions_sql('classify_input')})
        ORDER BY note_id::INTEGER, mention_no""", {"texts": texts}).fetchall()
    found: list[list[tuple[str, str]]] = [[] for _ in texts]
    for note_id, condition, status in rows:
        found[int(note_id) - 1].append((condition, status))
    return found


def build_feature_matrix_sql(schema: str = "deid", scoring: bool = False) -> str:
    """The landmark feature matrix as one statement. Parameters: ``$landmarks`` (DATE[]),
    ``$horizon_days``, ``$lookback_days``, ``$min_age``.

    ``scoring=True`` is the same statement for a patient scored now (the service): the future
    is not known yet, so the censoring rule (observed through the horizon) is left out and the
    label means nothing. Every feature is computed by the same SQL either way."""
    s = quote_ident(schema)
    censoring = "" if scoring else "AND s.last_encounter >= l.landmark_date + to_days($horizon_days)"
    dx_cols = ",\n".join(f"bool_or({cond})::INTEGER AS {name}" for name, cond in DIAGNOSIS_FLAGS.items())
    note_cols = ",\n".join(
        f"count(*) FILTER (WHERE n.condition = '{c}' AND n.status = 'affirmed') AS note_{c}_affirmed, "
        f"count(*) FILTER (WHERE n.condition = '{c}' AND n.status = 'negated') AS note_{c}_negated, "
        f"(count(*) FILTER (WHERE n.condition = '{c}' AND n.status = 'family') > 0)::INTEGER AS note_family_history_{c}"
        for c in CONDITIONS)
    statins = sql_literal_list(codes.STATIN_RXNORM)
    smokers = sql_literal_list(codes.CURRENT_SMOKER_SNOMED)

    def obs(codes_tuple: tuple[str, ...]) -> str:
        return f"o.code IN ({sql_literal_list(codes_tuple)})"

    look = "(x.landmark_date - to_days($lookback_days))"
    return f"""
    WITH landmarks AS (SELECT DISTINCT unnest($landmarks::DATE[]) AS landmark_date),
    conditions AS (
        -- Refuted or entered-in-error diagnoses are not diagnoses. A condition is dated by its
        -- onset, else by when it was recorded; it counts as known at a landmark only if it had
        -- also been recorded by then (a back-dated onset entered later is future knowledge).
        SELECT *, coalesce(onset_date, recorded_date) AS dated
        FROM {s}.condition
        WHERE coalesce(verification_status NOT IN ('refuted', 'entered-in-error'), true)
    ),
    htn AS (
        -- An undated hypertension diagnosis cannot be placed before or after a landmark: such
        -- patients are left out rather than guessed into either class.
        -- A diagnosis is known from the later of its onset and its recording: one back-dated
        -- into the past but recorded after a landmark was not known there (the patient looked
        -- undiagnosed, as they would to the deployed model), and counts when it was recorded.
        SELECT patient_key, min(greatest(onset_date, recorded_date)) AS htn_onset,
               bool_or(dated IS NULL) AS htn_undated FROM conditions
        WHERE {HYPERTENSION_CODE_SQL} GROUP BY patient_key
    ),
    last_seen AS (SELECT patient_key, max(start_date) AS last_encounter FROM {s}.encounter GROUP BY patient_key),
    pairs AS (
        SELECT p.patient_key, l.landmark_date, p.gender AS sex, p.race, p.ethnicity,
            -- Safe Harbor hides the birth year of anyone 90+ today; they are counted as 90 at
            -- every landmark (an over-estimate by at most the years since the landmark).
            CASE WHEN p.birth_year IS NULL AND p.age_90_or_older THEN 90
                 ELSE least(year(l.landmark_date) - p.birth_year, 90) END AS age_at_index,
            h.htn_onset
        FROM {s}.patient p
        CROSS JOIN landmarks l
        JOIN last_seen s ON s.patient_key = p.patient_key
        LEFT JOIN htn h ON h.patient_key = p.patient_key
        WHERE (p.death_date IS NULL OR p.death_date > l.landmark_date)
          AND (h.htn_onset IS NULL OR h.htn_onset > l.landmark_date) AND NOT coalesce(h.htn_undated, false)
          -- censoring: observed through the horizon, else unknown (left out), whatever the outcome
          {censoring}
    ),
    enc AS (
        SELECT x.patient_key, x.landmark_date,
            count(*) FILTER (WHERE e.start_date >= x.landmark_date - INTERVAL 365 DAY) AS encounters_1y,
            count(*) FILTER (WHERE e.encounter_class = 'EMER') AS ed_visits_3y,
            count(*) FILTER (WHERE e.encounter_class = 'IMP') AS inpatient_stays_3y,
            count(*) AS encounters_lookback
        FROM pairs x JOIN {s}.encounter e
          ON e.patient_key = x.patient_key AND e.start_date < x.landmark_date AND e.start_date >= {look}
        GROUP BY x.patient_key, x.landmark_date
    ),
    vitals AS (
        -- Float sums depend on the order they are added in, and DuckDB's parallel aggregation has
        -- none: a fixed ORDER BY makes re-runs bit-identical (and the training data hash stable).
        -- "Last" readings break same-day ties by value, for the same reason.
        SELECT x.patient_key, x.landmark_date,
            arg_max(o.value_num, (o.effective_date, o.value_num)) FILTER (WHERE {obs(codes.SYSTOLIC_BP)}) AS sbp_last,
            avg(o.value_num ORDER BY o.effective_date, o.value_num) FILTER (WHERE {obs(codes.SYSTOLIC_BP)}
                                     AND o.effective_date >= x.landmark_date - INTERVAL 365 DAY) AS sbp_mean_1y,
            avg(o.value_num ORDER BY o.effective_date, o.value_num) FILTER (WHERE {obs(codes.SYSTOLIC_BP)}) AS sbp_mean_3y,
            max(o.value_num) FILTER (WHERE {obs(codes.SYSTOLIC_BP)}) AS sbp_max_3y,
            -- one reading (or all on one day) has no slope: missing, not NaN
            nullif(regr_slope(o.value_num, date_diff('day', x.landmark_date, o.effective_date) / 365.25
                            ORDER BY o.effective_date, o.value_num)
                FILTER (WHERE {obs(codes.SYSTOLIC_BP)}), 'NaN'::DOUBLE) AS sbp_slope_per_year,
            arg_max(o.value_num, (o.effective_date, o.value_num)) FILTER (WHERE {obs(codes.DIASTOLIC_BP)}) AS dbp_last,
            avg(o.value_num ORDER BY o.effective_date, o.value_num) FILTER (WHERE {obs(codes.DIASTOLIC_BP)}) AS dbp_mean_3y,
            count(*) FILTER (WHERE {obs(codes.SYSTOLIC_BP)}) AS n_bp_readings_3y,
            arg_max(o.value_num, (o.effective_date, o.value_num)) FILTER (WHERE {obs(codes.BMI)}) AS bmi_last,
            avg(o.value_num ORDER BY o.effective_date, o.value_num) FILTER (WHERE {obs(codes.HEART_RATE)}) AS heart_rate_mean_3y,
            arg_max(o.value_num, (o.effective_date, o.value_num)) FILTER (WHERE {obs(codes.CREATININE)}) AS creatinine_last,
            arg_max(o.value_num, (o.effective_date, o.value_num)) FILTER (WHERE {obs(codes.GLUCOSE)}) AS glucose_last,
            arg_max(o.value_num, (o.effective_date, o.value_num)) FILTER (WHERE {obs(codes.HBA1C)}) AS hba1c_last,
            arg_max(o.value_code, (o.effective_date, o.value_code)) FILTER (WHERE {obs(codes.SMOKING_STATUS)}) AS smoking_status
        FROM pairs x JOIN {s}.observation o
          ON o.patient_key = x.patient_key AND o.effective_date < x.landmark_date AND o.effective_date >= {look}
        GROUP BY x.patient_key, x.landmark_date
    ),
    dx AS (
        SELECT x.patient_key, x.landmark_date, {dx_cols}
        FROM pairs x JOIN conditions c
          ON c.patient_key = x.patient_key AND c.dated < x.landmark_date
             AND coalesce(c.recorded_date < x.landmark_date, true)
        GROUP BY x.patient_key, x.landmark_date
    ),
    meds AS (
        -- prescriptions in the lookback window, by the resolved drug code (inline or referenced)
        SELECT x.patient_key, x.landmark_date,
               count(DISTINCT coalesce(m.medication_system, '') || '|' || m.medication_code) AS n_distinct_medications,
               bool_or(m.rxnorm_code IN ({statins}))::INTEGER AS on_statin
        FROM pairs x JOIN {s}.medication_request m
          ON m.patient_key = x.patient_key AND m.authored_date < x.landmark_date AND m.authored_date >= {look}
        GROUP BY x.patient_key, x.landmark_date
    ),
    note_src AS (
        SELECT document_key AS note_id, patient_key, document_date, note_text AS text
        FROM {s}.document_reference WHERE document_date IS NOT NULL
    ),
    mentions AS (
        -- each note is read once; its mentions then count at every later landmark
        SELECT n.patient_key, n.document_date, m.condition, {MENTION_STATUS_SQL} AS status
        FROM ({note_mentions_sql('note_src')}) m JOIN note_src n USING (note_id)
    ),
    notes AS (
        SELECT x.patient_key, x.landmark_date,
            {note_cols}
        FROM pairs x JOIN mentions n ON n.patient_key = x.patient_key AND n.document_date < x.landmark_date
        GROUP BY x.patient_key, x.landmark_date
    )
    SELECT
        c.patient_key,
        c.landmark_date,
        c.sex, coalesce(c.race, 'Unknown') AS race, coalesce(c.ethnicity, 'Unknown') AS ethnicity,
        CASE WHEN c.age_at_index < 18 THEN '0-17' WHEN c.age_at_index < 45 THEN '18-44'
             WHEN c.age_at_index < 65 THEN '45-64' ELSE '65+' END AS age_group,
        c.age_at_index::INTEGER AS age_at_index,
        (c.sex = 'female')::INTEGER AS sex_female,
        v.sbp_last, v.sbp_mean_1y, v.sbp_mean_3y, v.sbp_max_3y, v.sbp_slope_per_year, v.dbp_last, v.dbp_mean_3y,
        coalesce(v.n_bp_readings_3y, 0) AS n_bp_readings_3y,
        v.bmi_last, v.heart_rate_mean_3y, v.creatinine_last, v.glucose_last, v.hba1c_last,
        coalesce(v.smoking_status IN ({smokers}), false)::INTEGER AS current_smoker,
        {", ".join(f"coalesce(d.{n}, 0) AS {n}" for n in DIAGNOSIS_FLAGS)},
        coalesce(m.n_distinct_medications, 0) AS n_distinct_medications,
        coalesce(m.on_statin, 0) AS on_statin,
        e.encounters_1y, e.ed_visits_3y, e.inpatient_stays_3y,
        {", ".join(f"coalesce(n.{name}, 0) AS {name}" for name in NOTE_FEATURES)},
        (c.htn_onset IS NOT NULL AND c.htn_onset <= c.landmark_date + to_days($horizon_days))::INTEGER AS label
    FROM pairs c
    -- enough history: at least one encounter in the lookback window
    JOIN enc e ON e.patient_key = c.patient_key AND e.landmark_date = c.landmark_date
    LEFT JOIN vitals v ON v.patient_key = c.patient_key AND v.landmark_date = c.landmark_date
    LEFT JOIN dx d ON d.patient_key = c.patient_key AND d.landmark_date = c.landmark_date
    LEFT JOIN meds m ON m.patient_key = c.patient_key AND m.landmark_date = c.landmark_date
    LEFT JOIN notes n ON n.patient_key = c.patient_key AND n.landmark_date = c.landmark_date
    WHERE c.age_at_index >= $min_age
    ORDER BY c.patient_key, c.landmark_date
    """


class FeatureMatrixSchema(pa.DataFrameModel):
    """What a valid feature matrix looks like; checked on every materialization."""

    patient_key: str = pa.Field(nullable=False, str_length={"min_value": 8})
    landmark_date: date = pa.Field(nullable=False)
    sex: str = pa.Field(nullable=True)
    age_group: str = pa.Field(isin=["0-17", "18-44", "45-64", "65+"])  # 0-17 only when min_age allows
    age_at_index: int = pa.Field(ge=0, le=90)
    sex_female: int = pa.Field(isin=[0, 1])
    sbp_last: float = pa.Field(nullable=True, ge=40, le=300)
    sbp_mean_3y: float = pa.Field(nullable=True, ge=40, le=300)
    dbp_last: float = pa.Field(nullable=True, ge=10, le=200)
    bmi_last: float = pa.Field(nullable=True, ge=8, le=100)
    n_bp_readings_3y: int = pa.Field(ge=0)
    encounters_1y: int = pa.Field(ge=0)
    # note features (NOTE_FEATURES): counts of mentions, family history a flag
    note_htn_affirmed: int = pa.Field(ge=0)
    note_htn_negated: int = pa.Field(ge=0)
    note_family_history_htn: int = pa.Field(isin=[0, 1])
    note_diabetes_affirmed: int = pa.Field(ge=0)
    note_diabetes_negated: int = pa.Field(ge=0)
    note_family_history_diabetes: int = pa.Field(isin=[0, 1])
    note_ckd_affirmed: int = pa.Field(ge=0)
    note_ckd_negated: int = pa.Field(ge=0)
    note_family_history_ckd: int = pa.Field(isin=[0, 1])
    note_obesity_affirmed: int = pa.Field(ge=0)
    note_obesity_negated: int = pa.Field(ge=0)
    note_family_history_obesity: int = pa.Field(isin=[0, 1])
    note_smoking_affirmed: int = pa.Field(ge=0)
    note_smoking_negated: int = pa.Field(ge=0)
    note_family_history_smoking: int = pa.Field(isin=[0, 1])
    note_hyperlipidemia_affirmed: int = pa.Field(ge=0)
    note_hyperlipidemia_negated: int = pa.Field(ge=0)
    note_family_history_hyperlipidemia: int = pa.Field(isin=[0, 1])
    label: int = pa.Field(isin=[0, 1])

    class Config:
        strict = False  # other feature columns are allowed; these are the ones with rules
        coerce = True
        unique = ROW_KEY  # one row per patient and landmark


# The schema lists the note features by name; a condition added to note_context.CONDITIONS
# without its rules here would go unchecked, so refuse to import instead.
_UNCHECKED_NOTE_FEATURES = set(NOTE_FEATURES) - set(FeatureMatrixSchema.to_schema().columns)
if _UNCHECKED_NOTE_FEATURES:
    raise RuntimeError(f"FeatureMatrixSchema has no rule for {sorted(_UNCHECKED_NOTE_FEATURES)}")


def build_feature_matrix(con: duckdb.DuckDBPyConnection, spec: FeatureSpec, source_schema: str = "deid",
                         plan: LandmarkPlan | None = None) -> pl.DataFrame:
    """Compute and validate the feature matrix (not written anywhere)."""
    plan = plan or resolve_landmarks(con, spec, source_schema)
    return _features(con, build_feature_matrix_sql(source_schema), list(plan.landmarks), spec)


def scoring_features(con: duckdb.DuckDBPyConnection, spec: FeatureSpec, landmark: date,
                     source_schema: str = "deid") -> pl.DataFrame:
    """Features of every eligible patient in ``source_schema`` at ``landmark`` (de-identified
    time), as a model in service sees them: no censoring, no label. Empty when nobody is
    eligible (under ``min_age``, already diagnosed, no encounter in the lookback window)."""
    return _features(con, build_feature_matrix_sql(source_schema, scoring=True), [landmark], spec).drop("label")


def _features(con: duckdb.DuckDBPyConnection, sql: str, landmarks: list[date], spec: FeatureSpec) -> pl.DataFrame:
    frame = con.execute(sql, {"landmarks": landmarks, "horizon_days": int(spec.horizon_days),
                              "lookback_days": int(spec.lookback_days), "min_age": int(spec.min_age)}).pl()
    return FeatureMatrixSchema.validate(frame, lazy=True)


def landmark_summary(frame: pl.DataFrame, plan: LandmarkPlan) -> pl.DataFrame:
    """Per landmark: eligible (patient, landmark) rows, positives and prevalence (every
    planned landmark, also those where nobody was eligible)."""
    counts = frame.group_by("landmark_date").agg(eligible=pl.len(), positives=pl.col("label").sum())
    planned = pl.DataFrame({"landmark_date": list(plan.landmarks)}, schema={"landmark_date": pl.Date})
    return planned.join(counts, on="landmark_date", how="left").with_columns(
        pl.col("eligible").fill_null(0).cast(pl.Int64), pl.col("positives").fill_null(0).cast(pl.Int64),
    ).with_columns(prevalence=pl.when(pl.col("eligible") > 0).then(pl.col("positives") / pl.col("eligible"))
                   ).sort("landmark_date")


def write_feature_matrix(con: duckdb.DuckDBPyConnection, frame: pl.DataFrame, spec: FeatureSpec,
                         plan: LandmarkPlan) -> None:
    """Replace features.feature_matrix and features.feature_spec together."""
    with transaction(con):
        con.execute("CREATE SCHEMA IF NOT EXISTS features")
        con.register("feature_frame", frame.to_arrow())
        con.execute("CREATE OR REPLACE TABLE features.feature_matrix AS SELECT * FROM feature_frame")
        con.unregister("feature_frame")
        con.execute(
            """CREATE OR REPLACE TABLE features.feature_spec AS SELECT ?::DATE[] AS landmarks, ? AS landmarks_derived,
                   ? AS landmark_interval_months, ? AS max_landmarks, ? AS horizon_days, ? AS lookback_days,
                   ? AS min_age, ?::DATE AS data_start, ?::DATE AS data_end""",
            [list(plan.landmarks), plan.derived, spec.landmark_interval_months, spec.max_landmarks,
             spec.horizon_days, spec.lookback_days, spec.min_age, plan.data_start, plan.data_end])


def read_feature_spec(con: duckdb.DuckDBPyConnection) -> tuple[FeatureSpec, LandmarkPlan]:
    """The spec and landmarks of the stored feature matrix."""
    row = con.execute(
        """SELECT landmarks, landmarks_derived, landmark_interval_months, max_landmarks, horizon_days, lookback_days,
                  min_age, data_start, data_end FROM features.feature_spec""").fetchone()
    landmarks, derived, interval, max_landmarks, horizon, lookback, min_age, start, end = row
    spec = FeatureSpec(landmarks=None if derived else tuple(landmarks), landmark_interval_months=interval,
                       max_landmarks=max_landmarks, horizon_days=horizon, lookback_days=lookback, min_age=min_age)
    return spec, LandmarkPlan(tuple(landmarks), start, end, derived)


def read_feature_matrix(con: duckdb.DuckDBPyConnection) -> pl.DataFrame:
    return con.execute("SELECT * FROM features.feature_matrix ORDER BY patient_key, landmark_date").pl()

