"""Run configuration: load from TOML, validate, apply --set overrides, freeze into the run."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import sys
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from selfprog.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True, slots=True)
class RunSection:
    target: str = "tinylm"
    seed: int = 0
    generations: int = 4
    population: int = 4
    workers: int = 0  # 0: one on this machine; on a Ray cluster, as many as fit
    max_candidates: int = 0
    max_hours: float = 0.0
    max_sandbox_hours: float = 0.0  # training and evaluation time, summed over evaluations
    max_tokens: int = 0
    max_cost: float = 0.0  # the proposer's estimated spend (proposer.price_in/out) at which to stop
    on_interrupt: str = "finish"
    synchronous: bool = False


@dataclass(frozen=True, slots=True)
class BudgetSection:
    seconds: float = 0.0
    steps: int = 0
    timeout: float = 0.0


@dataclass(frozen=True, slots=True)
class RunnerSection:
    kind: str = "docker"
    image: str = ""
    memory: str = "4g"
    cpus: float = 0.0
    gpus: str = ""  # per candidate: "" one each where the machine has GPUs, "0" none, N, all
    share_gpus: bool = False  # let candidates share a GPU (a wall-clock budget is then unfair)
    address: str = "auto"  # ray: the cluster
    sandbox: str = "docker"  # ray: the sandbox on each node


@dataclass(frozen=True, slots=True)
class ProposerSection:
    kind: str = "tune"
    model: str = ""
    base_url: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.8
    max_new_tokens: int = 2048
    timeout: float = 120.0
    prompt_tokens: int = 6000
    max_changes: int = 2
    sampler: str = "tpe"  # tune: Optuna's tpe, random or gp
    tune: str = "off"  # with an LM: "auto" splits each call's children between it and tune
    edit_mode: str = "auto"
    device: str = ""  # a local model's: "" a GPU no candidate uses (else the CPU), cpu, cuda:N
    price_in: float = 0.0  # per million prompt tokens, for the estimated cost (0: unpriced)
    price_out: float = 0.0  # per million generated tokens


@dataclass(frozen=True, slots=True)
class SelectionSection:
    policy: str = "archive"
    noise_seeds: int = 3
    confirm_seeds: int = 2
    finalists: int = 2  # confirmed at the run's end; 0: each generation's best-looking child
    z: float = 2.0
    sharpness: float = 10.0


@dataclass(frozen=True, slots=True)
class PruningSection:
    enabled: bool = True
    after: float = 0.25  # no candidate is stopped before this fraction of its budget
    z: float = 3.0  # standard deviations of the seed's curves beyond the seed's mean


@dataclass(frozen=True, slots=True)
class Config:
    run: RunSection = RunSection()
    budget: BudgetSection = BudgetSection()
    runner: RunnerSection = RunnerSection()
    proposer: ProposerSection = ProposerSection()
    selection: SelectionSection = SelectionSection()
    pruning: PruningSection = PruningSection()

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS: dict[str, Any] = {
    "run": RunSection,
    "budget": BudgetSection,
    "runner": RunnerSection,
    "proposer": ProposerSection,
    "selection": SelectionSection,
    "pruning": PruningSection,
}
_CHOICES = {
    ("run", "on_interrupt"): ("finish", "kill"),
    ("runner", "kind"): ("docker", "local", "ray"),
    ("runner", "sandbox"): ("docker", "local"),
    ("proposer", "kind"): ("tune", "mutate", "openai", "transformers", "self"),
    ("proposer", "sampler"): ("tpe", "random", "gp"),
    ("proposer", "tune"): ("off", "auto"),
    ("proposer", "edit_mode"): ("auto", "free", "constrained"),
    ("selection", "policy"): ("greedy", "archive", "map-elites"),
}
_POSITIVE = {("proposer", "timeout")}  # where 0 would not mean "none"
_NON_NEGATIVE = {
    "seed",
    "workers",
    "z",
    "max_candidates",
    "max_hours",
    "max_sandbox_hours",
    "max_tokens",
    "max_cost",
    "price_in",
    "price_out",
    "max_new_tokens",  # 0: the openai proposer leaves it to the server
    "seconds",
    "steps",
    "timeout",
    "cpus",
    "finalists",  # 0: confirm as the run goes
}


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Returns bytes for a size such as 512m, 4g, 4GiB or 1048576.

    Raises:
        ConfigError: the text is not a size.
    """
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"not a size: {text!r} (try 512m or 4g)")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** "_kmgt".index(unit or "_"))


def _nearest(key: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(key, valid, n=1)
    return f"; did you mean '{near[0]}'?" if near else f"; valid: {', '.join(valid)}"


def _coerce(table: str, key: str, value: Any, kind: type) -> Any:
    where = f"{table}.{key}"
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is str and (table, key) == ("runner", "gpus") and type(value) is int:
        value = str(value)  # `--set runner.gpus=1`: a count, which TOML reads as a number
    if kind is not type(value):
        raise ConfigError(
            f"{where} must be {kind.__name__}, not {type(value).__name__} ({value!r})"
        )
    if (table, key) == ("runner", "memory"):
        parse_size(str(value))
    choices = _CHOICES.get((table, key))
    if choices and value not in choices:
        raise ConfigError(f"{where} must be one of {', '.join(choices)}, not {value!r}")
    if (table, key) == ("pruning", "after") and isinstance(value, float) and not 0 < value <= 1:
        raise ConfigError(f"{where} must be a fraction of the budget in (0, 1], not {value}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, not {value}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value <= 0 and (table, key) in _POSITIVE:
            raise ConfigError(f"{where} must be above 0, not {value}")
        if value < 0 and key in _NON_NEGATIVE:
            raise ConfigError(f"{where} must be >= 0, not {value}")
        if value <= 0 and key not in _NON_NEGATIVE and key != "temperature":
            raise ConfigError(f"{where} must be above 0, not {value}")
    return value


def from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Returns the config a TOML-shaped dict describes, every key checked.

    Raises:
        ConfigError: an unknown table or key (with the nearest valid one), or a bad value.
    """
    for table, values in raw.items():
        if table not in _SECTIONS:
            raise ConfigError(
                f"{source}: unknown table [{table}]{_nearest(table, list(_SECTIONS))}"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{table}] must be a table")
    built: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        defaults = cls()
        kinds = {f.name: type(getattr(defaults, f.name)) for f in fields(defaults)}
        values = raw.get(name, {})
        for key in values:
            if key not in kinds:
                raise ConfigError(
                    f"{source}: unknown key '{key}' in [{name}]{_nearest(key, list(kinds))}"
                )
        built[name] = cls(**{k: _coerce(name, k, v, kinds[k]) for k, v in values.items()})
    return Config(**built)


def parse_override(text: str) -> tuple[str, str, Any]:
    """Returns (table, key, value) from 'table.key=value'; the value is read as TOML, else text."""
    name, sep, value = text.partition("=")
    table, dot, key = name.strip().partition(".")
    if not sep or not dot or not key:
        raise ConfigError(f"--set {text!r}: expected table.key=value, e.g. run.workers=2")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return table, key.strip(), parsed


# What may change in a run under way (`selfprog resume RUN --set`): what decides how far the run
# goes, how fast, and who proposes. The rest decides what a score means or what the run is.
STEERABLE: dict[str, frozenset[str]] = {
    "run": frozenset(
        {
            "generations",
            "population",
            "workers",
            "max_candidates",
            "max_hours",
            "max_sandbox_hours",
            "max_tokens",
            "max_cost",
            "on_interrupt",
            "synchronous",
        }
    ),
    "runner": frozenset({"memory", "address"}),  # cpus: kept when the workers change
    "proposer": frozenset(f.name for f in fields(ProposerSection)),
    "selection": frozenset({"policy", "confirm_seeds", "finalists", "z", "sharpness"}),
    "pruning": frozenset(f.name for f in fields(PruningSection)),  # a saving, never a score
}
_FIXED_WHY = {
    "run.target": "the target is what the run improves",
    "run.seed": "the seed decides every draw of the run",
    "budget": "candidates trained to another budget would not be comparable",
    "runner": "the sandbox decides what a score means; candidates scored in another one "
    "would not be comparable",
    "selection.noise_seeds": "the seed's repeated evaluations were fixed when the run began",
}


def steer(config: Config, overrides: list[str]) -> tuple[Config, list[tuple[str, Any, Any]]]:
    """Returns a run's config with mid-run changes applied, and each change: (key, old, new).

    Raises:
        ConfigError: a key that may not change in a run under way (and why), or a bad value.
    """
    raw = config.to_json()
    for text in overrides:
        table, key, value = parse_override(text)
        known = table in _SECTIONS and key in raw[table]
        if known and key not in STEERABLE.get(table, frozenset()):
            why = _FIXED_WHY.get(f"{table}.{key}") or _FIXED_WHY[table]
            raise ConfigError(
                f"--set {table}.{key}: cannot change in a run under way ({why}); start a new run"
            )
        raw.setdefault(table, {})[key] = value  # an unknown one is refused below, with a hint
    steered = from_dict(raw, "--set")
    old, new = config.to_json(), steered.to_json()
    changes = [
        (f"{table}.{key}", old[table][key], new[table][key])
        for table in new
        for key in new[table]
        if new[table][key] != old[table][key]
    ]
    return steered, changes


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> Config:
    """Returns the config from a TOML file (or the defaults) with --set overrides applied."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for text in overrides or []:
        table, key, value = parse_override(text)
        raw.setdefault(table, {})
        if not isinstance(raw[table], dict):
            raise ConfigError(f"--set {text!r}: {table} is not a table")
        raw[table][key] = value
    return from_dict(raw, source)


def freeze(config: Config, path: Path) -> None:
    """Writes the resolved config into the run folder; resume reads this copy."""
    path.write_text(json.dumps(config.to_json(), indent=2) + "\n")


def thaw(path: Path) -> Config:
    """Returns the config frozen into a run folder."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the run's frozen config ({exc})") from None
    selection = raw.get("selection")
    if isinstance(selection, dict) and "finalists" not in selection:
        selection["finalists"] = 0  # frozen before the final pick: it goes on as it began
    if isinstance(selection, dict) and "pruning" not in raw:
        raw["pruning"] = {"enabled": False}  # frozen before pruning: likewise
    return from_dict(raw, str(path))


def default_text() -> str:
    """Returns the commented default configuration."""
    return (resources.files("selfprog") / "defaults.toml").read_text()
