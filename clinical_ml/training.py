"""Reproducible training: CatBoost plus a logistic-regression baseline, patient-level split.

Rows are (patient, landmark) pairs. The split is a keyed hash of the patient key (not row
order), so it is stable across runs and cohort sizes, and all landmarks of a patient fall on
the same side; cross-validation folds are grouped by patient too. Next to that random-patient
split, a temporal validation trains on earlier landmarks (whose outcome windows closed before
the test period) and tests on later ones, as the model will be used. Everything random is seeded.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from datetime import date, timedelta

import numpy as np
import polars as pl
from catboost import CatBoostClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from clinical_ml.features import MODEL_FEATURES, ROW_KEY, SUBGROUP_COLUMNS


@dataclass(frozen=True)
class TrainingConfig:
    seed: int = 42
    test_fraction: float = 0.3
    iterations: int = 400
    depth: int = 4
    learning_rate: float = 0.05
    l2_leaf_reg: float = 5.0
    cv_folds: int = 5
    thread_count: int = 2
    min_positives: int = 50  # positive (patient, landmark) examples needed to train at all
    temporal_test_fraction: float = 0.3  # latest landmarks holding about this share of rows

    def catboost_params(self) -> dict:
        return {
            "iterations": self.iterations, "depth": self.depth, "learning_rate": self.learning_rate,
            "l2_leaf_reg": self.l2_leaf_reg, "random_seed": self.seed, "loss_function": "Logloss",
            "thread_count": self.thread_count, "verbose": False, "allow_writing_files": False,
        }


@dataclass
class TrainingResult:
    model: CatBoostClassifier
    baseline: object
    feature_names: list[str]
    test_predictions: pl.DataFrame  # patient_key, y_true, score, baseline_score, subgroup columns
    metrics: dict[str, float]
    cv_aurocs: list[float]
    temporal: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    n_train: int = 0
    n_test: int = 0

    def model_bytes(self) -> bytes:
        # CatBoost stamps each model with a finish time and a random GUID; without them the
        # file (and its SHA-256 in the audit trail) is identical for the same data and seed.
        metadata = self.model.get_metadata()
        for volatile in ("train_finish_time", "model_guid"):
            if volatile in metadata:
                del metadata[volatile]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.cbm")
            self.model.save_model(path, format="cbm")
            with open(path, "rb") as handle:
                return handle.read()


class InsufficientDataError(ValueError):
    """The cohort cannot support a model; the message says why, in numbers."""


def frame_hash(frame: pl.DataFrame, key: list[str] = ROW_KEY) -> str:
    """SHA-256 of the frame's content, independent of row order (sorted by ``key``)."""
    present = [k for k in key if k in frame.columns]
    ordered = frame.sort(present) if present else frame
    return hashlib.sha256(ordered.write_csv().encode()).hexdigest()


def check_trainable(frame: pl.DataFrame, config: "TrainingConfig", data_span: str = "") -> None:
    """Raise InsufficientDataError, with the counts, unless the cohort can train and be tested."""
    rows = frame.height
    positives = int(frame["label"].sum()) if rows else 0
    landmarks = frame["landmark_date"].n_unique() if rows else 0
    patients = frame.filter(pl.col("label") == 1)["patient_key"].n_unique() if rows else 0
    span = f"; {data_span}" if data_span else ""
    if positives < config.min_positives or rows - positives < config.min_positives:
        raise InsufficientDataError(
            f"{positives} positive examples ({patients} patients) and {rows - positives} negative examples across "
            f"{landmarks} landmarks, at least {config.min_positives} of each needed{span}")


def test_mask(patient_keys: pl.Series, fraction: float, seed: int) -> np.ndarray:
    """True for patients in the held-out test set (deterministic per key and seed)."""
    def bucket(k: str) -> float:
        return int.from_bytes(hashlib.sha256(f"{seed}:{k}".encode()).digest()[:8], "big") / 2**64

    return np.array([bucket(k) < fraction for k in patient_keys.to_list()])


def _baseline():
    return make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler(), LogisticRegression(max_iter=2000))


def patient_folds(labels: np.ndarray, groups: np.ndarray, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified CV folds with all rows of a patient (``groups``) in the same fold."""
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(folds.split(np.zeros(len(labels)), labels, groups))


def _temporal_split(frame: pl.DataFrame, horizon_days: int, fraction: float) -> tuple[np.ndarray, np.ndarray, date | None]:
    """Train/test masks for the temporal validation: test = the latest landmarks holding about
    ``fraction`` of the rows; train = landmarks whose whole horizon ended by the first test
    landmark, so no training label was observed after the model would have been built."""
    landmarks = frame["landmark_date"]
    counts = frame.group_by("landmark_date").len().sort("landmark_date", descending=True)
    cut, seen = None, 0
    for landmark, n in counts.iter_rows():
        cut, seen = landmark, seen + n
        if seen >= fraction * frame.height:
            break
    if cut is None:
        return np.zeros(frame.height, bool), np.zeros(frame.height, bool), None
    test = (landmarks >= cut).to_numpy()
    train = (landmarks.cast(pl.Date) <= cut - timedelta(days=horizon_days)).to_numpy()
    return train, test, cut


def temporal_validation(frame: pl.DataFrame, config: "TrainingConfig", horizon_days: int) -> dict[str, object]:
    """AUROC of a model trained on earlier landmarks and tested on later ones (NaN, with the
    reason, when either side lacks a class)."""
    train_mask, test_mask_, cut = _temporal_split(frame, horizon_days, config.temporal_test_fraction)
    labels = frame["label"].to_numpy()
    result = {"temporal_test_from": cut.isoformat() if cut else None, "temporal_n_train": int(train_mask.sum()),
              "temporal_n_test": int(test_mask_.sum()), "temporal_test_positives": int(labels[test_mask_].sum())}
    if len(set(labels[train_mask])) < 2 or len(set(labels[test_mask_])) < 2:
        return {**result, "temporal_test_auroc": float("nan"),
                "temporal_note": "not measurable: a side of the temporal split has a single class"}
    features = frame.select(MODEL_FEATURES).to_pandas().astype("float64")
    model = CatBoostClassifier(**config.catboost_params())
    model.fit(features[train_mask], labels[train_mask])
    score = model.predict_proba(features[test_mask_])[:, 1]
    return {**result, "temporal_test_auroc": float(roc_auc_score(labels[test_mask_], score)), "temporal_note": ""}


def train(frame: pl.DataFrame, config: TrainingConfig, horizon_days: int = 730, data_span: str = "") -> TrainingResult:
    check_trainable(frame, config, data_span)
    labels = frame["label"].to_numpy()
    features = frame.select(MODEL_FEATURES).to_pandas().astype("float64")
    groups = frame["patient_key"].to_numpy()
    is_test = test_mask(frame["patient_key"], config.test_fraction, config.seed)
    x_train, x_test = features[~is_test], features[is_test]
    y_train, y_test = labels[~is_test], labels[is_test]
    if len(set(y_train)) < 2 or len(set(y_test)) < 2:
        raise InsufficientDataError(
            f"the patient-level split left {int(y_train.sum())} positives in training and {int(y_test.sum())} in "
            f"the test set; both need some{'; ' + data_span if data_span else ''}")

    model = CatBoostClassifier(**config.catboost_params())
    model.fit(x_train, y_train)
    baseline = _baseline().fit(x_train, y_train)
    score = model.predict_proba(x_test)[:, 1]
    baseline_score = baseline.predict_proba(x_test)[:, 1]

    # Cross-validated AUROC on the training patients, folds grouped by patient: stability of
    # the fit, not a test figure.
    cv_aurocs = []
    for fit_idx, val_idx in patient_folds(y_train, groups[~is_test], config.cv_folds, config.seed):
        if len(set(y_train[val_idx])) < 2:
            continue  # a fold without positives has no AUROC (counted by the fold count below)
        fold_model = CatBoostClassifier(**config.catboost_params())
        fold_model.fit(x_train.iloc[fit_idx], y_train[fit_idx])
        cv_aurocs.append(float(roc_auc_score(y_train[val_idx], fold_model.predict_proba(x_train.iloc[val_idx])[:, 1])))
    temporal = temporal_validation(frame, config, horizon_days)

    predictions = frame.filter(pl.Series(is_test)).select([*ROW_KEY, *SUBGROUP_COLUMNS]).with_columns(
        y_true=pl.Series(y_test, dtype=pl.Int32),
        score=pl.Series(score, dtype=pl.Float64),
        baseline_score=pl.Series(baseline_score, dtype=pl.Float64),
    )
    metrics = {
        "test_auroc": float(roc_auc_score(y_test, score)) if len(set(y_test)) > 1 else float("nan"),
        "baseline_test_auroc": float(roc_auc_score(y_test, baseline_score)) if len(set(y_test)) > 1 else float("nan"),
        "cv_auroc_mean": float(np.mean(cv_aurocs)) if cv_aurocs else float("nan"),
        "cv_auroc_std": float(np.std(cv_aurocs)) if len(cv_aurocs) >= 2 else float("nan"),
        "cv_folds_measured": float(len(cv_aurocs)),
        "temporal_test_auroc": temporal["temporal_test_auroc"],
        "n_landmarks": float(frame["landmark_date"].n_unique()),
        "n_patients": float(frame["patient_key"].n_unique()),
        "train_prevalence": float(y_train.mean()),
        "test_prevalence": float(y_test.mean()),
    }
    return TrainingResult(
        model=model, baseline=baseline, feature_names=list(MODEL_FEATURES), test_predictions=predictions,
        metrics=metrics, cv_aurocs=cv_aurocs, temporal=temporal,
        # the split is part of the model's identity: which patients it never saw
        params={**config.catboost_params(), "test_fraction": config.test_fraction, "split_seed": config.seed},
        n_train=int((~is_test).sum()), n_test=int(is_test.sum()),
    )


def load_model(model_bytes: bytes) -> CatBoostClassifier:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.cbm")
        with open(path, "wb") as handle:
            handle.write(model_bytes)
        return CatBoostClassifier().load_model(path, format="cbm")
