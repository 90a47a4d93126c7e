"""Patient-level bootstrap: resampling and metrics computed for many replicates at once.

A patient contributes several landmark rows whose outcomes are correlated, so the unit of
resampling is the patient: a replicate draws patients with replacement and each row counts as
many times as its patient was drawn. A replicate is a row of a weight matrix
(replicates x rows); every metric here takes such a matrix and returns one value per replicate,
vectorised with numpy (a loop over sklearn calls is ~100x slower). With weights of one they
equal the sklearn-based point estimates in ``clinical_ml.validation`` (tested).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy.special import expit

MAX_CHUNK_CELLS = 2_000_000  # replicates x rows per weight matrix: ~16 MB of float64


def patient_resamples(patients: np.ndarray, samples: int, seed: int) -> Iterator[np.ndarray]:
    """Row-weight matrices (replicates x rows), ``samples`` replicates in all, in chunks to bound
    memory. Row i's weight is how many times its patient (``patients[i]``) was drawn."""
    keys, row_patient = np.unique(np.asarray(patients), return_inverse=True)
    rng = np.random.default_rng(seed)
    chunk = max(1, MAX_CHUNK_CELLS // max(len(row_patient), 1))
    for start in range(0, samples, chunk):
        size = min(chunk, samples - start)
        # one (size x patients) draw consumes the stream as `size` draws of `patients` would
        drawn = rng.integers(0, len(keys), (size, len(keys)))
        offsets = np.arange(size)[:, None] * len(keys)
        counts = np.bincount((drawn + offsets).ravel(), minlength=size * len(keys)).reshape(size, len(keys))
        yield counts[:, row_patient].astype(float)


def percentile_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval over the replicates where the metric is defined (NaN: a resample
    with a single class has no AUROC); NaN when none is."""
    values = np.asarray(values, float)
    values = values[~np.isnan(values)]
    if not len(values):
        return float("nan"), float("nan")
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def _by_score(y: np.ndarray, score: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative weight at each distinct score, scores ascending (replicates x levels).
    Tied scores form one level, as they form one threshold on the ROC curve."""
    order = np.argsort(score, kind="stable")
    s, positive, w = score[order], np.asarray(y)[order].astype(bool), weights[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    return (np.add.reduceat(np.where(positive, w, 0.0), starts, axis=1),
            np.add.reduceat(np.where(positive, 0.0, w), starts, axis=1))


def auroc(y: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC per replicate: P(score of a positive > score of a negative), ties counting one half
    (as roc_auc_score). NaN for a replicate with a single class."""
    if not len(score):
        return np.full(len(weights), np.nan)
    pos, neg = _by_score(y, np.asarray(score, float), weights)
    below = np.cumsum(neg, axis=1) - neg  # negative weight strictly below each level
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(axis=1) / (pos.sum(axis=1) * neg.sum(axis=1))


def sensitivity_at_specificity(y: np.ndarray, score: np.ndarray, weights: np.ndarray,
                               specificity: float = 0.90) -> np.ndarray:
    """Highest sensitivity among thresholds (every distinct score) whose specificity is at least
    ``specificity``, per replicate."""
    pos, neg = _by_score(y, np.asarray(score, float), weights)
    # predicted positive at a level = that score or higher: reverse cumulative sums
    tp = np.cumsum(pos[:, ::-1], axis=1)
    fp = np.cumsum(neg[:, ::-1], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr, fpr = tp / tp[:, -1:], fp / fp[:, -1:]
    allowed = fpr <= (1.0 - specificity) + 1e-12
    # the curve starts at (0, 0): nothing predicted positive is always allowed
    return np.where(allowed, tpr, 0.0).max(axis=1)


def calibration_slope(y: np.ndarray, score: np.ndarray, weights: np.ndarray, iterations: int = 50) -> np.ndarray:
    """Weighted logistic recalibration slope per replicate: Newton-Raphson on all replicates at
    once, from (0, 0) as the full-sample fit starts (a start near that fit can overshoot)."""
    p = np.clip(np.asarray(score, float), 1e-6, 1 - 1e-6)
    x, y = np.log(p / (1 - p)), np.asarray(y, float)
    a, b = np.zeros(len(weights)), np.zeros(len(weights))
    for _ in range(iterations):
        mu = expit(a[:, None] + b[:, None] * x)
        residual, curvature = weights * (y - mu), weights * mu * (1 - mu)
        g0, g1 = residual.sum(axis=1), residual @ x
        h00, h01, h11 = curvature.sum(axis=1), curvature @ x, curvature @ (x * x)
        with np.errstate(invalid="ignore", divide="ignore"):
            det = h00 * h11 - h01 ** 2
            step_a, step_b = (h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det
        a, b = a + step_a, b + step_b
        if np.nanmax(np.abs(np.r_[step_a, step_b]), initial=0.0) < 1e-10:  # NaN: undefined, not converging
            break
    return b


def brier_score(y: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return weights @ (np.asarray(y, float) - np.asarray(score, float)) ** 2 / weights.sum(axis=1)
