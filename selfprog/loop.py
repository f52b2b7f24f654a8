"""The loop: breed children, score them, judge them, until the run's end or a stop.

Steady state by default: while candidates are scored, the proposer prepares
the next children from the archive as it stands, and a child starts as soon
as a slot frees, so neither the proposer nor the sandbox waits for a
generation to end. A generation is then a label (the calls made from one
selection), judged in order once its children are scored. With
`run.synchronous` each generation is bred whole, then scored, then judged,
before the next begins (exact determinism for a seeded proposer).

The loop keeps no state outside the archive, so a resumed run continues
exactly: recorded plans are not reselected, recorded calls are not asked
again, and candidates left pending or running are scored again.

Outages stop the run cleanly instead of burning it: a proposer whose
endpoint is gone raises `Outage` (its call is not recorded, so resume asks
it again), and harness errors are held back while they come in a row: one
followed by anything else was the candidate's own and is recorded, but
BREAKER of them in a row (the sandbox's engine is gone) stop the run and go
back in the queue. Either way the run ends "stopped: <cause>".
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_for
from typing import Any

from selfprog.breeder import Breeder, Call
from selfprog.curves import PruneRule, prune_rule
from selfprog.errors import Outage, SelfprogError
from selfprog.judge import Judge
from selfprog.population import Population, derive_seed
from selfprog.proposers.base import Proposer
from selfprog.rundir import MODELS, Run
from selfprog.scheduler import Job, Outcome, Phased, Placed, Scheduler
from selfprog.scoring import Ceilings, Result, ceilings, held_late
from selfprog.states import State
from selfprog.untrusted import one_line

log = logging.getLogger(__name__)

__all__ = ["Driver", "StopRequest", "derive_seed"]

Event = dict[str, Any]
POLL = 0.2  # seconds between looks when nothing has ended
MAX_ATTEMPTS = 3  # starts of one candidate that ended with its driver dying, before it is given up
BREAKER = 3  # harness errors in a row, nothing else ending between, that stop the run
CALL_BREAKER = 3  # proposer calls in a row that raised instead of answering: stop the run
FUTILE_CALLS = 3  # proposer calls whose children all failed before training, for one reason,
FUTILE = 8  # at least this many children, with no child ever trained: the run stops


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
        scheduler: Scheduler,
        stop: StopRequest | None = None,
        on_event: Callable[[Event], None] | None = None,
    ):
        self.run = run
        self.archive = run.archive
        self.proposer = proposer
        self.scheduler = scheduler
        self.stop = stop or StopRequest()
        self.on_event = on_event or (lambda event: None)
        self.synchronous = run.config.run.synchronous
        self.started = time.time()
        self.active_before = float(self.archive.meta("active_seconds") or 0)
        self.population = Population(run)
        self.judge = Judge(run, self.population, self.on_event)
        self.breeder = Breeder(run, proposer, self.population, self.on_event, self._limit_reached)
        self.in_flight: dict[tuple[int, int], Job] = {}
        self.call: Future[Call] | None = None
        self.killed = False
        self.announced = False  # that the run is stopping (said here, never in a signal handler)
        self.held: dict[tuple[int, int], Outcome] = {}  # harness errors in a row, not yet recorded
        self.halted = ""  # why the run stops itself (an outage), once it does
        self.raised = 0  # proposer calls in a row that raised instead of answering

    def drive(self) -> str:
        """Runs until the config's end or a stop; returns why it ended."""
        removed = self.scheduler.stop_all(self.run.labels)
        if removed:
            log.info("removed %d leftover sandbox(es) of this run", removed)
        if not self.archive.count():
            self.breeder.add_seed()
        self.archive.clear_phases()  # a dead driver's: none of its jobs runs now
        try:
            ended = self._loop()
            # what a dead node left and no retry reached
            self._clean_up(lambda: self.scheduler.stop_all(self.run.labels))
            return ended
        except Outage as exc:  # not the candidates' fault: nothing is recorded against them
            self._halt(f"stopped: {exc}")
            return self.halted
        finally:
            if self.in_flight:  # stopped at once: what was running runs again on resume
                self.archive.mark_pending([c for c, i in self.in_flight if i == 0])
                self._clean_up(self.scheduler.cancel)
            self.archive.clear_phases()  # no job runs once the driver has stopped
            if self.held:  # nothing showed these errors were the candidates' own: run again
                # after an outage the start counts (a candidate that takes the engine down
                # is given up after MAX_ATTEMPTS); after a stop it does not
                held = [c for c, i in self.held if i == 0]
                self.archive.mark_pending(held, attempt=bool(self.halted))

    def _clean_up(self, action: Callable[[], object]) -> None:
        """Removes sandboxes on the way out; an engine that fails then does not hide why the run
        ended (resume removes what is left)."""
        try:
            action()
        except SelfprogError as exc:
            log.warning("%s; `selfprog resume` removes what is left", exc)

    def _loop(self) -> str:
        stalled = 0
        while True:
            if self.stop.requested and not self.announced:
                self.announced = True
                how = "killing" if self.run.config.run.on_interrupt == "kill" else "finishing"
                log.warning(
                    "stopping (%s): %s the running candidates; again to stop at once",
                    self.stop.reason,
                    how,
                )
            self.judge.settle(self.breeder.closed_through())
            if not self.stop.requested and not self.halted:
                self._start_evaluations()
                self._start_call()
            elif (
                self.stop.requested
                and self.run.config.run.on_interrupt == "kill"
                and not self.killed
            ):
                self.killed = True
                self._clean_up(self.scheduler.cancel)
            if not self.in_flight and self.call is None:
                if self.stop.requested:
                    return self.stop.reason
                if self.halted:
                    return self.halted
                if self.held:  # nothing runs that could lengthen the streak: they were their own
                    self._release()
                    continue
                if self.breeder.exhausted:
                    self.judge.settle(self.breeder.closed_through())  # all of it is closed now
                    if not self._due() and not self.judge.finalize():
                        return self.breeder.exhausted
                stalled += 1  # what settling just made due starts on the next round
                if stalled > 1:  # nothing runs and nothing may start: a bug, never a silent spin
                    raise SelfprogError(
                        f"the loop stalled with evaluations due ({self._due()[:4]}) and none "
                        "allowed to start; please report this"
                    )
                continue
            stalled = 0
            self._wait()

    # -- breeding -------------------------------------------------------------

    def _may_breed(self) -> bool:
        if self.breeder.open_generation():
            return True  # a generation's calls follow one another
        if self.synchronous:  # the next generation only once this one is judged
            return not self._due() and not self.archive.unjudged_generations()

        waiting = [key for key in self._due() if key not in self.in_flight and key not in self.held]
        return len(waiting) < self.scheduler.slots  # keep a child ready for the next free slot

    def _start_call(self) -> None:
        if self.call is not None or self.breeder.exhausted or not self._may_breed():
            return
        call = self.breeder.next_call()
        if call is None:
            return
        self.call = Future()
        future = self.call

        def answer() -> None:
            try:
                future.set_result(call.answer(self.proposer))
            except BaseException as exc:  # handed to the driver's thread, which raises it
                future.set_exception(exc)

        # a daemon thread: a second Ctrl-C need not wait for a model to finish generating
        threading.Thread(target=answer, name="proposer", daemon=True).start()

    # -- scoring --------------------------------------------------------------

    def _due(self) -> list[tuple[int, int]]:
        """Returns the evaluations due, running or not: (candidate, index), in id order."""
        return [(c.id, i) for c, i in self.archive.due_evaluations(self.run.config.run.seed)]

    def _ceilings(self, candidate_id: int) -> Ceilings:
        """Returns a job's wall-clock ceilings, from the seed's times, its repeats included. None
        before the seed is scored; the seed's training is never held by them: it measures."""
        seed = self.archive.seed()
        if seed is None or seed.state != State.OK.value:
            return Ceilings()
        held = ceilings(self.archive.ok_timings(seed.id), self.run.target, *self.run.budget())
        return Ceilings(evaluate=held.evaluate) if candidate_id == seed.id else held

    def _prune_rule(self, candidate_id: int, index: int) -> PruneRule | None:
        """Returns when to stop a job's training early: the seed's curves make the rule, for a
        child's first evaluation only (a repeat confirms a score: it runs whole)."""
        pruning = self.run.config.pruning
        seed = self.archive.seed()
        if not pruning.enabled or index > 0 or seed is None or candidate_id == seed.id:
            return None
        if self.archive.evaluation_count(seed.id) < seed.evals_needed:
            return None  # the seed's repeats are still running: one rule, whenever resumed
        return prune_rule(self.archive.curves(seed.id), pruning.after, pruning.z)

    def _start_evaluations(self) -> None:
        if self.synchronous and self.breeder.open_generation():
            return  # a generation is scored once it is bred whole
        free = self.scheduler.slots - len(self.in_flight)
        seed = self.archive.seed()
        measuring = seed is not None and seed.state in (State.PENDING.value, State.RUNNING.value)
        for candidate_id, index in self._due():
            if free <= 0:
                return
            if (candidate_id, index) in self.in_flight or (candidate_id, index) in self.held:
                continue
            if measuring and seed is not None and candidate_id != seed.id:
                continue  # the seed's first evaluation measures the ceilings children are held to
            candidate = self.archive.candidate(candidate_id)
            if index == 0 and candidate.attempts >= MAX_ATTEMPTS:  # a poison candidate
                self._give_up(candidate_id)
                continue
            phash = candidate.program_hash or ""
            job = Job(
                candidate_id,
                index,
                self.archive.program(phash),
                self.run.config.run.seed + index,
                self._ceilings(candidate_id),
                self._prune_rule(candidate_id, index),
            )
            if job.index == 0:
                self.archive.mark_running(job.candidate_id)
            self.in_flight[job.key] = job
            self.scheduler.submit(job)
            free -= 1
            self.on_event(
                {"event": "started", "candidate": job.candidate_id, "evaluation": job.index}
            )

    def _give_up(self, candidate_id: int) -> None:
        reason = (
            f"its scoring was started {MAX_ATTEMPTS} times and never ended: the driver (or the "
            "node) died each time, so it is not started again"
        )
        log.error("candidate %d: %s", candidate_id, reason)
        result = Result(State.ERROR, reason=reason)
        self.archive.finish(candidate_id, result, self.run.config.run.seed)
        self.on_event({"event": "finished", "candidate": candidate_id, "evaluation": 0})

    def _wait(self) -> None:
        """Waits for a job or the proposer call to end, and records what did."""
        if self.in_flight:
            events = self.scheduler.wait(POLL)
        else:
            if self.call is not None:
                wait_for([self.call], timeout=POLL)
            events = []
        for event in events:  # first: a proposer's crash below must not lose these
            if isinstance(event, Placed):
                if event.job.index == 0:
                    self.archive.set_node(event.job.candidate_id, event.node)
            elif isinstance(event, Phased):
                if (event.candidate_id, event.index) in self.in_flight:  # not ended since
                    self.archive.set_phase(
                        event.candidate_id, event.index, event.phase, event.since
                    )
                    self.on_event(
                        {
                            "event": "phase",
                            "candidate": event.candidate_id,
                            "evaluation": event.index,
                            "phase": event.phase,
                            "since": event.since,
                        }
                    )
            else:
                self._record(event)
        if self.call is not None and self.call.done():
            future, self.call = self.call, None
            try:
                call = future.result()  # a proposer's crash stops the run here
            except Outage as exc:  # unrecorded, so resume asks it again; what runs may finish
                self._halt(f"stopped: {exc}; resume once it is back")
                return
            if self._failing(call):  # unrecorded, as an outage's call: resume asks it again
                return
            self.breeder.record(call)
            futile = self.archive.one_failure(FUTILE, FUTILE_CALLS)
            if futile:
                self._halt(
                    f"stopped: no child has trained, and the children of the last {FUTILE_CALLS} "
                    f"calls all failed the same way: {one_line(futile, 300)}; choose another proposer and resume "
                    "(`selfprog resume RUN --set proposer.kind=...`), or fix the program and "
                    "start a new run"
                )
                return
            spent = self._spend_reached()  # after every call: one generation may cost a lot
            if spent and not self.breeder.exhausted:
                log.info("%s: no more proposer calls; what was bred is scored", spent)
                self.breeder.exhausted = spent

    def _failing(self, call: Call) -> bool:
        """Returns whether the proposer raised on CALL_BREAKER calls in a row, this one the last
        (the run stops); a lone call that raised is recorded as its children's failure."""
        if not call.failure:
            self.raised = 0
            return False
        self.raised += 1
        if self.raised >= CALL_BREAKER:
            self._halt(
                f"stopped: the proposer raised on {self.raised} calls in a row, the last "
                f"{call.failure}; resume once it is fixed (-v shows where it was raised)"
            )
            return True
        log.warning(
            "generation %d: the proposer raised %s; its %d children are invalid",
            call.generation,
            call.failure,
            call.k,
        )
        return False

    def _halt(self, reason: str) -> None:
        if not self.halted:
            log.error("%s", reason)
            self.halted = reason

    def _record(self, outcome: Outcome) -> None:
        job = outcome.job
        self.in_flight.pop(job.key, None)
        self.archive.end_job(*job.key)  # a held error too: it is not running any more
        if outcome.cancelled:  # killed by us: it runs again on resume
            if job.index == 0:
                self.archive.mark_pending([job.candidate_id])
            return
        if outcome.result.state is State.ERROR:  # the harness failed: is it the candidate?
            self.held[job.key] = outcome
            if len(self.held) >= BREAKER:
                last = outcome.result.log_tail.strip().splitlines() or [outcome.result.reason]
                self._halt(
                    f"stopped: the harness failed on {len(self.held)} candidates in a row, the "
                    f"last with {last[-1][:200]}; they go back in the queue: fix the cause (is "
                    "the sandbox's engine running?) and resume"
                )
            return
        if not self.halted:  # something else ended: the errors held were the candidates' own
            self._release()
        self._finish(outcome)

    def _release(self) -> None:
        held, self.held = self.held, {}
        for outcome in held.values():
            self._finish(outcome)

    def _finish(self, outcome: Outcome) -> None:
        job, result = outcome.job, outcome.result
        if not job.ceilings.train:  # it started before the seed was measured: held now
            seed = self.archive.seed()
            if seed is not None and seed.id != job.candidate_id:
                result = held_late(result, self._ceilings(job.candidate_id), self.run.budget()[0])
        if result.metrics.get("train_device") == "cpu" and getattr(self.scheduler, "gpu_slots", 0):
            log.warning(
                "candidate %d trained on the CPU, though it was given a GPU", job.candidate_id
            )
        if job.index == 0:
            self._keep_outputs(job.candidate_id, outcome.kept)
            self.archive.finish(job.candidate_id, result, job.seed, outcome.node)
        else:
            self.archive.add_evaluation(job.candidate_id, result, job.seed, outcome.node)
        self.archive.set_meta("active_seconds", f"{self.active_seconds():.1f}")
        event = {"event": "finished", "candidate": job.candidate_id, "evaluation": job.index}
        self.on_event({**event, "state": result.state.value, "score": result.score})

    def _keep_outputs(self, candidate_id: int, kept: Any) -> None:
        """Writes the output files the target keeps (a fine-tuned model) into models/<id>/."""
        if not kept:
            return
        dest = self.run.root / MODELS / str(candidate_id)
        shutil.rmtree(dest, ignore_errors=True)  # nothing of an earlier attempt stays beside it
        dest.mkdir(parents=True)
        for name, data in kept.items():
            if name in self.run.target.keep:  # the names are the target's, never the node's
                (dest / name).write_bytes(data)

    # -- limits ---------------------------------------------------------------

    def _limit_reached(self) -> str:
        run = self.run.config.run
        if run.max_candidates and self.archive.count(imported=False) >= run.max_candidates:
            return f"reached max_candidates ({run.max_candidates})"
        spent = self._spend_reached()
        if spent:
            return spent
        if run.max_hours and self.active_seconds() >= run.max_hours * 3600:
            return f"reached max_hours ({run.max_hours:g})"
        if run.max_sandbox_hours:
            hours = self.archive.sandbox_seconds() / 3600
            if hours >= run.max_sandbox_hours:
                return f"reached max_sandbox_hours ({run.max_sandbox_hours:g}, spent {hours:.4g})"
        return ""

    def _spend_reached(self) -> str:
        run = self.run.config.run
        if run.max_tokens and self.archive.tokens_used() >= run.max_tokens:
            return f"reached max_tokens ({run.max_tokens})"
        if run.max_cost and self.archive.cost_used() >= run.max_cost:
            return f"reached max_cost ({run.max_cost:g}, spent {self.archive.cost_used():.4g})"
        return ""

    def active_seconds(self) -> float:
        return self.active_before + time.time() - self.started
