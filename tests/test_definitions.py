from dagster import AssetKey, Definitions

from clinical_assets.definitions import defs


def test_definitions_load_and_validate():
    Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {"raw_fhir", "deidentified_fhir", "feature_matrix", "trained_model", "validation_report",
                    "model_card", "model_promotion", "drift_report", "audit_record"}
    # the decision is taken on the card; the card is made for every version, refused ones too
    assert graph.get(AssetKey("model_card")).parent_keys == {AssetKey("validation_report")}
    assert graph.get(AssetKey("model_promotion")).parent_keys == {AssetKey("model_card")}
    # lineage: raw -> deid -> features -> model -> validation -> audit; drift reads features and model
    assert graph.get(AssetKey("deidentified_fhir")).parent_keys == {AssetKey("raw_fhir")}
    assert AssetKey("validation_report") in graph.get(AssetKey("audit_record")).parent_keys
    assert defs.resolve_job_def("retrain") and defs.resolve_job_def("clinical_pipeline")
    # a batch's landing, de-identification, features and drift are partitioned by batch; the model is not
    partitioned = {k.to_user_string() for k in keys_with_partitions(graph)}
    assert partitioned == {"raw_fhir", "deidentified_fhir", "feature_matrix", "drift_report"}
    assert defs.resolve_sensor_def("psi_drift_sensor")


def keys_with_partitions(graph):
    return {k for k in graph.get_all_asset_keys() if graph.get(k).partitions_def is not None}


def test_every_asset_has_a_group_description_and_owner():
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.group_name != "default" and node.description and node.owners, key


def test_every_asset_from_deidentification_on_has_a_blocking_leak_check():
    protected = {AssetKey(k) for k in ["deidentified_fhir", "feature_matrix", "trained_model", "validation_report",
                                       "model_card", "drift_report", "audit_record"]}
    # standalone checks, and those an asset evaluates itself (the partitioned batch assets)
    specs = [spec for checks_def in [*defs.asset_checks, *defs.assets] for spec in checks_def.check_specs]
    leak_checks = {spec.asset_key: spec for spec in specs if spec.name.endswith("_has_no_identifiers")}
    for key in protected:
        assert key in leak_checks and leak_checks[key].blocking, key.to_user_string()
