"""Figures for a reviewer, as small PNGs to embed in Dagster markdown metadata.

Every figure shows aggregates only (rates over thresholds, deciles, per-feature PSI), never a
row or a patient key. Figures are built on matplotlib's object API with the Agg canvas, not
pyplot: nothing is registered in pyplot's global figure list, so nothing leaks between runs
or threads, and no display backend is needed.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

SIZE_INCHES = (5, 4)
DPI = 80  # 400 x 320 px: ~20-40 KB per PNG, so metadata stays small


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def roc_curve_png(predictions: pl.DataFrame) -> bytes:
    """ROC curves of the model (``score``) and, when present, the baseline (``baseline_score``)."""
    y = predictions["y_true"].to_numpy()
    figure = Figure(figsize=SIZE_INCHES)
    ax = figure.add_subplot()
    for column, label in (("score", "model"), ("baseline_score", "baseline")):
        if column in predictions.columns:
            score = predictions[column].to_numpy()
            fpr, tpr, _ = roc_curve(y, score)
            ax.plot(fpr, tpr, label=f"{label} (AUROC {roc_auc_score(y, score):.3f})")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    ax.axvline(0.10, linestyle="--", color="lightgrey", linewidth=1)  # 90% specificity, a gated operating point
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC curve (held-out)", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize="small")
    return _png(figure)


def calibration_deciles(predictions: pl.DataFrame, bins: int = 10) -> pl.DataFrame:
    """Mean predicted risk and observed rate per decile of predicted risk (n per bin)."""
    return (predictions.select("score", "y_true")
            .with_columns(bin=(pl.col("score").rank("ordinal") * bins / pl.len()).ceil().cast(pl.Int64))
            .group_by("bin").agg(predicted=pl.col("score").mean(), observed=pl.col("y_true").mean(), n=pl.len())
            .sort("bin"))


def calibration_curve_png(predictions: pl.DataFrame) -> bytes:
    """Observed event rate against mean predicted risk by decile, with the diagonal of perfect calibration."""
    deciles = calibration_deciles(predictions)
    figure = Figure(figsize=SIZE_INCHES)
    ax = figure.add_subplot()
    top = max(float(deciles["predicted"].max()), float(deciles["observed"].max()), 0.05) * 1.05
    ax.plot([0, top], [0, top], linestyle=":", color="grey", label="perfect calibration")
    ax.plot(deciles["predicted"].to_numpy(), deciles["observed"].to_numpy(), marker="o", label="model (deciles)")
    ax.set(xlabel="mean predicted risk", ylabel="observed rate", title="Calibration (held-out)",
           xlim=(0, top), ylim=(0, top))
    ax.legend(loc="upper left", fontsize="small")
    return _png(figure)


def psi_bar_chart_png(psi: pl.DataFrame, threshold: float) -> bytes:
    """PSI per feature (columns ``feature``, ``psi``), the largest on top, against the retrain threshold."""
    rows = psi.select("feature", "psi").sort("psi", nulls_last=False)
    values = np.nan_to_num(rows["psi"].to_numpy().astype(float))
    # taller for many features, so every label stays readable
    figure = Figure(figsize=(SIZE_INCHES[0], max(SIZE_INCHES[1], 0.22 * rows.height + 1)))
    ax = figure.add_subplot()
    ax.barh(rows["feature"].to_list(), values, color=np.where(values > threshold, "tab:red", "tab:blue"))
    ax.axvline(threshold, linestyle="--", color="black", label=f"retrain threshold {threshold:g}")
    ax.set(xlabel="PSI", title="Population stability index per feature")
    ax.tick_params(axis="y", labelsize="small")
    ax.legend(loc="lower right", fontsize="small")
    return _png(figure)


def png_markdown(png: bytes, title: str) -> str:
    """Markdown embedding a PNG as a data URI, for ``dagster.MetadataValue.md`` (the UI renders it)."""
    return f"![{title}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"
