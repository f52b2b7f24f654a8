"""The proposer interface: given a parent and its context, return k proposed edits."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from selfprog.settings import Trial
from selfprog.space import Dimension


@dataclass(frozen=True, slots=True)
class ProposalRequest:
    """What a proposer is asked: improve this parent program."""

    parent_id: int
    files: Mapping[str, str]  # the parent's editable files
    prompt: str  # the full prompt, for proposers that read one
    seed: int  # deterministic proposers draw from this
    known: Callable[[Mapping[str, str]], bool] | None = None  # is this program in the archive?
    space: tuple[Dimension, ...] = ()  # where the parent's settings may go
    history: tuple[Trial, ...] = ()  # the parent's family so far: settings, state, score
    minimize: bool = True  # the metric's direction
    payoff: Mapping[str, tuple[int, int]] | None = None  # per source ("tune", "lm"): judged, wins


@dataclass(frozen=True, slots=True)
class Proposal:
    """One proposer answer: the raw text (edits) and what it cost."""

    text: str
    rationale: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    latency: float = 0.0
    model: str = ""
    error: str = ""  # the proposer failed for this one (the candidate ends `invalid`)
    finish: str = ""  # why generation stopped, where the model says ("length": cut at the limit)


class Proposer(Protocol):
    """An LM backend (or none, for `mutate`)."""

    name: str

    @property
    def template(self) -> str:
        """The prompt template the loop fills for this proposer (in selfprog/prompts/)."""
        ...

    def propose(self, request: ProposalRequest, k: int) -> list[Proposal]:
        """Returns k proposals; failures are proposals with an error, not exceptions.

        Raises:
            Outage: what the proposer depends on is gone (an endpoint); the call is asked again.
        """
        ...

    def adopt(self, candidate_id: int | None, folder: Path | None) -> None:
        """Takes up the weights the run's champion trained, kept in folder (None: the base).

        Only a proposer that follows the run (self mode) acts on it; the others ignore it.
        """
        ...
