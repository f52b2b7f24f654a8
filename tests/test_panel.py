"""The live panel: one panel redrawn in place under the log, in a real pseudo-terminal, and --follow."""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pyte
import pytest
from rich.console import Console

from selfprog.archive import ARCHIVE_FILE, Archive
from selfprog.cli.common import setup_logging
from selfprog.panel import TITLE, Running, Snapshot, View, plain
from selfprog.rundir import lock_holder
from selfprog.untrusted import clean, one_line

COLUMNS, LINES = 150, 45
SELFPROG = [sys.executable, "-m", "selfprog"]
SEED_ALONE = ["--set", "run.max_candidates=1"]
SHORT = ["--population", "2", "--budget-steps", "25", "--runner", "local", "--seed", "3"]
SHORT += ["--set", "selection.noise_seeds=2", "--set", "selection.confirm_seeds=1"]  # fewer repeats


def run_in_terminal(*args: str, timeout: float = 600) -> tuple[int, list[str]]:
    """Runs selfprog in a pseudo-terminal of COLUMNS x LINES; returns its exit code and every
    line the terminal showed, scrolled off the top or still on the screen, as an emulator draws them."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, COLUMNS, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
    env["TERM"] = "xterm-256color"
    process = subprocess.Popen(
        [sys.executable, "-m", "selfprog", *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        close_fds=True,
    )
    os.close(slave)
    screen = pyte.HistoryScreen(COLUMNS, LINES, history=100_000)
    stream = pyte.ByteStream(screen)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            stream.feed(chunk)
        elif process.poll() is not None:
            break
    else:
        process.kill()
        pytest.fail(f"selfprog {' '.join(args)} ran past {timeout}s")
    os.close(master)
    code = process.wait(timeout=30)

    def text(line: dict[int, pyte.screens.Char]) -> str:
        return "".join(line[x].data for x in range(COLUMNS)).rstrip()

    shown = [text(line) for line in screen.history.top] + [line.rstrip() for line in screen.display]
    while shown and not shown[-1]:
        shown.pop()
    return code, shown


def panel_rows(lines: list[str]) -> dict[str, str]:
    """Returns the panel's rows by label, read from the drawn box."""
    start = next(i for i, line in enumerate(lines) if line.lstrip("╭─ ").startswith(TITLE))
    found: dict[str, str] = {}
    for line in lines[start + 1 :]:
        if line.startswith("╰"):
            break
        inner = line.strip("│ ")
        label, _, value = inner.partition("  ")
        if label:
            found[label.strip()] = value.strip()
    return found


def test_a_resumed_run_in_a_terminal_shows_one_panel_below_its_log(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = subprocess.run(
        [*SELFPROG, "run", "--run-dir", str(run_dir), "--generations", "1", *SHORT],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert first.returncode == 0, first.stderr
    code, lines = run_in_terminal("resume", str(run_dir), "--generations", "2")
    assert code == 0, "\n".join(lines)
    titles = [i for i, line in enumerate(lines) if f"{TITLE} · {run_dir.name}" in line]
    assert len(titles) == 1, "\n".join(lines)  # redrawn in place: never a second copy
    top = titles[0]
    logged = [i for i, line in enumerate(lines) if "candidate" in line and ": ok" in line]
    assert logged and max(logged) < top  # every log line scrolled above the panel
    assert "resuming" in "\n".join(lines[:top])
    rows = panel_rows(lines)
    archive = Archive(run_dir / ARCHIVE_FILE, readonly=True)
    counts = archive.counts()
    assert rows["generation"] == f"{archive.last_generation()} of 2" == "2 of 2"  # not 0
    assert rows["candidates"].startswith(f"{sum(counts.values())} done, 0 queued, 0 running")
    best = archive.best(True, 1, accepted=True)[0]
    assert rows["best"].startswith(f"val_bpb {best.score:.4f} (candidate {best.id})")
    assert rows["running"] == "-" and rows["proposer"] == "0 tokens"
    assert "driver" not in rows  # the driver drew it
    summary = "\n".join(lines[top:])
    assert "inspect with: selfprog status" in summary  # the summary comes after the panel


def test_follow_shows_a_run_driven_elsewhere_until_it_ends(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    driver = subprocess.Popen(
        [*SELFPROG, "run", "--run-dir", str(run_dir), "--generations", "1", *SHORT],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(600):  # until the driver holds the run
            if (run_dir / ARCHIVE_FILE).exists() and lock_holder(run_dir) is not None:
                break
            time.sleep(0.1)
        code, lines = run_in_terminal("status", str(run_dir), "--follow")
    finally:
        driver.wait(timeout=600)
    assert code == 0 and driver.returncode == 0
    titles = [i for i, line in enumerate(lines) if f"{TITLE} · {run_dir.name}" in line]
    assert len(titles) == 1, "\n".join(lines)
    rows = panel_rows(lines)
    archive = Archive(run_dir / ARCHIVE_FILE, readonly=True)
    assert rows["generation"] == "1 of 1"
    assert rows["candidates"].startswith(f"{archive.count()} done, 0 queued, 0 running")
    assert rows["driver"].startswith("none")  # it ended, so the follower did


def test_follow_off_a_terminal_prints_a_line_per_change(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [*SELFPROG, "run", "--run-dir", str(run_dir), "--generations", "1", *SHORT, *SEED_ALONE],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    followed = subprocess.run(
        [sys.executable, "-m", "selfprog", "status", str(run_dir), "--follow"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert followed.returncode == 0, followed.stderr
    lines = followed.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("generation 0 of 1; candidates 1 done")
    assert "driver none" in lines[0]


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: p.mkdir(), "not a selfprog run"),
        (lambda p: None, "no such"),
    ],
)
def test_follow_refuses_what_is_not_a_run(tmp_path: Path, make, expected: str) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "x"
    make(folder)
    done = subprocess.run(
        [sys.executable, "-m", "selfprog", "status", str(folder), "--follow"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("selfprog: error:")
    assert expected in lines[0], done.stderr


HOSTILE = "<script>alert(1)</script> \x1b[2J\x1b[31m[bold red]marked[/] " + "x" * 1_000_000


def snap(**changes: object) -> Snapshot:
    base = dict(
        run="r",
        target="tinylm",
        metric="val_bpb",
        generation=1,
        generations=4,
        done=3,
        queued=1,
        running=(Running(7, 0, "train", time.time() - 5, "\x1b]0;pwned\x07host"),),
        best=(2, 3.0, HOSTILE),
        seed_score=3.3,
        noise="-",
        active_seconds=0.0,
        tokens=12345,
        cost=0.0,
        expected=17,
        max_hours=0.0,
        budget_seconds=30.0,
        budget_steps=0,
        driver="pid 1",
    )
    return Snapshot(**{**base, **changes})  # type: ignore[arg-type]


def test_candidate_text_in_the_panel_is_cleaned_trimmed_and_never_markup() -> None:
    console = Console(
        file=io.StringIO(), width=120, record=True, force_terminal=True, color_system="truecolor"
    )
    console.print(View(snap()))
    drawn = console.export_text()
    raw = console.export_text(styles=True)
    assert "\x1b[2J" not in raw and "\x1b]0;" not in raw and "pwned" not in drawn
    assert "7  train    5s of 30s on host" in drawn  # the escape went, the node's name stayed
    assert "[bold red]marked[/]" in drawn  # shown as written, not read as markup
    assert len(drawn) < 4000  # a megabyte line is not drawn whole
    assert "-9.1% from the seed's 3.3000" in drawn
    line = plain(snap())
    assert "\x1b" not in line and len(line) < 1000


def test_log_lines_are_cleaned_of_escapes_and_giant_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_logging(False)  # as the command sets it up
    logging.getLogger("selfprog.run").error("stopped: %s", HOSTILE)
    text = capsys.readouterr().err
    assert "stopped: <script>" in text and "[bold red]marked[/]" in text
    assert "\x1b" not in text and len(text) < 5000 and "more characters]" in text


def test_an_escape_left_open_hides_nothing_after_it() -> None:
    shown = clean("line1 visible\n\x1b]hidden\nEVIDENCE\nfinal")
    assert shown == "line1 visible\nhidden\nEVIDENCE\nfinal"
    assert one_line("best \x1b]0;title  rest") == "best 0;title rest"
    assert clean("a\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\b") == "alinkb"  # ended: all gone


def test_a_snapshot_estimates_the_time_left_from_the_rate() -> None:
    half = snap(done=8, expected=17, active_seconds=800.0)
    assert half.per_hour == pytest.approx(36.0)
    assert half.left_seconds() == pytest.approx(900.0)  # 9 to go at 36 an hour
    capped = snap(done=8, expected=17, active_seconds=800.0, max_hours=0.25)
    assert capped.left_seconds() == pytest.approx(100.0)
    assert snap(expected=0).left_seconds() is None
    assert json.dumps(half.change()) == json.dumps((3.0 - 3.3) / 3.3 * 100)


def test_other_progress_bars_are_off_while_the_panel_is_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers.utils.logging as hf_logging

    from selfprog.config import load_config
    from selfprog.progress import Reporter
    from selfprog.rundir import create_run

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    hf_logging.enable_progress_bar()
    run = create_run(tmp_path / "run", load_config(None, ["runner.kind=local"]))
    with Reporter(run, live=False):
        assert hf_logging.is_progress_bar_enabled()  # plain lines: nothing to protect
    with Reporter(run, live=True):
        assert not hf_logging.is_progress_bar_enabled()  # "Loading weights" would scroll copies
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # and in what it starts
    hf_logging.enable_progress_bar()


def test_the_log_line_gives_the_candidates_time_not_its_last_phases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import time

    from selfprog.config import load_config
    from selfprog.progress import Reporter
    from selfprog.rundir import create_run

    run = create_run(tmp_path / "run", load_config(None, ["runner.kind=local"]))
    now = [1000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    caplog.set_level("INFO", logger="selfprog")
    with Reporter(run, live=False) as reporter:
        reporter({"event": "started", "candidate": 2, "evaluation": 0})
        now[0] += 63  # trained for 63 s
        reporter(
            {
                "event": "phase",
                "candidate": 2,
                "evaluation": 0,
                "phase": "evaluate",
                "since": now[0],
            }
        )
        now[0] += 18  # evaluated for 18 s
        reporter(
            {"event": "finished", "candidate": 2, "evaluation": 0, "state": "ok", "score": 1.5}
        )
    assert "candidate 2: ok val_bpb 1.5000 in 81s" in caplog.text
