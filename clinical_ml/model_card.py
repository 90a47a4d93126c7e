"""The model card (seed stage 6) of one model version: what it is for and for whom, what it was
trained on, the cohort and features, held-out metrics with CIs overall and by subgroup, the
gates it met or not, the promotion decision, known limitations and lineage.

Built from the warehouse (``ml``, ``audit``) and the batch files the model trained on, and
deterministic for the same data (no clock reads): re-building a card changes it only when the
evidence changed. The card leaves the de-identification boundary (it is logged to MLflow and
shown in the UI), so it holds aggregates, hashes and identifiers of runs and records only, never
a patient key or a row.
"""

from __future__ import annotations

import hashlib

import math
from contextlib import ExitStack
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import orjson

from clinical_ml.db import table_exists, transaction
from clinical_ml.features import SUBGROUP_COLUMNS, FeatureSpec, read_feature_spec
from clinical_ml.policy import ClinicalPolicy, Thresholds
from clinical_ml.promotion import GATE_METRICS
from clinical_ml.synthetic import SYNTHETIC_TAG

if TYPE_CHECKING:
    from clinical_ml.batches import BatchStore

CARD_FORMAT_VERSION = 1
ALGORITHM = "CatBoost gradient-boosted trees (a logistic-regression baseline is trained beside it for comparison)"
INTENDED_USERS = [
    "primary-care clinicians and practice teams deciding whom to invite for blood-pressure screening or follow-up",
    "population-health and care-management teams prioritizing outreach",
]
DATA_SOURCE = ("FHIR R4 records, de-identified before any feature is computed: keyed pseudonyms instead of "
               "identifiers, generalized dates, scrubbed notes, ages over 89 grouped")

_DDL = """
CREATE SCHEMA IF NOT EXISTS ml;
CREATE TABLE IF NOT EXISTS ml.model_cards (
    model_version INTEGER PRIMARY KEY,
    created_at TIMESTAMPTZ NOT NULL,
    card JSON NOT NULL,
    markdown VARCHAR NOT NULL
);
"""

Sources = list[tuple[str, duckdb.DuckDBPyConnection]]  # (batch key, read-only connection to its file)


# -- building ------------------------------------------------------------------------------

def build_model_card(con: duckdb.DuckDBPyConnection, model_version: int, *, policy: ClinicalPolicy,
                     dagster_run_id: str | None, feature_spec: FeatureSpec | None = None,
                     batch_store: BatchStore | None = None, registered_model_name: str | None = None,
                     training_dagster_run_id: str | None = None) -> dict:
    """The card of ``model_version`` as plain JSON values, from the warehouse ``con`` and the
    batch files of the model's training window in ``batch_store`` (without them, ``con`` is
    read as a single-file warehouse with raw, deid and features beside ml).

    ``dagster_run_id``: the run that builds the card; ``training_dagster_run_id``: the run that
    trained the model, when known. ``feature_spec`` defaults to the spec the newest batch of
    the window drew its cohort with."""
    model = _model(con, model_version)
    metrics = _rows(con, "validation_report", model_version, ["metric", "value", "rule", "passed"],
                    ["ci_low", "ci_high", "worst_subgroup"])
    metrics.sort(key=lambda m: (GATE_METRICS.index(m["metric"]) if m["metric"] in GATE_METRICS else len(GATE_METRICS),
                                m["metric"]))
    subgroups = sorted(_rows(con, "subgroup_performance", model_version,
                             ["attribute", "group", "n", "positives", "auroc", "evaluable"], ["ci_low", "ci_high"]),
                       key=lambda s: (s["attribute"], s["group"]))
    promotion = _promotion(con, model_version)
    with ExitStack() as stack:
        sources = _training_data_sources(stack, con, batch_store, model["training_window"])
        spec, spec_source = _feature_spec(sources, feature_spec)
        card = {
            "card_format_version": CARD_FORMAT_VERSION,
            "model": {"name": registered_model_name, "model_version": model_version,
                      "registry_version": model["registry_version"], "created_at": model["created_at"],
                      "model_sha256": model["model_sha256"], "algorithm": ALGORITHM, "params": model["params"]},
            "intended_use": {"purpose": _purpose(spec), "users": INTENDED_USERS, "out_of_scope": _out_of_scope(spec)},
            "training_data": {
                "sha256": model["training_data_hash"],
                "window": model["training_window"],  # None for models trained before data batches
                "source": DATA_SOURCE,
                "batches": [{"batch": key, **_provenance(source)} for key, source in sources],
                **{k: model["metrics"].get(k) for k in ("n_patients", "n_landmarks", "train_prevalence",
                                                         "test_prevalence")},
            },
            "cohort": {"spec": _spec_dict(spec), "spec_source": spec_source, "definition": cohort_definition(spec)},
            "features": {"names": model["feature_names"],
                         "rule": "computed only from data dated strictly before the landmark"},
            "metrics": metrics,
            "operating_point": _operating_point(con, model_version),
            "training_metrics": model["metrics"],
            "subgroups": subgroups,
            "gates": _gates(metrics, policy),
            "promotion": promotion,
            "lineage": {
                "mlflow_run_id": model["mlflow_run_id"], "registered_model": registered_model_name,
                "registry_version": model["registry_version"], "training_dagster_run_id": training_dagster_run_id,
                "card_dagster_run_id": dagster_run_id,
                "audit_record": _audit_record(con, promotion["audit_sequence"]) if promotion else None,
            },
        }
        card = orjson.loads(card_json(card))  # plain JSON values: NaN becomes null, dates ISO text
        card["known_limitations"] = known_limitations(card, policy)
        _refuse_patient_keys([con, *(source for _, source in sources)], card_json(card))
    return card


def cohort_definition(spec: FeatureSpec) -> list[str]:
    """The landmark cohort of ``spec`` in words (see ``clinical_ml.features``)."""
    if spec.landmarks is not None:
        landmarks = "pinned landmark dates: " + ", ".join(str(d) for d in sorted(spec.landmarks))
    else:
        landmarks = (f"landmarks every {spec.landmark_interval_months} months, at most {spec.max_landmarks}, the "
                     f"latest one whose {spec.horizon_days}-day horizon the data still covers")
    return [
        f"One row per (patient, landmark date); {landmarks}.",
        f"Eligible at a landmark: aged {spec.min_age} or older, alive, no hypertension diagnosis on or before it (an "
        "undated hypertension diagnosis excludes the patient at every landmark), at least one encounter in the "
        f"{spec.lookback_days} days before it.",
        f"Observed through the horizon: a last encounter on or after landmark + {spec.horizon_days} days; a record "
        "that ends earlier (or a death) is unknown, not negative, and is left out at that landmark.",
        f"Label: a first hypertension diagnosis in (landmark, landmark + {spec.horizon_days} days].",
        "Features: only data dated strictly before the landmark; notes read with negation and family-history rules.",
    ]


def known_limitations(card: dict, policy: ClinicalPolicy) -> list[str]:
    """Standing caveats, and those this version's evidence shows (data, gates, subgroups, promotion)."""
    spec, data = card["cohort"]["spec"], card["training_data"]
    out = [
        "The label is a recorded hypertension diagnosis, not measured blood pressure: patients with undiagnosed "
        "hypertension count as negatives, so the model learns diagnosis patterns as much as disease.",
        f"Patients whose record ends within {spec['horizon_days']} days of a landmark are left out at it (censored); "
        "performance for patients who leave care is not measured.",
    ]
    date_modes = {b["date_mode"] for b in data["batches"]} or {None}
    out += [{
        "shift": "Dates are de-identified by a secret per-patient shift: intervals within a patient are kept, but "
                 "calendar time (season, year, the landmark dates in this card) is blurred across patients.",
        "year": "Dates are generalized to 1 January of their year: timing within a year is lost, so windows and "
                "landmarks are coarse.",
    }.get(mode, "How dates were de-identified is not recorded for the training data.")
        for mode in sorted(date_modes, key=str)]
    synthetic = [b for b in data["batches"] if b["synthetic_patients"]]
    if synthetic and all(b["synthetic_patients"] == b["patients"] for b in data["batches"]):
        out.append("Trained and validated on synthetic patients from the built-in generator (the only data the "
                   "published demo key may de-identify): these metrics say nothing about real patients.")
    elif synthetic:
        out.append("Part of the training data is synthetic (built-in generator): " + ", ".join(
            f"{b['batch']} {b['synthetic_patients']} of {b['patients']} patients" for b in synthetic) + ".")

    held_out = next((m["value"] for m in card["metrics"] if m["metric"] == "auroc"), None)
    temporal = card["training_metrics"].get("temporal_test_auroc")
    if temporal is None:
        out.append("No temporal validation could be measured (too few landmarks or outcomes in the later period): "
                   "how the model does on data later than its training data is unknown.")
    else:
        line = (f"Temporal validation (trained on earlier landmarks, tested on later ones) gives AUROC {temporal:.3f}"
                + (f" against {held_out:.3f} on the random patient split" if held_out is not None else ""))
        if held_out is not None and temporal < held_out - 0.02:
            line += ": performance falls on later data; expect less than the headline AUROC in use"
        out.append(line + ".")
    out.append("All validation is retrospective and from the same source as the training data; performance after "
               "changes in population, coding or care practice is known only from monitoring (the drift report).")

    if not card["metrics"]:
        out.append("No validation report exists for this version: its performance is not established.")
    attributes = {s["attribute"] for s in card["subgroups"]}
    if missing := [c for c in SUBGROUP_COLUMNS if c not in attributes]:
        out.append(f"No subgroup results by {', '.join(missing)}.")
    if unevaluable := [f"{s['attribute']}={s['group']} (n={s['n']}, {s['positives']} positives)"
                       for s in card["subgroups"] if not s["evaluable"]]:
        out.append("Subgroups too small to evaluate (too few positives or negatives), performance unknown: "
                   + ", ".join(unevaluable) + ".")
    for gate in card["gates"]["results"]:
        if gate["met"] is None:
            out.append(f"Gate {gate['metric']} was not validated.")
        elif not gate["met"]:
            value = "not measurable" if gate["value"] is None else f"{gate['value']:.4f}"
            worst = f", worst subgroup {gate['worst_subgroup']}" if gate["worst_subgroup"] else ""
            out.append(f"Gate {gate['metric']} not met: {value}{worst} (rule {gate['rule']}).")
        elif gate["threshold"] and _threshold_of(gate["rule"]) != gate["threshold"]:
            out.append(f"Gate {gate['metric']} was judged against {_threshold_of(gate['rule'])}; policy "
                       f"{policy.version} now says {gate['threshold']}.")

    promotion = card["promotion"]
    if promotion is None:
        out.append("No promotion decision is recorded for this version yet: model_promotion judges it on this card "
                   "(the decision, in ml.promotions and the audit log, cites the card's hash).")
    elif promotion["by_exception"]:
        approval = promotion["approval"]
        out.append(f"Promoted by exception, approved by {approval['approved_by']} ({approval['reason']}), despite: "
                   + "; ".join(r for r in promotion["reasons"] if not r.startswith("promoted by exception")) + ".")
    elif not promotion["promoted"]:
        out.append("Not promoted to champion: " + "; ".join(promotion["reasons"]) + ".")
    if promotion and promotion["policy_version"] != policy.version:
        out.append(f"The promotion was decided under policy {promotion['policy_version']}; the thresholds shown are "
                   f"policy {policy.version}.")
    return out


# -- reads (tolerant of what older warehouses lack) ------------------------------------------

def _columns(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> set[str]:
    return {c for (c,) in con.execute(
        "SELECT column_name FROM duckdb_columns() WHERE schema_name = ? AND table_name = ?", [schema, table]).fetchall()}


def _model(con: duckdb.DuckDBPyConnection, model_version: int) -> dict:
    optional = [c for c in ("registry_version", "training_window") if c in _columns(con, "ml", "models")]
    names = ["created_at", "mlflow_run_id", "training_data_hash", "model_sha256", "feature_names", "params", "metrics",
             *optional]
    row = con.execute(f"SELECT {', '.join(names)} FROM ml.models WHERE model_version = ?", [model_version]).fetchone() \
        if table_exists(con, "ml", "models") else None
    if row is None:
        raise LookupError(f"no model version {model_version} in ml.models")
    model = {"registry_version": None, "training_window": None, **dict(zip(names, row))}
    for name in ("params", "metrics", "training_window"):
        if isinstance(model[name], str):
            model[name] = orjson.loads(model[name])
    model["feature_names"] = list(model["feature_names"])
    return model


def _rows(con: duckdb.DuckDBPyConnection, table: str, model_version: int, names: list[str],
          optional: list[str]) -> list[dict]:
    """This version's rows of an ``ml`` report table; ``optional`` columns (CIs, added later)
    are None where the table lacks them."""
    if not table_exists(con, "ml", table):
        return []
    present = _columns(con, "ml", table)
    select = [f'"{n}"' for n in names] + [c if c in present else f"NULL AS {c}" for c in optional]
    cursor = con.execute(f"SELECT {', '.join(select)} FROM ml.{table} WHERE model_version = ?", [model_version])
    return [dict(zip([*names, *optional], row)) for row in cursor.fetchall()]


def _training_data_sources(stack: ExitStack, con: duckdb.DuckDBPyConnection, batch_store: BatchStore | None,
                           window: dict | None) -> Sources:
    """The batch files the model trained on, oldest first, opened read-only; a single-file
    warehouse (raw, deid and features beside ml) is its own source."""
    keys = ((window or {}).get("batches") or []) if batch_store is not None else []
    sources = [(key, stack.enter_context(batch_store.read(key)))
               for key in keys if batch_store.path(key).exists()]
    return sources or ([("warehouse", con)] if table_exists(con, "features", "feature_spec") else [])


def _feature_spec(sources: Sources, spec: FeatureSpec | None) -> tuple[FeatureSpec, str]:
    if spec is not None:
        return spec, "given"
    for key, source in reversed(sources):  # the newest batch (a window's batches share the rules)
        if table_exists(source, "features", "feature_spec"):
            return read_feature_spec(source)[0], f"features.feature_spec of {key}"
    return FeatureSpec(), "defaults (no feature spec stored)"


def _spec_dict(spec: FeatureSpec) -> dict:
    return {"landmarks": None if spec.landmarks is None else sorted(str(d) for d in spec.landmarks),
            "landmark_interval_months": spec.landmark_interval_months, "max_landmarks": spec.max_landmarks,
            "horizon_days": spec.horizon_days, "lookback_days": spec.lookback_days, "min_age": spec.min_age}


def _provenance(source: duckdb.DuckDBPyConnection) -> dict:
    """How a batch's dates were de-identified, and how many of its landed patients the built-in
    generator made (it tags each one)."""
    date_mode = source.execute("SELECT date_mode FROM deid.settings").fetchone()[0] \
        if table_exists(source, "deid", "settings") else None
    patients, synthetic = source.execute(
        "SELECT count(*), count(*) FILTER (WHERE json_contains(coalesce(resource->'meta'->'tag', '[]'), ?)) "
        "FROM raw.patient", [orjson.dumps(SYNTHETIC_TAG).decode()]).fetchone() \
        if table_exists(source, "raw", "patient") else (None, None)
    return {"date_mode": date_mode, "patients": patients, "synthetic_patients": synthetic}


def _operating_point(con: duckdb.DuckDBPyConnection, model_version: int) -> dict | None:
    """Where the model alerts: the threshold at the gate's specificity on its held-out patients."""
    from clinical_ml.validation import operating_point

    if not table_exists(con, "ml", "test_predictions"):
        return None
    y, score = con.execute("SELECT list(y_true ORDER BY patient_key, landmark_date), list(score ORDER BY patient_key, "
                           "landmark_date) FROM ml.test_predictions WHERE model_version = ?", [model_version]).fetchone()
    if not y or len(set(y)) < 2:
        return None
    return operating_point(np.asarray(y), np.asarray(score))


def _promotion(con: duckdb.DuckDBPyConnection, model_version: int) -> dict | None:
    """The latest promotion decision on this version."""
    if not table_exists(con, "ml", "promotions"):
        return None
    row = con.execute(
        """SELECT decided_at, promoted, reasons, approval, policy_version, audit_sequence FROM ml.promotions
           WHERE model_version = ? ORDER BY decided_at DESC LIMIT 1""", [model_version]).fetchone()
    if row is None:
        return None
    decided_at, promoted, reasons, approval, policy_version, audit_sequence = row
    reasons, approval = orjson.loads(reasons), orjson.loads(approval) if approval else None
    # stored reasons are the failures, then the exception note: an approval when nothing
    # failed (nothing to except) leaves them empty
    return {"decided_at": decided_at, "promoted": promoted, "reasons": reasons, "approval": approval,
            "by_exception": bool(promoted and approval and reasons), "policy_version": policy_version,
            "audit_sequence": audit_sequence}


def _audit_record(con: duckdb.DuckDBPyConnection, sequence: int | None) -> dict | None:
    if sequence is None or not table_exists(con, "audit", "audit_log"):
        return None
    row = con.execute("""SELECT sequence, record_id, recorded_at, record_hash, body->>'event' FROM audit.audit_log
                         WHERE sequence = ?""", [sequence]).fetchone()
    return None if row is None else dict(zip(["sequence", "record_id", "recorded_at", "record_hash", "event"], row))


def _refuse_patient_keys(cons: list[duckdb.DuckDBPyConnection], text: bytes) -> None:
    """The card is built from aggregates, but free text in it (an approval reason, say) is
    checked against the held-out and training patient keys before the card can leave."""
    for con in cons:
        sources = [f"SELECT patient_key FROM {t}" for t in ("ml.test_predictions", "features.feature_matrix")
                   if table_exists(con, *t.split("."))]
        if sources and con.execute(
                f"""SELECT count(*) FROM (SELECT DISTINCT patient_key FROM ({' UNION ALL '.join(sources)}))
                    WHERE length(patient_key) >= 8 AND contains(?, patient_key)""", [text.decode()]).fetchone()[0]:
            raise ValueError("the model card contains a patient key: refusing to publish it")


# -- words from numbers ---------------------------------------------------------------------

def _years(days: int) -> str:
    return f"{days / 365.25:.1f}".removesuffix(".0")


def _purpose(spec: FeatureSpec) -> str:
    return (f"Estimates, for a primary-care patient aged {spec.min_age} or older with no hypertension diagnosis, the "
            f"probability of a first hypertension diagnosis within {spec.horizon_days} days (about "
            f"{_years(spec.horizon_days)} years) of a landmark date, from the record before that date. Decision "
            "support for screening and follow-up: it ranks patients for attention; it does not diagnose.")


def _out_of_scope(spec: FeatureSpec) -> list[str]:
    return [
        "diagnosing hypertension (that needs repeated blood-pressure measurement) or choosing treatment",
        f"patients younger than {spec.min_age} or already diagnosed with hypertension (outside the cohort)",
        f"horizons other than {spec.horizon_days} days",
        "populations unlike the training data, without local validation",
    ]


def policy_thresholds(thresholds: Thresholds) -> dict[str, str]:
    """Each gate's threshold, written as the validation report writes its rule."""
    low, high = thresholds.calibration_slope_range
    return {"auroc": f">= {thresholds.min_auroc}",
            "sensitivity_at_90_specificity": f">= {thresholds.min_sensitivity_at_90_specificity}",
            "calibration_slope": f"{low} to {high}",
            "subgroup_auroc_gap": f"< {thresholds.max_subgroup_auroc_gap}",
            "cv_auroc_std": f"< {thresholds.max_cv_auroc_std}"}


def _is_gate(rule: str | None) -> bool:
    # "reported" rows (possibly with a note after "reported;") are evidence, not gates
    return rule is not None and not rule.startswith("reported")


def _threshold_of(rule: str) -> str:
    return rule.split(";")[0].strip()  # a rule may carry notes after the threshold


def _gates(metrics: list[dict], policy: ClinicalPolicy) -> dict:
    thresholds = policy_thresholds(policy.validation)
    judged = {m["metric"]: m for m in metrics if _is_gate(m["rule"])}
    results = [{"metric": name, "value": m["value"], "ci_low": m["ci_low"], "ci_high": m["ci_high"],
                "worst_subgroup": m["worst_subgroup"], "threshold": thresholds.get(name), "rule": m["rule"],
                "met": bool(m["passed"])} for name, m in judged.items()]
    # a gate the promotion needs but the report lacks: not validated (and so not met)
    results += [{"metric": name, "value": None, "ci_low": None, "ci_high": None, "worst_subgroup": None,
                 "threshold": thresholds.get(name), "rule": None, "met": None}
                for name in GATE_METRICS if name not in judged]
    return {"policy_version": policy.version, "all_met": bool(results) and all(g["met"] for g in results),
            "results": results}


# -- output ---------------------------------------------------------------------------------

def card_json(card: dict) -> bytes:
    """Canonical JSON: sorted keys, so the same card is always the same bytes."""
    return orjson.dumps(card, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        if len(value) > 6:
            return f"{_fmt(value[0])} … {_fmt(value[-1])} ({len(value)})"
        return ", ".join(map(_fmt, value))
    if isinstance(value, dict):
        return "; ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return str(value).replace("|", "\\|").replace("\n", " ")


def _ci(row: dict) -> str:
    return "—" if row.get("ci_low") is None or row.get("ci_high") is None else \
        f"{_fmt(row['ci_low'])} to {_fmt(row['ci_high'])}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(map(_fmt, row)) + " |" for row in rows), ""]


def _status(promotion: dict | None) -> str:
    if promotion is None:
        return "not yet judged for service"
    if promotion["by_exception"]:
        return f"promoted to champion **by exception** (approved by {promotion['approval']['approved_by']})"
    return "promoted to champion" if promotion["promoted"] else "**not promoted**"


def render_markdown(card: dict) -> str:
    model, data, gates, lineage = card["model"], card["training_data"], card["gates"], card["lineage"]
    promotion, audit, name = card["promotion"], lineage["audit_record"], model["name"] or "model"
    title = f"{name} v{model['registry_version']}" if model["registry_version"] else \
        f"{name} (warehouse model {model['model_version']})"
    lines = [f"# Model card: {title}", "",
             f"Warehouse model {model['model_version']}, trained {model['created_at']}. Gates "
             f"{'all met' if gates['all_met'] else '**not all met**'} (policy {gates['policy_version']}). "
             f"Promotion: {_status(promotion)}.", "",
             "## Intended use", "", card["intended_use"]["purpose"], "",
             "**Intended users:** " + "; ".join(card["intended_use"]["users"]) + ".", "",
             "**Out of scope:** " + "; ".join(card["intended_use"]["out_of_scope"]) + ".", "",
             "## Training data", ""]
    window = data["window"]
    lines += _table(["", ""], [
        ["data SHA-256", f"`{data['sha256']}`"],
        *([["window", "not recorded"]] if window is None else [[f"window: {k}", v] for k, v in sorted(window.items())]),
        ["patients / landmarks", f"{_fmt(data['n_patients'])} / {_fmt(data['n_landmarks'])}"],
        ["prevalence (train / test)", f"{_fmt(data['train_prevalence'])} / {_fmt(data['test_prevalence'])}"],
        *([f"landed data {b['batch']}", f"dates: {b['date_mode'] or 'not recorded'}; patients: {_fmt(b['patients'])}, "
           f"synthetic: {_fmt(b['synthetic_patients'])}"] for b in data["batches"]),
        ["source", data["source"]],
    ])
    lines += ["## Cohort definition", "", f"From the feature spec ({card['cohort']['spec_source']}).", "",
              *(f"- {line}" for line in card["cohort"]["definition"]), "",
              f"## Features ({len(card['features']['names'])})", "",
              f"{model['algorithm']}; features {card['features']['rule']}: "
              + ", ".join(f"`{n}`" for n in card["features"]["names"]) + ".", "",
              "## Metrics (held-out patients, 95% CI)", ""]
    lines += _table(["metric", "value", "95% CI", "rule", "met"],
                    [[m["metric"], m["value"], _ci(m), m["rule"], m["passed"] if _is_gate(m["rule"]) else None]
                     for m in card["metrics"]]) if card["metrics"] else ["No validation report for this version.", ""]
    point = card.get("operating_point")
    lines += ["## Operating point", "", "Not measurable (the held-out set lacks one class)." if point is None else
              f"The service alerts at a score of {point['threshold']:.4f} or more: on held-out patients, sensitivity "
              f"{point['sensitivity']:.3f} at specificity {point['specificity']:.3f} (target "
              f"{point['target_specificity']:.2f}), PPV {_fmt(point['ppv'])}, alert rate {point['alert_rate']:.3f}.", ""]
    lines += ["## Subgroups", ""]
    lines += _table(["attribute", "group", "n", "positives", "AUROC", "95% CI", "evaluable"],
                    [[s["attribute"], s["group"], s["n"], s["positives"], s["auroc"], _ci(s), s["evaluable"]]
                     for s in card["subgroups"]]) if card["subgroups"] else ["No subgroup results.", ""]
    lines += [f"## Gates (policy {gates['policy_version']})", ""]
    lines += _table(["gate", "value", "95% CI", "policy threshold", "met"],
                    [[g["metric"], g["value"], _ci(g), g["threshold"],
                      "not validated" if g["met"] is None else g["met"]] for g in gates["results"]])
    lines += ["## Promotion decision", ""]
    lines += ["Not decided yet: `model_promotion` judges this version on this card; the registry's `champion` "
              "alias and the audit log record the outcome.", ""] if promotion is None else [
        f"Decided {promotion['decided_at']} under policy {promotion['policy_version']}: {_status(promotion)}.", "",
        *(f"- {r}" for r in promotion["reasons"]), ""]
    lines += ["## Known limitations", "", *(f"- {item}" for item in card["known_limitations"]), "",
              "## Lineage", ""]
    lines += _table(["", ""], [
        ["MLflow run", f"`{lineage['mlflow_run_id']}`" if lineage["mlflow_run_id"] else None],
        ["registered model", f"{lineage['registered_model']} v{lineage['registry_version']}"
         if lineage["registry_version"] else None],
        ["model SHA-256", f"`{model['model_sha256']}`"],
        ["Dagster run (training)", lineage["training_dagster_run_id"]],
        ["Dagster run (this card)", lineage["card_dagster_run_id"]],
        ["audit record", None if audit is None else
         f"#{audit['sequence']} {audit['event']}, hash `{audit['record_hash']}` ({audit['recorded_at']})"],
    ])
    return "\n".join(lines)


def save_model_card(con: duckdb.DuckDBPyConnection, card: dict, markdown: str) -> None:
    """Replace this version's row of ``ml.model_cards``."""
    con.execute(_DDL)
    version = card["model"]["model_version"]
    with transaction(con):
        con.execute("DELETE FROM ml.model_cards WHERE model_version = ?", [version])
        con.execute("INSERT INTO ml.model_cards VALUES (?, ?, ?, ?)",
                    [version, datetime.now(timezone.utc), card_json(card).decode(), markdown])


def model_card_sha256(con: duckdb.DuckDBPyConnection, model_version: int) -> str | None:
    """SHA-256 of the stored card (its JSON) of ``model_version``: what a promotion decision was taken on."""
    if not table_exists(con, "ml", "model_cards"):
        return None
    row = con.execute("SELECT card FROM ml.model_cards WHERE model_version = ?", [model_version]).fetchone()
    return hashlib.sha256(row[0].encode()).hexdigest() if row else None
