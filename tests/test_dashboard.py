"""The live dashboard (`selfprog serve`): its pages and JSON, hostile text, a real browser, errors."""

from __future__ import annotations

import hashlib
import os
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from selfprog.archive import ARCHIVE_FILE, Archive
from selfprog.config import load_config
from selfprog.dashboard import make_app
from selfprog.rundir import create_run
from selfprog.scoring import Result, State
from selfprog.untrusted import LINE_CHARS
from tests.test_inspect import newer_copy

HOSTILE = (
    "<script>alert(1)</script>\n"
    "\x1b[31mred\x1b[0m text \x1b]0;title\x07done\n" + "A" * 1_000_000 + "\nthe end"
)
DIFF = "--- a/model.py\n+++ b/model.py\n@@ -1,1 +1,1 @@\n-n_layer = 2\n+n_layer = 3\n"


def grow(run_dir: Path, score: float | None, accepted: bool = False, **fields: Any) -> int:
    """Adds one finished candidate to a run as the driver would: pending, running, then its result."""
    archive = Archive(run_dir / ARCHIVE_FILE)
    try:
        with archive.transaction() as db:
            cid = archive.add_candidate(db, generation=1, parent_id=1, state="pending", **fields)
        archive.mark_running(cid)
        if score is None:
            result = Result(State.TRAIN_FAILED, reason="boom", log_tail=fields.get("rationale", ""))
        else:
            result = Result(State.OK, score=score, metrics={"params": 1234}, log_tail="step 1\n")
        archive.finish(cid, result, seed=7)
        archive.set_accepted(cid, accepted)
    finally:
        archive.close()
    return cid


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run of three candidates: a seed evaluated twice, a better child, a hostile failure."""
    run = create_run(tmp_path / "runs" / "demo", load_config(None, ["runner.kind=local"]))
    archive = run.archive
    with archive.transaction() as db:
        seed = archive.add_candidate(db, generation=0, state="pending", rationale="the seed")
        call = archive.record_call(
            db, 1, seed, proposer="openai", model="fake-model", k=2, tokens_in=300, tokens_out=40
        )
        answer = archive.record_proposal(db, call, 1, HOSTILE, "deeper", 40, "")
    archive.finish(seed, Result(State.OK, score=3.0, log_tail="seed log\n"), seed=0)
    archive.add_evaluation(seed, Result(State.OK, score=3.2), seed=1)
    archive.set_accepted(seed, True)
    archive.close()
    grow(run.root, 2.8, accepted=True, diff=DIFF, rationale="deeper", proposal_id=answer)
    grow(run.root, None, rationale=HOSTILE)
    return run.root


def fingerprint(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


@pytest.fixture
def client(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """A client of the run's dashboard; the archive is only ever opened read-only, and must be
    exactly as it was afterwards."""
    import selfprog.archive

    opened = selfprog.archive.Archive.__init__
    modes: list[bool] = []

    def recording(self: Any, path: Path, readonly: bool = False) -> None:
        modes.append(readonly)
        opened(self, path, readonly)

    monkeypatch.setattr(selfprog.archive.Archive, "__init__", recording)
    before = fingerprint(run_dir / ARCHIVE_FILE)
    with TestClient(make_app(run_dir), base_url="http://127.0.0.1:8765") as test_client:
        yield test_client
    assert fingerprint(run_dir / ARCHIVE_FILE) == before
    assert modes and all(modes)  # a writer's open would migrate or add indexes


def test_the_run_page_and_its_json_show_the_archive(client: TestClient, run_dir: Path) -> None:
    page = client.get("/")
    assert page.history and page.history[0].status_code in (302, 307)  # to the run's page
    assert page.url.path == "/run/demo/" and page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    html = page.text
    assert '<b id="candidates-total">3</b>' in html
    assert '<b id="best-score">2.8000</b>' in html and '<b id="seed-score">3.1000</b>' in html
    assert '<script src="/static/dashboard.js" defer></script>' in html
    assert "<script>" not in html and " style=" not in html.split("<svg")[0]  # nothing inline

    reply = client.get("/run/demo/summary.json")
    assert reply.headers["content-type"] == "application/json"
    numbers = reply.json()
    db = sqlite3.connect(run_dir / ARCHIVE_FILE)
    counts = dict(db.execute("SELECT state, COUNT(*) FROM candidates GROUP BY state").fetchall())
    tokens = db.execute("SELECT SUM(tokens_in + tokens_out) FROM calls").fetchone()[0]
    db.close()
    assert numbers["counts"] == counts == {"ok": 2, "train_failed": 1}
    assert numbers["candidates"] == 3 and numbers["tokens"] == tokens == 340
    assert numbers["seed_score"] == pytest.approx(3.1)
    assert numbers["best"]["candidate"] == 2 and numbers["best"]["score"] == pytest.approx(2.8)
    assert numbers["change_percent"] == pytest.approx((2.8 - 3.1) / 3.1 * 100)
    assert numbers["noise_floor"]["candidates"] == 1 and numbers["noise_floor"]["dof"] == 1
    assert numbers["driven"] is False
    assert client.get("/run/demo/summary.json").json()["revision"] == numbers["revision"]

    live = client.get("/run/demo/live").text
    assert live.count("<circle") == 3 and '<b id="candidates-total">3</b>' in live
    assert (
        client.get("/static/dashboard.js")
        .headers["content-type"]
        .startswith(("text/javascript", "application/javascript"))
    )
    assert client.get(f"/run/demo/plot.png?v={numbers['plot']}").content[:4] == b"\x89PNG"


def test_a_candidate_page_shows_its_diff_evaluations_and_proposal(client: TestClient) -> None:
    html = client.get("/run/demo/candidate/2").text
    assert '<span class="del">-n_layer = 2</span><span class="add">+n_layer = 3</span>' in html
    assert "fake-model" in html and "sample 2 of 2" in html and "300 tokens in" in html
    assert "the LM's whole answer" in html and "&lt;script&gt;alert(1)" in html
    lineage = html[html.index('<section id="lineage">') :]
    assert '<a href="1">1</a>' in lineage and "-0.3000" in lineage
    seed = client.get("/run/demo/candidate/1").text
    evaluations = seed[seed.index('<section id="evaluations">') : seed.index('<section id="diff">')]
    assert evaluations.count("<tr>") == 1 + 2
    assert "3.0000" in evaluations and "3.2000" in evaluations
    assert "seed log" in seed


def test_hostile_text_is_escaped_stripped_and_cut(client: TestClient) -> None:
    for url in ("/run/demo/candidate/3", "/run/demo/candidate/2", "/run/demo/", "/run/demo/live"):
        html = client.get(url).text
        assert "<script>alert" not in html, url
        assert "\x1b" not in html and "\x07" not in html, url
        assert len(html) < 100_000, url  # the megabyte line is cut
    page = client.get("/run/demo/candidate/3").text
    log = page[page.index('<pre class="log" id="log-tail">') :]
    assert log.startswith('<pre class="log" id="log-tail">&lt;script&gt;alert(1)&lt;/script&gt;\n')
    assert "red text done\n" in log  # the escapes gone, the text kept
    assert f"{'A' * LINE_CHARS}… [{1_000_000 - LINE_CHARS} more characters]" in log
    assert "the end" in log
    rationale = page[page.index('id="rationale">') :]
    assert rationale.startswith('id="rationale">&lt;script&gt;alert(1)&lt;/script&gt;\nred text')


def test_only_reading_is_allowed(client: TestClient) -> None:
    for method, url in [
        ("POST", "/run/demo/summary.json"),
        ("PUT", "/run/demo/"),
        ("DELETE", "/run/demo/candidate/2"),
        ("POST", "/"),
        ("POST", "/static/dashboard.js"),
    ]:
        assert client.request(method, url).status_code == 405, (method, url)
    assert client.get("/run/demo/candidate/99").status_code == 404
    assert client.get("/run/demo/candidate/abc").status_code == 404
    assert client.get(f"/run/demo/candidate/{10**23}").status_code == 404
    assert client.get("/run/other/").status_code == 404
    assert client.get("/run/demo/", headers={"host": "evil.example"}).status_code == 400


def test_the_plot_is_drawn_again_only_when_the_run_changed(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import selfprog.report

    drawn: list[int] = []
    real = selfprog.report.progress_plot
    monkeypatch.setattr(selfprog.report, "progress_plot", lambda run: drawn.append(1) or real(run))
    client = TestClient(make_app(run_dir), base_url="http://127.0.0.1")
    first = client.get("/run/demo/plot.png").content
    assert first[:4] == b"\x89PNG" and client.get("/run/demo/plot.png").content == first
    client.get("/run/demo/summary.json")
    assert len(drawn) == 1
    key = client.get("/run/demo/summary.json").json()["plot"]
    grow(run_dir, 2.9)
    assert client.get("/run/demo/summary.json").json()["plot"] != key
    assert client.get("/run/demo/plot.png").content != first and len(drawn) == 2


def test_a_folder_of_runs_has_an_index(run_dir: Path) -> None:
    shutil.copytree(run_dir, run_dir.parent / "second")
    (run_dir.parent / "notes").mkdir()
    client = TestClient(make_app(run_dir.parent), base_url="http://127.0.0.1")
    html = client.get("/").text
    assert '<a href="/run/demo/">demo</a>' in html and '<a href="/run/second/">second</a>' in html
    assert "notes" not in html
    assert client.get("/run/second/summary.json").json()["candidates"] == 3
    assert 'href="/">all runs</a>' in client.get("/run/second/").text
    assert client.get("/run/notes/").status_code == 404


# -- the command ------------------------------------------------------------------------------


def selfprog(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "selfprog", *args], capture_output=True, text=True, timeout=60
    )


def assert_error(done: subprocess.CompletedProcess[str], expected: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("selfprog: error:"), done.stderr
    assert expected in lines[0] and done.stdout == "", done.stderr


def test_bad_input_is_one_line_and_serves_nothing(run_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_error(
            selfprog("serve", str(run_dir), "--port", str(port)),
            f"cannot serve on 127.0.0.1:{port}: Address already in use",
        )
    (tmp_path / "empty").mkdir()
    assert_error(selfprog("serve", str(tmp_path / "empty")), "neither a run nor a folder of runs")
    assert_error(selfprog("serve", str(tmp_path / "nowhere")), "no such folder")
    newer = newer_copy(run_dir, tmp_path / "newer")
    assert_error(selfprog("serve", str(newer), "--port", "0"), "archive schema 99 is newer")


def test_it_serves_this_machine_only_by_default() -> None:
    from selfprog.cli import build_parser
    from selfprog.cli.serve import allowed_hosts

    args = build_parser().parse_args(["serve", "runs"])
    assert (args.host, args.port) == ("127.0.0.1", 8765)
    assert "*" not in allowed_hosts(args.host) and allowed_hosts("0.0.0.0") == ["*"]
    usage = selfprog("serve", "--help").stdout
    assert "8765" in usage and "127.0.0.1" in usage


# -- a real browser on a growing run ---------------------------------------------------------


def chromium() -> str:
    """Returns the Chromium to drive, or skips (fails where SELFPROG_REQUIRE_CHROMIUM is set)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    missing = "no chromium installed (Debian package `chromium`)" if browser is None else ""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = missing or "no playwright to drive chromium (pip install playwright)"
    if missing:
        if os.environ.get("SELFPROG_REQUIRE_CHROMIUM"):
            pytest.fail(f"chromium is required here: {missing}")
        pytest.skip(missing)
    assert browser is not None
    return browser


# a function, not an expression: the page's CSP refuses the eval() an expression would need
LOADED = "() => document.getElementById('progress-plot').naturalWidth > 0"


@pytest.fixture
def served(run_dir: Path) -> Iterator[str]:
    """`selfprog serve RUN --port 0` running; yields its URL; stops it with Ctrl-C (SIGINT)."""
    server = subprocess.Popen(
        [sys.executable, "-m", "selfprog", "serve", str(run_dir), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        ready, _, _ = select.select([server.stdout], [], [], 30)
        line = server.stdout.readline() if ready else ""
        assert line.startswith(f"serving {run_dir} at http://127.0.0.1:"), line
        yield line.split(" at ")[1].split()[0]
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=15)
        assert server.returncode == 0 and out.strip() == "stopped", out + err
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_an_open_page_follows_the_growing_run_in_a_real_browser(run_dir: Path, served: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    browser_path = chromium()
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(served)
            assert page.url == f"{served}run/demo/"
            assert page.inner_text("#candidates-total") == "3"
            assert page.inner_text("#best-score") == "2.8000"
            plot = page.get_attribute("#progress-plot", "src")
            page.wait_for_function(LOADED)
            page.evaluate("window.notReloaded = true")

            grow(run_dir, 2.95, rationale="a little worse")
            better = grow(run_dir, 2.5, accepted=True, rationale="<b>much</b> better")
            expect(page.locator("#candidates-total")).to_have_text("5", timeout=20_000)
            assert page.inner_text("#best-score") == "2.5000"
            assert page.inner_text("#best-id") == f"candidate {better}"
            assert page.evaluate("window.notReloaded") is True  # swapped in, not reloaded
            assert page.get_attribute("#progress-plot", "src") != plot
            page.wait_for_function(LOADED)
            assert "<b>much</b> better" in page.inner_text("#latest")  # shown as text
            assert page.locator("#latest b").count() == 0
            assert "live: checked at" in page.inner_text("#poll-status")
            page.click(f"#best a[href='candidate/{better}']")
            assert page.inner_text("#score") == "2.5000"
            assert problems == []  # no script or style refused by the CSP, no error
        finally:
            browser.close()
