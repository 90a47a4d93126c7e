"""Ingest speed: our landing against a bare DuckDB scan and the seed-style Python loop.

    .venv/bin/python benchmarks/ingest.py [--patients 9000] [--dir FOLDER]

Generates (or reuses) a synthetic Bulk export of >= 1M resources, then times, in this process
and over the same files: (a) DuckDB `read_ndjson_objects` into a table (no validation: the
practical limit here), (b) the seed-style landing: per-line `json.loads` and dict walks into
row dicts, inserted into a DuckDB table in batches (its parse-and-walk phase alone is printed
too), (c) `land_ndjson` (keys, quarantine, reconciliation). Both DuckDB databases are files with
a 256 MB memory limit; (c) runs first so the peak RSS it reports is the landing's own.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clinical_ml.ingest import land_ndjson, resource_files  # noqa: E402
from clinical_ml.synthetic import CohortSpec, write_bulk_export  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


MEMORY_LIMIT = "256MB"


def duckdb_scan(files: list[Path], workdir: Path) -> int:
    con = duckdb.connect(str(workdir / "scan.duckdb"), config={"threads": 2, "memory_limit": MEMORY_LIMIT})
    con.execute(f"CREATE TABLE scanned AS SELECT * FROM read_ndjson_objects({[str(f) for f in files]!r})")
    count = con.execute("SELECT count(*) FROM scanned").fetchone()[0]
    con.close()
    return count


def seed_loop(files: list[Path], workdir: Path, timings: dict) -> int:
    con = duckdb.connect(str(workdir / "seed.duckdb"), config={"threads": 2, "memory_limit": MEMORY_LIMIT})
    con.execute("CREATE TABLE resources (resource_type VARCHAR, id VARCHAR, subject VARCHAR, source_file VARCHAR, "
                "line_no BIGINT, resource JSON)")
    parse_seconds, count, rows = 0.0, 0, []

    def insert_batch() -> None:
        arrow_rows = pa.Table.from_pylist(rows)  # noqa: F841 (DuckDB reads it by name)
        con.execute("INSERT INTO resources SELECT * FROM arrow_rows")
        rows.clear()

    batch_start = time.perf_counter()
    for path in files:
        with open(path, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, 1):
                resource_ = json.loads(line)
                subject = resource_.get("subject") or resource_.get("patient") or {}
                rows.append({"resource_type": resource_.get("resourceType"), "id": resource_.get("id"),
                             "subject": subject.get("reference"), "source_file": path.name,
                             "line_no": line_no, "resource": line})
                count += 1
                if len(rows) == 50_000:
                    parse_seconds += time.perf_counter() - batch_start
                    insert_batch()
                    batch_start = time.perf_counter()
    parse_seconds += time.perf_counter() - batch_start
    if rows:
        insert_batch()
    con.close()
    timings["parse_and_walk_s"] = parse_seconds
    return count


def our_landing(directory: Path, workdir: Path) -> int:
    con = duckdb.connect(str(workdir / "landing.duckdb"), config={"threads": 2, "memory_limit": MEMORY_LIMIT})
    report = land_ndjson(con, directory)
    con.close()
    assert report.reconciles
    return report.loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=9000, help="synthetic patients (9000 ≈ 1M resources)")
    parser.add_argument("--dir", type=Path, help="an existing NDJSON folder instead of a generated one")
    args = parser.parse_args()

    directory = args.dir or Path(tempfile.gettempdir()) / f"clinical-bench-n{args.patients}"
    if args.dir is None and not (directory / "Patient.000.ndjson").exists():
        print(f"generating {args.patients} patients into {directory} …", flush=True)
        write_bulk_export(directory, CohortSpec(n_patients=args.patients, seed=2024))
    files = [p for _, p in resource_files(directory)[0]]
    size_mb = sum(p.stat().st_size for p in files) / 2**20
    baseline_rss = peak_rss_mb()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        results, seed_timings = {}, {}
        for name, run in [("landing (c)", lambda: our_landing(directory, workdir)),
                          ("duckdb_scan (a)", lambda: duckdb_scan(files, workdir)),
                          ("seed_loop (b)", lambda: seed_loop(files, workdir, seed_timings))]:
            start = time.perf_counter()
            count = run()
            seconds = time.perf_counter() - start
            results[name] = (count, seconds)
            if name == "landing (c)":
                landing_rss = peak_rss_mb()
            print(f"{name:<16} {count:>10,} resources {seconds:7.2f} s {count / seconds:>12,.0f} resources/s", flush=True)

    parse_rate = results["seed_loop (b)"][0] / seed_timings["parse_and_walk_s"]
    print(f"  (b) of which json.loads and dict walks alone: {seed_timings['parse_and_walk_s']:.2f} s, "
          f"{parse_rate:,.0f} resources/s (landing (c) is {results['landing (c)'][0] / results['landing (c)'][1] / parse_rate:.2f}x that)")
    resources_ = results["landing (c)"][0]
    rate = {k: v[0] / v[1] for k, v in results.items()}
    print(f"data {size_mb:,.0f} MB in {len(files)} files; landing peak RSS {landing_rss:,.0f} MB "
          f"(interpreter and imports before it: {baseline_rss:,.0f} MB)")
    print(f"ratio_vs_duckdb_scan={rate['landing (c)'] / rate['duckdb_scan (a)']:.2f} "
          f"ratio_vs_seed_loop={rate['landing (c)'] / rate['seed_loop (b)']:.2f} "
          f"peak_rss_mb={landing_rss:.0f} resources={resources_}")


if __name__ == "__main__":
    main()
