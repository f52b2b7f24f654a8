"""The `tune` proposer: Optuna's samplers over a family's history, rebuilt on every call."""

from __future__ import annotations

import json
import math
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from selfprog import settings
from selfprog.archive import ARCHIVE_FILE
from selfprog.edits import apply_edits, parse_edits
from selfprog.errors import ConfigError
from selfprog.proposers.base import ProposalRequest
from selfprog.proposers.tune import NO_SPACE, TuneProposer, make_sampler, rebuild
from selfprog.scaffold import new_target
from selfprog.settings import Trial
from selfprog.space import Declared, space_for
from selfprog.target import load_target
from selfprog.warmstart import TRAINED
from tests.test_loop import start  # the CLI as a child process, unbuffered

SCAFFOLD = Path(__file__).resolve().parents[1] / "selfprog" / "scaffolds" / "minimal" / "train.py"


def scaffold_request(history: tuple[Trial, ...] = (), seed: int = 3, known=None) -> ProposalRequest:  # type: ignore[no-untyped-def]
    files = {"train.py": SCAFFOLD.read_text()}
    space = space_for(settings.of_program(files), files, Declared())
    seed_trial = Trial(1, "ok", 0.5, settings.values(files))
    return ProposalRequest(
        parent_id=1,
        files=files,
        prompt="",
        seed=seed,
        known=known,
        space=tuple(space),
        history=(seed_trial, *history),
    )


def children(request: ProposalRequest, k: int, sampler: str = "tpe") -> list[dict]:
    proposals = TuneProposer(sampler).propose(request, k)
    assert all(not p.error for p in proposals), [p.error for p in proposals]
    out = []
    for p in proposals:
        program = apply_edits(request.files, parse_edits(p.text, ("train.py",)), ("train.py",), ())
        out.append(settings.values(program))
    return out


def test_children_are_valid_distinct_in_the_space_and_seeded() -> None:
    request = scaffold_request()
    made = children(request, 6)
    space = {d.key: d for d in request.space}
    assert all(space[key].contains(v) for child in made for key, v in child.items())
    assert len({tuple(sorted(c.items())) for c in made}) == 6
    assert settings.values(request.files) not in made
    assert children(scaffold_request(), 6) == made  # the same request, the same children
    assert children(scaffold_request(seed=4), 6) != made


def test_a_program_already_tried_is_not_proposed_again() -> None:
    first = children(scaffold_request(), 1)[0]

    def known(program) -> bool:  # type: ignore[no-untyped-def]
        return settings.values(program) == first

    assert children(scaffold_request(known=known), 1)[0] != first


def test_the_study_holds_the_history_by_state() -> None:
    space = {d.key: d for d in scaffold_request().space}
    base = settings.values({"train.py": SCAFFOLD.read_text()})
    history = [
        Trial(1, "ok", 0.5, base),
        Trial(2, "ok", 0.9, {**base, "hidden": 64}),
        Trial(3, "running", None, {**base, "hidden": 128}),
        Trial(4, "oom", None, {**base, "hidden": 16}),
        Trial(5, "error", None, {**base, "hidden": 8}),  # the harness's failure, not the program's
        Trial(6, "ok", 0.7, {**base, "hidden": 4096, "learning_rate": 0.01}),  # outside: left out
    ]
    study = rebuild(history, space, True, make_sampler("random", 0))
    trials = study.get_trials(deepcopy=False)
    assert [(t.state, t.value) for t in trials] == [
        (TrialState.COMPLETE, 0.5),
        (TrialState.COMPLETE, 0.9),
        (TrialState.RUNNING, None),
        (TrialState.COMPLETE, 0.9),  # a crash counts as the worst score seen
        (TrialState.COMPLETE, 0.7),
    ]
    assert "hidden" not in trials[-1].params and trials[-1].params["learning_rate"] == 0.01


def test_tpe_learns_from_the_history_where_random_sampling_does_not() -> None:
    base = settings.values({"train.py": SCAFFOLD.read_text()})
    space = {d.key: d for d in scaffold_request().space}
    lr = space["learning_rate"]
    history = []
    for i in range(30):  # the lower the learning rate, the better the score
        value = settings.rounded(math.exp(math.log(lr.low) + (i / 29) * math.log(lr.high / lr.low)))
        history.append(Trial(10 + i, "ok", math.log(value), {**base, "learning_rate": value}))
    request = scaffold_request(tuple(history))
    tpe = statistics.median(c["learning_rate"] for c in children(request, 8, "tpe"))
    uniform = statistics.median(c["learning_rate"] for c in children(request, 8, "random"))
    assert tpe < lr.low * 3 < uniform


def test_a_program_without_settings_gets_one_clear_error_per_child() -> None:
    request = ProposalRequest(parent_id=1, files={"train.py": "print(1)\n"}, prompt="", seed=0)
    proposals = TuneProposer().propose(request, 2)
    assert [p.error for p in proposals] == [NO_SPACE, NO_SPACE]


def test_an_unknown_sampler_is_refused() -> None:
    with pytest.raises(ConfigError, match="choose one of tpe, random, gp"):
        TuneProposer("bayes")


@pytest.mark.parametrize("sampler", ["gp", "random"])
def test_every_sampler_proposes(sampler: str) -> None:
    history = tuple(
        Trial(10 + i, "ok", float(i), {**c, "hidden": 16})
        for i, c in enumerate(children(scaffold_request(), 4))
    )
    assert len(children(scaffold_request(history), 2, sampler)) == 2


# ---- a real run, killed and resumed ------------------------------------------------------

FLAGS = [
    *("--runner", "local", "--budget-steps", "20", "--generations", "3", "--population", "2"),
    *("--seed", "2", "--set", "run.synchronous=true", "--set", "selection.noise_seeds=2"),
]


def seeded_target(tmp_path: Path) -> Path:
    """The scaffold, its data drawn from a fixed seed, so that two runs score alike."""
    folder = tmp_path / "mlp"
    new_target("mlp", folder)
    prepare = folder / "prepare.py"
    prepare.write_text(
        prepare.read_text().replace("np.random.default_rng()", "np.random.default_rng(0)")
    )
    return folder


def proposals(run_dir: Path) -> list[tuple[object, ...]]:
    db = sqlite3.connect(f"file:{run_dir / ARCHIVE_FILE}?mode=ro", uri=True)
    try:
        return db.execute(
            "SELECT c.generation, c.parent_id, p.slot, p.response, c.state FROM candidates c "
            "JOIN proposals p ON p.id = c.proposal_id ORDER BY c.generation, c.parent_id, p.slot"
        ).fetchall()
    finally:
        db.close()


def finished(run_dir: Path) -> int:
    try:
        db = sqlite3.connect(f"file:{run_dir / ARCHIVE_FILE}?mode=ro", uri=True, timeout=10)
        try:
            row = db.execute(
                "SELECT COUNT(*) FROM candidates WHERE state NOT IN ('pending', 'running')"
            ).fetchone()
        finally:
            db.close()
    except sqlite3.OperationalError:
        return 0
    return int(row[0])


@pytest.mark.slow
def test_a_killed_and_resumed_tune_run_proposes_what_an_uninterrupted_one_does(
    tmp_path: Path,
) -> None:
    target = seeded_target(tmp_path)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    out, _ = start("run", "--target", str(target), "--run-dir", str(whole), *FLAGS).communicate(
        timeout=600
    )
    assert "run finished" in out, out
    driver = start("run", "--target", str(target), "--run-dir", str(cut), *FLAGS)
    deadline = time.monotonic() + 300
    while finished(cut) < 4 and time.monotonic() < deadline:  # into generation 2: history counts
        time.sleep(0.1)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert finished(cut) >= 4
    out, _ = start("resume", str(cut)).communicate(timeout=600)
    assert "run finished" in out, out
    made = proposals(whole)
    assert len(made) == 6 and all(r[3] for r in made)
    assert proposals(cut) == made
    later = [r for r in made if r[0] > 1]
    assert {r[3] for r in later}.isdisjoint({r[3] for r in made if r[0] == 1})
    # the run's end: the best confirmed (2 evaluations), the same pick after the kill
    picks = [champion(run_dir) for run_dir in (whole, cut)]
    assert picks[0] == picks[1] and picks[0]["confirmed"] and picks[0]["evaluations"] >= 2


def champion(run_dir: Path) -> dict[str, object]:
    shown = subprocess.run(
        [sys.executable, "-m", "selfprog", "status", str(run_dir), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    best: dict[str, object] = json.loads(shown.stdout)["best"]
    return best


def test_a_run_whose_children_all_fail_the_same_way_stops_and_says_why(tmp_path: Path) -> None:
    target = seeded_target(tmp_path)
    train = target / "train.py"
    # a statement before the constants: none of them is a setting any more
    train.write_text(train.read_text().replace("hidden = 32", 'print("training")\nhidden = 32', 1))
    run_dir = tmp_path / "run"
    flags = ["--runner", "local", "--budget-steps", "5", "--generations", "5", "--population", "4"]
    argv = ["run", "--target", str(target), "--run-dir", str(run_dir), *flags]
    done = subprocess.run(
        [sys.executable, "-m", "selfprog", *argv, "--set", "selection.noise_seeds=1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    said = "no child has trained, and the children of the last 3 calls all failed the same way: "
    said += "the proposer failed: "
    assert said + NO_SPACE[:40] in done.stdout
    assert "run stopped: " in done.stdout and "13 candidates (12 invalid, 1 ok)" in done.stdout
    status = subprocess.run(
        [sys.executable, "-m", "selfprog", "status", str(run_dir)], capture_output=True, text=True
    )
    assert f"ended       stopped: {said}" in status.stdout


# ---- an LM and tune in one run ----------------------------------------------------------


class EchoLM:
    """A stand-in LM: each child doubles the parent's width (a structural change, as it were)."""

    name = "echo"
    template = "propose.md"

    def adopt(self, candidate_id, folder) -> None:  # type: ignore[no-untyped-def]
        pass

    def propose(self, request: ProposalRequest, k: int) -> list:  # type: ignore[type-arg]
        from selfprog.proposers.base import Proposal

        text = "train.py\n<<<<<<< SEARCH\nhidden = 32\n=======\nhidden = 33\n>>>>>>> REPLACE\n"
        return [Proposal(text=text, model="echo") for _ in range(k)]


def test_the_split_follows_what_has_paid_off_and_is_seeded() -> None:
    from selfprog.proposers.mixed import split, tune_share

    assert tune_share(None) == 0.5
    assert tune_share({"tune": (10, 6), "lm": (10, 1)}) > 0.75
    assert tune_share({"tune": (10, 0), "lm": (10, 9)}) < 0.1  # never 0: tune keeps a chance
    assert [split(4, 0.5, s) for s in range(3)] == [2, 2, 2]
    draws = [split(1, 0.3, s) for s in range(200)]
    assert draws == [split(1, 0.3, s) for s in range(200)] and 40 < sum(draws) < 80


def test_the_mixed_proposer_asks_each_for_its_share() -> None:
    from selfprog.proposers.mixed import MixedProposer

    mixed = MixedProposer(EchoLM(), TuneProposer())  # type: ignore[arg-type]
    paying = dataclass_replace(scaffold_request(), payoff={"tune": (20, 15), "lm": (20, 1)})
    models = [p.model for p in mixed.propose(paying, 4)]
    assert (models.count("tune (tpe)") >= 3 and models[0] == "echo") or set(models) == {
        "tune (tpe)"
    }
    bare = ProposalRequest(parent_id=1, files={"train.py": "print(1)\n"}, prompt="", seed=0)
    assert [p.model for p in mixed.propose(bare, 3)] == ["echo"] * 3  # nothing to tune


def dataclass_replace(request: ProposalRequest, **changes: object) -> ProposalRequest:
    import dataclasses

    return dataclasses.replace(request, **changes)  # type: ignore[arg-type]


def test_the_archive_tallies_each_sources_children_against_their_parents(tmp_path: Path) -> None:
    from selfprog.archive import Archive

    archive = Archive.create(tmp_path / "archive.sqlite", {"run_id": "r"})
    with archive.transaction() as db:
        archive.add_candidate(db, generation=0, state="ok")
        db.execute("UPDATE candidates SET score = 1.0 WHERE id = 1")
        call = archive.record_call(db, 1, 1, proposer="echo+tune", model="echo", k=4)
        for slot, (model, state, score) in enumerate(
            [
                ("tune (tpe)", "ok", 0.5),
                ("tune (tpe)", "ok", 2.0),
                ("echo", "invalid", None),
                ("echo", "pending", None),
            ]
        ):
            pid = archive.record_proposal(db, call, slot, "text", "", 0, "", model=model)
            child = archive.add_candidate(
                db, generation=1, parent_id=1, proposal_id=pid, state=state
            )
            db.execute("UPDATE candidates SET score = ? WHERE id = ?", (score, child))
    assert archive.payoff(minimize=True) == {"tune": (2, 1), "lm": (1, 0)}  # pending: not judged
    assert archive.payoff(minimize=False) == {"tune": (2, 1), "lm": (1, 0)}
    archive.close()


@pytest.mark.slow
def test_a_run_with_an_lm_and_tune_asks_both_and_the_lm_starts_a_new_family(
    tmp_path: Path,
) -> None:
    from selfprog.rundir import open_run
    from tests.fakes import FakeOpenAI, chat

    target = seeded_target(tmp_path)
    restructure = (
        "A residual-free deeper head.\n\ntrain.py\n<<<<<<< SEARCH\n"
        "    parts.append(torch.nn.Linear(width, 1))\n=======\n"
        "    parts += [torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, 1)]\n"
        ">>>>>>> REPLACE\n"
    )
    run_dir = tmp_path / "run"
    flags = ["--runner", "local", "--proposer", "openai", "--budget-steps", "20"]
    flags += ["--generations", "2", "--population", "4", "--set", "proposer.tune=auto"]
    flags += ["--set", "selection.noise_seeds=1", "--set", "selection.confirm_seeds=1"]
    flags += ["--set", "proposer.model=m", "--set", "run.synchronous=true"]
    argv = [sys.executable, "-m", "selfprog", "run", "--target", str(target), "--run-dir"]
    with FakeOpenAI([], then=chat(restructure)).running() as fake:
        done = subprocess.run(
            [*argv, str(run_dir), *flags, f"--set=proposer.base_url={fake.url}"],
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert done.returncode == 0, done.stdout + done.stderr
    run = open_run(run_dir, readonly=True)
    rows = run.archive.db.execute(
        "SELECT p.model, c.program_hash, c.state FROM candidates c "
        "JOIN proposals p ON p.id = c.proposal_id ORDER BY c.id"
    ).fetchall()
    sources = [("tune" if model.startswith("tune") else "lm") for model, _, _ in rows]
    assert sources[:4] == ["lm", "lm", "tune", "tune"]  # an even split before anything paid off
    assert len(rows) == 8 and "tune" in sources[4:]
    seed_family = run.archive.family_of(run.archive.seed().program_hash)  # type: ignore[union-attr]
    lm_families = {
        run.archive.family_of(h)
        for (_, h, _), s in zip(rows, sources, strict=True)
        if s == "lm" and h
    }
    assert lm_families and seed_family not in lm_families  # the LM restructured the program
    calls = run.archive.db.execute("SELECT proposer FROM calls").fetchall()
    assert {c[0] for c in calls} == {"openai+tune"}
    run.archive.close()


def test_a_nearly_explored_space_still_gets_programs_not_tried() -> None:
    source = "act = 'a'\nopt = 'x'\nif act in ('a', 'b', 'c', 'd', 'e') or opt in ('x', 'y', 'z', 'w'):\n    pass\n"
    files = {"train.py": source}
    space = space_for(settings.of_program(files), files, Declared())
    points = [(a, o) for a in "abcde" for o in "xyzw"]  # 20 programs
    tried = {(a, o) for a, o in points[:15]}
    history = tuple(
        Trial(i, "ok", float(i), {"act": a, "opt": o}) for i, (a, o) in enumerate(sorted(tried))
    )

    def known(program) -> bool:  # type: ignore[no-untyped-def]
        values = settings.values(program)
        return (values["act"], values["opt"]) in tried

    request = ProposalRequest(
        parent_id=1,
        files=files,
        prompt="",
        seed=1,
        known=known,
        space=tuple(space),
        history=history,
    )
    made = []
    for p in TuneProposer().propose(request, 4):
        child = apply_edits(files, parse_edits(p.text, ("train.py",)), ("train.py",), ())
        made.append((settings.values(child)["act"], settings.values(child)["opt"]))
    assert len(set(made)) == 4 and not set(made) & tried


def test_only_children_failing_alike_over_several_calls_stop_a_run(tmp_path: Path) -> None:
    from selfprog.archive import Archive

    archive = Archive.create(tmp_path / "archive.sqlite", {"run_id": "r"})

    def children(calls: int, per_call: int, reason: str) -> None:
        with archive.transaction() as db:
            for _ in range(calls):
                n = archive.count()
                call = archive.record_call(db, n, 1, proposer="tune", k=per_call)
                for slot in range(per_call):
                    pid = archive.record_proposal(db, call, slot, "", "", 0, reason)
                    archive.add_candidate(
                        db,
                        generation=1,
                        parent_id=1,
                        proposal_id=pid,
                        state="invalid",
                        reason=reason,
                    )

    with archive.transaction() as db:
        archive.add_candidate(db, generation=0, state="ok")
    children(1, 8, "the proposer failed: the proposer raised RuntimeError: CUDA out of memory")
    assert archive.one_failure(8, 3) == ""  # one call that raised: the call breaker's to judge
    children(1, 8, "the proposer failed: no setting")
    assert archive.one_failure(8, 3) == ""  # one call only
    children(2, 4, "the proposer failed: no setting")
    assert archive.one_failure(8, 3) == "the proposer failed: no setting"
    archive.close()


# ---- warm start ---------------------------------------------------------------------------

WARM = [*("--runner", "local", "--budget-steps", "20", "--population", "2", "--seed", "2")]


def sql(run_dir: Path, query: str) -> list[tuple[object, ...]]:
    db = sqlite3.connect(f"file:{run_dir / ARCHIVE_FILE}?mode=ro", uri=True)
    try:
        return db.execute(query).fetchall()
    finally:
        db.close()


def refused(tmp_path: Path, *args: str) -> str:
    """Returns the one line a refused warm start says; the run folder it named is not left."""
    run_dir = tmp_path / "refused"
    out, _ = start("run", "--run-dir", str(run_dir), *args).communicate(timeout=300)
    assert not run_dir.exists(), out
    lines = [line for line in out.splitlines() if "--warm-start" in line]
    assert len(lines) == 1, out
    return lines[0]


def test_a_warm_start_continues_from_an_earlier_runs_history(tmp_path: Path) -> None:
    target = seeded_target(tmp_path)
    first, second = tmp_path / "first", tmp_path / "second"
    out, _ = start(
        "run", "--target", str(target), "--run-dir", str(first), "--generations", "1", *WARM
    ).communicate(timeout=600)
    assert "run finished" in out, out
    trained = sql(  # what a warm start takes: every candidate that trained (pruned ones too)
        first, f"SELECT id, program_key FROM candidates WHERE state IN {TRAINED}"
    )

    # the same seed again: without the history, tune would propose first's programs again
    argv = ["--target", str(target), "--run-dir", str(second), "--generations", "2", *WARM]
    out, _ = start("run", *argv, "--warm-start", str(first), "--max-candidates", "3").communicate(
        timeout=600
    )
    assert "reached max_candidates (3)" in out, out  # its own three: the seed and two children
    imported = sql(
        second, "SELECT origin, program_key, accepted FROM candidates WHERE origin IS NOT NULL"
    )
    assert sorted(int(str(o).rsplit("#", 1)[1]) for o, _, _ in imported) == [i for i, _ in trained]
    assert {k for _, k, _ in imported} == {k for _, k in trained}
    assert sum(bool(a) for _, _, a in imported) == 1  # the earlier champion: the one to beat
    own = sql(second, "SELECT generation, program_key, state FROM candidates WHERE origin IS NULL")
    assert own[0][0] == 0 and len(own) == 3  # the new seed, scored here, then two children
    children = [k for g, k, _ in own if g > 0]
    assert all(s in ("ok", "pruned") for _, _, s in own[1:]), own
    assert not set(children) & {k for _, k in trained}  # the history was heard: nothing repeated
    copied = sql(
        second,
        "SELECT COUNT(*) FROM evaluations e JOIN candidates c ON c.id = "
        "e.candidate_id WHERE c.origin IS NOT NULL",
    )[0][0]
    assert copied == sql(first, "SELECT COUNT(*) FROM evaluations")[0][0]
    status = subprocess.run(
        [sys.executable, "-m", "selfprog", "status", str(second)], capture_output=True, text=True
    )
    assert f"warm start  {len(trained)} candidates of {first}" in status.stdout

    # another run seed: each imported evaluation keeps its place (none is asked for again)
    third = tmp_path / "third"
    argv = ["--target", str(target), "--run-dir", str(third), "--max-candidates", "1", *WARM[:-1]]
    out, _ = start(
        "run", *argv, "7", "--set", "selection.confirm_seeds=1", "--warm-start", str(first)
    ).communicate(timeout=600)
    assert "reached max_candidates (1)" in out, out  # the seed alone
    seeds = "SELECT e.seed FROM evaluations e JOIN candidates c ON c.id = e.candidate_id "
    old_seeds = sorted(s for (s,) in sql(first, "SELECT seed FROM evaluations"))
    assert sorted(s for (s,) in sql(third, seeds + "WHERE c.origin IS NOT NULL")) == [
        s + 5 for s in old_seeds
    ]

    # refused, with one line, before a run is made (or once its data is prepared)
    common = ["--target", str(target), "--runner", "local", "--budget-steps", "20"]
    said = refused(tmp_path, *common[:-1], "30", "--warm-start", str(first))
    assert "20 steps, this one to 30 steps" in said
    assert "not a selfprog run" in refused(tmp_path, *common, "--warm-start", str(tmp_path))
    other = tmp_path / "other"
    shutil.copytree(target, other)
    with (other / "evaluate.py").open("a") as evaluator:
        evaluator.write("# another evaluator\n")
    said = refused(tmp_path, "--target", str(other), *common[2:], "--warm-start", str(first))
    assert "evaluate.py differs" in said
    foreign = tmp_path / "foreign"  # a run of the same target on other data, consistent itself
    shutil.copytree(first, foreign)
    (prepared,) = [p for p in (foreign / "data").glob("*/*") if p.is_dir()]
    manifest_file = prepared / load_target(foreign / "target").manifest
    other_hash = "feedface" * 8  # as another draw of the data would record
    manifest_file.write_text(
        json.dumps({**json.loads(manifest_file.read_text()), "data_hash": other_hash})
    )
    db = sqlite3.connect(foreign / ARCHIVE_FILE)
    with db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'data_hash'", (other_hash,))
    db.close()
    said = refused(tmp_path, *common, "--warm-start", str(foreign))
    assert f"that run's data (hash {other_hash[:12]}) differs from this one's" in said
    shutil.rmtree(foreign)
    shutil.copytree(first, foreign)
    db = sqlite3.connect(foreign / ARCHIVE_FILE)  # a program that names a file outside itself
    with db:
        phash, files = db.execute("SELECT hash, files FROM programs LIMIT 1").fetchone()
        manifest = json.loads(files)
        manifest["../../escape.py"] = manifest["train.py"]
        db.execute("UPDATE programs SET files = ? WHERE hash = ?", (json.dumps(manifest), phash))
    db.close()
    said = refused(tmp_path, *common, "--warm-start", str(foreign))
    assert "holds '../../escape.py' where the target's editable files are train.py" in said


def test_a_program_naming_a_file_outside_itself_is_never_written(tmp_path: Path) -> None:
    """Defence in depth behind the warm start's check: the per-candidate boundary refuses it."""
    from selfprog.scheduler import Job, score_job

    work = tmp_path / "slot" / "job"
    job = Job(1, 0, {"train.py": "print(1)\n", "../../escape.py": "print(2)\n"}, 0)
    outcome = score_job(None, job, None, work, "")  # type: ignore[arg-type]
    assert outcome.result.state.value == "error"
    assert "a file outside itself: '../../escape.py'" in outcome.result.log_tail
    assert (
        not (tmp_path / "escape.py").exists()
        and not (tmp_path / "slot").joinpath("escape.py").exists()
    )
