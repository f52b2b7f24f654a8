"""The selfprog command: the parser and main; each verb lives in a module of this package."""

from __future__ import annotations

import argparse
import sqlite3
import sys
from collections.abc import Sequence

from selfprog import __version__
from selfprog.cli import inspect, model, run, score, serve
from selfprog.cli.common import EXIT_ERROR, parse_size, setup_logging
from selfprog.errors import SelfprogError

__all__ = ["build_parser", "main", "parse_size"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfprog",
        description="A self-programming agent loop: an LM rewrites the program that builds "
        "and trains a model, and a sandbox scores every rewrite.",
    )
    parser.add_argument("--version", action="version", version=f"selfprog {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    score.add_verbs(verbs)
    run.add_verbs(verbs)
    inspect.add_verbs(verbs)
    model.add_verbs(verbs)
    serve.add_verbs(verbs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args))
    except SelfprogError as exc:
        print(f"selfprog: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except sqlite3.Error as exc:  # a run's archive locked by another program, or damaged
        print(f"selfprog: error: the run's archive cannot be read: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("selfprog: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
