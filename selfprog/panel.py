"""The run's panel: where a run stands, from its archive, drawn the same for its driver and a watcher.

`snapshot` reads what the panel shows from the archive (so it is right
after a resume, and the same for `selfprog status --follow` as for the
driver's own display); `View` draws a snapshot, and counts the running
candidates' elapsed time at each redraw, so that a live display ticks
between reads. Candidate and LM text is cleaned before it is drawn (it is
never read as markup).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console, ConsoleOptions, RenderResult
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from selfprog.phases import Running
from selfprog.population import Population
from selfprog.queries import headline
from selfprog.rundir import Run
from selfprog.states import UNFINISHED
from selfprog.untrusted import one_line

TITLE = "selfprog"  # the panel's top border starts with it: a test counts panels by it


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the panel shows, read at one moment."""

    run: str
    target: str
    metric: str
    generation: int
    generations: int
    done: int  # candidates in a final state
    queued: int
    running: tuple[Running, ...]
    best: tuple[int, float, str] | None  # the accepted best: candidate, score, rationale
    seed_score: float | None
    noise: str
    active_seconds: float
    tokens: int
    cost: float
    expected: int  # candidates the run will make in all (0: open-ended)
    max_hours: float
    budget_seconds: float
    budget_steps: int
    driver: str  # who drives the run ("" when no one does)

    @property
    def per_hour(self) -> float:
        return self.done / self.active_seconds * 3600 if self.active_seconds > 60 else 0.0

    def change(self) -> float | None:
        """Returns the best's change from the seed, in percent."""
        if self.best is None or not self.seed_score:
            return None
        return (self.best[1] - self.seed_score) / abs(self.seed_score) * 100

    def left_seconds(self) -> float | None:
        """Returns an estimate of the driving time left, for a run of a fixed size or length."""
        estimates = []
        if self.expected and self.per_hour:
            estimates.append(max(self.expected - self.done, 0) / self.per_hour * 3600)
        if self.max_hours:
            estimates.append(max(self.max_hours * 3600 - self.active_seconds, 0.0))
        return min(estimates) if estimates else None


def snapshot(
    run: Run,
    generation: int = 0,
    running: Sequence[Running] | None = None,
    active_seconds: float | None = None,
    driver: str = "",
) -> Snapshot:
    """Reads where the run stands; the driver passes what it knows better than its archive."""
    archive = run.archive
    counts = archive.counts()
    unfinished = sum(counts.get(state, 0) for state in UNFINISHED)
    settings = run.config.run
    expected = 1 + settings.generations * settings.population
    if settings.max_candidates:
        expected = min(expected, settings.max_candidates)
    seed_score, best, _ = headline(run)
    seconds, steps = run.budget()
    now_running = tuple(running if running is not None else archive.in_flight())
    return Snapshot(  # names are the user's, but a folder's name can hold an escape too
        run=one_line(run.root.name, 80),
        target=one_line(run.target.name, 40),
        metric=one_line(run.target.metric, 40),
        generation=max(generation, archive.last_generation()),
        generations=settings.generations,
        done=sum(counts.values()) - unfinished,
        queued=counts.get("pending", 0),
        running=now_running,
        best=(best.id, float(best.score or 0.0), best.rationale) if best else None,
        seed_score=seed_score,
        noise=str(Population(run).noise_floor()),
        active_seconds=float(archive.meta("active_seconds") or 0)
        if active_seconds is None
        else active_seconds,
        tokens=archive.tokens_used(),
        cost=archive.cost_used(),
        expected=expected,
        max_hours=settings.max_hours,
        budget_seconds=seconds,
        budget_steps=steps,
        driver=driver,
    )


def _duration(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _running_text(snap: Snapshot, now: float) -> Text:
    if not snap.running:
        return Text("-")
    lines = []
    for r in snap.running:
        elapsed = _duration(now - r.since) if r.since else "?"
        phase = r.phase or "running"
        if r.phase == "train" and snap.budget_seconds:
            elapsed += f" of {_duration(snap.budget_seconds)}"
        elif r.phase == "train" and snap.budget_steps:
            elapsed += f" ({snap.budget_steps} steps)"
        where = f" on {one_line(r.node, 30)}" if r.node else ""
        again = f" (repeat {r.evaluation})" if r.evaluation else ""
        lines.append(f"{r.candidate:>5}  {phase:<8} {elapsed}{where}{again}")
    return Text("\n".join(lines))


def rows(snap: Snapshot, now: float) -> list[tuple[str, Text]]:
    """Returns the panel's rows: a label and its (plain, cleaned) text."""
    of = f" of {snap.generations}" if snap.generations else ""
    rate = f"; {snap.per_hour:.0f} per hour" if snap.per_hour else ""
    running = len(snap.running)
    found = [
        ("generation", Text(f"{snap.generation}{of}")),
        ("candidates", Text(f"{snap.done} done, {snap.queued} queued, {running} running{rate}")),
    ]
    if snap.best is not None:
        candidate, score, rationale = snap.best
        change = snap.change()
        versus = (
            f", {change:+.1f}% from the seed's {snap.seed_score:.4f}" if change is not None else ""
        )
        found.append(("best", Text(f"{snap.metric} {score:.4f} (candidate {candidate}){versus}")))
        found.append(("", Text(one_line(rationale, 90))))
    else:
        found.append(("best", Text("none yet")))
    found.append(("noise floor", Text(snap.noise)))
    found.append(("running", _running_text(snap, now)))
    spent = f", estimated cost {snap.cost:.4g}" if snap.cost else ""
    found.append(("proposer", Text(f"{snap.tokens:,} tokens{spent}")))
    left = snap.left_seconds()
    if left is not None:
        found.append(("time left", Text(f"about {_duration(left)}")))
    if not snap.driver:
        found.append(("driver", Text("none: the run is not being driven")))
    return found


class View:
    """A snapshot as a rich renderable; elapsed times are counted when it is drawn."""

    def __init__(self, snap: Snapshot):
        self.snap = snap

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        for label, text in rows(self.snap, time.time()):
            table.add_row(label, text)
        title = Text(f"{TITLE} · {self.snap.run} · {self.snap.target}")
        yield Panel(table, title=title, title_align="left", expand=False)


def plain(snap: Snapshot) -> str:
    """Returns the panel as one line (elapsed times left out, so that it changes only with the run)."""
    parts = []
    for label, text in rows(snap, 0.0):
        if label and label != "running":
            parts.append(f"{label} {text.plain}")
    parts.append(f"running {', '.join(str(r.candidate) for r in snap.running) or '-'}")
    return "; ".join(parts)
