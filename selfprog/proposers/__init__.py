"""LM backends (and `mutate`, no LM) behind one interface (see base.Proposer)."""

from __future__ import annotations

from selfprog.config import ProposerSection
from selfprog.errors import ConfigError
from selfprog.proposers.base import Proposal, ProposalRequest, Proposer

__all__ = ["Proposal", "ProposalRequest", "Proposer", "make_proposer"]


def make_proposer(section: ProposerSection, base_model: str = "", device: str = "") -> Proposer:
    """Returns the proposer the config names, with `tune` beside an LM when proposer.tune = "auto"."""
    lm = _make(section, base_model, device)
    if section.tune == "auto" and section.kind not in ("tune", "mutate"):
        from selfprog.proposers.mixed import MixedProposer
        from selfprog.proposers.tune import TuneProposer

        return MixedProposer(lm, TuneProposer(sampler=section.sampler))
    return lm


def _make(section: ProposerSection, base_model: str, device: str) -> Proposer:
    """Returns the proposer the config names, ready to propose.

    base_model is the target's model (`[model] base`), which the `self` proposer starts from;
    device is where a local model runs ("" lets transformers place it).
    """
    if section.kind in ("transformers", "self") and not section.max_new_tokens:
        raise ConfigError(
            "proposer.max_new_tokens = 0 (the server's own limit) is for the openai proposer; "
            "a local model needs a number"
        )
    if section.kind == "tune":
        from selfprog.proposers.tune import TuneProposer

        return TuneProposer(sampler=section.sampler)
    if section.kind == "mutate":
        from selfprog.proposers.mutate import MutateProposer

        return MutateProposer(max_changes=section.max_changes)
    if section.kind == "openai":
        from selfprog.proposers.openai import OpenAIProposer

        return OpenAIProposer.from_config(section)
    if section.kind == "transformers":
        from selfprog.proposers.transformers import TransformersProposer

        return TransformersProposer.from_config(section, device)
    if section.kind == "self":
        from selfprog.proposers.selfmode import SelfProposer

        return SelfProposer.for_target(section, base_model, device)
    raise ConfigError(f"unknown proposer '{section.kind}'")
