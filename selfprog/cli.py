"""The selfprog command and its verbs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from selfprog import __version__, config
from selfprog.errors import ConfigError, SelfprogError

log = logging.getLogger("selfprog")

EXIT_ERROR = 2  # bad input or an unusable environment
EXIT_NOT_OK = 3  # the candidate was scored but did not end `ok`


def parse_size(text: str) -> int:
    """Returns bytes for a size given on the command line."""
    try:
        return config.parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {kind.__name__}: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0: {text!r}")
        return value

    return convert


def setup_logging(verbose: bool) -> None:
    """Live, coloured output on a terminal; one plain line per event otherwise."""
    level = logging.DEBUG if verbose else logging.INFO
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in ("urllib3", "docker"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ---------------------------------------------------------------------------
# verbs


def cmd_eval(args: argparse.Namespace) -> int:
    from selfprog.data import prepare_data
    from selfprog.runners import Limits, make_runner
    from selfprog.scoring import State, score_program
    from selfprog.target import load_target

    target = load_target(args.target)
    if args.timeout is not None:
        target = dataclasses.replace(
            target, budget=dataclasses.replace(target.budget, timeout=args.timeout)
        )
    program = Path(args.program) if args.program else target.root
    seconds, steps = None, None
    if args.budget_seconds is not None:
        seconds, steps = args.budget_seconds, 0
    if args.budget_steps is not None:
        seconds, steps = 0, args.budget_steps
    limits = Limits(memory_bytes=args.memory, cpus=args.cpus, gpus=args.gpus)
    data = prepare_data(target, args.data_cache, args.corpus)
    runner = make_runner(args.runner, args.image)
    with tempfile.TemporaryDirectory(prefix="selfprog-eval-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        result = score_program(
            target,
            program,
            runner,
            data,
            work,
            limits=limits,
            seed=args.seed,
            budget_seconds=seconds,
            budget_steps=steps,
            labels={"selfprog.run": "eval", "selfprog.candidate": program.name or "program"},
        )
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(format_result(result, target.metric, target.direction))
    return 0 if result.state is State.OK else EXIT_NOT_OK


def format_result(result: object, metric: str, direction: str) -> str:
    """Returns the readable summary of a scoring result."""
    from selfprog.scoring import Result, State

    assert isinstance(result, Result)
    lines = [f"state    {result.state.value}"]
    if result.state is State.OK and result.score is not None:
        lines.append(f"score    {metric} = {result.score:.4f} ({direction})")
        others = {k: v for k, v in result.metrics.items() if k != metric}
        lines.append("metrics  " + ", ".join(f"{k}={_short(v)}" for k, v in others.items()))
    else:
        lines.append(f"reason   {result.reason}")
    lines.append("timings  " + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()))
    lines.append(f"data     {result.data_hash[:16]}")
    if result.state is not State.OK and result.log_tail:
        tail = result.log_tail.rstrip().splitlines()[-15:]
        lines += ["log tail:", *("  " + line for line in tail)]
    return "\n".join(lines)


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _run_overrides(args: argparse.Namespace) -> list[str]:
    """Returns --set style overrides for the run flags given (flags beat the file, --set beats both)."""
    flags = {
        "run.target": args.target,
        "run.generations": args.generations,
        "run.population": args.population,
        "run.workers": args.workers,
        "run.seed": args.seed,
        "run.max_candidates": args.max_candidates,
        "run.max_hours": args.max_hours,
        "run.max_tokens": args.max_tokens,
        "proposer.kind": args.proposer,
        "runner.kind": args.runner,
        "budget.seconds": args.budget_seconds,
        "budget.steps": args.budget_steps,
    }
    out = [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    if args.budget_seconds is not None:
        out.append("budget.steps=0")
    if args.budget_steps is not None:
        out.append("budget.seconds=0.0")
    return out + list(args.set or [])


def cmd_run(args: argparse.Namespace) -> int:
    from selfprog.rundir import create_run, default_run_dir

    settings = config.load_config(args.config, _run_overrides(args))
    if args.target is not None and Path(args.target).is_dir():
        settings = dataclasses.replace(
            settings, run=dataclasses.replace(settings.run, target=str(Path(args.target).resolve()))
        )
    run_dir = (
        Path(args.run_dir) if args.run_dir else default_run_dir(Path("runs"), settings.run.target)
    )
    log.info("new run in %s", run_dir)
    return _drive(create_run(run_dir, settings))


def cmd_resume(args: argparse.Namespace) -> int:
    from selfprog.rundir import open_run

    run = open_run(Path(args.run_dir))
    log.info("resuming %s", run.root)
    return _drive(run)


def _drive(run: Any) -> int:
    import signal

    from selfprog.loop import Driver, StopRequest
    from selfprog.progress import Reporter
    from selfprog.proposers import make_proposer
    from selfprog.rundir import driver_lock
    from selfprog.runners import make_runner

    settings = run.config
    stop = StopRequest()

    def on_signal(signum: int, frame: object) -> None:
        stop.request("interrupted" if signum == signal.SIGINT else "terminated")
        if stop.count == 1:
            how = "killing" if settings.run.on_interrupt == "kill" else "finishing"
            print(
                f"\nselfprog: stopping: {how} the running candidates (again to stop at once)",
                file=sys.stderr,
            )
        else:
            raise KeyboardInterrupt

    minimize = run.target.direction == "minimize"
    with driver_lock(run.root):
        proposer = make_proposer(settings.proposer)
        runner = make_runner(
            settings.runner.kind, settings.runner.image or None, run.root / "local"
        )
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            with Reporter(run.archive, run.target.metric, minimize) as reporter:
                driver = Driver(run, proposer, runner, stop, reporter)
                try:
                    ended = driver.drive()
                except KeyboardInterrupt:
                    ended = "stopped at once"
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    print(summary(run.archive, run.target.metric, minimize, run.root, ended))
    return 0 if ended == "finished" or ended.startswith("reached") else 130


def summary(archive: Any, metric: str, minimize: bool, root: Path, ended: str) -> str:
    """Returns the lines printed when a run stops: why, the best candidate, what next."""
    counts = archive.counts()
    best = archive.best(minimize, 1)
    seed = archive.candidates("generation = 0")
    lines = [f"run {ended}: {sum(counts.values())} candidates ({_counts_text(counts)})"]
    if best:
        start = seed[0].score if seed and seed[0].score is not None else float("nan")
        lines.append(
            f"best: candidate {best[0].id}, {metric} {best[0].score:.4f} (seed {start:.4f}): {best[0].rationale}"
        )
    if archive.unfinished() or not (ended == "finished" or ended.startswith("reached")):
        lines.append(f"resume with: selfprog resume {root}")
    lines.append(f"inspect with: selfprog status {root}")
    return "\n".join(lines)


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def cmd_status(args: argparse.Namespace) -> int:
    from selfprog.rundir import lock_holder, open_run

    run = open_run(Path(args.run_dir), readonly=True)
    archive = run.archive
    minimize = run.target.direction == "minimize"
    best = archive.best(minimize, 1)
    seed = archive.candidates("generation = 0")
    holder = lock_holder(run.root)
    report: dict[str, Any] = {
        "run": str(run.root),
        "target": run.target.name,
        "driver": holder,
        "counts": archive.counts(),
        "generation": max((c.generation for c in archive.candidates()), default=0),
        "generations": run.config.run.generations,
        "seed_score": seed[0].score if seed else None,
        "best": {"candidate": best[0].id, "score": best[0].score, "rationale": best[0].rationale}
        if best
        else None,
        "running": [c.id for c in archive.candidates("state = 'running'")],
        "tokens": archive.tokens_used(),
        "active_seconds": float(archive.meta("active_seconds") or 0),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    driven = f"driven by pid {holder.get('pid')}" if holder is not None else "no driver"
    lines = [
        f"run         {run.root} ({run.target.name}, {driven})",
        f"generation  {report['generation']} of {report['generations']}",
        f"candidates  {sum(report['counts'].values())} ({_counts_text(report['counts'])})",
    ]
    if best:
        lines.append(
            f"best        {run.target.metric} {best[0].score:.4f}, candidate {best[0].id}: {best[0].rationale}"
        )
    if seed and seed[0].score is not None:
        lines.append(f"seed        {run.target.metric} {seed[0].score:.4f}")
    lines.append(f"running     {', '.join(map(str, report['running'])) or '-'}")
    lines.append(f"tokens      {report['tokens']}")
    lines.append(f"active      {report['active_seconds'] / 60:.1f} min")
    print("\n".join(lines))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(config.default_text(), end="")
    return 0


def cmd_target_export(args: argparse.Namespace) -> int:
    from selfprog.target import export_target

    written = export_target(args.target, Path(args.dest))
    print(f"wrote {len(written)} files to {args.dest}")
    return 0


def cmd_image_build(args: argparse.Namespace) -> int:
    from selfprog.runners.docker import connect
    from selfprog.runners.image import (
        DOCKERFILE_IMAGE,
        OFFLINE_IMAGE,
        build_from_dockerfile,
        build_offline,
    )

    client = connect()
    if args.offline:
        image = build_offline(client, args.tag or OFFLINE_IMAGE)
    else:
        context = (
            Path(args.context) if args.context else Path(__file__).resolve().parents[1] / "sandbox"
        )
        image = build_from_dockerfile(client, context, args.tag or DOCKERFILE_IMAGE)
    print(f"built {image.tag} (python {image.python})")
    return 0


# ---------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfprog",
        description="A self-programming agent loop: an LM rewrites the program that builds "
        "and trains a model, and a sandbox scores every rewrite.",
    )
    parser.add_argument("--version", action="version", version=f"selfprog {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    ev = verbs.add_parser(
        "eval",
        help="train and score one program folder in the sandbox",
        description="Train a program folder with its own code (training split only), then score "
        "it with the target's fixed evaluator (held-out split). Exit code 0 when the "
        f"candidate ends `ok`, {EXIT_NOT_OK} when it ends in another state, "
        f"{EXIT_ERROR} on an error.",
    )
    ev.add_argument("program", nargs="?", help="the program folder (default: the target's seed)")
    ev.add_argument("--target", default="tinylm", help="a bundled target name or a target folder")
    ev.add_argument("--runner", default="docker", choices=("docker", "local"), help="the sandbox")
    budget = ev.add_mutually_exclusive_group()
    budget.add_argument(
        "--budget-seconds", type=_positive(float), help="training wall-clock budget"
    )
    budget.add_argument("--budget-steps", type=_positive(int), help="training step budget")
    ev.add_argument("--timeout", type=_positive(float), help="hard limit on training, seconds")
    ev.add_argument("--memory", type=parse_size, default=parse_size("4g"), help="memory limit (4g)")
    ev.add_argument("--cpus", type=_positive(float), default=2.0, help="CPU limit (2)")
    ev.add_argument("--gpus", help="pass GPUs through: 'all' or a count (default: none)")
    ev.add_argument("--seed", type=int, default=0, help="the training and evaluation seed (0)")
    ev.add_argument(
        "--image", help="the sandbox image (default: the offline image, built if missing)"
    )
    ev.add_argument(
        "--data-cache", type=Path, help="where prepared data is kept (~/.cache/selfprog)"
    )
    ev.add_argument(
        "--corpus", type=Path, help="a folder of code to train on instead of the stdlib"
    )
    ev.add_argument("--keep", help="keep the work folder (staged program, weights) here")
    ev.add_argument("--json", action="store_true", help="print the result as JSON")
    ev.set_defaults(func=cmd_eval)

    rn = verbs.add_parser(
        "run",
        help="start a new run: generations of proposals, scored in the sandbox",
        description="Start a new run in a new folder (default runs/<time>-<target>). The config "
        "(`selfprog config` prints the defaults) is frozen into the run; flags beat the file and "
        "--set beats both. Ctrl-C once stops gracefully, twice at once; `selfprog resume` continues.",
    )
    rn.add_argument("--config", type=Path, help="a TOML config file")
    rn.add_argument("--run-dir", help="the run folder to create")
    rn.add_argument("--target", help="a bundled target name or a target folder")
    rn.add_argument("--proposer", choices=("mutate", "openai", "transformers"), help="the proposer")
    rn.add_argument("--runner", choices=("docker", "local"), help="the sandbox")
    rn.add_argument("--generations", type=int, help="generations after the seed")
    rn.add_argument("--population", type=int, help="children per generation")
    rn.add_argument("--workers", type=int, help="candidates scored at once")
    run_budget = rn.add_mutually_exclusive_group()
    run_budget.add_argument("--budget-seconds", type=float, help="training seconds per candidate")
    run_budget.add_argument("--budget-steps", type=int, help="training steps per candidate")
    rn.add_argument("--seed", type=int, help="the run's seed")
    rn.add_argument("--max-candidates", type=int, help="stop after this many candidates")
    rn.add_argument("--max-hours", type=float, help="stop after this much driving time")
    rn.add_argument("--max-tokens", type=int, help="stop once the proposer used this many tokens")
    rn.add_argument(
        "--set", action="append", metavar="TABLE.KEY=VALUE", help="override a config value"
    )
    rn.set_defaults(func=cmd_run)

    rs = verbs.add_parser(
        "resume",
        help="continue a stopped or crashed run",
        description="Continue a run after Ctrl-C, SIGTERM, kill -9 or a reboot: finished candidates "
        "are kept, recorded proposals are not asked again, work in flight runs again.",
    )
    rs.add_argument("run_dir", help="the run folder")
    rs.set_defaults(func=cmd_resume)

    st = verbs.add_parser(
        "status",
        help="where a run stands (safe while it runs)",
        description="Counts by state, generation, best score, running work and tokens; reads the "
        "archive without writing, so it is safe while the run is being driven.",
    )
    st.add_argument("run_dir", help="the run folder")
    st.add_argument("--json", action="store_true", help="print as JSON")
    st.set_defaults(func=cmd_status)

    cf = verbs.add_parser(
        "config", help="print the default config", description="Print the commented default config."
    )
    cf.set_defaults(func=cmd_config)

    tg = verbs.add_parser(
        "target", help="work with target programs", description="Work with target programs."
    )
    tg_verbs = tg.add_subparsers(dest="target_verb", metavar="VERB", required=True)
    te = tg_verbs.add_parser(
        "export",
        help="write a target's files into a folder",
        description="Write a target's program files and target.toml into an empty folder.",
    )
    te.add_argument("target", help="a bundled target name (tinylm) or a target folder")
    te.add_argument("dest", help="the folder to write")
    te.set_defaults(func=cmd_target_export)

    im = verbs.add_parser(
        "image", help="build the sandbox image", description="Build the sandbox image."
    )
    im_verbs = im.add_subparsers(dest="image_verb", metavar="VERB", required=True)
    ib = im_verbs.add_parser(
        "build",
        help="build the sandbox image",
        description="Build the sandbox image from sandbox/Dockerfile (needs a registry), or with "
        "--offline from this host's Python environment (needs none).",
    )
    ib.add_argument("--offline", action="store_true", help="build without a registry")
    ib.add_argument("--tag", help="the image tag")
    ib.add_argument("--context", help="the folder holding the Dockerfile (default: sandbox/)")
    ib.set_defaults(func=cmd_image_build)
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
    except KeyboardInterrupt:
        print("selfprog: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
