"""Data batches: one file each, a training window over them, and the leak scan across them."""

from datetime import date

import duckdb
import polars as pl
import pytest

from clinical_ml.batches import (BatchSource, BatchStore, TrainingWindow, check_batch_key, downstream_identifier_leaks,
                                 read_training_window, read_window)
from clinical_ml.deid import find_identifier_leaks
from clinical_ml.features import FeatureSpec, LandmarkPlan, write_feature_matrix
from tests.conftest import TEST_KEY, read_resources


def write_batch(store: BatchStore, key: str, rows: list[tuple[str, str, int]], spec: FeatureSpec = FeatureSpec()):
    """A batch file holding just a feature matrix: (patient_key, landmark ISO date, label) rows."""
    frame = pl.DataFrame({"patient_key": [r[0] for r in rows],
                          "landmark_date": [date.fromisoformat(r[1]) for r in rows],
                          "label": [r[2] for r in rows], "sbp_last": [120.0 + i for i in range(len(rows))]})
    landmarks = tuple(sorted(set(frame["landmark_date"].to_list())))
    con = duckdb.connect(str(store.path(key)))
    write_feature_matrix(con, frame, spec, LandmarkPlan(landmarks, date(2010, 1, 1), date(2024, 1, 1), True))
    con.close()


def test_keys_are_registered_in_arrival_order_and_a_known_source_keeps_its_key(tmp_path):
    store = BatchStore(tmp_path)
    first = store.register(BatchSource(kind="synthetic", synthetic_patients=10, synthetic_seed=1), "initial")
    drifted = store.register(BatchSource(kind="synthetic", synthetic_patients=10, synthetic_seed=2, drift=True), "Drifted!")
    assert (first, drifted) == ("b0001-initial", "b0002-drifted")
    assert store.register(BatchSource(kind="synthetic", synthetic_patients=10, synthetic_seed=1), "again") == first
    assert store.register(BatchSource(), "bulk") == "b0003-bulk"  # a server's next export is new data
    assert store.register(BatchSource(), "bulk") == "b0004-bulk"
    assert store.keys() == [first, drifted, "b0003-bulk", "b0004-bulk"]
    assert store.source(drifted).drift and store.source("b0099-from-ui") == BatchSource()  # added in the UI


@pytest.mark.parametrize("key", ["../warehouse", "b1-x", "b0001", "b0001-a/b", "B0001-x", "b0001-x'; DROP"])
def test_a_batch_key_cannot_name_another_file(key, tmp_path):
    with pytest.raises(ValueError, match="not a batch key"):
        check_batch_key(key)
    with pytest.raises(ValueError):
        BatchStore(tmp_path).path(key)


def test_the_window_takes_a_patients_rows_from_the_newest_batch_that_has_them(tmp_path):
    store = BatchStore(tmp_path)
    for label in ("a", "b"):
        store.register(BatchSource(kind="directory", directory=f"/data/{label}"), label)
    # b0002 is a later snapshot: patient p1 again (other landmarks), and a new patient p3
    write_batch(store, "b0001-a", [("p1", "2018-01-01", 0), ("p1", "2019-01-01", 0), ("p2", "2019-01-01", 1)])
    write_batch(store, "b0002-b", [("p1", "2020-01-01", 1), ("p3", "2020-01-01", 0)])
    window = read_training_window(store, TrainingWindow())
    rows = sorted(window.frame.select("patient_key", "landmark_date", "batch_key").iter_rows())
    assert rows == [("p1", date(2020, 1, 1), "b0002-b"), ("p2", date(2019, 1, 1), "b0001-a"),
                    ("p3", date(2020, 1, 1), "b0002-b")]
    assert window.facts["rows_by_batch"] == {"b0001-a": 1, "b0002-b": 2} and window.batches == ["b0001-a", "b0002-b"]
    # the newest batch only; landmarks within 6 months of the newest
    assert read_training_window(store, TrainingWindow(batches=1)).frame["patient_key"].to_list() == ["p1", "p3"]
    assert read_training_window(store, TrainingWindow(months=6)).frame["patient_key"].to_list() == ["p1", "p3"]
    assert read_window(store, ["b0001-a"]).frame.height == 3


def test_batches_drawn_with_other_cohort_rules_are_not_mixed(tmp_path):
    store = BatchStore(tmp_path)
    for label in ("a", "b"):
        store.register(BatchSource(kind="directory", directory=f"/data/{label}"), label)
    write_batch(store, "b0001-a", [("p1", "2019-01-01", 0)])
    write_batch(store, "b0002-b", [("p2", "2019-01-01", 0)], FeatureSpec(horizon_days=365))
    with pytest.raises(ValueError, match="different rules"):
        read_training_window(store, TrainingWindow())


def test_no_featurized_batch_says_what_to_materialize(tmp_path):
    with pytest.raises(LookupError, match="materialize feature_matrix"):
        read_training_window(BatchStore(tmp_path), TrainingWindow())


def test_aggregate_tables_are_scanned_for_names_not_for_dates_and_numbers(deid_con, small_export):
    patient = read_resources(small_export, "Patient")[0]
    family, birth, zip_code = patient["name"][0]["family"], patient["birthDate"], patient["address"][0]["postalCode"]
    deid_con.execute("CREATE SCHEMA IF NOT EXISTS ml")
    deid_con.execute("CREATE OR REPLACE TABLE ml.figures AS SELECT ? AS landmark, ? AS n, 'ok' AS note",
                     [birth, zip_code])
    records = find_identifier_leaks(deid_con, ["ml.figures"], TEST_KEY)
    assert {f["category"] for f in records} == {"birth_date", "address"}  # a record table: both count
    assert find_identifier_leaks(deid_con, ["ml.figures"], TEST_KEY, aggregate=True) == []
    deid_con.execute("UPDATE ml.figures SET note = ?", [f"reviewed with {patient['name'][0]['given'][0]} {family}"])
    assert [f["category"] for f in find_identifier_leaks(deid_con, ["ml.figures"], TEST_KEY, aggregate=True)] == ["name"]
    deid_con.execute("DROP TABLE ml.figures")
