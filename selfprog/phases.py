"""What runs now, in the archive: each job's phase (train or evaluate) and since when.

A part of `Archive` (which it is mixed into). The driver writes a job's phase
as its scheduler reports it and clears it when the job ends, so that anyone
who watches the run (`selfprog status --follow`, the dashboard) sees the same
running candidates the driver's own panel shows. A scheduler that reports no
phases (a Ray cluster) leaves them empty: the candidate shows as running,
since it started.
"""

from __future__ import annotations

import sqlite3
from contextlib import AbstractContextManager
from dataclasses import dataclass

PHASES_SINCE = 6  # the schema version that records phases


@dataclass(frozen=True, slots=True)
class Running:
    """A job being scored: a candidate's first evaluation (0), or a repeat of an `ok` one."""

    candidate: int
    evaluation: int
    phase: str  # "train", "evaluate", or "" (not reported yet, or by no one)
    since: float  # when the phase began (or the candidate's start, with no phase)
    node: str


class Phases:
    """The jobs table, read and written through the archive's db."""

    db: sqlite3.Connection
    version: int

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError  # the archive's

    def set_phase(self, candidate_id: int, evaluation: int, phase: str, since: float) -> None:
        """Records that a job began a phase."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?)",
                (candidate_id, evaluation, phase, since),
            )

    def end_job(self, candidate_id: int, evaluation: int) -> None:
        """Records that a job ended (however it ended)."""
        with self.transaction() as db:
            db.execute(
                "DELETE FROM jobs WHERE candidate_id = ? AND evaluation = ?",
                (candidate_id, evaluation),
            )

    def clear_phases(self) -> None:
        """Forgets every job: a driver that starts (or stops) has none running."""
        with self.transaction() as db:
            db.execute("DELETE FROM jobs")

    def in_flight(self) -> list[Running]:
        """Returns the jobs running now: those with a phase, and running candidates without one
        (a scheduler that reports no phases, or a dead driver's)."""
        untracked = "SELECT id, 0, NULL, started, node FROM candidates WHERE state = 'running'"
        if self.version >= PHASES_SINCE:  # else a reader of an older, unmigrated archive
            untracked = (
                "SELECT j.candidate_id, j.evaluation, j.phase, j.since, c.node FROM jobs j "
                "JOIN candidates c ON c.id = j.candidate_id UNION ALL "
                f"{untracked} AND id NOT IN (SELECT candidate_id FROM jobs WHERE evaluation = 0)"
            )
        rows = self.db.execute(f"{untracked} ORDER BY 1, 2")
        return [
            Running(int(c), int(i), str(phase or ""), float(since or 0.0), str(node or ""))
            for c, i, phase, since, node in rows
        ]
