"""Training curves: what a training program reports of its progress, and when to stop it early.

A training program may print, on its stdout, lines of exactly this form:

    SELFPROG_PROGRESS <fraction> <loss>

`fraction` is how much of its budget it has used (a number in [0, 1], larger
than the one before), `loss` its own training loss then (lower is better). The
harness reads them as they come (other lines, malformed ones and fractions that
do not increase are ignored; past MAX_POINTS the curve is thinned) and keeps
the curve with the evaluation. A candidate's reports can only keep it alive or
end it: its score still comes only from the target's evaluator.

Pruning compares a child's curve with the seed's, the program the run began
with, evaluated `selection.noise_seeds` times: a child whose loss, at three
reports in a row (covering SPAN of the budget) from `after` of its budget to
LATEST, lies beyond the seed's mean at the same fraction by more than `z`
standard deviations of the seed's runs (in log loss, pooled over their
reports; at least about 10 %) is stopped and recorded `pruned`. Losses must be
positive for a rule to form. Only the seed's curves are a reference: a
candidate cannot get another pruned by what it reports. Where a rule applies,
a non-finite loss stops the child at once; the seed and repeats are never
stopped.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import threading
from collections.abc import Sequence
from dataclasses import dataclass

MARKER = "SELFPROG_PROGRESS"
_MARKER = MARKER.encode()
MAX_POINTS = 200  # reports kept per evaluation; later ones are ignored
MAX_LINE = 200  # bytes: a longer line is no report
MAX_TEXT = 16_384  # characters of a stored curve; a longer one is not ours
FLOOR = 0.1  # log loss: never pruned within ~10 % of the seed's loss, however small its noise
IN_A_ROW = 3  # reports past the limit, one after the other, before a candidate is stopped
SPAN = 0.05  # ... and covering at least this much of the budget, not a burst of reports
LATEST = 0.9  # no verdict from here on: stopping so late saves little and loses a finished run

Point = tuple[float, float]  # (fraction of the budget, training loss)


def parse_line(line: str) -> Point | None:
    """Returns (fraction, loss) of a progress report, or None for any other line."""
    parts = line.split()
    if len(parts) != 3 or parts[0] != MARKER:
        return None
    try:
        fraction, loss = float(parts[1]), float(parts[2])
    except ValueError:
        return None
    if not 0.0 <= fraction <= 1.0:  # nan fails too
        return None
    return fraction, loss


def at(curve: Sequence[Point], fraction: float) -> float | None:
    """Returns the curve's loss at a fraction, between its reports; None outside them."""
    for (f0, l0), (f1, l1) in itertools.pairwise(curve):
        if f0 <= fraction <= f1:
            return l0 + (l1 - l0) * (fraction - f0) / (f1 - f0)
    if curve and curve[-1][0] == fraction:  # a curve of one report
        return curve[-1][1]
    return None


@dataclass(frozen=True, slots=True)
class PruneRule:
    """When to stop a candidate: its curve clearly worse than the seed's at the same fraction.

    Losses are compared as logarithms (a relative gap means the same early and
    late in training). The seed's noise is its runs' spread about their mean,
    pooled over every report past `after`: two or three runs say little at one
    fraction, and together their thirty-odd reports say a good deal.
    """

    seed_curves: tuple[tuple[Point, ...], ...]  # one per evaluation of the seed, two or more
    after: float = 0.25  # no verdict before this fraction of the budget
    z: float = 3.0  # standard deviations of the seed's runs
    spread: float = 0.0  # the seed's runs' standard deviation of log loss, pooled

    @property
    def margin(self) -> float:
        """Returns how far past the seed's mean log loss a candidate's is stopped: z standard
        deviations of a new run's gap to a mean of k runs, never under FLOOR."""
        k = len(self.seed_curves)
        return max(self.z * self.spread * math.sqrt(1 + 1 / k), FLOOR)

    def log_limit(self, fraction: float) -> tuple[float, float] | None:
        """Returns (the seed's mean log loss, the log loss past which a candidate is stopped) at
        a fraction, or None where the seed's curves do not all reach it."""
        logs = _logs(self.seed_curves, fraction)
        if logs is None:
            return None
        mean = statistics.fmean(logs)
        return mean, mean + self.margin

    def limit(self, fraction: float) -> tuple[float, float] | None:
        """Returns log_limit's pair as losses."""
        found = self.log_limit(fraction)
        return None if found is None else (_exp(found[0]), _exp(found[1]))

    def verdict(self, points: Sequence[Point]) -> str:
        """Returns why a candidate with this curve should stop now, or "" (it goes on): its last
        reports, IN_A_ROW or more covering SPAN of the budget, all past the limit, the first
        at `after` or later, the last before LATEST."""
        if not points or points[-1][0] >= LATEST:
            return ""
        last = points[-1][0]
        start = next(
            (i for i in range(len(points) - 1, -1, -1) if points[i][0] <= last - SPAN), None
        )
        if start is None:
            return ""
        window = points[min(start, len(points) - IN_A_ROW) :]
        if len(window) < IN_A_ROW or window[0][0] < self.after:
            return ""
        for fraction, loss in window:
            found = self.log_limit(fraction)
            if found is None or loss <= 0 or math.log(loss) <= found[1]:
                return ""
        fraction, loss = points[-1]
        mean, limit = self.limit(fraction) or (0.0, 0.0)
        return (
            f"stopped at {fraction:.0%} of its budget: its training loss {loss:.4g} is past the "
            f"seed's {mean:.4g} by more than the noise of the seed's runs (limit {limit:.4g}), "
            f"{len(window)} reports in a row from {window[0][0]:.0%}"
        )


def _exp(value: float) -> float:
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf


def _logs(curves: Sequence[Sequence[Point]], fraction: float) -> list[float] | None:
    """Returns the curves' log losses at a fraction, or None unless every curve has a positive
    one there."""
    losses = [at(curve, fraction) for curve in curves]
    if any(loss is None or loss <= 0 for loss in losses):
        return None
    return [math.log(loss) for loss in losses if loss is not None]


def prune_rule(seed_curves: Sequence[Sequence[Point]], after: float, z: float) -> PruneRule | None:
    """Returns the rule the seed's curves make, or None while fewer than two have reports past
    `after` (or their losses are not all positive: a rule compares ratios)."""
    curves = tuple(tuple(c) for c in seed_curves if c)
    if len(curves) < 2:
        return None
    squares, dof = 0.0, 0
    for fraction, _ in curves[0]:
        logs = _logs(curves, fraction) if fraction >= after else None
        if logs is None:
            continue
        mean = statistics.fmean(logs)
        squares += sum((v - mean) ** 2 for v in logs)
        dof += len(logs) - 1
    if not dof:
        return None
    return PruneRule(curves, after, z, math.sqrt(squares / dof))


class Watch:
    """Reads a training phase's stdout as it comes: keeps its progress reports, and says when
    the phase should be stopped (the prune rule's verdict, or a non-finite loss where a rule
    applies; without one a curve is only kept).

    `write` takes raw chunks, as a `TailBuffer` does, from whichever thread
    copies the phase's output; `stopped` is set once, with `reason`. Only
    lines that can be reports are parsed, so a flood of output costs little;
    when MAX_POINTS are kept, every other one is dropped and later reports
    must be twice as far apart, so the curve always reaches the end.
    """

    def __init__(self, rule: PruneRule | None = None):
        self.rule = rule
        self.points: list[Point] = []
        self.reason = ""
        self.stopped = threading.Event()
        self._line = bytearray()
        self._overlong = False
        self._spacing = 0.0  # the least gap between kept reports, once thinned
        self._lock = threading.Lock()

    def write(self, chunk: bytes) -> None:
        with self._lock:
            if self.stopped.is_set():
                return
            head, newline, rest = chunk.partition(b"\n")
            self._add(head)
            if not newline:
                return
            self._end_line()
            body, _, tail = rest.rpartition(b"\n")  # whole lines, then the start of the next
            if _MARKER in body:
                for line in body.split(b"\n"):
                    if len(line) <= MAX_LINE and not self.stopped.is_set():
                        self._take(line)
            self._add(tail)

    def curve(self) -> list[Point]:
        with self._lock:
            return list(self.points)

    def _add(self, piece: bytes) -> None:
        if self._overlong or len(self._line) + len(piece) > MAX_LINE:
            self._overlong = True
            self._line.clear()
        else:
            self._line += piece

    def _end_line(self) -> None:
        line, overlong = bytes(self._line), self._overlong
        self._line.clear()
        self._overlong = False
        if not overlong:
            self._take(line)

    def _take(self, line: bytes) -> None:
        if _MARKER not in line:
            return
        point = parse_line(line.decode("ascii", errors="replace"))
        if point is None:
            return
        fraction, loss = point
        if self.points and fraction < self.points[-1][0] + max(self._spacing, 1e-12):
            return  # not past the last report (by the spacing, once thinned)
        if not math.isfinite(loss):
            if self.rule is not None:
                self._stop(f"its training loss was {loss} at {fraction:.0%} of its budget")
            return
        self.points.append(point)
        if len(self.points) >= MAX_POINTS:
            self.points = self.points[::2]
            self._spacing = max(2 * self._spacing, 2 / MAX_POINTS)
        if self.rule is not None:
            reason = self.rule.verdict(self.points)
            if reason:
                self._stop(reason)

    def _stop(self, reason: str) -> None:
        self.reason = reason
        self.stopped.set()


def load_curve(text: str | None) -> list[Point]:
    """Returns a curve stored in an archive (a JSON list of [fraction, loss]); [] for anything
    else (an archive may be foreign)."""
    if text and len(text) > MAX_TEXT:
        return []
    try:
        raw = json.loads(text) if text else []
    except (ValueError, RecursionError):
        return []
    if not isinstance(raw, list) or len(raw) > MAX_POINTS:
        return []
    curve: list[Point] = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2):
            return []
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in item):
            return []
        try:
            fraction, loss = float(item[0]), float(item[1])
        except OverflowError:  # an integer past what a float holds
            return []
        if not (0 <= fraction <= 1 and math.isfinite(loss)) or (curve and fraction <= curve[-1][0]):
            return []
        curve.append((fraction, loss))
    return curve


def sketch(curve: Sequence[Point], n: int = 5) -> str:
    """Returns a curve in short: its loss at about n evenly spread reports, e.g.
    `10% 2.31, 30% 1.92, 50% 1.70, 80% 1.52, 100% 1.44`."""
    if not curve:
        return ""
    picks = sorted({round(i * (len(curve) - 1) / max(n - 1, 1)) for i in range(n)})
    return ", ".join(f"{curve[i][0]:.0%} {curve[i][1]:.4g}" for i in picks)
