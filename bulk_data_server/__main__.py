"""Run the Bulk Data server until Ctrl-C: ``python -m bulk_data_server --patients 500``."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

from bulk_data_server.server import BulkDataServer


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
    parser.add_argument("--public-key", type=Path, help="PEM public key of --client-id")
    args = parser.parse_args(argv)
    if (args.client_id is None) != (args.public_key is None):
        parser.error("--client-id and --public-key go together")

    options = {"host": args.host, "port": args.port, "require_auth": args.require_auth}
    if args.ndjson_dir is not None:
        server = BulkDataServer.from_directory(args.ndjson_dir, **options)
    else:
        server = BulkDataServer.from_synthetic(n_patients=args.patients, seed=args.seed, **options)
    if args.client_id is not None:
        server.register_client(args.client_id, args.public_key.read_bytes())

    with server:
        # The base URL alone on the first line, so scripts can read it (e.g. with --port 0).
        print(server.base_url, flush=True)
        if args.require_auth:
            print(f"token endpoint: {server.token_url}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
