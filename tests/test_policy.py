"""The clinical policy file: one source for every threshold the platform acts on."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from dagster import MetadataValue

from clinical_ml.policy import DEFAULT_POLICY_FILE, current_policy, load_policy
from clinical_ml.validation import validate
from sensors.drift_sensor import psi_exceeds

STRICTER = '''version = "site-7"
[validation]
min_auroc = 0.95
min_sensitivity_at_90_specificity = 0.70
calibration_slope_range = [0.8, 1.2]
max_subgroup_auroc_gap = 0.05
max_cv_auroc_std = 0.03
[monitoring]
psi_retrain_threshold = 0.5
[promotion]
non_inferiority_margin = 0.01
bootstrap_samples = 200
bootstrap_seed = 1
'''


def test_the_shipped_policy_holds_the_platforms_thresholds():
    policy = load_policy(DEFAULT_POLICY_FILE)
    v = policy.validation
    assert (v.min_auroc, v.min_sensitivity_at_90_specificity, v.calibration_slope_range, v.max_subgroup_auroc_gap,
            v.max_cv_auroc_std, policy.psi_retrain_threshold) == (0.85, 0.70, (0.8, 1.2), 0.05, 0.03, 0.2)
    assert policy.version


def test_a_site_policy_file_changes_every_verdict_that_reads_it(tmp_path, monkeypatch):
    site = tmp_path / "policy.toml"
    site.write_text(STRICTER)
    monkeypatch.setenv("CLINICAL_POLICY_FILE", str(site))
    policy = current_policy()
    assert policy.version == "site-7" and policy.psi_retrain_threshold == 0.5
    rng = np.random.default_rng(3)
    y = (rng.random(2000) < 0.2).astype(int)
    score = 1 / (1 + np.exp(-(np.where(y == 1, 0.9, -0.9) + rng.normal(0, 1, 2000) - 1.4)))
    predictions = pl.DataFrame({"patient_key": [f"k{i}" for i in range(2000)], "sex": rng.choice(["f", "m"], 2000),
                                "age_group": rng.choice(["18-44", "45-64"], 2000), "race": "x", "y_true": y,
                                "score": score})
    report = validate(predictions, 0.01, policy.validation)
    assert 0.85 <= report.value("auroc") < 0.95 and not report.passed("auroc") and report.rule("auroc") == ">= 0.95"
    # the sensor acts on the threshold recorded with the report, which the asset took from the policy
    assert psi_exceeds({"max_psi": MetadataValue.float(0.3), "psi_threshold": MetadataValue.float(0.5)})[0] is False
    assert psi_exceeds({"max_psi": MetadataValue.float(0.3)})[:2] == (False, 0.3)  # policy 0.5 when not recorded
    site.write_text(STRICTER.replace("0.5", "0.25"))
    assert psi_exceeds({"max_psi": MetadataValue.float(0.3)})[0] is True  # an edited file is re-read


@pytest.mark.parametrize("broken", ["version = 1\n", STRICTER.replace("psi_retrain_threshold = 0.5", ""),
                                    STRICTER.replace("[0.8, 1.2]", "[1.2, 0.8]"), "not toml ["])
def test_a_broken_policy_is_a_clear_error(tmp_path, broken):
    path = tmp_path / "policy.toml"
    path.write_text(broken)
    with pytest.raises(ValueError, match="clinical policy"):
        load_policy(path)


def test_check_names_carry_no_threshold_values():
    from clinical_assets.definitions import defs

    names = [key.name for key in defs.resolve_asset_graph().asset_check_keys]
    assert names and not [n for n in names if any(ch.isdigit() for ch in n.replace("90", ""))]
    assert Path(DEFAULT_POLICY_FILE).exists()
