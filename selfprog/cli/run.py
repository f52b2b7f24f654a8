"""Verbs that drive and watch a run: run, resume, status, config."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from selfprog import config
from selfprog.errors import SelfprogError

log = logging.getLogger("selfprog")


# the flags `run` and `resume` share, and the config keys they set
STEER_FLAGS = {
    "generations": "run.generations",
    "population": "run.population",
    "workers": "run.workers",
    "max_candidates": "run.max_candidates",
    "max_hours": "run.max_hours",
    "max_sandbox_hours": "run.max_sandbox_hours",
    "max_tokens": "run.max_tokens",
    "max_cost": "run.max_cost",
    "model": "proposer.model",
}
RUN_FLAGS = {
    **STEER_FLAGS,
    "target": "run.target",
    "seed": "run.seed",
    "proposer": "proposer.kind",
    "runner": "runner.kind",
    "budget_seconds": "budget.seconds",
    "budget_steps": "budget.steps",
}


def _overrides(args: argparse.Namespace, flags: dict[str, str]) -> list[str]:
    """Returns --set style overrides for the flags given (flags beat the file, --set beats both)."""
    given = {key: getattr(args, flag) for flag, key in flags.items()}
    out = [f"{k}={json.dumps(v)}" for k, v in given.items() if v is not None]
    if getattr(args, "budget_seconds", None) is not None:
        out.append("budget.steps=0")
    if getattr(args, "budget_steps", None) is not None:
        out.append("budget.seconds=0.0")
    return out + list(args.set or [])


def cmd_run(args: argparse.Namespace) -> int:
    from selfprog.rundir import (
        check_run_target,
        create_run,
        default_run_dir,
        discard_new_run,
        driver_lock,
    )
    from selfprog.warmstart import open_earlier

    settings = config.load_config(args.config, _overrides(args, RUN_FLAGS))
    if args.target is not None and Path(args.target).is_dir():
        settings = dataclasses.replace(
            settings, run=dataclasses.replace(settings.run, target=str(Path(args.target).resolve()))
        )
    run_dir = (
        Path(args.run_dir) if args.run_dir else default_run_dir(Path("runs"), settings.run.target)
    )
    target = check_run_target(settings)  # an unusable or unsafe target: refused before anything
    earlier = open_earlier(args.warm_start, settings, target) if args.warm_start else None
    log.info("new run in %s", run_dir)
    run = create_run(run_dir, settings)
    try:
        with driver_lock(run.root):
            return _drive(run, warm_start=earlier)
    except SelfprogError:  # refused before anything ran (a runner, a proposer): nothing to keep
        run.archive.close()
        discard_new_run(run_dir)
        raise
    finally:
        if earlier is not None:
            earlier.archive.close()


def cmd_resume(args: argparse.Namespace) -> int:
    from selfprog.rundir import driver_lock, open_run, pin_cpus

    root = Path(args.run_dir)
    looked = open_run(root, readonly=True)  # a run, before anything is written into the folder
    looked.archive.close()
    steered, changes = config.steer(looked.config, _overrides(args, STEER_FLAGS))
    with driver_lock(root):
        run = open_run(root)  # a migration of an older archive, too, happens under the lock
        steered, changes = pin_cpus(run, steered, changes)
        run.config = steered  # written into the run once it can be driven with it
        log.info("resuming %s", run.root)
        return _drive(run, changes)


def _drive(
    run: Any, changes: list[tuple[str, Any, Any]] | None = None, warm_start: Any = None
) -> int:
    """Drives a run whose driver lock the caller holds; returns the exit code. A new run
    given warm_start (an earlier run) starts from its candidates."""
    import signal

    from selfprog import gpus
    from selfprog.loop import Driver, StopRequest
    from selfprog.progress import Reporter
    from selfprog.proposers import make_proposer
    from selfprog.rundir import record_changes
    from selfprog.scheduler import make_scheduler

    settings = run.config
    stop = StopRequest()

    def on_signal(signum: int, frame: object) -> None:  # nothing but flags: the driver says it
        names: dict[int, str] = {signal.SIGINT: "interrupted", signal.SIGHUP: "hung up"}
        stop.request(names.get(signum, "terminated"))
        if stop.count > 1:
            raise KeyboardInterrupt

    minimize = run.target.minimize
    scheduler = make_scheduler(run)  # a cluster that cannot serve the run fails here, first
    # SIGHUP (a closed SSH session) stops the run like SIGTERM, never kills it uncleaned
    stopping = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, on_signal) for s in stopping}
    try:
        os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # as nvidia-smi numbers them
        device = gpus.proposer_device(
            settings.proposer.device, getattr(scheduler, "gpu_slots", []), gpus.visible()
        )
        proposer = make_proposer(settings.proposer, run.target.base_model, device)
        if changes:  # steered: only once the run can be driven with them, and by us alone
            record_changes(run, changes)
            for key, old, new in changes:
                log.info("changed %s: %s -> %s", key, json.dumps(old), json.dumps(new))
        if warm_start is not None:  # once the runner and proposer stand: a refusal leaves nothing
            from selfprog.warmstart import start_warm

            imported = start_warm(run, warm_start)
            log.info("warm start: %d candidates of %s", imported, warm_start.root)
        run.archive.set_meta("ended", "")  # driven now: why it last ended is no longer true
        ended = "stopped by an error"  # what status says when drive() raises
        with Reporter(run) as reporter:
            driver = Driver(run, proposer, scheduler, stop, reporter)
            try:
                ended = driver.drive()
            except KeyboardInterrupt:
                ended = "stopped at once"
            finally:
                with contextlib.suppress(SelfprogError, sqlite3.Error):
                    run.archive.set_meta("ended", ended)  # for `status`, until the next drive
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        try:
            scheduler.close()
        except SelfprogError as exc:  # the engine failing as the run ends: resume cleans up
            log.warning("%s", exc)
    with contextlib.suppress(OSError):  # a closed terminal (SIGHUP) cannot be written to
        print(summary(run.archive, run.target.metric, minimize, run.root, ended), flush=True)
    if ended == "stopped at once":  # recorded and killed: no thread stuck in a hung call may
        sys.stderr.flush()  # hold the exit (the second Ctrl-C's promise)
        os._exit(130)
    if ended.startswith("stopped:"):  # an outage: the run stopped itself, resume continues
        return 2
    return 0 if ended == "finished" or ended.startswith("reached") else 130


def summary(archive: Any, metric: str, minimize: bool, root: Path, ended: str) -> str:
    """Returns the lines printed when a run stops: why, the best candidate, what next."""
    counts = archive.counts()
    best = archive.best(minimize, 1, accepted=True)
    seed = archive.seed()
    lines = [f"run {ended}: {sum(counts.values())} candidates ({_counts_text(counts)})"]
    if best:
        start = seed.score if seed and seed.score is not None else float("nan")
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
    from selfprog.population import Population
    from selfprog.queries import spread
    from selfprog.rundir import lock_holder, open_run

    run = open_run(Path(args.run_dir), readonly=True)
    if args.follow:
        from selfprog.progress import follow

        if args.json:
            raise SelfprogError("--follow shows a live panel: leave out --json")
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is the way out
            follow(run)
        return 0
    archive = run.archive
    minimize = run.target.minimize
    floor = Population(run).noise_floor()
    best = archive.best(minimize, 1, accepted=True)
    seed = archive.seed()
    holder = lock_holder(run.root)
    report: dict[str, Any] = {
        "run": str(run.root),
        "target": run.target.name,
        "driver": holder,
        "ended": None if holder is not None else archive.meta("ended"),  # why it last stopped
        "counts": archive.counts(),
        "generation": archive.last_generation(),
        "generations": run.config.run.generations,
        "seed_score": seed.score if seed else None,
        "noise_floor": dataclasses.asdict(floor),
        "best": {
            "candidate": best[0].id,
            "score": best[0].score,
            "evaluations": spread(archive, best[0].id)[0],
            "confirmed": archive.meta("final_pick") == str(best[0].id),  # by the final pick
            "rationale": best[0].rationale,
        }
        if best
        else None,
        "warm_start": _warm_start(archive),
        "running": [{"candidate": c.id, "node": c.node} for c in archive.running()],
        "tokens": archive.tokens_used(),
        "cost": archive.cost_used(),  # estimated, at proposer.price_in/out (0: unpriced)
        "active_seconds": float(archive.meta("active_seconds") or 0),
        "changes": [
            {"time": when, "key": key, "old": json.loads(old or "null"), "new": json.loads(new)}
            for when, key, old, new in archive.changes()
        ],
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
    if report["ended"]:
        lines.append(f"ended       {report['ended']}")
    if best and report["best"]:
        count = report["best"]["evaluations"]
        how = f"{count} evaluation{'s' if count != 1 else ''}"
        if report["best"]["confirmed"]:
            how += ", confirmed at the run's end"
        lines.append(
            f"best        {run.target.metric} {best[0].score:.4f}, candidate {best[0].id} ({how}): "
            f"{best[0].rationale}"
        )
    if seed and seed.score is not None:
        lines.append(f"seed        {run.target.metric} {seed.score:.4f}")
    lines.append(f"noise floor {floor}")
    if report["warm_start"]:
        warm = report["warm_start"]
        lines.append(f"warm start  {warm['candidates']} candidates of {warm['run']}")
    running = [
        f"{r['candidate']}" + (f" on {r['node']}" if r["node"] else "") for r in report["running"]
    ]
    lines.append(f"running     {', '.join(running) or '-'}")
    spent = f" (estimated cost {report['cost']:.4g})" if report["cost"] else ""
    lines.append(f"tokens      {report['tokens']}{spent}")
    lines.append(f"active      {report['active_seconds'] / 60:.1f} min")
    for change in report["changes"]:  # steered mid-run: `selfprog resume RUN --set`
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(change["time"]))
        old, new = json.dumps(change["old"]), json.dumps(change["new"])
        lines.append(f"changed     {when}: {change['key']} {old} -> {new}")
    print("\n".join(lines))
    return 0


def _warm_start(archive: Any) -> dict[str, Any] | None:
    """Returns where a warm-started run's history came from and how many candidates, else None."""
    recorded = archive.meta("warm_start")
    if not recorded:
        return None
    return {**json.loads(recorded), "candidates": archive.count() - archive.count(imported=False)}


def cmd_config(args: argparse.Namespace) -> int:
    print(config.default_text(), end="")
    return 0


def _add_limits(parser: Any, set_help: str) -> None:
    """Adds the flags `run` and `resume` share: when to stop, and --set."""
    parser.add_argument("--max-candidates", type=int, help="stop after this many candidates")
    parser.add_argument("--max-hours", type=float, help="stop after this much driving time")
    parser.add_argument(
        "--max-sandbox-hours",
        type=float,
        help="stop after candidates spent this much time training and evaluating, summed",
    )
    parser.add_argument(
        "--max-tokens", type=int, help="stop once the proposer used this many tokens"
    )
    parser.add_argument(
        "--max-cost", type=float, help="stop once the proposer's estimated spend reaches this"
    )
    parser.add_argument("--set", action="append", metavar="TABLE.KEY=VALUE", help=set_help)


def add_verbs(verbs: Any) -> None:
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
    rn.add_argument(
        "--proposer",
        choices=("tune", "mutate", "openai", "transformers", "self"),
        help="the proposer",
    )
    rn.add_argument(
        "--model", help="the proposer's model: a fetched alias (smollm2), a folder or a name"
    )
    rn.add_argument(
        "--runner",
        choices=("docker", "local", "ray"),
        help="the sandbox: docker, local, or ray (docker sandboxes on a Ray cluster's nodes)",
    )
    rn.add_argument("--generations", type=int, help="generations after the seed")
    rn.add_argument("--population", type=int, help="children per generation")
    rn.add_argument("--workers", type=int, help="candidates scored at once")
    run_budget = rn.add_mutually_exclusive_group()
    run_budget.add_argument("--budget-seconds", type=float, help="training seconds per candidate")
    run_budget.add_argument("--budget-steps", type=int, help="training steps per candidate")
    rn.add_argument("--seed", type=int, help="the run's seed")
    rn.add_argument(
        "--warm-start",
        metavar="RUN_DIR",
        type=Path,
        help="start from an earlier run of the same target: its trained candidates become this "
        "run's history and its champion the one to beat (same files, data and budget)",
    )
    _add_limits(rn, "override a config value")
    rn.set_defaults(func=cmd_run)

    rs = verbs.add_parser(
        "resume",
        help="continue a stopped or crashed run, optionally steered",
        description="Continue a run after Ctrl-C, SIGTERM, kill -9, an outage or a reboot: "
        "finished candidates are kept, recorded proposals are not asked again, work in flight "
        "runs again. The flags and --set change the run from now on (recorded in its archive): "
        "its length and limits, workers, memory, the proposer and selection; what decides a "
        "score (target, seed, budget, sandbox) cannot change.",
    )
    rs.add_argument("run_dir", help="the run folder")
    rs.add_argument("--generations", type=int, help="generations after the seed, in all")
    rs.add_argument("--population", type=int, help="children per generation, from now on")
    rs.add_argument("--workers", type=int, help="candidates scored at once")
    rs.add_argument("--model", help="the proposer's model")
    _add_limits(rs, "change a config value")
    rs.set_defaults(func=cmd_resume)

    st = verbs.add_parser(
        "status",
        help="where a run stands (safe while it runs)",
        description="Counts by state, generation, best score, running work and tokens; reads the "
        "archive without writing, so it is safe while the run is being driven.",
    )
    st.add_argument("run_dir", help="the run folder")
    st.add_argument("--json", action="store_true", help="print as JSON")
    st.add_argument(
        "--follow",
        action="store_true",
        help="keep showing the run's live panel, read from its archive, until its driver ends "
        "(or Ctrl-C); a plain line per change when not on a terminal",
    )
    st.set_defaults(func=cmd_status)

    cf = verbs.add_parser(
        "config", help="print the default config", description="Print the commented default config."
    )
    cf.set_defaults(func=cmd_config)
