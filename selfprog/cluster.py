"""Scoring on a Ray cluster: each evaluation is a Ray task that runs selfprog's sandbox on its node.

Nothing is shared but Ray itself. The run's target and prepared data go into
the object store once; a node fetches them the first time one of its tasks
needs them and caches them by hash, so no shared file system is needed. The
sandbox image is built on a node the first time it is needed there. Kept
outputs come back with the task's result, and the driver stays the only
writer of the archive.

A task whose node dies is retried elsewhere by Ray (system failures only: a
candidate's own failure is a result, never an exception); only the outcome
that comes back is recorded, so a retried candidate is recorded once. A
retry first removes the sandbox an earlier attempt may have left running.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from selfprog.data import Dataset, load_dataset
from selfprog.errors import ConfigError, Outage, SelfprogError, TargetError
from selfprog.rundir import Run
from selfprog.runners.base import Limits, Runner
from selfprog.scheduler import Event, Job, Outcome, Placed, Scoring, job_labels, score_job
from selfprog.scoring import Result
from selfprog.states import State
from selfprog.target import Target, load_target
from selfprog.targetcheck import require_private_heldout

log = logging.getLogger(__name__)

RETRIES = 3  # how often Ray reruns a task whose node or worker died
CLEANUP_SECONDS = 120.0  # at start, a node may build the sandbox image first
CANCEL_SECONDS = 10.0  # a stop at once waits no longer


@dataclass(frozen=True, slots=True)
class Bundle:
    """What a node needs to score a run's jobs, besides the files (which travel by reference)."""

    key: str  # the hash of the files: a node caches them under it
    target_name: str
    limits: Limits
    budget_seconds: float
    budget_steps: int
    labels: Mapping[str, str]
    sandbox: str  # "docker" or "local"
    image: str


def _files(folder: Path) -> dict[str, bytes]:
    """Returns every file under folder by relative path (links followed: data may link a model)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            out[str(path.relative_to(folder))] = path.read_bytes()
    return out


def _key(files: Mapping[str, Mapping[str, bytes]]) -> str:
    """Returns the hash of a run's files, by part, name and content."""
    digest = hashlib.sha256()
    for part, contents in sorted(files.items()):
        for name, data in sorted(contents.items()):
            digest.update(f"{part}/{name}\0".encode() + hashlib.sha256(data).digest())
    return digest.hexdigest()[:16]


def _pack(run: Run) -> tuple[str, dict[str, dict[str, bytes]]]:
    files = {"target": _files(run.target.root), "data": _files(run.data.root)}
    return _key(files), files


# -- on the node ------------------------------------------------------------------


def node_cache(node_id: str) -> Path:
    """Returns this node's cache folder: this user's alone, and per node (nodes may share a disk)."""
    mine = Path(tempfile.gettempdir()) / f"selfprog-{os.getuid()}"
    mine.mkdir(mode=0o700, exist_ok=True)
    if mine.stat().st_uid != os.getuid() or mine.stat().st_mode & 0o077:
        raise SelfprogError(f"{mine} is not this user's private folder; remove it")
    return mine / f"node-{node_id[:12]}"


@contextlib.contextmanager
def _node_lock(cache: Path) -> Iterator[None]:
    """Serialises the tasks of one node while they unpack files or build the image."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / "lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _unpack(cache: Path, bundle: Bundle, box: list[Any]) -> Path:
    """Returns the node's copy of the run's files, fetching them the first time."""
    import ray

    root = cache / "runs" / bundle.key
    ready = (root / ".ready").exists()
    if ready and bundle.sandbox == "local":  # its candidates run as this user: check each time
        on_disk = {part: _files(root / part) for part in ("target", "data")}
        ready = _key(on_disk) == bundle.key
    if not ready:
        files = ray.get(box[0])  # only now: a node that has them never fetches them again
        if _key(files) != bundle.key:
            raise SelfprogError("the run's files arrived damaged on this node")
        shutil.rmtree(root, ignore_errors=True)
        for part, contents in files.items():
            for name, data in contents.items():
                path = root / part / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        (root / ".ready").touch()
    return root


_RUNNERS: dict[tuple[str, str], Runner] = {}
_CHECKED: set[str] = set()  # the runs whose held-out rebuild check passed in this worker


def _runner(cache: Path, sandbox: str, image: str) -> Runner:
    """Returns this worker's runner; the first on a node builds the sandbox image there."""
    from selfprog.runners import make_runner

    key = (sandbox, image)
    if key not in _RUNNERS:
        _RUNNERS[key] = make_runner(sandbox, image or None, cache / "local")
    return _RUNNERS[key]


def _node_name() -> tuple[str, str]:
    import ray

    context = ray.get_runtime_context()
    node_id = context.get_node_id()
    return node_id, f"{ray.util.get_node_ip_address()}/{node_id[:8]}"


def _check_heldout(bundle: Bundle, target: Target, data: Dataset, runner: Runner) -> None:
    """Refuses a target whose held-out split this node's sandbox can rebuild, once per worker."""
    if bundle.key not in _CHECKED:
        require_private_heldout(target, data, runner, bundle.limits)
        _CHECKED.add(bundle.key)


def score_on_node(bundle: Bundle, box: list[Any], job: Job, placements: Any) -> Outcome:
    """Scores one job on the node Ray chose (the body of the Ray task)."""
    node_id, node = _node_name()
    with contextlib.suppress(Exception):  # where it runs is news, not a condition of running
        placements.put_nowait((job.key, node))
    cache = node_cache(node_id)
    with _node_lock(cache):
        root = _unpack(cache, bundle, box)
        runner = _runner(cache, bundle.sandbox, bundle.image)
    target = load_target(root / "target")
    data = load_dataset(target, root / "data")
    limits = bundle.limits
    if limits.gpus:  # the GPUs Ray gave this task, not the first ones of the node
        import ray

        ids = ray.get_gpu_ids()
        if ids:
            limits = replace(limits, gpus="device=" + ",".join(map(str, ids)))
    _check_heldout(bundle, target, data, runner)  # a node that joined later was not probed
    scoring = Scoring(
        target, data, limits, bundle.budget_seconds, bundle.budget_steps, bundle.labels
    )
    runner.stop_all(job_labels(scoring, job))  # what an attempt on a node that died left here
    (cache / "work").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=cache / "work", prefix=f"{job.candidate_id}-{job.index}-"))
    return score_job(scoring, job, runner, work, node)


def clean_node(bundle: Bundle, labels: Mapping[str, str]) -> int:
    """Removes this node's sandboxes carrying the labels (the body of a cleanup task)."""
    node_id, _ = _node_name()
    cache = node_cache(node_id)
    with _node_lock(cache):
        runner = _runner(cache, bundle.sandbox, bundle.image)
    return runner.stop_all(labels)


def ready_node(bundle: Bundle, box: list[Any], labels: Mapping[str, str]) -> int:
    """Readies this node for the run and returns the sandboxes of earlier attempts it removed
    (the body of the probe task): the sandbox image, the run's files, and the held-out rebuild
    check, which refuses a target whose held-out split this node's sandbox can rebuild."""
    node_id, _ = _node_name()
    cache = node_cache(node_id)
    with _node_lock(cache):
        root = _unpack(cache, bundle, box)
        runner = _runner(cache, bundle.sandbox, bundle.image)
    removed = runner.stop_all(labels)
    target = load_target(root / "target")
    _check_heldout(bundle, target, load_dataset(target, root / "data"), runner)
    return removed


# -- on the driver ----------------------------------------------------------------


def _request(limits: Limits) -> dict[str, float]:
    """Returns the Ray resources one candidate asks for."""
    request = {"CPU": limits.cpus, "memory": float(limits.memory_bytes)}
    if limits.gpus:
        request["GPU"] = float(limits.gpus)
    return request


def capacity(nodes: list[dict[str, Any]], request: Mapping[str, float]) -> int:
    """Returns how many candidates the alive nodes can run at once under this request."""
    total = 0
    for node in nodes:
        if not node.get("Alive"):
            continue
        offered = node.get("Resources", {})
        total += int(min(offered.get(k, 0.0) // v for k, v in request.items() if v > 0))
    return total


class RayScheduler:
    """Scores jobs as Ray tasks on a cluster's nodes, `slots` at once."""

    def __init__(self, bundle: Bundle, box: list[Any], slots: int, address: str):
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.ray = ray
        self.bundle = bundle
        self.box = box
        self.slots = slots
        self.address = address
        # where tasks report their node; on the head, which the cluster cannot lose and live
        head = next(
            (
                n["NodeID"]
                for n in ray.nodes()
                if "node:__internal_head__" in n.get("Resources", {})
            ),
            None,
        )
        pin = NodeAffinitySchedulingStrategy(head, soft=True) if head else None
        self.placements = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": pin})
        limits = bundle.limits
        self._task = ray.remote(score_on_node).options(
            num_cpus=limits.cpus,
            num_gpus=float(limits.gpus or 0),
            memory=limits.memory_bytes,
            max_retries=RETRIES,
            retry_exceptions=False,
        )
        self._clean = ray.remote(clean_node)
        self._ready = ray.remote(ready_node)
        self._running: dict[Any, Job] = {}
        self._cancelled: set[Any] = set()

    @classmethod
    def connect(cls, run: Run) -> RayScheduler:
        """Returns a scheduler on the run's cluster, checked to fit a candidate.

        Raises:
            SelfprogError: Ray is missing, the cluster is unreachable or of another
                Ray version, or no node fits one candidate's request.
        """
        try:
            import ray
        except ImportError:
            raise SelfprogError(
                "--runner ray needs Ray on this machine and every node: pip install 'selfprog[ray]'"
            ) from None
        section = run.config.runner
        if section.gpus.strip() and not section.gpus.strip().isdigit():
            raise ConfigError(
                f"with --runner ray, runner.gpus is a count per candidate, not {section.gpus!r}"
            )
        limits = replace(run.limits(), cpus=section.cpus or 1.0)
        address = section.address
        _check_reachable(address)  # ray.init waits minutes on an address where nothing listens
        # a Ray Client server starts a process per driver and may time out on a busy head: retried
        join = Retrying(
            retry=retry_if_exception_type(ConnectionError),
            stop=stop_after_attempt(3 if address.startswith("ray://") else 1),
            wait=wait_exponential(multiplier=2),
            reraise=True,
        )
        try:
            join(
                ray.init,
                address=address,
                namespace="selfprog",
                log_to_driver=False,
                include_dashboard=False,
                configure_logging=False,
            )
        except ConnectionError as exc:
            raise SelfprogError(
                f"cannot reach a Ray cluster at {address}: {_first_line(exc)}; start one "
                "(`ray start --head`) or set runner.address"
            ) from None
        except (RuntimeError, ValueError, ray.exceptions.RayError) as exc:  # a version
            # mismatch, a bad address, a cluster that wants a token
            said = " ".join(str(exc).split())[:300]  # a version mismatch spans lines
            raise SelfprogError(f"cannot join the Ray cluster at {address}: {said}") from None
        request = _request(limits)
        room = capacity(ray.nodes(), request)
        if room == 0:
            offered = "; ".join(
                f"{n['NodeManagerAddress']}: {_resources(n.get('Resources', {}))}"
                for n in ray.nodes()
                if n.get("Alive")
            )
            ray.shutdown()
            raise SelfprogError(
                f"no node of the Ray cluster at {address} fits one candidate "
                f"({_resources(request)}); nodes offer {offered or 'nothing'}"
            )
        slots = run.config.run.workers or room
        log.info(
            "ray cluster at %s: %d node(s), room for %d candidate(s) at once; %d slot(s)",
            address,
            sum(1 for n in ray.nodes() if n.get("Alive")),
            room,
            slots,
        )
        key, files = _pack(run)
        bundle = Bundle(
            key=key,
            target_name=run.target.name,
            limits=limits,
            budget_seconds=run.budget()[0],
            budget_steps=run.budget()[1],
            labels=dict(run.labels),
            sandbox=section.sandbox,
            image=section.image,
        )
        scheduler = cls(bundle, [ray.put(files)], slots, address)
        try:
            scheduler.probe()
        except SelfprogError:
            scheduler.close()
            raise
        return scheduler

    def submit(self, job: Job) -> None:
        try:
            ref = self._task.remote(self.bundle, self.box, job, self.placements)
        except Exception as exc:  # a Ray Client that lost its server, an object store full
            raise Outage(f"lost the Ray cluster at {self.address}: {_first_line(exc)}") from None
        self._running[ref] = job

    def wait(self, timeout: float) -> list[Event]:
        ray = self.ray
        events: list[Event] = self._placed()
        if not self._running:
            return events
        try:
            ready, _ = ray.wait(list(self._running), num_returns=1, timeout=timeout)
        except Exception as exc:  # the cluster itself went away
            raise Outage(f"lost the Ray cluster at {self.address}: {_first_line(exc)}") from None
        for ref in ready:
            job = self._running.pop(ref)
            events.append(self._outcome(ref, job))
        return events

    def _placed(self) -> list[Event]:
        """Returns the placements tasks reported (news: a failure to read them is only logged)."""
        keys = {job.key: job for job in self._running.values()}
        try:
            reported = self.placements.get_nowait_batch(self.placements.qsize())
        except Exception as exc:
            log.warning("cannot read where candidates run: %s", _first_line(exc))
            return []
        return [Placed(keys[tuple(key)], node) for key, node in reported if tuple(key) in keys]

    def _outcome(self, ref: Any, job: Job) -> Outcome:
        ray = self.ray
        try:
            outcome: Outcome = ray.get(ref)
        except ray.exceptions.TaskCancelledError:
            return Outcome(job, Result(State.ERROR, reason="cancelled"), cancelled=True)
        except ray.exceptions.RayTaskError as exc:
            # score_job never raises for a candidate: the node failed (no Docker, a full disk)
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            raise Outage(
                f"a node could not score candidate {job.candidate_id}: "
                f"{type(cause).__name__}: {_first_line(cause)}"
            ) from None
        except ray.exceptions.RayError as exc:  # its worker or node died, RETRIES times over
            raise Outage(
                f"the Ray cluster lost candidate {job.candidate_id} {RETRIES + 1} times: "
                f"{_first_line(exc)}"
            ) from None
        except ConnectionError as exc:  # a Ray Client that lost its server
            raise Outage(f"lost the Ray cluster at {self.address}: {_first_line(exc)}") from None
        if ref in self._cancelled and outcome.result.state is not State.OK:
            return replace(outcome, cancelled=True)  # one that ended `ok` as it was killed stands
        return outcome

    def cancel(self) -> None:
        refs = list(self._running)
        with contextlib.suppress(Exception):  # what has already ended stands
            # fetch_local=False: a result still on its node has ended all the same
            _, refs = self.ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        for ref in refs:
            self._cancelled.add(ref)
            with contextlib.suppress(Exception):
                self.ray.cancel(ref)  # inside the task: the sandbox is removed on the way out
        self.stop_all(self.bundle.labels, timeout=CANCEL_SECONDS)

    def stop_all(self, labels: Mapping[str, str], timeout: float = CLEANUP_SECONDS) -> int:
        refs = self._on_every_node(self._clean, self.bundle, dict(labels))
        if not refs:
            return 0
        ray = self.ray
        ready, late = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        removed = 0
        for ref in ready:
            try:
                removed += int(ray.get(ref))
            except Exception as exc:  # a node that cannot clean up now is cleaned on resume
                log.warning("could not clean up a node: %s", _first_line(exc))
        if late:
            log.warning(
                "%d node(s) did not clean up within %.0f s; resume cleans them", len(late), timeout
            )
        return removed

    def probe(self) -> None:
        """Checks that every node can run the sandbox (building its image there if needed) and
        cannot rebuild the held-out split there.

        Raises:
            SelfprogError: a node cannot (no Docker engine, no image), in one line.
            TargetError: a node's sandbox can rebuild the held-out split.
        """
        refs = self._on_every_node(
            self._ready, self.bundle, self.box, dict(self.bundle.labels), scoring_only=True
        )
        if not refs:
            raise SelfprogError(
                f"the Ray cluster at {self.address} listed no node to ready for the run"
            )
        ready, late = self.ray.wait(refs, num_returns=len(refs), timeout=CLEANUP_SECONDS)
        for ref in ready:
            try:
                self.ray.get(ref)
            except self.ray.exceptions.RayError as exc:
                cause = getattr(exc, "cause", None) or exc
                if isinstance(cause, TargetError):
                    raise TargetError(str(cause)) from None
                raise SelfprogError(
                    f"a node of the Ray cluster at {self.address} cannot run the "
                    f"{self.bundle.sandbox} sandbox: {_first_line(cause)}"
                ) from None
        if late:
            raise SelfprogError(
                f"{len(late)} node(s) of the Ray cluster at {self.address} did not answer "
                f"within {CLEANUP_SECONDS:.0f} s"
            )

    def _on_every_node(self, task: Any, *args: Any, scoring_only: bool = False) -> list[Any]:
        """Returns the task started on each alive node (none if the cluster cannot say).

        scoring_only: only on the nodes that fit a candidate (a head that scores
        nothing need not run the sandbox).
        """
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        request = _request(self.bundle.limits)
        try:
            nodes = [
                n["NodeID"]
                for n in ray.nodes()
                if n.get("Alive") and (not scoring_only or capacity([n], request) > 0)
            ]
        except Exception as exc:  # no cluster to ask: its nodes are cleaned on resume
            log.warning("could not list the cluster's nodes: %s", _first_line(exc))
            return []
        return [
            task.options(
                num_cpus=0,
                max_retries=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            ).remote(*args)
            for node in nodes
        ]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ray.shutdown()


def _check_reachable(address: str) -> None:
    """Raises a one-line error unless something listens at the cluster's address."""
    target = address
    if address == "auto":
        target = os.environ.get("RAY_ADDRESS", "")
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if not target and current.is_file():
            target = current.read_text().strip()
        if not target:
            return  # Ray says itself, at once, that no cluster runs here
    host, _, port = target.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        raise SelfprogError(
            f"cannot reach a Ray cluster at {address}"
            + (f" ({target})" if target != address else "")
            + f": {exc}; start one (`ray start --head`) or set runner.address"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _resources(resources: Mapping[str, float]) -> str:
    shown = []
    for name in ("CPU", "GPU", "memory"):
        if name in resources:
            value = resources[name]
            shown.append(
                f"{value / 2**30:.1f} GiB memory" if name == "memory" else f"{value:g} {name}"
            )
    return ", ".join(shown) or "no CPU"
