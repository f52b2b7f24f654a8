"""The generation loop: select parents, ask for children, score them, record everything.

The loop keeps no state outside the archive, so a resumed run continues
exactly: generations whose parents are recorded are not reselected, proposer
calls already recorded are not repeated, and candidates left pending or
running are scored again.
"""

from __future__ import annotations

import hashlib
import logging
import random
import shutil
import statistics
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from selfprog.archive import (
    DUPLICATE,
    PENDING,
    UNFINISHED,
    Candidate,
    program_hash,
)
from selfprog.edits import EditError, apply_edits, parse_edits, rationale, unified_diff
from selfprog.errors import SelfprogError
from selfprog.prompt import build_prompt
from selfprog.proposers.base import Proposal, ProposalRequest, Proposer
from selfprog.rundir import MODELS, Run
from selfprog.runners.base import Runner
from selfprog.scoring import Result, State, score_program
from selfprog.selection import (
    Member,
    champion,
    clearly_better,
    goodness,
    needs_confirmation,
    select,
)

log = logging.getLogger(__name__)


Event = dict[str, Any]


def derive_seed(*parts: object) -> int:
    """Returns a stable 32-bit seed from the parts (Python's hash() changes between processes)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


class StopRequest:
    """Set from a signal handler: the first request stops gracefully, the second at once."""

    def __init__(self) -> None:
        self.count = 0
        self.reason = ""
        self._event = threading.Event()

    def request(self, reason: str) -> None:
        self.count += 1
        self.reason = self.reason or reason
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()


class Driver:
    """Drives one run to its end or until asked to stop."""

    def __init__(
        self,
        run: Run,
        proposer: Proposer,
        runner: Runner,
        stop: StopRequest | None = None,
        on_event: Callable[[Event], None] | None = None,
    ):
        self.run = run
        self.proposer = proposer
        self.runner = runner
        self.stop = stop or StopRequest()
        self.on_event = on_event or (lambda event: None)
        self.started = time.time()
        self.active_before = float(run.archive.meta("active_seconds") or 0)

    # -- the loop -------------------------------------------------------------

    def drive(self) -> str:
        """Runs generations until the config's end or a stop; returns why it ended."""
        run, config = self.run, self.run.config
        removed = self.runner.stop_all(run.labels)
        if removed:
            log.info("removed %d leftover sandbox(es) of this run", removed)
        if not run.archive.candidates():
            self._add_seed()
        if not self._evaluate():
            return self.stop.reason
        self._accept(0)
        for generation in range(1, config.run.generations + 1):
            if self.stop.requested:
                return self.stop.reason
            plan = run.archive.generation_plan(generation)
            if plan is None:
                reason = self._limit_reached()
                if reason:
                    return reason
                plan = self._select(generation)
                run.archive.record_generation(generation, plan)
            self.on_event(
                {"event": "generation", "generation": generation, "parents": [p for p, _ in plan]}
            )
            self._proposer_weights(generation)
            for parent_id, k in plan:
                if self.stop.requested or run.archive.has_call(generation, parent_id):
                    continue
                k = self._trim_to_max(k)
                if k == 0:
                    break
                self._propose(generation, run.archive.candidate(parent_id), k)
            # first evaluations; then re-evaluations of the children that look better; then acceptance
            if not self._evaluate():
                return self.stop.reason
            self._confirm(generation)
            if not self._evaluate():
                return self.stop.reason
            self._accept(generation)
        return self.stop.reason or "finished"

    # -- selection and acceptance ----------------------------------------------------

    def _members(self) -> list[Member]:
        archive = self.run.archive
        children = archive.children_counts()
        members = []
        for c in archive.candidates("state = 'ok'"):
            scores = tuple(archive.scores(c.id))
            if scores:
                keys: tuple[str, ...] = ("params", "context")
                descriptors = {k: float(c.metrics[k]) for k in keys if k in c.metrics}
                members.append(Member(c.id, scores, children.get(c.id, 0), descriptors))
        return members

    def _select(self, generation: int) -> list[tuple[int, int]]:
        run, section = self.run, self.run.config.selection
        members = self._members()
        if not members:
            seed = run.archive.candidates("generation = 0")[0]
            raise SelfprogError(
                f"no candidate has scored `ok`, so none can be a parent: the seed ended "
                f"{seed.state} ({seed.reason}); try `selfprog eval` on the target"
            )
        rng = random.Random(derive_seed(run.config.run.seed, "select", generation))
        minimize = run.target.minimize
        accepted = run.archive.accepted_ids()
        return select(
            section.policy,
            members,
            run.config.run.population,
            rng,
            minimize,
            accepted,
            ("params", "context"),
        )

    def noise(self) -> float:
        """Returns the noise floor: the spread of the seed's scores over its evaluation seeds."""
        seed = self.run.archive.candidates("generation = 0")
        scores = self.run.archive.scores(seed[0].id) if seed else []
        return statistics.stdev(scores) if len(scores) > 1 else 0.0

    def _champion(self) -> Member | None:
        return champion(self._members(), self.run.archive.accepted_ids())

    def _confirm(self, generation: int) -> None:
        """Asks for more evaluations of the generation's best-looking child, if it needs them.

        Only that child is re-evaluated, and only when it looks better than the
        best but not yet clearly so: confirming every lucky-looking child spends
        evaluations on neutral edits that noise made look better (bench/noise.py).
        """
        section, archive = self.run.config.selection, self.run.archive
        children = archive.candidates("generation = ? AND state = 'ok'", (generation,))
        if any(c.evals_needed > 1 for c in children):
            return  # chosen already (before a resume)
        best, noise, minimize = self._champion(), self.noise(), self.run.target.minimize
        members = {m.id: m for m in self._members()}
        scored = [members[c.id] for c in children if c.accepted is None and c.id in members]
        if not scored:
            return
        pick = max(scored, key=lambda m: goodness(m.mean, minimize))
        if best is None or needs_confirmation(pick, best, noise, section.z, minimize):
            archive.set_evals_needed(pick.id, section.confirm_seeds)

    def _accept(self, generation: int) -> None:
        """Decides, in id order, which candidates of the generation beat the best clear of the noise."""
        section, archive = self.run.config.selection, self.run.archive
        minimize = self.run.target.minimize
        members = {m.id: m for m in self._members()}
        best, noise = self._champion(), self.noise()
        for c in archive.candidates("generation = ? AND accepted IS NULL", (generation,)):
            member = members.get(c.id)
            better = member is not None and (
                best is None or clearly_better(member, best, noise, section.z, minimize)
            )
            archive.set_accepted(c.id, better)
            if better:
                best = member
                self.on_event(
                    {
                        "event": "accepted",
                        "candidate": c.id,
                        "score": member.mean if member else None,
                    }
                )

    def _limit_reached(self) -> str:
        run = self.run.config.run
        total = len(self.run.archive.candidates())
        if run.max_candidates and total >= run.max_candidates:
            return f"reached max_candidates ({run.max_candidates})"
        if run.max_tokens and self.run.archive.tokens_used() >= run.max_tokens:
            return f"reached max_tokens ({run.max_tokens})"
        if run.max_hours and self.active_seconds() >= run.max_hours * 3600:
            return f"reached max_hours ({run.max_hours:g})"
        return ""

    def _trim_to_max(self, k: int) -> int:
        limit = self.run.config.run.max_candidates
        if not limit:
            return k
        return max(0, min(k, limit - len(self.run.archive.candidates())))

    def active_seconds(self) -> float:
        return self.active_before + time.time() - self.started

    # -- proposing ----------------------------------------------------------------

    def _add_seed(self) -> None:
        target = self.run.target
        files = {name: (target.root / name).read_text() for name in target.editable}
        with self.run.archive.transaction() as db:
            phash = self.run.archive.put_program(db, files)
            self.run.archive.add_candidate(
                db,
                generation=0,
                program_hash=phash,
                state=PENDING,
                rationale="the seed program",
                evals_needed=self.run.config.selection.noise_seeds,  # they measure the noise floor
            )

    def _propose(self, generation: int, parent: Candidate, k: int) -> None:
        run = self.run
        assert parent.program_hash is not None
        files = run.archive.program(parent.program_hash)
        minimize = run.target.minimize
        best = [c for c in run.archive.best(minimize, 4) if c.id != parent.id]
        failures = run.archive.recent_failures(4)
        prompt = build_prompt(
            run.target,
            parent,
            files,
            run.budget_text(),
            best,
            failures,
            run.config.proposer.prompt_tokens,
            getattr(self.proposer, "template", "propose.md"),
        )
        seed = derive_seed(run.config.run.seed, generation, parent.id)
        request = ProposalRequest(
            parent_id=parent.id,
            files=files,
            prompt=prompt,
            seed=seed,
            known=lambda program: run.archive.find_program(program_hash(program)) is not None,
        )
        self.on_event({"event": "proposing", "generation": generation, "parent": parent.id, "k": k})
        start = time.perf_counter()
        proposals = self.proposer.propose(request, k)
        latency = time.perf_counter() - start
        with run.archive.transaction() as db:
            call_id = run.archive.record_call(
                db,
                generation,
                parent.id,
                proposer=self.proposer.name,
                model=next((p.model for p in proposals if p.model), ""),
                k=k,
                prompt_chars=len(prompt),
                tokens_in=sum(p.tokens_in for p in proposals),
                tokens_out=sum(p.tokens_out for p in proposals),
                latency=latency,
            )
            for slot, proposal in enumerate(proposals):
                proposal_id = run.archive.record_proposal(
                    db,
                    call_id,
                    slot,
                    proposal.text,
                    proposal.rationale,
                    proposal.tokens_out,
                    proposal.error,
                )
                self._add_child(db, generation, parent, files, proposal, proposal_id)

    def _add_child(
        self,
        db: Any,
        generation: int,
        parent: Candidate,
        files: dict[str, str],
        proposal: Proposal,
        proposal_id: int,
    ) -> None:
        archive, target = self.run.archive, self.run.target
        why = proposal.rationale or rationale(proposal.text)
        fields: dict[str, Any] = {
            "generation": generation,
            "parent_id": parent.id,
            "proposal_id": proposal_id,
            "rationale": why,
        }
        try:
            if proposal.error:
                raise EditError(f"the proposer failed: {proposal.error}")
            edits = parse_edits(proposal.text, target.files)
            child = apply_edits(files, edits, target.editable, target.fixed)
        except EditError as exc:
            archive.add_candidate(db, state=State.INVALID.value, reason=str(exc), **fields)
            return
        phash = archive.put_program(db, child)
        fields.update(program_hash=phash, diff=unified_diff(files, child))
        same = archive.find_program(phash)
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

    # -- scoring ------------------------------------------------------------------

    def _jobs(self) -> list[tuple[Candidate, int]]:
        """Returns the evaluations due, in id order: (candidate, evaluation index).

        A candidate's first evaluation decides its state; more are due only
        once it ended `ok`. An index already recorded is never run again.
        """
        archive, seed, jobs = self.run.archive, self.run.config.run.seed, []
        for c in archive.candidates("state IN ('pending', 'running', 'ok')"):
            if c.state in UNFINISHED:
                jobs.append((c, 0))
                continue
            recorded = {s - seed for s in archive.evaluation_seeds(c.id)}
            jobs += [(c, i) for i in range(1, c.evals_needed) if i not in recorded]
        return jobs

    def _evaluate(self) -> bool:
        """Runs the evaluations due, `workers` at once; returns False if a stop left some undone."""
        while True:
            jobs = self._jobs()
            if not jobs:
                return True
            if self.stop.requested:
                return False
            self._score(jobs)

    def _score(self, jobs: list[tuple[Candidate, int]]) -> None:
        """Runs evaluation jobs in order, `workers` at once, recording each as it ends."""
        queue = list(jobs)
        running: dict[Future[Result], tuple[Candidate, int]] = {}
        killed = False
        workers = self.run.config.run.workers
        with ThreadPoolExecutor(max_workers=workers) as pool:
            try:
                while queue or running:
                    while queue and len(running) < workers and not self.stop.requested:
                        candidate, index = queue.pop(0)
                        assert candidate.program_hash is not None
                        files = self.run.archive.program(candidate.program_hash)
                        if index == 0:
                            self.run.archive.mark_running(candidate.id)
                        self.on_event(
                            {"event": "started", "candidate": candidate.id, "evaluation": index}
                        )
                        future = pool.submit(self._score_one, candidate, files, index)
                        running[future] = (candidate, index)
                    if not running:
                        break
                    if (
                        self.stop.requested
                        and self.run.config.run.on_interrupt == "kill"
                        and not killed
                    ):
                        killed = True
                        self.runner.stop_all(self.run.labels)
                    done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                    for future in done:
                        candidate, index = running.pop(future)
                        if killed:  # killed by us: it runs again on resume
                            if index == 0:
                                self.run.archive.mark_pending([candidate.id])
                            continue
                        self._record(candidate, index, future.result())
            finally:
                if running:  # stopped at once: what was running runs again on resume
                    self.runner.stop_all(self.run.labels)
                    self.run.archive.mark_pending([c.id for c, i in running.values() if i == 0])
                    for future in running:
                        future.cancel()

    def _record(self, candidate: Candidate, index: int, result: Result) -> None:
        seed = self.run.config.run.seed + index
        if index == 0:
            self.run.archive.finish(candidate.id, result, seed)
        else:
            self.run.archive.add_evaluation(candidate.id, result, seed)
        self.run.archive.set_meta("active_seconds", f"{self.active_seconds():.1f}")
        event = {"event": "finished", "candidate": candidate.id, "evaluation": index}
        self.on_event({**event, "state": result.state.value, "score": result.score})

    def _keep_outputs(self, candidate_id: int, out: Path) -> None:
        """Moves the output files the target keeps (a fine-tuned model) into models/<id>/."""
        if not self.run.target.keep:
            return
        dest = self.run.root / MODELS / str(candidate_id)
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        for name in self.run.target.keep:
            kept = out / name
            if kept.is_file() and not kept.is_symlink():  # a link could point at a host file
                shutil.move(kept, dest / name)

    def _proposer_weights(self, generation: int) -> None:
        """Points a proposer that follows the run (self mode) at the champion's fine-tuned model.

        Generation 1 is proposed by the base model; later ones by the model the
        champion's program trained, as accepted when the generation begins.
        """
        adopt = getattr(self.proposer, "adopt", None)
        if adopt is None:
            return
        head = self._champion() if generation > 1 else None
        folder = self.run.root / MODELS / str(head.id) if head else None
        if head is not None and folder is not None and not folder.is_dir():
            raise SelfprogError(
                f"candidate {head.id} is the best, but its fine-tuned model is not in {folder}"
            )
        adopt(head.id if head else None, folder)

    def _score_one(self, candidate: Candidate, files: dict[str, str], index: int) -> Result:
        """Returns one evaluation of a candidate; runs on a worker thread, so never touches the archive."""
        run = self.run
        work = run.root / "work" / f"{candidate.id}-{index}"
        seconds, steps = run.budget()
        try:
            program_dir = work / "candidate"
            shutil.rmtree(work, ignore_errors=True)
            for path, text in files.items():
                (program_dir / path).parent.mkdir(parents=True, exist_ok=True)
                (program_dir / path).write_text(text)
            result = score_program(
                run.target,
                program_dir,
                self.runner,
                run.data,
                work / "score",
                limits=run.limits(),
                seed=run.config.run.seed + index,
                budget_seconds=seconds,
                budget_steps=steps,
                labels={**run.labels, "selfprog.candidate": str(candidate.id)},
            )
            if result.state is State.OK and index == 0:
                self._keep_outputs(candidate.id, work / "score" / "out")
            return result
        except Exception:  # the one broad except: the per-candidate boundary
            return Result(
                State.ERROR,
                reason="the harness failed on this candidate",
                log_tail=traceback.format_exc()[-4000:],
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
