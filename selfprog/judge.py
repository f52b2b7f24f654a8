"""Confirmation and acceptance: which children are better than the champion, and the final pick.

Two ways to spend evaluations on noise (`selection.finalists`):
- finalists > 0 (the default): a child is accepted when its mean beats the
  champion's, on its one evaluation, as the keep/discard rule does; at the
  run's end the best few are evaluated again and the best mean among them,
  confirmed, is the champion. Confirming as the run goes spent evaluations
  that new children use better (bench/noise.py).
- finalists = 0: the generation's best-looking child is evaluated again when
  it looks better but not yet clearly, and accepted only clear of the noise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from selfprog.population import Population
from selfprog.rundir import Run
from selfprog.selection import clearly_better, final_round, goodness, needs_confirmation
from selfprog.states import State

Event = dict[str, Any]


class Judge:
    """Decides generations in order, each once its evaluations are all recorded."""

    def __init__(self, run: Run, population: Population, on_event: Callable[[Event], None]):
        self.run = run
        self.archive = run.archive
        self.population = population
        self.on_event = on_event

    def settle(self, closed_through: int) -> None:
        """Judges, oldest first, every generation up to closed_through whose work is done.

        A generation is closed when no more children will be proposed for it.
        Judging stops at the first generation still being scored, so each is
        judged against the champion of the generations before it.
        """
        busy = {c.generation for c, _ in self.archive.due_evaluations(self.run.config.run.seed)}
        for generation in self.archive.unjudged_generations():
            if generation > closed_through or generation in busy:
                return
            if self.confirm(generation):
                return  # its best-looking child is evaluated again first
            self.accept(generation)

    def confirm(self, generation: int) -> bool:
        """Asks for more evaluations of the generation's best-looking child, if it needs them.

        Only that child is re-evaluated, and only when it looks better than the
        best but not yet clearly so: confirming every lucky-looking child spends
        evaluations on neutral edits that noise made look better (bench/noise.py).
        Returns whether evaluations were asked for. Asking again gives the same
        answer (the champion changes only when a generation is accepted).
        """
        section = self.run.config.selection
        if section.finalists:
            return False  # confirmed at the run's end instead
        children = [c for c in self.archive.in_generation(generation) if c.state == State.OK]
        if generation == 0 or any(c.evals_needed > 1 for c in children):
            return False  # the seed's repeats measure the noise; or chosen already
        best, noise = self.population.champion(), self.population.noise()
        minimize = self.population.minimize
        members = {m.id: m for m in self.population.members()}
        scored = [members[c.id] for c in children if c.accepted is None and c.id in members]
        if not scored:
            return False
        pick = max(scored, key=lambda m: goodness(m.mean, minimize))
        if best is None or needs_confirmation(pick, best, noise, section.z, minimize):
            self.archive.set_evals_needed(pick.id, section.confirm_seeds)
            return section.confirm_seeds > len(pick.scores)
        return False

    def accept(self, generation: int) -> None:
        """Decides, in id order, which candidates of the generation beat the best clear of the noise
        (or on their mean, when the final pick confirms instead)."""
        section = self.run.config.selection
        z, minimize = (0.0 if section.finalists else section.z), self.population.minimize
        members = {m.id: m for m in self.population.members()}
        best, noise = self.population.champion(), self.population.noise()
        decisions: dict[int, bool] = {}
        for c in self.archive.in_generation(generation):
            if c.accepted is not None:
                continue
            member = members.get(c.id)
            better = member is not None and (
                best is None or clearly_better(member, best, noise, z, minimize)
            )
            decisions[c.id] = better
            if better and member is not None:
                best = member
        self.archive.set_accepted_many(decisions)  # the generation's decisions at once
        for c_id, better in decisions.items():
            if better:
                why = "mean" if section.finalists else "clear"
                event = {"event": "accepted", "candidate": c_id, "score": members[c_id].mean}
                self.on_event({**event, "why": why})

    def finalize(self) -> bool:
        """Confirms the best at the run's end; returns whether evaluations were asked for.

        While the best mean belongs to a member evaluated fewer than
        `confirm_seeds` times, the best `finalists` members so short are
        evaluated again (together, so workers run them side by side); a lucky
        mean falls and another may take its place, which is asked about in
        turn. Once the best mean is confirmed, that member is accepted, so it
        is the champion that `status` and the report show. A member whose
        repeats were asked for already is not asked again (one that failed
        keeps the evaluations it has).
        """
        section = self.run.config.selection
        members = self.population.members()
        if not section.finalists or not members:
            return False
        if self.archive.due_evaluations(self.run.config.run.seed):
            return True  # not the end yet: what is asked for comes first
        asked = self.archive.evaluated_at_least(section.confirm_seeds)
        pick, again = final_round(
            members, section.finalists, section.confirm_seeds, self.population.minimize, asked
        )
        if again:
            for candidate_id in again:
                self.archive.set_evals_needed(candidate_id, section.confirm_seeds)
            self.on_event({"event": "final", "candidates": again})
            return True
        if self.archive.meta("final_pick") == str(pick.id):
            return False  # decided already (a resumed run with nothing more to do)
        if pick.id not in self.archive.accepted_ids():
            self.archive.set_accepted(pick.id, True)
        self.archive.set_meta("final_pick", str(pick.id))
        event = {"event": "accepted", "candidate": pick.id, "score": pick.mean, "why": "final"}
        self.on_event({**event, "evaluations": len(pick.scores)})
        return False
