"""The loop for real: a short run in Docker, interrupted (Ctrl-C, then kill -9) and resumed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfprog.archive import ARCHIVE_FILE, Archive
from selfprog.errors import SelfprogError
from selfprog.loop import derive_seed
from selfprog.rundir import driver_lock

RUN_FLAGS = [
    "--proposer",
    "mutate",  # mild edits: every child trains in about the seed's time, so the states are stable
    "--generations",
    "3",
    "--population",
    "2",
    "--workers",
    "2",
    "--budget-steps",
    "40",
    "--seed",
    "5",
    "--set",
    "selection.noise_seeds=2",
    "--set",
    "selection.confirm_seeds=2",
    "--set",
    "run.synchronous=true",  # so that an interrupted run must match an uninterrupted one exactly
]


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "selfprog", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def finish(proc: subprocess.Popen[str], timeout: float = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def states(run_dir: Path) -> dict[str, int]:
    if not (run_dir / ARCHIVE_FILE).exists():
        return {}
    db = sqlite3.connect(f"file:{run_dir / ARCHIVE_FILE}?mode=ro", uri=True, timeout=10)
    try:
        return dict(db.execute("SELECT state, COUNT(*) FROM candidates GROUP BY state").fetchall())
    except sqlite3.OperationalError:
        return {}
    finally:
        db.close()


def wait_for(run_dir: Path, done: int, running: int = 0, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = states(run_dir)
        finished = sum(n for s, n in counts.items() if s not in ("pending", "running"))
        if finished >= done and counts.get("running", 0) >= running:
            return
        time.sleep(0.2)
    raise AssertionError(f"run did not reach {done} finished candidates: {states(run_dir)}")


def fingerprint(run_dir: Path) -> list[tuple[object, ...]]:
    archive = Archive(run_dir / ARCHIVE_FILE, readonly=True)
    rows = [
        (
            c.id,
            c.generation,
            c.parent_id,
            c.program_hash,
            c.state,
            None if c.score is None else round(c.score, 4),
        )
        for c in archive.candidates()
    ]
    archive.close()
    return rows


def containers_of(run_dir: Path) -> list[str]:
    archive = Archive(run_dir / ARCHIVE_FILE, readonly=True)
    run_id = archive.meta("run_id")
    archive.close()
    out = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=selfprog.run={run_id}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


@pytest.fixture(scope="module")
def reference_run(docker_runner, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    code, out = finish(start("run", "--run-dir", str(run_dir), *RUN_FLAGS))
    assert code == 0, out
    assert "best: candidate" in out and f"selfprog status {run_dir}" in out
    return run_dir


@pytest.mark.docker
@pytest.mark.slow
def test_short_real_run_records_everything(reference_run: Path) -> None:
    archive = Archive(reference_run / ARCHIVE_FILE, readonly=True)
    candidates = archive.candidates()
    assert candidates[0].generation == 0 and candidates[0].parent_id is None
    assert len(candidates) == 1 + 3 * 2
    assert all(c.state not in ("pending", "running") for c in candidates)
    seed = candidates[0].score
    best = archive.best(minimize=True, accepted=True)[0]
    assert seed is not None and best.score is not None and best.score <= seed
    children = candidates[1:]
    assert all(
        c.parent_id is not None and c.diff.startswith("--- a/") for c in children if c.state == "ok"
    )
    calls = archive.db.execute("SELECT generation, parent_id, k FROM calls ORDER BY id").fetchall()
    assert tuple(calls[0]) == (1, 1, 2)  # generation 1: the seed is the only parent
    assert sum(r[2] for r in calls) == 6
    evaluations = dict(
        archive.db.execute(
            "SELECT candidate_id, COUNT(*) FROM evaluations GROUP BY candidate_id"
        ).fetchall()
    )
    assert evaluations[1] == 2  # the seed, twice: the noise floor
    for c in children:
        assert evaluations.get(c.id, 0) == (
            0 if c.state in ("invalid", "duplicate") else c.evals_needed
        )
        assert c.accepted is not None  # every child was judged
    assert candidates[0].accepted is True
    status = subprocess.run(
        [sys.executable, "-m", "selfprog", "status", str(reference_run), "--json"],
        capture_output=True,
        text=True,
    )
    report = json.loads(status.stdout)
    assert report["best"]["candidate"] == best.id and report["generation"] == 3
    assert containers_of(reference_run) == []


@pytest.mark.docker
@pytest.mark.slow
def test_interrupt_kill_and_resume_match_an_uninterrupted_run(
    reference_run: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "interrupted"
    driver = start("run", "--run-dir", str(run_dir), *RUN_FLAGS)
    wait_for(run_dir, done=2, running=1)

    # a reader is fine while the run writes; a second driver is not
    status = subprocess.run(
        [sys.executable, "-m", "selfprog", "status", str(run_dir), "--json"],
        capture_output=True,
        text=True,
    )
    assert status.returncode == 0 and json.loads(status.stdout)["driver"]["pid"] == driver.pid
    second = subprocess.run(
        [sys.executable, "-m", "selfprog", "resume", str(run_dir)], capture_output=True, text=True
    )
    assert second.returncode == 2 and f"is being driven by pid {driver.pid}" in second.stderr

    # the first Ctrl-C finishes what runs, records it, and says how to resume
    driver.send_signal(signal.SIGINT)
    code, out = finish(driver)
    assert code == 130, out
    assert f"resume with: selfprog resume {run_dir}" in out
    assert "running" not in states(run_dir) and "pending" not in states(run_dir)
    assert containers_of(run_dir) == []

    # resume, then kill -9 the driver in the middle of a generation
    driver = start("resume", str(run_dir))
    before = sum(states(run_dir).values())
    wait_for(run_dir, done=before + 1, running=1)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert states(run_dir).get("running", 0) >= 1

    # resume again: leftovers removed, in-flight work rerun, nothing lost or repeated
    code, out = finish(start("resume", str(run_dir)))
    assert code == 0, out
    assert containers_of(run_dir) == []
    assert fingerprint(run_dir) == fingerprint(reference_run)
    archive = Archive(run_dir / ARCHIVE_FILE, readonly=True)
    pairs = archive.db.execute("SELECT generation, parent_id FROM calls").fetchall()
    assert len(pairs) == len(set(map(tuple, pairs)))  # no proposal was asked for twice


def test_a_second_driver_is_refused(tmp_path: Path) -> None:
    from selfprog.rundir import RunLocked

    with (
        driver_lock(tmp_path),
        pytest.raises(RunLocked, match=f"driven by pid {os.getpid()}"),
        driver_lock(tmp_path),
    ):
        pass
    with driver_lock(tmp_path):
        pass  # released when the first driver ended


def test_seeds_are_stable() -> None:
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2) != derive_seed(0, 2, 1)


def make_run(tmp_path: Path, *overrides: str):  # type: ignore[no-untyped-def]
    from selfprog.config import load_config
    from selfprog.rundir import create_run

    settings = ["runner.kind=local", "budget.steps=20", "run.workers=1", *overrides]
    return create_run(tmp_path / "run", load_config(None, settings))


def test_lm_proposals_flow_into_candidates_and_failures_do_not_stop_the_run(tmp_path: Path) -> None:
    from selfprog.loop import Driver
    from selfprog.runners.local import LocalRunner
    from selfprog.scheduler import make_scheduler
    from tests.fakes import FakeOpenAI, Reply, chat
    from tests.test_proposers import EDIT, proposer

    run = make_run(tmp_path, "run.generations=3", "run.population=1")
    script = [
        Reply(429, {"error": "rate"}, {"Retry-After": "0"}),
        chat(EDIT, prompt_tokens=300, completion_tokens=40),
        Reply(400, {"error": "context too long"}),
        chat("I think the model is fine as it is.", prompt_tokens=310, completion_tokens=9),
    ]
    with FakeOpenAI(script).running() as fake:
        scheduler = make_scheduler(run, LocalRunner(registry=tmp_path / "pids"))
        ended = Driver(run, proposer(fake.url), scheduler).drive()
    assert ended == "finished"
    rows = [(c.generation, c.state, c.reason) for c in run.archive.candidates()]
    assert rows[0][:2] == (0, "ok") and rows[1][:2] == (1, "ok")
    assert rows[2] == (2, "invalid", rows[2][2]) and "HTTP 400" in rows[2][2]
    assert rows[3] == (
        3,
        "invalid",
        "no edits found: expected SEARCH/REPLACE blocks or a whole file",
    )
    assert run.archive.candidate(2).rationale == "Raise the learning rate."
    assert (
        "learning_rate = 2e-3"
        in run.archive.program(run.archive.candidate(2).program_hash or "")["train.py"]
    )
    assert run.archive.tokens_used() == 300 + 40 + 310 + 9
    assert "# The parent program (candidate 1" in fake.requests[0]["body"]["messages"][1]["content"]


def test_random_text_from_a_local_model_ends_invalid_cleanly(
    tmp_path: Path, tiny_model: Path
) -> None:
    from selfprog.loop import Driver
    from selfprog.proposers.transformers import TransformersProposer
    from selfprog.runners.local import LocalRunner
    from selfprog.scheduler import make_scheduler

    run = make_run(tmp_path, "run.generations=1", "run.population=3", "proposer.prompt_tokens=400")
    lm = TransformersProposer.load(str(tiny_model), 1.0, max_new_tokens=16, edit_mode="free")
    scheduler = make_scheduler(run, LocalRunner(registry=tmp_path / "pids"))
    assert Driver(run, lm, scheduler).drive() == "finished"
    children = run.archive.in_generation(1)
    assert len(children) == 3 and {c.state for c in children} == {"invalid"}
    calls = run.archive.db.execute("SELECT k, tokens_in, tokens_out FROM calls").fetchall()
    assert len(calls) == 1 and calls[0][0] == 3 and calls[0][1] > 0 and 0 < calls[0][2] <= 48


def test_a_relative_run_folder_works(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "selfprog",
            "run",
            "--run-dir",
            "runs/r",
            "--runner",
            "local",
            "--generations",
            "1",
            "--population",
            "1",
            "--budget-steps",
            "5",
            "--set",
            "selection.noise_seeds=1",
            "--set",
            "selection.confirm_seeds=1",  # no final confirmation: one evaluation each
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert done.returncode == 0, done.stderr
    assert "selfprog status runs/r" in done.stdout


class SlowMutate:
    """The mutate proposer behind a fixed latency, as a language model would answer."""

    name = "slow-mutate"
    template = "propose.md"

    def __init__(self, latency: float):
        from selfprog.proposers.mutate import MutateProposer

        self.latency = latency
        self.inner = MutateProposer()
        self.calls = 0

    def adopt(self, candidate_id: int | None, folder: Path | None) -> None:
        pass

    def propose(self, request, k):  # type: ignore[no-untyped-def]
        self.calls += 1
        time.sleep(self.latency)
        return self.inner.propose(request, k)


def scoring_intervals(events: list[tuple[float, dict]]) -> list[tuple[float, float]]:  # type: ignore[type-arg]
    """Returns when each evaluation was in a sandbox, from the driver's events."""
    intervals, started = [], {}
    for at, event in events:
        key = (event.get("candidate"), event.get("evaluation"))
        if event["event"] == "started":
            started[key] = at
        elif event["event"] == "finished":
            intervals.append((started.pop(key), at))
    return intervals


def check_complete(run_dir: Path, generations: int, population: int) -> Archive:
    """Asserts a finished run lost and repeated nothing; returns its archive."""
    archive = Archive(run_dir / ARCHIVE_FILE, readonly=True)
    candidates = archive.candidates()
    assert len(candidates) == 1 + generations * population
    assert all(c.state not in ("pending", "running") and c.accepted is not None for c in candidates)
    pairs = archive.db.execute("SELECT generation, parent_id FROM calls").fetchall()
    assert len(pairs) == len(set(map(tuple, pairs)))  # no call asked twice
    counts = dict(
        archive.db.execute(
            "SELECT candidate_id, COUNT(*) FROM evaluations GROUP BY candidate_id"
        ).fetchall()
    )
    for c in candidates:  # every evaluation once: none lost, none scored twice
        expected = (
            c.evals_needed if c.state == "ok" else (0 if c.state in ("invalid", "duplicate") else 1)
        )
        assert counts.get(c.id, 0) == expected, (c.id, c.state)
    assert sorted({c.generation for c in candidates}) == list(range(generations + 1))
    return archive


def test_steady_state_proposes_while_candidates_are_scored(tmp_path: Path) -> None:
    from selfprog.loop import Driver
    from selfprog.runners.local import LocalRunner
    from selfprog.scheduler import make_scheduler

    run = make_run(
        tmp_path,
        "run.generations=3",
        "run.population=2",
        "run.workers=2",
        "selection.noise_seeds=2",
        "budget.steps=30",
    )
    events: list[tuple[float, dict]] = []  # type: ignore[type-arg]
    proposer = SlowMutate(latency=1.0)
    scheduler = make_scheduler(run, LocalRunner(registry=tmp_path / "pids"))

    def record(event: dict) -> None:  # type: ignore[type-arg]
        events.append((time.monotonic(), event))

    assert Driver(run, proposer, scheduler, on_event=record).drive() == "finished"
    archive = check_complete(run.root, 3, 2)
    assert proposer.calls == archive.db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    scoring = scoring_intervals(events)
    calls = [at for at, e in events if e["event"] == "proposing"]
    # the proposer was asked while a candidate of the generation before was still in a sandbox
    overlapping = [c for c in calls if any(start < c < end for start, end in scoring)]
    assert len(overlapping) >= 2, (calls, scoring)


@pytest.mark.slow
def test_steady_state_run_killed_and_resumed_loses_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "steady"
    flags = ["--runner", "local", *RUN_FLAGS[: RUN_FLAGS.index("run.synchronous=true") - 1]]
    driver = start("run", "--run-dir", str(run_dir), *flags)
    wait_for(run_dir, done=4, running=1)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert states(run_dir).get("running", 0) >= 1
    code, out = finish(start("resume", str(run_dir)))
    assert code == 0, out
    check_complete(run_dir, 3, 2)


def ok_unless(failing: set[int]):  # type: ignore[no-untyped-def]
    """Returns a fake scorer: candidates in failing end train_failed, the rest score by id."""
    from selfprog.scoring import Result
    from selfprog.states import State

    def score(job):  # type: ignore[no-untyped-def]
        if job.candidate_id in failing:
            return Result(State.TRAIN_FAILED, reason="scripted")
        return Result(State.OK, score=3.0 - 0.01 * job.candidate_id + 0.001 * job.index)

    return score


def drive_within(driver, seconds: float = 60):  # type: ignore[no-untyped-def]
    """Returns what drive() returned, failing the test if it runs past seconds (a hang)."""
    import threading

    box: list[object] = []

    def drive() -> None:
        try:
            box.append(driver.drive())
        except BaseException as exc:
            box.append(exc)

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the loop hangs"
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


@pytest.mark.parametrize("synchronous", ["true", "false"])
def test_max_candidates_in_the_middle_of_a_generation_ends_the_run(
    tmp_path: Path, synchronous: str
) -> None:
    from selfprog.loop import Driver
    from selfprog.proposers.mutate import MutateProposer
    from tests.fakes import FakeScheduler

    run = make_run(
        tmp_path,
        "run.generations=3",
        "run.population=2",
        "selection.noise_seeds=1",
        "run.max_candidates=4",
        f"run.synchronous={synchronous}",
    )
    driver = Driver(run, MutateProposer(), FakeScheduler(ok_unless(set())))
    assert drive_within(driver) == "reached max_candidates (4)"
    candidates = run.archive.candidates()
    assert len(candidates) == 4
    assert all(c.state not in ("pending", "running") and c.accepted is not None for c in candidates)


def test_max_sandbox_hours_counts_training_and_evaluation_time(tmp_path: Path) -> None:
    from selfprog.loop import Driver
    from selfprog.proposers.mutate import MutateProposer
    from selfprog.scoring import Result
    from selfprog.states import State
    from tests.fakes import FakeScheduler

    def score(job):  # type: ignore[no-untyped-def]
        timings = {"train": 50.0, "evaluate": 10.0, "total": 999.0}  # total is not sandbox time
        return Result(State.OK, score=3.0 - 0.01 * job.candidate_id, timings=timings)

    run = make_run(
        tmp_path,
        "run.generations=20",
        "run.population=2",
        "selection.noise_seeds=1",
        "run.max_sandbox_hours=0.1",
        "selection.finalists=0",
    )
    assert drive_within(Driver(run, MutateProposer(), FakeScheduler(score))) == (
        "reached max_sandbox_hours (0.1, spent 0.1)"
    )
    # 6 x 60 s = 0.1 h: no child is bred after the 6th; one bred ahead of it is still scored
    assert 360 <= run.archive.sandbox_seconds() <= 420
    assert all(c.state == "ok" for c in run.archive.candidates())


def test_a_failed_seed_does_not_strand_its_first_children(tmp_path: Path) -> None:
    """Steady state breeds from the seed while it is scored; its children are scored all the same."""
    from selfprog.loop import Driver
    from selfprog.proposers.mutate import MutateProposer
    from tests.fakes import FakeScheduler

    run = make_run(tmp_path, "run.generations=2", "run.population=2", "selection.noise_seeds=1")
    driver = Driver(run, MutateProposer(), FakeScheduler(ok_unless({1}), slots=2))
    assert drive_within(driver) == "finished"
    states_by_id = {c.id: c.state for c in run.archive.candidates()}
    assert states_by_id[1] == "train_failed" and "pending" not in states_by_id.values()
    assert run.archive.in_generation(2)  # a scored child of the failed seed became a parent

    # the seed is the parent of the first generation only: later ones wait for scores (and
    # no child is scored before the seed's first evaluation measures what they are held to)
    slow = make_run(
        tmp_path / "slow", "run.generations=3", "run.population=2", "selection.noise_seeds=1"
    )
    held = FakeScheduler(ok_unless(set()), slots=4, hold=frozenset({1}), hold_for=4, hold_polls=50)
    assert drive_within(Driver(slow, MutateProposer(), held)) == "finished"
    times = slow.archive.db.execute("SELECT id, started, finished FROM candidates").fetchall()
    seed_done = times[0][2]
    assert all(started >= seed_done for _, started, _ in times[1:]), times
    plans = slow.archive.db.execute(
        "SELECT generation, parents, created FROM generations WHERE generation > 1"
    ).fetchall()
    assert plans
    for generation, parents, created in plans:  # each drawn from candidates already scored
        for parent, _ in json.loads(parents):
            row = slow.archive.db.execute(
                "SELECT finished FROM candidates WHERE id = ?", (parent,)
            ).fetchone()
            assert row[0] is not None and row[0] <= created, (generation, parent)

    every = make_run(tmp_path / "all", "run.generations=2", "run.population=2")
    driver = Driver(every, MutateProposer(), FakeScheduler(ok_unless(set(range(1, 9))), slots=2))
    with pytest.raises(SelfprogError, match="no candidate has scored `ok`"):
        drive_within(driver)
    assert not every.archive.unfinished()  # all were scored before the run said so


def test_an_outage_stops_the_run_cleanly_and_resume_continues(tmp_path: Path) -> None:
    from selfprog.loop import Driver
    from selfprog.proposers.mutate import MutateProposer
    from tests.fakes import FakeScheduler

    run = make_run(tmp_path, "run.generations=2", "run.population=2", "selection.noise_seeds=1")
    lost = FakeScheduler(ok_unless(set()), slots=2, outage_after=2)
    ended = drive_within(Driver(run, MutateProposer(), lost))
    assert ended == "stopped: lost the fake cluster"
    assert lost.cancelled == 1 and not run.archive.running()  # in flight: pending again
    assert all(c.state in ("ok", "pending") for c in run.archive.candidates())
    assert (
        drive_within(Driver(run, MutateProposer(), FakeScheduler(ok_unless(set())))) == "finished"
    )
    check_complete(run.root, 2, 2)


def test_a_closed_terminal_sighup_stops_the_run_like_sigterm(tmp_path: Path) -> None:
    run_dir = tmp_path / "hup"
    flags = ["--runner", "local", "--generations", "2", "--population", "2", "--budget-steps", "20"]
    driver = start("run", "--run-dir", str(run_dir), *flags)
    wait_for(run_dir, done=0, running=1)
    driver.send_signal(signal.SIGHUP)
    code, out = finish(driver, timeout=300)
    assert code == 130, out  # stopped gracefully, not killed by the signal (-1)
    assert f"resume with: selfprog resume {run_dir}" in out
    assert "running" not in states(run_dir)


def test_step_budgets_and_evaluations_are_held_to_a_multiple_of_the_seeds_time(
    tmp_path: Path,
) -> None:
    """Steps cannot be counted from outside the sandbox, nor training in the evaluator: time can.
    A seconds budget's allowance is the seed's overrun, its repeats included, with a margin."""
    from selfprog.loop import Driver
    from selfprog.proposers.mutate import MutateProposer
    from selfprog.scoring import (
        ALLOWANCE_MARGIN,
        ALLOWANCE_SLACK,
        EVAL_MARGIN,
        EVAL_SLACK,
        MARGIN,
        Ceilings,
        Result,
    )
    from selfprog.states import State
    from tests.fakes import FakeScheduler

    held: dict[tuple[int, int], Ceilings] = {}
    seed_train = {0: 8.0, 1: 9.0, 2: 7.0}  # the seed's evaluations, its repeats included

    def scored(job):  # type: ignore[no-untyped-def]
        held[job.key] = job.ceilings
        train = seed_train[job.index] if job.candidate_id == 1 else 4.0
        timings = {"train": train, "evaluate": 2.0}
        return Result(State.OK, score=3.0 - job.candidate_id / 100, timings=timings)

    run = make_run(tmp_path, "run.generations=1", "run.population=2", "run.synchronous=true")
    allowance = run.target.budget.allowance
    assert Driver(run, MutateProposer(), FakeScheduler(scored)).drive() == "finished"
    assert held[1, 0] == Ceilings()  # the seed: nothing measured yet, the target's timeouts hold
    evaluate = EVAL_MARGIN * 2.0 + EVAL_SLACK
    assert {held[1, 1], held[1, 2]} == {Ceilings(evaluate=evaluate)}  # its repeats: it measures
    children = {limit for (candidate, _), limit in held.items() if candidate > 1}
    assert children == {Ceilings(MARGIN * 9.0 + allowance, evaluate)}  # steps: the slowest

    timed = make_run(tmp_path / "timed", "budget.seconds=5", "budget.steps=0")
    held.clear()
    assert Driver(timed, MutateProposer(), FakeScheduler(scored)).drive() == "finished"
    children = {limit for (candidate, _), limit in held.items() if candidate > 1}
    # seconds: the seed's median overrun (its repeats', 8, 9 and 7 s), with the margin for load
    measured = ALLOWANCE_MARGIN * (8.0 - 5) + ALLOWANCE_SLACK
    assert measured < allowance
    assert children == {Ceilings(5 + measured, evaluate, 8.0 - 5)}


def test_a_candidate_that_kills_its_driver_is_given_up_after_three_tries(tmp_path: Path) -> None:
    """With the local runner a candidate can kill the driver; resume must not loop on it forever."""
    from selfprog.loop import MAX_ATTEMPTS
    from selfprog.target import export_target

    target = tmp_path / "poison"
    export_target("tinylm", target)
    train = target / "train.py"
    train.write_text(
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n" + train.read_text()
    )
    run_dir = tmp_path / "run"
    flags = ["--target", str(target), "--runner", "local", "--budget-steps", "5"]
    code, out = finish(start("run", "--run-dir", str(run_dir), *flags, "--generations", "1"))
    for _ in range(MAX_ATTEMPTS - 1):
        assert code == -signal.SIGKILL, out
        code, out = finish(start("resume", str(run_dir)))
    assert code == -signal.SIGKILL, out
    code, out = finish(start("resume", str(run_dir)))  # the seed is not started again
    archive = Archive(run_dir / ARCHIVE_FILE, readonly=True)
    seed = archive.candidate(1)
    archive.close()
    assert seed.state == "error" and seed.attempts == MAX_ATTEMPTS, (seed.state, out)
    assert "started 3 times and never ended" in seed.reason


def variant(n: int) -> str:
    """Returns an answer that makes any tinylm program a distinct one (a setting nothing reads)."""
    return (
        f"Variant {n}.\n\ntrain.py\n<<<<<<< SEARCH\ngrad_clip = 1.0\n=======\n"
        f"grad_clip = 1.0\nVARIANT = {n}\n>>>>>>> REPLACE\n"
    )


def test_an_endpoint_down_mid_run_stops_it_and_resume_completes_it(tmp_path: Path) -> None:
    from selfprog.loop import Driver
    from tests.fakes import FakeOpenAI, FakeScheduler, Reply, chat
    from tests.test_proposers import proposer

    run = make_run(tmp_path, "run.generations=3", "run.population=2", "selection.noise_seeds=1")
    up = [chat(variant(1), variant(2))]  # generation 1; then the server goes down
    with FakeOpenAI(up + [Reply(503, "down")] * 3).running() as fake:
        lm = proposer(fake.url, attempts=3)
        ended = drive_within(Driver(run, lm, FakeScheduler(ok_unless(set()))))
    assert ended.startswith("stopped: the proposer's endpoint http://127.0.0.1:")
    assert "failed after 3 attempts" in ended and ended.endswith("resume once it is back")
    states_now = [c.state for c in run.archive.candidates()]
    assert "invalid" not in states_now and len(states_now) == 3  # the seed and generation 1
    assert run.archive.db.execute("SELECT COUNT(*) FROM calls").fetchone()[0] == 1

    back = [chat(variant(n), variant(n + 1)) for n in range(3, 11, 2)]
    with FakeOpenAI(back).running() as fake:  # back, at a new address
        assert drive_within(Driver(run, proposer(fake.url), FakeScheduler(ok_unless(set())))) == (
            "finished"
        )
    archive = check_complete(run.root, 3, 2)
    assert {c.state for c in archive.candidates()} == {"ok"}


def harness_error(job):  # type: ignore[no-untyped-def]
    from selfprog.scoring import Result
    from selfprog.states import State

    tail = "Traceback (most recent call last):\ndocker.errors.DockerException: engine gone"
    return Result(State.ERROR, reason="the harness failed on this candidate", log_tail=tail)


def test_harness_errors_in_a_row_stop_the_run_and_go_back_in_the_queue(tmp_path: Path) -> None:
    from selfprog.loop import BREAKER, Driver
    from selfprog.proposers.mutate import MutateProposer
    from tests.fakes import FakeScheduler

    run = make_run(tmp_path, "run.generations=3", "run.population=2", "selection.noise_seeds=1")
    engine_gone = FakeScheduler(
        lambda job: ok_unless(set())(job) if job.candidate_id == 1 else harness_error(job)
    )
    ended = drive_within(Driver(run, MutateProposer(), engine_gone))
    assert ended.startswith(f"stopped: the harness failed on {BREAKER} candidates in a row")
    assert "DockerException: engine gone" in ended
    by_state = {c.id: c.state for c in run.archive.candidates()}
    assert "error" not in by_state.values() and list(by_state.values()).count("pending") >= BREAKER
    assert drive_within(Driver(run, MutateProposer(), FakeScheduler(ok_unless(set())))) == (
        "finished"
    )
    archive = check_complete(run.root, 3, 2)
    assert "error" not in {c.state for c in archive.candidates()}


def test_a_lone_harness_error_is_the_candidates_own(tmp_path: Path) -> None:
    from selfprog.loop import Driver
    from selfprog.proposers.mutate import MutateProposer
    from tests.fakes import FakeScheduler

    run = make_run(tmp_path, "run.generations=2", "run.population=2", "selection.noise_seeds=1")
    ok = ok_unless(set())
    scheduler = FakeScheduler(lambda job: harness_error(job) if job.candidate_id == 3 else ok(job))
    assert drive_within(Driver(run, MutateProposer(), scheduler)) == "finished"
    archive = check_complete(run.root, 2, 2)
    assert [c.id for c in archive.candidates() if c.state == "error"] == [3]


def test_resume_steers_a_finished_run_further_and_refuses_what_would_change_scores(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "steer"
    flags = ["--runner", "local", "--generations", "1", "--population", "1", "--budget-steps", "5"]
    code, out = finish(
        start("run", "--run-dir", str(run_dir), *flags, "--set", "selection.noise_seeds=1")
    )
    assert code == 0, out
    frozen = (run_dir / "config.json").read_text()
    refused = [
        (["--set", "budget.steps=50"], "cannot change in a run under way (candidates trained"),
        (["--set", 'proposer.kind="openai"'], "needs proposer.base_url"),  # found after the lock
    ]
    for steer, message in refused:
        code, out = finish(start("resume", str(run_dir), *steer))
        last = out.strip().splitlines()[-1]
        assert code == 2 and last.startswith("selfprog: error: ") and message in last, out
        assert "Traceback" not in out, out
    assert (run_dir / "config.json").read_text() == frozen  # nothing changed, nothing recorded

    code, out = finish(start("resume", str(run_dir), "--generations", "2"))
    assert code == 0 and "changed run.generations: 1 -> 2" in out, out
    archive = check_complete(run_dir, 2, 1)
    assert [c[1:] for c in archive.changes()] == [("run.generations", "1", "2")]
    code, out = finish(start("status", str(run_dir)))
    assert code == 0 and ": run.generations 1 -> 2" in out, out
    assert json.loads((run_dir / "config.json").read_text())["run"]["generations"] == 2
    code, out = finish(start("show", str(run_dir), "3"))  # bred after the change
    assert code == 0 and "steered    before it was bred: run.generations 1 -> 2" in out, out
    code, out = finish(start("show", str(run_dir), "2"))
    assert code == 0 and "steered" not in out, out


def test_a_status_reader_does_not_keep_a_driver_from_starting(tmp_path: Path) -> None:
    import fcntl
    import threading

    from selfprog.rundir import LOCK_FILE

    (tmp_path / LOCK_FILE).touch()
    with (tmp_path / LOCK_FILE).open() as reader:
        fcntl.flock(reader, fcntl.LOCK_SH | fcntl.LOCK_NB)  # what `selfprog status` does, briefly
        threading.Timer(0.3, fcntl.flock, (reader, fcntl.LOCK_UN)).start()
        with driver_lock(tmp_path):
            pass


@pytest.mark.docker
@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_with_nothing_left_running(
    docker_runner, tmp_path: Path
) -> None:
    run_dir = tmp_path / "twice"
    # a budget long enough to stop two candidates in their containers, short enough that the
    # seed's first evaluation (alone: it measures the ceilings) does not hold the test up long
    flags = ["--generations", "2", "--population", "2", "--workers", "2", "--budget-seconds", "20"]
    driver = start("run", "--run-dir", str(run_dir), *flags)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(SelfprogError, sqlite3.Error):  # no archive yet
            if len(containers_of(run_dir)) == 2:
                break
        time.sleep(0.2)
    assert len(containers_of(run_dir)) == 2, states(run_dir)
    time.sleep(2)  # inside their containers
    driver.send_signal(signal.SIGINT)
    time.sleep(1)
    assert driver.poll() is None  # the first Ctrl-C waits for what runs
    started = time.monotonic()
    driver.send_signal(signal.SIGINT)
    code, out = finish(driver, timeout=60)
    took = time.monotonic() - started
    assert code == 130 and took < 5.0, (took, out)
    assert "stopping (interrupted): finishing the running candidates" in out
    assert containers_of(run_dir) == []
    assert "running" not in states(run_dir)  # back in the queue for resume


class EndsAsKilled:
    """A runner whose training ends just as the run is cancelled; an evaluation runs till killed."""

    name = "scripted"

    def __init__(self) -> None:
        import threading

        self.cancelled = threading.Event()
        self.running: list[threading.Event] = []
        self.evaluations = 0

    def run(self, phase, limits, labels):  # type: ignore[no-untyped-def]
        import threading

        from selfprog.runners.base import PhaseOutcome

        if phase.name == "train":
            self.cancelled.wait(10)  # training ended in the instant of the kill
            return PhaseOutcome(0, 1.0, "", "")
        self.evaluations += 1
        killed = threading.Event()
        self.running.append(killed)
        killed.wait(30)
        return PhaseOutcome(-9, 1.0, "", "")

    def stop_all(self, labels):  # type: ignore[no-untyped-def]
        for killed in self.running:
            killed.set()
        return len(self.running)


def test_no_sandbox_starts_after_a_cancel(tinylm, dataset, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A job between its phases when the run is killed must not start its evaluation after it."""
    from selfprog.runners.base import Limits
    from selfprog.scheduler import Job, Scoring, ThreadScheduler

    runner = EndsAsKilled()
    files = {name: (tinylm.root / name).read_text() for name in tinylm.editable}
    scoring = Scoring(tinylm, dataset, Limits(), 0.0, 5, {"selfprog.run": "r"})
    scheduler = ThreadScheduler(runner, scoring, 1, tmp_path)  # type: ignore[arg-type]
    scheduler.submit(Job(1, 0, files, 0))
    time.sleep(0.5)  # training
    scheduler.cancel()
    runner.cancelled.set()
    scheduler.close()
    time.sleep(0.5)
    assert runner.evaluations == 0


class EndsOkAsKilled(EndsAsKilled):
    """A runner whose evaluation ends `ok` in the instant the run is cancelled."""

    def run(self, phase, limits, labels):  # type: ignore[no-untyped-def]
        from selfprog.runners.base import PhaseOutcome
        from selfprog.scoring import RESULT_MARKER

        if phase.name == "train":
            return PhaseOutcome(0, 1.0, "", "")
        self.cancelled.wait(10)
        nonce = phase.stdin.split(b"\n", 1)[0].decode()
        line = f'{RESULT_MARKER} {nonce} {{"val_bpb": 2.5}}'
        return PhaseOutcome(0, 1.0, line, line)


def test_a_result_that_ended_ok_as_the_run_was_killed_is_kept(
    tinylm, dataset, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from selfprog.runners.base import Limits
    from selfprog.scheduler import Job, Outcome, Scoring, ThreadScheduler

    runner = EndsOkAsKilled()
    files = {name: (tinylm.root / name).read_text() for name in tinylm.editable}
    scoring = Scoring(tinylm, dataset, Limits(), 0.0, 5, {"selfprog.run": "r"})
    scheduler = ThreadScheduler(runner, scoring, 1, tmp_path)  # type: ignore[arg-type]
    scheduler.submit(Job(1, 0, files, 0))
    time.sleep(0.3)
    scheduler.cancel()
    runner.cancelled.set()
    outcomes: list[Outcome] = []
    while not outcomes:
        outcomes = [e for e in scheduler.wait(1.0) if isinstance(e, Outcome)]
    assert outcomes[0].result.score == 2.5 and not outcomes[0].cancelled
    scheduler.close()


def test_held_errors_stay_queued_whatever_ends_after_the_halt(tmp_path: Path) -> None:
    from selfprog.loop import Driver
    from selfprog.proposers.mutate import MutateProposer
    from tests.fakes import FakeScheduler

    ok = ok_unless(set())
    # three errors trip the breaker, then an `ok` ends: they were still the outage's
    run = make_run(
        tmp_path / "a",
        "run.population=4",
        "run.workers=4",
        "selection.noise_seeds=1",
        "run.synchronous=true",
    )
    scheduler = FakeScheduler(
        lambda j: harness_error(j) if j.candidate_id in (2, 3, 4) else ok(j), slots=4
    )
    assert drive_within(Driver(run, MutateProposer(), scheduler)).startswith("stopped: the harness")
    states_now = {c.id: (c.state, c.attempts) for c in run.archive.candidates()}
    assert [states_now[i] for i in (2, 3, 4)] == [("pending", 1)] * 3, states_now  # a start each
    assert states_now[5][0] == "ok"

    # a lost cluster after one harness error: that error goes back in the queue too
    lost = make_run(tmp_path / "b", "run.population=2", "selection.noise_seeds=1")
    scheduler = FakeScheduler(
        lambda j: harness_error(j) if j.candidate_id == 2 else ok(j), outage_after=2
    )
    assert (
        drive_within(Driver(lost, MutateProposer(), scheduler)) == "stopped: lost the fake cluster"
    )
    assert lost.archive.candidate(2).state == "pending"


def test_a_stop_requeues_held_errors_rather_than_blaming_the_candidates(tmp_path: Path) -> None:
    from selfprog.loop import Driver, StopRequest
    from selfprog.proposers.mutate import MutateProposer
    from tests.fakes import FakeScheduler

    run = make_run(tmp_path, "run.population=2", "selection.noise_seeds=1")
    stop = StopRequest()
    ok = ok_unless(set())

    def score(job):  # type: ignore[no-untyped-def]
        if job.candidate_id == 2:
            stop.request("interrupted")  # the engine died, and the user pressed Ctrl-C
            return harness_error(job)
        return ok(job)

    assert drive_within(Driver(run, MutateProposer(), FakeScheduler(score), stop)) == "interrupted"
    child = run.archive.candidate(2)
    assert (child.state, child.attempts) == ("pending", 0)


def test_more_workers_mid_run_keep_each_candidates_cpus(tmp_path: Path) -> None:
    from selfprog.config import steer
    from selfprog.rundir import pin_cpus

    run = make_run(tmp_path, "run.workers=1")
    before = run.limits().cpus
    steered, changes = pin_cpus(run, *steer(run.config, ["run.workers=2"]))
    assert steered.runner.cpus == before and ("runner.cpus", 0.0, before) in changes
    run.config = steered
    assert run.limits().cpus == before  # not halved: later candidates train as the earlier did


def test_a_spend_limit_is_checked_after_every_call(tmp_path: Path) -> None:
    from selfprog.loop import Driver
    from selfprog.queries import show
    from tests.fakes import FakeOpenAI, FakeScheduler, chat
    from tests.test_proposers import proposer

    run = make_run(
        tmp_path,
        "run.generations=3",
        "run.population=3",  # generation 2 makes two calls: the limit falls between them
        "selection.noise_seeds=1",
        "proposer.price_in=1000",  # per million tokens: each call below costs 0.2
        "proposer.price_out=2000",
        "run.max_cost=0.3",
    )
    replies = [
        chat(variant(n), variant(n + 1), variant(n + 2), prompt_tokens=100, completion_tokens=50)
        for n in range(1, 30, 3)
    ]
    with FakeOpenAI(replies).running() as fake:
        ended = drive_within(Driver(run, proposer(fake.url), FakeScheduler(ok_unless(set()))))
    assert ended == "reached max_cost (0.3, spent 0.4)"
    assert run.archive.db.execute("SELECT COUNT(*) FROM calls").fetchone()[0] == 2
    assert run.archive.cost_used() == pytest.approx(0.4)
    assert show(run, 2)["proposer"]["cost"] == pytest.approx(0.2)
    assert all(c.state not in ("pending", "running") for c in run.archive.candidates())


class Gated:
    """A runner whose phases each wait to be let through; evaluations score 2.5."""

    name = "gated"

    def __init__(self) -> None:
        import threading

        self.go = threading.Semaphore(0)

    def run(self, phase, limits, labels):  # type: ignore[no-untyped-def]
        from selfprog.runners.base import PhaseOutcome
        from selfprog.scoring import RESULT_MARKER

        self.go.acquire(timeout=30)
        if phase.name == "train":
            return PhaseOutcome(0, 1.0, "", "")
        nonce = phase.stdin.split(b"\n", 1)[0].decode()
        line = f'{RESULT_MARKER} {nonce} {{"val_bpb": 2.5}}'
        return PhaseOutcome(0, 1.0, line, line)

    def stop_all(self, labels):  # type: ignore[no-untyped-def]
        return 0


def test_a_watcher_sees_each_running_job_in_its_phase(tmp_path: Path) -> None:
    """What `status --follow` and the dashboard read: the driver's jobs, train then evaluate."""
    import threading

    from selfprog.loop import Driver
    from selfprog.proposers.mutate import MutateProposer
    from selfprog.scheduler import make_scheduler

    run = make_run(tmp_path, "run.generations=1", "run.population=1", "selection.noise_seeds=1")
    runner = Gated()
    driver = Driver(run, MutateProposer(), make_scheduler(run, runner))  # type: ignore[arg-type]
    thread = threading.Thread(target=driver.drive, daemon=True)
    thread.start()
    watcher = Archive(run.root / ARCHIVE_FILE, readonly=True)

    def shown(expected: list[tuple[int, str]]) -> bool:
        for _ in range(300):
            if [(r.candidate, r.phase) for r in watcher.in_flight()] == expected:
                return True
            time.sleep(0.05)
        return False

    assert shown([(1, "train")])
    since = watcher.in_flight()[0].since
    runner.go.release()
    assert shown([(1, "evaluate")]) and watcher.in_flight()[0].since >= since
    while thread.is_alive():  # the rest: the seed's evaluation, the child
        runner.go.release()
        thread.join(0.05)
    assert watcher.in_flight() == [] and watcher.count() == 2


class RaisingProposer:
    """Raises what a model or client library might, for its first `failures` calls."""

    name = "raising"
    template = "propose.md"

    def __init__(self, failures: int):
        from selfprog.proposers.mutate import MutateProposer

        self.failures = failures
        self.calls = 0
        self.then = MutateProposer()

    def adopt(self, candidate_id: int | None, folder: Path | None) -> None:
        pass

    def propose(self, request, k):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError("CUDA out of memory.\nTried to allocate 2.00 GiB")
        return self.then.propose(request, k)


def test_what_a_proposer_raises_is_recorded_and_only_a_streak_stops_the_run(
    tmp_path: Path,
) -> None:
    from selfprog.loop import CALL_BREAKER, Driver
    from tests.fakes import FakeScheduler

    run = make_run(tmp_path, "run.generations=4", "run.population=1", "selection.noise_seeds=1")
    once = RaisingProposer(failures=1)
    assert drive_within(Driver(run, once, FakeScheduler(ok_unless(set())))) == "finished"
    states_now = [(c.generation, c.state, c.reason) for c in run.archive.candidates()]
    assert states_now[1] == (
        1,
        "invalid",
        "the proposer failed: the proposer raised RuntimeError: CUDA out of memory. Tried to "
        "allocate 2.00 GiB",
    )
    assert [s for _, s, _ in states_now[2:]] == ["ok"] * 3  # the run went on

    streak = make_run(
        tmp_path / "streak", "run.generations=5", "run.population=2", "selection.noise_seeds=1"
    )
    ended = drive_within(
        Driver(streak, RaisingProposer(failures=9), FakeScheduler(ok_unless(set())))
    )
    assert ended.startswith(f"stopped: the proposer raised on {CALL_BREAKER} calls in a row")
    assert "RuntimeError: CUDA out of memory" in ended and "resume once it is fixed" in ended
    # the call that tripped the breaker is not recorded: resume asks it again
    assert [c.state for c in streak.archive.candidates()] == ["ok"] + ["invalid"] * 4
    fixed = Driver(streak, RaisingProposer(failures=0), FakeScheduler(ok_unless(set())))
    assert drive_within(fixed) == "finished"
    check_complete(streak.root, 5, 2)


class FailingCleanup:
    """A scheduler whose engine fails when asked to remove the run's sandboxes, after the first."""

    def __init__(self, inner):  # type: ignore[no-untyped-def]
        self.inner = inner
        self.cleanups = 0

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.inner, name)

    def stop_all(self, labels):  # type: ignore[no-untyped-def]
        from selfprog.errors import RunnerError

        self.cleanups += 1
        if self.cleanups > 1:
            raise RunnerError("the Docker engine failed to remove this run's sandboxes")
        return 0


def test_an_engine_failing_as_the_run_stops_does_not_hide_why_it_stopped(tmp_path: Path) -> None:
    from selfprog.loop import BREAKER, Driver
    from selfprog.proposers.mutate import MutateProposer
    from tests.fakes import FakeScheduler

    run = make_run(tmp_path, "run.generations=3", "run.population=2", "selection.noise_seeds=1")
    engine_gone = FailingCleanup(
        FakeScheduler(
            lambda job: ok_unless(set())(job) if job.candidate_id == 1 else harness_error(job)
        )
    )
    ended = drive_within(Driver(run, MutateProposer(), engine_gone))
    assert ended.startswith(f"stopped: the harness failed on {BREAKER} candidates in a row")
    assert engine_gone.cleanups == 2
