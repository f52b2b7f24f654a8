"""Programs by their settings, in the archive: each program's family and its settings' values.

A part of `Archive` (which it is mixed into). Every stored program gets one
row: its family (what it is apart from its settings) and the value of each
setting, so a numeric proposer reads a family's history as a table (values,
state, score per candidate) instead of parsing every program again.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Mapping
from contextlib import AbstractContextManager

from selfprog import settings
from selfprog.settings import Trial

log = logging.getLogger(__name__)

SETTINGS_SINCE = 8  # a reader of an older, unmigrated archive has no settings table


class Families:
    """The program_settings table: a family and the settings' values per program."""

    db: sqlite3.Connection
    version: int

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError  # the archive's

    def family_of(self, program_hash: str) -> str:
        """Returns a stored program's family ("" for one stored before families were kept)."""
        if self.version < SETTINGS_SINCE:
            return ""
        row = self.db.execute(
            "SELECT family FROM program_settings WHERE program_hash = ?", (program_hash,)
        ).fetchone()
        return "" if row is None else str(row[0])

    def family_history(self, family: str) -> list[Trial]:
        """Returns the family's candidates that were or will be trained, oldest first."""
        if self.version < SETTINGS_SINCE:
            return []
        rows = self.db.execute(
            "SELECT c.id, c.state, c.score, s.settings FROM candidates c "
            "JOIN program_settings s ON s.program_hash = c.program_hash "
            "WHERE s.family = ? AND c.state NOT IN ('duplicate', 'invalid', 'rejected') "
            "ORDER BY c.id",
            (family,),
        )
        return [
            Trial(int(cid), str(state), None if score is None else float(score), json.loads(vals))
            for cid, state, score, vals in rows
        ]


def record_settings(db: sqlite3.Connection, phash: str, files: Mapping[str, str]) -> None:
    """Stores a program's family and settings inside a transaction (once per program)."""
    if db.execute("SELECT 1 FROM program_settings WHERE program_hash = ?", (phash,)).fetchone():
        return
    try:
        family, values = settings.summary(files)
    except Exception:  # a hostile program the parser chokes on: a family of its own, no settings
        log.warning("could not read the settings of program %s", phash[:12], exc_info=True)
        family, values = f"unread-{phash[:16]}", {}
    db.execute(
        "INSERT INTO program_settings (program_hash, family, settings) VALUES (?, ?, ?)",
        (phash, family, json.dumps(values)),
    )
