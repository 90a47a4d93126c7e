import duckdb
import numpy as np
import pytest

from clinical_ml.audit import append_record, table_hash, verify_chain
from clinical_ml.drift import psi


def test_psi_is_zero_for_the_same_distribution_and_large_for_a_shift():
    rng = np.random.default_rng(0)
    reference = rng.normal(120, 12, 5000)
    assert psi(reference, reference) == pytest.approx(0.0, abs=1e-9)
    assert psi(reference, rng.normal(120, 12, 5000)) < 0.02
    assert psi(reference, reference + 8) > 0.2  # the new BP device


def test_psi_handles_flags_and_missing_values():
    ref = np.array([0.0] * 800 + [1.0] * 200)
    assert psi(ref, np.array([0.0] * 500 + [1.0] * 500)) > 0.2
    with_missing = np.where(np.arange(1000) < 400, np.nan, ref)
    assert psi(ref, with_missing) > 0.2  # a feature that stops being recorded has drifted


def test_audit_chain_detects_tampering_and_deletion():
    con = duckdb.connect()
    for i in range(3):
        append_record(con, {"run": i, "auroc": 0.9 + i / 100})
    assert verify_chain(con) == (True, None)
    rows = con.execute("SELECT sequence, previous_hash, record_hash FROM audit.audit_log ORDER BY sequence").fetchall()
    assert rows[1][1] == rows[0][2] and rows[2][1] == rows[1][2]

    con.execute("""UPDATE audit.audit_log SET body = '{"auroc":0.99,"run":1}' WHERE sequence = 2""")
    assert verify_chain(con) == (False, 2)

    fresh = duckdb.connect()
    for i in range(3):
        append_record(fresh, {"run": i})
    fresh.execute("DELETE FROM audit.audit_log WHERE sequence = 2")
    assert verify_chain(fresh) == (False, 3)


def test_table_hash_ignores_row_order_but_not_content():
    con = duckdb.connect()
    con.execute("CREATE TABLE a AS SELECT * FROM (VALUES (1, 'x'), (2, 'y')) t(i, s)")
    con.execute("CREATE TABLE b AS SELECT * FROM (VALUES (2, 'y'), (1, 'x')) t(i, s)")
    con.execute("CREATE TABLE c AS SELECT * FROM (VALUES (2, 'y'), (1, 'z')) t(i, s)")
    assert table_hash(con, "a") == table_hash(con, "b") != table_hash(con, "c")


def test_cutting_records_off_the_end_of_the_audit_log_is_detected(tmp_path):
    from resources.audit_store import AuditStore
    from resources.warehouse import DuckDBWarehouse

    store = AuditStore(warehouse=DuckDBWarehouse(path=str(tmp_path / "w.duckdb")))
    for i in range(3):
        store.append({"run": i})
    assert store.verify() == (True, None)
    with store.warehouse.connect() as con:
        con.execute("DELETE FROM audit.audit_log WHERE sequence = 3")  # the chain itself stays consistent
        assert verify_chain(con) == (True, None)
    assert store.verify() == (False, 3)  # but the head kept outside the table knows record 3
    with store.warehouse.connect() as con:
        con.execute("DELETE FROM audit.audit_log")
    assert store.verify() == (False, 1)


def test_drift_report_handles_a_feature_the_export_never_records(tmp_path):
    """A real export without heart-rate observations: our PSI reports the column, Evidently's
    report is made from the columns it can compare."""
    import polars as pl

    from clinical_ml.drift import drift_table, evidently_report

    rng = np.random.default_rng(1)
    reference = pl.DataFrame({"sbp_last": rng.normal(120, 12, 500), "heart_rate_mean_3y": [None] * 500},
                             schema={"sbp_last": pl.Float64, "heart_rate_mean_3y": pl.Float64})
    current = reference.with_columns(pl.col("sbp_last") + 10)
    table = drift_table(reference, current, ["sbp_last", "heart_rate_mean_3y"])
    assert table.filter(pl.col("feature") == "heart_rate_mean_3y")["psi"][0] == pytest.approx(0.0)
    assert table.filter(pl.col("feature") == "sbp_last")["drifted"][0]
    values = evidently_report(reference, current, ["sbp_last", "heart_rate_mean_3y"], tmp_path / "r.html")
    assert set(values) == {"sbp_last"} and values["sbp_last"] > 0.2 and (tmp_path / "r.html").stat().st_size > 0
