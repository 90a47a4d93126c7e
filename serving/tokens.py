"""Manage the service's bearer tokens (stored hashed; a new token is printed once)."""

from __future__ import annotations

import argparse
import sys

from serving.auth import SCOPES, TokenStore
from serving.settings import ServingSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.tokens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create (or replace) a named token and print it once")
    create.add_argument("--name", required=True)
    create.add_argument("--scopes", required=True, help=f"comma-separated, among: {', '.join(SCOPES)}")
    revoke = sub.add_parser("revoke", help="revoke a named token")
    revoke.add_argument("--name", required=True)
    sub.add_parser("list", help="names and scopes (never the tokens)")
    args = parser.parse_args(argv)
    store = TokenStore(ServingSettings().token_path)
    if args.command == "create":
        try:
            print(store.create(args.name, [s.strip() for s in args.scopes.split(",") if s.strip()]))
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(f"token '{args.name}' stored (hashed) in {store.path}; it is not shown again", file=sys.stderr)
    elif args.command == "revoke":
        if not store.revoke(args.name):
            print(f"no token named {args.name!r}", file=sys.stderr)
            return 1
    else:
        for entry in store.list():
            print(f"{entry['name']}\t{','.join(entry['scopes'])}\t{entry.get('created_at', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
