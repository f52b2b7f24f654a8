"""The archive: content addressing, schema checks, readers beside a writer."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from selfprog.archive import Archive, ArchiveError
from selfprog.records import program_hash, program_key
from selfprog.schema import SCHEMA_VERSION
from selfprog.scoring import Result, State


def test_sources_are_stored_once_and_programs_found_by_hash(tmp_path: Path) -> None:
    archive = Archive.create(tmp_path / "a.sqlite", {"run_id": "r"})
    first = {"model.py": "x = 1\n", "train.py": "y = 2\n"}
    second = {"model.py": "x = 1\n", "train.py": "y = 3\n"}
    with archive.transaction() as db:
        h1 = archive.put_program(db, first)
        h2 = archive.put_program(db, second)
        archive.put_program(db, dict(first))
        c1 = archive.add_candidate(
            db, generation=0, program_hash=h1, program_key=program_key(first), state="pending"
        )
    assert archive.db.execute("SELECT COUNT(*) FROM blobs").fetchone()[0] == 3
    assert archive.program(h2) == second and h1 == program_hash(first) != h2
    assert archive.find_program(program_key(first)) == c1
    assert archive.find_program(program_key(second)) is None


def test_programs_are_the_same_by_meaning_and_an_older_archive_learns_it(tmp_path: Path) -> None:
    """`3.0e-4` for `3e-4`, or a comment, is the same program: a duplicate, not a candidate."""
    seed = {"train.py": "lr = 3e-4\nsteps = 10\n", "notes.txt": "a"}
    respelled = {"train.py": "lr = 3.0e-4  # the same\n\nsteps = 10\n", "notes.txt": "a"}
    assert program_hash(seed) != program_hash(respelled)
    assert program_key(seed) == program_key(respelled)
    for other in ({"train.py": "lr = 3e-3\nsteps = 10\n", "notes.txt": "a"},
                  {"train.py": "lr = 3e-4\nsteps = 10.0\n", "notes.txt": "a"},  # int to float
                  {"train.py": "lr = 3e-4\nsteps = 10\n", "notes.txt": "b"}):  # fmt: skip
        assert program_key(other) != program_key(seed), other
    path = tmp_path / "v4.sqlite"
    archive = Archive.create(path, {})
    with archive.transaction() as db:  # as schema 4 wrote it: no program_key
        phash = archive.put_program(db, seed)
        archive.add_candidate(db, generation=0, program_hash=phash, state="ok")
    archive.db.execute("DROP INDEX candidates_by_key")
    archive.db.execute("ALTER TABLE candidates DROP COLUMN program_key")
    archive.set_meta("schema_version", "4")
    archive.close()
    assert Archive(path, readonly=True).candidate(1).program_hash == phash
    migrated = Archive(path)
    assert migrated.meta("schema_version") == str(SCHEMA_VERSION)
    assert migrated.find_program(program_key(respelled)) == 1


def test_results_and_every_evaluation_are_kept(tmp_path: Path) -> None:
    archive = Archive.create(tmp_path / "a.sqlite", {})
    with archive.transaction() as db:
        cid = archive.add_candidate(db, generation=0, state="pending")
    archive.mark_running(cid)
    reader = Archive(tmp_path / "a.sqlite", readonly=True)
    assert reader.candidate(cid).state == "running"
    archive.finish(
        cid, Result(State.OK, score=3.1, metrics={"val_bpb": 3.1}, timings={"total": 9.0}), seed=0
    )
    assert reader.candidate(cid).score == 3.1 and reader.candidate(cid).attempts == 1
    assert reader.counts() == {"ok": 1}
    with pytest.raises(sqlite3.OperationalError):
        reader.set_meta("x", "y")  # readers cannot write
    with pytest.raises(ArchiveError, match="no candidate 99"):
        reader.candidate(99)


def test_each_evaluation_keeps_its_phase_times(tmp_path: Path) -> None:
    """The seed's repeats measure the allowance of a seconds budget: their times are kept."""
    archive = Archive.create(tmp_path / "a.sqlite", {})
    with archive.transaction() as db:
        cid = archive.add_candidate(db, generation=0, state="pending")
    archive.finish(cid, Result(State.OK, score=3.0, timings={"train": 12.0}), seed=0)
    archive.add_evaluation(cid, Result(State.OK, score=3.1, timings={"train": 11.0}), seed=1)
    archive.add_evaluation(cid, Result(State.TIMEOUT, timings={"train": 300.0}), seed=2)
    assert archive.ok_timings(cid) == [{"train": 12.0}, {"train": 11.0}]
    # an archive an older selfprog wrote kept the first evaluation's times on the candidate only
    archive.db.execute("UPDATE evaluations SET timings = NULL")
    assert archive.ok_timings(cid) == [{"train": 12.0}]


def test_foreign_newer_and_missing_archives(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="not a selfprog run"):
        Archive(tmp_path / "none.sqlite")
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(ArchiveError, match="not a selfprog archive"):
        Archive(tmp_path / "junk.sqlite")
    archive = Archive.create(tmp_path / "new.sqlite", {})
    archive.set_meta("schema_version", "99")
    with pytest.raises(ArchiveError, match="schema 99 is newer"):
        Archive(tmp_path / "new.sqlite")


def test_a_schema_1_archive_is_migrated_even_after_a_crash_midway(tmp_path: Path) -> None:
    from selfprog.schema import SCHEMA as _SCHEMA

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(_SCHEMA.replace(", node TEXT", ""))  # schema 1 had no node columns
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute("INSERT INTO candidates (generation, state, created) VALUES (0, 'ok', 0)")
    db.execute("ALTER TABLE candidates ADD COLUMN node TEXT")  # a migration cut short here
    db.commit()
    db.close()
    assert Archive(path, readonly=True).candidate(1).node == ""  # readers read it as it is
    archive = Archive(path)
    archive.finish(1, Result(State.OK, score=1.0), 0, node="n1")
    assert (
        archive.meta("schema_version") == str(SCHEMA_VERSION) and archive.candidate(1).node == "n1"
    )
    archive.record_changes([("run.generations", "4", "6")])  # schema 3 is there too
    archive.close()
    reopened = Archive(path)
    assert reopened.candidate(1).node == "n1"
    assert [c[1:] for c in reopened.changes()] == [("run.generations", "4", "6")]
    indexes = {row[1] for row in reopened.db.execute("PRAGMA index_list(evaluations)")}
    assert "evaluations_by_candidate" in indexes


def test_a_schema_2_archive_reads_without_changes_and_migrates(tmp_path: Path) -> None:
    from selfprog.schema import SCHEMA as _SCHEMA

    path = tmp_path / "v2.sqlite"
    db = sqlite3.connect(path)
    schema_2 = (
        _SCHEMA.split("CREATE TABLE changes")[0]
        .replace(", finish TEXT", "")
        .replace(", cost REAL", "")
    )
    db.executescript(schema_2)
    db.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    db.commit()
    db.close()
    assert Archive(path, readonly=True).changes() == []  # a reader of an unmigrated archive
    archive = Archive(path)
    assert archive.meta("schema_version") == str(SCHEMA_VERSION)
    with archive.transaction() as tx:
        call = archive.record_call(
            tx,
            1,
            1,
            proposer="p",
            model="",
            k=1,
            prompt_chars=0,
            tokens_in=0,
            tokens_out=0,
            latency=0.0,
        )
        archive.record_proposal(tx, call, 0, "text", "", 5, "", finish="length")
    assert archive.db.execute("SELECT finish FROM proposals").fetchone()[0] == "length"


def test_a_run_folder_named_with_uri_characters_works(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "run #1?mode=memory&x=%20"
    folder.mkdir()
    Archive.create(folder / "archive.sqlite", {"run_id": "r"}).close()
    for readonly in (False, True):
        archive = Archive(folder / "archive.sqlite", readonly=readonly)
        assert archive.meta("run_id") == "r"
        archive.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # no stray database


def _small_run(path: Path) -> Archive:
    """A seed with three evaluations, its children in every kind of state, and a grandchild."""
    archive = Archive.create(path, {})
    with archive.transaction() as db:
        seed = archive.add_candidate(db, generation=0, state="pending", evals_needed=3)
    for i, score in enumerate((3.0, 3.2, 3.1)):
        result = Result(State.OK, score=score, metrics={"params": 64, "context": 8})
        if i == 0:
            archive.finish(seed, result, seed=i)
        else:
            archive.add_evaluation(seed, result, seed=i)
    with archive.transaction() as db:
        ids = [
            archive.add_candidate(db, generation=1, parent_id=seed, state="pending")
            for _ in range(4)
        ]
        archive.add_candidate(db, generation=1, parent_id=seed, state="invalid", reason="junk")
    archive.finish(ids[0], Result(State.OK, score=2.9, metrics={"params": 32}), seed=0)
    archive.finish(ids[1], Result(State.OK, score=3.3), seed=0)
    archive.finish(ids[2], Result(State.TRAIN_FAILED, reason="boom", log_tail="x" * 5000), 0)
    with archive.transaction() as db:
        archive.add_candidate(db, generation=2, parent_id=ids[0], state="pending")
    return archive


def test_the_questions_asked_at_scale_agree_with_the_whole_rows(tmp_path: Path) -> None:
    archive = _small_run(tmp_path / "a.sqlite")
    rows = archive.candidates()
    assert archive.count() == len(rows) == 7
    assert archive.last_generation() == max(c.generation for c in rows) == 2
    assert [(s.id, s.state, s.score) for s in archive.summaries()] == [
        (c.id, c.state, c.score) for c in rows
    ]
    assert [s.id for s in archive.summaries("ok", "invalid")] == [1, 2, 3, 6]
    ok = [c for c in rows if c.state == "ok"]
    assert archive.scores_of() == {c.id: archive.scores(c.id) for c in ok}
    assert archive.scores_of([1, 5, 99]) == {1: [3.0, 3.2, 3.1]}
    assert archive.scored_metrics(("params", "context")) == {
        1: {"params": 64, "context": 8},
        2: {"params": 32},
        3: {},
    }
    assert archive.scored_metrics(()) == {1: {}, 2: {}, 3: {}}
    assert [c.id for c in archive.candidates([7, 2, 2])] == [2, 7]
    assert archive.lineages([7]) == {7, 2, 1} and archive.lineages([]) == set()
    assert archive.children_counts() == {1: 5, 2: 1}
    # scored ones best first, then the rest in id order, as `selfprog top` lists them
    assert [c.id for c in archive.ranked(("ok", "train_failed"), 9, minimize=True)] == [2, 1, 3, 4]
    assert [c.id for c in archive.ranked(("ok",), 2, minimize=False)] == [3, 1]
    assert archive.ranked(("ok",), 1, minimize=True)[0] == archive.best(True)[0]


def test_due_evaluations_and_verdicts_in_bulk(tmp_path: Path) -> None:
    archive = _small_run(tmp_path / "a.sqlite")
    assert [(c.id, i) for c, i in archive.due_evaluations(0)] == [(5, 0), (7, 0)]
    archive.set_evals_needed(2, 3)
    archive.add_evaluation(2, Result(State.OK, score=2.95), seed=2)  # index 2 made it first
    due = archive.due_evaluations(0)
    assert [(c.id, i) for c, i in due] == [(2, 1), (5, 0), (7, 0)]
    assert due[0][0] == archive.candidate(2)  # the whole row, as before
    before = archive.revision()
    archive.set_accepted_many({1: True, 2: True, 3: False})
    assert archive.revision() != before
    assert archive.accepted_ids() == [1, 2] and archive.candidate(3).accepted is False
    assert archive.unjudged_generations() == [1, 2]
    reader = Archive(tmp_path / "a.sqlite", readonly=True)
    seen = reader.revision()
    assert reader.revision() == seen  # nothing changed in between
    archive.set_accepted(4, False)  # a commit by another connection
    assert reader.revision() != seen
    assert reader.seed() == archive.candidate(1)


def test_a_writer_adds_the_indexes_an_older_archive_lacks_and_a_reader_does_not(
    tmp_path: Path,
) -> None:
    from selfprog.schema import INDEXES

    path = tmp_path / "a.sqlite"
    _small_run(path).close()
    db = sqlite3.connect(path)
    for name in INDEXES:
        db.execute(f"DROP INDEX {name}")
    db.commit()
    db.close()

    def indexes() -> set[str]:
        with sqlite3.connect(path) as db:
            return {row[1] for row in db.execute("PRAGMA index_list(candidates)")}

    reader = Archive(path, readonly=True)
    assert [c.id for c in reader.ranked(("ok",), 3, True)] == [2, 1, 3]  # slower, as right
    assert not set(INDEXES) & indexes()
    Archive(path).close()
    assert set(INDEXES) <= indexes()


def test_the_key_tells_apart_what_the_tree_alone_would_not(tmp_path: Path) -> None:
    """Type comments (TorchScript reads them), a coding cookie, and a program too deep to dump."""
    typed = "def f(x):\n    # type: (float) -> float\n    return x\n"
    assert program_key({"m.py": typed}) != program_key({"m.py": typed.replace("float", "Tensor")})
    latin = "# -*- coding: latin-1 -*-\nx = 1\n"
    assert program_key({"m.py": latin}) != program_key({"m.py": latin.replace("latin-1", "utf-8")})
    deep = "x = " + " + ".join(["1"] * 1500) + "\n"
    assert program_key({"m.py": deep}) != program_key({"m.py": deep + "# a comment\n"})
    archive = Archive.create(tmp_path / "a.sqlite", {})
    with archive.transaction() as db:  # as schema 4 wrote it, with a program too deep to dump
        phash = archive.put_program(db, {"m.py": deep})
        archive.add_candidate(db, generation=0, program_hash=phash, state="ok")
    archive.set_meta("schema_version", "4")
    archive.close()
    assert Archive(tmp_path / "a.sqlite").find_program(program_key({"m.py": deep})) == 1


def test_a_reader_never_sees_an_archive_half_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`status` at the instant a run starts found a file with no schema version yet."""
    import selfprog.archive

    path = tmp_path / "a.sqlite"
    seen = []

    def while_writing(db: sqlite3.Connection) -> None:
        seen.append(path.exists())

    monkeypatch.setattr(selfprog.archive, "add_indexes", while_writing)
    Archive.create(path, {}).close()
    assert seen[0] is False  # while its tables were made (then the writer's open checks them)
    assert Archive(path, readonly=True).meta("schema_version") == str(SCHEMA_VERSION)
    assert not list(tmp_path.glob("*.partial"))


def test_a_deep_program_has_one_key_however_deep_the_stack_that_computes_it() -> None:
    files = {"m.py": "x = " + "-" * 390 + "1\n"}  # runs; dumping its tree nearly fills the stack

    def at_depth(n: int) -> str:
        return program_key(files) if n == 0 else at_depth(n - 1)

    assert at_depth(0) == at_depth(600)
