"""Verbs that read a run without changing it: top, show, diff, lineage, export, ls-runs, plot, report."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selfprog.errors import SelfprogError
from selfprog.states import ALL as STATES


def _open(run_dir: str) -> Any:
    from selfprog.rundir import open_run

    return open_run(Path(run_dir), readonly=True)


def _cell(value: Any, signed: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:+.4f}" if signed else f"{value:.5g}"
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Returns rows as plain aligned text, one line each (stable: no terminal width involved)."""
    cells = [[_cell(row.get(c), signed=c == "change") for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def emit(args: argparse.Namespace, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    """Prints a listing in the format the output options ask for."""
    if args.json:
        print(json.dumps(rows, indent=2))
    elif args.csv:
        out = io.StringIO()
        writer = csv.DictWriter(
            out, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(rows)
        print(out.getvalue(), end="")
    else:
        print(table(rows, columns))


def cmd_top(args: argparse.Namespace) -> int:
    from selfprog.queries import one_line, top

    run = _open(args.run_dir)
    rows = top(run, args.n, args.state or ["ok"])
    if not (args.json or args.csv):
        rows = [{**r, "rationale": one_line(r["rationale"])} for r in rows]
    emit(
        args,
        rows,
        [
            "id",
            "score",
            "spread",
            "evaluations",
            "generation",
            "parent",
            "state",
            "params",
            "rationale",
        ],
    )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from selfprog.curves import sketch
    from selfprog.queries import check_id, show

    detail = show(_open(args.run_dir), check_id(args.id))
    if args.json:
        print(json.dumps(detail, indent=2))
        return 0
    score = (
        f"{detail['metric']} {detail['score']:.4f}" if detail["score"] is not None else "no score"
    )
    lines = [
        f"candidate {detail['id']}  generation {detail['generation']}  parent {_cell(detail['parent'])}",
        f"state      {detail['state']}" + (f": {detail['reason']}" if detail["reason"] else ""),
        f"score      {score}",
        f"rationale  {detail['rationale'] or '-'}",
    ]
    if detail["metrics"]:
        lines.append(
            "metrics    " + ", ".join(f"{k}={_cell(v)}" for k, v in detail["metrics"].items())
        )
    for e in detail["evaluations"]:
        lines.append(f"evaluation seed {e['seed']}: {e['state']} {_cell(e['score'])}")
        if e["curve"]:
            lines.append(f"  training loss at {sketch(e['curve'])}")
    if detail["timings"]:
        lines.append(
            "timings    " + ", ".join(f"{k} {v:.1f}s" for k, v in detail["timings"].items())
        )
    if detail["proposer"]:
        p = detail["proposer"]
        lines.append(
            f"proposer   {p['proposer']}{'' if p['model'] in ('', p['proposer']) else ' ' + p['model']} (sample {p['slot'] + 1} of {p['k']}, "
            f"prompt {p['prompt_chars']} chars, {p['tokens_in']} tokens in, {p['tokens_out']} out)"
            + (" cut at the token limit" if p.get("finish") == "length" else "")
            + (f", the call's estimated cost {p['cost']:.4g}" if p.get("cost") else "")
        )
    if detail["steered"]:
        changed = ", ".join(f"{s['key']} {s['old']} -> {s['new']}" for s in detail["steered"])
        lines.append(f"steered    before it was bred: {changed}")
    if detail["diff"]:
        lines += ["", detail["diff"].rstrip()]
    if detail["state"] not in ("ok", "pending", "running") and detail["log_tail"]:
        lines += [
            "",
            "log tail:",
            *("  " + s for s in detail["log_tail"].rstrip().splitlines()[-30:]),
        ]
    print("\n".join(lines))
    return 0


def _print_diff(text: str) -> None:
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.syntax import Syntax

        Console().print(Syntax(text, "diff", theme="ansi_dark", background_color="default"))
    else:
        print(text, end="" if text.endswith("\n") else "\n")


def cmd_diff(args: argparse.Namespace) -> int:
    from selfprog.edits import unified_diff
    from selfprog.queries import check_id, source

    run = _open(args.run_dir)
    first = run.archive.candidate(check_id(args.id))
    if args.other is None:
        text = first.diff
        if first.parent_id is None:
            text = ""
    else:
        second = check_id(args.other)
        text = unified_diff(source(run, first.id), source(run, second))
    if args.json:
        print(
            json.dumps({"from": first.parent_id if args.other is None else first.id, "diff": text})
        )
    elif text:
        _print_diff(text)
    else:
        print("(no difference)")
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from selfprog.queries import check_id, lineage, one_line

    rows = lineage(_open(args.run_dir), check_id(args.id))
    if not (args.json or args.csv):
        rows = [{**r, "rationale": one_line(r["rationale"])} for r in rows]
    emit(args, rows, ["id", "generation", "state", "score", "change", "proposed_by", "rationale"])
    return 0


def _to_mlflow(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from selfprog.tracker import default_uri, export

    uri = args.mlflow or default_uri()
    run = _open(args.run_dir)
    # MLflow sets up its own logging when imported: only its warnings, unless asked for more
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    every = 100  # without a terminal: one line per this many candidates
    with Progress(
        *Progress.get_default_columns(),
        console=Console(stderr=True),
        disable=not sys.stderr.isatty(),
        transient=True,
    ) as bar:
        task = bar.add_task("exporting candidates", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)
            if not sys.stderr.isatty() and done % every == 0:
                print(f"exported {done} of {total} new candidates", file=sys.stderr, flush=True)

        result = export(run, uri, progress)
    if args.json:
        print(json.dumps({**dataclasses.asdict(result), "candidates": result.total}))
        return 0
    later = f"; {result.unfinished} still pending or running, left for the next export" * bool(
        result.unfinished
    )
    caught = f" ({result.caught_up} of them with new evaluations)" * bool(result.caught_up)
    failed = f"; {result.failed} refused by MLflow (see the log), tried again next time"
    print(
        f"exported {result.total} candidates of {args.run_dir} to {uri} "
        f"(experiment {result.experiment}): {result.new} new, {result.already} already there"
        f"{caught}{later}{failed * bool(result.failed)}"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from selfprog.queries import check_id, lineage, show, source
    from selfprog.target import TARGET_FILE

    if args.mlflow is not None:
        if args.id is not None:
            raise SelfprogError("export --mlflow takes the run folder alone, no ID or DEST")
        return _to_mlflow(args)
    if args.id is None or args.dest is None:
        raise SelfprogError("export needs a candidate ID and a DEST folder (or --mlflow [URI])")
    run = _open(args.run_dir)
    candidate_id = check_id(args.id)
    files = source(run, candidate_id)
    dest = Path(args.dest)
    if dest.exists() and any(dest.iterdir()):
        raise SelfprogError(f"{dest}: folder exists and is not empty")
    detail, chain = show(run, candidate_id), lineage(run, candidate_id)
    files[TARGET_FILE] = (run.target.root / TARGET_FILE).read_text()
    score = (
        f"{detail['metric']} {detail['score']:.4f}"
        if detail["score"] is not None
        else detail["state"]
    )
    steps = "\n".join(
        f"- candidate {r['id']} ({_cell(r['score'])}): {r['rationale']}" for r in chain
    )
    files["README.md"] = (
        f"# Candidate {candidate_id} of run {run.root.name}\n\n"
        f"Target {run.target.name}; {score}; generation {detail['generation']}.\n\n"
        f"Score it again: `selfprog eval {dest} --target {dest}`\n\n## Lineage, from the seed\n\n{steps}\n"
    )
    dest.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_text(text)
    if args.json:
        print(json.dumps({"candidate": candidate_id, "dest": str(dest), "files": sorted(files)}))
    else:
        print(f"wrote candidate {candidate_id} ({len(files)} files) to {dest}")
    return 0


def cmd_ls_runs(args: argparse.Namespace) -> int:
    from selfprog.queries import list_runs

    rows = list_runs(Path(args.folder))
    emit(args, rows, ["run", "state", "target", "candidates", "best", "size_mb", "last_activity"])
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from selfprog.report import progress_plot

    run = _open(args.run_dir)
    out = Path(args.output)
    out.write_bytes(progress_plot(run))
    print(json.dumps({"plot": str(out)}) if args.json else f"wrote {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from selfprog.report import report_html

    run = _open(args.run_dir)
    out = Path(args.output)
    out.write_text(report_html(run, best_n=args.n))
    print(json.dumps({"report": str(out)}) if args.json else f"wrote {out} (open it in a browser)")
    return 0


def _candidate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="the run folder")
    parser.add_argument("id", help="the candidate id")


def _listing(parser: argparse.ArgumentParser) -> None:
    formats = parser.add_mutually_exclusive_group()
    formats.add_argument("--json", action="store_true", help="print as JSON")
    formats.add_argument("--csv", action="store_true", help="print as CSV")


def add_verbs(verbs: Any) -> None:
    tp = verbs.add_parser(
        "top",
        help="the best candidates of a run",
        description="The best candidates of a run, with their score, spread over repeated evaluations, generation, parent, state, params and rationale.",
    )
    tp.add_argument("run_dir", help="the run folder")
    tp.add_argument("-n", type=int, default=10, help="how many (10)")
    tp.add_argument(
        "--state",
        action="append",
        choices=STATES,
        help="only these states (default ok; repeat for more)",
    )
    _listing(tp)
    tp.set_defaults(func=cmd_top)

    sh = verbs.add_parser(
        "show",
        help="everything about one candidate",
        description="Everything about one candidate: metrics, every evaluation and its training curve in short, timings, tokens, rationale, the diff against its parent, and, when it failed, the reason and the last 30 lines of its log.",
    )
    _candidate(sh)
    sh.add_argument("--json", action="store_true", help="print as JSON")
    sh.set_defaults(func=cmd_show)

    df = verbs.add_parser(
        "diff",
        help="a candidate's source diff",
        description="The source diff of a candidate against its parent, or between two candidates (coloured on a terminal).",
    )
    _candidate(df)
    df.add_argument("other", nargs="?", help="a second candidate: diff from ID to it")
    df.add_argument("--json", action="store_true", help="print as JSON")
    df.set_defaults(func=cmd_diff)

    ln = verbs.add_parser(
        "lineage",
        help="a candidate's ancestors back to the seed",
        description="The chain of ancestors from the seed to a candidate, with each step's score change.",
    )
    _candidate(ln)
    _listing(ln)
    ln.set_defaults(func=cmd_lineage)

    ex = verbs.add_parser(
        "export",
        help="write a candidate's whole program to a folder, or the run to MLflow",
        description="Write a candidate's full program (editable and fixed files, target.toml) to an empty folder, with a README of where it came from; `selfprog eval DIR --target DIR` scores it on its own. "
        "With --mlflow, write the whole run to an MLflow tracker instead: a parent run and one nested run per finished candidate (params, every evaluation's score, diff, source, log tail); exporting again adds only what is new.",
    )
    ex.add_argument("run_dir", help="the run folder")
    ex.add_argument("id", nargs="?", help="the candidate id")
    ex.add_argument("dest", nargs="?", help="the folder to write")
    ex.add_argument(
        "--mlflow",
        nargs="?",
        const="",
        metavar="URI",
        help="write the run to this MLflow tracking URI ($MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)",
    )
    ex.add_argument("--json", action="store_true", help="print as JSON")
    ex.set_defaults(func=cmd_export)

    ls = verbs.add_parser(
        "ls-runs",
        help="the runs under a folder",
        description="The runs under a folder, with their state, size, best score and last activity.",
    )
    ls.add_argument("folder", nargs="?", default="runs", help="where to look (runs/)")
    _listing(ls)
    ls.set_defaults(func=cmd_ls_runs)

    pl = verbs.add_parser(
        "plot",
        help="the progress plot of a run (PNG)",
        description="The score of every candidate in order (failed ones marked apart), the running best as a step line, improvements labelled with their rationale.",
    )
    pl.add_argument("run_dir", help="the run folder")
    pl.add_argument(
        "-o", "--output", default="progress.png", help="the PNG to write (progress.png)"
    )
    pl.add_argument("--json", action="store_true", help="print as JSON")
    pl.set_defaults(func=cmd_plot)

    rp = verbs.add_parser(
        "report",
        help="a self-contained HTML report of a run",
        description="One self-contained HTML file (opens from disk, no network): headline numbers, the progress plot, the lineage tree, the best candidates and their diffs, the config.",
    )
    rp.add_argument("run_dir", help="the run folder")
    rp.add_argument("-o", "--output", default="report.html", help="the HTML to write (report.html)")
    rp.add_argument("-n", type=int, default=10, help="best candidates to list (10)")
    rp.add_argument("--json", action="store_true", help="print as JSON")
    rp.set_defaults(func=cmd_report)
