"""Which search finds better tinylm programs with the `mutate` proposer, for the same evaluations?

Three strategies through the real `selfprog run` (step budget, so scores are
deterministic), several run seeds each, the same number of evaluations:
- archive: the default open-ended parent selection;
- greedy: one lineage, a child replaces its parent when better;
- random: children are always drawn around the seed (nothing is ever kept),
  i.e. random sampling of the same literals.
Acceptance is the plain rule here (one evaluation each, z = 0) so that only
the choice of parents differs. Prints the best val_bpb per strategy and seed,
and the mean best per strategy.

    python bench/search.py                   # 3 generations x 4 children, 2 seeds
    python bench/search.py --seeds 5 --generations 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

STRATEGIES = {
    "archive": ["selection.policy=archive"],
    "greedy": ["selection.policy=greedy"],
    "random": ["selection.policy=greedy", "selection.z=1000000.0"],
}


def best_score(folder: Path, strategy: str, seed: int, args: argparse.Namespace) -> float:
    run_dir = folder / f"{strategy}-{seed}"
    argv = [
        sys.executable,
        "-m",
        "selfprog",
        "run",
        "--run-dir",
        str(run_dir),
        "--generations",
        str(args.generations),
        "--population",
        str(args.population),
        "--budget-steps",
        str(args.steps),
        "--runner",
        args.runner,
        "--seed",
        str(seed),
        "--set",
        "selection.noise_seeds=1",
        "--set",
        "selection.confirm_seeds=1",
        "--set",
        "selection.z=0.0",
    ]
    for override in STRATEGIES[strategy]:
        argv += ["--set", override]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(
            f"{strategy}: selfprog run failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    top = subprocess.run(
        [sys.executable, "-m", "selfprog", "top", str(run_dir), "-n", "1", "--json"],
        capture_output=True,
        text=True,
    )
    return float(json.loads(top.stdout)[0]["score"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--population", type=int, default=4)
    parser.add_argument("--steps", type=int, default=150, help="training steps per candidate")
    parser.add_argument("--runner", default="docker", choices=("docker", "local"))
    args = parser.parse_args()
    evaluations = 1 + args.generations * args.population
    print(
        f"tinylm, mutate, {evaluations} evaluations per run, {args.steps} steps each, seeds 0..{args.seeds - 1}"
    )
    results: dict[str, list[float]] = {s: [] for s in STRATEGIES}
    with tempfile.TemporaryDirectory(prefix="selfprog-search-") as tmp:
        for seed in range(args.seeds):
            for strategy in STRATEGIES:
                score = best_score(Path(tmp), strategy, seed, args)
                results[strategy].append(score)
                print(f"seed {seed}  {strategy:8s}  best val_bpb {score:.4f}", flush=True)
    summary = "  ".join(f"{s}={statistics.fmean(v):.4f}" for s, v in results.items())
    print(f"mean best val_bpb: {summary}")


if __name__ == "__main__":
    main()
