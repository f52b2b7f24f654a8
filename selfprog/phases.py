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
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass

PHASES_SINCE = 6  # the schema version that records phases


@dataclass(frozen=True, slots=True)
class Running:
    """A candidate that is being scored: its first evaluation, or a repeat of an `ok` one."""

    candidate: int
    phase: str  # "train", "evaluate", or "" (not reported yet, or by no one)
    since: float  # when the phase began (or the candidate's start, with no phase)
    node: str


class Phases:
    """The candidates table's phase columns, read and written through the archive's db."""

    db: sqlite3.Connection
    version: int

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError  # the archive's

    def set_phase(self, candidate_id: int, phase: str, since: float | None = None) -> None:
        """Records that a job of this candidate began a phase (or ended, with phase "")."""
        when = None if not phase else since or time.time()
        with self.transaction() as db:
            db.execute(
                "UPDATE candidates SET phase = ?, phase_started = ? WHERE id = ?",
                (phase or None, when, candidate_id),
            )

    def clear_phases(self) -> None:
        """Forgets every phase: a driver that starts finds none of its own running yet."""
        with self.transaction() as db:
            db.execute("UPDATE candidates SET phase = NULL, phase_started = NULL")

    def in_flight(self) -> list[Running]:
        """Returns the candidates running now (as the archive says: a dead driver's too)."""
        if self.version < PHASES_SINCE:  # a reader of an older, unmigrated archive
            query = "SELECT id, NULL, started, node FROM candidates WHERE state = 'running'"
        else:
            query = (
                "SELECT id, phase, COALESCE(phase_started, started), node FROM candidates "
                "WHERE state = 'running' OR phase IS NOT NULL ORDER BY id"
            )
        return [
            Running(int(c), str(phase or ""), float(since or 0.0), str(node or ""))
            for c, phase, since, node in self.db.execute(query)
        ]
