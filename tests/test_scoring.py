"""Two-phase scoring: real training of the seed, and candidates that try to fake their score."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from selfprog.data import Dataset
from selfprog.runners.base import Limits
from selfprog.scoring import (
    ALLOWANCE_MARGIN,
    ALLOWANCE_SLACK,
    EVAL_MARGIN,
    EVAL_SLACK,
    MARGIN,
    Ceilings,
    Result,
    State,
    ceilings,
    check_program,
    parse_result,
    score_program,
)
from selfprog.target import Target

LIMITS = Limits(memory_bytes=3 * 1024 * 2**20, cpus=2.0)


def score(target: Target, program: Path, runner, data: Dataset, tmp_path: Path, **kw) -> Result:  # type: ignore[no-untyped-def]
    labels = {"selfprog.run": "test", "selfprog.candidate": program.name}
    return score_program(
        target, program, runner, data, tmp_path / "work", limits=LIMITS, labels=labels, **kw
    )


@pytest.mark.slow
def test_seed_learns_in_both_runners(
    runner, tinylm: Target, dataset: Dataset, seed_program: Path, tmp_path: Path
) -> None:
    result = score(tinylm, seed_program, runner, dataset, tmp_path, budget_seconds=10)
    assert result.state is State.OK, (result.reason, result.log_tail)
    assert result.score is not None and 1.0 < result.score < 8.0
    assert result.metrics["val_bpb"] == result.score
    assert result.metrics["params"] > 10_000
    assert result.data_hash == dataset.data_hash
    assert set(result.timings) == {"train", "evaluate", "total"}
    # the seed says how long it took to reach its first step: within the training phase
    assert 0 < result.metrics["train_startup_s"] < result.timings["train"]


class NeverRuns:
    name = "never"

    def run(self, *args: object) -> None:
        raise AssertionError("a rejected candidate must not run")


def test_edited_fixed_file_is_rejected_before_running(
    tinylm: Target, dataset: Dataset, seed_program: Path, tmp_path: Path
) -> None:
    evaluate = seed_program / "evaluate.py"
    evaluate.write_text(evaluate.read_text().replace("EVAL_BYTES = 131_072", "EVAL_BYTES = 1_000"))
    result = score(tinylm, seed_program, NeverRuns(), dataset, tmp_path)
    assert result.state is State.REJECTED
    assert result.reason == "fixed file evaluate.py differs from the target's"


def test_unparsable_or_missing_editable_file_is_invalid(tinylm: Target, seed_program: Path) -> None:
    (seed_program / "model.py").write_text("def broken(:\n")
    result = check_program(tinylm, seed_program)
    assert result is not None and result.state is State.INVALID
    assert result.reason.startswith("model.py does not parse")
    # too deep for the parser whatever the recursion limit (torch's inductor raises it in-process,
    # and 3000 levels then parse); too big
    for hostile in ("_x = " + "-" * 100_000 + "1\n", "x = 1\n" * 200_000):
        (seed_program / "model.py").write_text(hostile)
        result = check_program(tinylm, seed_program)
        assert result is not None and result.state is State.INVALID, result
    (seed_program / "model.py").unlink()
    result = check_program(tinylm, seed_program)
    assert result is not None and result.reason == "editable file model.py is missing"


FAKE_LINE = 'SELFPROG_RESULT {nonce} {{"val_bpb": 0.001, "params": 1}}'

TRAIN_FAKES = """
# --- the candidate's attempts to report its own score ---
for guess in ("", "0" * 32, "ffffffffffffffffffffffffffffffff"):
    print("{line}".replace("NONCE", guess), flush=True)
(out_dir / "metrics.json").write_text('{{"val_bpb": 0.001}}')
(out_dir / "result.json").write_text('{{"val_bpb": 0.001}}')
""".format(line=FAKE_LINE.format(nonce="NONCE").replace('"', '\\"'))

MODEL_FAKES = """
import os as _os
import sys as _sys

# --- from inside the evaluator: write a fake result onto the scorer's stdout ---
for _path in ("/proc/%d/fd/1" % _os.getppid(), "/proc/1/fd/1"):
    try:
        _fd = _os.open(_path, _os.O_WRONLY)
        _os.write(_fd, b'{line}\\n')
        _os.close(_fd)
        print("WROTE", _path, file=_sys.stderr)
    except OSError as _exc:
        print("BLOCKED", _path, _exc, file=_sys.stderr)
try:
    open(_os.path.join(_os.environ.get("SELFPROG_OUT", "."), "metrics.json"), "w").write("{{}}")
except OSError:
    pass
""".format(line=FAKE_LINE.format(nonce="0" * 32))


class Recording:
    """A runner that keeps every phase's outcome, to look at the evaluator's log."""

    def __init__(self, runner):  # type: ignore[no-untyped-def]
        self.runner, self.name, self.outcomes = runner, runner.name, {}

    def run(self, phase, limits, labels):  # type: ignore[no-untyped-def]
        self.outcomes[phase.name] = self.runner.run(phase, limits, labels)
        return self.outcomes[phase.name]

    def stop_all(self, labels):  # type: ignore[no-untyped-def]
        return self.runner.stop_all(labels)


def test_fake_scores_are_ignored(
    runner, tinylm: Target, dataset: Dataset, seed_program: Path, tmp_path: Path
) -> None:
    train = seed_program / "train.py"
    train.write_text(train.read_text() + TRAIN_FAKES)
    model = seed_program / "model.py"
    model.write_text(MODEL_FAKES + model.read_text())
    recording = Recording(runner)
    result = score(tinylm, seed_program, recording, dataset, tmp_path, budget_steps=60)
    assert result.state is State.OK, (result.reason, result.log_tail)
    assert result.score is not None and result.score > 2.0
    assert result.metrics["params"] > 10_000
    assert "SELFPROG_RESULT" in result.log_tail  # the fakes were printed, and ignored
    # and the model server's attempts on the scorer's stdout were refused, each of them
    # (not under the local runner as root: root may open any process's descriptors)
    if runner.name == "docker" or os.getuid() != 0:
        served = recording.outcomes["evaluate"].log_tail
        assert "BLOCKED /proc/" in served, served
        assert "WROTE" not in served, served


def test_a_model_that_sees_the_future_fails_evaluation(
    local_runner, tinylm: Target, dataset: Dataset, seed_program: Path, tmp_path: Path
) -> None:
    model = seed_program / "model.py"
    model.write_text(model.read_text().replace("is_causal=True", "is_causal=False"))
    result = score(tinylm, seed_program, local_runner, dataset, tmp_path, budget_steps=60)
    assert result.state is State.EVAL_FAILED
    assert "not causal" in result.reason


def test_training_that_crashes_is_train_failed(
    local_runner, tinylm: Target, dataset: Dataset, seed_program: Path, tmp_path: Path
) -> None:
    train = seed_program / "train.py"
    train.write_text(train.read_text().replace("model.train()", "raise RuntimeError('boom')"))
    result = score(tinylm, seed_program, local_runner, dataset, tmp_path)
    assert result.state is State.TRAIN_FAILED
    assert result.reason == "training exited with code 1"
    assert "RuntimeError: boom" in result.log_tail


def test_a_seconds_budgets_allowance_is_the_seeds_overrun_with_a_margin(tinylm: Target) -> None:
    assert tinylm.budget.allowance == 20
    # the seed's repeats, one of them beside another candidate: the margin is the load, so the
    # median overrun counts (3.5 s over an 8 s budget)
    repeats = [{"train": 11.0, "evaluate": 3.0}, {"train": 15.5, "evaluate": 2.0}, {"train": 11.5}]
    allowance = ALLOWANCE_MARGIN * 3.5 + ALLOWANCE_SLACK
    assert allowance < 20
    evaluate = EVAL_MARGIN * 3.0 + EVAL_SLACK  # the evaluation: the slowest
    assert ceilings(repeats, tinylm, 8, 0) == Ceilings(8 + allowance, evaluate, 3.5)
    # a step budget too: the seed may have stopped on its steps, so nothing is measured
    assert ceilings(repeats, tinylm, 8, 100) == Ceilings(evaluate=evaluate)
    # capped by the target's allowance: a seed slow to start up never widens it
    assert ceilings([{"train": 30.0}], tinylm, 8, 0) == Ceilings(8 + 20, 0.0, 22.0)
    # measured on another budget (`selfprog eval` times the seed's one step): its overrun is all
    assert ceilings([{"train": 4.0}], tinylm, 8, 0, seed_seconds=0) == Ceilings(
        8 + ALLOWANCE_MARGIN * 4.0 + ALLOWANCE_SLACK, 0.0, 4.0
    )
    # nothing measured, or a seed that stopped before its seconds (by its steps): the target's
    assert ceilings([], tinylm, 8, 0) == Ceilings()
    seed = [{"train": 6.0, "evaluate": 2.0}]
    assert ceilings(seed, tinylm, 8, 0) == Ceilings(evaluate=EVAL_MARGIN * 2.0 + EVAL_SLACK)
    # a step budget: a multiple of the seed's training time, plus the target's allowance
    assert ceilings(repeats, tinylm, 0, 50) == Ceilings(MARGIN * 15.5 + 20, evaluate)
    assert ceilings(repeats, tinylm, 0, 0) == Ceilings(evaluate=evaluate)
    # what the harness kills training at: the measured ceiling once there is one
    assert tinylm.budget.train_limit(8, 8 + allowance) == 8 + allowance
    assert tinylm.budget.train_limit(8) == 8 + 20


def test_parse_result_takes_only_the_nonce_line() -> None:
    stdout = 'SELFPROG_RESULT abc {"val_bpb": 0.1}\nnoise\nSELFPROG_RESULT good {"val_bpb": 3.2}\n'
    assert parse_result(stdout, "good") == {"val_bpb": 3.2}
    assert parse_result(stdout, "other") is None
    assert parse_result("SELFPROG_RESULT good [1]\n", "good") is None


def test_training_out_of_gpu_memory_is_oom_with_the_cuda_message(
    tinylm: Target, dataset: Dataset, seed_program: Path, tmp_path: Path, local_runner
) -> None:  # type: ignore[no-untyped-def]
    message = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB"
    (seed_program / "train.py").write_text(
        f"import sys\nprint({message!r}, file=sys.stderr)\nsys.exit(1)\n"
    )
    result = score(tinylm, seed_program, local_runner, dataset, tmp_path)
    assert result.state is State.OOM
    assert result.reason == f"training ran out of GPU memory: {message}"


class TimedOut:
    """A runner whose training is always killed at its limit; keeps what the phase was told."""

    name = "fake"

    def __init__(self) -> None:
        self.env: dict[str, str] = {}
        self.timeout = 0.0

    def run(self, phase, limits, labels):  # type: ignore[no-untyped-def]
        from selfprog.runners.base import PhaseOutcome

        self.env, self.timeout = dict(phase.env), phase.timeout
        return PhaseOutcome(None, phase.timeout, "", "", timed_out=True)


def test_a_program_is_told_the_seeds_own_time_and_killed_only_after_the_margin(
    tinylm: Target, dataset: Dataset, seed_program: Path, tmp_path: Path
) -> None:
    """A program pacing itself to SELFPROG_TIME_LIMIT gains no more than the seed needed: the
    margin for a loaded machine is the harness's, and the program is not told it."""
    held = ceilings([{"train": 12.0}], tinylm, 8, 0)  # the seed: 4 s past its 8 s budget
    runner = TimedOut()
    result = score(tinylm, seed_program, runner, dataset, tmp_path, budget_seconds=8, ceilings=held)
    assert runner.timeout == held.train == 8 + ALLOWANCE_MARGIN * 4 + ALLOWANCE_SLACK
    assert float(runner.env["SELFPROG_TIME_LIMIT"]) == 8 + 4 + ALLOWANCE_SLACK < held.train
    assert result.state is State.OVER_BUDGET
    score(tinylm, seed_program, runner, dataset, tmp_path, budget_seconds=8)  # none measured
    assert float(runner.env["SELFPROG_TIME_LIMIT"]) == runner.timeout == 8 + 20


def test_a_job_started_before_the_seed_was_measured_is_held_when_it_ends(tinylm: Target) -> None:
    from selfprog.scoring import Result, held_late

    held = ceilings([{"train": 12.0}], tinylm, 8, 0)
    cheat = Result(State.OK, score=1.0, timings={"train": 27.0})  # 8 s + the target's 20
    late = held_late(cheat, held, 8)
    assert late.state is State.OVER_BUDGET and late.score is None
    assert "training ran 27.0s, past its budget of 8s plus 17.0s" in late.reason
    honest = Result(State.OK, score=1.0, timings={"train": 13.0})
    assert held_late(honest, held, 8) is honest
    assert held_late(cheat, Ceilings(), 8) is cheat  # nothing measured yet: nothing to hold to


def test_an_evaluator_result_without_the_metric_names_what_it_has(tinylm) -> None:  # type: ignore[no-untyped-def]
    from selfprog.runners.base import PhaseOutcome
    from selfprog.scoring import _eval_result

    def result(payload: str):  # type: ignore[no-untyped-def]
        line = f"SELFPROG_RESULT abc {payload}\n"
        return _eval_result(tinylm, PhaseOutcome(0, 1.0, line, line), "abc", 60.0)

    missing = result('{"val_ppl": 3.2, "params": 10}')
    assert missing.state.value == "eval_failed"
    assert missing.reason.startswith(
        "the evaluator's result has no val_bpb (its keys: params, val_ppl)"
    )
    assert (
        result('{"val_bpb": NaN}').reason == "the evaluator's val_bpb is not a finite number (nan)"
    )
    assert "not a finite number (True)" in result('{"val_bpb": true}').reason
    assert result('{"val_bpb": 3.5}').score == 3.5


def test_a_failure_is_told_by_its_exception_not_the_last_line_printed() -> None:
    from selfprog.untrusted import failure_line

    log = "step 1\nTraceback (most recent call last):\n  File x\nRuntimeError: shapes differ\nstep 2 done\n"
    assert failure_line(log) == "RuntimeError: shapes differ"
    assert failure_line("Errors so far: 0\nlast words\n") == "last words"
    assert failure_line("") == ""
