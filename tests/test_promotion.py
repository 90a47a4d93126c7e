"""Champion vs challenger decisions (domain rules, without Dagster or MLflow)."""

import numpy as np
import pytest

from clinical_ml.policy import PromotionRules
from clinical_ml.promotion import Approval, compare, decide

RULES = PromotionRules(non_inferiority_margin=0.02, bootstrap_samples=300, bootstrap_seed=1)
ALL_MET = {"auroc": True, "sensitivity_at_90_specificity": True, "calibration_slope": True,
           "subgroup_auroc_gap": True, "cv_auroc_std": True}


def scored(strength: float, seed: int, n_patients=600, per_patient=3):
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(n_patients), per_patient)
    y = (rng.random(len(groups)) < 0.2).astype(int)
    noise = np.random.default_rng(seed).normal(0, 1, len(groups))
    return y, np.where(y == 1, strength, -strength) + noise, groups


def test_a_worse_challenger_is_not_promoted_and_an_equal_one_is():
    y, champion, groups = scored(1.2, seed=1)
    _, worse, _ = scored(0.6, seed=2)
    _, equal, _ = scored(1.2, seed=3)
    worse_vs = compare(y, worse, champion, groups, RULES)
    assert worse_vs.difference < -0.05 and worse_vs.ci_high < 0 and not worse_vs.non_inferior
    decision = decide(ALL_MET, worse_vs, has_champion=True)
    assert not decision.promote and "non-inferiority" in decision.reasons[0]
    equal_vs = compare(y, equal, champion, groups, RULES)
    assert equal_vs.ci_low < 0 < equal_vs.ci_high and equal_vs.non_inferior
    assert decide(ALL_MET, equal_vs, has_champion=True).promote


def test_a_model_failing_any_gate_is_never_promoted_without_a_named_approval():
    for gate in ALL_MET:
        gates = {**ALL_MET, gate: False}
        assert not decide(gates, None, has_champion=False).promote  # not even the first model
    approval = Approval(approved_by="dr.chen@hospital.org", reason="calibration recalibrated downstream")
    decision = decide({**ALL_MET, "calibration_slope": False}, None, has_champion=False, approval=approval)
    assert decision.promote and decision.reasons == ["gate calibration_slope not met"]
    assert "approved by dr.chen@hospital.org" in decision.notes[0]
    assert decision.as_dict()["approval"] == {"approved_by": "dr.chen@hospital.org",
                                              "reason": "calibration recalibrated downstream"}


def test_the_first_model_becomes_champion_only_through_the_gates():
    assert decide(ALL_MET, None, has_champion=False).promote
    assert decide(ALL_MET, None, has_champion=False).first_model
    assert not decide(ALL_MET, None, has_champion=True).promote  # a champion but nothing to compare on


def test_the_bootstrap_resamples_patients_and_is_reproducible():
    y, champion, groups = scored(1.2, seed=1)
    _, challenger, _ = scored(1.1, seed=4)
    first, second = compare(y, challenger, champion, groups, RULES), compare(y, challenger, champion, groups, RULES)
    assert first == second and first.patients == 600 and first.rows == 1800
    wider = compare(y, challenger, champion, np.zeros_like(groups), RULES)  # one cluster: no variation
    assert wider.ci_low == pytest.approx(wider.ci_high)
