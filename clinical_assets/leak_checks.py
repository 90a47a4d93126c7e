"""The blocking leak check on everything downstream of de-identification (the de-identified
tables and the feature matrix have theirs inside their assets): each derived warehouse table's
text is scanned for the raw identifiers of every landed batch, and one hit stops every asset
downstream."""

from dagster import AssetCheckResult, AssetChecksDefinition, AssetsDefinition, asset_check

from clinical_assets.audit import audit_record
from clinical_assets.deidentified import leak_check_result
from clinical_assets.model import trained_model
from clinical_assets.model_card import model_card
from clinical_assets.validation import validation_report
from clinical_ml.batches import downstream_identifier_leaks
from resources.deid_key import DeidKey
from resources.warehouse import DuckDBWarehouse


def build_leak_check(asset: AssetsDefinition, tables: list[str], aggregate: bool = False) -> AssetChecksDefinition:
    @asset_check(asset=asset, name=f"{asset.key.path[-1]}_has_no_identifiers", blocking=True,
                 description=f"No original identifier value of any landed batch appears in {', '.join(tables)}.")
    def _check(warehouse: DuckDBWarehouse, deid_key: DeidKey) -> AssetCheckResult:
        return leak_check_result(
            downstream_identifier_leaks(warehouse.batch_store(), warehouse.path, tables, deid_key.key(), aggregate),
            tables)

    return _check


DOWNSTREAM_LEAK_CHECKS = [
    build_leak_check(trained_model, ["ml.models", "ml.test_predictions"]),
    # figures, not records: dates and numbers in them are ours (see find_identifier_leaks)
    build_leak_check(validation_report, ["ml.validation_report", "ml.subgroup_performance"], aggregate=True),
    build_leak_check(model_card, ["ml.model_cards"], aggregate=True),
    build_leak_check(audit_record, ["audit.audit_log"], aggregate=True),
]
