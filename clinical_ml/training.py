"""Reproducible training: CatBoost plus a logistic-regression baseline, patient-level split.

The split is a keyed hash of the patient key (not row order), so it is stable across runs and
cohort sizes, and a patient is never on both sides. Everything random is seeded.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
import polars as pl
from catboost import CatBoostClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from clinical_ml.features import MODEL_FEATURES, SUBGROUP_COLUMNS


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


def frame_hash(frame: pl.DataFrame, key: str = "patient_key") -> str:
    """SHA-256 of the frame's content, independent of row order (sorted by ``key``)."""
    ordered = frame.sort(key) if key in frame.columns else frame
    return hashlib.sha256(ordered.write_csv().encode()).hexdigest()


def test_mask(patient_keys: pl.Series, fraction: float, seed: int) -> np.ndarray:
    """True for patients in the held-out test set (deterministic per key and seed)."""
    def bucket(k: str) -> float:
        return int.from_bytes(hashlib.sha256(f"{seed}:{k}".encode()).digest()[:8], "big") / 2**64

    return np.array([bucket(k) < fraction for k in patient_keys.to_list()])


def _baseline():
    return make_pipeline(SimpleImputer(strategy="median"), StandardScaler(), LogisticRegression(max_iter=2000))


def train(frame: pl.DataFrame, config: TrainingConfig) -> TrainingResult:
    if frame.height == 0:
        raise ValueError("feature matrix is empty: no eligible patients at the index date")
    labels = frame["label"].to_numpy()
    if labels.min() == labels.max():
        raise ValueError("feature matrix has a single class: cannot train a classifier")
    features = frame.select(MODEL_FEATURES).to_pandas().astype("float64")
    is_test = test_mask(frame["patient_key"], config.test_fraction, config.seed)
    x_train, x_test = features[~is_test], features[is_test]
    y_train, y_test = labels[~is_test], labels[is_test]

    model = CatBoostClassifier(**config.catboost_params())
    model.fit(x_train, y_train)
    baseline = _baseline().fit(x_train, y_train)
    score = model.predict_proba(x_test)[:, 1]
    baseline_score = baseline.predict_proba(x_test)[:, 1]

    # Cross-validated AUROC on the training patients: stability of the fit, not a test figure.
    cv_aurocs = []
    folds = StratifiedKFold(n_splits=config.cv_folds, shuffle=True, random_state=config.seed)
    for fit_idx, val_idx in folds.split(x_train, y_train):
        fold_model = CatBoostClassifier(**config.catboost_params())
        fold_model.fit(x_train.iloc[fit_idx], y_train[fit_idx])
        cv_aurocs.append(float(roc_auc_score(y_train[val_idx], fold_model.predict_proba(x_train.iloc[val_idx])[:, 1])))

    predictions = frame.filter(pl.Series(is_test)).select(["patient_key", *SUBGROUP_COLUMNS]).with_columns(
        y_true=pl.Series(y_test, dtype=pl.Int32),
        score=pl.Series(score, dtype=pl.Float64),
        baseline_score=pl.Series(baseline_score, dtype=pl.Float64),
    )
    metrics = {
        "test_auroc": float(roc_auc_score(y_test, score)) if len(set(y_test)) > 1 else float("nan"),
        "baseline_test_auroc": float(roc_auc_score(y_test, baseline_score)) if len(set(y_test)) > 1 else float("nan"),
        "cv_auroc_mean": float(np.mean(cv_aurocs)),
        "cv_auroc_std": float(np.std(cv_aurocs)),
        "train_prevalence": float(y_train.mean()),
        "test_prevalence": float(y_test.mean()),
    }
    return TrainingResult(
        model=model, baseline=baseline, feature_names=list(MODEL_FEATURES), test_predictions=predictions,
        metrics=metrics, cv_aurocs=cv_aurocs, params=config.catboost_params(),
        n_train=int((~is_test).sum()), n_test=int(is_test.sum()),
    )


def load_model(model_bytes: bytes) -> CatBoostClassifier:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.cbm")
        with open(path, "wb") as handle:
            handle.write(model_bytes)
        return CatBoostClassifier().load_model(path, format="cbm")
