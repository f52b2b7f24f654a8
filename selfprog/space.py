"""Where a program's settings may go: the space a numeric proposer searches.

Declared in target.toml's `[space]` table (ranges, log scale, choices,
include/exclude), or inferred around the values a family started from
(`space_for`): sizes among powers of two, counts and rates on a log scale,
strings among the alternatives the program itself names.
"""

from __future__ import annotations

import ast
import difflib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from selfprog.records import parse_python
from selfprog.settings import MAX_STRING, Setting, Value, rounded

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
_SPACE_KEYS = ("include", "exclude")
FLOAT_RANGE = (1e-30, 1e30)  # beyond these a float's inferred range leaves what floats hold


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
class Declared:
    """A target's `[space]`: the dimensions it declares, and which names to tune or leave."""

    dimensions: Mapping[str, Dimension] = field(default_factory=dict)
    include: tuple[str, ...] = ()  # when given, only these (and the declared) are tuned
    exclude: tuple[str, ...] = ()


def _show(value: Value | float, kind: str = "") -> str:
    if kind == "int":
        return str(int(value))
    return json.dumps(value) if isinstance(value, str) else repr(value)


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
            s = replace(s, value=start)
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
