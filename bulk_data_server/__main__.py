"""Run the Bulk Data server until Ctrl-C: ``python -m bulk_data_server --patients 500``."""

from __future__ import annotations

import argparse
import json
import signal
import threading
from pathlib import Path

from bulk_data_server.server import BulkDataServer, RateLimit


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bulk_data_server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--patients", type=int, default=500, help="synthetic cohort size (default 500)")
    source.add_argument("--ndjson-dir", type=Path, help="serve <ResourceType>.*.ndjson files from this directory")
    parser.add_argument("--seed", type=int, default=42, help="synthetic cohort seed (default 42)")
    parser.add_argument("--require-auth", action="store_true", help="require SMART Backend Services tokens")
    parser.add_argument("--client-id", help="client allowed to request tokens")
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument("--jwks", type=Path, help="JWKS file of --client-id (as `python -m clinical_ml.bulk_client "
                      "jwks` prints it); assertions must name one of its kids")
    keys.add_argument("--public-key", type=Path, help="PEM public key of --client-id (kid: its RFC 7638 thumbprint)")
    parser.add_argument("--rate-limit", type=int, metavar="N",
                        help="at most N kick-off/status requests a minute per client, then 429 for five minutes "
                        "(as the reference server)")
    parser.add_argument("--failing-types", default="", help="comma-separated types to report as export errors")
    args = parser.parse_args(argv)
    if (args.client_id is None) != (args.public_key is None and args.jwks is None):
        parser.error("--client-id goes with --jwks or --public-key")

    options = {"host": args.host, "port": args.port, "require_auth": args.require_auth,
               "failing_types": {t.strip() for t in args.failing_types.split(",") if t.strip()},
               "rate_limit": RateLimit(requests=args.rate_limit) if args.rate_limit else None}
    if args.ndjson_dir is not None:
        server = BulkDataServer.from_directory(args.ndjson_dir, **options)
    else:
        server = BulkDataServer.from_synthetic(n_patients=args.patients, seed=args.seed, **options)
    if args.client_id is not None:
        if args.jwks is not None:
            server.register_client(args.client_id, jwks=json.loads(args.jwks.read_text()))
        else:
            server.register_client(args.client_id, args.public_key.read_bytes())

    with server:
        # The base URL alone on the first line, so scripts can read it (e.g. with --port 0).
        print(server.base_url, flush=True)
        if args.require_auth:
            print(f"token endpoint: {server.token_url}", flush=True)
        # Ctrl-C and `kill` (SIGTERM, as container runtimes send) both stop it cleanly. The wait is
        # timed so a signal is acted on within half a second whatever the wait primitive does
        # with EINTR (an untimed wait once kept CI's server alive past its 10 s).
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(0.5):
            pass


if __name__ == "__main__":
    main()
