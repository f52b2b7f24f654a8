"""Pictures of a run: the progress plot, the lineage tree, and the self-contained HTML report."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from markupsafe import Markup

from selfprog.curves import Point, sketch
from selfprog.population import Population
from selfprog.queries import headline, top
from selfprog.rundir import Run
from selfprog.states import FAILED
from selfprog.untrusted import one_line

FAILED_COLOUR = "#d62728"
PLOT_POINTS = 5000  # candidates drawn as points (scored, and failed); more: an even sample of them
PLOT_LABELS = 12  # improvements labelled with their rationale; more: the largest of them
TREE_NODES = 400  # candidates drawn in the tree; more: the lineages of the best and the accepted


def _even_sample(items: list[Any], n: int) -> list[Any]:
    """Returns at most n of the items, evenly spaced in their order (all of them if there are fewer)."""
    if len(items) <= n:
        return items
    return [items[i * len(items) // n] for i in range(n)]


def progress_plot(run: Run) -> bytes:
    """Returns a PNG: every candidate's score in order, failures apart, the running best as steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    candidates = run.archive.summaries()
    ok = [(c.id, c.score) for c in candidates if c.score is not None and c.state == "ok"]
    failing = frozenset(FAILED)
    failed = [c.id for c in candidates if c.state in failing]
    drawn = _even_sample(ok, PLOT_POINTS)  # the best line, the labels and the axes use them all
    last = candidates[-1].id if candidates else 0
    fig, ax = plt.subplots(figsize=(10, 5), dpi=110)
    if ok:
        xs, ys = np.array(drawn).T
        label = "scored" if len(drawn) == len(ok) else f"scored ({len(drawn)} of {len(ok)}, evenly)"
        ax.scatter(
            xs,
            ys,
            s=22 if len(drawn) < 500 else 6,
            color="#1f77b4",
            alpha=0.75,
            label=label,
            zorder=3,
        )
        accepted = run.archive.accepted()
        kept: list[tuple[int, float]] = []  # the improvements: the best accepted so far
        sign = 1 if run.target.minimize else -1
        for c in accepted:
            if c.score is not None and (not kept or sign * c.score < sign * kept[-1][1]):
                kept.append((c.id, c.score))
        if kept:
            steps_x = [x for x, _ in kept] + [last]
            steps_y = [y for _, y in kept] + [kept[-1][1]]
            ax.step(
                steps_x,
                steps_y,
                where="post",
                color="#2ca02c",
                linewidth=2,
                zorder=2,
                label="the champion (accepted)",
            )
        rationale = {c.id: c.rationale for c in accepted}
        steps = kept[1:]
        if len(steps) > PLOT_LABELS:  # the largest gains over the best before each
            gain = {x: abs(y - b) for (x, y), (_, b) in zip(steps, kept, strict=False)}
            largest = set(sorted(gain, key=lambda x: -gain[x])[:PLOT_LABELS])
            steps = [(x, y) for x, y in steps if x in largest]
        for i, (x, y) in enumerate(steps):
            right_half = x > last / 2  # labels point inwards so they stay on the canvas
            ax.annotate(
                one_line(rationale[x], 38),
                (x, y),
                xytext=(-8 if right_half else 8, 10 + 11 * (i % 3)),
                textcoords="offset points",
                ha="right" if right_half else "left",
                fontsize=7,
                color="#2c662c",
                arrowprops={"arrowstyle": "-", "color": "#9cc59c", "linewidth": 0.6},
            )
        scores = np.array([y for _, y in ok])
        low, high = float(scores.min()), float(scores.max())
        pad = (high - low) * 0.08 or 0.05
        ax.set_ylim(low - pad, high + 3 * pad)
        edge = high + 2 * pad
    else:
        edge = 1.0
    if failed:
        marks = _even_sample(failed, PLOT_POINTS)
        ax.scatter(
            np.array(marks),
            np.full(len(marks), edge),
            marker="x",
            color=FAILED_COLOUR,
            s=30 if len(marks) < 500 else 10,
            label="failed (not scored)"
            if len(marks) == len(failed)
            else f"failed ({len(marks)} of {len(failed)}, evenly)",
            zorder=3,
        )
    direction = run.target.direction_text
    ax.set_xlabel("candidate (in the order proposed)")
    ax.set_ylabel(f"{run.target.metric} ({direction})")
    ax.set_title(f"{run.root.name}: {len(candidates)} candidates")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out.getvalue()


def _colour(score: float, low: float, high: float, minimize: bool) -> str:
    """Returns a colour from red (worst) through yellow to green (best)."""
    t = 0.5 if high == low else (score - low) / (high - low)
    t = 1 - t if minimize else t
    r, g = (230, int(60 + 170 * t * 2)) if t < 0.5 else (int(230 - 200 * (t - 0.5) * 2), 200)
    return f"#{r:02x}{min(g, 230):02x}50"


def lineage_svg(run: Run, best_n: int = 10) -> str:
    """Returns an inline SVG of the archive as a tree: generations left to right, parents to children.

    A run of more than TREE_NODES candidates is drawn as the lineages of its
    best_n best and its accepted candidates, and says so.
    """
    archive, note = run.archive, ""
    total = archive.count()
    if total > TREE_NODES:
        heads = [c.id for c in archive.best(run.target.minimize, best_n)]
        candidates = archive.candidates(archive.lineages(heads + archive.accepted_ids()))
        note = (
            f"the lineages of the {best_n} best and the accepted candidates: "
            f"{len(candidates)} of {total} candidates"
        )
    else:
        candidates = archive.candidates()
    by_generation: dict[int, list[int]] = {}
    for c in candidates:
        by_generation.setdefault(c.generation, []).append(c.id)
    column = {generation: i for i, generation in enumerate(sorted(by_generation))}
    position: dict[int, tuple[float, float]] = {}
    for generation, ids in by_generation.items():
        for row, cid in enumerate(ids):
            position[cid] = (60 + column[generation] * 150, 30 + row * 30)
    scores = [c.score for c in candidates if c.state == "ok" and c.score is not None]
    low, high = (min(scores), max(scores)) if scores else (0.0, 1.0)
    best = archive.best(run.target.minimize, 1, accepted=True)
    best_id = best[0].id if best else None
    width = 120 + 150 * max(len(column) - 1, 0)
    height = 60 + 30 * max((len(v) for v in by_generation.values()), default=1)
    parts = [
        f'<svg id="lineage" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
    ]
    if note:
        parts.append(f'<text class="gen note" x="8" y="12">{html.escape(note)}</text>')
    for c in candidates:
        if c.parent_id in position:
            (x1, y1), (x2, y2) = position[c.parent_id], position[c.id]
            parts.append(
                f'<path d="M{x1},{y1} C{x1 + 75},{y1} {x2 - 75},{y2} {x2},{y2}" class="edge"/>'
            )
    for c in candidates:
        x, y = position[c.id]
        if c.state == "ok" and c.score is not None:
            fill, cls = _colour(c.score, low, high, run.target.minimize), "node ok"
            label = f"{run.target.metric} {c.score:.4f}"
        else:
            fill, cls = (
                ("#dddddd", "node failed") if c.state in FAILED else ("#f4f4f4", "node other")
            )
            label = c.state + (f": {c.reason}" if c.reason else "")
        if c.id == best_id:
            cls += " best"
        title = html.escape(f"candidate {c.id} (generation {c.generation}) {label} — {c.rationale}")
        parts.append(
            f'<g class="{cls}"><title>{title}</title><circle cx="{x}" cy="{y}" r="10" fill="{fill}"/>'
            f'<text x="{x}" y="{y + 3.5}">{c.id}</text></g>'
        )
    for generation, i in column.items():
        parts.append(
            f'<text class="gen" x="{60 + i * 150}" y="{height - 8}">gen {generation}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def curve_svg(curve: Sequence[Point], seed: Sequence[Point] = (), width: int = 160) -> str:
    """Returns a small inline SVG of a training curve (blue) over the seed's (grey), the loss on a
    log scale where every loss is positive; "" when there is no curve. Only numbers the harness
    parsed are drawn, so the markup is ours."""
    if not curve:
        return ""
    height = width // 4
    both = [*curve, *seed]
    positive = all(loss > 0 for _, loss in both)
    ys = [math.log(loss) if positive else loss for _, loss in both]
    low, high = min(ys), max(ys)
    if not math.isfinite(high - low):  # losses too far apart to draw
        return ""

    def line(points: Sequence[Point], colour: str) -> str:
        xy = []
        for fraction, loss in points:
            y = math.log(loss) if positive else loss
            top = (high - y) / (high - low) if high > low else 0.5
            xy.append(f"{fraction * (width - 2) + 1:.1f},{top * (height - 2) + 1:.1f}")
        return (
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.2" points="{" ".join(xy)}"/>'
        )

    title = f"training loss at {sketch(curve)}" + (
        f"; the seed's at {sketch(seed)}" if seed else ""
    )
    return Markup(
        f'<svg class="curve" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img"><title>{html.escape(title)}</title>{line(seed, "#bbb") if seed else ""}'
        f"{line(curve, '#2a6fdb')}</svg>"
    )


def diff_html(diff: str) -> str:
    """Returns a diff as HTML lines coloured by kind."""
    lines = []
    for line in diff.splitlines():
        kind = (
            "hunk" if line.startswith("@@") else "file" if line.startswith(("---", "+++")) else ""
        )
        kind = kind or {"+": "add", "-": "del"}.get(line[:1], "ctx")
        lines.append(f'<span class="{kind}">{html.escape(line) or " "}</span>')
    return "".join(lines)  # each line is a block of its own


def report_html(run: Run, best_n: int = 10) -> str:
    """Returns the whole report as one self-contained HTML page (no network, no server)."""
    from jinja2 import Environment

    archive = run.archive
    counts = archive.counts()
    seed = archive.seed()
    best = top(run, best_n, ("ok",))
    seed_score, champion, change = headline(run)  # the champion: the best accepted
    diffs = [
        (row, diff_html(archive.candidate(row["id"]).diff))
        for row in best
        if row["id"] != (seed.id if seed else None)
    ]
    seed_curve = archive.first_curve(seed.id) if seed else []
    curves = {row["id"]: curve_svg(archive.first_curve(row["id"]), seed_curve) for row in best}
    template = Environment(autoescape=True).from_string(
        (resources.files("selfprog") / "templates" / "report.html").read_text()
    )
    return template.render(
        run=run.root.name,
        target=run.target,
        config=json.dumps(run.config.to_json(), indent=2),
        counts=sorted(counts.items(), key=lambda kv: -kv[1]),
        total=sum(counts.values()),
        seed_score=seed_score,
        best_score=champion.score if champion else None,
        best_id=champion.id if champion else None,
        change=change,
        active_minutes=float(archive.meta("active_seconds") or 0) / 60,
        tokens=archive.tokens_used(),
        cost=archive.cost_used(),
        noise=Population(run).noise_floor(),
        plot=base64.b64encode(progress_plot(run)).decode(),
        lineage=lineage_svg(run, best_n),
        best=best,
        curves=curves,
        diffs=diffs,
    )


def write_report(run: Run, out: Path) -> Path:
    out.write_text(report_html(run))
    return out
