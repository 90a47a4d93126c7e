from datetime import timedelta

import numpy as np
import polars as pl
import pytest

from clinical_ml.features import FeatureSpec, build_feature_matrix, resolve_landmarks
from clinical_ml.training import InsufficientDataError, TrainingConfig, _temporal_split, check_trainable, patient_folds
from clinical_ml.training import test_mask as held_out_mask
from clinical_ml.training import train

FAST = TrainingConfig(iterations=30, cv_folds=3)


@pytest.fixture(scope="module")
def landmark_frame(deid_con) -> pl.DataFrame:
    return build_feature_matrix(deid_con, FeatureSpec())


def test_no_patient_on_both_sides_of_the_split_or_of_a_cv_fold(landmark_frame):
    frame = landmark_frame
    result = train(frame, FAST, horizon_days=730)
    test_patients = set(result.test_predictions["patient_key"])
    is_test = held_out_mask(frame["patient_key"], FAST.test_fraction, FAST.seed)
    train_patients = set(frame.filter(pl.Series(~is_test))["patient_key"])
    assert test_patients and train_patients and not test_patients & train_patients
    # every landmark of a test patient is in the test set
    assert result.test_predictions.height == frame.filter(pl.col("patient_key").is_in(list(test_patients))).height

    groups = frame["patient_key"].to_numpy()
    labels = frame["label"].to_numpy()
    folds = patient_folds(labels, groups, 5, seed=42)
    assert len(folds) == 5
    for fit_idx, val_idx in folds:
        assert not set(groups[fit_idx]) & set(groups[val_idx])
        assert labels[val_idx].sum() > 0
    assert len(result.cv_aurocs) == FAST.cv_folds and result.metrics["cv_folds_measured"] == FAST.cv_folds


def test_temporal_validation_trains_only_on_closed_outcome_windows(landmark_frame):
    horizon = 730
    train_mask, test_mask_, cut = _temporal_split(landmark_frame, horizon, 0.3)
    landmarks = landmark_frame["landmark_date"].to_numpy()
    assert test_mask_.sum() >= 0.3 * landmark_frame.height and (landmarks[test_mask_] >= np.datetime64(cut)).all()
    assert train_mask.sum() > 0
    assert (landmarks[train_mask] <= np.datetime64(cut - timedelta(days=horizon))).all()
    result = train(landmark_frame, FAST, horizon_days=horizon)
    assert 0.5 < result.metrics["temporal_test_auroc"] <= 1.0
    assert result.temporal["temporal_test_from"] == cut.isoformat()


def test_a_tiny_cohort_stops_with_the_numbers(landmark_frame):
    tiny = pl.concat([landmark_frame.filter(pl.col("label") == 1).head(12), landmark_frame.filter(pl.col("label") == 0)])
    landmarks = tiny.filter(pl.col("label") == 1)["landmark_date"].n_unique()
    with pytest.raises(InsufficientDataError) as err:
        train(tiny, FAST, data_span="data runs 2010-01-01 to 2019-12-31 (de-identified dates)")
    message = str(err.value)
    assert message.startswith("12 positive examples")
    assert f"across {tiny['landmark_date'].n_unique()} landmarks" in message and landmarks >= 1
    assert "at least 50 of each needed" in message and "data runs 2010-01-01 to 2019-12-31" in message
    with pytest.raises(InsufficientDataError, match="0 positive examples"):
        check_trainable(landmark_frame.head(0), FAST)


def test_training_is_reproducible_on_the_landmark_cohort(deid_con):
    spec = FeatureSpec()
    frame = build_feature_matrix(deid_con, spec, plan=resolve_landmarks(deid_con, spec))
    first, second = train(frame, FAST), train(frame, FAST)
    assert first.model_bytes() == second.model_bytes()
    assert first.metrics == pytest.approx(second.metrics, nan_ok=True)
