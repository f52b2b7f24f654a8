"""Progress of a run: a live display on a terminal, one plain line per event otherwise."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from selfprog.archive import Archive

log = logging.getLogger("selfprog.run")


class Reporter:
    """Receives the driver's events and shows them."""

    def __init__(self, archive: Archive, metric: str, minimize: bool, live: bool | None = None):
        self.archive = archive
        self.metric = metric
        self.minimize = minimize
        self.live_enabled = sys.stderr.isatty() if live is None else live
        self.generation = 0
        self.running: dict[int, float] = {}
        self.live: Live | None = None

    def __enter__(self) -> Reporter:
        if self.live_enabled:
            self.live = Live(self._panel(), console=Console(stderr=True), refresh_per_second=2)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            with contextlib.suppress(OSError):  # the terminal closed (SIGHUP): nothing to redraw
                self.live.__exit__(None, None, None)

    def best_text(self) -> str:
        best = self.archive.best(self.minimize, 1, accepted=True)
        return f"{self.metric} {best[0].score:.4f} (candidate {best[0].id})" if best else "none yet"

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "generation":
            self.generation = event["generation"]
            log.info(
                "generation %d: parents %s", self.generation, ", ".join(map(str, event["parents"]))
            )
        elif kind == "proposing":
            log.info("asking for %d children of candidate %d", event["k"], event["parent"])
        elif kind == "started":
            self.running[event["candidate"]] = time.time()
            again = (
                f" again (evaluation {event['evaluation'] + 1})" if event.get("evaluation") else ""
            )
            log.info("candidate %d: scoring%s", event["candidate"], again)
        elif kind == "finished":
            started = self.running.pop(event["candidate"], time.time())
            score = f" {self.metric} {event['score']:.4f}" if event["score"] is not None else ""
            log.info(
                "candidate %d: %s%s in %.0fs; best %s",
                event["candidate"],
                event["state"],
                score,
                time.time() - started,
                self.best_text(),
            )
        elif kind == "accepted":
            log.info(
                "candidate %d is better clear of the noise: mean %.4f",
                event["candidate"],
                event["score"],
            )
        if self.live is not None:
            self.live.update(self._panel())

    def _panel(self) -> Table:
        counts = self.archive.counts()
        done = sum(n for state, n in counts.items() if state not in ("pending", "running"))
        table = Table.grid(padding=(0, 2))
        table.add_row("generation", str(self.generation))
        table.add_row("candidates", f"{done} done of {sum(counts.values())}")
        table.add_row("best", self.best_text())
        running = ", ".join(
            f"{c} ({time.time() - t:.0f}s)" for c, t in sorted(self.running.items())
        )
        table.add_row("running", running or "-")
        return table
