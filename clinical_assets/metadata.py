"""Helpers that turn domain results into Dagster metadata analysts can read in the UI."""

from __future__ import annotations

import math

import polars as pl
from dagster import MetadataValue


def _fmt(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def markdown_table(frame: pl.DataFrame, max_rows: int = 60) -> MetadataValue:
    head = frame.head(max_rows)
    lines = ["| " + " | ".join(head.columns) + " |", "|" + "---|" * len(head.columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in head.iter_rows()]
    if frame.height > max_rows:
        lines.append(f"\n… {frame.height - max_rows} more rows")
    return MetadataValue.md("\n".join(lines))


def counts_table(counts: dict, key: str = "item", value: str = "count") -> MetadataValue:
    return markdown_table(pl.DataFrame({key: list(counts), value: list(counts.values())}))
