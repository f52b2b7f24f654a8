"""The `mutate` proposer: no LM; perturbs numeric literals of the editable files.

It is the baseline every LM must beat and lets the whole loop run without a
model. Ints stay ints (powers of two move to a neighbouring power of two),
floats move on a log scale (values in [0.5, 1) move their distance to 1), and
the output is SEARCH/REPLACE text, exactly as an LM would write it.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping
from pathlib import Path

from selfprog import settings
from selfprog.proposers.base import Proposal, ProposalRequest
from selfprog.settings import Setting as Literal
from selfprog.settings import numbers as tunable_literals

__all__ = ["Literal", "MutateProposer", "change", "changed_files", "neighbours", "tunable_literals"]


def perturb(value: int | float, rng: random.Random) -> int | float:
    """Returns a nearby value of the same type, never the same value."""
    if isinstance(value, int):
        if value > 1 and value & (value - 1) == 0:  # a power of two: a size
            return value * 2 if rng.random() < 0.5 else value // 2
        if value == 0:
            return 1
        step = max(1, round(abs(value) * rng.choice((0.25, 0.5))))
        new = value + step if rng.random() < 0.5 else value - step
        return new if new != 0 else value + step
    if value == 0.0:
        return round(rng.choice((0.01, 0.05, 0.1)), 6)
    factor = math.exp(rng.gauss(0.0, 0.6))
    # betas and ratios near one move their distance to one
    moved = 1.0 - (1.0 - value) * factor if 0.5 <= value < 1.0 else value * factor
    rounded = float(f"{moved:.2g}")
    return rounded if rounded != value else moved


def neighbours(value: int | float) -> list[int | float]:
    """Returns a menu of nearby values of the same type, never the value itself, smallest first."""
    if isinstance(value, int):
        if value > 1 and value & (value - 1) == 0:  # a power of two: a size
            options: list[int | float] = [value // 4, value // 2, value * 2, value * 4]
        elif value == 0:
            options = [1, 2]
        else:
            options = [round(value * f) for f in (0.5, 0.75, 1.25, 1.5, 2.0)]
        options = [v for v in options if v > 0 or value <= 0]
    elif value == 0.0:
        options = [0.01, 0.05, 0.1]
    elif 0.5 <= value < 1.0:  # betas and ratios near one move their distance to one
        options = [float(f"{1.0 - (1.0 - value) * f:.3g}") for f in (3.0, 2.0, 0.5, 0.25)]
        options = [v for v in options if v > 0]  # 0.5 less three times its distance is below 0
    else:
        options = [float(f"{value * f:.2g}") for f in (0.1, 0.3, 0.5, 2.0, 3.0, 10.0)]
    return sorted({v for v in options if v != value})


def changed_files(
    files: Mapping[str, str], changes: list[tuple[Literal, int | float]]
) -> dict[str, str]:
    """Returns the program with each literal set to its new value."""
    return settings.changed_files(files, changes)


def change(files: Mapping[str, str], changes: list[tuple[Literal, int | float]]) -> Proposal:
    """Returns the SEARCH/REPLACE proposal that sets each literal to its new value."""
    text, rationale = settings.edit_text(files, changes)
    return Proposal(text=text, rationale=rationale)


class MutateProposer:
    """Proposes random, valid numeric perturbations; seeded and deterministic."""

    name = "mutate"
    template = "propose.md"  # unused: mutate reads no prompt

    def __init__(self, max_changes: int = 2):
        self.max_changes = max_changes

    def adopt(self, candidate_id: int | None, folder: Path | None) -> None:
        pass

    def propose(self, request: ProposalRequest, k: int) -> list[Proposal]:
        rng = random.Random(request.seed)
        return [self._one(request.files, rng) for _ in range(k)]

    def _one(self, files: Mapping[str, str], rng: random.Random) -> Proposal:
        literals = [lit for path in sorted(files) for lit in tunable_literals(path, files[path])]
        if not literals:
            return Proposal(text="", error="no numeric literals to perturb")
        chosen = rng.sample(literals, min(len(literals), rng.randint(1, self.max_changes)))
        chosen.sort(key=lambda lit: (lit.path, lit.line))
        proposal = change(files, [(lit, perturb(lit.number, rng)) for lit in chosen])
        return dataclasses.replace(proposal, model="mutate")
