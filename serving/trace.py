"""Trace a prediction back to what made it: the logged prediction -> registered model version
-> MLflow training run -> training data hash and batches -> the audit record of the model's
promotion decision (and any clinician feedback).

    python -m serving.trace <prediction_id> [--verify-audit]

``--verify-audit`` also reads the warehouse's hash-chained audit log (read-only) and checks
that the record the registry names is in the chain with the same hash.
"""

from __future__ import annotations

import argparse
import sys

import orjson


def trace_prediction(prediction_log, registry, prediction_id: str) -> dict | None:
    records = prediction_log.records(prediction_id)
    served = next((r for r in records if r.get("served")), None)
    if served is None:
        return None
    client, name = registry.client, served.get("model_name") or registry.model_name
    version = client.get_model_version(name, served["model_version"])
    run = client.get_run(version.run_id)
    tags = dict(version.tags)
    return {
        "prediction": served,
        "also_scored": [r for r in records if not r.get("served")],
        "model_version": {"name": name, "version": str(version.version), "aliases": list(version.aliases or []),
                          "status": version.status, "model_sha256": tags.get("model_sha256"),
                          "model_card": tags.get("model_card")},
        "training_run": {"mlflow_run_id": version.run_id, "dagster_run_id": run.data.tags.get("dagster_run_id"),
                         "training_data_sha256": run.data.tags.get("training_data_sha256"),
                         "training_batches": run.data.tags.get("training_batches"),
                         "started": run.info.start_time, "status": run.info.status},
        "audit_record": {"sequence": int(tags["audit_sequence"]) if tags.get("audit_sequence") else None,
                         "record_hash": tags.get("audit_record_hash"),
                         "decision": tags.get("promotion_decision"), "policy_version": tags.get("policy_version")},
        "feedback": prediction_log.feedback_for(prediction_id),
    }


def _audit_head(warehouse_path: str) -> tuple[int, str] | None:
    """The chain head the pipeline keeps beside the warehouse (records cut off the end show)."""
    from resources.audit_store import AuditStore
    from resources.warehouse import DuckDBWarehouse

    return AuditStore(warehouse=DuckDBWarehouse(path=warehouse_path)).head()


def verify_audit_record(warehouse_path: str, sequence: int, record_hash: str) -> str:
    import duckdb

    from clinical_ml.batches import read_only
    from clinical_ml.db import DatabaseBusy
    from resources.warehouse import DuckDBWarehouse

    try:  # the pipeline's DuckDB settings (threads, memory limit, spill folder)
        settings = DuckDBWarehouse(path=warehouse_path).duckdb_settings()
    except ValueError as error:  # e.g. CLINICAL_DUCKDB_THREADS is not a number (pydantic's errors are ValueErrors)
        return f"not verified: the warehouse settings are invalid ({type(error).__name__})"
    opened = read_only(warehouse_path, settings, lock_timeout_s=5)  # busy: "not verified", not a wait
    try:
        con = opened.__enter__()
    except (duckdb.Error, DatabaseBusy) as error:
        return f"not verified: the warehouse could not be opened read-only ({type(error).__name__})"
    try:
        from clinical_ml.audit import verify_chain

        row = con.execute("SELECT record_hash, body->>'event' FROM audit.audit_log WHERE sequence = ?",
                          [sequence]).fetchone()
        if row is None:
            return f"NOT FOUND: audit record #{sequence} is not in the log"
        intact, broken_at = verify_chain(con, _audit_head(warehouse_path))
        if row[0] != record_hash:
            return f"MISMATCH: audit record #{sequence} has another hash than the registry names"
        return f"verified: record #{sequence} ({row[1]}) is in the chain" + (
            ", chain intact" if intact else f", but the chain is broken at #{broken_at}")
    finally:
        opened.__exit__(None, None, None)


def main(argv: list[str] | None = None) -> int:
    from resources.settings import default_warehouse_path
    from serving.prediction_log import PredictionLog
    from serving.registry import Registry
    from serving.settings import ServingSettings

    parser = argparse.ArgumentParser(prog="python -m serving.trace", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prediction_id")
    parser.add_argument("--verify-audit", action="store_true")
    args = parser.parse_args(argv)
    settings = ServingSettings()
    found = trace_prediction(PredictionLog(settings.log_dir), Registry(settings.tracking_uri, settings.model_name),
                             args.prediction_id)
    if found is None:
        print(f"no prediction {args.prediction_id} in {settings.log_dir}", file=sys.stderr)
        return 1
    if args.verify_audit and found["audit_record"]["sequence"] is not None:
        found["audit_record"]["verification"] = verify_audit_record(
            default_warehouse_path(), found["audit_record"]["sequence"], found["audit_record"]["record_hash"])
    sys.stdout.write(orjson.dumps(found, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
