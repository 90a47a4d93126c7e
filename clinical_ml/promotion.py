"""Champion vs challenger: which model serves, decided by the clinical policy's gates.

A newly trained model is the *challenger*. It becomes *champion* only if it meets every
validation gate and, when a champion exists, is not worse than it beyond the policy's
non-inferiority margin: the lower bound of a 95% patient-level bootstrap CI of the AUROC
difference, both models scored on the same rows, of patients neither trained on. A person may
approve an exception; the approval (who, why) is part of the decision and of the audit record.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from sklearn.metrics import roc_auc_score

from clinical_ml import bootstrap
from clinical_ml.policy import PromotionRules

# Validation metrics that are gates (the others in the report are reported only).
GATE_METRICS = ("auroc", "sensitivity_at_90_specificity", "calibration_slope", "subgroup_auroc_gap", "cv_auroc_std")


@dataclass(frozen=True)
class Comparison:
    rows: int
    patients: int
    challenger_auroc: float
    champion_auroc: float
    difference: float
    ci_low: float
    ci_high: float
    margin: float

    @property
    def non_inferior(self) -> bool:
        return bool(self.ci_low > -self.margin)


@dataclass(frozen=True)
class Approval:
    approved_by: str
    reason: str


@dataclass
class Decision:
    promote: bool
    reasons: list[str]
    gates: dict[str, bool]
    comparison: Comparison | None = None
    approval: Approval | None = None
    first_model: bool = False
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        out = asdict(self)
        if self.comparison is not None:
            out["comparison"]["non_inferior"] = self.comparison.non_inferior
        return out


def compare(y: np.ndarray, challenger: np.ndarray, champion: np.ndarray, groups: np.ndarray,
            rules: PromotionRules) -> Comparison:
    """AUROC difference (challenger - champion) with a 95% bootstrap CI that resamples patients
    (``groups``), so a patient's landmarks stay together."""
    y, challenger, champion = np.asarray(y), np.asarray(challenger, float), np.asarray(champion, float)
    # a resample with one class has no AUROC (NaN), and percentile_ci leaves it out
    differences = np.concatenate([
        bootstrap.auroc(y, challenger, weights) - bootstrap.auroc(y, champion, weights)
        for weights in bootstrap.patient_resamples(groups, rules.bootstrap_samples, rules.bootstrap_seed)])
    low, high = bootstrap.percentile_ci(differences)
    a, b = float(roc_auc_score(y, challenger)), float(roc_auc_score(y, champion))
    return Comparison(rows=len(y), patients=len(np.unique(np.asarray(groups))), challenger_auroc=a, champion_auroc=b,
                      difference=a - b, ci_low=low, ci_high=high, margin=rules.non_inferiority_margin)


def decide(gates: dict[str, bool], comparison: Comparison | None, has_champion: bool,
           approval: Approval | None = None) -> Decision:
    """Promote when every gate passes and (with a champion) the challenger is non-inferior; a
    named approval overrides a failure and says so."""
    reasons = [f"gate {name} not met" for name, passed in gates.items() if not passed]
    if has_champion:
        if comparison is None:
            reasons.append("not comparable with the champion (no shared held-out patients or other features)")
        elif not comparison.non_inferior:
            reasons.append(f"AUROC difference {comparison.difference:+.4f}, 95% CI lower bound {comparison.ci_low:+.4f} "
                           f"below -{comparison.margin} (non-inferiority margin)")
    promote = not reasons
    notes = []
    if not promote and approval is not None:
        promote = True
        notes.append(f"promoted by exception: approved by {approval.approved_by}: {approval.reason}")
    return Decision(promote=promote, reasons=reasons, gates=gates, comparison=comparison, approval=approval,
                    first_model=not has_champion, notes=notes)
