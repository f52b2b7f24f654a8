"""The `mutate` proposer: no LM; perturbs numeric literals of the editable files.

It is the baseline every LM must beat and lets the whole loop run without a
model. Ints stay ints (powers of two move to a neighbouring power of two),
floats move on a log scale (values in [0.5, 1) move their distance to 1), and
the output is SEARCH/REPLACE text, exactly as an LM would write it.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from selfprog.edits import DIVIDER, REPLACE, SEARCH
from selfprog.proposers.base import Proposal, ProposalRequest
from selfprog.records import parse_python


@dataclass(frozen=True, slots=True)
class Literal:
    """A tunable number: `name = 3e-4` at module level or a class-level default."""

    path: str
    name: str
    value: int | float
    line: int  # 1-based
    col: int
    end_col: int


def _settings(module: list[ast.stmt]) -> list[ast.stmt]:
    """Returns the module's leading run of imports and assignments: its settings."""
    kept = []
    for node in module:
        docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        if not (
            docstring or isinstance(node, ast.Assign | ast.AnnAssign | ast.Import | ast.ImportFrom)
        ):
            break
        kept.append(node)
    return kept


def tunable_literals(path: str, source: str) -> list[Literal]:
    """Returns the numbers assigned to one name in a module's settings or a class body."""
    found: list[Literal] = []
    tree = parse_python(source)
    lines = source.split("\n")

    def column(line: int, byte_offset: int) -> int:  # ast counts UTF-8 bytes, slicing characters
        return len(lines[line - 1].encode()[:byte_offset].decode(errors="replace"))

    classes = [n.body for n in tree.body if isinstance(n, ast.ClassDef)]
    bodies = [_settings(tree.body), *classes]
    for body in bodies:
        for node in body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target, value = node.targets[0], node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                target, value = node.target, node.value
            else:
                continue
            if not isinstance(target, ast.Name) or not isinstance(value, ast.Constant):
                continue
            if target.id.isupper():  # by convention a constant, not a setting
                continue
            number = value.value
            if isinstance(number, bool) or not isinstance(number, int | float):
                continue
            if value.lineno != value.end_lineno or value.end_col_offset is None:
                continue
            start = column(value.lineno, value.col_offset)
            end = column(value.lineno, value.end_col_offset)
            found.append(Literal(path, target.id, number, value.lineno, start, end))
    return found


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


def _format(value: int | float, like: str) -> str:
    if isinstance(value, int):
        return str(value)
    if "e" in like.lower():
        return f"{value:.1e}".replace("e-0", "e-").replace("e+0", "e")
    return repr(value)


def _block(lines: list[str], index: int, new: str) -> tuple[str, str]:
    """Returns SEARCH and REPLACE text around line index, grown until SEARCH is unique."""
    source = "\n".join(lines)
    before, after = index, index + 1
    while True:
        search = "\n".join(lines[before:after])
        if source.count(search) == 1 or (before == 0 and after == len(lines)):
            break
        before, after = max(0, before - 1), min(len(lines), after + 1)
    replace = "\n".join([*lines[before:index], new, *lines[index + 1 : after]])
    return search, replace


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


def _changed(
    files: Mapping[str, str], changes: list[tuple[Literal, int | float]]
) -> tuple[dict[str, str], list[str], list[str]]:
    """Returns the files with each literal set, the SEARCH/REPLACE blocks, and their reasons."""
    blocks, reasons = [], []
    current = dict(files)  # later blocks are written against the earlier ones' result
    for lit, new_value in sorted(changes, key=lambda c: (c[0].path, c[0].line)):
        lines = current[lit.path].split("\n")
        line = lines[lit.line - 1]
        old_text = line[lit.col : lit.end_col]
        new_line = line[: lit.col] + _format(new_value, old_text) + line[lit.end_col :]
        search, replace = _block(lines, lit.line - 1, new_line)
        current[lit.path] = current[lit.path].replace(search, replace, 1)
        blocks.append(f"{lit.path}\n{SEARCH}\n{search}\n{DIVIDER}\n{replace}\n{REPLACE}\n")
        reasons.append(f"{lit.path}: {lit.name} {old_text} → {_format(new_value, old_text)}")
    return current, blocks, reasons


def changed_files(
    files: Mapping[str, str], changes: list[tuple[Literal, int | float]]
) -> dict[str, str]:
    """Returns the program with each literal set to its new value."""
    return _changed(files, changes)[0]


def change(files: Mapping[str, str], changes: list[tuple[Literal, int | float]]) -> Proposal:
    """Returns the SEARCH/REPLACE proposal that sets each literal to its new value."""
    _, blocks, reasons = _changed(files, changes)
    rationale = "; ".join(reasons)
    return Proposal(text=f"{rationale}\n\n" + "\n".join(blocks), rationale=rationale)


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
        proposal = change(files, [(lit, perturb(lit.value, rng)) for lit in chosen])
        return dataclasses.replace(proposal, model="mutate")
