"""What the sandbox costs: one tinylm seed candidate in docker, local, and as bare host processes.

Runs the three modes interleaved (so drift on the machine hits them alike),
at the training budget and at a one-step budget (which leaves only the fixed
cost: interpreter and torch start-up, container start and removal, evaluation).

    python bench/overhead.py                 # 30 s budget, 3 rounds
    python bench/overhead.py --quick         # 5 s budget, 1 round

The last line reads `docker_vs_bare=R local_vs_bare=R docker_fixed_cost_s=S`,
where S is docker's one-step wall time minus bare's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from selfprog.data import Dataset, prepare_data
from selfprog.runners.base import Limits
from selfprog.runners.docker import DockerRunner
from selfprog.runners.local import LocalRunner, harness_env
from selfprog.scoring import State, parse_result, score_program, stage_program
from selfprog.target import Target, load_target

LIMITS = Limits(cpus=2.0)


def bare(target: Target, data: Dataset, work: Path, seconds: float, steps: int) -> float:
    """Returns the wall time of both phases as plain host processes: no limits, no checks."""
    program = stage_program(target, target.root, work / "program")
    out = work / "out"
    out.mkdir(parents=True, exist_ok=True)
    env = harness_env(
        LIMITS,
        {
            "SELFPROG_DATA": str(data.root),
            "SELFPROG_OUT": str(out),
            "SELFPROG_BUDGET_SECONDS": f"{seconds:g}",
            "SELFPROG_BUDGET_STEPS": str(steps),
        },
    )
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, *target.train], cwd=program, env=env, check=True, capture_output=True
    )
    payload = b"bench\n" + data.heldout(target)
    done = subprocess.run(
        [sys.executable, *target.evaluate],
        cwd=program,
        env=env,
        input=payload,
        capture_output=True,
        check=True,
    )
    seconds_taken = time.perf_counter() - start
    if parse_result(done.stdout.decode(), "bench") is None:
        raise SystemExit(f"bare evaluation gave no result: {done.stderr.decode()[-500:]}")
    return seconds_taken


def sandboxed(
    runner, target: Target, data: Dataset, work: Path, seconds: float, steps: int
) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    result = score_program(
        target,
        target.root,
        runner,
        data,
        work,
        limits=LIMITS,
        budget_seconds=seconds,
        budget_steps=steps,
    )
    wall = time.perf_counter() - start
    if result.state is not State.OK:
        raise SystemExit(f"{runner.name}: candidate ended {result.state.value}: {result.reason}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=30.0, help="training seconds (30)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--quick", action="store_true", help="5 s budget, 1 round")
    args = parser.parse_args()
    budget, rounds = (5.0, 1) if args.quick else (args.budget, args.rounds)

    target = load_target("tinylm")
    data = prepare_data(target)
    docker_runner, local_runner = DockerRunner(), LocalRunner()
    modes: dict[str, Callable[[Path, float, int], float]] = {
        "bare": lambda w, s, n: bare(target, data, w, s, n),
        "docker": lambda w, s, n: sandboxed(docker_runner, target, data, w, s, n),
        "local": lambda w, s, n: sandboxed(local_runner, target, data, w, s, n),
    }
    print(
        f"tinylm seed, {budget:g} s budget, {rounds} round(s), "
        f"cpus={LIMITS.cpus:g}, {os.cpu_count()} cores"
    )
    timings: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="selfprog-bench-") as tmp:
        for round_ in range(rounds):
            for kind, seconds, steps in (("budget", budget, 0), ("one_step", 0.0, 1)):
                for name, run in modes.items():
                    wall = run(Path(tmp) / f"{name}-{kind}-{round_}", seconds, steps)
                    timings.setdefault((name, kind), []).append(wall)
                    print(f"round {round_ + 1}  {kind:8s}  {name:6s}  {wall:6.2f} s", flush=True)
    median = {key: statistics.median(values) for key, values in timings.items()}
    for kind in ("budget", "one_step"):
        row = "  ".join(f"{name} {median[(name, kind)]:.2f}s" for name in modes)
        print(f"median {kind:8s}  {row}")
    docker_ratio = median[("docker", "budget")] / median[("bare", "budget")]
    local_ratio = median[("local", "budget")] / median[("bare", "budget")]
    fixed = median[("docker", "one_step")] - median[("bare", "one_step")]
    print(
        f"docker_vs_bare={docker_ratio:.3f} local_vs_bare={local_ratio:.3f} "
        f"docker_fixed_cost_s={fixed:.2f}"
    )


if __name__ == "__main__":
    main()
