"""Print what the last run produced, from the warehouse: `python -m clinical_assets.summary`."""

from clinical_ml.audit import verify_chain
from resources.warehouse import DuckDBWarehouse


def main() -> None:
    warehouse = DuckDBWarehouse()
    with warehouse.connect() as con:
        def one(sql):
            return con.execute(sql).fetchone()

        lines, loaded, quarantined = one("SELECT sum(lines_read), sum(loaded), sum(quarantined) FROM raw.landing_files")
        rows, patients, landmarks, positives = one(
            "SELECT count(*), count(DISTINCT patient_key), count(DISTINCT landmark_date), sum(label) "
            "FROM features.feature_matrix")
        version, run_id = one("SELECT model_version, mlflow_run_id FROM ml.models ORDER BY model_version DESC LIMIT 1")
        checks = con.execute(
            "SELECT metric, value, rule, passed FROM ml.validation_report WHERE model_version = ? ORDER BY metric",
            [version]).fetchall()
        max_psi, = one("""SELECT max(psi) FROM monitoring.drift_report WHERE report_id =
                          (SELECT report_id FROM monitoring.drift_report ORDER BY created_at DESC LIMIT 1)""")
        records, = one("SELECT count(*) FROM audit.audit_log")
        intact, _ = verify_chain(con)
    print(f"\nwarehouse        {warehouse.path}")
    print(f"raw FHIR         {lines} lines read, {loaded} loaded, {quarantined} quarantined")
    print(f"feature matrix   {rows} patient-landmarks ({patients} patients, {landmarks} landmarks), "
          f"{positives} develop hypertension within the horizon")
    print(f"model            version {version}, MLflow run {run_id}")
    for metric, value, rule, passed in checks:
        if rule != "reported":
            print(f"  {metric:<32} {value:8.4f}  ({rule}: {'met' if passed else 'NOT met'})")
        elif metric == "temporal_test_auroc":
            print(f"  {metric:<32} {value:8.4f}  (reported: trained on earlier landmarks, tested on later ones)")
    print(f"drift            max PSI {max_psi:.3f}")
    print(f"audit log        {records} records, chain {'intact' if intact else 'BROKEN'}")


if __name__ == "__main__":
    main()
