"""Training curves: the strict report format, the prune rule, and runners that stop on it."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfprog.curves import MAX_POINTS, PruneRule, Watch, at, load_curve, parse_line, prune_rule
from selfprog.runners.base import Limits
from tests.conftest import script_phase

FRACTIONS = [i / 10 for i in range(1, 11)]
SEED_CURVES = tuple(  # three runs of the seed: a falling loss, each run a few % off the others
    tuple(
        (f, round(3 / (1 + 5 * f) * (1 + wobble * (-1) ** i), 6)) for i, f in enumerate(FRACTIONS)
    )
    for wobble in (0.0, 0.04, -0.04)
)


def lines(*reports: str) -> bytes:
    return "".join(f"{r}\n" for r in reports).encode()


def test_only_strict_reports_count() -> None:
    assert parse_line("SELFPROG_PROGRESS 0.5 2.25") == (0.5, 2.25)
    for line in (
        "SELFPROG_PROGRESS 0.5",
        "SELFPROG_PROGRESS 0.5 2.2 extra",
        "selfprog_progress 0.5 2.2",
        "SELFPROG_PROGRESS 1.5 2.2",  # past its budget
        "SELFPROG_PROGRESS -0.1 2.2",
        "SELFPROG_PROGRESS nan 2.2",
        "SELFPROG_PROGRESS half 2.2",
        "loss SELFPROG_PROGRESS 0.5 2.2",
    ):
        assert parse_line(line) is None, line
    fraction, loss = parse_line("SELFPROG_PROGRESS 0.5 nan") or (0, 0)
    assert fraction == 0.5 and math.isnan(loss)  # a report: it ends the candidate


def test_watch_keeps_increasing_reports_across_chunks_and_bounds_them() -> None:
    watch = Watch()
    watch.write(b"step 1\nSELFPROG_PRO")
    watch.write(b"GRESS 0.1 3.0\nSELFPROG_PROGRESS 0.1 2.0\n")  # not past the last: ignored
    watch.write(b"SELFPROG_PROGRESS 0.05 1.0\nSELFPROG_PROGRESS 0.2 2.5\n")
    watch.write(b"SELFPROG_PROGRESS 0.3 " + b"1" * 400 + b"\n")  # overlong: no report
    assert watch.curve() == [(0.1, 3.0), (0.2, 2.5)]
    flood = Watch()  # too many reports: thinned, and the curve still reaches the end
    flood.write(lines(*(f"SELFPROG_PROGRESS {i / 10_000} 1.0" for i in range(1, 10_000))))
    curve = flood.curve()
    assert len(curve) <= MAX_POINTS and curve[-1][0] > 0.98 and curve[0][0] == 0.0001
    assert not flood.stopped.is_set()


def test_a_non_finite_loss_stops_a_child_at_once_and_the_seed_never() -> None:
    watch = Watch(prune_rule(SEED_CURVES, 0.25, 3.0))
    watch.write(lines("SELFPROG_PROGRESS 0.1 3.0", "SELFPROG_PROGRESS 0.2 inf"))
    assert watch.stopped.is_set() and "inf" in watch.reason and "20%" in watch.reason
    assert watch.curve() == [(0.1, 3.0)]  # the curve holds finite losses only
    seed = Watch()  # no rule: the seed, a repeat, pruning off; one bad step is no reason
    seed.write(
        lines("SELFPROG_PROGRESS 0.1 3.0", "SELFPROG_PROGRESS 0.2 nan", "SELFPROG_PROGRESS 0.3 2.0")
    )
    assert not seed.stopped.is_set() and seed.curve() == [(0.1, 3.0), (0.3, 2.0)]


def test_the_rule_stops_a_curve_clearly_worse_than_the_seeds_three_times_in_a_row() -> None:
    rule = prune_rule(SEED_CURVES, after=0.25, z=3.0)
    assert rule is not None and 0.02 < rule.spread < 0.05
    mean, limit = rule.limit(0.5) or (0.0, 0.0)
    assert mean == pytest.approx(3 / 3.5, rel=0.01)
    assert limit == pytest.approx(mean * math.exp(rule.margin)) and rule.margin > 0.1
    assert rule.limit(0.05) is None  # before the seed's first report: no reference
    worse = [(f, 2 * (rule.limit(f) or (0, 0))[1]) for f in FRACTIONS]
    assert rule.verdict(worse[:3]) == ""  # too early, however bad: 10 %, 20 % count for nothing
    assert rule.verdict(worse[2:4]) == ""  # two reports past the limit are not enough
    reason = rule.verdict(worse[2:5])
    assert reason.startswith("stopped at 50% of its budget") and "3 reports in a row" in reason
    within = [(f, 0.99 * (rule.limit(f) or (0, 0))[1]) for f in FRACTIONS]
    assert not any(rule.verdict(within[: i + 1]) for i in range(10))
    assert rule.verdict([*worse[2:4], within[4]]) == ""  # back within the noise at the last
    assert rule.verdict([(0.3, -1.0), (0.4, 0.0), (0.5, 9.0)]) == ""  # no ratio to a loss <= 0
    burst = [(0.5 + i / 1000, 9.0) for i in range(10)]  # many reports in a moment: no span
    assert rule.verdict(burst) == ""
    assert rule.verdict(worse[7:]) == ""  # from 90 % on: too late to save anything


def test_identical_seed_runs_still_leave_a_margin() -> None:
    same = tuple((f, 1 / f) for f in FRACTIONS)
    rule = prune_rule((same, same), after=0.25, z=3.0)
    assert rule is not None and rule.spread == 0.0 and rule.margin == 0.1  # FLOOR
    assert rule.verdict([(f, 1.1 / f) for f in FRACTIONS[2:6]]) == ""
    assert rule.verdict([(f, 1.2 / f) for f in FRACTIONS[2:6]]).startswith("stopped at 60%")


def test_the_seeds_own_runs_are_not_pruned_by_the_others() -> None:
    """Each seed run against a rule from the other two: the noise the rule allows for."""
    for i, run in enumerate(SEED_CURVES):
        others = [c for j, c in enumerate(SEED_CURVES) if j != i]
        rule = prune_rule(others, after=0.25, z=3.0)
        assert rule is not None
        assert not any(rule.verdict(run[: n + 1]) for n in range(len(run))), i


def test_no_rule_without_two_seed_curves() -> None:
    assert prune_rule([SEED_CURVES[0]], 0.25, 3.0) is None
    assert prune_rule([SEED_CURVES[0], ()], 0.25, 3.0) is None
    assert prune_rule([SEED_CURVES[0], ((0.1, 1.0),)], 0.25, 3.0) is None  # none past `after`
    assert prune_rule([[(0.5, -1.0)], [(0.5, -2.0)]], 0.25, 3.0) is None  # no log of a reward
    assert prune_rule(SEED_CURVES[:2], 0.25, 3.0) is not None


def test_interpolation_between_reports() -> None:
    curve = [(0.0, 4.0), (0.5, 2.0), (1.0, 1.0)]
    assert at(curve, 0.25) == 3.0
    assert at(curve, 0.75) == 1.5
    assert at([(0.2, 1.0)], 0.5) is None


def test_stored_curves_from_a_foreign_archive_are_checked() -> None:
    assert load_curve("[[0.1, 2.0], [0.5, 1.5]]") == [(0.1, 2.0), (0.5, 1.5)]
    for text in (
        "[[0.5, " + "1" * 400 + "]]",  # past what a float holds
        "[[0.5, 1.0]" + ", [0.6, 1.0]" * 5000 + "]",  # longer than any curve of ours
        "{}",
        "[[0.5, 1.0], [0.4, 1.0]]",
        '[[0.1, "x"]]',
        "[[2, 1]]",
        "[[0.1, NaN]]",
        "[" * 10_000,
        "[[true, 1]]",
        None,
    ):
        assert load_curve(text) == [], text


CURVED = """
import sys, time
for i in range(1, 200):
    print(f"SELFPROG_PROGRESS {i / 200} {LOSS}", flush=True)
    time.sleep(0.03)
"""


@pytest.mark.parametrize("loss", ["9.0", "0.3"])
def test_runners_stop_a_pruned_phase_and_keep_its_curve(runner, tmp_path: Path, loss: str) -> None:
    """A curve far above the seed's is killed early; one below it runs to its end (6 s)."""
    watch = Watch(prune_rule(SEED_CURVES, 0.25, 3.0))
    phase = script_phase(tmp_path, CURVED.replace("LOSS", loss), watch=watch)
    start = time.perf_counter()
    outcome = runner.run(phase, Limits(cpus=1.0), {"selfprog.run": "curves-test"})
    seconds = time.perf_counter() - start
    curve = watch.curve()
    if loss == "9.0":
        assert outcome.stopped.startswith("stopped at") and outcome.exit_code != 0
        assert seconds < 5, seconds  # stopped after ~30 % of its 6 s (a sandbox start on top)
        assert 0.25 <= curve[-1][0] < 0.6
    else:
        assert outcome.stopped == "" and outcome.exit_code == 0
        assert len(curve) == 199 and curve[-1] == (199 / 200, 0.3)


# ---- the driver: rules from the seed's curves only ----------------------------------------

MEAN = [
    (f, statistics.fmean(c[i][1] for c in SEED_CURVES)) for i, (f, _) in enumerate(SEED_CURVES[0])
]
LIAR = [(f, 0.01) for f, _ in MEAN]  # reports a loss no program reaches
SCRIPT = {  # candidate: (what its training reports, what the evaluator scores)
    2: (LIAR, 3.5),  # lies, and is worse: not accepted for its curve
    3: ([(f, 3 * loss) for f, loss in MEAN], 2.0),  # clearly worse than the seed: pruned
    4: (LIAR, 2.5),  # lies, and is better: accepted, yet its curve prunes no one
}


def scripted_training(rules: list[tuple[int, int, PruneRule | None]]):  # type: ignore[no-untyped-def]
    """Returns a fake scorer that trains by reporting a scripted curve through a real Watch."""
    from selfprog.scoring import Result
    from selfprog.states import State

    def score(job):  # type: ignore[no-untyped-def]
        rules.append((job.candidate_id, job.index, job.prune))
        if job.candidate_id == 1:
            curve, value = SEED_CURVES[job.index % 3], 3.0 + 0.01 * job.index
        else:
            # by default a curve 5 % above the seed's mean: within its noise
            curve, value = SCRIPT.get(job.candidate_id, ([(f, 1.05 * v) for f, v in MEAN], 2.9))
        watch = Watch(job.prune)
        watch.write(lines(*(f"SELFPROG_PROGRESS {f} {loss}" for f, loss in curve)))
        if watch.stopped.is_set():
            return Result(State.PRUNED, reason=watch.reason, curve=tuple(watch.curve()))
        return Result(State.OK, score=value - 0.001 * job.candidate_id, curve=tuple(curve))

    return score


def test_only_the_seeds_curves_prune_and_a_lying_curve_changes_nothing(tmp_path: Path) -> None:
    from selfprog.loop import Driver
    from selfprog.proposers.mutate import MutateProposer
    from tests.fakes import FakeScheduler
    from tests.test_loop import drive_within, make_run

    run = make_run(tmp_path, "run.generations=3", "run.population=2", "selection.policy=greedy")
    rules: list[tuple[int, int, PruneRule | None]] = []
    driver = Driver(run, MutateProposer(), FakeScheduler(scripted_training(rules)))
    assert drive_within(driver) == "finished"
    by_id = {c.id: c for c in run.archive.candidates()}
    assert by_id[3].state == "pruned" and by_id[3].reason.startswith("stopped at")
    assert by_id[2].state == "ok" and not by_id[2].accepted  # its curve bought it nothing
    assert by_id[4].accepted  # its score is good: accepted, its curve a lie
    later = [c for c in by_id.values() if c.id > 4]
    assert later and all(c.state == "ok" for c in later)  # within the seed's noise: none pruned
    assert run.archive.curves(1) == [list(c) for c in SEED_CURVES]
    assert run.archive.first_curve(3)[-1][0] >= 0.25  # a pruned candidate keeps what it reported
    for candidate_id, index, rule in rules:
        if candidate_id == 1 or index > 0:  # the seed measures; a repeat confirms a score whole
            assert rule is None, (candidate_id, index)
        else:
            assert rule is not None and rule.seed_curves == SEED_CURVES, candidate_id
    assert any(index > 0 for cid, index, _ in rules if cid != 1)  # the final pick's repeats ran
    shows_the_curves(run)


def shows_the_curves(run) -> None:  # type: ignore[no-untyped-def]
    """`show`, the report and the dashboard show each evaluation's curve beside the seed's."""
    from starlette.testclient import TestClient

    from selfprog.dashboard import make_app
    from selfprog.queries import show
    from selfprog.report import report_html

    pruned = show(run, 3)["evaluations"][0]
    assert pruned["state"] == "pruned" and pruned["curve"][-1][0] >= 0.25
    shown = subprocess.run(
        [sys.executable, "-m", "selfprog", "show", str(run.root), "3"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "state      pruned: stopped at" in shown and "  training loss at 10% 6" in shown
    assert report_html(run).count('<svg class="curve"') >= 2  # the best candidates' rows
    with TestClient(make_app(run.root.parent), base_url="http://127.0.0.1:8765") as client:
        page = client.get(f"/run/{run.root.name}/candidate/3").text
    assert '<svg class="curve"' in page and "#bbb" in page  # the seed's curve beneath it


def test_pruning_can_be_turned_off_and_older_runs_keep_running_whole(tmp_path: Path) -> None:
    from selfprog.config import freeze, load_config, thaw
    from selfprog.loop import Driver
    from selfprog.proposers.mutate import MutateProposer
    from tests.fakes import FakeScheduler
    from tests.test_loop import drive_within, make_run

    run = make_run(tmp_path, "run.generations=1", "run.population=2", "pruning.enabled=false")
    rules: list[tuple[int, int, PruneRule | None]] = []
    assert drive_within(Driver(run, MutateProposer(), FakeScheduler(scripted_training(rules))))
    assert rules and all(rule is None for _, _, rule in rules)
    frozen = tmp_path / "config.json"
    freeze(load_config(None), frozen)
    raw = json.loads(frozen.read_text())
    del raw["pruning"]  # a run begun before pruning existed
    frozen.write_text(json.dumps(raw))
    assert thaw(frozen).pruning.enabled is False


def test_a_hopeless_scaffold_child_is_pruned_by_the_seeds_real_curves(
    local_runner, tmp_path: Path
) -> None:
    """The scaffold reports its curve; a child that cannot learn stops early, recorded `pruned`."""
    from selfprog.data import prepare_data
    from selfprog.scaffold import new_target
    from selfprog.scoring import score_program
    from selfprog.states import State
    from selfprog.target import load_target

    folder = tmp_path / "mlp"
    new_target("mlp", folder)
    target = load_target(folder)
    data = prepare_data(target, tmp_path / "cache")
    limits = Limits(cpus=1.0)

    def score(program: Path, seed: int, rule: PruneRule | None = None):  # type: ignore[no-untyped-def]
        return score_program(
            target,
            program,
            local_runner,
            data,
            tmp_path / f"work-{seed}",
            limits=limits,
            seed=seed,
            budget_steps=300,
            prune=rule,
        )

    seeds = [score(folder, seed) for seed in (0, 1)]
    assert all(r.state is State.OK and len(r.curve) >= 20 for r in seeds), seeds
    rule = prune_rule([r.curve for r in seeds], after=0.25, z=3.0)
    child = tmp_path / "child"
    child.mkdir()
    source = (folder / "train.py").read_text()
    (child / "train.py").write_text(source.replace("learning_rate = 0.01", "learning_rate = 1e-7"))
    pruned = score(child, 2, rule)
    assert pruned.state is State.PRUNED and pruned.score is None, pruned
    assert pruned.reason.startswith("stopped at") and 0.25 <= pruned.curve[-1][0] < 0.9
    kept = score(folder, 3, rule)  # the seed itself, another seed: within its own noise
    assert kept.state is State.OK, kept.reason
