"""The model card: built from a small hand-made warehouse (no training), and the asset against
a throwaway warehouse and MLflow store."""

import hashlib
from datetime import date, datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import orjson
import polars as pl
import pytest

from clinical_ml.audit import append_record
from clinical_ml.batches import BatchStore
from clinical_ml.features import MODEL_FEATURES, FeatureSpec, LandmarkPlan, write_feature_matrix
from clinical_ml.model_card import build_model_card, card_json, render_markdown
from clinical_ml.model_store import _DDL as MODEL_DDL
from clinical_ml.model_store import model_by_version
from clinical_ml.policy import current_policy
from clinical_ml.promotion import Approval, decide
from clinical_ml.promotion_store import save_decision, validation_gates
from clinical_ml.synthetic import SYNTHETIC_TAG
from clinical_ml.validation import save_report, validate

POLICY = current_policy()
DATA_HASH = "d" * 64
RUN_ID = "0123456789abcdef0123456789abcdef"
LANDMARKS = [date(2021, 1, 1), date(2022, 1, 1), date(2023, 1, 1)]
BATCHES = ["b0001-initial", "b0002-drifted"]
WINDOW = {"batches": BATCHES, "months": None, "landmarks": [str(d) for d in LANDMARKS], "rows": 1500,
          "patients": 1500, "rows_by_batch": {"b0001-initial": 900, "b0002-drifted": 600}}
BATCH_SPEC = FeatureSpec(horizon_days=700, lookback_days=1000, min_age=21)  # not the defaults: read from the batch
APPROVAL = Approval(approved_by="dr.chen@hospital.org", reason="cv spread from a small cohort; monitored weekly")


def patient_key(i: int) -> str:
    return hashlib.sha256(f"p{i}".encode()).hexdigest()[:24]  # the shape of a de-identified key


def held_out_predictions(n=1500, seed=3) -> pl.DataFrame:
    """Calibrated scores that separate well: every gate can pass (the CV spread is given apart)."""
    rng = np.random.default_rng(seed)
    score = 1 / (1 + np.exp(-rng.normal(-2, 4, n)))
    y = rng.random(n) < score
    return pl.DataFrame({
        "patient_key": [patient_key(i) for i in range(n)],
        "landmark_date": [LANDMARKS[i % 3] for i in range(n)],
        "sex": rng.choice(["female", "male"], n).tolist()[:-4] + ["other"] * 4,  # 4 rows: not evaluable
        "age_group": rng.choice(["18-44", "45-64", "65+"], n),
        "race": ["asian"] * 6 + ["white"] * (n - 6),  # 6 rows: a reported gap with a note, not a gate
        "ethnicity": "not-hispanic",
        "y_true": y.astype(int), "score": score, "baseline_score": score})


@pytest.fixture(scope="module")
def predictions():
    return held_out_predictions()


@pytest.fixture(scope="module")
def report(predictions):
    # the CV spread fails its gate: a failed gate promoted only by a named approval
    return validate(predictions, cv_auroc_std=0.05, thresholds=POLICY.validation, temporal_test_auroc=0.81)


def add_model(con, version=1, registry_version="3", window=WINDOW, run_id=RUN_ID):
    con.execute(MODEL_DDL)
    con.execute("ALTER TABLE ml.models ADD COLUMN IF NOT EXISTS training_window JSON")
    metrics = {"test_auroc": 0.9, "baseline_test_auroc": 0.85, "cv_auroc_mean": 0.88, "cv_auroc_std": 0.05,
               "temporal_test_auroc": 0.81, "n_patients": 1500.0, "n_landmarks": 3.0, "train_prevalence": 0.25,
               "test_prevalence": 0.25, "unmeasured": float("nan")}
    con.execute(
        """INSERT INTO ml.models (model_version, created_at, mlflow_run_id, training_data_hash, model_sha256,
                                  feature_names, params, metrics, model_cbm, registry_version, training_window)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        [version, datetime(2026, 11, 20, 9, 30, tzinfo=timezone.utc), run_id, DATA_HASH, "m" * 64, MODEL_FEATURES,
         orjson.dumps({"depth": 4, "split_seed": 42}).decode(), orjson.dumps(metrics).decode(), b"not a model",
         registry_version, None if window is None else orjson.dumps(window).decode()])


def warehouse(predictions, report, con=None, approval=APPROVAL) -> duckdb.DuckDBPyConnection:
    """One judged model version: report, subgroups, held-out predictions, decision, audit record."""
    con = con or duckdb.connect()
    add_model(con)
    con.register("held_out", predictions.with_columns(model_version=pl.lit(1)).to_arrow())
    con.execute("INSERT INTO ml.test_predictions BY NAME SELECT * FROM held_out")
    save_report(con, 1, report)
    gates, _ = validation_gates(con, 1)
    decision = decide(gates, None, has_champion=False, approval=approval)
    record = append_record(con, {"event": "model_promotion", "decision": decision.as_dict()})
    save_decision(con, model_by_version(con, 1), decision, POLICY.version, record.sequence)
    return con


def batch_store(root, real_patients=0) -> BatchStore:
    """The window's batch files as landing, de-identification and features leave them: synthetic
    patients (plus ``real_patients`` untagged ones in the newest), the date mode, a cohort."""
    store = BatchStore(root / "batches")
    store.root.mkdir(parents=True, exist_ok=True)
    for number, key in enumerate(BATCHES):
        con = duckdb.connect(str(store.path(key)))
        con.execute("CREATE SCHEMA raw; CREATE TABLE raw.patient (id VARCHAR, resource JSON)")
        tags = [{"meta": {"tag": [SYNTHETIC_TAG]}}] * 3 + [{"meta": {}}] * (real_patients if number else 0)
        con.executemany("INSERT INTO raw.patient VALUES (?, ?)", [[str(i), orjson.dumps(t).decode()]
                                                                  for i, t in enumerate(tags)])
        con.execute("CREATE SCHEMA deid; CREATE TABLE deid.settings AS SELECT 'shift' AS date_mode")
        training_keys = [patient_key(100_000 + 10 * number + i) for i in range(10)]  # never held out
        frame = pl.DataFrame({"patient_key": training_keys, "landmark_date": [LANDMARKS[0]] * 10, "label": [0, 1] * 5})
        write_feature_matrix(con, frame, BATCH_SPEC, LandmarkPlan(tuple(LANDMARKS), LANDMARKS[0], None, True))
        con.close()
    return store


def card_of(con, **kwargs):
    return build_model_card(con, 1, policy=POLICY, dagster_run_id="card-run", registered_model_name="hypertension-risk",
                            training_dagster_run_id="train-run", **kwargs)


@pytest.fixture
def store(tmp_path):
    return batch_store(tmp_path)


def test_the_card_names_the_data_window_runs_registry_version_and_audit_record(predictions, report, store):
    con = warehouse(predictions, report)
    card = card_of(con, batch_store=store)
    assert card["training_data"]["sha256"] == DATA_HASH and card["training_data"]["window"] == WINDOW
    assert [b["batch"] for b in card["training_data"]["batches"]] == BATCHES
    lineage = card["lineage"]
    assert lineage["mlflow_run_id"] == RUN_ID and lineage["registry_version"] == "3"
    assert (lineage["training_dagster_run_id"], lineage["card_dagster_run_id"]) == ("train-run", "card-run")
    sequence, record_hash = con.execute("SELECT sequence, record_hash FROM audit.audit_log").fetchone()
    assert lineage["audit_record"]["sequence"] == sequence and lineage["audit_record"]["record_hash"] == record_hash
    assert lineage["audit_record"]["event"] == "model_promotion"
    assert card["features"]["names"] == MODEL_FEATURES and card["gates"]["policy_version"] == POLICY.version
    markdown = render_markdown(card)
    for named in (DATA_HASH, RUN_ID, "hypertension-risk v3", record_hash, "train-run", *BATCHES):
        assert named in markdown


def test_gates_match_the_report_and_failures_and_the_exception_are_limitations(predictions, report, store):
    card = card_of(warehouse(predictions, report), batch_store=store)
    gates = {g["metric"]: g["met"] for g in card["gates"]["results"]}
    assert gates == {m: report.passed(m) for m in report.metrics["metric"] if not report.rule(m).startswith("reported")}
    assert not gates["cv_auroc_std"] and not gates["subgroup_auroc_gap"] and gates["auroc"]
    assert card["gates"]["all_met"] is False
    assert {g["metric"]: g["threshold"] for g in card["gates"]["results"]}["cv_auroc_std"] == \
        f"< {POLICY.validation.max_cv_auroc_std}"
    limitations = "\n".join(card["known_limitations"])
    assert "Gate cv_auroc_std not met: 0.0500" in limitations
    assert "sex=other (n=4," in limitations  # the report's unevaluable subgroup, by name
    assert "Promoted by exception, approved by dr.chen@hospital.org" in limitations
    assert "synthetic patients" in limitations and "per-patient shift" in limitations
    assert "AUROC 0.810" in limitations  # the temporal result, next to the random split
    assert card["promotion"]["promoted"] and card["promotion"]["by_exception"]


def test_a_refused_model_says_why_and_a_clean_one_claims_no_failure(predictions, report, tmp_path):
    refused = card_of(warehouse(predictions, report, approval=None), batch_store=batch_store(tmp_path / "a", 2))
    assert not refused["promotion"]["promoted"] and not refused["promotion"]["by_exception"]
    assert any(item.startswith("Not promoted to champion:") and "gate cv_auroc_std not met" in item
               for item in refused["known_limitations"])
    # two real patients in the newest batch: not "all synthetic", and said where
    assert "b0002-drifted 3 of 5 patients" in "\n".join(refused["known_limitations"])
    clean = validate(predictions.filter(pl.col("sex") != "other"), cv_auroc_std=0.01, thresholds=POLICY.validation,
                     temporal_test_auroc=0.81)
    assert clean.all_passed
    card = card_of(warehouse(predictions, clean), batch_store=batch_store(tmp_path / "b"))
    assert card["gates"]["all_met"] and card["promotion"]["promoted"] and not card["promotion"]["by_exception"]
    assert not any("not met" in item or "exception" in item for item in card["known_limitations"])


def test_the_markdown_has_the_sections_and_the_metrics_table(predictions, report, store):
    markdown = render_markdown(card_of(warehouse(predictions, report), batch_store=store))
    for heading in ("# Model card: hypertension-risk v3", "## Intended use", "## Training data", "## Cohort definition",
                    "## Features", "## Metrics", "## Subgroups", "## Gates", "## Promotion decision",
                    "## Known limitations", "## Lineage"):
        assert f"\n{heading}" in f"\n{markdown}"
    assert "| metric | value | 95% CI | rule | met |" in markdown
    auroc_row = next(line for line in markdown.splitlines() if line.startswith("| auroc |"))
    assert f"{report.value('auroc'):.4g}" in auroc_row and auroc_row.endswith("| yes |")
    assert "| cv_auroc_std | 0.05 |" in markdown and "**by exception**" in markdown


def test_confidence_intervals_appear_when_the_report_has_them(predictions, report):
    con = warehouse(predictions, report)
    for table in ("ml.validation_report", "ml.subgroup_performance"):
        con.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS ci_low DOUBLE")
        con.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS ci_high DOUBLE")
    con.execute("UPDATE ml.validation_report SET ci_low = 0.875, ci_high = 0.9125 WHERE metric = 'auroc'")
    con.execute("""UPDATE ml.subgroup_performance SET ci_low = 0.5, ci_high = 0.75
                   WHERE attribute = 'sex' AND "group" = 'female'""")
    card = card_of(con)
    auroc = next(m for m in card["metrics"] if m["metric"] == "auroc")
    assert (auroc["ci_low"], auroc["ci_high"]) == (0.875, 0.9125)
    markdown = render_markdown(card)
    assert "| auroc |" in markdown and "0.875 to 0.9125" in markdown and "0.5 to 0.75" in markdown


def test_the_json_is_deterministic_and_round_trips(predictions, report, store):
    con = warehouse(predictions, report)
    first, second = card_json(card_of(con, batch_store=store)), card_json(card_of(con, batch_store=store))
    assert first == second
    card = orjson.loads(first)
    assert card_json(card) == first and card["training_metrics"]["unmeasured"] is None  # NaN is null, not "NaN"
    assert render_markdown(card) == render_markdown(card_of(con, batch_store=store))


def test_no_patient_key_leaves_in_the_card(predictions, report, store):
    con = warehouse(predictions, report)
    card = card_of(con, batch_store=store)
    text = card_json(card).decode() + render_markdown(card)
    keys = [k for (k,) in con.execute("SELECT DISTINCT patient_key FROM ml.test_predictions").fetchall()]
    assert len(keys) == predictions.height and not [k for k in keys if k in text]
    # free text typed by a person is checked too, against held-out and training patients alike
    for key in (keys[7], patient_key(100_013)):  # held out; in the newest batch's training rows only
        leaky = Approval(approved_by="dr.chen@hospital.org", reason=f"patient {key} was reviewed by hand")
        with pytest.raises(ValueError, match="patient key"):
            card_of(warehouse(predictions, report, approval=leaky), batch_store=store)


def test_the_cohort_definition_is_written_from_the_spec(predictions, report, store):
    con = warehouse(predictions, report)
    stored = card_of(con, batch_store=store)
    assert stored["cohort"]["spec_source"] == "features.feature_spec of b0002-drifted"
    text = " ".join(stored["cohort"]["definition"]) + stored["intended_use"]["purpose"]
    assert "700 days" in text and "1000 days" in text and "aged 21 or older" in text
    assert "730" not in text and "1095" not in text and "18" not in text
    given = card_of(con, batch_store=store, feature_spec=FeatureSpec(horizon_days=365, min_age=40))
    assert "365 days" in " ".join(given["cohort"]["definition"]) and given["cohort"]["spec"]["min_age"] == 40
    pinned = card_of(con, feature_spec=FeatureSpec(landmarks=(date(2022, 6, 1),)))
    assert "pinned landmark dates: 2022-06-01" in pinned["cohort"]["definition"][0]


def test_a_bare_model_gets_a_card_that_says_what_is_missing():
    con = duckdb.connect()
    add_model(con, registry_version=None, window=None, run_id=None)
    card = card_of(con)
    limitations = "\n".join(card["known_limitations"])
    assert "No validation report" in limitations and "No promotion decision" in limitations
    assert "not recorded for the training data" in limitations and "synthetic" not in limitations
    assert card["gates"]["all_met"] is False and all(g["met"] is None for g in card["gates"]["results"])
    assert card["cohort"]["spec_source"].startswith("defaults")
    markdown = render_markdown(card)
    assert "not recorded" in markdown and "warehouse model 1" in markdown
    with pytest.raises(LookupError):
        build_model_card(con, 2, policy=POLICY, dagster_run_id=None)


def test_the_asset_stores_the_card_and_logs_it_to_the_model_run(tmp_path, predictions, report):
    from dagster import materialize
    from mlflow import MlflowClient

    from clinical_assets.model_card import model_card
    from resources.mlflow_tracking import MLflowTracking
    from resources.warehouse import DuckDBWarehouse

    tracking = MLflowTracking(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "artifacts"))
    with tracking.start_run("train-test", tags={"dagster_run_id": "the-training-run"}) as run:
        run_id = run.info.run_id
    client = MlflowClient(tracking_uri=tracking.tracking_uri)
    client.create_registered_model(tracking.registered_model_name)
    registered = client.create_model_version(tracking.registered_model_name, f"runs:/{run_id}/model", run_id=run_id)
    store = DuckDBWarehouse(path=str(tmp_path / "warehouse.duckdb"), batch_root=str(batch_store(tmp_path).root))
    with store.connect() as con:
        warehouse(predictions, report, con)
        con.execute("UPDATE ml.models SET mlflow_run_id = ?, registry_version = ?", [run_id, registered.version])

    result = materialize([model_card], resources={"warehouse": store, "mlflow": tracking})
    assert result.success
    metadata = result.asset_materializations_for_node("model_card")[0].metadata
    assert metadata["model_card"].value.startswith(f"# Model card: hypertension-risk v{registered.version}")
    assert metadata["model_version"].value == 1 and metadata["registry_version"].value == str(registered.version)

    with store.connect() as con:
        stored_json, stored_markdown = con.execute("SELECT card, markdown FROM ml.model_cards").fetchone()
    downloaded = {name: Path(client.download_artifacts(run_id, f"model_card/{name}", str(tmp_path / "download")))
                  for name in ("model_card.md", "model_card.json")}
    assert downloaded["model_card.md"].read_text() == stored_markdown
    logged = orjson.loads(downloaded["model_card.json"].read_bytes())
    assert logged == orjson.loads(stored_json) and [b["batch"] for b in logged["training_data"]["batches"]] == BATCHES
    assert logged["lineage"]["training_dagster_run_id"] == "the-training-run"
    assert logged["lineage"]["card_dagster_run_id"] == result.run_id
    version = client.get_model_version(tracking.registered_model_name, registered.version)
    assert version.tags["model_card"] == f"runs:/{run_id}/model_card/model_card.md"

    assert materialize([model_card], resources={"warehouse": store, "mlflow": tracking}).success
    with store.connect() as con:  # a re-run replaces the version's card
        assert con.execute("SELECT count(*) FROM ml.model_cards").fetchone()[0] == 1
