"""Read-only questions about runs: the best candidates, one candidate in full, lineage, all runs.

Everything here reads the archive opened read-only, so it is safe while a
driver writes the run, and it never changes anything.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selfprog.archive import ARCHIVE_FILE, Archive, ArchiveError
from selfprog.curves import load_curve
from selfprog.errors import SelfprogError
from selfprog.records import Candidate
from selfprog.rundir import Run
from selfprog.schema import CURVES_SINCE
from selfprog.untrusted import one_line as one_line  # where the inspect verbs find it


def evaluations(archive: Archive, candidate_id: int) -> list[dict[str, Any]]:
    """Returns every evaluation of a candidate, oldest first, each with its training curve
    ([fraction, loss] pairs; empty where its training reported none)."""
    curve = "curve" if archive.version >= CURVES_SINCE else "NULL"
    rows = archive.db.execute(
        f"SELECT seed, state, score, metrics, data_hash, created, {curve} FROM evaluations "
        "WHERE candidate_id = ? ORDER BY id",
        (candidate_id,),
    )
    return [
        {
            "seed": seed,
            "state": state,
            "score": score,
            "metrics": json.loads(metrics or "{}"),
            "data_hash": data_hash,
            "created": created,
            "curve": [list(point) for point in load_curve(points)],
        }
        for seed, state, score, metrics, data_hash, created, points in rows
    ]


def progress_counts(archive: Archive) -> list[Any]:
    """Returns what changes whenever a progress plot would: the candidates, the last finish,
    the accepted ones and the evaluations."""
    return list(
        archive.db.execute(
            "SELECT COUNT(*), MAX(finished), SUM(accepted = 1), "
            "(SELECT COUNT(*) FROM evaluations) FROM candidates"
        ).fetchone()
    )


def lm_answer(archive: Archive, proposal_id: int) -> tuple[str, str] | None:
    """Returns the LM's whole answer for a proposal and the error it had ("" when none)."""
    row = archive.db.execute(
        "SELECT response, error FROM proposals WHERE id = ?", (proposal_id,)
    ).fetchone()
    return None if row is None else (row[0] or "", row[1] or "")


def times(archive: Archive, candidate_id: int) -> tuple[float | None, float | None]:
    """Returns when a candidate was created and when it finished, in epoch seconds (None:
    not yet)."""
    row = archive.db.execute(
        "SELECT created, finished FROM candidates WHERE id = ?", (candidate_id,)
    ).fetchone()
    return (None, None) if row is None else (row[0], row[1])


def last_finished(archive: Archive) -> float | None:
    """Returns when the run's last candidate finished, in epoch seconds (None: none has)."""
    return archive.db.execute("SELECT MAX(finished) FROM candidates").fetchone()[0]


def spread(archive: Archive, candidate_id: int) -> tuple[int, float | None]:
    """Returns how many scored evaluations a candidate has and their standard deviation."""
    scores = [e["score"] for e in evaluations(archive, candidate_id) if e["score"] is not None]
    return len(scores), statistics.stdev(scores) if len(scores) > 1 else None


def top(run: Run, n: int, states: Sequence[str]) -> list[dict[str, Any]]:
    """Returns the best n candidates in the given states (scored ones by score, then the rest)."""
    rows = []
    for c in run.archive.ranked(states, n, run.target.minimize):
        count, sd = spread(run.archive, c.id)
        rows.append(
            {
                "id": c.id,
                "score": c.score,
                "spread": sd,
                "evaluations": count,
                "generation": c.generation,
                "parent": c.parent_id,
                "state": c.state,
                "params": c.metrics.get("params"),
                "rationale": c.rationale,
            }
        )
    return rows


def show(run: Run, candidate_id: int) -> dict[str, Any]:
    """Returns everything the archive knows about one candidate."""
    c = run.archive.candidate(candidate_id)
    call = run.archive.db.execute(
        "SELECT calls.proposer, calls.model, calls.k, calls.prompt_chars, calls.tokens_in, "
        "calls.tokens_out, calls.latency, proposals.slot FROM proposals JOIN calls "
        "ON proposals.call_id = calls.id WHERE proposals.id = ?",
        (c.proposal_id,),
    ).fetchone()
    proposer = None
    if call is not None:
        keys = (
            "proposer",
            "model",
            "k",
            "prompt_chars",
            "tokens_in",
            "tokens_out",
            "latency",
            "slot",
        )
        proposer = dict(zip(keys, call, strict=True))
        if run.archive.version >= 3:  # why the model stopped: "length" is an answer cut short
            row = run.archive.db.execute(
                "SELECT finish FROM proposals WHERE id = ?", (c.proposal_id,)
            ).fetchone()
            proposer["finish"] = row[0] or ""
        if run.archive.version >= 4:  # the call's estimated cost, where priced
            row = run.archive.db.execute(
                "SELECT calls.cost FROM proposals JOIN calls ON proposals.call_id = calls.id "
                "WHERE proposals.id = ?",
                (c.proposal_id,),
            ).fetchone()
            proposer["cost"] = row[0]
    created = run.archive.db.execute(
        "SELECT created FROM candidates WHERE id = ?", (c.id,)
    ).fetchone()[0]
    steered = [  # the run's config as it was when this candidate was bred
        {"time": when, "key": key, "old": old, "new": new}
        for when, key, old, new in run.archive.changes()
        if when <= created
    ]
    return {
        "id": c.id,
        "generation": c.generation,
        "parent": c.parent_id,
        "state": c.state,
        "score": c.score,
        "metric": run.target.metric,
        "metrics": c.metrics,
        "evaluations": evaluations(run.archive, c.id),
        "timings": c.timings,
        "attempts": c.attempts,
        "proposer": proposer,
        "rationale": c.rationale,
        "reason": c.reason,
        "duplicate_of": c.duplicate_of,
        "program_hash": c.program_hash,
        "diff": c.diff,
        "log_tail": c.log_tail,
        "steered": steered,
    }


def lineage(run: Run, candidate_id: int) -> list[dict[str, Any]]:
    """Returns the chain from the seed to a candidate: each step's score change and proposer model."""
    chain: list[Candidate] = []
    current: int | None = candidate_id
    while current is not None:
        c = run.archive.candidate(current)
        chain.append(c)
        current = c.parent_id
    rows, previous = [], None
    for c in reversed(chain):
        change: float | None = None if c.score is None or previous is None else c.score - previous
        model = run.archive.db.execute(
            "SELECT calls.model FROM proposals JOIN calls ON proposals.call_id = calls.id "
            "WHERE proposals.id = ?",
            (c.proposal_id,),
        ).fetchone()
        rows.append(
            {
                "id": c.id,
                "generation": c.generation,
                "state": c.state,
                "score": c.score,
                "change": change,
                "proposed_by": model[0] if model else "",  # self mode: which weights proposed it
                "rationale": c.rationale,
            }
        )
        previous = c.score if c.score is not None else previous
    return rows


def source(run: Run, candidate_id: int) -> dict[str, str]:
    """Returns a candidate's whole program: its editable files and the target's fixed ones."""
    c = run.archive.candidate(candidate_id)
    if c.program_hash is None:
        raise SelfprogError(f"candidate {candidate_id} has no program ({c.state}: {c.reason})")
    files = run.archive.program(c.program_hash)
    files.update({name: (run.target.root / name).read_text() for name in run.target.fixed})
    return files


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_runs(root: Path) -> list[dict[str, Any]]:
    """Returns a summary of every run folder directly under root, the latest activity first."""
    from selfprog.rundir import lock_holder, open_run

    if not root.is_dir():
        raise SelfprogError(f"{root}: no such folder")
    rows: list[dict[str, Any]] = []
    for folder in sorted(p for p in root.iterdir() if (p / ARCHIVE_FILE).is_file()):
        try:
            run = open_run(folder, readonly=True)
        except SelfprogError as exc:
            rows.append({"run": folder.name, "state": "unreadable", "reason": str(exc)})
            continue
        counts = run.archive.counts()
        best = run.archive.best(run.target.minimize, 1, accepted=True)
        last = run.archive.db.execute(
            "SELECT MAX(COALESCE(finished, started, created)) FROM candidates"
        ).fetchone()[0]
        unfinished = counts.get("pending", 0) + counts.get("running", 0)
        generations = run.archive.db.execute("SELECT COUNT(*) FROM generations").fetchone()[0]
        if lock_holder(folder) is not None:
            state = "running"
        elif unfinished or generations < run.config.run.generations:
            state = "stopped"
        else:
            state = "finished"
        rows.append(
            {
                "run": folder.name,
                "state": state,
                "target": run.target.name,
                "candidates": sum(counts.values()),
                "best": best[0].score if best else None,
                "size_mb": round(_folder_bytes(folder) / 2**20, 1),
                "last_activity": time.strftime("%Y-%m-%d %H:%M", time.localtime(last))
                if last
                else "",
            }
        )
        run.archive.close()
    return sorted(rows, key=lambda r: r.get("last_activity", ""), reverse=True)


def check_id(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ArchiveError(
            f"{text!r} is not a candidate id (a number, as `selfprog top` shows)"
        ) from None


def headline(run: Run) -> tuple[float | None, Candidate | None, float | None]:
    """Returns the seed's score, the champion (the best accepted candidate), and its change from
    the seed in percent (None where there is none yet)."""
    seed = run.archive.seed()
    champion = run.archive.best(run.target.minimize, 1, accepted=True)
    seed_score = seed.score if seed else None
    best = champion[0] if champion else None
    change = None
    if seed_score and best is not None and best.score is not None:
        change = (best.score - seed_score) / abs(seed_score) * 100
    return seed_score, best, change
