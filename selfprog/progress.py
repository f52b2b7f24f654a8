"""Progress of a run: on a terminal, log lines scroll above a panel redrawn in place; else plain lines.

The panel and the log share one rich console (`console()`, on stderr):
a line logged while the panel is up is printed above it, never into it,
and what third-party code writes to stdout or stderr goes through it too.
Progress bars of other libraries (transformers' "Loading weights") are
switched off while the panel is up: they would scroll a copy per redraw.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
from typing import Any

from rich.console import Console
from rich.live import Live

from selfprog.panel import Running, Snapshot, View, plain, snapshot
from selfprog.rundir import Run, lock_holder

log = logging.getLogger("selfprog.run")

REFRESH = 2  # redraws per second
FOLLOW = 1.0  # seconds between reads of a followed run's archive


@functools.cache
def console() -> Console:
    """Returns the one console that the log and the panel share (stderr, resolved at each write)."""
    return Console(stderr=True)


def interactive() -> bool:
    """Returns whether stderr is a terminal a panel can be redrawn on (FORCE_COLOR alone, which
    makes rich treat any file as one, is not: a log file would get a copy per redraw)."""
    return sys.stderr.isatty() and console().is_terminal


def quiet_progress_bars() -> None:
    """Switches off Hugging Face's progress bars, in this process and those it starts."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers.utils.logging" in sys.modules:  # imported already: tell it directly
        sys.modules["transformers.utils.logging"].disable_progress_bar()


class Reporter:
    """Receives the driver's events, logs them, and keeps the panel up to date."""

    def __init__(self, run: Run, live: bool | None = None):
        self.run = run
        self.metric = run.target.metric
        self.live_enabled = interactive() if live is None else live
        self.generation = 0
        self.running: dict[tuple[int, int], Running] = {}
        self.began: dict[tuple[int, int], float] = {}  # when each job started, all its phases
        self.started = time.time()
        self.active_before = float(run.archive.meta("active_seconds") or 0)
        self.view = View(self._snapshot())
        self.live: Live | None = None

    def __enter__(self) -> Reporter:
        if self.live_enabled:
            quiet_progress_bars()
            self.live = Live(self.view, console=console(), refresh_per_second=REFRESH)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is None:
            return
        try:
            self.view.snap = self._snapshot()  # the panel left on screen is the final one
        except Exception as error:  # the driver's own error, if any, is the one to see
            log.debug("the final panel could not be read: %s", error)
        finally:
            with contextlib.suppress(OSError):  # the terminal closed (SIGHUP): nothing to redraw
                self.live.__exit__(None, None, None)

    def best_text(self) -> str:
        best = self.run.archive.best(self.run.target.minimize, 1, accepted=True)
        return f"{self.metric} {best[0].score:.4f} (candidate {best[0].id})" if best else "none yet"

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        key = (event.get("candidate", 0), event.get("evaluation", 0))
        if kind == "generation":
            self.generation = event["generation"]
            log.info(
                "generation %d: parents %s", self.generation, ", ".join(map(str, event["parents"]))
            )
        elif kind == "proposing":
            log.info("asking for %d children of candidate %d", event["k"], event["parent"])
        elif kind == "started":
            self.running[key] = Running(*key, "", time.time(), "")
            self.began[key] = time.time()
            again = f" again (evaluation {key[1] + 1})" if key[1] else ""
            log.info("candidate %d: scoring%s", key[0], again)
        elif kind == "phase" and key in self.running:
            self.running[key] = Running(*key, event["phase"], event["since"], "")
        elif kind == "finished":
            self.running.pop(key, None)
            started = self.began.pop(key, time.time())  # the job's start, not its last phase's
            if "state" in event:
                score = f" {self.metric} {event['score']:.4f}" if event["score"] is not None else ""
                log.info(
                    "candidate %d: %s%s in %.0fs; best %s",
                    key[0],
                    event["state"],
                    score,
                    time.time() - started,
                    self.best_text(),
                )
        elif kind == "accepted":
            log.info("candidate %d %s", event["candidate"], _accepted_text(event))
        elif kind == "final":
            log.info(
                "the run's end: confirming the best %d with more evaluations (candidates %s)",
                len(event["candidates"]),
                ", ".join(map(str, event["candidates"])),
            )
        if self.live is not None:
            self.view.snap = self._snapshot()

    def _snapshot(self) -> Snapshot:
        return snapshot(
            self.run,
            self.generation,
            sorted(self.running.values(), key=lambda r: (r.candidate, r.evaluation)),
            self.active_before + time.time() - self.started,
            driver=f"pid {os.getpid()}",
        )


def _accepted_text(event: dict[str, Any]) -> str:
    """Returns why a candidate was accepted, as the run log says it."""
    mean = f"mean {event['score']:.4f}"
    if event.get("why") == "final":
        return f"is the champion: {mean} over {event['evaluations']} evaluations, confirmed"
    if event.get("why") == "mean":
        return f"is the best so far: {mean} (the best few are confirmed at the run's end)"
    return f"is better clear of the noise: {mean}"


def follow(run: Run, every: float = FOLLOW) -> None:
    """Shows the panel of a run driven elsewhere, read from its archive, until its driver ends.

    On a terminal the panel is redrawn in place; otherwise a plain line is
    printed whenever it changes. A run that no one drives is shown once.
    """

    def read() -> tuple[Snapshot, bool]:
        holder = lock_holder(run.root)
        driver = f"pid {holder.get('pid')}" if holder is not None else ""
        running = run.archive.in_flight() if holder is not None else []  # else: a dead driver's
        return snapshot(run, running=running, driver=driver), holder is not None

    snap, driven = read()
    if not (interactive() and sys.stdout.isatty()):  # `--follow > file`: lines into the file
        shown = ""
        while True:
            if plain(snap) != shown:
                shown = plain(snap)
                print(shown, flush=True)
            if not driven:
                return
            time.sleep(every)
            snap, driven = read()
    view = View(snap)
    with Live(view, console=console(), refresh_per_second=REFRESH):
        while driven:
            time.sleep(every)
            view.snap, driven = read()
