"""Is SmolLM2-135M in constrained edit mode a better tinylm proposer than `mutate`?

Each proposer drives the real `selfprog run` (local runner, step budget, so a
program's score depends only on the program and the evaluation seed) once per
run seed, with the default acceptance rule. Per run it prints the seed
program's val_bpb, the best accepted one, the best child scored at all, how
the children ended and how many distinct settings they changed (read from
their programs). Why invalid children failed is listed below the table. Last
line: the mean best accepted score per proposer and on how many seeds the LM
did strictly better.

    python bench/versus.py                       # 3 seeds, 3 generations x 3, 60 steps
    python bench/versus.py --seeds 5 --steps 100 --keep /tmp/versus   # keep the runs
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from selfprog.proposers.mutate import tunable_literals
from selfprog.queries import one_line
from selfprog.rundir import open_run

PROPOSERS = {
    "mutate": ["--proposer", "mutate"],
    "constrained": [
        *("--proposer", "transformers", "--model", "smollm2"),
        *("--set", "proposer.edit_mode=constrained"),
    ],
}


def settings(files: dict[str, str]) -> dict[tuple[str, str], int | float]:
    """Returns the program's tunable settings, (file, name) -> value."""
    return {(lit.path, lit.name): lit.value for p in files for lit in tunable_literals(p, files[p])}


def summarize(run_dir: Path) -> dict[str, Any]:
    """Returns what a finished run found, read through the archive (read-only)."""
    run = open_run(run_dir, readonly=True)
    try:
        archive, minimize = run.archive, run.target.minimize
        everyone = {c.id: c for c in archive.candidates()}
        children = [c for c in everyone.values() if c.generation > 0]
        seed, best = archive.seed(), archive.best(minimize, 1, accepted=True)
        ok = [c.score for c in children if c.state == "ok" and c.score is not None]
        changed: set[tuple[str, str]] = set()
        for c in children:
            parent = everyone.get(c.parent_id or 0)
            if c.program_hash is None or parent is None or parent.program_hash is None:
                continue
            with contextlib.suppress(SyntaxError):  # an unparsable child changed no setting
                before = settings(archive.program(parent.program_hash))
                after = settings(archive.program(c.program_hash))
                changed |= {key for key, value in after.items() if before.get(key) != value}
        states = Counter(c.state for c in children)
        return {
            "seed": seed.score if seed and seed.score is not None else math.nan,
            "best": best[0].score if best else math.nan,
            "best_id": best[0].id if best else None,
            "child": (min(ok) if minimize else max(ok)) if ok else math.nan,
            "ok": states.pop("ok", 0),
            "invalid": states.pop("invalid", 0),
            "other": ", ".join(f"{s} {n}" for s, n in sorted(states.items())) or "-",
            "settings": len(changed),
            "reasons": Counter(one_line(c.reason, 100) for c in children if c.state == "invalid"),
            "minimize": minimize,
        }
    finally:
        run.archive.close()


def drive(root: Path, proposer: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Runs one `selfprog run` (its output goes to <name>.log) and returns its summary."""
    run_dir = root / f"{proposer}-{seed}"
    argv = [
        *(sys.executable, "-m", "selfprog", "run", "--target", "tinylm", "--runner", "local"),
        *("--generations", str(args.generations), "--population", str(args.population)),
        *("--budget-steps", str(args.steps), "--seed", str(seed), "--run-dir", str(run_dir)),
        *PROPOSERS[proposer],
    ]
    start = time.perf_counter()
    with open(root / f"{proposer}-{seed}.log", "w") as log:
        done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = (root / f"{proposer}-{seed}.log").read_text()[-3000:]
        raise SystemExit(f"{proposer} seed {seed}: selfprog run failed:\n{tail}")
    return {**summarize(run_dir), "minutes": (time.perf_counter() - start) / 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="run seeds 0..N-1 (3)")
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--population", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60, help="training steps per candidate (60)")
    parser.add_argument("--keep", type=Path, help="put the runs and their logs here and keep them")
    args = parser.parse_args()
    print(
        f"tinylm, local runner, {args.generations} generations x {args.population}, "
        f"{args.steps} steps, seeds 0..{args.seeds - 1}; scores are val_bpb"
    )
    header = f"{'proposer':12s} seed  {'seed_score':>10s}  {'best(id)':>12s}  {'best_child':>10s}"
    print(f"{header}  ok invalid  settings  minutes  other")
    results: dict[str, list[dict[str, Any]]] = {p: [] for p in PROPOSERS}
    with tempfile.TemporaryDirectory(prefix="selfprog-versus-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        for seed in range(args.seeds):
            for proposer in PROPOSERS:
                r = drive(root, proposer, seed, args)
                results[proposer].append(r)
                best = f"{r['best']:.4f}({r['best_id']})"
                print(
                    f"{proposer:12s} {seed:4d}  {r['seed']:10.4f}  {best:>12s}  {r['child']:10.4f}"
                    f"  {r['ok']:2d} {r['invalid']:7d}  {r['settings']:8d}  {r['minutes']:7.1f}"
                    f"  {r['other']}",
                    flush=True,
                )
    for proposer, runs in results.items():
        for seed, r in enumerate(runs):
            for reason, n in r["reasons"].most_common():
                print(f"invalid, {proposer} seed {seed}: {n}x {reason}")
    minimize = results["mutate"][0]["minimize"]
    print(f"direction: {'lower' if minimize else 'higher'} is better (the target's target.toml)")
    pairs = zip(results["mutate"], results["constrained"], strict=True)
    wins = sum((c["best"] < m["best"]) if minimize else (c["best"] > m["best"]) for m, c in pairs)
    means = {p: statistics.fmean(r["best"] for r in runs) for p, runs in results.items()}
    print(
        f"mutate_best={means['mutate']:.4f} constrained_best={means['constrained']:.4f} "
        f"wins={wins}/{args.seeds}"
    )


if __name__ == "__main__":
    main()
