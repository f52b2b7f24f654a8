"""The `tune` proposer: no LM; Optuna's samplers choose the parent family's settings.

The study is rebuilt from the request's history on every call (the archive
stays the only state, so resume is exact and a Ray driver needs nothing
more): each scored candidate of the family is a finished trial, each one
waiting or training a running trial (so the children of one call, and of
calls made while others train, spread out), and a candidate that failed
(it crashed, ran out of memory or time) counts as the worst score seen, so
the sampler learns to avoid where programs break. The sampled values are
written into the parent's files as SEARCH/REPLACE text, rounded as a person
would write them.
"""

from __future__ import annotations

import dataclasses
import math
import random
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState, create_trial

from selfprog import settings
from selfprog.errors import ConfigError
from selfprog.proposers.base import Proposal, ProposalRequest
from selfprog.records import program_key
from selfprog.settings import Setting, Trial, Value
from selfprog.space import Dimension
from selfprog.states import FAILED, UNFINISHED, State

# CMA-ES is left out: Optuna's keeps its state in the study it ran, so one rebuilt from the
# archive on every call would start over each time (and its warm start takes numbers only)
SAMPLERS = ("tpe", "random", "gp")
ASKS = 8  # the sampler's tries per child before values are drawn at random
ATTEMPTS = 24  # tries in all before a program already tried is accepted as a duplicate
GP_TRIALS = 200  # the GP sampler is cubic in its trials: it sees the latest this many
NO_SPACE = (
    "no tunable setting in the parent: the numeric proposer needs constants assigned at the "
    "top of an editable file or in a class body, or a [space] in target.toml (docs/targets.md)"
)
# failures that say something about the program's settings (an `error` is the harness's own)
_BROKE = tuple(s for s in FAILED if s not in (State.INVALID.value, State.REJECTED.value, "error"))

optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_sampler(kind: str, seed: int) -> optuna.samplers.BaseSampler:
    """Returns the named Optuna sampler, seeded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if kind == "tpe":
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
        if kind == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if kind == "gp":
            return optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False)
    raise ConfigError(f"proposer.sampler {kind!r}: choose one of {', '.join(SAMPLERS)}")


def distribution(dim: Dimension) -> BaseDistribution:
    """Returns the Optuna distribution of a dimension."""
    if dim.kind == "choice":
        return CategoricalDistribution(dim.choices)
    if dim.kind == "int":
        return IntDistribution(int(dim.low), int(dim.high), log=dim.log)
    return FloatDistribution(dim.low, dim.high, log=dim.log)


def rebuild(
    history: Sequence[Trial],
    space: Mapping[str, Dimension],
    minimize: bool,
    sampler: optuna.samplers.BaseSampler,
) -> optuna.Study:
    """Returns a study holding the family's history as trials, oldest first."""
    study = optuna.create_study(direction="minimize" if minimize else "maximize", sampler=sampler)
    scores = [t.score for t in history if t.state == State.OK.value and t.score is not None]
    scores = [s for s in scores if math.isfinite(s)]
    worst = (max(scores) if minimize else min(scores)) if scores else None
    for t in history:
        params = {
            key: (float(v) if space[key].kind == "float" else v)
            for key, v in t.values.items()
            if key in space and space[key].contains(v)
        }
        dists = {key: distribution(space[key]) for key in params}
        if t.state == State.OK.value and _finite(t.score):
            trial = create_trial(params=params, distributions=dists, value=t.score)
        elif t.state in UNFINISHED:
            trial = create_trial(params=params, distributions=dists, state=TrialState.RUNNING)
        elif t.state in _BROKE and worst is not None:
            trial = create_trial(params=params, distributions=dists, value=worst)
        else:
            continue
        study.add_trial(trial)
    return study


def _finite(score: float | None) -> bool:
    return score is not None and math.isfinite(score)


def written(dim: Dimension, value: Any) -> Value:
    """Returns a sampled value as the program will hold it: a float rounded, if still inside."""
    if dim.kind == "float":
        short = settings.rounded(float(value))
        return short if dim.contains(short) else float(value)
    if dim.kind == "int":
        return int(value)
    return value  # one of the dimension's own choices


class TuneProposer:
    """Proposes settings for the parent's family with an Optuna sampler; seeded, deterministic."""

    name = "tune"
    template = "propose.md"  # unused: tune reads no prompt

    def __init__(self, sampler: str = "tpe"):
        make_sampler(sampler, 0)  # an unknown name is refused before the run
        self.sampler = sampler

    def adopt(self, candidate_id: int | None, folder: Path | None) -> None:
        pass

    def propose(self, request: ProposalRequest, k: int) -> list[Proposal]:
        space = {d.key: d for d in request.space}
        found = {s.key: s for s in settings.of_program(request.files) if s.key in space}
        space = {key: d for key, d in space.items() if key in found}
        if not space:
            return [Proposal(text="", error=NO_SPACE) for _ in range(k)]
        sampler = make_sampler(self.sampler, request.seed)
        history = request.history[-GP_TRIALS:] if self.sampler == "gp" else request.history
        rng = random.Random(request.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study = rebuild(history, space, request.minimize, sampler)
            made: set[str] = set()
            return [self._one(request, study, space, found, made, rng) for _ in range(k)]

    def _one(
        self,
        request: ProposalRequest,
        study: optuna.Study,
        space: Mapping[str, Dimension],
        found: Mapping[str, Setting],
        made: set[str],
        rng: random.Random,
    ) -> Proposal:
        dists = {key: distribution(d) for key, d in space.items()}
        changes: list[tuple[Setting, Value]] = []
        for attempt in range(ATTEMPTS):
            # a miss stays a running trial: the constant liar steers the next ask away from it
            params = study.ask(dists).params if attempt < ASKS else _draw(space, rng)
            chosen = {key: written(space[key], params[key]) for key in space}
            changes = [
                (found[key], v) for key, v in chosen.items() if not _same(found[key].value, v)
            ]
            program = settings.changed_files(request.files, changes)
            key = program_key(program)
            fresh = key not in made and (request.known is None or not request.known(program))
            if changes and fresh:
                made.add(key)
                break  # the trial stays running: the next ask in this call spreads away from it
        if not changes:
            return Proposal(text="", error="every sampled program equals the parent", model="tune")
        text, rationale = settings.edit_text(request.files, changes)
        return dataclasses.replace(
            Proposal(text=text, rationale=rationale), model=f"tune ({self.sampler})"
        )


def _draw(space: Mapping[str, Dimension], rng: random.Random) -> dict[str, Any]:
    """Returns values drawn uniformly from the space (on a log scale where it has one)."""
    drawn: dict[str, Any] = {}
    for key, d in space.items():
        if d.kind == "choice":
            drawn[key] = rng.choice(d.choices)
        elif d.log:
            value = math.exp(rng.uniform(math.log(d.low), math.log(d.high)))
            drawn[key] = (
                min(max(round(value), int(d.low)), int(d.high)) if d.kind == "int" else value
            )
        else:
            drawn[key] = (
                rng.randint(int(d.low), int(d.high))
                if d.kind == "int"
                else rng.uniform(d.low, d.high)
            )
    return drawn


def _same(a: Value, b: Value) -> bool:
    return type(a) is type(b) and a == b
