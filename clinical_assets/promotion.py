"""Which model serves: the challenger against the clinical gates and the current champion."""

from typing import Optional

from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from clinical_assets.model_card import model_card
from clinical_ml.batches import model_window
from clinical_ml.model_card import model_card_sha256
from clinical_ml.model_store import latest_model
from clinical_ml.policy import current_policy
from clinical_ml.promotion import GATE_METRICS, Approval
from clinical_ml.promotion_store import judge_challenger, save_decision
from resources.audit_store import AuditStore
from resources.mlflow_tracking import MLflowTracking
from resources.warehouse import DuckDBWarehouse

PROMOTION_CHECKS = {f"{metric}_gate_for_promotion": metric for metric in GATE_METRICS}


class PromotionConfig(Config):
    """An explicit exception: promote even though a gate failed. Both fields, or neither."""

    approved_by: Optional[str] = Field(default=None, description="Who approves promoting despite a failed gate.")
    approval_reason: Optional[str] = Field(default=None, description="Why; recorded with the decision and audited.")


@asset(
    deps=[model_card],
    group_name="deployment",
    kinds={"mlflow"},
    owners=["team:clinical-ml"],
    description="Champion vs challenger in the MLflow Model Registry (`hypertension-risk`). The newest model is "
    "`challenger`; it becomes `champion` only if it meets every clinical gate of the policy file and is not worse "
    "than the champion beyond the non-inferiority margin (patient-level bootstrap CI of the AUROC difference on "
    "held-out patients neither model trained on, newer batches included). A named approval can override; every decision goes into `ml.promotions` "
    "and the audit log.",
    check_specs=[*(AssetCheckSpec(name, asset="model_promotion", blocking=True,
                                  description=f"Promotion gate: {metric} meets the clinical policy")
                   for name, metric in PROMOTION_CHECKS.items()),
                 AssetCheckSpec("non_inferior_to_champion", asset="model_promotion", blocking=True,
                                description="The challenger's AUROC is not worse than the champion's beyond the "
                                "policy's margin (passes when there is no champion yet)")],
)
def model_promotion(config: PromotionConfig, warehouse: DuckDBWarehouse, mlflow: MLflowTracking,
                    audit_store: AuditStore) -> MaterializeResult:
    if bool(config.approved_by) != bool(config.approval_reason):
        raise ValueError("an approval names both who approves (approved_by) and why (approval_reason)")
    approval = Approval(config.approved_by, config.approval_reason) if config.approved_by else None
    policy = current_policy()
    champion = mlflow.alias_version("champion")
    with warehouse.connect() as con:
        challenger = latest_model(con)
        store = warehouse.batch_store()
        decision, evidence = judge_challenger(con, challenger, champion, policy,
                                              lambda model: model_window(store, model.training_window).frame, approval)
        evidence["model_card_sha256"] = model_card_sha256(con, challenger.model_version)
    record = audit_store.append({"event": "model_promotion" if decision.promote else "model_rejection",
                                 "policy_version": policy.version, "decision": decision.as_dict(), "evidence": evidence})
    with warehouse.connect() as con:
        save_decision(con, challenger, decision, policy.version, record.sequence)
    # the registry version names its audit record: a served prediction traces to it without the warehouse
    mlflow.tag_version(challenger.registry_version, {
        "promotion_decision": "promoted" if decision.promote else "rejected", "policy_version": policy.version,
        "audit_sequence": record.sequence, "audit_record_hash": record.record_hash})
    if decision.promote:  # last: the service picks the new champion up with its audit tags in place
        mlflow.set_alias("champion", challenger.registry_version)
    comparison = decision.comparison
    serving = challenger.registry_version if decision.promote else (champion.version if champion else None)
    return MaterializeResult(
        metadata={
            "challenger": f"v{challenger.registry_version} (warehouse model {challenger.model_version})",
            "champion_before": f"v{champion.version}" if champion else "none",
            "champion_now": f"v{serving}" if serving else "none",
            "promoted": decision.promote,
            "reasons": MetadataValue.md("\n".join(f"- {r}" for r in decision.reasons + decision.notes) or "- all gates met"),
            "policy_version": policy.version,
            "audit_sequence": record.sequence,
            **({"auroc_difference": comparison.difference, "auroc_difference_ci_low": comparison.ci_low,
                "auroc_difference_ci_high": comparison.ci_high, "compared_rows": comparison.rows}
               if comparison else {}),
        },
        check_results=[
            *(AssetCheckResult(check_name=name, passed=decision.gates[metric], severity=AssetCheckSeverity.ERROR,
                               description=evidence["gates"][metric],
                               metadata={"evidence": evidence["gates"][metric], "policy_version": policy.version})
              for name, metric in PROMOTION_CHECKS.items()),
            AssetCheckResult(
                check_name="non_inferior_to_champion", severity=AssetCheckSeverity.ERROR,
                passed=champion is None or (comparison is not None and comparison.non_inferior),
                description=evidence["comparison"],
                metadata={"evidence": evidence["comparison"], "policy_version": policy.version,
                          "margin": policy.promotion.non_inferiority_margin}),
        ],
    )
