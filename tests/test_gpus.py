"""GPUs without a GPU: the plan of which slot gets which device, pinning, limits, refusals.

CI has no GPU; these use a fake `nvidia-smi` and scripted runners. What needs a real
card (CUDA under the local runner's limits, throughput) is in bench/gpu.py.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from selfprog import gpus
from selfprog.errors import ConfigError, RunnerError
from selfprog.runners.base import Limits
from selfprog.scoring import train_stats
from tests.conftest import script_phase
from tests.test_cli import assert_one_line_error, selfprog

FOUR = ("0", "1", "2", "3")


def test_each_slot_gets_gpus_of_its_own() -> None:
    assert gpus.slot_devices("", 4, False, FOUR) == [f"device={i}" for i in FOUR]
    assert gpus.default_workers("", FOUR) == 4 and gpus.default_workers("2", FOUR) == 2
    assert gpus.slot_devices("2", 2, False, FOUR) == ["device=0,1", "device=2,3"]
    assert gpus.slot_devices("", 1, False, ()) == []  # no GPU here: none, quietly
    assert gpus.slot_devices("0", 4, False, FOUR) == []
    assert gpus.slot_devices("device=2", 1, False, FOUR) == ["device=2"]
    assert gpus.slot_devices("", 3, True, ("0", "1")) == ["device=0", "device=1", "device=0"]


@pytest.mark.parametrize(
    ("request_", "workers", "have", "message"),
    [
        ("1", 1, (), "this machine has none"),
        ("2", 1, ("0",), "asks for 2 GPUs per candidate; this machine has 1"),
        ("", 3, ("0", "1"), "a wall-clock budget is unfair on a shared GPU"),
        ("all", 2, ("0", "1"), "a wall-clock budget is unfair on a shared GPU"),
        ("device=5", 1, ("0", "1"), "asks for GPU 5; this machine has 0, 1"),
        ("many", 1, ("0",), "must be a count, 'all' or device=IDS"),
    ],
)
def test_requests_the_machine_cannot_meet_are_refused(
    request_: str, workers: int, have: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        gpus.slot_devices(request_, workers, False, have)


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Returns a function that makes this process see `count` GPUs (a fake nvidia-smi)."""

    def with_gpus(count: int) -> None:
        for key, value in fake_nvidia_smi(tmp_path / "bin", count).items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        gpus.visible.cache_clear()

    yield with_gpus
    gpus.visible.cache_clear()


def fake_nvidia_smi(folder: Path, count: int) -> dict[str, str]:
    """Returns an environment whose PATH finds an nvidia-smi that lists `count` GPUs."""
    folder.mkdir(exist_ok=True)
    tool = folder / "nvidia-smi"
    lines = "".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})\\n" for i in range(count))
    tool.write_text(f"#!/bin/sh\nprintf '{lines}'\n")
    tool.chmod(0o755)
    return {"PATH": f"{folder}:{os.environ['PATH']}"}


def test_the_gpus_visible_are_nvidia_smis_narrowed_by_cuda_visible_devices(
    machine, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    machine(4)
    assert gpus.visible() == FOUR
    for narrowed, expected in (("1,3", ("1", "3")), ("GPU-2", ("2",)), ("-1", ()), ("", ())):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", narrowed)
        gpus.visible.cache_clear()
        assert gpus.visible() == expected, narrowed


class Recording:
    """A runner that notes which GPUs each running phase was given, and how many overlap."""

    name = "scripted"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: list[str | None] = []
        self.seen: list[str | None] = []
        self.shared = False

    def run(self, phase, limits, labels):  # type: ignore[no-untyped-def]
        from selfprog.runners.base import PhaseOutcome

        with self.lock:
            self.shared |= limits.gpus in self.running
            self.running.append(limits.gpus)
            self.seen.append(limits.gpus)
        time.sleep(0.2)
        with self.lock:
            self.running.remove(limits.gpus)
        return PhaseOutcome(1, 0.2, "", "scripted failure")  # training fails: one phase each

    def stop_all(self, labels):  # type: ignore[no-untyped-def]
        return 0


def test_a_scheduler_pins_each_running_candidate_to_its_own_gpu(
    tinylm, dataset, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from selfprog.scheduler import Job, Outcome, Scoring, ThreadScheduler

    runner = Recording()
    files = {name: (tinylm.root / name).read_text() for name in tinylm.editable}
    scoring = Scoring(tinylm, dataset, Limits(), 0.0, 5, {"selfprog.run": "r"})
    slots = ["device=0", "device=1"]
    scheduler = ThreadScheduler(runner, scoring, 2, tmp_path, slots)  # type: ignore[arg-type]
    pending, ended = list(range(1, 7)), 0
    while ended < 6:
        while pending and len(scheduler._running) < 2:
            scheduler.submit(Job(pending.pop(0), 0, files, 0))
        ended += sum(isinstance(e, Outcome) for e in scheduler.wait(1.0))
    scheduler.close()
    assert set(runner.seen) == {"device=0", "device=1"} and len(runner.seen) == 6
    assert not runner.shared


def test_the_local_runner_pins_the_gpu_and_limits_data_not_address_space(
    local_runner, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    source = (
        "import os, resource\n"
        "print(os.environ['CUDA_VISIBLE_DEVICES'] or '-',"
        " resource.getrlimit(resource.RLIMIT_AS)[0], resource.getrlimit(resource.RLIMIT_DATA)[0])\n"
    )
    memory = 3 * 1024**3
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pinned = local_runner.run(
        script_phase(tmp_path / "a", source), Limits(memory_bytes=memory, gpus="device=1"), {}
    )
    assert pinned.stdout_tail.split() == ["1", str(resource_unlimited()), str(memory)]
    hidden = local_runner.run(script_phase(tmp_path / "b", source), Limits(memory_bytes=memory), {})
    assert hidden.stdout_tail.split() == ["-", str(memory), str(resource_unlimited())]


def resource_unlimited() -> int:
    import resource

    return resource.RLIM_INFINITY


class NoGpuEngine:
    name = "docker"

    def gpu_support(self) -> bool:
        return False


def test_docker_without_nvidias_runtime() -> None:
    from selfprog.scheduler import runner_gpus

    with pytest.raises(RunnerError, match="no NVIDIA runtime"):
        runner_gpus(NoGpuEngine(), "1")  # type: ignore[arg-type]
    assert runner_gpus(NoGpuEngine(), "") is False  # the default: CPUs, with a warning


@pytest.mark.parametrize("verb", ["run", "eval"])
@pytest.mark.parametrize(
    ("narrowed", "message"),
    [("0", "asks for 2 GPUs per candidate; this machine has 1"), ("", "this machine has none")],
    ids=["more-than-exist", "none"],
)
def test_asking_for_gpus_this_machine_lacks_is_one_line(
    verb: str, narrowed: str, message: str, tmp_path: Path
) -> None:
    env = {**fake_nvidia_smi(tmp_path / "bin", 1), "CUDA_VISIBLE_DEVICES": narrowed}
    if verb == "run":
        run_dir = tmp_path / "run"
        done = selfprog(
            "run", "--run-dir", str(run_dir), "--runner", "local", "--set", "runner.gpus=2", env=env
        )
        assert not run_dir.exists()
    else:
        done = selfprog("eval", "--runner", "local", "--gpus", "2", env=env)
    assert_one_line_error(done, message)


def test_what_training_says_it_did_is_kept_checked(tmp_path: Path) -> None:
    (tmp_path / "train.json").write_text(
        json.dumps({"device": "cuda", "steps": 10, "bytes": 2048, "seconds": 2.0, "startup": 3.5})
    )
    assert train_stats(tmp_path) == {
        "train_device": "cuda",
        "train_steps": 10,
        "train_bytes_per_s": 1024.0,
        "train_startup_s": 3.5,
    }
    (tmp_path / "train.json").write_text(json.dumps({"device": "<script>", "steps": "many"}))
    assert train_stats(tmp_path) == {}
    (tmp_path / "train.json").write_text("x" * 5000)
    assert train_stats(tmp_path) == {}


def test_the_gpu_seed_runs_on_cpus_at_a_cpu_size(local_runner, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """gpulm's own code (bf16 where there is a GPU, micro-batches where there is none, the
    site-packages corpus, tinylm's evaluator), scaled down: at full size a CPU takes minutes
    per step and per evaluation (bench/gpu.py measures it on a GPU)."""
    import shutil

    from selfprog.data import prepare_data
    from selfprog.scoring import State, score_program
    from selfprog.target import load_target

    gpulm = load_target("gpulm")
    data = prepare_data(gpulm, tmp_path / "data")
    assert data.manifest["train_bytes"] > 20_000_000  # the stdlib and site-packages
    program = tmp_path / "program"
    program.mkdir()
    for name in gpulm.files:
        shutil.copyfile(gpulm.root / name, program / name)
    train = program / "train.py"
    sizes = "n_layer = 8  # with n_head and n_embd: about 25M parameters\nn_head = 8\nn_embd = 512"
    assert sizes in train.read_text()
    text = train.read_text().replace(sizes, "n_layer = 1\nn_head = 2\nn_embd = 32")
    train.write_text(text.replace("block_size = 512", "block_size = 64"))
    result = score_program(
        gpulm, program, local_runner, data, tmp_path / "work", budget_seconds=0, budget_steps=2
    )
    assert result.state is State.OK, (result.reason, result.log_tail)
    assert result.metrics["train_device"] == "cpu" and result.metrics["train_steps"] == 2


def test_the_proposers_model_gets_a_gpu_no_candidate_uses() -> None:
    assert gpus.proposer_device("", ["device=0", "device=1"], ("0", "1", "2")) == "cuda:2"
    assert gpus.proposer_device("", ["device=0"], ("0",)) == "cpu"  # all taken: the CPU
    assert gpus.proposer_device("", [], ()) == "cpu"
    assert gpus.proposer_device("", ["device=2"], ("2", "3")) == "cuda:1"  # torch's numbering
    assert gpus.proposer_device("cuda:0", ["device=0"], ("0",)) == "cuda:0"  # asked for
    with pytest.raises(ConfigError, match=r"proposer\.device must be cpu, cuda or cuda:N"):
        gpus.proposer_device("cuda:3", [], ("0",))


def test_a_local_model_is_placed_where_it_is_told(tiny_model: Path) -> None:
    from selfprog.proposers.transformers import TransformersProposer

    lm = TransformersProposer.load(str(tiny_model), device="cpu")
    assert str(lm.model.device) == "cpu"


def test_a_hostile_train_json_is_ignored_never_waited_on(tmp_path: Path) -> None:
    stats = tmp_path / "train.json"
    for hostile, kept in (
        ({"steps": 10**400, "bytes": 1, "seconds": 1}, {"train_bytes_per_s": 1.0}),  # huge int
        ({"device": "cuda", "bytes": 1e308, "seconds": 1e-300}, {"train_device": "cuda"}),
        ({"steps": True, "bytes": float("nan"), "seconds": 1}, {}),
    ):
        stats.write_text(json.dumps(hostile))
        assert train_stats(tmp_path) == kept
    stats.write_text("[" * 4000)  # nesting deep enough to exhaust json's recursion
    assert train_stats(tmp_path) == {}
    stats.unlink()
    os.mkfifo(stats)  # a pipe nobody writes: reading it would wait for ever
    done = threading.Event()
    threading.Thread(target=lambda: (train_stats(tmp_path), done.set()), daemon=True).start()
    assert done.wait(5), "train_stats waited on a pipe"


def test_the_default_is_settled_once_so_a_resume_cannot_move_candidates_off_their_gpus(
    machine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    from selfprog.config import load_config
    from selfprog.rundir import create_run
    from selfprog.runners.local import LocalRunner
    from selfprog.scheduler import make_scheduler

    machine(2)
    run = create_run(tmp_path / "run", load_config(None, ["runner.kind=local"]))
    scheduler = make_scheduler(run, LocalRunner(registry=tmp_path / "pids"))
    assert run.archive.meta("gpus") == "1" and run.workers == 2
    assert scheduler.gpu_slots == ["device=0", "device=1"]  # type: ignore[attr-defined]
    scheduler.close()

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # resumed where there is no GPU
    gpus.visible.cache_clear()
    with pytest.raises(ConfigError, match="this run's candidates each had 1 GPU"):
        make_scheduler(run, LocalRunner(registry=tmp_path / "pids"))

    older = create_run(tmp_path / "older", load_config(None, ["runner.kind=local"]))
    with older.archive.transaction() as db:  # scored before GPUs were a default
        older.archive.add_candidate(db, generation=0, state="ok")
    machine(2)
    make_scheduler(older, LocalRunner(registry=tmp_path / "pids")).close()
    assert older.archive.meta("gpus") == "0" and older.workers == 1


def test_a_ray_run_takes_a_gpu_count_only(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="Ray is not installed here")
    from selfprog.cluster import RayScheduler
    from selfprog.config import load_config
    from selfprog.rundir import create_run

    for i, request in enumerate(("device=0", "all")):
        settings = load_config(None, ["runner.kind=ray", f'runner.gpus="{request}"'])
        run = create_run(tmp_path / f"run{i}", settings)
        with pytest.raises(ConfigError, match=r"runner\.gpus is a count per candidate"):
            RayScheduler.connect(run)
