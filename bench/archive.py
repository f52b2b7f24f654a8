"""The archive at scale: the inspection verbs and one generation's bookkeeping on 100,000 candidates.

Builds a synthetic run folder that `selfprog` accepts (the tinylm target, its
prepared data, a frozen config) whose archive is written in bulk, as a long
run would leave it: programs in the blobs and programs tables, each child
changing one file of its parent's; diffs of a few KB and log tails of ~4 KB;
a lineage tree over a few hundred generations, each with its recorded plan,
proposer calls and proposals; most candidates `ok` with one evaluation, the
seed and each generation's confirmed child with three; failures of every
kind, duplicates and invalid answers; the last generation but one scored and
not yet judged, the last still being scored.

Then it times each verb (`status`, `top`, `show`, `lineage`, `report`) as a
fresh `selfprog` process, and each step of what the driver does between
proposer calls and scoring (the population's members, noise floor, champion
and parents; the judge settling; the evaluations due; the breeder's planning
questions and its next call) on a fresh open of the run: each read the
median of three runs, the two steps that write (the judge's verdicts, the
breeder's next plan) once.

    python bench/archive.py                      # 100,000 candidates
    python bench/archive.py --candidates 2000    # small, for the tests
    python bench/archive.py --keep runs/big      # keep the run folder to look at

The last line reads `archive_100k slowest=S`: the slowest timing, in seconds
(the goal: every one under 1 s).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfprog.archive import ARCHIVE_FILE
from selfprog.breeder import Breeder
from selfprog.config import load_config
from selfprog.judge import Judge
from selfprog.population import Population
from selfprog.proposers import make_proposer
from selfprog.rundir import Run, create_run, open_run

CHILDREN = 250  # per generation: 400 generations for 100,000 candidates
PARENTS = 25  # drawn per generation, 10 children each
SEED_SCORES = (3.58, 3.62, 3.60)  # the noise floor: sd 0.02
FLOOR = 2.4  # the best val_bpb any program reaches
# (state, share, reason) of the children that did not end `ok`; the rest did
OUTCOMES = (
    ("invalid", 0.03, "no edits found: expected SEARCH/REPLACE blocks or a whole file"),
    ("duplicate", 0.05, ""),
    ("rejected", 0.005, "a fixed file was changed: evaluate.py"),
    ("train_failed", 0.02, "training exited with status 1"),
    ("timeout", 0.01, "training ran past its hard limit of 300 s"),
    ("over_budget", 0.005, "training still ran 20 s after its budget"),
    ("oom", 0.01, "out of memory (4g)"),
    ("eval_failed", 0.01, "the evaluation exited with status 1"),
    ("error", 0.002, "the harness failed on this candidate"),
)
LOG_BYTES = 4096
DIFF_BYTES = 2500
RESPONSE_BYTES = 1500


@dataclass
class Built:
    """What the bench needs to know about the archive it built."""

    candidates: int
    generations: int
    shown: int  # a failed candidate with a diff and a log tail, for `show`
    champion: int  # the latest accepted candidate, for `lineage`
    seconds: float
    megabytes: float


def _pool(lines: list[str], size: int) -> str:
    """Returns text of about `size` characters cycling through lines, for slices at any offset."""
    out, total, i = [], 0, 0
    while total < size:
        line = lines[i % len(lines)]
        out.append(line)
        total += len(line) + 1
        i += 1
    return "\n".join(out)


class Text:
    """Cheap, varied text of realistic shape: slices of long pools at random offsets."""

    def __init__(self, rng: random.Random, seed_files: dict[str, str]):
        self.rng = rng
        steps = [
            f"step {s:5d}  loss {2.1 + (s % 97) / 113:.4f}  lr {3e-4 * (1 - s / 4000):.2e}  "
            f"tok/s {41000 + (s * 37) % 9000}  {s * 0.0125:.2f}s"
            for s in range(2000)
        ]
        self.log = _pool(steps, 1 << 20)
        trace = [
            "Traceback (most recent call last):",
            '  File "/program/train.py", line 88, in <module>',
            "    logits, loss = model(x, y)",
            '  File "/program/model.py", line 131, in forward',
            "    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))",
            "RuntimeError: The size of tensor a (256) must match the size of tensor b (128) at non-singleton dimension 3",
        ]
        self.trace = "\n".join(trace)
        source = [line for text in seed_files.values() for line in text.splitlines()]
        hunks = [f"-{line}\n+{line.replace('= ', '= 2 * ', 1)}\n {line}" for line in source]
        self.diff = _pool(hunks, 1 << 20)
        blocks = [
            f"<<<<<<< SEARCH\n{a}\n=======\n{a.replace('= ', '= 2 * ', 1)}\n>>>>>>> REPLACE"
            for a in source
        ]
        self.response = _pool(blocks, 1 << 20)
        self.words = ["larger", "batch", "wider", "deeper", "lower", "learning", "rate", "warmup"]
        self.words += ["cosine", "decay", "dropout", "rotary", "embeddings", "tied", "weights"]

    def _slice(self, pool: str, size: int) -> str:
        start = self.rng.randrange(len(pool) - 2 * size)
        return pool[start : start + size + self.rng.randrange(size // 4)]

    def log_tail(self, failed: bool) -> str:
        tail = self._slice(self.log, LOG_BYTES - (600 if failed else 0))
        return tail + "\n" + self.trace if failed else tail

    def diff_of(self, path: str) -> str:
        return f"--- a/{path}\n+++ b/{path}\n@@ -12,7 +12,7 @@\n" + self._slice(
            self.diff, DIFF_BYTES
        )

    def answer(self) -> str:
        return self._slice(self.response, RESPONSE_BYTES)

    def rationale(self) -> str:
        return " ".join(self.rng.sample(self.words, 4)) + ": should lower val_bpb within the budget"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _insert(db: sqlite3.Connection, table: str, rows: list[dict[str, Any]]) -> None:
    if rows:
        names = list(rows[0])
        db.executemany(
            f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join(':' + n for n in names)})",
            rows,
        )
        rows.clear()


class Builder:
    """Writes a synthetic run's archive generation by generation, in one transaction."""

    def __init__(self, db: sqlite3.Connection, seed_files: dict[str, str], data_hash: str):
        self.db, self.seed_files, self.data_hash = db, seed_files, data_hash
        self.rng = random.Random(0)
        self.text = Text(self.rng, seed_files)
        self.clock = time.time() - 7 * 86400.0
        self.blobs: dict[str, bytes] = {}
        self.programs: dict[str, str] = {}  # hash -> manifest
        self.files_of: dict[int, dict[str, str]] = {}  # candidate -> {path: blob hash}
        self.program_of: dict[int, str] = {}
        self.score_of: dict[int, float] = {}
        self.ok_in: dict[int, list[int]] = {}  # generation -> its `ok` candidates
        self.rows: dict[str, list[dict[str, Any]]] = {
            t: [] for t in ("generations", "calls", "proposals", "candidates", "evaluations")
        }
        self.champion, self.champion_score = 1, 0.0
        self.shown = 0  # a recent failure, for `show`
        self.last_id = self.calls = 0

    def put(self, cid: int, files: dict[str, str]) -> str:
        """Returns the hash of a program given as {path: blob hash}, stored once."""
        phash = _sha(json.dumps(files, sort_keys=True).encode())  # as archive.program_hash
        self.programs.setdefault(phash, json.dumps(dict(sorted(files.items()))))
        self.files_of[cid], self.program_of[cid] = files, phash
        return phash

    def metrics(self, score: float | None, cid: int) -> str | None:
        if score is None:
            return None
        params = 2 ** (18 + cid % 5) + cid % 1000
        return json.dumps(
            {"val_bpb": score, "params": params, "context": 256, "tokens_per_second": 40000.0}
        )

    def candidate(self, cid: int, generation: int, state: str, **fields: Any) -> dict[str, Any]:
        finished = state not in ("invalid", "duplicate", "pending", "running")
        row = {
            "id": cid,
            "generation": generation,
            "parent_id": None,
            "proposal_id": None,
            "program_hash": None,
            "state": state,
            "score": None,
            "reason": "",
            "log_tail": self.text.log_tail(state != "ok") if finished else None,
            "timings": json.dumps({"train": 30.2, "evaluate": 4.1}) if finished else None,
            "data_hash": self.data_hash if finished else None,
            "diff": "",
            "rationale": self.text.rationale(),
            "duplicate_of": None,
            "attempts": int(finished or state == "running"),
            "evals_needed": 1,
            "accepted": None,
            "created": self.clock,
            "started": self.clock + 1 if finished else None,
            "finished": self.clock + 40 if finished else None,
            "node": "",
        }
        row.update(fields)
        row["metrics"] = self.metrics(row["score"], cid)
        self.rows["candidates"].append(row)
        return row

    def evaluate(self, cid: int, index: int, state: str, score: float | None) -> None:
        self.rows["evaluations"].append(
            {
                "candidate_id": cid,
                "seed": index,
                "state": state,
                "score": score,
                "metrics": self.metrics(score, cid) or "{}",
                "data_hash": self.data_hash,
                "created": self.clock + 40 * (index + 1),
                "node": "",
            }
        )

    def seed(self) -> None:
        """The seed: generation 0, three evaluations (the noise floor), accepted."""
        manifest = {}
        for path, source in self.seed_files.items():
            data = source.encode()
            manifest[path] = digest = _sha(data)
            self.blobs[digest] = data
        mean = sum(SEED_SCORES) / len(SEED_SCORES)
        phash = self.put(1, manifest)
        self.candidate(
            1,
            0,
            "ok",
            program_hash=phash,
            score=mean,
            accepted=1,
            evals_needed=3,
            rationale="the seed program",
        )
        for i, score in enumerate(SEED_SCORES):
            self.evaluate(1, i, "ok", score)
        self.score_of[1], self.ok_in[0] = mean, [1]
        self.champion, self.champion_score, self.last_id = 1, mean, 1

    def generation(self, generation: int, n: int, last: bool, judged: bool) -> None:
        """One generation: its plan, its proposer calls and proposals, a child per proposal."""
        rng = self.rng
        pool = [c for g in range(max(0, generation - 3), generation) for c in self.ok_in[g]]
        good = sorted(pool, key=lambda c: self.score_of[c])[: max(1, len(pool) // 2)]
        parents = sorted({self.champion, *rng.sample(good, min(PARENTS - 1, len(good)))})
        shares = [
            CHILDREN // len(parents) + (i < CHILDREN % len(parents)) for i in range(len(parents))
        ]
        plan = list(zip(parents, shares, strict=True))
        self.rows["generations"].append(
            {"generation": generation, "parents": json.dumps(plan), "created": self.clock}
        )
        self.ok_in[generation] = []
        children: list[dict[str, Any]] = []
        for parent, k in plan:
            if self.last_id >= n:
                break
            self.calls += 1
            call = self.calls
            self.rows["calls"].append(
                {
                    "id": call,
                    "generation": generation,
                    "parent_id": parent,
                    "proposer": "openai",
                    "model": "qwen2.5-coder-7b",
                    "k": k,
                    "prompt_chars": 14000,
                    "tokens_in": 3800,
                    "tokens_out": 420 * k,
                    "latency": 21.5,
                    "created": self.clock,
                }
            )
            for slot in range(min(k, n - self.last_id)):
                children.append(self.child(generation, parent, call, slot, n, last, judged))
        scored = [c for c in children if c["state"] == "ok"]
        if scored and judged:  # its best-looking child was confirmed with two more evaluations
            best = min(scored, key=lambda c: c["score"])
            extra = [round(best["score"] + rng.gauss(0.0, 0.02), 4) for _ in range(2)]
            for i, score in enumerate(extra, start=1):
                self.evaluate(best["id"], i, "ok", score)
            mean = (best["score"] + sum(extra)) / 3
            accepted = int(mean < self.champion_score - 0.05)
            best.update(score=mean, evals_needed=3, accepted=accepted)
            self.score_of[best["id"]] = mean
            if accepted:
                self.champion, self.champion_score = best["id"], mean

    def child(
        self, generation: int, parent: int, call: int, slot: int, n: int, last: bool, judged: bool
    ) -> dict[str, Any]:
        rng, text = self.rng, self.text
        self.last_id = cid = self.last_id + 1
        self.clock += 9.0
        u, state, reason = rng.random(), "ok", ""
        for name, share, why in OUTCOMES:
            if u < share:
                state, reason = name, why
                break
            u -= share
        if last and n - cid < 5:  # the last few are still being scored
            state, reason = ("pending" if n - cid < 3 else "running"), ""
        self.rows["proposals"].append(
            {
                "id": cid - 1,
                "call_id": call,
                "slot": slot,
                "response": text.answer(),
                "rationale": text.rationale(),
                "tokens_out": 420,
                "error": "the endpoint answered 500" if state == "invalid" and slot == 0 else None,
                "finish": "stop" if slot % 7 else "length",
            }
        )
        fields: dict[str, Any] = {"parent_id": parent, "proposal_id": cid - 1}
        if state != "invalid":
            changed = ("model.py", "train.py")[cid % 2]
            fields["diff"] = text.diff_of(changed)
            if state == "duplicate":
                fields.update(program_hash=self.program_of[parent], duplicate_of=parent)
                reason = f"same program as candidate {parent}"
            else:
                source = self.seed_files[changed] + f"\n# candidate {cid}: {text.rationale()}\n"
                data = source.encode()
                self.blobs[digest := _sha(data)] = data
                fields["program_hash"] = self.put(cid, {**self.files_of[parent], changed: digest})
        if state == "ok":
            # mostly a little worse than the parent, down to a floor the run plateaus on
            step = self.score_of[parent] + rng.gauss(0.05, 0.04)
            fields["score"] = self.score_of[cid] = round(
                max(step, FLOOR + abs(rng.gauss(0.0, 0.03))), 4
            )
            self.ok_in[generation].append(cid)
        elif state not in ("invalid", "duplicate", "pending", "running", "rejected"):
            self.shown = cid
        row = self.candidate(
            cid, generation, state, reason=reason, accepted=0 if judged else None, **fields
        )
        if row["finished"] is not None:
            self.evaluate(cid, 0, state, row["score"])
        return row

    def flush(self) -> None:
        """Writes what was built since the last flush (all in the one open transaction)."""
        self.db.executemany("INSERT OR IGNORE INTO blobs VALUES (?, ?)", self.blobs.items())
        self.db.executemany("INSERT OR IGNORE INTO programs VALUES (?, ?)", self.programs.items())
        self.blobs.clear()
        self.programs.clear()
        for table, rows in self.rows.items():
            _insert(self.db, table, rows)


def build(run_dir: Path, n: int) -> Built:
    """Returns what it built: a run folder at run_dir whose archive holds n candidates."""
    start = time.perf_counter()
    generations = max(2, -(-(n - 1) // CHILDREN))
    overrides = [
        f"run.generations={generations + 10}",  # the breeder may plan the next generation
        f"run.population={CHILDREN}",
        f"run.max_candidates={10 * n}",  # so the breeder counts the candidates, as it must
        "runner.kind=local",
        "proposer.kind=mutate",
    ]
    run = create_run(run_dir, load_config(None, overrides))
    seed_files = {name: (run.target.root / name).read_text() for name in run.target.editable}
    data_hash = run.data.data_hash
    run.archive.close()

    db = sqlite3.connect(run_dir / ARCHIVE_FILE)
    db.execute("PRAGMA journal_mode=OFF")  # written once, in one go; the WAL is set back below
    db.execute("PRAGMA synchronous=OFF")
    builder = Builder(db, seed_files, data_hash)
    builder.seed()
    for generation in range(1, generations + 1):
        # the last generation but one is scored and not yet judged; the last is being scored
        builder.generation(generation, n, generation == generations, generation < generations - 1)
        builder.flush()
    builder.flush()
    db.execute("INSERT OR REPLACE INTO meta VALUES ('active_seconds', ?)", (str(4.5 * n),))
    db.commit()
    db.execute("PRAGMA journal_mode=WAL")
    db.close()
    assert builder.last_id == n
    megabytes = (run_dir / ARCHIVE_FILE).stat().st_size / 2**20
    return Built(
        n, generations, builder.shown, builder.champion, time.perf_counter() - start, megabytes
    )


def verb(*args: str) -> float:
    """Returns the wall time of one `selfprog` command in a fresh process; exits if it fails."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "selfprog", *args], capture_output=True, text=True, timeout=600
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"selfprog {' '.join(args)} failed: {done.stderr.strip()[-2000:]}")
    return wall


def step(run_dir: Path, work: Callable[[Run, Population, Judge, Breeder], Any]) -> float:
    """Returns the time one bookkeeping step takes on a fresh open of the run (as the driver's)."""
    run = open_run(run_dir)
    try:
        population = Population(run)
        judge = Judge(run, population, lambda event: None)
        proposer = make_proposer(run.config.proposer, run.target.base_model)
        breeder = Breeder(run, proposer, population, lambda event: None, lambda: "")
        start = time.perf_counter()
        work(run, population, judge, breeder)
        return time.perf_counter() - start
    finally:
        run.archive.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--candidates", type=int, default=100_000, help="candidates in the archive (100000)"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each read, their median reported (3)"
    )
    parser.add_argument("--keep", type=Path, help="build the run here and keep it")
    args = parser.parse_args()
    if args.candidates < 2 * CHILDREN:
        parser.error(f"--candidates must be at least {2 * CHILDREN} (two generations)")

    tmp = Path(tempfile.mkdtemp(prefix="selfprog-bench-archive-"))
    run_dir = args.keep or tmp / "run"
    try:
        built = build(run_dir, args.candidates)
        print(
            f"built {built.candidates} candidates over {built.generations} generations "
            f"in {built.seconds:.1f} s: {built.megabytes:.0f} MB",
            flush=True,
        )
        folder, seed = str(run_dir), 0
        generation = built.generations + 1
        verbs = {
            "selfprog status": ("status", folder),
            "selfprog top": ("top", folder),
            "selfprog show": ("show", folder, str(built.shown)),
            "selfprog lineage": ("lineage", folder, str(built.champion)),
            "selfprog report": ("report", folder, "-o", str(tmp / "report.html")),
        }
        timings = {
            name: statistics.median(verb(*argv) for _ in range(args.repeat))
            for name, argv in verbs.items()
        }
        reads: dict[str, Callable[[Run, Population, Judge, Breeder], Any]] = {
            "population.members": lambda r, p, j, b: p.members(),
            "population.noise": lambda r, p, j, b: p.noise(),
            "population.champion": lambda r, p, j, b: p.champion(),
            "population.can_select": lambda r, p, j, b: p.can_select(),
            "population.select": lambda r, p, j, b: p.select(generation),
            "archive.due_evaluations": lambda r, p, j, b: r.archive.due_evaluations(seed),
            "archive.generation_plan": lambda r, p, j, b: r.archive.generation_plan(generation - 1),
            "archive.has_call": lambda r, p, j, b: r.archive.has_call(generation - 1, 1),
            "archive.last_planned": lambda r, p, j, b: r.archive.last_planned(),
            "archive.best": lambda r, p, j, b: r.archive.best(True, 4),
            "archive.recent_failures": lambda r, p, j, b: r.archive.recent_failures(4),
            "breeder.closed_through": lambda r, p, j, b: b.closed_through(),
            "breeder.max_candidates": lambda r, p, j, b: b._trim_to_max(CHILDREN),
        }
        for name, work in reads.items():
            timings[name] = statistics.median(step(run_dir, work) for _ in range(args.repeat))
        # these write, so they run once: the judge decides the last generation but one, and the
        # breeder plans the next generation and builds its first call's prompt
        timings["judge.settle"] = step(run_dir, lambda r, p, j, b: j.settle(b.closed_through()))
        timings["breeder.next_call"] = step(run_dir, lambda r, p, j, b: b.next_call())
        for name, seconds in timings.items():
            print(f"{name:26s} {seconds:7.3f} s", flush=True)
        print(f"archive_100k slowest={max(timings.values()):.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
