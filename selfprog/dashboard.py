"""The live dashboard: a read-only web app over a run, or over a folder of runs (`selfprog serve`).

Every request opens the archive read-only and closes it again, so the
dashboard never writes to a run and sees each commit of its driver. The page
polls a small JSON summary and swaps in a server-rendered part when it
changed. Candidate and LM text is hostile: the templates escape everything,
ANSI escapes are stripped, long lines are cut, and the Content-Security-Policy
allows only the app's own script and styles.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, PackageLoader
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from selfprog.archive import ARCHIVE_FILE, ArchiveError
from selfprog.errors import SelfprogError
from selfprog.queries import lm_answer, progress_counts
from selfprog.rundir import Run, lock_holder, open_run
from selfprog.untrusted import ANSI, clean, printable

POLL_SECONDS = 3.0  # how often an open page asks whether the run changed
BEST_N = 10  # best candidates listed
LATEST_N = 12  # latest candidates listed, whatever their state
LOG_LINES = 400  # the last lines of a log tail shown
TEXT_CHARS = 200_000  # an LM answer or a diff is cut after this much
TITLE_CHARS = 600  # a lineage node's hover text is cut after this much
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
)
_TITLE = re.compile(r"<title>(.*?)</title>", re.DOTALL)  # escaped text: it holds no '<'

_render_lock = threading.Lock()  # matplotlib's pyplot is not thread-safe


def _clip(text: str, limit: int = TEXT_CHARS) -> str:
    return (
        text
        if len(text) <= limit
        else text[:limit] + f"\n[cut: {len(text) - limit} more characters]"
    )


def _tidy_svg(svg: str) -> str:
    """Returns the lineage tree without escapes or control characters and with each node's
    hover text cut (the report's tree escapes its text but keeps it whole)."""
    svg = printable(ANSI.sub("", svg))
    return _TITLE.sub(lambda m: f"<title>{_clip(m.group(1), TITLE_CHARS)}</title>", svg)


def plot_key(run: Run) -> str:
    """Returns what the progress plot depends on: candidates, finishes, verdicts, evaluations."""
    counts = progress_counts(run.archive)
    return hashlib.sha256(json.dumps(counts).encode()).hexdigest()[:16]


def proposal(run: Run, proposal_id: int | None) -> dict[str, str] | None:
    """Returns the LM's whole answer that made a candidate, and the error it had, if any."""
    if proposal_id is None:
        return None
    answer = lm_answer(run.archive, proposal_id)
    return None if answer is None else {"response": answer[0], "error": answer[1]}


def summary(run: Run) -> dict[str, Any]:
    """Returns the run's headline numbers, with a revision that changes whenever any does."""
    from selfprog.population import Population
    from selfprog.queries import headline

    archive = run.archive
    counts = archive.counts()
    seed_score, champion, change = headline(run)  # the champion: the best accepted
    floor = Population(run).noise_floor()
    holder = lock_holder(run.root)
    numbers: dict[str, Any] = {
        "run": run.root.name,
        "target": run.target.name,
        "metric": run.target.metric,
        "direction": run.target.direction,
        "driver": None if holder is None else holder.get("pid"),
        "driven": holder is not None,
        "generation": archive.last_generation(),
        "generations": run.config.run.generations,
        "candidates": sum(counts.values()),
        "counts": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        "seed_score": seed_score,
        "best": None
        if champion is None
        else {"candidate": champion.id, "score": champion.score, "rationale": champion.rationale},
        "change_percent": change,
        "noise_floor": {"sd": floor.sd, "candidates": floor.candidates, "dof": floor.dof},
        "noise_floor_text": str(floor),
        "tokens": archive.tokens_used(),
        "cost": archive.cost_used(),
        "active_seconds": float(archive.meta("active_seconds") or 0),
        "plot": plot_key(run),
        "running": [  # the jobs running now, each in its phase (none without a driver)
            {
                "candidate": r.candidate,
                "evaluation": r.evaluation,
                "phase": r.phase,
                "since": r.since,
            }
            for r in (archive.in_flight() if holder is not None else [])
        ],
    }
    numbers["revision"] = hashlib.sha256(
        json.dumps(numbers, sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    return numbers


class _Headers:
    """ASGI middleware: the security headers on every response."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class Dashboard:
    """The app's state: where the runs are, the templates, and the cached progress plots."""

    def __init__(self, path: Path, poll_seconds: float):
        self.path = path.resolve()
        self.single = (self.path / ARCHIVE_FILE).is_file()
        if self.single:
            open_run(self.path, readonly=True).archive.close()  # refuses a foreign or newer run now
        elif not self.path.is_dir():
            raise SelfprogError(f"{path}: no such folder")
        elif not self._names():
            raise SelfprogError(
                f"{path}: neither a run nor a folder of runs (no {ARCHIVE_FILE} in it "
                "or in a folder directly under it)"
            )
        self.poll_seconds = poll_seconds
        self.plots: dict[Path, tuple[str, bytes]] = {}
        self.templates = Environment(loader=PackageLoader("selfprog", "templates"), autoescape=True)
        self.templates.filters["clean"] = clean

    def _names(self) -> list[str]:
        return sorted(
            p.name
            for p in self.path.iterdir()
            if not p.name.startswith(".") and (p / ARCHIVE_FILE).is_file()
        )

    def folder(self, name: str) -> Path:
        """Returns the folder of a run this app serves, by name (404 for any other)."""
        if self.single and name == self.path.name:
            return self.path
        if not self.single and name in self._names():
            return self.path / name
        raise HTTPException(404, f"no run {name!r} here")

    @contextmanager
    def reading(self, name: str) -> Iterator[Run]:
        run = open_run(self.folder(name), readonly=True)
        try:
            yield run
        finally:
            run.archive.close()

    def page(self, template: str, **context: Any) -> HTMLResponse:
        html = self.templates.get_template(template).render(**context)
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    def plot(self, run: Run) -> bytes:
        """Returns the run's progress plot, drawn again only when what it shows changed."""
        from selfprog.report import progress_plot

        key = plot_key(run)
        with _render_lock:
            cached = self.plots.get(run.root)
            if cached is None or cached[0] != key:
                cached = self.plots[run.root] = (key, progress_plot(run))
        return cached[1]

    def live(self, run: Run) -> dict[str, Any]:
        """Returns what the live part of a run's page shows."""
        from selfprog.queries import top
        from selfprog.report import lineage_svg

        archive = run.archive
        latest = [s.id for s in archive.summaries()[-LATEST_N:]]
        return {
            "numbers": summary(run),
            "target": run.target,
            "lineage": _tidy_svg(lineage_svg(run, BEST_N)),
            "best": top(run, BEST_N, ("ok",)),
            "latest": list(reversed(archive.candidates(latest))),
        }

    # -- endpoints ------------------------------------------------------------

    def index(self, request: Request) -> Response:
        from selfprog.queries import list_runs

        if self.single:
            return RedirectResponse(f"/run/{quote(self.path.name)}/")
        return self.page("dashboard_index.html", root=str(self.path), runs=list_runs(self.path))

    def run_page(self, request: Request) -> Response:
        with self.reading(request.path_params["name"]) as run:
            return self.page(
                "dashboard_run.html",
                folder=not self.single,
                poll=self.poll_seconds,
                **self.live(run),
            )

    def live_part(self, request: Request) -> Response:
        with self.reading(request.path_params["name"]) as run:
            return self.page("dashboard_live.html", **self.live(run))

    def summary_json(self, request: Request) -> Response:
        with self.reading(request.path_params["name"]) as run:
            return JSONResponse(summary(run), headers={"Cache-Control": "no-store"})

    def plot_png(self, request: Request) -> Response:
        with self.reading(request.path_params["name"]) as run:
            png = self.plot(run)
        # the page asks for plot.png?v=<plot key>: one URL for one picture
        cache = "private, max-age=3600" if "v" in request.query_params else "no-store"
        return Response(png, media_type="image/png", headers={"Cache-Control": cache})

    def candidate_page(self, request: Request) -> Response:
        from selfprog.queries import lineage, show
        from selfprog.report import curve_svg, diff_html

        cid = int(request.path_params["cid"])
        if cid >= 2**63:  # beyond SQLite's integers: no such candidate
            raise HTTPException(404, f"no candidate {cid} in this run")
        with self.reading(request.path_params["name"]) as run:
            try:
                detail = show(run, cid)
            except ArchiveError:
                raise HTTPException(404, f"no candidate {cid} in this run") from None
            diff = clean(_clip(detail["diff"] or ""))
            seed = run.archive.seed()
            seed_curve = run.archive.first_curve(seed.id) if seed and seed.id != cid else []
            curves = [curve_svg(e["curve"], seed_curve) for e in detail["evaluations"]]
            return self.page(
                "dashboard_candidate.html",
                run=run.root.name,
                target=run.target,
                c=detail,
                diff=diff_html(diff),
                curves=curves,
                log_tail=clean(detail["log_tail"], lines=LOG_LINES),
                answer=proposal(run, run.archive.candidate(cid).proposal_id),
                chain=lineage(run, cid),
                clip=_clip,
            )


def _unreadable(request: Request, exc: Exception) -> Response:
    """A run that cannot be read right now (locked, damaged, removed): say so, in one line."""
    return Response(
        f"selfprog: cannot read the run: {exc}\n", status_code=503, media_type="text/plain"
    )


def make_app(
    path: Path, hosts: Sequence[str] = LOCAL_HOSTS, poll_seconds: float = POLL_SECONDS
) -> Starlette:
    """Returns the read-only dashboard of a run folder, or of a folder of runs.

    Args:
        hosts: the Host headers answered ("*": any); the default, loopback names
            only, keeps a web page elsewhere from reading the runs by DNS rebinding.

    Raises:
        SelfprogError: the folder is neither a run nor a folder of runs, or its run
            cannot be read (a newer selfprog's archive).
    """
    board = Dashboard(path, poll_seconds)
    get = ["GET"]  # HEAD comes with it; anything else is 405
    routes = [
        Route("/", board.index, methods=get, name="index"),
        Route("/run/{name}/", board.run_page, methods=get, name="run"),
        Route("/run/{name}/live", board.live_part, methods=get),
        Route("/run/{name}/summary.json", board.summary_json, methods=get),
        Route("/run/{name}/plot.png", board.plot_png, methods=get),
        Route("/run/{name}/candidate/{cid:int}", board.candidate_page, methods=get),
        Mount("/static", StaticFiles(packages=[("selfprog", "static")]), name="static"),
    ]
    return Starlette(
        routes=routes,
        middleware=[
            Middleware(_Headers),
            Middleware(TrustedHostMiddleware, allowed_hosts=list(hosts)),
        ],
        exception_handlers={SelfprogError: _unreadable, sqlite3.Error: _unreadable},
    )
