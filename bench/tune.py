"""Does a default `selfprog run` find a better program than a user's own tuner, for the same trainings?

One MLP-regression target per run seed (`selfprog target new`, the `minimal`
scaffold), local runner, step budget. Methods, each spending about N
trainings, where N is what the first selfprog run of the seed spent (read from
its archive; 1 + generations x population when no selfprog run is chosen):
- selfprog-default: `selfprog run` with no proposer forced (whatever the
  default is), plus any `--selfprog-set KEY=VALUE`;
- selfprog-noprune: the same with `pruning.enabled=false` (and the same
  `--selfprog-set`s): what pruning saves, and what it costs in final score;
- selfprog-plain: `tune` under search.py's plain rule (one evaluation each,
  z = 0): every training a new program, as a study spends them;
- selfprog-mutate: the same with `proposer.kind=mutate`;
- greedy: `mutate` under keep/discard (`selection.policy=greedy`, z = 0);
- optuna-tpe: an Optuna TPE study over the six settings of the scaffold's
  train.py (SPACE below, what a user writes in two minutes), each trial a
  `selfprog eval` of train.py with those module-level assignments rewritten;
  the seed's own settings are its first trial, as a run scores the seed first;
- random: the same study with Optuna's RandomSampler (TPE's first 10 trials,
  Optuna's default start-up, are these same random ones).
selfprog-default runs selfprog's defaults whole (the seed evaluated 3 times,
children accepted on their mean, the best confirmed at the run's end), its
repeats counted in N; the other runs share search.py's plain acceptance (one
evaluation each, z = 0). Each method's pick (a run's champion, what `selfprog
status` calls its best; a study's best trial) is retrained on seeds
1001..1005 and the mean is its true score, so selection luck does not count;
the seed program's true score is measured the same way. The scaffold's
prepare.py draws its hidden function from the OS's entropy, so every run and
every eval would regress a different function: the bench seeds it (with the
run seed) in its copy of the target, and warns if two data hashes differ.

Prints per run seed the seed's and each method's true val_mse, then per method
the median true improvement over the seed (seed - pick), its trainings,
sandbox seconds (train + evaluate, from eval's JSON and the runs' archives)
and wall seconds (eval subprocesses, which score the seed first, or the whole
run). Last line: `search_ratio=X prune_speedup=Y`: X is selfprog-default's median
improvement over optuna-tpe's (nan when either is missing or TPE's is not
positive), Y selfprog-default's trainings per sandbox second over
selfprog-noprune's (each pruned training counted as one).

    python bench/tune.py                               # 5 seeds, 8 generations x 4, 300 steps
    python bench/tune.py --seeds 1 --generations 1 --population 2 --steps 50 --methods optuna-tpe,random
    python bench/tune.py --selfprog-set selection.z=2.0 --keep /tmp/tune   # keep every run and trial
    python bench/tune.py --equal seconds --methods selfprog-noprune,selfprog-default,greedy,optuna-tpe,random

With `--equal seconds` every method spends the sandbox seconds S the first
one spent (selfprog runs stop at `--max-sandbox-hours`, studies ask trials
until their trials spent S), so what pruning saves buys more candidates.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

ROOT = Path(__file__).resolve().parents[1]  # `python -m selfprog` is found from here
SELFPROG = (sys.executable, "-m", "selfprog")
TRUE_SEEDS = range(1001, 1006)
COMMON = ("selection.noise_seeds=1", "selection.confirm_seeds=1", "selection.z=0.0")
# each selfprog method's --set overrides after COMMON (selfprog-default runs the true defaults,
# its repeats and confirmations counted in N); selfprog-default also gets --selfprog-set
RUNS: dict[str, list[str]] = {
    "selfprog-default": [],
    "selfprog-noprune": ["pruning.enabled=false"],  # the defaults but pruning: prune_speedup
    "selfprog-plain": ["proposer.kind=tune"],  # tune with the plain rule: every training a program
    "selfprog-mutate": ["proposer.kind=mutate"],
    "greedy": ["proposer.kind=mutate", "selection.policy=greedy"],  # z = 0: keep/discard
}
SAMPLERS = {"optuna-tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
METHODS = (*RUNS, *SAMPLERS)  # the runs first: the first one sets N
SETTINGS = ("hidden", "layers", "activation", "learning_rate", "batch_size", "weight_decay")


def suggest(trial: optuna.Trial) -> dict[str, Any]:
    """The search space a user writes for the scaffold's train.py."""
    return {
        "hidden": trial.suggest_int("hidden", 8, 256, log=True),
        "layers": trial.suggest_int("layers", 1, 6),
        "activation": trial.suggest_categorical("activation", ["relu", "tanh", "gelu", "silu"]),
        "learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-1, log=True),
        "batch_size": trial.suggest_categorical("batch_size", [32, 64, 128, 256, 512]),
        "weight_decay": trial.suggest_float("weight_decay", 0.0, 0.3),
    }


@dataclass
class Outcome:
    pick: Path  # the folder of the best-scoring program
    trainings: int
    sandbox_s: float  # train + evaluate of the trainings
    wall_s: float


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def selfprog(*argv: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*SELFPROG, *argv], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"selfprog {argv[0]} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done


def make_target(folder: Path, seed: int) -> Path:
    """Writes the scaffold target into folder, its data drawn from `seed` rather than the OS."""
    selfprog("target", "new", "mlp", "--dir", str(folder))
    prepare = folder / "prepare.py"
    text = prepare.read_text()
    fixed = text.replace("np.random.default_rng()", f"np.random.default_rng({seed})", 1)
    if fixed == text:
        raise SystemExit(f"{prepare}: no `np.random.default_rng()` to seed; update bench/tune.py")
    prepare.write_text(fixed)
    return folder


def rewrite(source: str, values: dict[str, Any]) -> str:
    """Returns train.py with each `name = value` line at module level set to values[name]."""
    for name, value in values.items():
        source, n = re.subn(rf"^{name} = .*$", f"{name} = {json.dumps(value)}", source, flags=re.M)
        if n != 1:
            raise SystemExit(f"train.py: {n} module-level `{name} = ...` lines, expected 1")
    return source


def evaluate(
    program: Path, target: Path, seed: int, args: argparse.Namespace
) -> tuple[float | None, float, float]:
    """Trains and scores one program with `selfprog eval`: (score or None, sandbox s, wall s)."""
    argv = [*SELFPROG, "eval", str(program), "--target", str(target), "--runner", "local"]
    argv += ["--budget-steps", str(args.steps), "--seed", str(seed), "--json"]
    argv += ["--data-cache", str(args.root / "data")]
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    try:
        result = json.loads(done.stdout)
    except ValueError:  # exit 2: no result at all
        progress(f"  eval {program} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        return None, 0.0, wall
    args.hashes.add(result["data_hash"])
    if result["state"] != "ok":
        progress(f"  eval {program} seed {seed}: {result['state']} ({result['reason'][:200]})")
    timings = result.get("timings", {})
    sandbox = timings.get("train", 0.0) + timings.get("evaluate", 0.0)
    return (result["score"] if result["state"] == "ok" else None), sandbox, wall


def run_selfprog(
    method: str, target: Path, seed: int, args: argparse.Namespace, seconds: float = 0.0
) -> Outcome:
    """One real `selfprog run`; its pick is its champion, exported to a folder. With `seconds`,
    it runs until its candidates spent that much sandbox time (max_sandbox_hours), its
    generations four times as many so that the limit ends it."""
    folder = args.root / f"seed-{seed}"
    run_dir = folder / method
    argv = [*SELFPROG, "run", "--target", str(target), "--runner", "local"]
    argv += ["--run-dir", str(run_dir), "--budget-steps", str(args.steps), "--seed", str(seed)]
    generations = args.generations * (4 if seconds else 1)
    argv += ["--generations", str(generations), "--population", str(args.population)]
    if seconds:
        argv += ["--max-sandbox-hours", f"{seconds / 3600:.6f}"]
    default = method in ("selfprog-default", "selfprog-noprune")
    extra = args.selfprog_set if default else []
    common = () if default else COMMON
    for override in (*common, *RUNS[method], *extra):
        argv += ["--set", override]
    start = time.perf_counter()
    with (
        open(folder / f"{method}.log", "w") as log,
        subprocess.Popen(
            argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if found := re.search(r"candidate (\d+): (?!scoring)(\S+)", line):
                progress(f"{method} seed {seed}: candidate {found[1]} {found[2]}")
    if proc.returncode != 0:
        tail = (folder / f"{method}.log").read_text()[-3000:]
        raise SystemExit(f"{method} seed {seed}: selfprog run failed:\n{tail}")
    wall = time.perf_counter() - start
    db = sqlite3.connect(f"file:{run_dir / 'archive.sqlite'}?mode=ro", uri=True)
    try:
        timings = [json.loads(t or "{}") for (t,) in db.execute("SELECT timings FROM evaluations")]
        args.hashes.add(db.execute("SELECT value FROM meta WHERE key = 'data_hash'").fetchone()[0])
    finally:
        db.close()
    sandbox = sum(t.get("train", 0.0) + t.get("evaluate", 0.0) for t in timings)
    best = json.loads(selfprog("status", str(run_dir), "--json").stdout)["best"]
    pick = folder / f"{method}-pick"
    selfprog("export", str(run_dir), str(best["candidate"]), str(pick))
    return Outcome(pick, len(timings), sandbox, wall)


def run_study(
    method: str, target: Path, seed: int, n: int, args: argparse.Namespace, budget_s: float = 0.0
) -> Outcome:
    """An Optuna study of n trials (with `seconds`: until its trials spent that much sandbox
    time), the seed's own settings first; its pick is the best trial."""
    folder = args.root / f"seed-{seed}" / method
    source = (target / "train.py").read_text()
    study = optuna.create_study(direction="minimize", sampler=SAMPLERS[method](seed=seed))
    found = dict(re.findall(r"^(\w+) = (.+)$", source, flags=re.M))
    study.enqueue_trial({name: ast.literal_eval(found[name]) for name in SETTINGS})
    sandbox = wall = 0.0
    trials = 0
    while (sandbox < budget_s) if budget_s else (trials < n):
        trials += 1
        trial = study.ask()
        program = folder / f"trial-{trial.number}"
        program.mkdir(parents=True)
        (program / "train.py").write_text(rewrite(source, suggest(trial)))
        score, seconds, took = evaluate(program, target, seed, args)
        sandbox, wall = sandbox + seconds, wall + took
        if score is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, score)
        best = study.best_value if study.best_trials else math.nan
        shown = "failed" if score is None else f"{score:.4f}"
        of = f"{sandbox:.0f}/{budget_s:.0f}s" if budget_s else f"{trials}/{n}"
        progress(f"{method} seed {seed}: trial {trials} ({of}) {shown} (best {best:.4f})")
    pick = folder / f"trial-{study.best_trial.number}" if study.best_trials else target
    return Outcome(pick, trials, sandbox, wall)


def true_score(
    program: Path, target: Path, args: argparse.Namespace, known: dict[str, float]
) -> float:
    """The mean score of program retrained on TRUE_SEEDS (programs already measured are reused)."""
    key = (program / "train.py").read_text()
    if key not in known:
        scores = [evaluate(program, target, s, args)[0] for s in TRUE_SEEDS]
        ok = [s for s in scores if s is not None]
        if len(ok) < len(scores):
            progress(f"  {program}: {len(scores) - len(ok)} of {len(scores)} retrainings not ok")
        known[key] = statistics.fmean(ok) if ok else math.nan
    return known[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="run seeds FIRST..FIRST+K-1 (5)")
    parser.add_argument("--first-seed", type=int, default=0, help="the first run seed (0)")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--population", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300, help="training steps per training (300)")
    parser.add_argument("--keep", type=Path, help="put the runs and trials here and keep them")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="a subset, comma-separated, in order: the first sets N (and S)",
    )
    parser.add_argument(
        "--equal",
        choices=("trainings", "seconds"),
        default="trainings",
        help="what every method spends as the first did: its N trainings, or its S sandbox "
        "seconds (a selfprog run then stops at max_sandbox_hours)",
    )
    parser.add_argument(
        "--selfprog-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more --set for selfprog-default's run (repeatable)",
    )
    args = parser.parse_args()
    methods = list(dict.fromkeys(args.methods.split(",")))
    if unknown := set(methods) - set(METHODS):
        parser.error(f"unknown methods {sorted(unknown)}; choose among {', '.join(METHODS)}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(
        f"mlp scaffold, local runner, {args.generations} generations x {args.population}, "
        f"{args.steps} steps, seeds {args.first_seed}..{args.first_seed + args.seeds - 1}; true score = mean val_mse over seeds "
        f"{TRUE_SEEDS[0]}..{TRUE_SEEDS[-1]} (lower is better)"
    )
    print(f"{'seed':>4s} {'N':>4s} {'seed_prog':>10s} " + " ".join(f"{m:>16s}" for m in methods))
    planned = 1 + args.generations * args.population  # N when no selfprog run is chosen
    gains: dict[str, list[float]] = {m: [] for m in methods}
    spent = {m: [0, 0.0, 0.0] for m in methods}  # trainings, sandbox s, wall s
    with tempfile.TemporaryDirectory(prefix="selfprog-tune-") as tmp:
        args.root = (args.keep or Path(tmp)).resolve()
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            args.hashes = set()
            target = make_target(args.root / f"seed-{seed}" / "target", seed)
            n, s = 0, 0.0  # the trainings and sandbox seconds of the first method
            outcomes: dict[str, Outcome] = {}
            for method in methods:
                progress(f"{method} seed {seed}: starting")
                if method in RUNS:
                    outcomes[method] = run_selfprog(method, target, seed, args, s)
                else:
                    outcomes[method] = run_study(method, target, seed, n or planned, args, s)
                n = n or outcomes[method].trainings
                if args.equal == "seconds":
                    s = s or outcomes[method].sandbox_s
            known: dict[str, float] = {}
            progress(f"seed {seed}: retraining the seed program and the picks")
            base = true_score(target, target, args, known)
            row = f"{seed:4d} {n or planned:4d} {base:10.4f} "
            for method, outcome in outcomes.items():
                score = true_score(outcome.pick, target, args, known)
                gains[method].append(base - score)
                done = (outcome.trainings, outcome.sandbox_s, outcome.wall_s)
                spent[method] = [a + b for a, b in zip(spent[method], done, strict=True)]
                row += f" {score:16.4f}"
            print(row, flush=True)
            if len(args.hashes) > 1:
                progress(f"warning: seed {seed}: methods saw different data: {sorted(args.hashes)}")
    print(f"{'method':16s} {'median_gain':>11s} {'trainings':>9s} {'sandbox_s':>9s} {'wall_s':>8s}")
    medians = {m: statistics.median(g) for m, g in gains.items()}
    for m in methods:
        trainings, sandbox, wall = spent[m]
        print(f"{m:16s} {medians[m]:11.4f} {trainings:9d} {sandbox:9.1f} {wall:8.1f}")
    tpe, own = medians.get("optuna-tpe", math.nan), medians.get("selfprog-default", math.nan)
    ratio = own / tpe if tpe > 0 else math.nan
    pruned, whole = (spent.get(m, [0, 0.0, 0.0]) for m in ("selfprog-default", "selfprog-noprune"))
    rates = [
        trainings / sandbox if sandbox else math.nan for trainings, sandbox, _ in (pruned, whole)
    ]
    speedup = rates[0] / rates[1] if rates[1] else math.nan
    print(f"search_ratio={ratio:.3f} prune_speedup={speedup:.3f}")  # nan prints as nan


if __name__ == "__main__":
    main()
