"""Print what the last run produced, from the warehouse: `python -m clinical_assets.summary`.
Stages that have not produced anything yet (a run that stopped at training, say) are said so."""

import json

from clinical_ml.audit import verify_chain
from clinical_ml.db import table_exists
from clinical_ml.batches import read_window
from clinical_ml.training import TrainingConfig, check_trainable, frame_hash
from resources.warehouse import DuckDBWarehouse


def main() -> None:
    warehouse = DuckDBWarehouse()
    store = warehouse.batch_store()
    print(f"\nwarehouse        {warehouse.path}")
    keys = [k for k in store.keys() if store.path(k).exists()]
    if not keys:
        print("batches          nothing landed yet")
        return
    for key in keys:
        with store.read(key) as con:
            if not table_exists(con, "raw", "landing_files"):
                print(f"batch {key:<10} registered, not landed")
                continue
            lines, loaded, quarantined = con.execute(
                "SELECT sum(lines_read), sum(loaded), sum(quarantined) FROM raw.landing_files").fetchone()
            rows = con.execute("SELECT count(*), sum(label) FROM features.feature_matrix").fetchone() \
                if table_exists(con, "features", "feature_matrix") else None
        print(f"batch {key}  {store.source(key).describe()}: {lines} lines read, {loaded} loaded, "
              f"{quarantined} quarantined" + (f"; {rows[0]} patient-landmarks, {rows[1]} positives" if rows else ""))
    featurized = store.featurized(keys)
    if not featurized:
        print("feature matrix   not built yet")
        return
    window = read_window(store, featurized)
    frame, plan = window.frame, window.plan
    print(f"training window  {window.describe()}: {frame.height} patient-landmarks "
          f"({frame['patient_key'].n_unique()} patients), {int(frame['label'].sum())} develop hypertension within "
          f"the horizon; {plan.describe_span()}")
    with warehouse.connect() as con:
        def one(sql, params=None):
            return con.execute(sql, params or []).fetchone()

        model = one("SELECT model_version, mlflow_run_id, training_data_hash, registry_version FROM ml.models "
                    "ORDER BY model_version DESC LIMIT 1") if table_exists(con, "ml", "models") else None
        if model is None or model[2] != frame_hash(frame):
            try:
                check_trainable(frame, TrainingConfig(), plan.describe_span())
                print("model            not trained on this window yet")
            except ValueError as reason:
                print(f"model            none: {reason}")
            if model is None:
                return
        version, run_id, data_hash, registry_version = model
        checks = con.execute(
            "SELECT metric, value, ci_low, ci_high, rule, passed FROM ml.validation_report WHERE model_version = ? "
            "ORDER BY metric", [version]).fetchall() if table_exists(con, "ml", "validation_report") else []
        print(f"model            registry v{registry_version} (warehouse {version}), MLflow run {run_id}, "
              f"data {data_hash[:12]}…")
        for metric, value, low, high, rule, passed in checks:
            ci = f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""
            if not rule.startswith("reported"):
                print(f"  {metric:<30} {value:8.4f}{ci:<17} ({rule.split(';')[0]}: {'met' if passed else 'NOT met'})")
            elif metric == "temporal_test_auroc":
                print(f"  {metric:<30} {value:8.4f}{'':<17} (reported: trained on earlier landmarks, tested on later ones)")
        if table_exists(con, "ml", "promotions"):
            decision = one("SELECT promoted, reasons FROM ml.promotions WHERE model_version = ? "
                           "ORDER BY decided_at DESC LIMIT 1", [version])
            if decision:
                promoted, reasons = decision[0], [r for r in json.loads(decision[1])]
                print(f"promotion        {'champion' if promoted else 'not promoted'}"
                      f"{': ' + '; '.join(reasons) if reasons else ' (all gates met)'}")
        if table_exists(con, "monitoring", "drift_report"):
            batch, reference, max_psi = one("""SELECT any_value(batch), any_value(reference_model_version), max(psi)
                FROM monitoring.drift_report WHERE report_id =
                (SELECT report_id FROM monitoring.drift_report ORDER BY created_at DESC LIMIT 1)""")
            print(f"drift            batch {batch} against model {reference}'s training data: max PSI {max_psi:.3f}")
        if table_exists(con, "audit", "audit_log"):
            records, = one("SELECT count(*) FROM audit.audit_log")
            intact, _ = verify_chain(con)
            print(f"audit log        {records} records, chain {'intact' if intact else 'BROKEN'}")


if __name__ == "__main__":
    main()
