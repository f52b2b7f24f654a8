"""The loop for real: a short run in Docker, interrupted (Ctrl-C, then kill -9) and resumed."""

from __future__ import annotations

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
from selfprog.loop import allocate, derive_seed
from selfprog.rundir import driver_lock

RUN_FLAGS = [
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
    best = archive.best(minimize=True)[0]
    assert seed is not None and best.score is not None and best.score <= seed
    children = candidates[1:]
    assert all(
        c.parent_id is not None and c.diff.startswith("--- a/") for c in children if c.state == "ok"
    )
    calls = archive.db.execute("SELECT generation, parent_id, k FROM calls ORDER BY id").fetchall()
    assert tuple(calls[0]) == (1, 1, 2)  # generation 1: the seed is the only parent
    assert sum(r[2] for r in calls) == 6
    assert archive.db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0] == sum(
        1 for c in candidates if c.state not in ("invalid", "duplicate")
    )
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


def test_allocate_and_seeds() -> None:
    assert allocate([5, 3], 4) == [(5, 2), (3, 2)]
    assert allocate([5, 3, 9], 4) == [(5, 2), (3, 1), (9, 1)]
    assert allocate([5, 3], 1) == [(5, 1)]
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2) != derive_seed(0, 2, 1)
