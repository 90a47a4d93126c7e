"""Scale: the whole asset graph on 1k, 10k and 100k generated patients, against a bare DuckDB scan.

    .venv/bin/python benchmarks/scale.py [--sizes 1000,10000,100000] [--skip-largest]
                                         [--workdir .data/bench-scale]

Per size, in this order and in the same run:
1. the synthetic Bulk export is generated (or reused from ``<workdir>/exports``; not timed);
2. the bare scan: a child process loads the same NDJSON files with DuckDB's
   ``read_ndjson_objects`` into a table of a DuckDB file, under the same DuckDB settings as the
   pipeline (threads, memory limit): the practical floor for reading the export;
3. the whole graph: a fresh project home (warehouse, batch files, Dagster storage, MLflow store),
   the export registered as a batch with ``python -m clinical_assets.batches add``, then
   ``dagster job execute -j clinical_pipeline`` on that partition, exactly as a user runs it.
   The peak RSS is the sum over the whole process tree (the CLI, its step processes, DuckDB),
   sampled every 0.2 s with psutil; wall time per step comes from the run's event log.

``ratio_vs_duckdb_scan`` is the scan's time divided by the time of NDJSON -> de-identified
tables (``raw_fhir`` + ``deidentified_fhir``): 1.0 would be as fast as the bare scan.
The last line is for the largest size run:
``patients=... peak_rss_mb=... wall_s=... ratio_vs_duckdb_scan=...``.
Figures go to standard output and to ``benchmarks/results/scale.txt`` (``--no-save`` to skip;
``--job clinical_pipeline_dask`` runs the graph on a local Dask cluster and saves ``scale-<job>.txt``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clinical_ml.synthetic import CohortSpec, write_bulk_export  # noqa: E402
from resources.settings import patient_buckets  # noqa: E402

PYTHON = sys.executable
BIN = Path(PYTHON).parent


class TreeRssSampler:
    """Peak of the summed RSS of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, interval_s: float = 0.2):
        self.root, self.interval_s, self.peak_bytes = psutil.Process(pid), interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for process in processes:
                try:
                    total += process.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop.wait(self.interval_s)


def run_measured(cmd: list[str], env: dict, log_path: Path) -> tuple[float, float, int]:
    """(wall seconds, peak tree RSS in MB, exit code) of ``cmd``; its output goes to ``log_path``."""
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        with TreeRssSampler(process.pid) as sampler:
            code = process.wait()
    return time.perf_counter() - start, sampler.peak_bytes / 2**20, code


SCAN_SCRIPT = """
import sys, time
from clinical_ml.db import DuckDBSettings, connect
from clinical_ml.ingest import resource_files
threads, memory_limit, spill, database, folder = sys.argv[1:6]
con = connect(database, DuckDBSettings(int(threads), memory_limit, spill))
files = [str(path) for _, path in resource_files(__import__("pathlib").Path(folder))[0]]
start = time.perf_counter()
con.execute("CREATE TABLE scanned AS SELECT * FROM read_ndjson_objects($files)", {"files": files})
rows = con.execute("SELECT count(*) FROM scanned").fetchone()[0]
print(rows, time.perf_counter() - start)
"""


def bare_scan(export: Path, work: Path, env: dict) -> tuple[int, float, float]:
    """(rows, seconds, peak RSS MB) of DuckDB reading the export into a table."""
    database = work / "scan.duckdb"
    database.unlink(missing_ok=True)
    log = work / "scan.log"
    _, peak_mb, code = run_measured(
        [PYTHON, "-c", SCAN_SCRIPT, env["CLINICAL_DUCKDB_THREADS"], env["CLINICAL_DUCKDB_MEMORY_LIMIT"],
         str(work / "spill"), str(database), str(export)], env, log)
    if code != 0:
        raise SystemExit(f"bare scan failed, see {log}")
    rows, seconds = log.read_text().split()[-2:]
    database.unlink(missing_ok=True)
    return int(rows), float(seconds), peak_mb


# Parts of an asset's time that it reports in its materialization metadata: (asset, metadata key, row label).
# deidentified_fhir's buckets may run at once: their parts are sums, the asset's own row is wall time.
STEP_PARTS = (("deidentified_fhir", "deidentification_seconds", "deidentified_fhir: de-identification (buckets' sum)"),
              ("deidentified_fhir", "leak_check_seconds", "deidentified_fhir: leak check (buckets' sum)"),
              ("deidentified_fhir", "combine_seconds", "deidentified_fhir: combine"))


def step_seconds(dagster_home: Path) -> tuple[dict[str, float], list[str]]:
    """Wall time of each asset's steps in the newest run, from its event log: a graph-backed
    asset's (``asset.op`` steps) from its first step's start to its last step's end. Also the
    STEP_PARTS the assets reported, and the failed steps."""
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    from dagster import DagsterEventType, DagsterInstance

    with DagsterInstance.get() as instance:
        run = instance.get_run_records(limit=1)[0].dagster_run
        spans, seconds, failed = {}, {}, []
        for entry in instance.all_logs(run.run_id):
            event = entry.dagster_event
            if event is None or not event.step_key:
                continue
            asset = event.step_key.split(".")[0]
            if event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
                materialization = event.event_specific_data.materialization
                for of, key, label in STEP_PARTS:
                    if materialization.asset_key.to_user_string() == of and key in materialization.metadata:
                        seconds[label] = float(materialization.metadata[key].value)
            elif event.event_type == DagsterEventType.STEP_START:
                start, end = spans.get(asset, (entry.timestamp, entry.timestamp))
                spans[asset] = (min(start, entry.timestamp), end)
            elif event.event_type in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
                start, end = spans.get(asset, (entry.timestamp, entry.timestamp))
                spans[asset] = (start, max(end, entry.timestamp))
                if event.event_type == DagsterEventType.STEP_FAILURE:
                    failed.append(event.step_key)
        seconds.update({asset: end - start for asset, (start, end) in spans.items()})
        return seconds, failed


def run_graph(export: Path, work: Path, env: dict, job: str = "clinical_pipeline") -> dict:
    home = work / "home"
    shutil.rmtree(home, ignore_errors=True)
    dagster_home = home / "dagster"
    dagster_home.mkdir(parents=True)
    shutil.copy(ROOT / "dagster.yaml", dagster_home / "dagster.yaml")
    env = {**env, "CLINICAL_HOME": str(home), "DAGSTER_HOME": str(dagster_home),
           "CLINICAL_DUCKDB_TEMP_DIR": str(work / "spill")}
    added = subprocess.run([PYTHON, "-m", "clinical_assets.batches", "add", "--label", "scale",
                            "--ndjson-dir", str(export)], env=env, cwd=ROOT, capture_output=True, text=True)
    if added.returncode != 0:
        raise SystemExit(f"registering the batch failed:\n{added.stderr[-2000:]}")
    batch = added.stdout.strip().splitlines()[-1]
    cmd = [str(BIN / "dagster"), "job", "execute", "-m", "clinical_assets.definitions", "-a", "defs",
           "-j", job, "--tags", json.dumps({"dagster/partition": batch})]
    log = work / "graph.log"
    wall, peak_mb, code = run_measured(cmd, env, log)
    steps, failed = step_seconds(dagster_home)
    # The promotion gates may refuse a model (a small cohort's subgroup AUROCs are noisy): the
    # graph still ran end to end. Any other failure leaves nothing worth timing.
    if code != 0 and (not failed or set(failed) - {"model_promotion"}):
        raise SystemExit(f"the graph run failed (exit {code}, failed steps {failed}), see {log}")
    outcome = "model promoted" if code == 0 else "model refused by the promotion gates"
    return {"wall_s": wall, "peak_rss_mb": peak_mb, "steps": steps, "batch": batch, "outcome": outcome}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="patients per run, comma-separated")
    parser.add_argument("--skip-largest", action="store_true", help="leave out the largest size (quick runs)")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".data" / "bench-scale")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--job", default="clinical_pipeline",
                        help="clinical_pipeline (one process) or clinical_pipeline_dask (DASK_LOCAL_WORKERS workers)")
    args = parser.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    if args.skip_largest and len(sizes) > 1:
        sizes = sizes[:-1]

    env = {**os.environ, "CLINICAL_DEMO_MODE": "1", "PYTHONUNBUFFERED": "1"}
    env.setdefault("CLINICAL_DUCKDB_THREADS", "2")
    env.setdefault("CLINICAL_DUCKDB_MEMORY_LIMIT", "2GB")
    lines = [f"# benchmarks/scale.py  job={args.job}  patient buckets={patient_buckets()}  "
             f"duckdb threads={env['CLINICAL_DUCKDB_THREADS']} "
             f"memory_limit={env['CLINICAL_DUCKDB_MEMORY_LIMIT']}  cpus={os.cpu_count()}  "
             f"ram_gb={psutil.virtual_memory().total / 2**30:.0f}"]
    print(lines[0], flush=True)
    results = {}
    for n in sizes:
        work = args.workdir / f"n{n}"
        work.mkdir(parents=True, exist_ok=True)
        export = args.workdir / "exports" / f"n{n}"
        if not (export / "Patient.000.ndjson").exists():
            start = time.perf_counter()
            summary = write_bulk_export(export, CohortSpec(n_patients=n, seed=42))
            print(f"[n={n}] generated {sum(summary.counts.values()):,} resources in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
        size_mb = sum(f.stat().st_size for f in export.glob("*.ndjson")) / 2**20
        rows, scan_s, scan_rss = bare_scan(export, work, env)
        print(f"[n={n}] bare DuckDB scan: {rows:,} resources, {size_mb:,.0f} MB NDJSON in {scan_s:.1f} s "
              f"(peak {scan_rss:,.0f} MB)", flush=True)
        graph = run_graph(export, work, env, args.job)
        steps = graph["steps"]
        ingest_s = steps.get("raw_fhir", 0) + steps.get("deidentified_fhir", 0)
        results[n] = {"resources": rows, "ndjson_mb": size_mb, "scan_s": scan_s, **graph,
                      "ratio": scan_s / ingest_s if ingest_s else float("nan")}
        print(f"[n={n}] whole graph ({graph['outcome']}): {graph['wall_s']:.0f} s, peak RSS {graph['peak_rss_mb']:,.0f} MB; "
              f"NDJSON -> de-identified {ingest_s:.1f} s = {results[n]['ratio']:.2f}x the bare scan", flush=True)

    # slowest step first, each step's reported parts right under it
    parts = {label: step for step, _, label in STEP_PARTS}
    slowest = sorted({s for r in results.values() for s in r["steps"] if s not in parts},
                     key=lambda s: -max(r["steps"].get(s, 0) for r in results.values()))
    step_names = [row for step in slowest
                  for row in [step] + [label for label, of in parts.items()
                                       if of == step and any(label in r["steps"] for r in results.values())]]
    table = ["", "| step (s) | " + " | ".join(f"{n:,}" for n in results) + " |",
             "|---|" + "---:|" * len(results)]
    for name in step_names:
        table.append(f"| {name} | " + " | ".join(f"{r['steps'].get(name, 0):.1f}" for r in results.values()) + " |")
    for label, key, fmt in (("whole graph wall (s)", "wall_s", "{:.0f}"), ("peak RSS, process tree (MB)", "peak_rss_mb", "{:,.0f}"),
                            ("resources", "resources", "{:,}"), ("NDJSON (MB)", "ndjson_mb", "{:,.0f}"),
                            ("bare DuckDB scan (s)", "scan_s", "{:.1f}"), ("scan / (raw + deid)", "ratio", "{:.2f}")):
        table.append(f"| **{label}** | " + " | ".join(fmt.format(r[key]) for r in results.values()) + " |")
    sizes_run = list(results)
    if len(sizes_run) > 1:
        a, b = sizes_run[-2], sizes_run[-1]
        growth = (results[b]["wall_s"] / results[a]["wall_s"]) / (b / a)
        table.append(f"\nwall-time growth {a:,} -> {b:,} relative to linear: {growth:.2f} (<= 1.0 is linear or better)")
    largest = results[sizes_run[-1]]
    final = (f"patients={sizes_run[-1]} peak_rss_mb={largest['peak_rss_mb']:.0f} wall_s={largest['wall_s']:.0f} "
             f"ratio_vs_duckdb_scan={largest['ratio']:.2f}")
    lines += table + [final]
    print("\n".join(table + [final]), flush=True)
    if not args.no_save:
        (ROOT / "benchmarks" / "results").mkdir(exist_ok=True)
        name = "scale.txt" if args.job == "clinical_pipeline" else f"scale-{args.job}.txt"
        (ROOT / "benchmarks" / "results" / name).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
