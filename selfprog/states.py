"""Candidate states: the one place that names them."""

from __future__ import annotations

import enum


class State(str, enum.Enum):
    """Where a candidate stands; every candidate ends in exactly one final state."""

    PENDING = "pending"  # recorded, waiting for a sandbox slot
    RUNNING = "running"  # in a sandbox now (or when a driver died)
    DUPLICATE = "duplicate"  # the same program as an earlier candidate; never trained
    OK = "ok"
    INVALID = "invalid"  # edits did not apply, or the program does not parse
    REJECTED = "rejected"  # a fixed file was touched
    TRAIN_FAILED = "train_failed"
    TIMEOUT = "timeout"  # a phase ran past its hard limit
    OVER_BUDGET = "over_budget"  # training still ran after its budget and start-up allowance
    OOM = "oom"
    PRUNED = "pruned"  # stopped early: its training curve was clearly worse than the seed's
    EVAL_FAILED = "eval_failed"
    ERROR = "error"  # the harness itself failed on this candidate (traceback in the log tail)


UNFINISHED = (State.PENDING.value, State.RUNNING.value)
FAILED = tuple(
    s.value for s in State if s not in (State.OK, State.PENDING, State.RUNNING, State.DUPLICATE)
)
ALL = tuple(s.value for s in State)
