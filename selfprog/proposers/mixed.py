"""An LM and the numeric proposer in one run: the LM restructures, `tune` tunes settings.

Each call's children are split between the two by how each has paid off so
far (the share of its judged children that beat their parent, with one win
and one loss assumed for each, so both start at half and neither is ever
starved), drawn from the call's seed so that a resumed run splits the same
way. The LM's children start new families (programs of another structure);
`tune` searches the settings of the parent's family, whichever made it. A
parent with nothing to tune gives all its children to the LM.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path

from selfprog.proposers.base import Proposal, ProposalRequest, Proposer
from selfprog.proposers.tune import TuneProposer


def tune_share(payoff: Mapping[str, tuple[int, int]] | None) -> float:
    """Returns the expected share of a call's children `tune` proposes."""

    def rate(source: str) -> float:
        judged, wins = (payoff or {}).get(source, (0, 0))
        return (wins + 1) / (judged + 2)

    return rate("tune") / (rate("tune") + rate("lm"))


def split(k: int, share: float, seed: int) -> int:
    """Returns how many of k children `tune` proposes: k x share, its fraction drawn."""
    whole = int(k * share)
    return whole + int(random.Random(seed).random() < k * share - whole)


class MixedProposer:
    """Asks the LM for some of a call's children and `tune` for the rest."""

    def __init__(self, lm: Proposer, tune: TuneProposer):
        self.lm, self.tune = lm, tune
        self.name = f"{lm.name}+tune"

    @property
    def template(self) -> str:
        return self.lm.template

    def adopt(self, candidate_id: int | None, folder: Path | None) -> None:
        self.lm.adopt(candidate_id, folder)

    def propose(self, request: ProposalRequest, k: int) -> list[Proposal]:
        tuned = split(k, tune_share(request.payoff), request.seed) if request.space else 0
        proposals = self.lm.propose(request, k - tuned) if k - tuned else []
        return proposals + (self.tune.propose(request, tuned) if tuned else [])
