"""The start-up allowance a seconds budget needs: the tinylm seed's overrun idle and loaded.

A seconds budget is held at the budget plus an allowance for start-up and
saving. This measures what the seed spends beyond its budget (its training
phase's wall time minus the budget) through the docker runner, alone (one
worker, 2 CPUs) and two at once (run.workers=2: 1 CPU each), interleaved,
and the seed's one-step training (what `selfprog eval` measures it with);
then the smallest allowance `scoring.ceilings` gives from the idle
measurements, the fate under it of honest candidates on the loaded machine
(the seed itself, and a program that counts its budget from its first step
and never reads the time limit), and of a program that trains four times
its budget.

    python bench/allowance.py                # 8 s budget, 3 rounds
    python bench/allowance.py --quick        # 1 round

The last line reads `idle_overrun_s=A loaded_overrun_s=B allowance_s=C
loaded_ok=N/M cheat=STATE@Ts`: the smallest idle overrun, the largest loaded
one, the allowance the loaded candidates were held to.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from selfprog.data import Dataset, prepare_data
from selfprog.runners.base import Limits
from selfprog.runners.docker import DockerRunner
from selfprog.scoring import Ceilings, Result, ceilings, score_program
from selfprog.target import Target, export_target, load_target

IDLE, LOADED = Limits(cpus=2.0), Limits(cpus=1.0)  # one worker on 2 cores; two workers
TRAINED = re.compile(r"trained \d+ steps, [\d,]+ bytes in ([\d.]+)s")


def program(folder: Path, *replacements: tuple[str, str]) -> Path:
    """Returns the tinylm seed exported to folder, its train.py edited."""
    export_target("tinylm", folder)
    train = folder / "train.py"
    source = train.read_text()
    for old, new in replacements:
        if old not in source:
            raise SystemExit(f"train.py no longer has {old!r}")
        source = source.replace(old, new)
    train.write_text(source)
    return folder


def trained_seconds(result: Result) -> float:
    """Returns the training loop's own seconds, as the seed prints them (0 if not printed)."""
    found = TRAINED.findall(result.log_tail)
    return float(found[-1]) if found else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=8.0, help="training seconds (8)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--quick", action="store_true", help="1 round")
    args = parser.parse_args()
    budget, rounds = args.budget, 1 if args.quick else args.rounds
    target: Target = load_target("tinylm")
    data: Dataset = prepare_data(target)
    runner = DockerRunner()

    with tempfile.TemporaryDirectory(prefix="selfprog-bench-") as tmp:
        work = Path(tmp)
        count = iter(range(10**6))

        def score(
            folder: Path, limits: Limits, limit: Ceilings | None = None, steps: int = 0
        ) -> Result:
            result = score_program(
                target,
                folder,
                runner,
                data,
                work / f"job-{next(count)}",
                limits=limits,
                budget_seconds=0 if steps else budget,
                budget_steps=steps,
                ceilings=limit,
            )
            if result.state.value != "ok" and limit is None:
                raise SystemExit(f"the seed ended {result.state.value}: {result.reason}")
            return result

        def pair(folder: Path, limit: Ceilings | None = None) -> list[Result]:
            """Returns two candidates scored at once, as two workers score them."""
            with ThreadPoolExecutor(2) as pool:
                first = pool.submit(score, folder, LOADED, limit)
                time.sleep(1)  # Python 3.11's ast.parse is not safe in two threads at once
                second = pool.submit(score, folder, LOADED, limit)
                return [first.result(), second.result()]

        idle: list[Result] = []
        loaded: list[Result] = []
        one_step: list[float] = []  # what `selfprog eval` measures the seed's overrun with
        for round_ in range(rounds):
            idle.append(score(target.root, IDLE))
            loaded += pair(target.root)
            one_step.append(score(target.root, IDLE, steps=1).timings["train"])
            print(
                f"round {round_ + 1}  idle {idle[-1].timings['train'] - budget:5.2f}s  "
                f"loaded {loaded[-2].timings['train'] - budget:5.2f}s "
                f"{loaded[-1].timings['train'] - budget:5.2f}s  (overrun of {budget:g}s)  "
                f"one step {one_step[-1]:5.2f}s",
                flush=True,
            )
        idle_over = [r.timings["train"] - budget for r in idle]
        loaded_over = [r.timings["train"] - budget for r in loaded]
        startup = [r.metrics.get("train_startup_s", 0.0) for r in idle + loaded]
        print(
            f"overrun idle {min(idle_over):.2f}-{max(idle_over):.2f}s (median "
            f"{statistics.median(idle_over):.2f}s), loaded {min(loaded_over):.2f}-"
            f"{max(loaded_over):.2f}s (median {statistics.median(loaded_over):.2f}s), one step "
            f"{min(one_step):.2f}-{max(one_step):.2f}s; the seed's start-up {min(startup):.2f}-"
            f"{max(startup):.2f}s"
        )
        # the smallest allowance each way: a run's (its seed's evaluations, alone) and eval's
        # (the seed's one step); honest candidates on the loaded machine are held to it
        by_run = ceilings([r.timings for r in idle], target, budget, 0)
        by_eval = min(
            (ceilings([{"train": t}], target, budget, 0, seed_seconds=0) for t in one_step),
            key=lambda held: held.train,
        )
        limit = min(by_run, by_eval, key=lambda held: held.train)
        allowance = limit.train - budget
        print(
            f"allowance: {by_run.train - budget:.2f}s in a run (the seed's {by_run.overrun:.2f}s), "
            f"{by_eval.train - budget:.2f}s in eval (its one step's {by_eval.overrun:.2f}s); "
            f"the loaded candidates below are held to {limit.train:.2f}s"
        )
        counting = program(
            work / "counting", ('float(os.environ.get("SELFPROG_TIME_LIMIT", "0"))', "0.0")
        )
        honest: list[Result] = []
        for folder in (target.root, counting):
            honest += pair(folder, limit)
        for name, result in zip(["seed", "seed", "counting", "counting"], honest, strict=True):
            print(
                f"loaded {name:8s} {result.state.value:11s} phase {result.timings['train']:5.2f}s"
                f"  trained {trained_seconds(result):4.1f}s  {result.reason}"
            )
        cheat_dir = program(
            work / "cheat",
            (
                'float(os.environ.get("SELFPROG_BUDGET_SECONDS", "30"))',
                '4 * float(os.environ.get("SELFPROG_BUDGET_SECONDS", "30"))',
            ),
            ('float(os.environ.get("SELFPROG_TIME_LIMIT", "0"))', "0.0"),
        )
        cheat = score(cheat_dir, IDLE, limit)
        print(f"cheat (4 x the budget): {cheat.state.value} after {cheat.timings['train']:.2f}s")
        print(f"  {cheat.reason}")
    ok = sum(r.state.value == "ok" for r in honest)
    print(
        f"idle_overrun_s={min(idle_over):.2f} loaded_overrun_s={max(loaded_over):.2f} "
        f"allowance_s={allowance:.2f} loaded_ok={ok}/{len(honest)} "
        f"cheat={cheat.state.value}@{cheat.timings['train']:.1f}s"
    )


if __name__ == "__main__":
    main()
