"""The proposer's prompt: task, rules, the parent's source, what worked and what failed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import resources
from string import Template

from selfprog.archive import Candidate
from selfprog.target import Target

CHARS_PER_TOKEN = 4  # a conservative estimate for code; the budget is approximate


def estimate_tokens(text: str) -> int:
    return len(text) // CHARS_PER_TOKEN + 1


def _template(name: str) -> Template:
    return Template((resources.files("selfprog") / "prompts" / name).read_text())


def _source(files: Mapping[str, str]) -> str:
    return "\n\n".join(
        f"{path}\n```python\n{text.rstrip()}\n```" for path, text in sorted(files.items())
    )


def _worked(best: Sequence[Candidate], metric: str) -> list[str]:
    return [
        f"Candidate {c.id} ({metric} {c.score:.4f}): {c.rationale or 'no rationale'}\n```diff\n{c.diff.rstrip()}\n```"
        for c in best
        if c.diff and c.score is not None
    ]


def _failed(failures: Sequence[Candidate]) -> list[str]:
    items = []
    for c in failures:
        tail = "\n".join(c.log_tail.rstrip().splitlines()[-8:])
        item = f"Candidate {c.id} ended {c.state}: {c.reason}. Change: {c.rationale or 'unknown'}"
        items.append(item + (f"\n```\n{tail}\n```" if tail else ""))
    return items


def build_prompt(
    target: Target,
    parent: Candidate,
    files: Mapping[str, str],
    budget: str,
    best: Sequence[Candidate],
    failures: Sequence[Candidate],
    max_tokens: int,
    template: str = "propose.md",
) -> str:
    """Returns the prompt, dropping the oldest context first until it fits max_tokens.

    `propose.md` asks for free-form SEARCH/REPLACE edits; `choose.md` leaves
    the answer's format to a proposer that constrains it.
    """
    worked, failed = _worked(best, target.metric), _failed(failures)
    score = f"{target.metric} {parent.score:.4f}" if parent.score is not None else "not scored"
    while True:
        text = _template(template).substitute(
            target_name=target.name,
            target_description=target.description,
            metric=target.metric,
            direction=target.direction_text,
            budget=budget,
            editable=", ".join(target.editable),
            fixed=", ".join(target.fixed),
            parent_id=parent.id,
            parent_score=score,
            parent_source=_source(files),
            what_worked="\n\n".join(worked) or "Nothing yet.",
            what_failed="\n\n".join(failed) or "Nothing yet.",
        )
        if estimate_tokens(text) <= max_tokens or not (worked or failed):
            return text
        (failed if len(failed) >= len(worked) else worked).pop()
