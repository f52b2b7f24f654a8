"""Warm start: an earlier run's evaluated candidates as the history of a new run of the same target.

`selfprog run --warm-start OLD_RUN` copies every candidate of OLD_RUN that was
trained (scored `ok`, or failed while training or evaluating) into the new
run's archive, with its program, every evaluation and its lineage, marked with
where it came from (`origin`, `RUN_ID#ID`). They are generation 0 beside the
new seed and already judged: OLD_RUN's champion is accepted, so it is the
champion the new run's children must beat; the rest are not. So selection
draws parents from them, the numeric proposer's study holds their settings
and scores, a child that repeats one of their programs is a `duplicate`, and
the LM's prompt shows what was tried. The new seed is still evaluated first:
it measures the children's time ceilings on this machine. Imported
evaluations keep their place among a candidate's seeds (the evaluation that
was OLD_RUN's first is this run's first), so none is asked for twice.

OLD_RUN is hostile input like any archive: only the target's editable files
are taken from its programs, only known columns are copied, and whatever
cannot be read is refused with one line; it is only read, in one snapshot
(it may be running).

Scores are comparable only when they mean the same thing, so OLD_RUN must be
a run of the same target (the same files, other than the editable ones), the
same prepared data (its hash) and the same training budget; anything else is
refused with one line before the new run is made (the data, once prepared).
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from selfprog.breeder import add_seed
from selfprog.config import Config
from selfprog.errors import SelfprogError
from selfprog.records import program_key
from selfprog.rundir import TARGET_DIR, TARGET_FILE, Run, open_run
from selfprog.states import State
from selfprog.target import Target

# trained, so their scores (or failures) say something about the program
TRAINED = (
    State.OK.value,
    State.TRAIN_FAILED.value,
    State.TIMEOUT.value,
    State.OVER_BUDGET.value,
    State.OOM.value,
    State.EVAL_FAILED.value,
    State.PRUNED.value,
)
COPIED = (  # a candidate's own columns, as they were
    "state",
    "score",
    "metrics",
    "reason",
    "log_tail",
    "timings",
    "data_hash",
    "diff",
    "rationale",
    "created",
    "started",
    "finished",
    "node",
)
EVALUATION_COLUMNS = (
    "state",
    "score",
    "metrics",
    "data_hash",
    "created",
    "node",
    "timings",
    "curve",
)


def open_earlier(folder: Path, config: Config, target: Target) -> Run:
    """Returns the earlier run to warm-start from, read-only, once it fits the new run.

    Raises:
        SelfprogError: not a run, or a run of another target, or trained to another budget.
    """
    try:
        old = open_run(folder, readonly=True)
    except SelfprogError as exc:
        raise SelfprogError(f"--warm-start: {exc}") from None
    try:
        where = f"--warm-start {folder}"
        if old.target.name != target.name:
            raise SelfprogError(
                f"{where}: that run improved {old.target.name}, not {target.name}; a warm start "
                "takes a run of the same target"
            )
        for name in sorted({*target.fixed, *old.target.fixed, TARGET_FILE}):
            ours, theirs = target.root / name, folder / TARGET_DIR / name
            if (
                not (ours.is_file() and theirs.is_file())
                or ours.read_bytes() != theirs.read_bytes()
            ):
                raise SelfprogError(
                    f"{where}: {name} differs from that run's copy, so its scores would not mean "
                    "the same; a warm start takes a run of the same target"
                )
        if old.config.budget != config.budget:
            raise SelfprogError(
                f"{where}: that run trained each candidate to {_budget(old.config)}, this one "
                f"to {_budget(config)}; scores to another budget are not comparable"
            )
    except BaseException:
        old.archive.close()
        raise
    return old


def _budget(config: Config) -> str:
    b = config.budget
    parts = [f"{b.seconds:g} s" if b.seconds else "", f"{b.steps} steps" if b.steps else ""]
    return " and ".join(p for p in parts if p) or "the target's own budget"


def start_warm(run: Run, old: Run) -> int:
    """Records the new run's seed and every trained candidate of the earlier run, in one
    transaction; returns how many were imported.

    Raises:
        SelfprogError: the earlier run's data differs (another prepared dataset), it holds
            nothing trained, or it cannot be read.
    """
    theirs, ours = old.archive.meta("data_hash"), run.archive.meta("data_hash")
    if theirs != ours:
        raise SelfprogError(
            f"--warm-start {old.root}: that run's data (hash {str(theirs)[:12]}) differs from this "
            f"one's ({str(ours)[:12]}); scores on other data are not comparable"
        )
    try:
        old.archive.db.execute("BEGIN")  # one snapshot of a run that may be running
        imported = _copy(run, old)
    except (sqlite3.Error, ValueError, TypeError, KeyError, UnicodeError) as exc:
        raise SelfprogError(f"--warm-start {old.root}: cannot read that run ({exc})") from None
    finally:
        old.archive.db.rollback()
    run.archive.set_meta("warm_start", json.dumps({"run": str(old.root), "run_id": _run_id(old)}))
    return imported


def _run_id(old: Run) -> str:
    return old.archive.meta("run_id") or old.root.name


def _copy(run: Run, old: Run) -> int:
    """Copies the earlier run's trained candidates, with the new seed first; returns how many."""
    candidates = old.archive.in_states(*TRAINED)
    if not candidates:
        raise SelfprogError(
            f"--warm-start {old.root}: that run has no trained candidate to start from"
        )
    best = old.archive.best(old.target.minimize, 1, accepted=True)
    champion = best[0].id if best else None
    rows = {r["id"]: r for r in _rows(old, "candidates", "id", [c.id for c in candidates])}
    evaluations = _rows(old, "evaluations", "candidate_id", list(rows))
    counts = Counter(e["candidate_id"] for e in evaluations)
    shift = run.config.run.seed - old.config.run.seed  # an evaluation's seed is its run's + index
    editable = set(run.target.editable)
    with run.archive.transaction() as db:
        add_seed(run, db)
        new_ids: dict[int, int] = {}
        for c in candidates:  # in id order: a parent before its children
            files = old.archive.program(c.program_hash or "")
            if set(files) != editable:
                odd = sorted(set(files) ^ editable)[0]
                raise SelfprogError(
                    f"--warm-start {old.root}: candidate {c.id} holds {odd!r} where the target's "
                    f"editable files are {', '.join(sorted(editable))}; not a run of this target"
                )
            row = rows[c.id]
            new_ids[c.id] = run.archive.add_candidate(
                db,
                generation=0,
                parent_id=new_ids.get(c.parent_id or 0),
                program_hash=run.archive.put_program(db, files),
                program_key=program_key(files),
                state=c.state,
                origin=f"{_run_id(old)}#{c.id}",
                accepted=int(c.id == champion),
                evals_needed=max(1, counts[c.id]),
            )
            present = [k for k in COPIED if k in row.keys()]  # noqa: SIM118 (a Row's `in` looks at values)
            db.execute(
                f"UPDATE candidates SET {', '.join(f'{k} = ?' for k in present)} WHERE id = ?",
                [row[k] for k in present] + [new_ids[c.id]],
            )
        for e in evaluations:
            keys = [k for k in EVALUATION_COLUMNS if k in e.keys()]  # noqa: SIM118 (as above)
            db.execute(
                f"INSERT INTO evaluations (candidate_id, seed, {', '.join(keys)}) "
                f"VALUES ({', '.join('?' * (len(keys) + 2))})",
                [new_ids[e["candidate_id"]], int(e["seed"]) + shift, *(e[k] for k in keys)],
            )
    return len(new_ids)


def _rows(run: Run, table: str, column: str, ids: Sequence[int]) -> list[sqlite3.Row]:
    """Returns a table's rows whose column is one of ids, in id order (SQLite's 999 limit kept)."""
    found: list[sqlite3.Row] = []
    for start in range(0, len(ids), 500):
        part = ids[start : start + 500]
        found += run.archive.db.execute(
            f"SELECT * FROM {table} WHERE {column} IN ({', '.join('?' * len(part))}) ORDER BY id",
            part,
        ).fetchall()
    return found
