"""Scale: DuckDB resource settings, the cross-process file lock, and the same graph on a Dask cluster."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from clinical_ml.batches import read_only
from clinical_ml.db import DatabaseBusy, DuckDBSettings, database_lock, open_database, table_fingerprints
from clinical_ml.synthetic import CohortSpec, write_bulk_export
from resources.warehouse import DuckDBWarehouse

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

HOLD_WRITER = """
import sys, time
from resources.warehouse import DuckDBWarehouse
with DuckDBWarehouse(path=sys.argv[1]).connect() as con:
    print("writing", flush=True)
    time.sleep(1.5)
    con.execute("CREATE TABLE written_by_other_process AS SELECT 42 AS answer")
"""


def test_a_reader_waits_for_another_process_writing_instead_of_failing(tmp_path):
    path = tmp_path / "w.duckdb"
    writer = subprocess.Popen([sys.executable, "-c", HOLD_WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    # DuckDB alone refuses a second process while one writes
    with pytest.raises(duckdb.IOException):
        duckdb.connect(str(path), read_only=True)
    with read_only(path) as con:  # waits for the lock, then sees the finished table
        assert con.execute("SELECT answer FROM written_by_other_process").fetchone() == (42,)
    assert writer.wait(timeout=30) == 0


def test_a_lock_held_too_long_is_a_clear_error(tmp_path):
    path = tmp_path / "w.duckdb"
    writer = subprocess.Popen([sys.executable, "-c", HOLD_WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    with pytest.raises(DatabaseBusy, match="w.duckdb stayed in use by another process"):
        with database_lock(path, shared=True, timeout_s=0.3):
            pass
    assert writer.wait(timeout=30) == 0


def test_threads_of_one_process_share_the_lock_and_a_read_lock_is_not_silently_a_write_lock(tmp_path):
    import threading

    path = tmp_path / "w.duckdb"
    held, errors = [], []

    def hold():
        try:
            with database_lock(path, shared=False, timeout_s=5):
                held.append(1)
                time.sleep(0.3)
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=hold) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(held) == 4
    with database_lock(path, shared=True):
        with pytest.raises(RuntimeError, match="open read-only in this process"):
            with database_lock(path, shared=False):
                pass


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    warehouse = DuckDBWarehouse(path=str(tmp_path / "w.duckdb"), temp_directory=str(tmp_path / "spill"))
    started = time.monotonic()
    with warehouse.connect() as outer:
        outer.execute("CREATE TABLE t AS SELECT 1 AS x")
        with warehouse.connect() as inner:  # same process: no wait on its own lock
            assert inner.execute("SELECT x FROM t").fetchone() == (1,)
    assert time.monotonic() - started < 5


def test_duckdb_settings_apply_and_each_connection_spills_in_its_own_folder(tmp_path):
    settings = DuckDBSettings(threads=1, memory_limit="64MB", temp_directory=str(tmp_path / "spill"))
    with open_database(str(tmp_path / "a.duckdb"), settings) as a, open_database(str(tmp_path / "b.duckdb"), settings) as b:
        folders = [c.execute("SELECT current_setting('temp_directory')").fetchone()[0] for c in (a, b)]
        assert a.execute("SELECT current_setting('threads')").fetchone() == (1,)
        assert folders[0] != folders[1] and all(f.startswith(str(tmp_path / "spill")) for f in folders)
        # a sort larger than the memory limit spills instead of failing with "Out of Memory"
        count = a.execute("SELECT count(*) FROM (SELECT md5(range::VARCHAR) AS h FROM range(3000000) ORDER BY h)"
                          ).fetchone()[0]
        assert count == 3_000_000
    assert not any(Path(f).exists() for f in folders)  # DuckDB removed them on close


def test_the_warehouse_reads_its_duckdb_settings_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CLINICAL_DUCKDB_THREADS", "1")
    monkeypatch.setenv("CLINICAL_DUCKDB_MEMORY_LIMIT", "300MB")
    monkeypatch.setenv("CLINICAL_DUCKDB_TEMP_DIR", str(tmp_path / "spill"))
    warehouse = DuckDBWarehouse(path=str(tmp_path / "w.duckdb"))
    with warehouse.connect() as con:
        limit = con.execute("SELECT current_setting('memory_limit')").fetchone()[0]
        assert limit.replace(" ", "") in ("286.1MiB", "300.0MB", "286MiB")
        assert con.execute("SELECT current_setting('temp_directory')").fetchone()[0].startswith(str(tmp_path / "spill"))
    assert warehouse.batch_store().duckdb_settings == warehouse.duckdb_settings()


# ----------------------------------------------------------------------------- the Dask executor

def _run_graph(home: Path, export: Path, job: str) -> subprocess.CompletedProcess:
    dagster_home = home / "dagster"
    dagster_home.mkdir(parents=True)
    shutil.copy(ROOT / "dagster.yaml", dagster_home / "dagster.yaml")
    env = {**os.environ, "CLINICAL_HOME": str(home), "DAGSTER_HOME": str(dagster_home), "CLINICAL_DEMO_MODE": "1",
           "DEID_AGE_REFERENCE_DATE": "2026-01-01", "DASK_LOCAL_WORKERS": "2", "CLINICAL_PATIENT_BUCKETS": "3"}
    env.pop("CLINICAL_WAREHOUSE", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    batch = subprocess.run([sys.executable, "-m", "clinical_assets.batches", "add", "--label", "scale",
                            "--ndjson-dir", str(export)], env=env, cwd=ROOT, capture_output=True, text=True, check=True
                           ).stdout.strip().splitlines()[-1]
    return subprocess.run([str(BIN / "dagster"), "job", "execute", "-m", "clinical_assets.definitions", "-a", "defs",
                           "-j", job, "--tags", json.dumps({"dagster/partition": batch})],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)


def _step_events(home: Path) -> tuple[dict[str, str], set[int], int, dict[str, tuple[float, float, int]]]:
    """From the run's event log: step -> outcome, the pids that ran steps, the run's own pid, and
    step -> (start, end, pid)."""
    from dagster import DagsterEventType, DagsterInstance

    with DagsterInstance.from_config(str(home / "dagster")) as instance:
        run_id = instance.get_run_records(limit=1)[0].dagster_run.run_id
        outcomes, step_pids, run_pid, starts, spans = {}, set(), None, {}, {}
        for entry in instance.all_logs(run_id):
            event = entry.dagster_event
            if event is None:
                continue
            if event.event_type == DagsterEventType.RUN_START:
                run_pid = event.pid
            elif event.event_type == DagsterEventType.STEP_START:
                starts[event.step_key] = entry.timestamp
            elif event.event_type in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
                outcomes[event.step_key] = event.event_type.value
                step_pids.add(event.pid)
                spans[event.step_key] = (starts.get(event.step_key, entry.timestamp), entry.timestamp, event.pid)
    return outcomes, step_pids, run_pid, spans


@pytest.mark.slow
def test_the_graph_on_a_two_worker_dask_cluster_gives_the_single_process_tables(tmp_path):
    export = write_bulk_export(tmp_path / "export", CohortSpec(n_patients=1000, seed=5)).directory
    single = _run_graph(tmp_path / "single", export, "clinical_pipeline")
    dask = _run_graph(tmp_path / "dask", export, "clinical_pipeline_dask")
    runs = {name: _step_events(tmp_path / name) for name in ("single", "dask")}
    for name, (outcomes, _, _, _) in runs.items():
        # 1,000 patients may not pass every promotion gate; every other step must succeed
        failed = {step for step, outcome in outcomes.items() if outcome != "STEP_SUCCESS"}
        assert failed <= {"model_promotion"}, (name, outcomes, (single if name == "single" else dask).stderr[-3000:])
        # 12 asset and check steps, de-identification as a plan, 3 patient buckets and a combine
        assert len(outcomes) == 12 + 1 + 3 + 1, (name, sorted(outcomes))
    # the steps ran in the cluster's worker processes, not in the run's own, and the patient
    # buckets of the one batch on both workers (Dask had them all at once). They need not
    # overlap in time here: a worker's first step spends seconds importing the code location,
    # longer than a bucket of 1,000 patients takes.
    _, workers, run_pid, spans = runs["dask"]
    assert len(workers) == 2 and run_pid not in workers, (workers, run_pid)
    buckets = [span for step, span in spans.items() if ".deidentify_patient_bucket_" in step]
    assert len(buckets) == 3 and len({pid for _, _, pid in buckets}) == 2, spans
    assert runs["single"][1] == {runs["single"][2]}

    def fingerprints(home: Path) -> dict:
        (batch_file,) = (home / "warehouse-batches").glob("*.duckdb")
        with read_only(batch_file) as con:
            # the landing's own id and check time differ by run; every other column must not
            tables = table_fingerprints(con, ["raw", "deid", "features"], exclude_columns=("landing_id", "checked_at"))
        with read_only(home / "warehouse.duckdb") as con:
            tables["training_data_hash"] = con.execute("SELECT training_data_hash FROM ml.models").fetchall()
        return tables

    single_tables, dask_tables = fingerprints(tmp_path / "single"), fingerprints(tmp_path / "dask")
    assert len(single_tables) > 10 and single_tables["deid.patient"][0] == 1000
    assert dask_tables == single_tables


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_sliced_scan_reads_every_row_once_from_a_table_or_a_view(threads):
    from clinical_ml.db import sliced_scan_sql

    con = duckdb.connect(config={"threads": threads})
    con.execute("CREATE TABLE t AS SELECT 'p' || i AS id, i FROM range(1000) r(i)")
    con.execute("CREATE VIEW v AS SELECT * FROM t UNION ALL SELECT 'q' || i, i FROM range(5) r(i)")
    for source, expected in (("t", 1000), ("v", 1005)):
        rows = con.execute(f"SELECT id FROM {sliced_scan_sql(con, source)}").fetchall()
        assert len(rows) == expected and len(set(rows)) == expected


def test_the_scratch_catalog_is_private_and_gone_after_use_even_on_error(tmp_path):
    from clinical_ml.db import _HOST, scratch_catalog

    con = duckdb.connect(str(tmp_path / "batch.duckdb"))
    abandoned = tmp_path / f"batch.duckdb.scratch-{_HOST}-999999999-x"  # a killed process's leftover
    abandoned.mkdir()
    with scratch_catalog(con, "work") as catalog:
        con.execute(f"CREATE TABLE {catalog}.main.t AS SELECT 'a note' AS note")
        [folder] = [p for p in tmp_path.iterdir() if ".scratch-" in p.name]
        assert folder.stat().st_mode & 0o777 == 0o700
    assert not [p for p in tmp_path.iterdir() if ".scratch-" in p.name]
    with pytest.raises(RuntimeError):
        with scratch_catalog(con, "work") as catalog:
            con.execute(f"CREATE TABLE {catalog}.main.t AS SELECT 1")
            raise RuntimeError("a failed scrub")
    assert not [p for p in tmp_path.iterdir() if ".scratch-" in p.name]
    assert con.execute("SELECT count(*) FROM duckdb_databases() WHERE database_name LIKE 'work%'").fetchone()[0] == 0
