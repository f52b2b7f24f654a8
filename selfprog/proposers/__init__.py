"""LM backends (and `mutate`, no LM) behind one interface (see base.Proposer)."""

from __future__ import annotations

from selfprog.config import ProposerSection
from selfprog.errors import ConfigError
from selfprog.proposers.base import Proposal, ProposalRequest, Proposer

__all__ = ["Proposal", "ProposalRequest", "Proposer", "make_proposer"]


def make_proposer(section: ProposerSection) -> Proposer:
    """Returns the proposer the config names, ready to propose."""
    if section.kind == "mutate":
        from selfprog.proposers.mutate import MutateProposer

        return MutateProposer(max_changes=section.max_changes)
    if section.kind == "openai":
        from selfprog.proposers.openai import OpenAIProposer

        return OpenAIProposer.from_config(section)
    if section.kind == "transformers":
        from selfprog.proposers.transformers import TransformersProposer

        return TransformersProposer.from_config(section)
    raise ConfigError(f"unknown proposer '{section.kind}'")
