"""Reading a run: every verb on a short real run, the plot, the report in a real browser, errors."""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from selfprog.archive import ARCHIVE_FILE, Archive
from selfprog.rundir import CONFIG_FILE, driver_lock
from tests.conftest import ARTIFACTS

VERBS = ["top", "show", "diff", "lineage", "export", "ls-runs", "plot", "report"]


def selfprog(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "selfprog", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def ok(*args: str) -> str:
    done = selfprog(*args)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short real run (mutate, local runner, step budget) plus one recorded failure."""
    root = tmp_path_factory.mktemp("runs")
    flags = [
        "--proposer",
        "mutate",
        "--generations",
        "2",
        "--population",
        "2",
        "--budget-steps",
        "25",
        "--runner",
        "local",
        "--seed",
        "3",
    ]
    done = selfprog("run", "--run-dir", str(root / "short"), *flags)
    assert done.returncode == 0, done.stdout + done.stderr
    archive = Archive(root / "short" / ARCHIVE_FILE)
    with archive.transaction() as db:  # a failed child, as an LM's broken answer would leave
        archive.add_candidate(
            db,
            generation=2,
            parent_id=1,
            state="invalid",
            reason="no edits found",
            rationale="junk",
        )
    archive.close()
    return root / "short"


def fingerprint(folder: Path) -> dict[str, str]:
    """Returns the hash of every file but SQLite's transient -wal/-shm companions."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith(("-wal", "-shm"))
    }


def test_top_text_json_csv(run_dir: Path) -> None:
    text = ok("top", str(run_dir))
    lines = text.splitlines()
    assert lines[0].split() == [
        "id",
        "score",
        "spread",
        "evaluations",
        "generation",
        "parent",
        "state",
        "params",
        "rationale",
    ]
    rows = json.loads(ok("top", str(run_dir), "--json"))
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores) and len(rows) == len(lines) - 1 == 5
    assert lines[1].split()[:2] == [str(rows[0]["id"]), f"{rows[0]['score']:.5g}"]
    table = list(csv.DictReader(io.StringIO(ok("top", str(run_dir), "--csv"))))
    assert [int(r["id"]) for r in table] == [r["id"] for r in rows]
    failed = json.loads(ok("top", str(run_dir), "--state", "invalid", "--json"))
    assert [(r["state"], r["rationale"]) for r in failed] == [("invalid", "junk")]


def test_show_diff_and_lineage(run_dir: Path) -> None:
    best = json.loads(ok("top", str(run_dir), "-n", "1", "--json"))[0]
    child = next(
        r for r in json.loads(ok("top", str(run_dir), "--json")) if r["parent"] is not None
    )
    detail = json.loads(ok("show", str(run_dir), str(child["id"]), "--json"))
    scores = [e["score"] for e in detail["evaluations"] if e["state"] == "ok"]
    assert detail["state"] == "ok" and detail["score"] == pytest.approx(sum(scores) / len(scores))
    assert detail["proposer"]["proposer"] == "mutate" and detail["diff"].startswith("--- a/")
    text = ok("show", str(run_dir), str(child["id"]))
    assert text.startswith(
        f"candidate {child['id']}  generation {child['generation']}  parent {child['parent']}\nstate      ok\n"
    )
    assert detail["diff"].rstrip() in text
    assert ok("diff", str(run_dir), str(child["id"])) == detail["diff"]
    between = json.loads(ok("diff", str(run_dir), "1", str(child["id"]), "--json"))["diff"]
    assert between == detail["diff"] if child["parent"] == 1 else between.startswith("--- a/")
    chain = json.loads(ok("lineage", str(run_dir), str(best["id"]), "--json"))
    assert chain[0]["id"] == 1 and chain[0]["change"] is None and chain[-1]["id"] == best["id"]
    assert chain[0]["proposed_by"] == "" and {r["proposed_by"] for r in chain[1:]} <= {"mutate"}
    for before, after in itertools.pairwise(chain):
        assert after["change"] == pytest.approx(after["score"] - before["score"])
    failed = ok("show", str(run_dir), "6")
    assert "state      invalid: no edits found" in failed


def test_export_then_eval_scores_ok(run_dir: Path, tmp_path: Path) -> None:
    best = json.loads(ok("top", str(run_dir), "-n", "1", "--json"))[0]
    dest = tmp_path / "best"
    assert ok("export", str(run_dir), str(best["id"]), str(dest)).startswith(
        f"wrote candidate {best['id']}"
    )
    assert sorted(p.name for p in dest.iterdir()) == [
        "README.md",
        "evaluate.py",
        "model.py",
        "prepare.py",
        "target.toml",
        "train.py",
    ]
    result = json.loads(
        ok(
            "eval",
            str(dest),
            "--target",
            str(dest),
            "--runner",
            "local",
            "--budget-steps",
            "25",
            "--seed",
            "3",
            "--json",
        )
    )
    assert result["state"] == "ok"
    first = json.loads(ok("show", str(run_dir), str(best["id"]), "--json"))["evaluations"][0]
    assert first["seed"] == 3
    assert result["score"] == pytest.approx(first["score"], abs=1e-3)  # same seed, same steps


def test_ls_runs(run_dir: Path) -> None:
    rows = json.loads(ok("ls-runs", str(run_dir.parent), "--json"))
    assert [(r["run"], r["state"], r["candidates"]) for r in rows] == [("short", "finished", 6)]
    assert ok("ls-runs", str(run_dir.parent)).splitlines()[0].split() == [
        "run",
        "state",
        "target",
        "candidates",
        "best",
        "size_mb",
        "last_activity",
    ]


def test_plot_is_a_png(run_dir: Path, tmp_path: Path) -> None:
    ok("plot", str(run_dir), "-o", str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_status_and_report_show_the_noise_floor(run_dir: Path, tmp_path: Path) -> None:
    """The noise floor pooled over every candidate evaluated more than once, as the run stands."""
    from selfprog.selection import noise_floor

    db = sqlite3.connect(run_dir / ARCHIVE_FILE)
    repeats: dict[int, list[float]] = {}
    for candidate, score in db.execute(
        "SELECT candidate_id, score FROM evaluations WHERE state = 'ok'"
    ):
        repeats.setdefault(candidate, []).append(score)
    db.close()
    expected = noise_floor(repeats.values())
    assert expected.candidates >= 1 and expected.dof >= 2  # the seed's repeats at least
    status = json.loads(ok("status", str(run_dir), "--json"))["noise_floor"]
    assert status == {
        "sd": pytest.approx(expected.sd),
        "candidates": expected.candidates,
        "dof": expected.dof,
    }
    assert f"noise floor {expected}" in ok("status", str(run_dir)).splitlines()
    ok("report", str(run_dir), "-o", str(tmp_path / "report.html"))
    page = (tmp_path / "report.html").read_text()
    assert f'<p class="muted" id="noise-floor">noise floor {expected}:' in page


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_a_real_browser(run_dir: Path, tmp_path: Path) -> None:
    browser = chromium()
    if browser is None:
        if os.environ.get("SELFPROG_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is required here but not installed")
        pytest.skip("no chromium installed (Debian package `chromium`)")
    report = tmp_path / "report.html"
    ok("report", str(run_dir), "-o", str(report))
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert 'id="progress-plot"' in page and "data:image/png;base64,iVBOR" in page
    tree = page[page.index('<svg id="lineage"') : page.index("</svg>")]
    assert tree.count("<circle") == 6 and tree.count('class="edge"') == 5 and "node failed" in tree
    table = page[page.index('<table id="best">') : page.index("</table>")]
    assert table.count("<tr>") == 1 + 5
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    done = subprocess.run(
        [browser, *flags, "--window-size=1400,2200", f"--screenshot={shot}", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and shot.stat().st_size > 20_000, done.stderr[-2000:]
    from PIL import Image

    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200  # a rendered page, not a blank one


@pytest.mark.parametrize("verb", VERBS)
def test_every_inspect_verb_has_help(verb: str) -> None:
    done = selfprog(verb, "--help")
    assert done.returncode == 0 and done.stdout.startswith(f"usage: selfprog {verb}")


def assert_error(done: subprocess.CompletedProcess[str], expected: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("selfprog: error:") and expected in lines[0], (
        done.stderr
    )


def newer_copy(run_dir: Path, dest: Path) -> Path:
    """Returns a copy of a run whose archive says a newer selfprog (schema 99) wrote it."""
    shutil.copytree(run_dir, dest)
    db = sqlite3.connect(dest / ARCHIVE_FILE)
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    return dest


def test_errors_are_one_line_and_change_nothing(run_dir: Path, tmp_path: Path) -> None:
    with driver_lock(run_dir):  # a run being driven stays readable
        assert json.loads(ok("top", str(run_dir), "--json"))
    before = fingerprint(run_dir)
    assert_error(selfprog("top", str(tmp_path)), "not a selfprog run")
    assert_error(selfprog("show", str(run_dir), "999"), "no candidate 999 in this run")
    assert_error(selfprog("show", str(run_dir), "abc"), "'abc' is not a candidate id")
    assert_error(
        selfprog("export", str(run_dir), "6", str(tmp_path / "x")), "candidate 6 has no program"
    )

    newer = newer_copy(run_dir, tmp_path / "newer")
    assert_error(selfprog("top", str(newer)), "archive schema 99 is newer")
    assert_error(selfprog("status", str(newer), "--follow"), "archive schema 99 is newer")

    half = tmp_path / "half"
    shutil.copytree(run_dir, half)
    (half / CONFIG_FILE).unlink()
    assert_error(
        selfprog("report", str(half), "-o", str(tmp_path / "r.html")),
        "cannot read the run's frozen config",
    )

    locked = sqlite3.connect(run_dir / ARCHIVE_FILE)
    locked.execute("PRAGMA locking_mode=EXCLUSIVE")
    locked.execute("BEGIN EXCLUSIVE")
    try:
        assert_error(selfprog("top", str(run_dir)), "locked")
    finally:
        locked.rollback()
        locked.close()
    assert fingerprint(run_dir) == before
