"""The archive's records: a candidate's row, a summary of it, and the content address of a program.

What one row of the archive is, as the rest of selfprog reads it; the
archive (selfprog/archive.py) asks SQLite the questions that return them.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_PARSING = threading.Lock()


def parse_python(source: str | bytes, filename: str = "<unknown>", **options: Any) -> ast.Module:
    """Returns ast.parse(source), one thread at a time.

    CPython 3.11 keeps the syntax tree builder's recursion count per
    interpreter, not per thread: two threads parsing at once can fail with
    "SystemError: AST constructor recursion depth mismatch" (gh-106905), and
    selfprog parses on the driver's, the proposer's and the scoring threads.
    """
    with _PARSING:
        return ast.parse(source, filename=filename, **options)


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
    accepted: bool | None  # better than the champion before it, or the final pick (None: undecided)
    node: str = ""  # where it was scored (the host, or the cluster node)
    origin: str = ""  # imported by a warm start: `RUN_ID#ID` in the run it came from


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


MAX_DEPTH = 100  # syntax trees this deep are keyed by their text: the same key at any stack depth
_CODING = re.compile(r"^[ \t\f]*#.*?coding[:=]", re.MULTILINE)


def file_key(path: str, text: str) -> str:
    """Returns what makes two versions of a file the same, for `program_key`.

    A Python file is its syntax tree with its type comments (TorchScript
    reads them), so `3.0e-4` and `3e-4` are one number and a comment or a
    blank line is nothing. A file with a coding cookie, or one Python
    cannot parse or dump (a syntax error, nesting too deep), is its text;
    so is any other file. A program that reads its own source or line
    numbers can tell two versions apart that this calls the same.
    """
    if path.endswith(".py") and not _CODING.search("\n".join(text.split("\n", 2)[:2])):
        try:
            tree = parse_python(text, type_comments=True)
            if _depth(tree) <= MAX_DEPTH:  # dumping recurses: deeper would depend on the stack
                return content_hash(ast.dump(tree).encode())
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            pass
    return content_hash(b"text:" + text.encode())


def _depth(tree: ast.AST) -> int:
    """Returns how deeply a syntax tree nests, walked without recursion."""
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest


def program_key(files: Mapping[str, str]) -> str:
    """Returns what makes two programs the same program, for duplicates: each file's
    `file_key`. Trees are Python's own, so a resume under another Python may miss a
    duplicate of an older candidate, never invent one."""
    return key_of({path: file_key(path, text) for path, text in files.items()})


def key_of(file_keys: Mapping[str, str]) -> str:
    """Returns a program's key from its files' keys."""
    return content_hash(json.dumps(dict(sorted(file_keys.items())), sort_keys=True).encode())


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
        "node, timings, curve) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            candidate_id,
            seed,
            result.state.value,
            result.score,
            json.dumps(dict(result.metrics)),
            result.data_hash,
            time.time(),
            node,
            json.dumps(dict(result.timings)),
            json.dumps([list(p) for p in result.curve]) if result.curve else None,
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
        origin=(row["origin"] or "") if "origin" in row.keys() else "",  # noqa: SIM118 (as above); schema < 9
    )
