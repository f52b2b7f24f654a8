"""Scoring on a real Ray cluster on this machine: a head and two worker nodes, Docker sandboxes.

The cluster is `ray.cluster_utils.Cluster`: real Ray processes (a GCS, one
raylet per node, their workers), each node with its own resources and, for
selfprog, its own cache folder, so the run's files must travel through Ray.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from selfprog.archive import ARCHIVE_FILE, Archive
from tests.test_loop import check_complete, containers_of, finish, start, states
from tests.test_target import edit, scaffold

try:
    import ray.cluster_utils as ray_cluster_utils
except ImportError:
    if os.environ.get("SELFPROG_REQUIRE_RAY"):  # CI installs Ray: there, these must not skip
        raise
    pytest.skip("Ray is not installed (pip install 'selfprog[ray]')", allow_module_level=True)

FLAGS = [
    "--proposer",
    "mutate",
    "--runner",
    "ray",
    "--generations",
    "2",
    "--population",
    "2",
    "--budget-steps",
    "40",
    "--seed",
    "5",
    "--set",
    "selection.noise_seeds=2",
    "--set",
    "selection.confirm_seeds=2",
    "--set",
    "runner.memory=1g",
]


@pytest.fixture
def cluster(docker_runner: Any) -> Iterator[Any]:
    """A head with no CPU (it schedules, never scores) and two worker nodes of 1 CPU each."""
    if sys.platform != "linux":
        pytest.skip("the cluster test starts Ray processes on Linux only")
    with socket.socket() as probe:  # a free port for the Ray Client server (ray:// addresses)
        probe.bind(("127.0.0.1", 0))
        client_port = probe.getsockname()[1]
    made = ray_cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            "ray_client_server_port": client_port,
        },
    )
    made.client_address = f"ray://127.0.0.1:{client_port}"
    for _ in range(2):
        made.add_node(num_cpus=1)
    made.wait_for_nodes()
    try:
        yield made
    finally:
        made.shutdown()


def nodes_of(run_dir: Path) -> set[str]:
    try:
        archive = Archive(run_dir / ARCHIVE_FILE, readonly=True)
    except Exception:
        return set()  # not created yet
    try:
        rows = archive.db.execute("SELECT DISTINCT node FROM evaluations").fetchall()
        return {r[0] for r in rows}
    finally:
        archive.close()


def running_on(
    driver: Any, run_dir: Path, nodes_done: int = 0, timeout: float = 300
) -> tuple[int, str]:
    """Waits for a child to run on a known node, once nodes_done nodes have scored something."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if driver.poll() is not None:
            raise AssertionError(f"the driver ended early: {driver.communicate()[0]}")
        if (run_dir / ARCHIVE_FILE).exists():
            if len(nodes_of(run_dir)) < nodes_done:
                time.sleep(0.2)
                continue
            archive = Archive(run_dir / ARCHIVE_FILE, readonly=True)
            try:
                for c in archive.running():
                    if c.node and c.generation > 0:
                        return c.id, c.node
            except Exception:
                pass
            finally:
                archive.close()
        time.sleep(0.2)
    raise AssertionError(f"no child ran on a node: {states(run_dir)}")


@pytest.mark.docker
@pytest.mark.slow
def test_a_run_scores_on_both_nodes_and_survives_losing_one(cluster: Any, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    driver = start(
        "run", "--run-dir", str(run_dir), *FLAGS, "--set", f"runner.address={cluster.address}"
    )
    candidate, node = running_on(driver, run_dir, nodes_done=2)  # both nodes have scored
    # then the node running a child dies mid-candidate
    victim = next(n for n in cluster.worker_nodes if n.node_id.startswith(node.split("/")[1]))
    cluster.remove_node(victim, allow_graceful=False)
    code, out = finish(driver)
    assert code == 0, out
    archive = check_complete(run_dir, 2, 2)
    rerun = archive.candidate(candidate)
    assert rerun.state != "running" and rerun.node and rerun.node != node  # scored elsewhere
    assert len(nodes_of(run_dir)) == 2  # both worker nodes scored candidates
    assert containers_of(run_dir) == []  # the dead node's sandbox was removed
    seed = archive.seed()
    assert seed is not None and archive.curves(seed.id)  # training curves came back from nodes


@pytest.mark.docker
@pytest.mark.slow
def test_driver_killed_then_resumed_leaves_nothing_behind(cluster: Any, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    address = ["--set", f"runner.address={cluster.address}"]
    driver = start("run", "--run-dir", str(run_dir), *FLAGS, *address)
    running_on(driver, run_dir)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    code, out = finish(start("resume", str(run_dir)))
    assert code == 0, out
    check_complete(run_dir, 2, 2)
    assert containers_of(run_dir) == []
    status = subprocess.run(
        [sys.executable, "-m", "selfprog", "status", str(run_dir)], capture_output=True, text=True
    )
    assert status.returncode == 0 and "running     -" in status.stdout


@pytest.mark.docker
@pytest.mark.slow
def test_a_cluster_that_cannot_serve_the_run_is_refused_before_any_candidate(
    cluster: Any, tmp_path: Path
) -> None:
    cases = [
        (["--set", "runner.address=127.0.0.1:9"], "cannot reach a Ray cluster at 127.0.0.1:9"),
        (
            ["--set", f"runner.address={cluster.address}", "--set", "runner.cpus=4"],
            "no node of the Ray cluster",
        ),
    ]
    # a driver with another Ray version than the cluster's
    other = "import ray, sys; ray.__version__ = '1.0.0'; from selfprog.cli import main; sys.exit(main())"
    cases.append((["--set", f"runner.address={cluster.address}"], "Version mismatch"))
    # a target whose held-out split a node's sandbox can rebuild (prepare draws it from a fixed seed)
    rebuildable = scaffold(tmp_path)
    edit(rebuildable / "prepare.py", "np.random.default_rng()", "np.random.default_rng(0)")
    cases.append(
        (
            ["--set", f"runner.address={cluster.address}", "--target", str(rebuildable)],
            "held-out split: the sandbox can rebuild it",
        )
    )
    for i, (extra, message) in enumerate(cases):
        run_dir = tmp_path / f"run{i}"
        launch = ["-c", other] if i == 2 else ["-m", "selfprog"]
        done = subprocess.run(
            [sys.executable, *launch, "run", "--run-dir", str(run_dir), *FLAGS, *extra],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("selfprog: error: ") and message in last, done.stderr
        assert not run_dir.exists()  # refused before any candidate: nothing is left behind


@pytest.mark.docker
@pytest.mark.slow
def test_a_run_through_ray_client_brings_kept_outputs_back(cluster: Any, tmp_path: Path) -> None:
    import shutil

    import selfprog.targets.tinylm as tinylm

    target = tmp_path / "keeper"  # tinylm, keeping each candidate's model.json
    shutil.copytree(Path(tinylm.__file__).parent, target, ignore=shutil.ignore_patterns("__*"))
    with (target / "target.toml").open("a") as toml:
        toml.write('\n[model]\nkeep = ["model.json"]\n')
    run_dir = tmp_path / "run"
    small = ["--generations", "1", "--population", "1", "--set", "selection.noise_seeds=1"]
    small += ["--target", str(target)]
    code, out = finish(
        start(
            "run",
            "--run-dir",
            str(run_dir),
            *FLAGS,
            *small,
            "--set",
            f"runner.address={cluster.client_address}",
        )
    )
    assert code == 0, out
    archive = check_complete(run_dir, 1, 1)
    assert nodes_of(run_dir) and "" not in nodes_of(run_dir)
    for c in archive.scored():  # written by the node, returned through Ray, kept by the driver
        assert '"block_size"' in (run_dir / "models" / str(c.id) / "model.json").read_text()


def test_capacity_counts_whole_candidates_on_alive_nodes() -> None:
    from selfprog.cluster import capacity

    nodes = [
        {"Alive": True, "Resources": {"CPU": 8.0, "memory": 16.0 * 2**30}},
        {"Alive": True, "Resources": {"CPU": 2.0, "memory": 64.0 * 2**30, "GPU": 1.0}},
        {"Alive": False, "Resources": {"CPU": 64.0, "memory": 256.0 * 2**30}},
    ]
    request = {"CPU": 2.0, "memory": 6.0 * 2**30}
    assert capacity(nodes, request) == 2 + 1  # memory bounds the first node, CPUs the second
    assert capacity(nodes, {**request, "GPU": 1.0}) == 1


def test_a_ray_client_that_lost_its_server_is_an_outage_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Ray Client raises a builtin ConnectionError once its server is gone, outside
    RayError: submitting or fetching a job then stops the run cleanly (resume continues)."""
    from selfprog.cluster import RayScheduler
    from selfprog.errors import Outage
    from selfprog.scheduler import Job

    class Lost:
        def remote(self, *args: Any) -> Any:
            raise ConnectionError("Ray client has already been disconnected due to an error.")

    import ray

    scheduler = RayScheduler.__new__(RayScheduler)
    scheduler.ray, scheduler.address, scheduler._task = ray, "ray://head:10001", Lost()
    scheduler.bundle, scheduler.box, scheduler.placements = None, [], None  # type: ignore[assignment]
    scheduler._running, scheduler._cancelled = {}, set()
    job = Job(2, 0, {"train.py": ""}, 0)
    with pytest.raises(Outage, match=r"lost the Ray cluster at ray://head:10001: Ray client"):
        scheduler.submit(job)
    monkeypatch.setattr(ray, "get", lambda ref: Lost().remote())
    with pytest.raises(Outage, match=r"lost the Ray cluster"):
        scheduler._outcome("ref", job)
