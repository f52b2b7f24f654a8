"""Breeding: plan a generation, ask the proposer for children, apply and dedup their edits.

A proposer call is split in three so that the archive keeps one writer: the
request is built from the archive (the driver's thread), the proposer
answers (its own thread, touching nothing), and the answers are recorded
with their children in one transaction (the driver's thread again).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfprog import settings
from selfprog.archive import DUPLICATE, PENDING
from selfprog.curves import Point
from selfprog.edits import EditError, apply_edits, parse_edits, rationale, unified_diff
from selfprog.errors import SelfprogError
from selfprog.population import Population, derive_seed
from selfprog.prompt import build_prompt
from selfprog.proposers.base import Proposal, ProposalRequest, Proposer
from selfprog.records import Candidate, program_key
from selfprog.rundir import MODELS, Run
from selfprog.space import space_for
from selfprog.states import State
from selfprog.untrusted import one_line

log = logging.getLogger(__name__)

Event = dict[str, Any]


@dataclass
class Call:
    """One proposer call: which generation and parent, and once answered, what came back."""

    generation: int
    parent: Candidate
    files: dict[str, str]
    request: ProposalRequest
    k: int
    adopt: tuple[int | None, Path | None] = (None, None)  # whose weights propose (self mode)
    proposals: list[Proposal] = field(default_factory=list)
    latency: float = 0.0
    failure: str = ""  # what the proposer raised instead of answering, if it did

    def answer(self, proposer: Proposer) -> Call:
        """Asks the proposer; runs on the proposer's thread and touches no archive.

        What a model or a client library raises (a server's odd reply, a device out
        of memory) is this call's answer, recorded on its children; the driver's
        breaker stops the run when it keeps happening. An `Outage` stops it at once.
        """
        start = time.perf_counter()
        try:
            proposer.adopt(*self.adopt)
            self.proposals = proposer.propose(self.request, self.k)
        except SelfprogError:
            raise  # already one line for the user
        except Exception as exc:  # the proposer boundary: outside code, outside data
            log.debug("the proposer raised", exc_info=True)
            self.failure = f"{type(exc).__name__}: {one_line(str(exc), 300)}"
            error = f"the proposer raised {self.failure}"
            self.proposals = [Proposal(text="", error=error) for _ in range(self.k)]
        self.latency = time.perf_counter() - start
        return self


def add_seed(run: Run, db: Any) -> int:
    """Records the target's seed program as generation 0, inside a transaction; returns its id."""
    files = {name: (run.target.root / name).read_text() for name in run.target.editable}
    return run.archive.add_candidate(
        db,
        generation=0,
        program_hash=run.archive.put_program(db, files),
        program_key=program_key(files),
        state=PENDING,
        rationale="the seed program",
        evals_needed=run.config.selection.noise_seeds,  # they measure the noise floor
    )


class Breeder:
    """Turns a generation's plan into proposer calls and their answers into children."""

    def __init__(
        self,
        run: Run,
        proposer: Proposer,
        population: Population,
        on_event: Callable[[Event], None],
        limit: Callable[[], str],
    ):
        self.run = run
        self.archive = run.archive
        self.proposer = proposer
        self.population = population
        self.on_event = on_event
        self.limit = limit  # why no new generation may begin ("" when one may)
        self.generation = run.archive.last_planned()  # the generation being bred (0: none yet)
        self.exhausted = ""  # why nothing more will be bred, once that is so

    def add_seed(self) -> None:
        with self.archive.transaction() as db:
            add_seed(self.run, db)

    def open_generation(self) -> int:
        """Returns the generation with calls still to make (0 when none is, or none will be made)."""
        if self.generation and not self.exhausted and self._remaining(self.generation):
            return self.generation
        return 0

    def closed_through(self) -> int:
        """Returns the latest generation that will get no more children."""
        if self.exhausted:
            return self.archive.last_planned()
        current = self.generation or 1
        if self.archive.generation_plan(current) is None or self._remaining(current):
            return current - 1
        return current

    def next_call(self) -> Call | None:
        """Returns the next proposer call to make, planning a new generation if needed.

        Returns None, and sets `exhausted`, when the run's generations or limits are reached.
        """
        if self.exhausted:
            return None
        if not self.generation:  # after a (re)start: continue the last planned generation
            self.generation = max(1, self.archive.last_planned())
        while True:
            plan = self.archive.generation_plan(self.generation)
            if plan is None:
                if self.generation > self.run.config.run.generations:
                    self.exhausted = "finished"
                    return None
                reason = self.limit()
                if reason:
                    self.exhausted = reason
                    return None
                if not self.population.can_select():
                    return None  # asked again once more has been scored
                plan = self.population.select(self.generation)
                self.archive.record_generation(self.generation, plan)
                self.on_event(
                    {
                        "event": "generation",
                        "generation": self.generation,
                        "parents": [p for p, _ in plan],
                    }
                )
            remaining = self._remaining(self.generation)
            if remaining:
                parent_id, k = remaining[0]
                k = self._trim_to_max(k)
                if k == 0:
                    self.exhausted = (
                        f"reached max_candidates ({self.run.config.run.max_candidates})"
                    )
                    return None
                return self._call(self.generation, self.archive.candidate(parent_id), k)
            self.generation += 1

    def _remaining(self, generation: int) -> list[tuple[int, int]]:
        plan = self.archive.generation_plan(generation) or []
        return [(p, k) for p, k in plan if not self.archive.has_call(generation, p)]

    def _trim_to_max(self, k: int) -> int:
        limit = self.run.config.run.max_candidates
        if not limit:
            return k
        return max(0, min(k, limit - self.archive.count(imported=False)))

    def _curves(self, parent: Candidate, best: list[Candidate]) -> list[tuple[str, list[Point]]]:
        """Returns the training curves the prompt shows: the parent's, the best's, the seed's."""
        seed = self.archive.seed()
        shown = [("the parent", parent), *[("the best", c) for c in best[:1]]]
        shown += [("the seed", seed)] if seed is not None else []
        picked, seen = [], set()
        for who, candidate in shown:
            if candidate.id not in seen:
                seen.add(candidate.id)
                picked.append(
                    (f"{who} (candidate {candidate.id})", self.archive.first_curve(candidate.id))
                )
        return picked

    def _call(self, generation: int, parent: Candidate, k: int) -> Call:
        run = self.run
        assert parent.program_hash is not None
        files = self.archive.program(parent.program_hash)
        best = [c for c in self.archive.best(self.population.minimize, 4) if c.id != parent.id]
        history = self.archive.family_history(self.archive.family_of(parent.program_hash))
        prompt = build_prompt(
            run.target,
            parent,
            files,
            run.budget_text(),
            best,
            self.archive.recent_failures(4),
            run.config.proposer.prompt_tokens,
            self.proposer.template,
            history,
            self._curves(parent, best),
        )
        space = space_for(
            settings.of_program(files),
            files,
            run.target.space,
            around=history[0].values if history else None,  # the family's first program
        )
        request = ProposalRequest(
            parent_id=parent.id,
            files=files,
            prompt=prompt,
            seed=derive_seed(run.config.run.seed, generation, parent.id),
            # read on the proposer's thread: a read of its own, never a write
            known=lambda program: self._known(program_key(program)),
            space=tuple(space),
            history=tuple(history),
            minimize=self.population.minimize,
            payoff=self.archive.payoff(self.population.minimize),
        )
        self.on_event({"event": "proposing", "generation": generation, "parent": parent.id, "k": k})
        return Call(generation, parent, files, request, k, self.weights_for(generation))

    def weights_for(self, generation: int) -> tuple[int | None, Path | None]:
        """Returns whose trained weights propose a generation (for a proposer that follows the run).

        Generation 1 is proposed by the base model (None); later ones by the
        model the champion's program trained, as accepted when the call is made.
        """
        head = self.population.champion() if generation > 1 else None
        return (head.id, self.run.root / MODELS / str(head.id)) if head else (None, None)

    def _known(self, key: str) -> bool:
        from selfprog.archive import Archive

        reader = Archive(self.archive.path, readonly=True)  # sqlite connections stay in one thread
        try:
            return reader.find_program(key) is not None
        finally:
            reader.close()

    def record(self, call: Call) -> None:
        """Records an answered call and one child per proposal, at once."""
        proposals = call.proposals
        with self.archive.transaction() as db:
            call_id = self.archive.record_call(
                db,
                call.generation,
                call.parent.id,
                proposer=self.proposer.name,
                model=next((p.model for p in proposals if p.model), ""),
                k=call.k,
                prompt_chars=len(call.request.prompt),
                tokens_in=sum(p.tokens_in for p in proposals),
                tokens_out=sum(p.tokens_out for p in proposals),
                latency=call.latency,
                cost=self.cost(proposals),
            )
            for slot, proposal in enumerate(proposals):
                proposal_id = self.archive.record_proposal(
                    db,
                    call_id,
                    slot,
                    proposal.text,
                    proposal.rationale,
                    proposal.tokens_out,
                    proposal.error,
                    proposal.finish,
                    proposal.model,
                )
                self._add_child(db, call, proposal, proposal_id)

    def cost(self, proposals: list[Proposal]) -> float | None:
        """Returns a call's estimated cost at the configured prices (None: unpriced)."""
        section = self.run.config.proposer
        if not (section.price_in or section.price_out):
            return None
        tokens_in = sum(p.tokens_in for p in proposals)
        tokens_out = sum(p.tokens_out for p in proposals)
        return (tokens_in * section.price_in + tokens_out * section.price_out) / 1e6

    def _add_child(self, db: Any, call: Call, proposal: Proposal, proposal_id: int) -> None:
        archive, target = self.archive, self.run.target
        fields: dict[str, Any] = {
            "generation": call.generation,
            "parent_id": call.parent.id,
            "proposal_id": proposal_id,
            "rationale": proposal.rationale or rationale(proposal.text),
        }
        try:
            if proposal.error:
                raise EditError(f"the proposer failed: {proposal.error}")
            edits = parse_edits(proposal.text, target.files)
            child = apply_edits(call.files, edits, target.editable, target.fixed)
        except EditError as exc:
            archive.add_candidate(db, state=State.INVALID.value, reason=str(exc), **fields)
            return
        phash = archive.put_program(db, child)
        key = program_key(child)
        fields.update(program_hash=phash, program_key=key, diff=unified_diff(call.files, child))
        same = archive.find_program(key)
        if same is not None:
            archive.add_candidate(
                db,
                state=DUPLICATE,
                duplicate_of=same,
                reason=f"same program as candidate {same}",
                **fields,
            )
            return
        archive.add_candidate(db, state=PENDING, **fields)
