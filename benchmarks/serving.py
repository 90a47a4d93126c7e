"""The inference service against `mlflow models serve`, on the same registered model, in one run.

    .venv/bin/python benchmarks/serving.py [--quick] [--requests 2000] [--duration 10] [--concurrency 8]

Starts, on loopback and on free ports, (1) our service (`python -m serving`, with a temporary
SERVING_HOME holding a token made by serving.auth.TokenStore; CLINICAL_DEMO_MODE=1 unless
DEID_SECRET_KEY is set) and (2) MLflow's own scoring server (`mlflow models serve -m
models:/<model>@champion --env-manager local`), both on the project's MLflow store, and waits
for both to be ready (our /health and /ready, MLflow's /ping). Payloads are real feature rows of
the demo's batch DuckDB file (`features.feature_matrix`, opened read-only), or, without one,
rows computed by the pipeline from synthetic patients. The same rows go to both servers:

  (a) latency: sequential requests on one keep-alive httpx client, after a warm-up; the two
      servers alternate in blocks of requests, so background load on the machine hits both alike;
  (b) throughput: a fixed number of client threads (one keep-alive connection each) for a fixed
      time per server (in two halves, in A-B-B-A order), successful responses per second; the
      same client against a no-op endpoint (/health, /ping) shows where the client itself tops out;
  (c) the FHIR-bundle path: POST /predict/fhir with one patient's raw resources from the same
      batch file (as of their last encounter; patients outside the intended population are skipped).

The client is one Python process and shares the machine's cores with the server under test;
it is the same for both servers. Every phase is bounded by a count and a time limit, and both
servers are stopped at the end (terminate, then kill), also on errors and Ctrl-C. The last line
is `p99_ms=... rps=... mlflow_p99_ms=... mlflow_rps=... ratio_vs_mlflow=... fhir_p99_ms=...`.
Nothing here asserts timings: the goals of issue 11 are printed as met or not.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import duckdb
import httpx
import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clinical_ml.features import MODEL_FEATURES  # noqa: E402
from resources.settings import data_home, default_mlflow_tracking_uri  # noqa: E402
from serving.auth import TokenStore  # noqa: E402

GOAL_P99_MS = 25.0
GOAL_RATIO = 3.0
RAW_TABLES = ("encounter", "condition", "observation", "medication_request", "document_reference")


# -- servers --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess in a session of its own: stopping it reaches its children too
    (`mlflow models serve` runs uvicorn as a child process)."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: Path):
        self.name, self.cmd, self.env, self.log_path = name, cmd, env, log_path
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> None:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=str(ROOT), stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, grace: float = 10.0) -> None:
        if self.proc is None:
            return
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (self.proc.poll() is None or self._group_alive()):
            time.sleep(0.1)
        if self.proc.poll() is None or self._group_alive():
            self._signal_group(signal.SIGKILL)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if self._log:
            self._log.close()

    def cpu_seconds(self) -> float:
        """user+system CPU of every live process in the server's session (the server and its
        workers), from /proc; 0 where /proc is not available."""
        if self.proc is None or not Path("/proc").is_dir():
            return 0.0
        total, tick = 0.0, os.sysconf("SC_CLK_TCK")
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == self.proc.pid:  # process group id (the session leader's pid)
                total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])


def wait_until(server: Server, url: str, deadline: float, headers: dict | None = None) -> float:
    started = time.monotonic()
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            if not server.alive():
                raise RuntimeError(f"{server.name} exited with code {server.proc.returncode} before it was ready:\n"
                                   f"{server.log_tail()}")
            try:
                if client.get(url, headers=headers).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
    raise TimeoutError(f"{server.name} was not ready at {url} in time:\n{server.log_tail()}")


# -- payloads -------------------------------------------------------------------------------

@dataclass
class Source:
    description: str
    rows: list[list[float | None]]  # feature rows in MODEL_FEATURES order
    bundles: list[tuple[str, date, dict]]  # (patient id, as-of date, Bundle) candidates for /predict/fhir


def _float_rows(records) -> list[list[float | None]]:
    return [[None if v is None or (isinstance(v, float) and np.isnan(v)) else float(v) for v in r] for r in records]


def batch_source(n_rows: int, n_bundles: int) -> Source | None:
    """Feature rows and patient bundles from the first usable batch file; the file is opened
    read-only and closed at once (the pipeline may want to write it)."""
    files = sorted((data_home() / "warehouse-batches").glob("*.duckdb"))
    for path in files:
        try:
            con = duckdb.connect(str(path), read_only=True)
        except duckdb.Error as error:
            print(f"  (skipping {path.name}: cannot open it read-only: {type(error).__name__})")
            continue
        columns = {r[0] for r in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = 'features' "
            "AND table_name = 'feature_matrix'").fetchall()}
        missing = [f for f in MODEL_FEATURES if f not in columns]
        if not columns or missing:
            print(f"  (skipping {path.name}: its feature matrix lacks {len(missing)} of the model features)")
            con.close()
            continue
        try:
            select = ", ".join(f'"{f}"' for f in MODEL_FEATURES)
            rows = con.execute(f"SELECT {select} FROM features.feature_matrix ORDER BY "
                               f"md5(patient_key || CAST(landmark_date AS VARCHAR)) LIMIT ?", [n_rows]).fetchall()
            bundles = patient_bundles(con, n_bundles)
        finally:
            con.close()
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        return Source(f"{len(rows)} rows of features.feature_matrix in {shown}", _float_rows(rows), bundles)
    return None


def synthetic_source(n_rows: int, n_patients: int, n_bundles: int) -> Source:
    """Synthetic patients, landed, de-identified and featurized by the pipeline's own code."""
    from clinical_ml.deid import deidentify
    from clinical_ml.features import FeatureSpec, build_feature_matrix
    from clinical_ml.ingest import land_ndjson
    from clinical_ml.synthetic import CohortSpec, write_bulk_export
    from resources.deid_key import DeidKey

    folder = Path(tempfile.mkdtemp(prefix="serving-bench-export-"))
    con = duckdb.connect(":memory:")
    try:
        write_bulk_export(folder, CohortSpec(n_patients=n_patients, seed=20240611))
        land_ndjson(con, folder)
        key = DeidKey()
        deidentify(con, key.key(), max_shift_days=key.date_shift_max_days, date_mode=key.date_mode,
                   reference_date=key.reference_date(), synthetic_only=key.is_demo_key())
        frame = build_feature_matrix(con, FeatureSpec()).sample(fraction=1.0, shuffle=True, seed=7).head(n_rows)
        rows = _float_rows(frame.select(MODEL_FEATURES).rows())
        bundles = patient_bundles(con, n_bundles)
    finally:
        con.close()
        shutil.rmtree(folder, ignore_errors=True)
    return Source(f"{len(rows)} feature rows computed by the pipeline from {n_patients} synthetic patients",
                  rows, bundles)


def patient_bundles(con: duckdb.DuckDBPyConnection, candidates: int) -> list[tuple[str, date, dict]]:
    """(patient id, as-of date = last encounter, Bundle) for up to ``candidates`` patients, from
    the raw resources (linked by their subject or patient reference)."""
    ids = [r[0] for r in con.execute("SELECT id FROM raw.patient ORDER BY md5(id) LIMIT ?", [candidates]).fetchall()]
    if not ids:
        return []
    con.execute("CREATE OR REPLACE TEMP TABLE bench_ids AS SELECT unnest(?::VARCHAR[]) AS id", [ids])
    patients = dict(con.execute("SELECT p.id, p.resource::VARCHAR FROM raw.patient p JOIN bench_ids USING (id)").fetchall())
    linked: dict[str, list[str]] = {i: [] for i in ids}
    for table in RAW_TABLES:
        exists = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'raw' "
                             "AND table_name = ?", [table]).fetchone()[0]
        if not exists:
            continue
        for pid, resource in con.execute(f"""
                SELECT b.id, t.resource FROM (
                    SELECT resource::VARCHAR AS resource,
                           regexp_replace(coalesce(resource->'subject'->>'reference', resource->'patient'->>'reference'),
                                          '^(Patient/|urn:uuid:)', '') AS pid
                    FROM raw.{table}) t JOIN bench_ids b ON t.pid = b.id""").fetchall():
            linked[pid].append(resource)
    out = []
    for pid in ids:
        resources = [orjson.loads(patients[pid])] + [orjson.loads(r) for r in linked[pid]]
        starts = [(r.get("period") or {}).get("start", "") for r in resources if r.get("resourceType") == "Encounter"]
        starts = [s[:10] for s in starts if len(s) >= 10]
        if not starts:
            continue
        as_of = date.fromisoformat(max(starts))
        out.append((pid, as_of, {"resourceType": "Bundle", "type": "collection",
                                 "entry": [{"resource": r} for r in resources]}))
    return out


# -- measurements ---------------------------------------------------------------------------

def percentile(values_ms: list[float], q: float) -> float:
    return float(np.percentile(values_ms, q)) if values_ms else float("nan")


@dataclass
class Target:
    name: str
    server: Server
    base_url: str
    path: str
    headers: dict
    bodies: list[bytes]
    noop_path: str


def sequential(target: Target, client: httpx.Client, count: int, offset: int, deadline: float,
               latencies: list[float]) -> tuple[int, int]:
    """``count`` requests one after another (or until ``deadline``); appends latencies in ms.
    Returns (sent, errors)."""
    url, headers, bodies, n = target.base_url + target.path, target.headers, target.bodies, len(target.bodies)
    errors = sent = 0
    for i in range(count):
        if time.monotonic() > deadline:
            break
        body = bodies[(offset + i) % n]
        t0 = time.perf_counter()
        try:
            ok = client.post(url, content=body, headers=headers).status_code == 200
        except httpx.HTTPError:
            ok = False
        elapsed = (time.perf_counter() - t0) * 1000
        sent += 1
        if ok:
            latencies.append(elapsed)
        else:
            errors += 1
    return sent, errors


@dataclass
class Load:
    ok: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    cpu: float = 0.0

    def add(self, other: "Load") -> None:
        self.ok += other.ok
        self.errors += other.errors
        self.seconds += other.seconds
        self.latencies += other.latencies
        self.cpu += other.cpu

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


def load(target: Target, concurrency: int, duration: float, noop: bool = False) -> Load:
    """``concurrency`` threads, each with its own keep-alive client, send requests back to back
    for ``duration`` seconds; only responses completed within the window count."""
    url = target.base_url + (target.noop_path if noop else target.path)
    bodies, n = target.bodies, len(target.bodies)
    results: list[Load] = []
    lock = threading.Lock()
    window: dict[str, float] = {}

    def open_window() -> None:  # run once, when every thread has its connection open
        window["cpu0"] = target.server.cpu_seconds()
        window["end"] = time.perf_counter() + duration

    ready = threading.Barrier(concurrency, action=open_window)

    def worker(index: int) -> None:
        mine = Load()
        with httpx.Client(timeout=30, headers=target.headers) as client:
            try:  # open the connection before the window starts
                client.get(target.base_url + target.noop_path) if noop else client.post(url, content=bodies[index % n])
            except httpx.HTTPError:
                pass
            ready.wait()
            end, i = window["end"], index
            while True:
                t0 = time.perf_counter()
                if t0 >= end:
                    break
                try:
                    response = client.get(url) if noop else client.post(url, content=bodies[i % n])
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                t1 = time.perf_counter()
                i += concurrency
                if t1 > end:
                    break
                if ok:
                    mine.ok += 1
                    mine.latencies.append((t1 - t0) * 1000)
                else:
                    mine.errors += 1
        with lock:
            results.append(mine)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 120)
    total = Load(seconds=duration, cpu=target.server.cpu_seconds() - window.get("cpu0", 0.0))
    for r in results:
        total.ok += r.ok
        total.errors += r.errors
        total.latencies += r.latencies
    return total


# -- the run --------------------------------------------------------------------------------

def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def fmt(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or x != x else f"{x:,.{digits}f}"


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, help="sequential requests per server for latency (default 2000)")
    parser.add_argument("--warmup", type=int, help="warm-up requests per server (default 200)")
    parser.add_argument("--duration", type=float, help="seconds of concurrent load per server (default 10)")
    parser.add_argument("--concurrency", type=int, help="concurrent client threads (default 8)")
    parser.add_argument("--fhir-requests", type=int, help="sequential /predict/fhir requests (default 200)")
    parser.add_argument("--fhir-patients", type=int, default=5, help="distinct eligible patients for the FHIR path")
    parser.add_argument("--rows", type=int, help="feature rows to use as payloads (default 1000)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers, for both servers (default 1)")
    parser.add_argument("--model-name", default=os.environ.get("SERVING_MODEL_NAME", "hypertension-risk"))
    parser.add_argument("--source", choices=("auto", "batch", "synthetic"), default="auto",
                        help="payloads from the demo's batch file (auto: if present) or synthetic patients")
    parser.add_argument("--start-timeout", type=float, default=240, help="seconds to wait for both servers")
    parser.add_argument("--phase-timeout", type=float, default=300, help="time limit of each sequential phase")
    parser.add_argument("--quick", action="store_true", help="small numbers, for a smoke run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary SERVING_HOME and server logs")
    args = parser.parse_args(argv)
    quick = dict(requests=200, warmup=20, duration=2.0, concurrency=4, fhir_requests=20, rows=200)
    full = dict(requests=2000, warmup=200, duration=10.0, concurrency=8, fhir_requests=200, rows=1000)
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if min(args.requests, args.concurrency, args.rows) < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("counts must be positive")

    signal.signal(signal.SIGTERM, _interrupted)  # e.g. a CI timeout: unwind, so the servers are stopped

    workdir = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    home = workdir / "serving-home"
    tracking_uri = default_mlflow_tracking_uri()
    token = TokenStore(home / "tokens.json").create("benchmark", ["predict", "read", "metrics"])
    bin_dir = str(Path(sys.executable).parent)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("SERVING_")}
    base_env.update(MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true",
                    PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
                    PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    ours_env = dict(base_env, SERVING_HOME=str(home), SERVING_MODEL_NAME=args.model_name)
    if not os.environ.get("DEID_SECRET_KEY"):
        ours_env["CLINICAL_DEMO_MODE"] = "1"
        os.environ.setdefault("CLINICAL_DEMO_MODE", "1")  # the synthetic fallback de-identifies in this process
    port, mlflow_port = free_port(), free_port()
    ours = Server("our service", [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--port", str(port),
                                  "--workers", str(args.workers)], ours_env, workdir / "serving.log")
    mlflow = Server("mlflow models serve", [sys.executable, "-m", "mlflow", "models", "serve", "-m",
                                            f"models:/{args.model_name}@champion", "--env-manager", "local",
                                            "-h", "127.0.0.1", "-p", str(mlflow_port), "-w", str(args.workers)],
                    base_env, workdir / "mlflow.log")
    source: Source | None = None
    load_start = load_average()
    print(f"serving benchmark ({'quick' if args.quick else 'full'}): model {args.model_name}@champion, "
          f"store {tracking_uri}")
    print(f"machine: {os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}, "
          f"load average (1/5/15 min) at start {load_start}")
    try:
        ours.start()
        mlflow.start()
        t0 = time.monotonic()
        print("starting both servers (in parallel) and reading payloads ...")
        n_bundles = max(40, args.fhir_patients * 10)
        if args.source in ("auto", "batch"):
            source = batch_source(args.rows, n_bundles)
            if source is None and args.source == "batch":
                raise SystemExit("no usable batch file under " + str(data_home() / "warehouse-batches"))
        if source is None:
            print("  no batch file with a feature matrix: generating synthetic patients")
            source = synthetic_source(args.rows, n_patients=max(60, min(args.rows, 400)), n_bundles=n_bundles)
        if not source.rows:
            raise SystemExit("no feature rows to send")
        print(f"  payloads: {source.description}; {len(MODEL_FEATURES)} features "
              f"({sum(v is None for r in source.rows for v in r)} nulls among them)")
        deadline = t0 + args.start_timeout
        auth = {"authorization": f"Bearer {token}"}
        ours_up = wait_until(ours, f"http://127.0.0.1:{port}/health", deadline)
        with httpx.Client(timeout=10) as client:
            ready = client.get(f"http://127.0.0.1:{port}/ready", headers=auth)
            if ready.status_code != 200:
                raise RuntimeError(f"our service is up but not ready ({ready.status_code}): {ready.text}")
            champion = ready.json().get("champion")
        mlflow_up = wait_until(mlflow, f"http://127.0.0.1:{mlflow_port}/ping", deadline)
        print(f"  ready: our service in {ours_up:.1f} s (champion v{champion}), mlflow models serve in "
              f"{max(mlflow_up, 0):.1f} s more (startups overlap)")

        json_headers = {"content-type": "application/json"}
        ours_bodies = [orjson.dumps({"features": dict(zip(MODEL_FEATURES, r))}) for r in source.rows]
        mlflow_bodies = [orjson.dumps({"dataframe_split": {"columns": list(MODEL_FEATURES), "data": [r]}})
                         for r in source.rows]
        targets = [Target("ours", ours, f"http://127.0.0.1:{port}", "/predict", {**json_headers, **auth},
                          ours_bodies, "/health"),
                   Target("mlflow", mlflow, f"http://127.0.0.1:{mlflow_port}", "/invocations", json_headers,
                          mlflow_bodies, "/ping")]

        # the same model behind both? (MLflow's pyfunc answers CatBoost's class label, at 0.5)
        agree = checked = 0
        with httpx.Client(timeout=30) as client:
            for i in range(min(50, len(source.rows))):
                a = client.post(targets[0].base_url + "/predict", content=ours_bodies[i], headers=targets[0].headers)
                b = client.post(targets[1].base_url + "/invocations", content=mlflow_bodies[i], headers=json_headers)
                if a.status_code != 200 or b.status_code != 200:
                    raise RuntimeError(f"a payload was refused: ours {a.status_code} {a.text[:300]}; "
                                       f"mlflow {b.status_code} {b.text[:300]}")
                checked += 1
                agree += int(a.json()["probability"] >= 0.5) == int(b.json()["predictions"][0])
        print(f"  same answers: {agree}/{checked} payloads get the same class from both servers")

        # (a) latency: sequential, alternating blocks
        print(f"(a) latency: {args.warmup} warm-up + {args.requests} sequential requests per server ...")
        lat = {t.name: [] for t in targets}
        errs = {t.name: 0 for t in targets}
        cpu = {t.name: 0.0 for t in targets}
        phase_deadline = time.monotonic() + args.phase_timeout
        with httpx.Client(timeout=30) as client:
            for t in targets:
                sequential(t, client, args.warmup, 0, phase_deadline, [])
            block = max(1, min(100, args.requests // 10))
            done = {t.name: 0 for t in targets}
            while any(done[t.name] < args.requests for t in targets) and time.monotonic() < phase_deadline:
                for t in targets:
                    count = min(block, args.requests - done[t.name])
                    if count <= 0:
                        continue
                    c0 = t.server.cpu_seconds()
                    sent, e = sequential(t, client, count, args.warmup + done[t.name], phase_deadline, lat[t.name])
                    cpu[t.name] += t.server.cpu_seconds() - c0
                    done[t.name] += sent
                    errs[t.name] += e
        if any(done[t.name] < args.requests for t in targets):
            print(f"  (time limit reached: {done})")

        # (b) throughput: A-B-B-A halves, then the no-op ceiling
        print(f"(b) throughput: {args.concurrency} client threads, {args.duration:g} s per server ...")
        tput = {t.name: Load() for t in targets}
        half = args.duration / 2
        for t in (targets[0], targets[1], targets[1], targets[0]):
            tput[t.name].add(load(t, args.concurrency, half))
        ceiling = {t.name: load(t, args.concurrency, min(3.0, args.duration / 2), noop=True) for t in targets}

        # (c) the FHIR-bundle path
        print(f"(c) FHIR bundles: finding {args.fhir_patients} eligible patients, then {args.fhir_requests} "
              f"sequential requests ...")
        fhir_lat: list[float] = []
        fhir_errors = 0
        eligible: list[tuple[bytes, int]] = []
        skipped: dict[int, int] = {}
        fhir_url = f"http://127.0.0.1:{port}/predict/fhir"
        fhir_deadline = time.monotonic() + args.phase_timeout
        with httpx.Client(timeout=60) as client:
            for pid, as_of, bundle in source.bundles:
                if len(eligible) >= args.fhir_patients or time.monotonic() > fhir_deadline:
                    break
                body = orjson.dumps({"as_of": as_of.isoformat(), "bundle": bundle})
                response = client.post(fhir_url, content=body, headers=targets[0].headers)
                if response.status_code == 200:
                    eligible.append((body, len(bundle["entry"])))
                else:
                    skipped[response.status_code] = skipped.get(response.status_code, 0) + 1
                    if response.status_code != 422 or "intended population" not in response.text:
                        print(f"  unexpected {response.status_code} for a bundle: {response.text[:300]}")
            if eligible:
                for i in range(min(10, args.fhir_requests)):  # warm-up
                    client.post(fhir_url, content=eligible[i % len(eligible)][0], headers=targets[0].headers)
                for i in range(args.fhir_requests):
                    if time.monotonic() > fhir_deadline:
                        print(f"  (time limit reached after {i} requests)")
                        break
                    t_0 = time.perf_counter()
                    code = client.post(fhir_url, content=eligible[i % len(eligible)][0],
                                       headers=targets[0].headers).status_code
                    if code == 200:
                        fhir_lat.append((time.perf_counter() - t_0) * 1000)
                    else:
                        fhir_errors += 1
    except KeyboardInterrupt:
        print("interrupted: stopping the servers", file=sys.stderr)
        return 130
    except BaseException:
        for server in (ours, mlflow):
            state = "running" if server.alive() else f"exited with {server.proc.returncode}" if server.proc else "not started"
            print(f"-- {server.name} ({state}), last lines of its log:\n{server.log_tail()}", file=sys.stderr)
        raise
    finally:
        for server in (ours, mlflow):
            server.stop()
        if args.keep:
            print(f"kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    # -- report -----------------------------------------------------------------------------
    p = {n: (percentile(v, 50), percentile(v, 90), percentile(v, 99), max(v) if v else float("nan"))
         for n, v in lat.items()}
    ratio = tput["ours"].rps / tput["mlflow"].rps if tput["mlflow"].rps else float("nan")
    fhir_p50, fhir_p99 = percentile(fhir_lat, 50), percentile(fhir_lat, 99)
    sizes = sorted(n for _, n in eligible)

    def row(label: str, a: str, b: str) -> None:
        print(f"  {label:<44} {a:>16} {b:>22}")

    print()
    print(f"servers: 1 process each unless --workers ({args.workers} uvicorn worker(s) each): ours = python -m serving "
          f"(uvicorn, default loop/http: uvloop/httptools if installed, no access log); mlflow = mlflow models serve "
          f"--env-manager local (its uvicorn defaults, access log on)")
    print(f"client: this one Python process, httpx {httpx.__version__}, keep-alive connections; the same client "
          f"code and settings for both servers; it shares the {os.cpu_count()} CPUs with the server under test "
          f"(so absolute figures include client overhead)")
    print(f"payloads: the same {len(source.rows)} feature rows to both (ours: {{\"features\": {{...}}}} with a bearer "
          f"token; mlflow: dataframe_split); model v{champion}")
    print()
    row("", "ours /predict", "mlflow /invocations")
    row("(a) sequential latency, requests ok", f"{len(lat['ours'])}", f"{len(lat['mlflow'])}")
    row("    errors", f"{errs['ours']}", f"{errs['mlflow']}")
    for i, q in enumerate(("p50", "p90", "p99", "max")):
        row(f"    {q} ms", fmt(p["ours"][i]), fmt(p["mlflow"][i]))
    row("    server CPU per request, ms", fmt(cpu["ours"] * 1000 / max(1, len(lat["ours"]) + errs["ours"])),
        fmt(cpu["mlflow"] * 1000 / max(1, len(lat["mlflow"]) + errs["mlflow"])))
    row(f"(b) throughput, {args.concurrency} threads x {args.duration:g} s: req/s",
        fmt(tput["ours"].rps, 1), fmt(tput["mlflow"].rps, 1))
    row("    ok / errors", f"{tput['ours'].ok} / {tput['ours'].errors}",
        f"{tput['mlflow'].ok} / {tput['mlflow'].errors}")
    row("    p50 / p99 ms under load", f"{fmt(percentile(tput['ours'].latencies, 50), 1)} / "
        f"{fmt(percentile(tput['ours'].latencies, 99), 1)}",
        f"{fmt(percentile(tput['mlflow'].latencies, 50), 1)} / {fmt(percentile(tput['mlflow'].latencies, 99), 1)}")
    row("    server CPU per request, ms", fmt(tput["ours"].cpu * 1000 / max(1, tput["ours"].ok)),
        fmt(tput["mlflow"].cpu * 1000 / max(1, tput["mlflow"].ok)))
    row("    server CPU busy (cores)", fmt(tput["ours"].cpu / tput["ours"].seconds),
        fmt(tput["mlflow"].cpu / tput["mlflow"].seconds))
    cap = {n: 1000 / (tput[n].cpu * 1000 / tput[n].ok) if tput[n].ok and tput[n].cpu else float("nan") for n in tput}
    row("    capacity per server core (1/CPU), req/s", fmt(cap["ours"], 0), fmt(cap["mlflow"], 0))
    row("    no-op ceiling of client+server, req/s", f"{fmt(ceiling['ours'].rps, 1)} (/health)",
        f"{fmt(ceiling['mlflow'].rps, 1)} (/ping)")
    print(f"  (c) FHIR bundle path /predict/fhir: {len(fhir_lat)} ok, {fhir_errors} errors, over {len(eligible)} "
          f"eligible patients ({sizes[0] if sizes else 0}-{sizes[-1] if sizes else 0} resources per bundle; "
          f"candidates skipped: {skipped or 'none'}): p50 {fmt(fhir_p50)} ms, p99 {fmt(fhir_p99)} ms")
    print(f"  load average at end {load_average()} (start {load_start}): other work on the machine shows in the "
          f"figures; the alternating order spreads it over both servers")
    print()
    p99_met = p["ours"][2] < GOAL_P99_MS
    ratio_met = ratio >= GOAL_RATIO
    print(f"goals (issue 11): p99 < {GOAL_P99_MS:g} ms for a feature payload: {'MET' if p99_met else 'NOT MET'} "
          f"({fmt(p['ours'][2])} ms); throughput >= {GOAL_RATIO:g}x mlflow models serve: "
          f"{'MET' if ratio_met else 'NOT MET'} ({fmt(ratio)}x)")
    print(f"p99_ms={p['ours'][2]:.2f} rps={tput['ours'].rps:.1f} mlflow_p99_ms={p['mlflow'][2]:.2f} "
          f"mlflow_rps={tput['mlflow'].rps:.1f} ratio_vs_mlflow={ratio:.2f} fhir_p99_ms={fhir_p99:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
