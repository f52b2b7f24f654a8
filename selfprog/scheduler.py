"""Scheduling evaluations: slots that score jobs somewhere, and report placements and outcomes.

The driver hands a scheduler jobs (one evaluation of one candidate) and
collects what happened; it never learns how. `ThreadScheduler` scores on
this machine, `workers` at once, each job on a thread of its own; the Ray
scheduler (selfprog/cluster.py) scores on the nodes of a cluster. Both run
`score_job`, so a candidate is staged, trained and scored the same way
wherever it lands.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import socket
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from selfprog import gpus
from selfprog.curves import PruneRule
from selfprog.data import Dataset
from selfprog.errors import RunnerError, SelfprogError
from selfprog.rundir import Run
from selfprog.runners import make_runner
from selfprog.runners.base import Limits, Phase, PhaseOutcome, Runner
from selfprog.scoring import Ceilings, Result, score_program
from selfprog.states import State
from selfprog.target import Target
from selfprog.targetcheck import require_private_heldout

log = logging.getLogger(__name__)

POLL = 0.2  # seconds between kills while cancelled jobs end
DRAIN = 3.0  # seconds close() waits for cancelled jobs' threads, killing their sandboxes


@dataclass(frozen=True, slots=True)
class Job:
    """One evaluation of one candidate: index 0 decides its state, later ones repeat it."""

    candidate_id: int
    index: int
    files: Mapping[str, str]
    seed: int
    ceilings: Ceilings = field(default_factory=Ceilings)  # from the seed's times (0 = none yet)
    prune: PruneRule | None = None  # when to stop its training early, from the seed's curves

    @property
    def key(self) -> tuple[int, int]:
        return self.candidate_id, self.index


@dataclass(frozen=True, slots=True)
class Scoring:
    """What every job of a run shares: the target, its data, the limits and the budget."""

    target: Target
    data: Dataset
    limits: Limits
    budget_seconds: float
    budget_steps: int
    labels: Mapping[str, str]  # the run's; each job adds its candidate and evaluation


@dataclass(frozen=True, slots=True)
class Placed:
    """A job started on a node."""

    job: Job
    node: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """A job ended: its result, where it ran, and the output files the target keeps."""

    job: Job
    result: Result
    node: str = ""
    kept: Mapping[str, bytes] = field(default_factory=dict)
    cancelled: bool = False  # stopped by us: the result is not the candidate's, it runs again


@dataclass(frozen=True, slots=True)
class Phased:
    """A job began a phase (train, evaluate), at `since`; schedulers that cannot tell say nothing."""

    candidate_id: int
    index: int
    phase: str
    since: float


Event = Placed | Phased | Outcome


class Scheduler(Protocol):
    """Slots that score jobs."""

    slots: int

    def submit(self, job: Job) -> None:
        """Starts a job in a free slot (the driver never submits more than `slots`)."""
        ...

    def wait(self, timeout: float) -> list[Event]:
        """Returns the placements and outcomes since the last call, waiting up to timeout for one."""
        ...

    def cancel(self) -> None:
        """Kills every job in flight; each comes back as a cancelled outcome."""
        ...

    def stop_all(self, labels: Mapping[str, str]) -> int:
        """Removes every sandbox with these labels (a crashed driver's too); returns how many."""
        ...

    def close(self) -> None:
        """Lets go of the slots (and the cluster); what still runs is the caller's to cancel first."""
        ...


def job_labels(scoring: Scoring, job: Job) -> dict[str, str]:
    return {
        **scoring.labels,
        "selfprog.candidate": str(job.candidate_id),
        "selfprog.evaluation": str(job.index),
    }


def score_job(scoring: Scoring, job: Job, runner: Runner, work: Path, node: str) -> Outcome:
    """Returns the outcome of one job: the program written out, trained and scored in work.

    This is the per-candidate boundary: whatever goes wrong in the harness is
    recorded on the candidate as `error` with its traceback, never raised.
    """
    try:
        program_dir = work / "candidate"
        shutil.rmtree(work, ignore_errors=True)
        for path, text in job.files.items():
            dest = program_dir / path
            if not dest.resolve().is_relative_to(program_dir.resolve()):  # from a hostile archive
                raise SelfprogError(f"the program names a file outside itself: {path!r}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text)
        result = score_program(
            scoring.target,
            program_dir,
            runner,
            scoring.data,
            work / "score",
            limits=scoring.limits,
            seed=job.seed,
            budget_seconds=scoring.budget_seconds,
            budget_steps=scoring.budget_steps,
            ceilings=job.ceilings,
            labels=job_labels(scoring, job),
            prune=job.prune,
        )
        kept: dict[str, bytes] = {}
        if result.state is State.OK and job.index == 0:
            kept = read_kept(scoring.target.keep, work / "score" / "out")
        return Outcome(job, result, node, kept)
    except Exception:  # the one broad except: the per-candidate boundary
        result = Result(
            State.ERROR,
            reason="the harness failed on this candidate",
            log_tail=traceback.format_exc()[-4000:],
        )
        return Outcome(job, result, node)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def read_kept(names: tuple[str, ...], out: Path) -> dict[str, bytes]:
    """Returns the output files the target keeps (a fine-tuned model), plain files only."""
    kept = {}
    for name in names:
        path = out / name
        if path.is_file() and not path.is_symlink():  # a link could point at a host file
            kept[name] = path.read_bytes()
    return kept


class Cancelled(Exception):
    """A phase asked to start after its scheduler was cancelled."""


class _Gate:
    """The runner as a scheduler's jobs see it: once closed, no phase of theirs starts.

    A job between its phases (trained, not yet evaluated) would otherwise
    start a sandbox after the kill that was meant to end it.
    """

    def __init__(self, runner: Runner):
        self.runner = runner
        self.name = runner.name
        self.closed = threading.Event()
        self._phased: list[Phased] = []
        self._lock = threading.Lock()

    def run(self, phase: Phase, limits: Limits, labels: Mapping[str, str]) -> PhaseOutcome:
        if self.closed.is_set():
            raise Cancelled("the run is stopping")
        began = Phased(
            int(labels["selfprog.candidate"]),
            int(labels["selfprog.evaluation"]),
            phase.name,
            time.time(),
        )
        with self._lock:
            self._phased.append(began)
        return self.runner.run(phase, limits, labels)

    def phased(self) -> list[Phased]:
        """Returns the phases begun since the last call."""
        with self._lock:
            began, self._phased = self._phased, []
        return began

    def stop_all(self, labels: Mapping[str, str]) -> int:
        return self.runner.stop_all(labels)


class ThreadScheduler:
    """Scores jobs on this machine, `slots` at once, with the run's runner."""

    def __init__(
        self,
        runner: Runner,
        scoring: Scoring,
        slots: int,
        work_root: Path,
        gpu_slots: Sequence[str] = (),
    ):
        self.runner = runner
        self.scoring = scoring
        self.slots = slots
        self.work_root = work_root
        self.gpu_slots = list(gpu_slots)  # each slot's GPUs ("device=0"), or none
        self.node = socket.gethostname()
        self._gate = _Gate(runner)
        self._pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="slot")
        self._running: dict[Future[Outcome], Job] = {}
        self._slot: dict[Future[Outcome], int] = {}
        self._placed: list[Event] = []
        self._cancelled: set[Future[Outcome]] = set()

    def submit(self, job: Job) -> None:
        work = self.work_root / f"{job.candidate_id}-{job.index}"
        slot = min(set(range(self.slots)) - set(self._slot.values()))
        scoring = self.scoring
        if self.gpu_slots:  # pinned: no two candidates share a device unless asked to
            limits = dataclasses.replace(scoring.limits, gpus=self.gpu_slots[slot])
            scoring = dataclasses.replace(scoring, limits=limits)
        future = self._pool.submit(score_job, scoring, job, self._gate, work, self.node)
        self._running[future] = job
        self._slot[future] = slot
        self._placed.append(Placed(job, self.node))

    def wait(self, timeout: float) -> list[Event]:
        events, self._placed = self._placed, []
        if any(f in self._cancelled for f in self._running):
            # a sandbox started just as the gate closed outlived the kill: kill it too
            try:
                self.runner.stop_all(self.scoring.labels)
            except RunnerError as exc:  # the engine is failing: its jobs end by their timeout
                log.warning("%s", exc)
        if self._running:
            done, _ = wait(self._running, timeout=timeout, return_when=FIRST_COMPLETED)
            for future in done:
                job = self._running.pop(future)
                self._slot.pop(future, None)
                outcome = future.result()
                # a job that ended `ok` as it was killed had ended: its result stands
                if future in self._cancelled and outcome.result.state is not State.OK:
                    outcome = Outcome(job, outcome.result, outcome.node, cancelled=True)
                events.append(outcome)
        # before the outcomes: a job's last phase is never reported after its end
        return [*self._gate.phased(), *events]

    def cancel(self) -> None:
        # what had already ended stands; only what was still running was killed by us
        self._cancelled |= {f for f in self._running if not f.done()}
        self._gate.closed.set()
        self.runner.stop_all(self.scoring.labels)

    def stop_all(self, labels: Mapping[str, str]) -> int:
        return self.runner.stop_all(labels)

    def close(self) -> None:
        """Lets the slots go; what was cancelled is killed until its thread has ended."""
        deadline = time.monotonic() + DRAIN
        while any(f in self._cancelled for f in self._running) and time.monotonic() < deadline:
            self.wait(POLL)
        if self._running:
            log.warning(
                "%d sandbox thread(s) did not end; resume removes what they left",
                len(self._running),
            )
        self._pool.shutdown(wait=False, cancel_futures=True)


def make_scheduler(run: Run, runner: Runner | None = None) -> Scheduler:
    """Returns the scheduler the run's config asks for (or one over this runner), ready.

    Raises:
        SelfprogError: the runner or cluster cannot serve the run (one line).
    """
    section = run.config.runner
    if section.kind == "ray" and runner is None:
        from selfprog.cluster import RayScheduler

        return RayScheduler.connect(run)
    runner = runner or make_runner(section.kind, section.image or None, run.root / "local")
    if not section.gpus and run.archive.meta("gpus") is None:  # the default, at the first start
        run.settle_gpus(bool(gpus.visible()) and runner_gpus(runner, ""))
    gpu_slots = run.gpu_slots()  # GPUs this machine lacks are refused before any sandbox
    if gpu_slots and not runner_gpus(runner, run.gpu_request()):
        gpu_slots = []
    scoring = Scoring(run.target, run.data, run.limits(), *run.budget(), labels=dict(run.labels))
    # before any candidate: a held-out split the sandbox could rebuild is refused (once per data)
    require_private_heldout(run.target, run.data, runner, scoring.limits)
    return ThreadScheduler(runner, scoring, run.workers, run.root / "work", gpu_slots)


def runner_gpus(runner: Runner, request: str) -> bool:
    """Returns whether the runner can give candidates GPUs (Docker needs NVIDIA's runtime).

    Raises:
        RunnerError: GPUs were asked for by name and the runner cannot give them.
    """
    check = getattr(runner, "gpu_support", None)
    if check is None or check():
        return True
    if request.strip():
        raise RunnerError(
            "runner.gpus asks for GPUs, and the Docker engine has no NVIDIA runtime (install "
            "the NVIDIA Container Toolkit), or use --runner local"
        )
    log.warning("this machine has GPUs, but the Docker engine cannot pass them: scoring on CPUs")
    return False
