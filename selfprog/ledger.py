"""The proposer's ledger in the archive: each generation's plan, each call and its proposals.

A part of `Archive` (which it is mixed into): what the breeder asked, of whom,
at what cost in tokens and money, and what came back, kept so that a resumed
run asks no call twice and limits on tokens and spend hold across restarts.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any


class Ledger:
    """The generations, calls and proposals tables, read and written through the archive's db."""

    db: sqlite3.Connection
    version: int

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError  # the archive's

    def generation_plan(self, generation: int) -> list[tuple[int, int]] | None:
        """Returns the (parent, children) pairs recorded for a generation, if it was planned."""
        row = self.db.execute(
            "SELECT parents FROM generations WHERE generation = ?", (generation,)
        ).fetchone()
        return None if row is None else [(int(p), int(k)) for p, k in json.loads(row[0])]

    def record_generation(self, generation: int, parents: Sequence[tuple[int, int]]) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO generations VALUES (?, ?, ?)",
                (generation, json.dumps(list(parents)), time.time()),
            )

    def has_call(self, generation: int, parent_id: int) -> bool:
        row = self.db.execute(
            "SELECT 1 FROM calls WHERE generation = ? AND parent_id = ?", (generation, parent_id)
        ).fetchone()
        return row is not None

    def record_call(
        self, db: sqlite3.Connection, generation: int, parent_id: int, **fields: Any
    ) -> int:
        cursor = db.execute(
            "INSERT INTO calls (generation, parent_id, proposer, model, k, prompt_chars, tokens_in, "
            "tokens_out, latency, created, cost) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                generation,
                parent_id,
                fields["proposer"],
                fields.get("model", ""),
                fields["k"],
                fields.get("prompt_chars", 0),
                fields.get("tokens_in", 0),
                fields.get("tokens_out", 0),
                fields.get("latency", 0.0),
                time.time(),
                fields.get("cost"),
            ),
        )
        return int(cursor.lastrowid or 0)

    def record_proposal(
        self,
        db: sqlite3.Connection,
        call_id: int,
        slot: int,
        response: str,
        rationale: str,
        tokens_out: int,
        error: str,
        finish: str = "",
        model: str = "",
    ) -> int:
        cursor = db.execute(
            "INSERT INTO proposals (call_id, slot, response, rationale, tokens_out, error, "
            "finish, model) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (call_id, slot, response, rationale, tokens_out, error, finish or None, model or None),
        )
        return int(cursor.lastrowid or 0)

    def one_failure(self, n: int, calls: int) -> str:
        """Returns the reason every child of the latest `calls` proposer calls shares, when they
        are n or more and no child ever held a program (each failed before training, the same
        way), else "". A proposer that raised is not counted (its own breaker judges it)."""
        trained = self.db.execute(
            "SELECT 1 FROM candidates WHERE generation > 0 AND program_hash IS NOT NULL LIMIT 1"
        ).fetchone()
        if trained:
            return ""
        rows = self.db.execute(
            "SELECT c.reason, p.call_id FROM candidates c JOIN proposals p ON p.id = c.proposal_id "
            "WHERE p.call_id IN (SELECT id FROM calls ORDER BY id DESC LIMIT ?)",
            (calls,),
        ).fetchall()
        reasons = {str(reason) for reason, _ in rows}
        if len(rows) < n or len(reasons) != 1 or len({call for _, call in rows}) < calls:
            return ""
        reason = reasons.pop()
        return "" if reason.startswith("the proposer failed: the proposer raised") else reason

    def payoff(self, minimize: bool) -> dict[str, tuple[int, int]]:
        """Returns, per source of children ("tune" or "lm"), how many were judged and how many
        of those scored better than their parent (mean scores; invalid ones count as losses)."""
        if self.version < 8:
            return {}
        rows = self.db.execute(
            "SELECT p.model, c.state, c.score, parent.score FROM candidates c "
            "JOIN proposals p ON p.id = c.proposal_id "
            "JOIN candidates parent ON parent.id = c.parent_id "
            "WHERE c.state NOT IN ('pending', 'running', 'duplicate')"
        )
        tally: dict[str, tuple[int, int]] = {}
        for model, state, score, parent in rows:
            source = "tune" if str(model or "").startswith("tune") else "lm"
            won = (
                state == "ok"
                and score is not None
                and parent is not None
                and (score < parent if minimize else score > parent)
            )
            judged, wins = tally.get(source, (0, 0))
            tally[source] = (judged + 1, wins + int(won))
        return tally

    def cost_used(self) -> float:
        """Returns the proposer's estimated spend so far (priced calls only), in the prices' unit."""
        if self.version < 4:  # a reader of an older archive: nothing was priced
            return 0.0
        row = self.db.execute("SELECT COALESCE(SUM(cost), 0) FROM calls").fetchone()
        return float(row[0])

    def tokens_used(self) -> int:
        row = self.db.execute(
            "SELECT COALESCE(SUM(tokens_in + tokens_out), 0) FROM calls"
        ).fetchone()
        return int(row[0])
