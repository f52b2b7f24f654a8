"""A program's settings: the tunable values its editable files assign, and the space to tune them in.

A setting is a constant assigned to one name in a module's leading run of
imports and assignments, or in a class body (a `@dataclass` config): a
number, a string, a boolean, upper-case names included. Programs that differ
only in their settings form a *family* (`family_key`). The space a numeric
proposer searches is declared in target.toml's `[space]` table, or inferred
around the values the family started from (`space_for`). Edits to settings
are written as SEARCH/REPLACE text, exactly as an LM would write them.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from selfprog.edits import DIVIDER, REPLACE, SEARCH
from selfprog.records import parse_python

Value = int | float | str | bool

# name parts that mark what is no hyperparameter: where things go, what is printed, the seed
# (tuning it is selection luck), the budget (the harness's, never the program's)
UNTUNED_PARTS = frozenset(
    {
        *("seed", "device", "dtype", "dir", "path", "file", "filename", "name", "log", "print"),
        *("verbose", "debug", "every", "interval", "eval", "save", "out", "compile", "workers"),
        *("port", "host", "url", "wandb", "budget"),
    }
)
_DIMENSION_KEYS = ("low", "high", "log", "choices")
MAX_SETTINGS = 200  # per file: a program of thousands of constants is searched by its first
MAX_STRING = 100  # characters: a longer string constant is text, not a choice
MAX_INT = 10**15  # a larger integer literal is no knob (and JSON or floats would mangle it)
FLOAT_RANGE = (1e-30, 1e30)  # beyond these a float's inferred range leaves what floats hold
_SPACE_KEYS = ("include", "exclude")


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
class Dimension:
    """Where one setting may go: a float or int range (maybe log-scaled), or a list of choices."""

    key: str
    kind: str  # "float", "int" or "choice"
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[Value, ...] = ()

    def contains(self, value: Value) -> bool:
        """Returns whether value is a point of this dimension."""
        if self.kind == "choice":
            return any(type(value) is type(c) and value == c for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        return self.low <= value <= self.high

    def describe(self) -> str:
        """Returns the dimension as `target check` shows it."""
        if self.kind == "choice":
            return "one of " + ", ".join(_show(c) for c in self.choices)
        scale = ", log" if self.log else ""
        return f"{self.kind} {_show(self.low, self.kind)} .. {_show(self.high, self.kind)}{scale}"


@dataclass(frozen=True, slots=True)
class Trial:
    """A candidate of a family as a numeric proposer sees it: its settings, state and score."""

    candidate_id: int
    state: str
    score: float | None  # its mean score, once scored
    values: Mapping[str, Value]


@dataclass(frozen=True, slots=True)
class Declared:
    """A target's `[space]`: the dimensions it declares, and which names to tune or leave."""

    dimensions: Mapping[str, Dimension] = field(default_factory=dict)
    include: tuple[str, ...] = ()  # when given, only these (and the declared) are tuned
    exclude: tuple[str, ...] = ()


def _show(value: Value | float, kind: str = "") -> str:
    if kind == "int":
        return str(int(value))
    return json.dumps(value) if isinstance(value, str) else repr(value)


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


# ---- the space -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Strings:
    """The strings a program names as alternatives: dict literals' keys, and per name the
    strings it is compared with or matched against."""

    dict_keys: tuple[tuple[str, ...], ...]
    compared: Mapping[str, tuple[str, ...]]

    @classmethod
    def of(cls, files: Mapping[str, str]) -> Strings:
        """Returns the program's alternatives, read in one walk of each file."""
        keys: list[tuple[str, ...]] = []
        compared: dict[str, list[str]] = {}
        for path in sorted(files):
            if not path.endswith(".py"):
                continue
            try:
                tree = parse_python(files[path])
            except (SyntaxError, ValueError, RecursionError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Dict):
                    found = [k.value for k in node.keys if isinstance(k, ast.Constant)]
                    if found and all(isinstance(k, str) for k in found):
                        keys.append(tuple(str(k) for k in found))
                elif isinstance(node, ast.Compare):
                    parts = (node.left, *node.comparators)
                    strings = [t for part in parts for t in _strings(part)]
                    for part in parts:
                        if (name := _name_of(part)) is not None:
                            compared.setdefault(name, []).extend(strings)
                elif isinstance(node, ast.Match) and (name := _name_of(node.subject)) is not None:
                    for case in node.cases:
                        if isinstance(case.pattern, ast.MatchValue):
                            compared.setdefault(name, []).extend(_strings(case.pattern.value))
        return cls(tuple(keys), {n: tuple(v) for n, v in compared.items()})

    def choices(self, name: str, value: str) -> tuple[str, ...]:
        """Returns the alternatives of a string setting, its own value first."""
        found = [value, *self.compared.get(name, ())]
        for keys in self.dict_keys:
            if value in keys:
                found += keys
        return tuple(v for v in dict.fromkeys(found) if len(v) <= MAX_STRING)


def _name_of(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    return node.attr if isinstance(node, ast.Attribute) else None


def _strings(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return [
            e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)
        ]
    return []


def infer(
    setting: Setting, files: Mapping[str, str], strings: Strings | None = None
) -> Dimension | None:
    """Returns a sensible dimension around a setting's value (None: nothing sensible to try).

    Sizes (powers of two) move among powers of two within 4 times either way, other
    counts within 4 times on a log scale, rates within 10 times on a log scale, fractions
    near one (betas) their distance to one within 4 times, a zero float up to 0.3
    (weight decay, dropout), booleans both ways, and strings among the
    alternatives the program itself names.
    """
    key, v = setting.key, setting.value
    if isinstance(v, bool):
        return Dimension(key, "choice", choices=(v, not v))
    if isinstance(v, str):
        choices = (strings or Strings.of(files)).choices(setting.name, v)
        return Dimension(key, "choice", choices=choices) if len(choices) > 1 else None
    if isinstance(v, int):
        if v < 0:
            return None
        if v > 1 and v & (v - 1) == 0:  # a power of two: a size
            powers = [2**e for e in range(max(0, v.bit_length() - 3), v.bit_length() + 2)]
            return Dimension(key, "choice", choices=tuple(powers))
        if v == 0:
            return Dimension(key, "int", 0, 4)
        if v == 1:
            return Dimension(key, "int", 1, 4)
        return Dimension(key, "int", max(1, v // 4), v * 4, log=True)
    if v == 0.0:
        return Dimension(key, "float", 0.0, 0.3)
    if not FLOAT_RANGE[0] < v < FLOAT_RANGE[1]:
        return None  # negative, or where a tenfold step leaves what a float holds
    if 0.5 <= v < 1.0:
        low, high = max(0.0, 1 - (1 - v) * 4), 1 - (1 - v) / 4
        return Dimension(key, "float", rounded(low), rounded(high))
    high = min(v * 10, 0.95) if v < 0.5 else v * 10
    return Dimension(key, "float", rounded(v / 10), rounded(high), log=True)


def untuned(name: str) -> bool:
    """Returns whether a name reads as something other than a hyperparameter (out_dir, SEED)."""
    return any(part in UNTUNED_PARTS for part in name.lower().split("_"))


def space_for(
    settings: Sequence[Setting],
    files: Mapping[str, str],
    declared: Declared,
    around: Mapping[str, Value] | None = None,
) -> list[Dimension]:
    """Returns the dimensions to tune: the declared ones, and those inferred around settings.

    With around (the values the family started from), a range is inferred
    around those values instead of the settings' own, so that it stays the
    same for every member of a family.
    """
    dims = []
    strings = Strings.of(files)
    for s in settings:
        start = (around or {}).get(s.key, s.value)
        if type(start) is type(s.value):
            s = dataclasses.replace(s, value=start)
        named = {s.key, s.name}
        if named & set(declared.exclude):
            continue
        own = next(
            (declared.dimensions[n] for n in (s.key, s.name) if n in declared.dimensions), None
        )
        if own is not None:
            dims.append(Dimension(s.key, own.kind, own.low, own.high, own.log, own.choices))
            continue
        if declared.include and not named & set(declared.include):
            continue
        if not declared.include and untuned(s.name):
            continue
        inferred = infer(s, files, strings)
        if inferred is not None:
            dims.append(inferred)
    return dims


def parse_declared(raw: Any) -> tuple[Declared, list[str]]:
    """Returns target.toml's `[space]` table read, and its problems (each one line)."""
    if raw is None:
        return Declared(), []
    if not isinstance(raw, dict):
        return Declared(), ["[space] must be a table"]
    problems: list[str] = []
    lists: dict[str, tuple[str, ...]] = {}
    for key in _SPACE_KEYS:
        value = raw.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            problems.append(f"[space] {key} must be a list of setting names")
            value = []
        lists[key] = tuple(value)
    dims: dict[str, Dimension] = {}
    for name, table in raw.items():
        if name in _SPACE_KEYS:
            continue
        if not isinstance(table, dict):
            near = difflib.get_close_matches(name, _SPACE_KEYS, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            problems.append(
                f"[space] {name} must be a table ([space.{name}] with low/high or choices){hint}"
            )
            continue
        dim, problem = _declared_dimension(name, table)
        if problem:
            problems.append(f"[space.{name}] {problem}")
        elif dim is not None:
            dims[name] = dim
    return Declared(dims, lists["include"], lists["exclude"]), problems


def _declared_dimension(name: str, table: Mapping[str, Any]) -> tuple[Dimension | None, str]:
    for key in table:
        if key not in _DIMENSION_KEYS:
            near = difflib.get_close_matches(key, _DIMENSION_KEYS, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            return None, f"unknown key {key!r}{hint}; valid keys: {', '.join(_DIMENSION_KEYS)}"
    if "choices" in table:
        choices = table["choices"]
        if set(table) != {"choices"}:
            return None, "choices stand alone (no low, high or log beside them)"
        if not isinstance(choices, list) or not choices:
            return None, "choices must be a non-empty list"
        kinds = {type(c) for c in choices}
        if len(kinds) != 1 or not kinds <= {int, float, str, bool}:
            return None, "choices must be all strings, all integers, all floats or all booleans"
        if any(isinstance(c, float) and not math.isfinite(c) for c in choices):
            return None, "choices must be finite numbers"
        return Dimension(name, "choice", choices=tuple(dict.fromkeys(choices))), ""
    low, high, log = table.get("low"), table.get("high"), table.get("log", False)
    numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x in (low, high))
    if not numeric:
        return None, "needs low and high (numbers), or choices"
    assert isinstance(low, int | float) and isinstance(high, int | float)
    if not isinstance(log, bool):
        return None, "log must be true or false"
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        return None, f"low ({low}) must be below high ({high})"
    if log and low <= 0:
        return None, "a log scale needs low above 0"
    kind = "int" if isinstance(low, int) and isinstance(high, int) else "float"
    return Dimension(name, kind, float(low), float(high), log), ""


def declared_problems(declared: Declared, settings: Iterable[Setting]) -> list[str]:
    """Returns the names `[space]` mentions that the seed program does not set."""
    known = {n for s in settings for n in (s.key, s.name)}
    named = [*declared.dimensions, *declared.include, *declared.exclude]
    problems = []
    for name in dict.fromkeys(named):
        if name not in known:
            near = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            problems.append(f"[space] {name}: the editable files set no such setting{hint}")
    return problems


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
