"""How long the sandbox slots sit idle while a slow proposer thinks: synchronous against steady state.

The same run (tinylm, a step budget, 2 workers) is driven twice through the
real loop and runner: once with `run.synchronous = true` (breed a whole
generation, score it, judge it) and once in steady state (the proposer
prepares the next children while candidates are scored). The proposer is
`mutate` behind a fixed latency, by default half a candidate's time (measured
first), as a language model would answer; `--proposer smollm2` uses the
fetched SmolLM2 instead. Idle share = 1 - (seconds the slots were busy) /
(slots x the run's wall time), over the whole run. The last line reads
`idle_share=X` (the steady-state loop's share).

    python bench/pipeline.py                       # 3 generations x 4 children, latency = candidate / 2
    python bench/pipeline.py --quick               # 2 generations x 2 children
    python bench/pipeline.py --proposer smollm2    # a real small LM proposes (constrained)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfprog.config import load_config
from selfprog.loop import Driver
from selfprog.proposers import make_proposer
from selfprog.proposers.mutate import MutateProposer
from selfprog.rundir import create_run
from selfprog.scheduler import Job, Outcome, make_scheduler

WORKERS = 2


class SlowMutate(MutateProposer):
    """`mutate` behind a fixed latency per call."""

    def __init__(self, latency: float):
        super().__init__()
        self.latency = latency

    def propose(self, request: Any, k: int) -> Any:
        time.sleep(self.latency)
        return super().propose(request, k)


def settings(args: argparse.Namespace, *extra: str) -> Any:
    return load_config(
        None,
        [
            f"run.generations={args.generations}",
            f"run.population={args.population}",
            f"run.workers={WORKERS}",
            f"runner.kind={args.runner}",
            "runner.cpus=1",
            f"budget.steps={args.steps}",
            "run.seed=3",
            f"selection.noise_seeds={WORKERS}",  # the seed's evaluations fill both slots
            *extra,
        ],
    )


def candidate_seconds(args: argparse.Namespace, folder: Path) -> float:
    """Returns the seconds one candidate (the seed) takes in a slot, measured."""
    run = create_run(folder / "calibrate", settings(args))
    scheduler = make_scheduler(run)
    files = {n: (run.target.root / n).read_text() for n in run.target.editable}
    start = time.monotonic()
    scheduler.submit(Job(1, 0, files, 0))
    while not any(isinstance(e, Outcome) for e in scheduler.wait(1.0)):
        pass
    scheduler.close()
    return time.monotonic() - start


def drive(args: argparse.Namespace, folder: Path, mode: str, latency: float) -> float:
    """Returns the idle share of the slots over one run."""
    run = create_run(
        folder / mode, settings(args, f"run.synchronous={str(mode == 'sync').lower()}")
    )
    if args.proposer == "smollm2":
        proposer: Any = make_proposer(
            load_config(None, ["proposer.kind=transformers", "proposer.model=smollm2"]).proposer
        )
    else:
        proposer = SlowMutate(latency)
    scheduler = make_scheduler(run)
    started: dict[tuple[int, int], float] = {}
    busy = 0.0

    def on_event(event: dict[str, Any]) -> None:
        nonlocal busy
        key = (event.get("candidate", 0), event.get("evaluation", 0))
        if event["event"] == "started":
            started[key] = time.monotonic()
        elif event["event"] == "finished":
            busy += time.monotonic() - started.pop(key)

    begin = time.monotonic()
    ended = Driver(run, proposer, scheduler, on_event=on_event).drive()
    wall = time.monotonic() - begin
    scheduler.close()
    if ended != "finished":
        raise SystemExit(f"the {mode} run ended: {ended}")
    idle = 1 - busy / (WORKERS * wall)
    evaluations = run.archive.db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]
    calls = run.archive.db.execute("SELECT COUNT(*), SUM(latency) FROM calls").fetchone()
    print(
        f"{mode:>6}: {wall:6.1f} s wall, {evaluations} evaluations, {calls[0]} proposer calls "
        f"({calls[1]:.1f} s), slots busy {busy:.1f} s of {WORKERS * wall:.1f} s: idle {idle:.1%}; "
        f"{evaluations / wall * 3600:.0f} evaluations/hour",
        flush=True,
    )
    return idle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--population", type=int, default=4)
    parser.add_argument("--steps", type=int, default=150, help="training steps per candidate")
    parser.add_argument(
        "--latency", type=float, help="proposer seconds per call (default: candidate / 2)"
    )
    parser.add_argument("--proposer", default="mutate", choices=("mutate", "smollm2"))
    parser.add_argument("--runner", default="docker", choices=("docker", "local"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.generations, args.population, args.steps = 2, 2, 60
    with tempfile.TemporaryDirectory(prefix="selfprog-pipeline-") as tmp:
        folder = Path(tmp)
        per_candidate = candidate_seconds(args, folder)
        latency = args.latency if args.latency is not None else per_candidate / 2
        print(
            f"one candidate: {per_candidate:.1f} s in a slot; proposer latency {latency:.1f} s per call"
        )
        sync = drive(args, folder, "sync", latency)
        steady = drive(args, folder, "steady", latency)
    print(f"sync_idle_share={sync:.3f}")
    print(f"idle_share={steady:.3f}")


if __name__ == "__main__":
    main()
