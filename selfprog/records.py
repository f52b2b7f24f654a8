"""The archive's records: a candidate's row, a summary of it, and the content address of a program.

What one row of the archive is, as the rest of selfprog reads it; the
archive (selfprog/archive.py) asks SQLite the questions that return them.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Candidate:
    """One row of the candidates table."""

    id: int
    generation: int
    parent_id: int | None
    proposal_id: int | None
    program_hash: str | None
    state: str
    score: float | None
    metrics: dict[str, Any]
    reason: str
    log_tail: str
    timings: dict[str, float]
    rationale: str
    diff: str
    duplicate_of: int | None
    attempts: int
    evals_needed: int
    accepted: bool | None  # better than the best before it, clear of the noise (None: undecided)
    node: str = ""  # where it was scored (the host, or the cluster node)


@dataclass(frozen=True, slots=True)
class Summary:
    """A candidate's id, state and score: what plotting a whole run reads of each."""

    id: int
    state: str
    score: float | None


def content_hash(data: bytes) -> str:
    """Returns the content address of bytes."""
    return hashlib.sha256(data).hexdigest()


def program_hash(files: Mapping[str, str]) -> str:
    """Returns the content address of a program (its files and their names)."""
    manifest = {path: content_hash(text.encode()) for path, text in sorted(files.items())}
    return content_hash(json.dumps(manifest, sort_keys=True).encode())


def program_key(files: Mapping[str, str]) -> str:
    """Returns what makes two programs the same program, for duplicates: each Python file's
    syntax tree (`3.0e-4` and `3e-4` are one number, a comment or a blank line is nothing),
    any other file's text. Trees are Python's own, so a resume under another Python may
    miss a duplicate of an older candidate, never invent one."""
    manifest = {}
    for path, text in sorted(files.items()):
        try:
            tree = ast.dump(ast.parse(text)) if path.endswith(".py") else text
        except (SyntaxError, ValueError):
            tree = text
        manifest[path] = content_hash(tree.encode())
    return content_hash(json.dumps(manifest, sort_keys=True).encode())


def read_program(db: sqlite3.Connection, phash: str) -> dict[str, str] | None:
    """Returns a stored program's files by its hash, or None if the archive has no such program."""
    row = db.execute("SELECT files FROM programs WHERE hash = ?", (phash,)).fetchone()
    if row is None:
        return None
    files = {}
    for path, digest in json.loads(row[0]).items():
        blob = db.execute("SELECT content FROM blobs WHERE hash = ?", (digest,)).fetchone()
        files[path] = bytes(blob[0]).decode()
    return files


def insert_evaluation(
    db: sqlite3.Connection, candidate_id: int, result: Any, seed: int, node: str
) -> None:
    db.execute(
        "INSERT INTO evaluations (candidate_id, seed, state, score, metrics, data_hash, created, "
        "node) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            candidate_id,
            seed,
            result.state.value,
            result.score,
            json.dumps(dict(result.metrics)),
            result.data_hash,
            time.time(),
            node,
        ),
    )


def candidate_of(row: sqlite3.Row) -> Candidate:
    return Candidate(
        id=row["id"],
        generation=row["generation"],
        parent_id=row["parent_id"],
        proposal_id=row["proposal_id"],
        program_hash=row["program_hash"],
        state=row["state"],
        score=row["score"],
        metrics=json.loads(row["metrics"]) if row["metrics"] else {},
        reason=row["reason"] or "",
        log_tail=row["log_tail"] or "",
        timings=json.loads(row["timings"]) if row["timings"] else {},
        rationale=row["rationale"] or "",
        diff=row["diff"] or "",
        duplicate_of=row["duplicate_of"],
        attempts=row["attempts"],
        evals_needed=row["evals_needed"],
        accepted=None if row["accepted"] is None else bool(row["accepted"]),
        node=(row["node"] or "") if "node" in row.keys() else "",  # noqa: SIM118 (a Row's `in` looks at values); schema 1, read-only
    )
