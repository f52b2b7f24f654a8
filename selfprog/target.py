"""A target program: its files, which of them are editable, its commands, metric and budget."""

from __future__ import annotations

import difflib
import posixpath
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from selfprog import settings
from selfprog.errors import TargetError
from selfprog.records import parse_python
from selfprog.space import Declared, declared_problems, parse_declared

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TARGET_FILE = "target.toml"
BUNDLED = ("tinylm", "selftune", "gpulm")

# the keys target.toml may hold, per table ("" is the top level)
OPTIONAL_TABLES = ("model", "prompt")
_SCHEMA: dict[str, tuple[str, ...]] = {
    "": (
        *("name", "description", "files", "commands", "data", "model", "metric", "budget"),
        *("prompt", "space"),
    ),
    "files": ("editable", "fixed"),
    "commands": ("prepare", "train", "evaluate"),
    "data": ("train", "shared", "heldout", "manifest"),
    "model": ("base", "keep"),
    "metric": ("name", "direction", "descriptors"),
    "budget": ("seconds", "steps", "allowance", "timeout", "eval_timeout"),
    "prompt": ("task", "rules"),
}
DEFAULT_TASK = "a program that trains a model"
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")  # a target's name: it names folders and runs


@dataclass(frozen=True, slots=True)
class Budget:
    """How long a candidate may train, and the hard limits on each phase."""

    seconds: float  # training wall-clock budget, 0 = none
    steps: int  # training step budget, 0 = none
    timeout: float  # the training phase is killed after this many seconds
    eval_timeout: float  # the evaluation phase is killed after this many seconds
    allowance: float = 30.0  # start-up and saving on top of a seconds budget, at most (see scoring)

    def train_limit(self, seconds: float, measured: float = 0.0) -> float:
        """Returns the wall-clock seconds after which the harness kills the training phase.

        `measured` is the ceiling derived from the seed's own times once there
        is one (a seconds budget plus the seed's measured allowance; a step
        budget, which cannot be counted from outside, a multiple of the seed's
        training time). Before it, a seconds budget ends at the budget plus
        the allowance. Never past timeout.
        """
        if measured > 0:
            return min(self.timeout, measured)
        if seconds > 0:
            return min(self.timeout, seconds + self.allowance)
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
    task: str = DEFAULT_TASK  # what the program is, as prompts say it ("improving <task>")
    rules: tuple[str, ...] = ()  # what every version of the program must keep, for prompts
    descriptors: tuple[str, ...] = ()  # metrics that place a candidate on map-elites' grid
    space: Declared = field(default_factory=Declared)  # [space]: tuned there

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


def _unknown_key(key: str, table: str) -> str:
    where = f"in [{table}]" if table else "at the top level"
    valid = _SCHEMA[table]
    near = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(valid)}"
    return f"unknown key {key!r} {where}{hint}"


def _key_problems(raw: Mapping[str, Any]) -> list[str]:
    problems = [_unknown_key(key, "") for key in raw if key not in _SCHEMA[""]]
    for table in _SCHEMA:
        if not table:
            continue
        value = raw.get(table, {} if table in OPTIONAL_TABLES else None)
        if not isinstance(value, dict):
            problems.append(f"missing table [{table}]")
            continue
        problems += [_unknown_key(key, table) for key in value if key not in _SCHEMA[table]]
    return problems


class _Reader:
    """Reads target.toml's values, noting every problem instead of stopping at the first."""

    def __init__(self, raw: Mapping[str, Any]):
        self.raw = raw
        self.problems: list[str] = []

    def _value(self, table: str, key: str) -> Any:
        section = self.raw.get(table, {}) if table else self.raw
        return section.get(key) if isinstance(section, dict) else None

    def strings(self, table: str, key: str, optional: bool = False) -> tuple[str, ...]:
        value = self._value(table, key)
        if value is None and optional:
            return ()
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            self.problems.append(f"[{table}] {key} must be a non-empty list of strings")
            return ()
        return tuple(value)

    def string(self, table: str, key: str, default: str | None = None) -> str:
        value = self._value(table, key)
        if value is None and default is not None:
            return default
        if not isinstance(value, str) or not value:
            self.problems.append(
                f"{f'[{table}] ' if table else ''}{key} must be a non-empty string"
            )
            return ""
        return value

    def number(self, key: str, default: float) -> float:
        value = self._value("budget", key)
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            self.problems.append(f"[budget] {key} must be a number >= 0, not {value!r}")
            return default
        return float(value)


def _file_problems(root: Path, editable: tuple[str, ...], fixed: tuple[str, ...]) -> list[str]:
    problems = []
    both = sorted(set(editable) & set(fixed))
    if both:
        problems.append(f"{', '.join(both)} cannot be both editable and fixed")
    for name in editable + fixed:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(f"file {name!r} must be a path inside the target folder")
        elif not (root / name).is_file():
            problems.append(f"listed file {name!r} is not in {root}")
    return problems


def load_target(where: str | Path) -> Target:
    """Returns the target named (a bundled name such as 'tinylm') or found at a folder.

    Every problem of its target.toml is reported at once, the unsafe ones
    (`safety_problems`) with them, so that nothing runs on a target that a
    candidate could cheat.

    Raises:
        TargetError: the folder or its target.toml is missing, malformed or unsafe.
    """
    root = bundled_root(str(where)) if str(where) in BUNDLED else Path(where).resolve()
    path = root / TARGET_FILE
    if not path.is_file():
        bare = not Path(where).exists() and len(Path(str(where)).parts) == 1
        if bare:  # a name, neither bundled nor a folder here
            raise TargetError(
                f"no target {str(where)!r}: the bundled targets are {', '.join(BUNDLED)}; "
                "or give a target folder (`selfprog target new NAME` makes one)"
            )
        raise TargetError(f"{root}: not a target folder (no {TARGET_FILE})")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"{path}: not valid TOML: {exc}") from None
    read = _Reader(raw)
    read.problems += _key_problems(raw)
    editable, fixed = read.strings("files", "editable"), read.strings("files", "fixed")
    read.problems += _file_problems(root, editable, fixed)
    direction = read.string("metric", "direction")
    if direction and direction not in ("minimize", "maximize"):
        read.problems.append("[metric] direction must be 'minimize' or 'maximize'")
    known = len(read.problems)
    seconds, steps = read.number("seconds", 0), int(read.number("steps", 0))
    budget_read = len(read.problems) == known  # else: said already, and no budget to judge
    budget = Budget(
        seconds=seconds,
        steps=steps,
        timeout=read.number("timeout", 600),
        eval_timeout=read.number("eval_timeout", 300),
        allowance=read.number("allowance", 30),
    )
    if budget_read and budget.seconds == 0 and budget.steps == 0:
        read.problems.append("[budget] needs seconds or steps above 0")
    space, space_problems = parse_declared(raw.get("space"))
    read.problems += space_problems
    if not space_problems and not _file_problems(root, editable, fixed):
        seed = {name: (root / name).read_text(errors="replace") for name in editable}
        read.problems += declared_problems(space, settings.of_program(seed))
    target = Target(
        name=read.string("", "name"),
        root=root,
        description=str(raw.get("description", "")),
        editable=editable,
        fixed=fixed,
        prepare=read.strings("commands", "prepare"),
        train=read.strings("commands", "train"),
        evaluate=read.strings("commands", "evaluate"),
        train_data=read.strings("data", "train"),
        heldout_data=read.string("data", "heldout"),
        manifest=read.string("data", "manifest"),
        metric=read.string("metric", "name"),
        direction=direction,
        budget=budget,
        shared_data=read.strings("data", "shared", optional=True),
        base_model=read.string("model", "base", default=""),
        keep=read.strings("model", "keep", optional=True),
        task=read.string("prompt", "task", default=DEFAULT_TASK),
        rules=read.strings("prompt", "rules", optional=True),
        descriptors=read.strings("metric", "descriptors", optional=True),
        space=space,
    )
    if target.name and not NAME.fullmatch(target.name):
        read.problems.append(
            f"name {target.name!r}: use letters, digits, '-' and '_', starting with a letter"
        )
    problems = read.problems or safety_problems(target)
    if len(problems) == 1:
        raise TargetError(f"{path}: {problems[0]}")
    if problems:
        raise TargetError(f"{path}: {len(problems)} problems: {'; '.join(problems)}")
    return target


def _script(command: tuple[str, ...]) -> str:
    """Returns the program file a command runs (its first word, placeholders aside)."""
    return command[0] if command else ""


def _data_name(name: str) -> str:
    """Returns a data name as the data folder resolves it ("" for one outside the folder)."""
    if not name or Path(name).is_absolute():
        return ""
    normal = posixpath.normpath(name)
    return "" if normal == ".." or normal.startswith("../") else normal


def _data_problems(target: Target) -> list[str]:
    """The held-out file must reach no phase: not under another name, not in a shared folder."""
    problems = []
    visible = [("train", n) for n in target.train_data] + [
        ("shared", n) for n in target.shared_data
    ]
    for key, name in [("heldout", target.heldout_data), ("manifest", target.manifest), *visible]:
        if not _data_name(name):
            problems.append(f"[data] {key} {name!r} must be a name inside the data folder")
    heldout = _data_name(target.heldout_data)
    seen: dict[str, tuple[str, str]] = {}  # last name -> (list, name) that has it first
    for key, name in visible:
        normal = _data_name(name)
        if not normal or not heldout:
            continue
        if normal == "." or heldout == normal or heldout.startswith(normal + "/"):
            problems.append(
                f"the held-out file {heldout} is in [data] {key} ({name!r}): candidates "
                "would see it; list only training data there"
            )
        base = posixpath.basename(normal)
        if base in seen:  # the sandbox mounts each by its last name
            first, other = seen[base]
            problems.append(
                f"[data] {key} {name!r} and [data] {first} {other!r} would both appear as "
                f"{base} in the sandbox's data folder; rename one"
            )
        seen[base] = (key, name)
    return problems


def safety_problems(target: Target) -> list[str]:
    """Returns what would let a candidate cheat this target, each with its fix.

    The held-out split must reach neither training nor shared data (under
    any name); the evaluator and the prepare script must be fixed (a
    candidate's own evaluator would score itself; an editable prepare would
    be edited by candidates while the data comes from the target's copy);
    the evaluator gets no editable file as an argument; every script a
    command runs must be a listed file (else it is never staged).
    """
    problems = _data_problems(target)
    files = set(target.files)
    for verb, command in (
        ("prepare", target.prepare),
        ("train", target.train),
        ("evaluate", target.evaluate),
    ):
        script = _script(command)
        if script and script not in files:
            problems.append(
                f"[commands] {verb} runs {script!r}, which is not in [files]: it is never "
                f"staged; list it under [files] {'editable' if verb == 'train' else 'fixed'}"
            )
    evaluator, preparer = _script(target.evaluate), _script(target.prepare)
    if evaluator in target.editable:
        problems.append(
            f"{evaluator} (evaluate) is editable: a candidate could rewrite it to score itself; "
            "move it to [files] fixed"
        )
    if preparer in target.editable:
        problems.append(
            f"{preparer} (prepare) is editable: candidates would edit a copy that never makes "
            "the data; move it to [files] fixed"
        )
    editable = set(target.editable) | {Path(n).stem for n in target.editable if n.endswith(".py")}
    for arg in target.evaluate[1:]:
        named = posixpath.normpath(arg.split("=")[-1].removeprefix("/program/"))
        if named in editable:
            problems.append(
                f"[commands] evaluate names {arg}, which is editable: the evaluator would run "
                "or read candidate code; give it only fixed files"
            )
    return problems


# what lets an evaluator (run with `python -I`, so a plain import of the folder fails) reach the
# program folder's code: the separate model process of docs/targets.md, or a hole
_REACHES = ("importlib", "runpy", "__import__", "exec", "compile", "subprocess")


def evaluator_warnings(target: Target) -> list[str]:
    """Returns how the evaluator reaches editable code, for its author to confirm that candidate
    code runs only in a separate process whose outputs it checks (tinylm's model servers)."""
    import ast

    evaluator = _script(target.evaluate)
    try:
        tree = parse_python((target.root / evaluator).read_text())
    except (SyntaxError, UnicodeDecodeError, OSError):
        return []
    editable = set(target.editable) | {Path(n).stem for n in target.editable if n.endswith(".py")}
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "path":
            if isinstance(node.value, ast.Name) and node.value.id == "sys":
                found.add("sys.path")
        elif isinstance(node, ast.Name) and node.id in _REACHES:
            found.add(node.id)
        elif isinstance(node, ast.alias) and node.name.split(".")[0] in _REACHES:
            found.add(node.name.split(".")[0])
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value in editable
        ):
            found.add(repr(node.value))
    if not found:
        return []
    return [
        f"{evaluator} reaches the program folder ({', '.join(sorted(found))}): candidate code "
        "must run only in a separate process whose outputs the evaluator checks, never in its "
        "own (docs/targets.md, 'Two ways to score')"
    ]


def unlisted_scripts(target: Target) -> list[str]:
    """Returns the .py files of the target folder that no [files] list names (never staged)."""
    listed = set(target.files)
    return sorted(
        str(p.relative_to(target.root))
        for p in target.root.rglob("*.py")
        if str(p.relative_to(target.root)) not in listed
        and "__pycache__" not in p.parts
        and p.name != "__init__.py"
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
