"""Print what the last run produced, from the warehouse: `python -m clinical_assets.summary`.
Stages that have not produced anything yet (a run that stopped at training, say) are said so."""

import json

from clinical_ml.audit import verify_chain
from clinical_ml.db import table_exists
from clinical_ml.features import landmark_summary, read_feature_matrix, read_feature_spec
from clinical_ml.training import TrainingConfig, check_trainable, frame_hash
from resources.warehouse import DuckDBWarehouse


def main() -> None:
    warehouse = DuckDBWarehouse()
    print(f"\nwarehouse        {warehouse.path}")
    with warehouse.connect() as con:
        def one(sql, params=None):
            return con.execute(sql, params or []).fetchone()

        if not table_exists(con, "raw", "landing_files"):
            print("raw FHIR         nothing landed yet")
            return
        lines, loaded, quarantined = one("SELECT sum(lines_read), sum(loaded), sum(quarantined) FROM raw.landing_files")
        print(f"raw FHIR         {lines} lines read, {loaded} loaded, {quarantined} quarantined")
        if not table_exists(con, "features", "feature_matrix"):
            print("feature matrix   not built yet")
            return
        frame = read_feature_matrix(con)
        spec, plan = read_feature_spec(con)
        print(f"feature matrix   {frame.height} patient-landmarks ({frame['patient_key'].n_unique()} patients, "
              f"{len(plan.landmarks)} landmarks), {int(frame['label'].sum())} develop hypertension within the horizon; "
              f"{plan.describe_span()}")
        summary = landmark_summary(frame, plan)
        print("  landmarks      " + ", ".join(f"{d}: {p}/{e}" for d, e, p, _ in summary.iter_rows()) + " (positives/eligible)")
        model = one("SELECT model_version, mlflow_run_id, training_data_hash FROM ml.models ORDER BY model_version DESC "
                    "LIMIT 1") if table_exists(con, "ml", "models") else None
        if model is None or model[2] != frame_hash(frame):
            try:
                check_trainable(frame, TrainingConfig(), plan.describe_span())
                print("model            not trained on this feature matrix yet")
            except ValueError as reason:
                print(f"model            none: {reason}")
            return
        version, run_id, _ = model
        checks = con.execute(
            "SELECT metric, value, rule, passed FROM ml.validation_report WHERE model_version = ? ORDER BY metric",
            [version]).fetchall() if table_exists(con, "ml", "validation_report") else []
        print(f"model            version {version}, MLflow run {run_id}")
        for metric, value, rule, passed in checks:
            if rule != "reported":
                print(f"  {metric:<32} {value:8.4f}  ({rule}: {'met' if passed else 'NOT met'})")
            elif metric == "temporal_test_auroc":
                print(f"  {metric:<32} {value:8.4f}  (reported: trained on earlier landmarks, tested on later ones)")
        if table_exists(con, "ml", "promotions"):
            decision = one("SELECT promoted, reasons FROM ml.promotions WHERE model_version = ? "
                           "ORDER BY decided_at DESC LIMIT 1", [version])
            if decision:
                promoted, reasons = decision[0], [r for r in json.loads(decision[1])]
                print(f"promotion        {'champion' if promoted else 'not promoted'}"
                      f"{': ' + '; '.join(reasons) if reasons else ' (all gates met)'}")
        if table_exists(con, "monitoring", "drift_report"):
            max_psi, = one("""SELECT max(psi) FROM monitoring.drift_report WHERE report_id =
                              (SELECT report_id FROM monitoring.drift_report ORDER BY created_at DESC LIMIT 1)""")
            print(f"drift            max PSI {max_psi:.3f}")
        if table_exists(con, "audit", "audit_log"):
            records, = one("SELECT count(*) FROM audit.audit_log")
            intact, _ = verify_chain(con)
            print(f"audit log        {records} records, chain {'intact' if intact else 'BROKEN'}")


if __name__ == "__main__":
    main()
