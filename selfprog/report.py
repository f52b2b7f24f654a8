"""Pictures of a run: the progress plot, the lineage tree, and the self-contained HTML report."""

from __future__ import annotations

import base64
import html
import io
import json
from importlib import resources
from pathlib import Path

from selfprog.queries import one_line, top
from selfprog.rundir import Run
from selfprog.states import FAILED

FAILED_COLOUR = "#d62728"


def improvements(run: Run) -> list[tuple[int, float]]:
    """Returns (candidate, mean score) for each candidate accepted as better, clear of the noise."""
    return [(c.id, c.score) for c in run.archive.accepted() if c.score is not None]


def progress_plot(run: Run) -> bytes:
    """Returns a PNG: every candidate's score in order, failures apart, the running best as steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    candidates = run.archive.candidates()
    ok = [(c.id, c.score) for c in candidates if c.state == "ok" and c.score is not None]
    failed = [c.id for c in candidates if c.state in FAILED]
    fig, ax = plt.subplots(figsize=(10, 5), dpi=110)
    if ok:
        xs, ys = zip(*ok, strict=True)
        ax.scatter(xs, ys, s=22, color="#1f77b4", alpha=0.75, label="scored", zorder=3)
        kept = improvements(run)
        if kept:
            steps_x = [x for x, _ in kept] + [max(c.id for c in candidates)]
            steps_y = [y for _, y in kept] + [kept[-1][1]]
            ax.step(
                steps_x,
                steps_y,
                where="post",
                color="#2ca02c",
                linewidth=2,
                zorder=2,
                label="best, clear of the noise",
            )
        rationale = {c.id: c.rationale for c in candidates}
        last = max(c.id for c in candidates)
        for i, (x, y) in enumerate(kept[1:]):
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
        low, high = min(ys), max(ys)
        pad = (high - low) * 0.08 or 0.05
        ax.set_ylim(low - pad, high + 3 * pad)
        edge = high + 2 * pad
    else:
        edge = 1.0
    if failed:
        ax.scatter(
            failed,
            [edge] * len(failed),
            marker="x",
            color=FAILED_COLOUR,
            s=30,
            label="failed (not scored)",
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


def lineage_svg(run: Run) -> str:
    """Returns an inline SVG of the archive as a tree: generations left to right, parents to children."""
    candidates = run.archive.candidates()
    by_generation: dict[int, list[int]] = {}
    for c in candidates:
        by_generation.setdefault(c.generation, []).append(c.id)
    position: dict[int, tuple[float, float]] = {}
    for generation, ids in by_generation.items():
        for row, cid in enumerate(ids):
            position[cid] = (60 + generation * 150, 30 + row * 30)
    scores = [c.score for c in candidates if c.state == "ok" and c.score is not None]
    low, high = (min(scores), max(scores)) if scores else (0.0, 1.0)
    best = run.archive.best(run.target.minimize, 1, accepted=True)
    best_id = best[0].id if best else None
    width = 120 + 150 * max(by_generation, default=0)
    height = 60 + 30 * max((len(v) for v in by_generation.values()), default=1)
    parts = [
        f'<svg id="lineage" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
    ]
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
    for generation in by_generation:
        parts.append(
            f'<text class="gen" x="{60 + generation * 150}" y="{height - 8}">gen {generation}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


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
    champion = archive.best(run.target.minimize, 1, accepted=True)  # the best clear of the noise
    seed_score = seed.score if seed else None
    best_score = champion[0].score if champion else None
    change = None
    if seed_score and best_score is not None:
        change = (best_score - seed_score) / abs(seed_score) * 100
    diffs = [
        (row, diff_html(archive.candidate(row["id"]).diff))
        for row in best
        if row["id"] != (seed.id if seed else None)
    ]
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
        best_score=best_score,
        best_id=champion[0].id if champion else None,
        change=change,
        active_minutes=float(archive.meta("active_seconds") or 0) / 60,
        tokens=archive.tokens_used(),
        plot=base64.b64encode(progress_plot(run)).decode(),
        lineage=lineage_svg(run),
        best=best,
        diffs=diffs,
    )


def write_report(run: Run, out: Path) -> Path:
    out.write_text(report_html(run))
    return out
