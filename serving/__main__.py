"""Start the service: ``python -m serving [--host H] [--port P] [--workers N]`` (uvicorn)."""

from __future__ import annotations

import argparse
import logging
import os

import uvicorn


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m serving")
    parser.add_argument("--host", default=os.environ.get("SERVING_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("SERVING_PORT", "8000")))
    parser.add_argument("--workers", type=int, default=int(os.environ.get("SERVING_WORKERS", "1")))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # no access log: request lines are counted in /metrics; paths carry no PHI, but a proxy's may
    uvicorn.run("serving.app:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                access_log=os.environ.get("SERVING_ACCESS_LOG") == "1", log_level="info")


if __name__ == "__main__":
    main()
