"""A program's settings: the tunable values its editable files assign, and edits to them.

A setting is a constant assigned to one name in a module's leading run of
imports and assignments, or in a class body (a `@dataclass` config): a
number, a string, a boolean, upper-case names included. Programs that differ
only in their settings form a *family* (`family_key`); where each may go is
`selfprog.space`. Edits to settings are written as SEARCH/REPLACE text,
exactly as an LM would write them.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from selfprog.edits import DIVIDER, REPLACE, SEARCH
from selfprog.records import parse_python

Value = int | float | str | bool

MAX_SETTINGS = 200  # per file: a program of thousands of constants is searched by its first
MAX_STRING = 100  # characters: a longer string constant is text, not a choice
MAX_INT = 10**15  # a larger integer literal is no knob (and JSON or floats would mangle it)


@dataclass(frozen=True, slots=True)
class Setting:
    """A constant assigned to one name: `lr = 3e-4` at module level or a class-level default."""

    path: str
    name: str
    value: Value
    line: int  # 1-based
    col: int
    end_col: int
    key: str = ""  # unique in the program: the name, or `path:name` where the name repeats
    upper: bool = False  # an UPPER_CASE name

    @property
    def number(self) -> int | float:
        """Returns the value of a numeric setting (`numbers` finds only those)."""
        if isinstance(self.value, bool | str):
            raise TypeError(f"{self.name} is not a number")
        return self.value


@dataclass(frozen=True, slots=True)
class Trial:
    """A candidate of a family as a numeric proposer sees it: its settings, state and score."""

    candidate_id: int
    state: str
    score: float | None  # its mean score, once scored
    values: Mapping[str, Value]


def _leading(module: list[ast.stmt]) -> list[ast.stmt]:
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


def in_source(path: str, source: str) -> list[Setting]:
    """Returns the constants assigned to one name in a module's settings or a class body.

    Raises:
        SyntaxError: the source is not Python.
    """
    found: list[Setting] = []
    tree = parse_python(source)
    lines = source.split("\n")

    def column(line: int, byte_offset: int) -> int:  # ast counts UTF-8 bytes, slicing characters
        return len(lines[line - 1].encode()[:byte_offset].decode(errors="replace"))

    classes = [n.body for n in tree.body if isinstance(n, ast.ClassDef)]
    for body in (_leading(tree.body), *classes):
        assigned = Counter(_assigned(node) for node in body)
        for node in body:
            name, value = _assigned(node), _value_node(node)
            if name is None or value is None or assigned[name] > 1:
                continue  # a name set twice: only the last counts, and editing it misleads
            constant = _constant(value)
            if constant is None:
                continue
            if value.lineno != value.end_lineno or value.end_col_offset is None:
                continue  # a string over several lines is text, not a setting
            start = column(value.lineno, value.col_offset)
            end = column(value.lineno, value.end_col_offset)
            found.append(
                Setting(path, name, constant, value.lineno, start, end, upper=name.isupper())
            )
            if len(found) >= MAX_SETTINGS:
                return found
    return found


def _assigned(node: ast.stmt) -> str | None:
    """Returns the one name a statement assigns (None: it assigns none, or several)."""
    if isinstance(node, ast.Assign) and len(node.targets) == 1:
        target = node.targets[0]
    elif isinstance(node, ast.AnnAssign) and node.value is not None:
        target = node.target
    else:
        return None
    return target.id if isinstance(target, ast.Name) else None


def _value_node(node: ast.stmt) -> ast.expr | None:
    return node.value if isinstance(node, ast.Assign | ast.AnnAssign) else None


def _constant(node: ast.expr) -> Value | None:
    """Returns the value of a literal a setting may hold (a signed number too), else None."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        inner = _constant(node.operand)
        if isinstance(inner, bool) or not isinstance(inner, int | float):
            return None
        return -inner if isinstance(node.op, ast.USub) else inner
    if not isinstance(node, ast.Constant):
        return None
    value = node.value
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if abs(value) < MAX_INT else None  # a huge literal is no knob
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return value if len(value) <= MAX_STRING else None
    return None


def numbers(path: str, source: str) -> list[Setting]:
    """Returns the unsigned numeric settings of lower-case names (what `mutate` and the menu
    change)."""
    return [
        s
        for s in in_source(path, source)
        if not s.upper and not isinstance(s.value, bool | str) and s.value >= 0
    ]


def of_program(files: Mapping[str, str]) -> list[Setting]:
    """Returns every setting of a program's Python files, each with its unique key."""
    found: list[Setting] = []
    for path in sorted(files):
        if not path.endswith(".py"):
            continue
        try:
            found += in_source(path, files[path])
        except (SyntaxError, ValueError, RecursionError):
            continue
    counts = Counter(s.name for s in found)
    repeated = {name for name, n in counts.items() if n > 1}
    keyed, seen = [], set()
    for s in found:
        key = f"{s.path}:{s.name}" if s.name in repeated else s.name
        if key in seen:  # the same name twice in one file (two classes): the first one counts
            continue
        seen.add(key)
        keyed.append(dataclasses.replace(s, key=key))
    return keyed


def values(files: Mapping[str, str]) -> dict[str, Value]:
    """Returns a program's settings as {key: value}."""
    return {s.key: s.value for s in of_program(files)}


def summary(files: Mapping[str, str]) -> tuple[str, dict[str, Value]]:
    """Returns a program's family key and its settings' values (parsing each file once)."""
    found = of_program(files)
    return _family(files, found), {s.key: s.value for s in found}


def family_key(files: Mapping[str, str]) -> str:
    """Returns what a program is apart from its settings' values: equal for one family."""
    return _family(files, of_program(files))


def _family(files: Mapping[str, str], found: Sequence[Setting]) -> str:
    """Returns the hash of the program's syntax trees with each setting's value masked (so
    layout, comments and the values themselves do not count, as in `program_key`)."""
    masked: dict[str, str] = {}
    by_path: dict[str, list[Setting]] = {}
    for s in found:
        by_path.setdefault(s.path, []).append(s)
    for path in sorted(files):
        lines = files[path].split("\n")
        for s in sorted(by_path.get(path, []), key=lambda s: (s.line, -s.col)):
            line = lines[s.line - 1]
            lines[s.line - 1] = line[: s.col] + "__setting__" + line[s.end_col :]
        source = "\n".join(lines)
        try:
            masked[path] = ast.dump(parse_python(source)) if path.endswith(".py") else source
        except (SyntaxError, ValueError, RecursionError):
            masked[path] = source
    return hashlib.sha256(json.dumps(masked, sort_keys=True).encode()).hexdigest()[:16]


# ---- edits -----------------------------------------------------------------------------


def render(value: Value, like: str) -> str:
    """Returns value as Python source, in the style of the literal it replaces."""
    if isinstance(value, str):
        return repr(value) if like[:1] == "'" else json.dumps(value)
    if isinstance(value, float) and "e" in like.lower() and value != 0:
        mantissa, exponent = f"{value:.2e}".split("e")
        mantissa = mantissa.rstrip("0")
        mantissa += "0" if mantissa.endswith(".") else ""  # 3.0e-4, as mutate has always written
        return f"{mantissa}e{int(exponent)}"
    return repr(value)


def rounded(value: float) -> float:
    """Returns a float at three significant digits (what a person would write); a fraction
    in [0.5, 1) keeps three of its distance to one (0.9995, not 1.0)."""
    if 0.5 <= value < 1.0:
        return 1.0 - float(f"{1.0 - value:.3g}")
    return float(f"{value:.3g}")


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


def _changed(
    files: Mapping[str, str], changes: Sequence[tuple[Setting, Value]]
) -> tuple[dict[str, str], list[str], list[str]]:
    """Returns the files with each setting set, the SEARCH/REPLACE blocks, and their reasons."""
    blocks, reasons = [], []
    current = dict(files)  # later blocks are written against the earlier ones' result
    # right to left within a line, so that each setting's columns still hold when it is set
    for s, new_value in sorted(changes, key=lambda c: (c[0].path, c[0].line, -c[0].col)):
        lines = current[s.path].split("\n")
        line = lines[s.line - 1]
        old_text = line[s.col : s.end_col]
        new_text = render(new_value, old_text)
        search, replace = _block(lines, s.line - 1, line[: s.col] + new_text + line[s.end_col :])
        current[s.path] = current[s.path].replace(search, replace, 1)
        blocks.append(f"{s.path}\n{SEARCH}\n{search}\n{DIVIDER}\n{replace}\n{REPLACE}\n")
        reasons.append(f"{s.path}: {s.name} {old_text} → {new_text}")
    return current, blocks, reasons


def changed_files(
    files: Mapping[str, str], changes: Sequence[tuple[Setting, Value]]
) -> dict[str, str]:
    """Returns the program with each setting set to its new value."""
    return _changed(files, changes)[0]


def edit_text(
    files: Mapping[str, str], changes: Sequence[tuple[Setting, Value]]
) -> tuple[str, str]:
    """Returns the SEARCH/REPLACE text that sets each setting to its new value, and its rationale."""
    _, blocks, reasons = _changed(files, changes)
    rationale = "; ".join(reasons)
    return f"{rationale}\n\n" + "\n".join(blocks), rationale
