"""A target program: its files, which of them are editable, its commands, metric and budget."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from selfprog.errors import TargetError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TARGET_FILE = "target.toml"
BUNDLED = ("tinylm", "selftune", "gpulm")

# the keys target.toml may hold, per table ("" is the top level)
OPTIONAL_TABLES = ("model",)
_SCHEMA: dict[str, tuple[str, ...]] = {
    "": ("name", "description", "files", "commands", "data", "model", "metric", "budget"),
    "files": ("editable", "fixed"),
    "commands": ("prepare", "train", "evaluate"),
    "data": ("train", "shared", "heldout", "manifest"),
    "model": ("base", "keep"),
    "metric": ("name", "direction"),
    "budget": ("seconds", "steps", "allowance", "timeout", "eval_timeout"),
}


@dataclass(frozen=True, slots=True)
class Budget:
    """How long a candidate may train, and the hard limits on each phase."""

    seconds: float  # training wall-clock budget, 0 = none
    steps: int  # training step budget, 0 = none
    timeout: float  # the training phase is killed after this many seconds
    eval_timeout: float  # the evaluation phase is killed after this many seconds
    allowance: float = 30.0  # start-up and saving, on top of a seconds budget

    def train_limit(self, seconds: float, measured: float = 0.0) -> float:
        """Returns the wall-clock seconds after which the harness kills the training phase.

        A seconds budget ends at the budget plus the allowance. A step budget
        cannot be counted from outside: it ends at `measured` (a ceiling derived
        from the seed's own training time) when there is one. Never past timeout.
        """
        if seconds > 0:
            return min(self.timeout, seconds + self.allowance)
        if measured > 0:
            return min(self.timeout, measured)
        return self.timeout


@dataclass(frozen=True, slots=True)
class Target:
    """A target folder as described by its target.toml."""

    name: str
    root: Path
    description: str
    editable: tuple[str, ...]
    fixed: tuple[str, ...]
    prepare: tuple[str, ...]
    train: tuple[str, ...]
    evaluate: tuple[str, ...]
    train_data: tuple[str, ...]
    heldout_data: str
    manifest: str
    metric: str
    direction: str
    budget: Budget
    shared_data: tuple[str, ...] = ()  # files or folders both phases see (not secret)
    base_model: str = ""  # a model the program starts from: an alias or a folder ({base_model})
    keep: tuple[str, ...] = ()  # output files the loop keeps for each scored candidate

    @property
    def files(self) -> tuple[str, ...]:
        """Returns every file of the program, editable first."""
        return self.editable + self.fixed

    @property
    def minimize(self) -> bool:
        """Returns whether lower scores are better."""
        return self.direction == "minimize"

    @property
    def direction_text(self) -> str:
        return "lower is better" if self.minimize else "higher is better"

    def better(self, a: float, b: float) -> bool:
        """Returns whether score a is better than score b in the metric's direction."""
        return a < b if self.minimize else a > b


def _unknown_key(key: str, table: str, path: Path) -> TargetError:
    where = f"in [{table}]" if table else "at the top level"
    valid = _SCHEMA[table]
    near = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(valid)}"
    return TargetError(f"{path}: unknown key '{key}' {where}{hint}")


def _check_keys(raw: Mapping[str, Any], path: Path) -> None:
    for key in raw:
        if key not in _SCHEMA[""]:
            raise _unknown_key(key, "", path)
    for table in _SCHEMA:
        if not table:
            continue
        value = raw.get(table, {} if table in OPTIONAL_TABLES else None)
        if not isinstance(value, dict):
            raise TargetError(f"{path}: missing table [{table}]")
        for key in value:
            if key not in _SCHEMA[table]:
                raise _unknown_key(key, table, path)


def _strings(raw: Mapping[str, Any], table: str, key: str, path: Path) -> tuple[str, ...]:
    value = raw[table].get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise TargetError(f"{path}: [{table}] {key} must be a non-empty list of strings")
    return tuple(value)


def _optional_strings(raw: Mapping[str, Any], table: str, key: str, path: Path) -> tuple[str, ...]:
    if key not in raw.get(table, {}):
        return ()
    return _strings(raw, table, key, path)


def _string(raw: Mapping[str, Any], table: str, key: str, path: Path) -> str:
    value = (raw[table] if table else raw).get(key)
    if not isinstance(value, str) or not value:
        where = f"[{table}] {key}" if table else key
        raise TargetError(f"{path}: {where} must be a non-empty string")
    return value


def _number(raw: Mapping[str, Any], key: str, path: Path, default: float) -> float:
    value = raw["budget"].get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise TargetError(f"{path}: [budget] {key} must be a number >= 0, not {value!r}")
    return float(value)


def load_target(where: str | Path) -> Target:
    """Returns the target named (a bundled name such as 'tinylm') or found at a folder.

    Raises:
        TargetError: the folder or its target.toml is missing or malformed.
    """
    root = bundled_root(str(where)) if str(where) in BUNDLED else Path(where).resolve()
    path = root / TARGET_FILE
    if not path.is_file():
        raise TargetError(f"{root}: not a target folder (no {TARGET_FILE})")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"{path}: not valid TOML: {exc}") from None
    _check_keys(raw, path)
    editable = _strings(raw, "files", "editable", path)
    fixed = _strings(raw, "files", "fixed", path)
    if set(editable) & set(fixed):
        both = ", ".join(sorted(set(editable) & set(fixed)))
        raise TargetError(f"{path}: {both} cannot be both editable and fixed")
    for name in editable + fixed:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise TargetError(f"{path}: file {name!r} must be a path inside the target folder")
        if not (root / name).is_file():
            raise TargetError(f"{path}: listed file {name} is not in {root}")
    direction = _string(raw, "metric", "direction", path)
    if direction not in ("minimize", "maximize"):
        raise TargetError(f"{path}: [metric] direction must be 'minimize' or 'maximize'")
    budget = Budget(
        seconds=_number(raw, "seconds", path, 0),
        steps=int(_number(raw, "steps", path, 0)),
        timeout=_number(raw, "timeout", path, 600),
        eval_timeout=_number(raw, "eval_timeout", path, 300),
        allowance=_number(raw, "allowance", path, 30),
    )
    if budget.seconds == 0 and budget.steps == 0:
        raise TargetError(f"{path}: [budget] needs seconds or steps above 0")
    return Target(
        name=_string(raw, "", "name", path),
        root=root,
        description=str(raw.get("description", "")),
        editable=editable,
        fixed=fixed,
        prepare=_strings(raw, "commands", "prepare", path),
        train=_strings(raw, "commands", "train", path),
        evaluate=_strings(raw, "commands", "evaluate", path),
        train_data=_strings(raw, "data", "train", path),
        heldout_data=_string(raw, "data", "heldout", path),
        manifest=_string(raw, "data", "manifest", path),
        metric=_string(raw, "metric", "name", path),
        direction=direction,
        budget=budget,
        shared_data=_optional_strings(raw, "data", "shared", path),
        base_model=_string(raw, "model", "base", path) if "base" in raw.get("model", {}) else "",
        keep=_optional_strings(raw, "model", "keep", path),
    )


def bundled_root(name: str) -> Path:
    """Returns the folder of a bundled target."""
    return Path(str(resources.files("selfprog.targets") / name))


def export_target(where: str | Path, dest: Path) -> list[Path]:
    """Writes a target's program files and target.toml into dest; returns the paths written."""
    target = load_target(where)
    if dest.exists() and any(dest.iterdir()):
        raise TargetError(f"{dest}: folder exists and is not empty")
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name in (*target.files, TARGET_FILE):
        out = dest / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes((target.root / name).read_bytes())
        written.append(out)
    return written
