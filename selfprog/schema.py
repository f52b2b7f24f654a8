"""The archive's SQLite schema, its version, and the migration from older versions."""

from __future__ import annotations

import json
import sqlite3

from selfprog.records import file_key, key_of

# 2: nodes; 3: steering, finish reasons; 4: each call's estimated cost; 5: programs by meaning;
# 6: the jobs running now, each in its phase; 7: each evaluation's phase times;
# 8: each program's family and settings, each proposal's model; 9: where an imported candidate
# came from (a warm start); 10: each evaluation's training curve
SCHEMA_VERSION = 10
EVALUATION_TIMINGS_SINCE = 7  # a reader of an older, unmigrated archive has none
ORIGINS_SINCE = 9
CURVES_SINCE = 10

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE blobs (hash TEXT PRIMARY KEY, content BLOB NOT NULL);
CREATE TABLE programs (hash TEXT PRIMARY KEY, files TEXT NOT NULL);
CREATE TABLE generations (
    generation INTEGER PRIMARY KEY, parents TEXT NOT NULL, created REAL NOT NULL
);
CREATE TABLE calls (
    id INTEGER PRIMARY KEY, generation INTEGER NOT NULL, parent_id INTEGER NOT NULL,
    proposer TEXT NOT NULL, model TEXT, k INTEGER NOT NULL, prompt_chars INTEGER,
    tokens_in INTEGER NOT NULL DEFAULT 0, tokens_out INTEGER NOT NULL DEFAULT 0,
    latency REAL, created REAL NOT NULL, cost REAL,
    UNIQUE (generation, parent_id)
);
CREATE TABLE proposals (
    id INTEGER PRIMARY KEY, call_id INTEGER NOT NULL REFERENCES calls(id), slot INTEGER NOT NULL,
    response TEXT NOT NULL, rationale TEXT, tokens_out INTEGER, error TEXT, finish TEXT, model TEXT,
    UNIQUE (call_id, slot)
);
CREATE TABLE candidates (
    id INTEGER PRIMARY KEY, generation INTEGER NOT NULL, parent_id INTEGER REFERENCES candidates(id),
    proposal_id INTEGER UNIQUE REFERENCES proposals(id), program_hash TEXT, program_key TEXT,
    state TEXT NOT NULL,
    score REAL, metrics TEXT, reason TEXT, log_tail TEXT, timings TEXT, data_hash TEXT,
    diff TEXT, rationale TEXT, duplicate_of INTEGER, attempts INTEGER NOT NULL DEFAULT 0,
    evals_needed INTEGER NOT NULL DEFAULT 1, accepted INTEGER,
    created REAL NOT NULL, started REAL, finished REAL, node TEXT, origin TEXT
);
CREATE TABLE evaluations (
    id INTEGER PRIMARY KEY, candidate_id INTEGER NOT NULL REFERENCES candidates(id),
    seed INTEGER NOT NULL, state TEXT NOT NULL, score REAL, metrics TEXT, data_hash TEXT,
    created REAL NOT NULL, node TEXT, timings TEXT, curve TEXT
);
CREATE TABLE jobs (
    candidate_id INTEGER NOT NULL, evaluation INTEGER NOT NULL, phase TEXT NOT NULL,
    since REAL NOT NULL, PRIMARY KEY (candidate_id, evaluation)
);
CREATE TABLE changes (
    id INTEGER PRIMARY KEY, created REAL NOT NULL, key TEXT NOT NULL, old TEXT, new TEXT NOT NULL
);
CREATE TABLE program_settings (
    program_hash TEXT PRIMARY KEY, family TEXT NOT NULL, settings TEXT NOT NULL
);
CREATE INDEX program_settings_by_family ON program_settings(family);
CREATE INDEX candidates_by_state ON candidates(state);
CREATE INDEX candidates_by_program ON candidates(program_hash);
CREATE INDEX evaluations_by_candidate ON evaluations(candidate_id);
"""

# Indexes are no part of the format: every selfprog reads an archive with or without them, and
# a writer adds those missing when it opens one, so an archive of any version gains them.
# Each answers a question the driver asks all the time without reading a candidate's texts.
INDEXES = {
    "candidates_by_generation": "candidates(generation)",  # a generation's candidates, the latest
    "candidates_by_parent": "candidates(parent_id)",  # children counts
    "candidates_by_score": "candidates(state, score)",  # the best; every candidate's state and score
    "candidates_by_verdict": "candidates(accepted, generation)",  # accepted ones; unjudged ones
    "candidates_confirming": "candidates(id) WHERE evals_needed > 1",  # evaluations still due
    "candidates_by_key": "candidates(program_key)",  # is a program new, by its meaning
}


def add_indexes(db: sqlite3.Connection) -> None:
    """Creates the indexes the archive lacks (a fresh one, or one an older selfprog wrote)."""
    present = {row[1] for row in db.execute("PRAGMA index_list(candidates)")}
    with db:
        for name, what in INDEXES.items():
            if name not in present:
                db.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {what}")


def migrate(db: sqlite3.Connection) -> None:
    """Brings an archive written by schema 1 to 9 to the current schema.

    Each step is checked before it is taken (sqlite commits ALTER TABLE at
    once), so a migration a crash cut short is finished by the next open.
    Schema 2 added the node each candidate and evaluation ran on; schema 3
    the changes made to a run's config mid-run, the finish reason of each
    proposal, and an index of evaluations by candidate; schema 4 each proposer
    call's estimated cost; schema 5 each candidate's `program_key`, filled in here
    from the stored programs; schema 6 the jobs running now, each in its phase (train
    or evaluate) and since when, for those who watch a run; schema 7 each evaluation's
    phase times (the seed's repeats measure the allowance of a seconds budget); schema 8
    each stored program's family and settings' values, filled in here from the programs, and
    the model (or numeric proposer) that wrote each proposal; schema 9 where a candidate
    imported by a warm start came from (`RUN_ID#ID`; NULL: the run's own); schema 10 each
    evaluation's training curve (what its training reported of its progress; NULL: none).
    """
    columns_added = (
        ("candidates", "node", "TEXT"),
        ("evaluations", "node", "TEXT"),
        ("proposals", "finish", "TEXT"),
        ("calls", "cost", "REAL"),
        ("candidates", "program_key", "TEXT"),
        ("evaluations", "timings", "TEXT"),
        ("proposals", "model", "TEXT"),
        ("candidates", "origin", "TEXT"),
        ("evaluations", "curve", "TEXT"),
    )
    for table, column, kind in columns_added:
        columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if column not in columns:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    with db:
        db.execute(
            "CREATE TABLE IF NOT EXISTS changes (id INTEGER PRIMARY KEY, created REAL NOT NULL, "
            "key TEXT NOT NULL, old TEXT, new TEXT NOT NULL)"
        )
        db.execute(
            "CREATE INDEX IF NOT EXISTS evaluations_by_candidate ON evaluations(candidate_id)"
        )
        db.execute(
            "CREATE TABLE IF NOT EXISTS jobs (candidate_id INTEGER NOT NULL, evaluation INTEGER "
            "NOT NULL, phase TEXT NOT NULL, since REAL NOT NULL, "
            "PRIMARY KEY (candidate_id, evaluation))"
        )
        db.execute(
            "CREATE TABLE IF NOT EXISTS program_settings (program_hash TEXT PRIMARY KEY, "
            "family TEXT NOT NULL, settings TEXT NOT NULL)"
        )
        db.execute(
            "CREATE INDEX IF NOT EXISTS program_settings_by_family ON program_settings(family)"
        )
        _fill_program_keys(db)
        _fill_settings(db)
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))


def _fill_program_keys(db: sqlite3.Connection) -> None:
    """Gives each candidate of an older archive its `program_key` (each stored file read once)."""
    unkeyed = db.execute(
        "SELECT DISTINCT program_hash FROM candidates "
        "WHERE program_hash IS NOT NULL AND program_key IS NULL"
    ).fetchall()
    known: dict[tuple[str, str], str] = {}  # (path, blob) -> file key: most files are shared
    for (phash,) in unkeyed:
        row = db.execute("SELECT files FROM programs WHERE hash = ?", (phash,)).fetchone()
        if row is None:
            continue
        keys = {}
        for path, digest in json.loads(row[0]).items():
            if (path, digest) not in known:
                blob = db.execute("SELECT content FROM blobs WHERE hash = ?", (digest,)).fetchone()
                known[path, digest] = file_key(path, bytes(blob[0]).decode())
            keys[path] = known[path, digest]
        db.execute(
            "UPDATE candidates SET program_key = ? WHERE program_hash = ?", (key_of(keys), phash)
        )


def _fill_settings(db: sqlite3.Connection) -> None:
    """Gives each program of an older archive its family and settings' values."""
    from selfprog.families import record_settings
    from selfprog.records import read_program

    unread = db.execute(
        "SELECT hash FROM programs WHERE hash NOT IN (SELECT program_hash FROM program_settings)"
    ).fetchall()
    for (phash,) in unread:
        files = read_program(db, phash)
        if files is not None:
            record_settings(db, phash, files)
