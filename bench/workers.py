"""Candidates per hour with 1 and 2 workers (1 CPU each), through the real `selfprog run`.

Both runs score the same candidates (mutate proposer, same seed, a wall-clock
budget), one after the other on the same machine. The last line reads
`workers_speedup=R` (candidates/hour with 2 workers over 1).

    python bench/workers.py                  # 8 candidates, 10 s budget
    python bench/workers.py --quick          # 4 candidates, 5 s budget
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(workers: int, children: int, budget: float, runner: str, folder: Path) -> float:
    """Returns candidates per hour for one `selfprog run` with that many workers."""
    argv = [
        sys.executable,
        "-m",
        "selfprog",
        "run",
        "--run-dir",
        str(folder / f"workers-{workers}"),
        "--generations",
        "1",
        "--population",
        str(children),
        "--workers",
        str(workers),
        "--budget-seconds",
        str(budget),
        "--runner",
        runner,
        "--seed",
        "1",
        "--set",
        "runner.cpus=1",
        "--set",
        "selection.noise_seeds=1",
        "--set",
        "selection.confirm_seeds=1",
    ]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"selfprog run failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    candidates = children + 1
    per_hour = candidates / wall * 3600
    print(
        f"{workers} worker(s): {candidates} candidates in {wall:.1f} s = {per_hour:.0f} candidates/hour",
        flush=True,
    )
    return per_hour


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=8)
    parser.add_argument("--budget", type=float, default=10.0, help="training seconds per candidate")
    parser.add_argument("--runner", default="docker", choices=("docker", "local"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    children, budget = (4, 5.0) if args.quick else (args.children, args.budget)
    with tempfile.TemporaryDirectory(prefix="selfprog-workers-") as tmp:
        one = run(1, children, budget, args.runner, Path(tmp))
        two = run(2, children, budget, args.runner, Path(tmp))
    print(f"workers_speedup={two / one:.3f}")


if __name__ == "__main__":
    main()
