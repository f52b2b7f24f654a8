"""Two-phase scoring that a candidate cannot fake: its code trains, the target's code scores."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import secrets
import shutil
import stat
import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfprog.curves import Point, PruneRule, Watch
from selfprog.data import Dataset
from selfprog.errors import ProgramError
from selfprog.records import parse_python
from selfprog.runners.base import Limits, Phase, PhaseOutcome, Runner
from selfprog.states import State
from selfprog.target import Budget, Target
from selfprog.untrusted import one_line

log = logging.getLogger(__name__)

RESULT_MARKER = "SELFPROG_RESULT"
MAX_SOURCE_BYTES = 2**20  # an editable file larger than this is not a program to run
MARGIN = 5.0  # a step budget's ceiling: this many times the seed's training time + allowance
ALLOWANCE_MARGIN = 3.0  # a seconds budget's allowance: this many times the seed's overrun + slack
ALLOWANCE_SLACK = 5.0  # seconds; the target's allowance caps the sum (bench/allowance.py)
EVAL_MARGIN = 2.0  # the evaluation's: this many times the seed's evaluation time + EVAL_SLACK
EVAL_SLACK = 10.0  # seconds


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of scoring one candidate."""

    state: State
    score: float | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    reason: str = ""
    log_tail: str = ""
    timings: Mapping[str, float] = field(default_factory=dict)
    data_hash: str = ""
    curve: tuple[Point, ...] = ()  # what its training reported of its progress

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "score": self.score,
            "metrics": dict(self.metrics),
            "reason": self.reason,
            "log_tail": self.log_tail,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "data_hash": self.data_hash,
            "curve": [list(p) for p in self.curve],
        }


def check_program(target: Target, program_dir: Path) -> Result | None:
    """Returns a rejected or invalid result for a program that must not run, else None.

    Raises:
        ProgramError: the folder does not exist.
    """
    if not program_dir.is_dir():
        raise ProgramError(f"{program_dir}: no such program folder")
    for name in target.fixed:
        copy = program_dir / name
        if copy.exists() and copy.read_bytes() != (target.root / name).read_bytes():
            return Result(State.REJECTED, reason=f"fixed file {name} differs from the target's")
    for name in target.editable:
        path = program_dir / name
        if not path.is_file():
            return Result(State.INVALID, reason=f"editable file {name} is missing")
        if path.stat().st_size > MAX_SOURCE_BYTES:
            return Result(State.INVALID, reason=f"editable file {name} is over 1 MiB")
        if name.endswith(".py"):
            try:
                parse_python(path.read_bytes(), filename=name)
            except (SyntaxError, ValueError) as exc:
                return Result(State.INVALID, reason=f"{name} does not parse: {exc}")
            except (RecursionError, MemoryError) as exc:  # nesting the parser cannot take
                return Result(State.INVALID, reason=f"{name} does not parse: {type(exc).__name__}")
    return None


def stage_program(target: Target, program_dir: Path, dest: Path) -> Path:
    """Returns dest filled with the candidate's editable files and the target's fixed ones."""
    shutil.rmtree(dest, ignore_errors=True)
    for name, source in [(n, program_dir / n) for n in target.editable] + [
        (n, target.root / n) for n in target.fixed
    ]:
        out = dest / name
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, out)
        out.chmod(0o444)
    return dest


def _train_failure(
    outcome: PhaseOutcome,
    limits: Limits,
    budget: Budget,
    seconds: float,
    limit: float,
    held: Ceilings,
) -> Result | None:
    if outcome.stopped:
        return Result(State.PRUNED, reason=outcome.stopped)
    if outcome.timed_out and limit < budget.timeout:
        if seconds > 0 and held.train and limit < seconds + budget.allowance:
            allowed = (
                f"its budget of {seconds:g}s plus {limit - seconds:.1f}s for start-up and saving, "
                f"measured on the seed ({ALLOWANCE_MARGIN:g} times its {held.overrun:.1f}s beyond "
                f"its budget, plus {ALLOWANCE_SLACK:g}s)"
            )
        elif seconds > 0:
            allowed = f"its budget of {seconds:g}s plus {budget.allowance:g}s for start-up"
        else:
            allowed = f"{limit:.0f}s (the step budget's ceiling, from the seed's training time)"
        return Result(
            State.OVER_BUDGET, reason=f"training still ran after {allowed} and was killed"
        )
    if outcome.timed_out:
        return Result(
            State.TIMEOUT, reason=f"training ran past {outcome.seconds:.0f}s and was killed"
        )
    gpu = gpu_oom(outcome.log_tail) if outcome.exit_code != 0 else ""
    if gpu:  # before the host's: torch's OutOfMemoryError reads like a MemoryError
        return Result(State.OOM, reason=f"training ran out of GPU memory: {gpu}")
    if outcome.oom:
        limit = limits.memory_bytes / 2**20
        return Result(State.OOM, reason=f"training ran out of memory (limit {limit:.0f} MiB)")
    if outcome.output_exceeded:
        limit = limits.output_bytes / 2**20
        return Result(
            State.TRAIN_FAILED,
            reason=f"training filled its output ({limit:.0f} MiB, {limits.output_files} files)",
        )
    if outcome.exit_code != 0:
        return Result(State.TRAIN_FAILED, reason=f"training exited with code {outcome.exit_code}")
    if outcome.output_lost:
        return Result(
            State.TRAIN_FAILED, reason=f"its outputs could not be copied: {outcome.output_lost}"
        )
    return None


@dataclass(frozen=True, slots=True)
class Ceilings:
    """A candidate's wall-clock ceilings, from the seed's measured phase times; 0 = none measured
    (the target's allowance and timeouts hold)."""

    train: float = 0.0  # the training phase's, under a seconds budget or a step budget
    evaluate: float = 0.0  # the evaluation phase's
    overrun: float = 0.0  # the seed's training time beyond its seconds budget: start-up, saving


def ceilings(
    seed_timings: Iterable[Mapping[str, float]],
    target: Target,
    seconds: float,
    steps: int,
    seed_seconds: float | None = None,
) -> Ceilings:
    """Returns the wall-clock ceilings of a candidate, from the seed's measured phase times (one
    mapping per evaluation of the seed, its repeats included).

    Under a seconds budget, training may run the budget plus an allowance for
    start-up and saving: ALLOWANCE_MARGIN times the seed's overrun of its own
    budget (`seed_seconds`, the candidate's unless given) plus ALLOWANCE_SLACK,
    what a loaded machine needs, never more than the target's allowance. The
    seed's median overrun counts: the margin is the load, and its repeats
    may have run beside other candidates. With a step budget too, the seed
    may stop on its steps, so nothing is measured (the target's allowance). Steps cannot be counted from outside
    the sandbox, and candidate code the evaluator runs could go on training
    there: time can be held, a multiple of the seed's slowest phase times.
    """
    runs = list(seed_timings)
    measured_train, measured_eval = (
        max((t.get(phase, 0.0) for t in runs), default=0.0) for phase in ("train", "evaluate")
    )
    evaluate = EVAL_MARGIN * measured_eval + EVAL_SLACK if measured_eval else 0.0
    if seconds > 0:
        seed_budget = seconds if seed_seconds is None else seed_seconds
        trained = [t["train"] for t in runs if t.get("train") and t["train"] >= seed_budget]
        if not trained or (steps > 0 and seed_seconds is None):  # steps may have ended it
            return Ceilings(evaluate=evaluate)  # early: its time past the budget is no overrun
        overrun = statistics.median(trained) - seed_budget
        allowance = min(target.budget.allowance, ALLOWANCE_MARGIN * overrun + ALLOWANCE_SLACK)
        return Ceilings(seconds + allowance, evaluate, overrun)
    if steps > 0 and measured_train:
        return Ceilings(MARGIN * measured_train + target.budget.allowance, evaluate)
    return Ceilings(evaluate=evaluate)


def held_late(result: Result, held: Ceilings, seconds: float) -> Result:
    """Returns a result scored without a training ceiling (it started before the seed was
    measured), `over_budget` if its training ran past the ceiling measured since."""
    trained = result.timings.get("train", 0.0)
    if result.state is not State.OK or not held.train or trained <= held.train:
        return result
    allowed = (
        f"its budget of {seconds:g}s plus {held.train - seconds:.1f}s"
        if seconds > 0
        else (f"{held.train:.0f}s (the step budget's ceiling)")
    )
    return dataclasses.replace(
        result,
        state=State.OVER_BUDGET,
        score=None,
        reason=(
            f"training ran {trained:.1f}s, past {allowed}, measured on the seed after it "
            "started (it ran while the seed was first scored)"
        ),
    )


def train_stats(out_dir: Path) -> dict[str, Any]:
    """Returns what the training program says it did (out/train.json), as `train_*` metrics.

    The candidate wrote it, so it never scores and is kept to a few checked
    fields: the device it trained on (a GPU given and not used is visible),
    its steps, its throughput, and its start-up (seconds before its first step). Only a small regular file is read (a link
    or a pipe left there is ignored, never followed or waited on).
    """
    try:
        fd = os.open(out_dir / "train.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return {}
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > 4096:
            return {}
        raw = json.loads(os.read(fd, 4096))
    except (OSError, ValueError, RecursionError):  # deep nesting: json gives up by recursing
        return {}
    finally:
        os.close(fd)
    if not isinstance(raw, dict):
        return {}
    stats: dict[str, Any] = {}
    device = raw.get("device")
    if isinstance(device, str) and device in ("cpu", "cuda", "mps", "xpu"):
        stats["train_device"] = device
    steps, size, seconds, startup = (
        _count(raw.get(k)) for k in ("steps", "bytes", "seconds", "startup")
    )
    if steps is not None:
        stats["train_steps"] = int(steps)
    if startup is not None:
        stats["train_startup_s"] = startup
    if size is not None and seconds:
        rate = size / seconds
        if math.isfinite(rate) and rate < 1e12:  # beyond any device: not a rate
            stats["train_bytes_per_s"] = rate
    return stats


def _count(value: object) -> float | None:
    """Returns a value read from candidate JSON if it is a plain, finite number in [0, 1e15)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        return None
    return number if math.isfinite(number) and 0 <= number < 1e15 else None


def gpu_oom(log_tail: str) -> str:
    """Returns the CUDA out-of-memory message a phase's log ends with, or "" (none)."""
    for line in reversed(log_tail.splitlines()):
        if "CUDA out of memory" in line or "CUDA error: out of memory" in line:
            return line.strip()[:300]
    return ""


def parse_result(stdout: str, nonce: str) -> dict[str, Any] | None:
    """Returns the evaluator's result line carrying this nonce, or None if there is none."""
    prefix = f"{RESULT_MARKER} {nonce} "
    for line in reversed(stdout.splitlines()):
        if line.startswith(prefix):
            try:
                value = json.loads(line[len(prefix) :])
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
    return None


def _no_result(outcome: PhaseOutcome, nonce: str) -> str:
    """Returns why no result counts: none printed, or one without this evaluation's nonce."""
    marked = [line for line in outcome.stdout_tail.splitlines() if line.startswith(RESULT_MARKER)]
    if not marked:
        return f"the evaluator gave no result (exit code {outcome.exit_code})"
    if any(line.startswith(f"{RESULT_MARKER} {nonce} ") for line in marked):
        return "the evaluator's result line is not a JSON object after the nonce"
    return (
        f"the evaluator printed {RESULT_MARKER} without this evaluation's nonce: the result "
        f"line must be `{RESULT_MARKER} <nonce> <json>`, the nonce being the first line of "
        "the evaluator's stdin"
    )


def _eval_result(target: Target, outcome: PhaseOutcome, nonce: str, limit: float) -> Result:
    if outcome.timed_out and limit < target.budget.eval_timeout:
        return Result(
            State.OVER_BUDGET,
            reason=f"evaluation still ran after {limit:.0f}s (a multiple of the seed's) and was "
            "killed: evaluation time is not training time",
        )
    if outcome.timed_out:
        return Result(
            State.TIMEOUT, reason=f"evaluation ran past {outcome.seconds:.0f}s and was killed"
        )
    gpu = gpu_oom(outcome.log_tail) if outcome.exit_code != 0 else ""
    if gpu:
        return Result(State.OOM, reason=f"evaluation ran out of GPU memory: {gpu}")
    if outcome.oom:
        return Result(State.OOM, reason="evaluation ran out of memory")
    found = parse_result(outcome.stdout_tail, nonce)
    if found is None:
        return Result(State.EVAL_FAILED, reason=_no_result(outcome, nonce))
    if "error" in found:
        return Result(State.EVAL_FAILED, reason=str(found["error"]))
    if target.metric not in found:
        keys = ", ".join(sorted(str(k)[:40] for k in found)[:12]) or "none"
        return Result(
            State.EVAL_FAILED,
            reason=f"the evaluator's result has no {target.metric} (its keys: {keys}): "
            "[metric] name in target.toml must be one of them",
        )
    score = found[target.metric]
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        shown = one_line(repr(score), 40)
        return Result(
            State.EVAL_FAILED,
            reason=f"the evaluator's {target.metric} is not a finite number ({shown})",
        )
    return Result(State.OK, score=float(score), metrics=found)


def score_program(
    target: Target,
    program_dir: Path,
    runner: Runner,
    data: Dataset,
    work_dir: Path,
    *,
    limits: Limits | None = None,
    seed: int = 0,
    budget_seconds: float | None = None,
    budget_steps: int | None = None,
    ceilings: Ceilings | None = None,
    labels: Mapping[str, str] | None = None,
    prune: PruneRule | None = None,
) -> Result:
    """Returns the result of training a program with its own code and scoring it with the target's.

    The training phase sees the training split only and writes weights to an
    output folder; the evaluation phase runs the target's fixed evaluator on
    those weights, with the held-out split and a one-time nonce on its stdin.
    Only the evaluator's nonce-marked stdout line counts. The harness enforces
    the budget: training still running at `ceilings.train` (from the seed's
    measured times, see `ceilings`; before the seed is measured, the budget
    plus the target's allowance) is killed (`over_budget`), and the
    evaluation at `ceilings.evaluate`, so that candidate code run by the
    evaluator cannot go on training there. Training's progress reports are
    kept as its curve (see curves.py); with a prune rule, a curve clearly
    worse than the seed's stops training (`pruned`), as a non-finite loss does.
    """
    held = ceilings or Ceilings()
    limits = limits or Limits()
    labels = dict(labels or {})
    program_dir, work_dir = program_dir.resolve(), work_dir.resolve()  # phases run elsewhere
    start = time.perf_counter()
    early = check_program(target, program_dir)
    if early is not None:
        return _finish(early, data, {"total": time.perf_counter() - start}, "")
    work_dir.mkdir(parents=True, exist_ok=True)
    out_dir = work_dir / "out"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    out_dir.chmod(0o777)  # the sandbox user may differ from ours
    seconds = target.budget.seconds if budget_seconds is None else budget_seconds
    steps = target.budget.steps if budget_steps is None else budget_steps
    limit = target.budget.train_limit(seconds, held.train)
    watch = Watch(prune)
    told = limit  # what the program is told: the seed's own overrun and slack, not the margin
    if seconds > 0 and held.overrun:  # a program pacing itself to it gains no training time
        told = min(limit, seconds + held.overrun + ALLOWANCE_SLACK)
    train = Phase(
        name="train",
        argv=target.train,
        program_dir=stage_program(target, program_dir, work_dir / "program-train"),
        out_dir=out_dir,
        out_writable=True,
        data_files=data.train_files(target),
        env={
            "SELFPROG_BUDGET_SECONDS": f"{seconds:g}",
            "SELFPROG_BUDGET_STEPS": str(steps),
            # the phase ends by then (it is killed at `limit`, later: a margin for load)
            "SELFPROG_TIME_LIMIT": f"{told:g}",
            "SELFPROG_SEED": str(seed),
        },
        timeout=limit,
        hidden=data.hidden,
        watch=watch,
    )
    log.debug("training %s (%s runner)", program_dir, runner.name)
    trained = runner.run(train, limits, {**labels, "selfprog.phase": "train"})
    timings = {"train": trained.seconds}
    curve = tuple(watch.curve())
    failed = _train_failure(trained, limits, target.budget, seconds, limit, held)
    if failed is not None:
        timings["total"] = time.perf_counter() - start
        return _finish(dataclasses.replace(failed, curve=curve), data, timings, trained.log_tail)
    nonce = secrets.token_hex(16)
    eval_timeout = min(target.budget.eval_timeout, held.evaluate or target.budget.eval_timeout)
    evaluate = Phase(
        name="evaluate",
        argv=target.evaluate,
        # staged afresh: nothing the training phase did to its folder reaches the evaluator
        program_dir=stage_program(target, program_dir, work_dir / "program-evaluate"),
        out_dir=out_dir,
        out_writable=False,
        data_files=data.shared_files(target),
        env={"SELFPROG_SEED": str(seed)},
        stdin=nonce.encode() + b"\n" + data.heldout(target),
        timeout=eval_timeout,
        hidden=data.hidden,
        trusted=True,
    )
    log.debug("evaluating %s", program_dir)
    evaluated = runner.run(evaluate, limits, {**labels, "selfprog.phase": "evaluate"})
    timings["evaluate"] = evaluated.seconds
    timings["total"] = time.perf_counter() - start
    result = _eval_result(target, evaluated, nonce, eval_timeout)
    if result.state is State.OK:
        result = dataclasses.replace(result, metrics={**result.metrics, **train_stats(out_dir)})
    log_tail = trained.log_tail if result.state is State.OK else evaluated.log_tail
    return _finish(dataclasses.replace(result, curve=curve), data, timings, log_tail)


def _finish(result: Result, data: Dataset, timings: dict[str, float], log_tail: str) -> Result:
    return dataclasses.replace(result, log_tail=log_tail, timings=timings, data_hash=data.data_hash)
