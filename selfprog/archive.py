"""The archive: one SQLite file per run holding every candidate, proposal and evaluation.

WAL mode lets any number of readers inspect a run while its one driver writes.
Sources are content-addressed: a file is stored once however many candidates
share it, and a program is identified by the hash of its files.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from selfprog.curves import Point, load_curve
from selfprog.errors import SelfprogError
from selfprog.families import Families, record_settings
from selfprog.ledger import Ledger
from selfprog.phases import Phases
from selfprog.records import (
    Candidate,
    Summary,
    candidate_of,
    content_hash,
    insert_evaluation,
    program_hash,
    read_program,
)
from selfprog.schema import (
    CURVES_SINCE,
    EVALUATION_TIMINGS_SINCE,
    ORIGINS_SINCE,
    SCHEMA,
    SCHEMA_VERSION,
    add_indexes,
    migrate,
)
from selfprog.states import FAILED, UNFINISHED, State

ARCHIVE_FILE = "archive.sqlite"
PENDING, RUNNING, DUPLICATE = State.PENDING.value, State.RUNNING.value, State.DUPLICATE.value
CHUNK = 500  # ids per `IN (...)` query, well under SQLite's limit on bound parameters


class ArchiveError(SelfprogError):
    """The archive is missing, foreign, or from a newer selfprog."""


def _chunks(ids: Iterable[int]) -> Iterator[tuple[list[int], str]]:
    """Yields the distinct ids in order, CHUNK at a time, each with its `?, ?, ...` placeholders."""
    chosen = sorted(set(ids))
    for start in range(0, len(chosen), CHUNK):
        part = chosen[start : start + CHUNK]
        yield part, ", ".join("?" * len(part))


class Archive(Ledger, Phases, Families):
    """A run's archive. Writers are the one driver; readers open it with readonly=True."""

    def __init__(self, path: Path, readonly: bool = False):
        self.path = path
        if not path.is_file():
            raise ArchiveError(f"{path.parent}: not a selfprog run (no {path.name})")
        quoted = urllib.parse.quote(str(path.resolve()))  # a '#' or '?' in a folder name is a path
        uri = f"file:{quoted}?mode=ro" if readonly else f"file:{quoted}"
        try:
            # a reader gives up soon on a locked file; the driver waits longer for its turn
            timeout = 2 if readonly else 30
            self.db = sqlite3.connect(uri, uri=True, timeout=timeout, check_same_thread=False)
            self.db.row_factory = sqlite3.Row
            version = int(self.meta("schema_version") or 0)
        except (sqlite3.DatabaseError, ValueError) as exc:
            raise ArchiveError(f"{path}: not a selfprog archive ({exc})") from None
        if 1 <= version < SCHEMA_VERSION and not readonly:
            migrate(self.db)
            version = SCHEMA_VERSION
        self.version = version  # a reader may read an older schema, unmigrated
        if version > SCHEMA_VERSION:
            raise ArchiveError(
                f"{path}: archive schema {version} is newer than this selfprog's ({SCHEMA_VERSION}); "
                "upgrade selfprog to read it"
            )
        if version < 1:
            raise ArchiveError(f"{path}: not a selfprog archive (no schema version)")
        if not readonly:
            add_indexes(self.db)

    @classmethod
    def create(cls, path: Path, meta: Mapping[str, str]) -> Archive:
        """Returns a new, empty archive at path."""
        if path.exists():
            raise ArchiveError(f"{path}: an archive already exists here")
        # written aside and renamed whole: a reader (`status` at the very start) never
        # finds a file without its schema
        partial = path.with_name(path.name + ".partial")
        partial.unlink(missing_ok=True)
        db = sqlite3.connect(partial)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            add_indexes(db)
            rows = {"schema_version": str(SCHEMA_VERSION), "created": str(time.time()), **meta}
            db.executemany("INSERT INTO meta VALUES (?, ?)", rows.items())
            db.commit()
        finally:
            db.close()
        os.replace(partial, path)
        return cls(path)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Commits everything in the block at once, or nothing."""
        with self.db:
            yield self.db

    # -- meta ---------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def record_changes(self, changes: Sequence[tuple[str, str, str]]) -> None:
        """Records changes made to the run's config mid-run (`resume --set`): (key, old, new)."""
        now = time.time()
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO changes (created, key, old, new) VALUES (?, ?, ?, ?)",
                [(now, key, old, new) for key, old, new in changes],
            )

    def changes(self) -> list[tuple[float, str, str, str]]:
        """Returns the changes made to the run's config mid-run: (time, key, old, new), oldest first."""
        try:
            rows = self.db.execute("SELECT created, key, old, new FROM changes ORDER BY id")
        except sqlite3.OperationalError:  # schema 2, read-only: no changes table yet
            return []
        return [(float(t), str(k), str(o or ""), str(n)) for t, k, o, n in rows]

    # -- sources ------------------------------------------------------------

    def put_program(self, db: sqlite3.Connection, files: Mapping[str, str]) -> str:
        """Stores a program's files (each once) inside a transaction; returns its hash."""
        manifest = {}
        for path, text in sorted(files.items()):
            data = text.encode()
            manifest[path] = digest = content_hash(data)
            db.execute("INSERT OR IGNORE INTO blobs VALUES (?, ?)", (digest, data))
        phash = program_hash(files)
        db.execute("INSERT OR IGNORE INTO programs VALUES (?, ?)", (phash, json.dumps(manifest)))
        record_settings(db, phash, files)
        return phash

    def program(self, phash: str) -> dict[str, str]:
        files = read_program(self.db, phash)
        if files is None:
            raise ArchiveError(f"program {phash[:12]} is not in the archive")
        return files

    # -- candidates ---------------------------------------------------------

    def add_candidate(self, db: sqlite3.Connection, **fields: Any) -> int:
        """Inserts a candidate inside a transaction; returns its id."""
        columns = [
            "generation",
            "parent_id",
            "proposal_id",
            "program_hash",
            "program_key",
            "state",
            "reason",
            "diff",
            "rationale",
            "duplicate_of",
            "origin",
            "accepted",
            "evals_needed",
            "created",
        ]
        values = [fields.get(c) for c in columns[:-2]] + [
            fields.get("evals_needed", 1),
            fields.get("created", time.time()),
        ]
        cursor = db.execute(
            f"INSERT INTO candidates ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
            values,
        )
        return int(cursor.lastrowid or 0)

    def find_program(self, key: str) -> int | None:
        """Returns the first candidate holding the same program (by `program_key`), if any."""
        row = self.db.execute(
            "SELECT id FROM candidates WHERE program_key = ? AND state != ? ORDER BY id LIMIT 1",
            (key, DUPLICATE),
        ).fetchone()
        return None if row is None else int(row[0])

    def mark_running(self, candidate_id: int, node: str = "") -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE candidates SET state = ?, started = ?, attempts = attempts + 1, node = ? "
                "WHERE id = ?",
                (RUNNING, time.time(), node, candidate_id),
            )

    def set_node(self, candidate_id: int, node: str) -> None:
        """Records where a running candidate was placed (a cluster knows only once it starts)."""
        with self.transaction() as db:
            db.execute("UPDATE candidates SET node = ? WHERE id = ?", (node, candidate_id))

    def mark_pending(self, candidate_ids: Sequence[int], attempt: bool = False) -> None:
        """Puts candidates stopped on purpose back in the queue; that start was no attempt.

        `attempts` thus counts the starts that never ended: a driver (or node)
        that died while the candidate ran, or (attempt=True) an outage the
        candidate may have caused.
        """
        given_back = 0 if attempt else 1
        with self.transaction() as db:
            db.executemany(
                "UPDATE candidates SET state = ?, started = NULL, node = NULL, "
                "attempts = MAX(attempts - ?, 0) WHERE id = ?",
                [(PENDING, given_back, i) for i in candidate_ids],
            )

    def finish(self, candidate_id: int, result: Any, seed: int, node: str = "") -> None:
        """Records a candidate's final result and its evaluation, at once."""
        metrics = json.dumps(dict(result.metrics))
        with self.transaction() as db:
            db.execute(
                "UPDATE candidates SET state = ?, score = ?, metrics = ?, reason = ?, log_tail = ?, "
                "timings = ?, data_hash = ?, finished = ?, node = ? WHERE id = ?",
                (
                    result.state.value,
                    result.score,
                    metrics,
                    result.reason,
                    result.log_tail,
                    json.dumps(dict(result.timings)),
                    result.data_hash,
                    time.time(),
                    node,
                    candidate_id,
                ),
            )
            insert_evaluation(db, candidate_id, result, seed, node)

    def add_evaluation(self, candidate_id: int, result: Any, seed: int, node: str = "") -> None:
        """Records one more evaluation; the candidate's score becomes the mean of its `ok` ones."""
        with self.transaction() as db:
            insert_evaluation(db, candidate_id, result, seed, node)
            db.execute(
                "UPDATE candidates SET score = (SELECT AVG(score) FROM evaluations "
                "WHERE candidate_id = ? AND state = 'ok') WHERE id = ?",
                (candidate_id, candidate_id),
            )

    def scores(self, candidate_id: int) -> list[float]:
        """Returns the scores of a candidate's `ok` evaluations, oldest first."""
        rows = self.db.execute(
            "SELECT score FROM evaluations WHERE candidate_id = ? AND state = 'ok' ORDER BY id",
            (candidate_id,),
        )
        return [float(r[0]) for r in rows]

    def ok_timings(self, candidate_id: int) -> list[dict[str, float]]:
        """Returns the phase times of a candidate's `ok` evaluations (its first evaluation's, kept
        on the candidate, where an older selfprog recorded none)."""
        kept: list[str | None] = [None]
        if self.version >= EVALUATION_TIMINGS_SINCE:
            rows = self.db.execute(
                "SELECT timings FROM evaluations WHERE candidate_id = ? AND state = 'ok' "
                "ORDER BY id",
                (candidate_id,),
            )
            kept = [r[0] for r in rows] or [None]
        found = [json.loads(text) for text in kept if text]
        if len(found) < len(kept):
            candidate = self.candidate(candidate_id)
            found += [candidate.timings] if candidate.state == State.OK.value else []
        return found

    def curves(self, candidate_id: int) -> list[list[Point]]:
        """Returns the training curves of a candidate's `ok` evaluations that reported one,
        oldest first."""
        if self.version < CURVES_SINCE:
            return []
        rows = self.db.execute(
            "SELECT curve FROM evaluations WHERE candidate_id = ? AND state = 'ok' "
            "AND curve IS NOT NULL ORDER BY id",
            (candidate_id,),
        )
        return [curve for curve in (load_curve(r[0]) for r in rows) if curve]

    def evaluation_count(self, candidate_id: int) -> int:
        """Returns how many evaluations of a candidate are recorded, whatever their state."""
        row = self.db.execute(
            "SELECT COUNT(*) FROM evaluations WHERE candidate_id = ?", (candidate_id,)
        ).fetchone()
        return int(row[0])

    def sandbox_seconds(self) -> float:
        """Returns the time this run's own evaluations spent in sandboxes, training and
        evaluating (an imported candidate's were another run's)."""
        if self.version < EVALUATION_TIMINGS_SINCE:
            return 0.0
        own = "WHERE c.origin IS NULL" if self.version >= ORIGINS_SINCE else ""
        row = self.db.execute(
            "SELECT SUM(COALESCE(json_extract(e.timings, '$.train'), 0) + "
            "COALESCE(json_extract(e.timings, '$.evaluate'), 0)) FROM evaluations e "
            f"JOIN candidates c ON c.id = e.candidate_id {own}"
        ).fetchone()
        return float(row[0] or 0.0)

    def first_curve(self, candidate_id: int) -> list[Point]:
        """Returns the training curve of a candidate's first evaluation, whatever its state."""
        if self.version < CURVES_SINCE:
            return []
        row = self.db.execute(
            "SELECT curve FROM evaluations WHERE candidate_id = ? ORDER BY id LIMIT 1",
            (candidate_id,),
        ).fetchone()
        return load_curve(row[0]) if row else []

    def repeated_scores(self) -> dict[int, list[float]]:
        """Returns the `ok` scores of every candidate with more than one, oldest first: the noise's sample."""
        rows = self.db.execute(
            "SELECT candidate_id, score FROM evaluations WHERE state = 'ok' AND candidate_id IN "
            "(SELECT candidate_id FROM evaluations WHERE state = 'ok' "
            "GROUP BY candidate_id HAVING COUNT(*) > 1) ORDER BY candidate_id, id"
        )
        repeats: dict[int, list[float]] = {}
        for candidate_id, score in rows:
            repeats.setdefault(int(candidate_id), []).append(float(score))
        return repeats

    def set_evals_needed(self, candidate_id: int, n: int) -> None:
        with self.transaction() as db:
            db.execute("UPDATE candidates SET evals_needed = ? WHERE id = ?", (n, candidate_id))

    def evaluated_at_least(self, n: int) -> set[int]:
        """Returns the candidates with n or more evaluations asked for (recorded or not)."""
        rows = self.db.execute("SELECT id FROM candidates WHERE evals_needed >= ?", (n,))
        return {row[0] for row in rows}

    def set_accepted(self, candidate_id: int, accepted: bool) -> None:
        self.set_accepted_many({candidate_id: accepted})

    def set_accepted_many(self, decisions: Mapping[int, bool]) -> None:
        """Records whether each candidate was accepted, all in one transaction."""
        with self.transaction() as db:
            db.executemany(
                "UPDATE candidates SET accepted = ? WHERE id = ?",
                [(int(accepted), i) for i, accepted in decisions.items()],
            )

    def children_counts(self) -> dict[int, int]:
        rows = self.db.execute(
            "SELECT parent_id, COUNT(*) FROM candidates WHERE parent_id IS NOT NULL GROUP BY parent_id"
        )
        return {int(p): int(n) for p, n in rows}

    # -- named questions ------------------------------------------------------

    def _select(self, where: str = "", args: Sequence[Any] = (), limit: int = 0) -> list[Candidate]:
        query = "SELECT * FROM candidates" + (f" WHERE {where}" if where else "") + " ORDER BY id"
        query += f" LIMIT {int(limit)}" if limit else ""
        return [candidate_of(row) for row in self.db.execute(query, args)]

    def candidates(self, ids: Iterable[int] | None = None) -> list[Candidate]:
        """Returns every candidate (or those with these ids), in id order.

        Every row carries its diff and log tail: for counts, scores and states
        at scale, ask count(), summaries() or scores_of() instead.
        """
        if ids is None:
            return self._select()
        return [c for part, marks in _chunks(ids) for c in self._select(f"id IN ({marks})", part)]

    def count(self, imported: bool = True) -> int:
        """Returns how many candidates the archive holds (its own only, without imported)."""
        only = "" if imported else " WHERE origin IS NULL"
        return int(self.db.execute(f"SELECT COUNT(*) FROM candidates{only}").fetchone()[0])

    def last_generation(self) -> int:
        """Returns the latest generation that has a candidate (0 if none)."""
        row = self.db.execute("SELECT MAX(generation) FROM candidates").fetchone()
        return int(row[0] or 0)

    def summaries(self, *states: str) -> list[Summary]:
        """Returns every candidate (or those in any of these states) as a Summary, in id order."""
        where = f" WHERE state IN ({', '.join('?' * len(states))})" if states else ""
        cursor = self.db.cursor()
        cursor.row_factory = None  # plain tuples, which sort fast
        # unordered, since an index holds all three: no candidate's texts are read
        rows = cursor.execute(f"SELECT id, state, score FROM candidates{where}", states).fetchall()
        rows.sort()
        return [Summary(*row) for row in rows]

    def scored_metrics(self, keys: Sequence[str]) -> dict[int, dict[str, Any]]:
        """Returns these metrics of every candidate that ended `ok` (those it reported), by id."""
        values = "".join(", json_extract(metrics, ?)" for _ in keys)  # no key: the index alone
        rows = self.db.execute(
            f"SELECT id{values} FROM candidates WHERE state = ? ORDER BY id",
            (*(f'$."{key}"' for key in keys), State.OK.value),
        )
        return {
            int(row[0]): {k: v for k, v in zip(keys, row[1:], strict=True) if v is not None}
            for row in rows
        }

    def scores_of(self, ids: Iterable[int] | None = None) -> dict[int, list[float]]:
        """Returns the scores of the `ok` evaluations of every candidate (or of these), oldest first.

        A candidate with no `ok` evaluation has no entry.
        """
        query = "SELECT candidate_id, score FROM evaluations WHERE state = 'ok'"
        if ids is None:
            rows = list(self.db.execute(query + " ORDER BY id"))
        else:
            rows = []
            for part, marks in _chunks(ids):
                rows += self.db.execute(f"{query} AND candidate_id IN ({marks}) ORDER BY id", part)
        scores: dict[int, list[float]] = {}
        for candidate_id, score in rows:
            scores.setdefault(int(candidate_id), []).append(float(score))
        return scores

    def lineages(self, ids: Iterable[int]) -> set[int]:
        """Returns these candidates and all their ancestors, back to the seed."""
        found: set[int] = set()
        for part, marks in _chunks(ids):
            rows = self.db.execute(
                f"WITH RECURSIVE line(id) AS (SELECT id FROM candidates WHERE id IN ({marks}) "
                "UNION SELECT candidates.parent_id FROM candidates JOIN line "
                "ON candidates.id = line.id WHERE candidates.parent_id IS NOT NULL) "
                "SELECT id FROM line",
                part,
            )
            found.update(int(r[0]) for r in rows)
        return found

    def revision(self) -> tuple[int, int]:
        """Returns a value that changes whenever the archive does: an answer read from the
        archive may be kept for as long as this stays the same.

        It changes with every row this connection writes and every commit by another.
        """
        other = self.db.execute("PRAGMA data_version").fetchone()[0]
        return self.db.total_changes, int(other)

    def candidate(self, candidate_id: int) -> Candidate:
        found = self._select("id = ?", (candidate_id,))
        if not found:
            raise ArchiveError(f"no candidate {candidate_id} in this run")
        return found[0]

    def seed(self) -> Candidate | None:
        """Returns the seed program's candidate (generation 0), if recorded."""
        found = self._select("generation = 0", limit=1)
        return found[0] if found else None

    def in_states(self, *states: str) -> list[Candidate]:
        """Returns the candidates in any of these states, in id order."""
        return self._select(f"state IN ({', '.join('?' * len(states))})", states)

    def in_generation(self, generation: int) -> list[Candidate]:
        return self._select("generation = ?", (generation,))

    def scored(self) -> list[Candidate]:
        """Returns the candidates that ended `ok`."""
        return self.in_states(State.OK.value)

    def running(self) -> list[Candidate]:
        return self.in_states(RUNNING)

    def unfinished(self) -> list[Candidate]:
        return self.in_states(*UNFINISHED)

    def accepted(self) -> list[Candidate]:
        """Returns the accepted candidates (each beat the champion before it, or was picked at the end), in id order."""
        return self._select("accepted = 1")

    def accepted_ids(self) -> list[int]:
        rows = self.db.execute("SELECT id FROM candidates WHERE accepted = 1 ORDER BY id")
        return [int(r[0]) for r in rows]

    def unjudged_generations(self) -> list[int]:
        """Returns the generations that have candidates not yet judged, oldest first."""
        rows = self.db.execute(
            "SELECT DISTINCT generation FROM candidates WHERE accepted IS NULL ORDER BY generation"
        )
        return [int(r[0]) for r in rows]

    def last_planned(self) -> int:
        """Returns the latest generation whose parents are recorded (0 if none)."""
        row = self.db.execute("SELECT MAX(generation) FROM generations").fetchone()
        return int(row[0] or 0)

    def due_evaluations(self, base_seed: int) -> list[tuple[Candidate, int]]:
        """Returns the evaluations due, in id order: (candidate, evaluation index).

        A candidate's first evaluation decides its state; more are due only
        once it ended `ok`. An index already recorded (seed = base_seed +
        index) is never due again.
        """
        due = [(c, 0) for c in self.unfinished()]
        recorded: dict[int, set[int]] = {}
        needed: dict[int, int] = {}
        # one query for all, through the index of the few confirming (`+` keeps it off the
        # state index); only those with an evaluation missing are then read whole
        rows = self.db.execute(
            "SELECT candidates.id, candidates.evals_needed, evaluations.seed FROM candidates "
            "LEFT JOIN evaluations ON evaluations.candidate_id = candidates.id "
            "WHERE +candidates.state = 'ok' AND candidates.evals_needed > 1"
        )
        for candidate_id, n, seed in rows:
            needed[candidate_id] = n
            if seed is not None:
                recorded.setdefault(candidate_id, set()).add(int(seed) - base_seed)
        missing = {
            i: [k for k in range(1, n) if k not in recorded.get(i, set())]
            for i, n in needed.items()
        }
        for c in self.candidates(i for i, indexes in missing.items() if indexes):
            due += [(c, k) for k in missing[c.id]]
        return sorted(due, key=lambda job: (job[0].id, job[1]))

    def recent_failures(self, n: int) -> list[Candidate]:
        """Returns the n latest candidates that ended in a failure state, latest first."""
        rows = self.db.execute(
            f"SELECT * FROM candidates WHERE state IN ({', '.join('?' * len(FAILED))}) "
            "ORDER BY id DESC LIMIT ?",
            (*FAILED, n),
        )
        return [candidate_of(row) for row in rows]

    def counts(self) -> dict[str, int]:
        rows = self.db.execute("SELECT state, COUNT(*) FROM candidates GROUP BY state")
        return {str(state): int(n) for state, n in rows}

    def ranked(self, states: Sequence[str], n: int, minimize: bool) -> list[Candidate]:
        """Returns the first n candidates in these states: the scored ones best first (earlier
        first among equals), then the unscored ones in id order."""
        order = "ASC" if minimize else "DESC"
        rows = self.db.execute(  # ids first: only the n rows chosen are read whole
            f"SELECT id FROM candidates WHERE state IN ({', '.join('?' * len(states))}) "
            f"ORDER BY score IS NULL, score {order}, id LIMIT ?",
            (*states, n),
        )
        ids = [int(r[0]) for r in rows]
        found = {c.id: c for c in self.candidates(ids)}
        return [found[i] for i in ids]

    def best(self, minimize: bool, n: int = 1, accepted: bool = False) -> list[Candidate]:
        """Returns the n best scored candidates (only accepted ones if asked), earlier first among equals."""
        order = "ASC" if minimize else "DESC"
        only = " AND accepted = 1" if accepted else ""
        rows = self.db.execute(
            f"SELECT * FROM candidates WHERE state = 'ok'{only} ORDER BY score {order}, id LIMIT ?",
            (n,),
        )
        return [candidate_of(row) for row in rows]
