"""Run folders: an open run, creating one, opening one to drive or to read, and the one-driver lock."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from selfprog import gpus
from selfprog.archive import ARCHIVE_FILE, Archive, ArchiveError
from selfprog.config import Config, freeze, parse_size, thaw
from selfprog.data import Dataset, load_dataset, prepare_data
from selfprog.errors import ConfigError, SelfprogError
from selfprog.runners.base import Limits, cpus_here
from selfprog.target import TARGET_FILE, Target, load_target

CONFIG_FILE = "config.json"
LOCK_FILE = "driver.lock"
# the run's own copy of the target, so later edits to it cannot change the run
TARGET_DIR = "target"
DATA_DIR = "data"
MODELS = "models"  # models/<candidate>/: what the target keeps of each scored candidate


@dataclasses.dataclass
class Run:
    """An open run: its folder, frozen config, target, data and archive."""

    root: Path
    run_id: str
    config: Config
    target: Target
    data: Dataset
    archive: Archive

    @property
    def labels(self) -> dict[str, str]:
        return {"selfprog.run": self.run_id}

    @property
    def workers(self) -> int:
        """Returns the candidates scored at once on this machine (0 in the config: one per GPU
        group where candidates get GPUs, else one)."""
        if self.config.run.workers or self.config.runner.kind == "ray":
            return self.config.run.workers or 1
        return gpus.default_workers(self.gpu_request(), gpus.visible())

    def gpu_request(self) -> str:
        """Returns each candidate's GPUs: the config's, or what the run settled on at its start.

        The default ("" : one each where the machine has GPUs) is settled once,
        when the run first starts (settle_gpus), so that a resume elsewhere
        cannot move later candidates between GPUs and CPUs unseen.
        """
        asked = self.config.runner.gpus
        if asked or self.config.runner.kind == "ray":
            return asked
        return self.archive.meta("gpus") or ""

    def settle_gpus(self, runner_can: bool) -> None:
        """Records the default's GPUs for this run, once: one each if the machine and runner
        can give them; none for a run that scored candidates before GPUs were a default."""
        if self.config.runner.gpus or self.archive.meta("gpus") is not None:
            return
        scored_before = self.archive.count() > 0  # without GPUs: later ones stay comparable
        self.archive.set_meta("gpus", "1" if runner_can and not scored_before else "0")

    def limits(self) -> Limits:
        """Returns each candidate's limits; on this machine its GPUs are its slot's (gpu_slots)."""
        section = self.config.runner
        cpus = section.cpus or max(1.0, (os.cpu_count() or 1) / self.workers)
        if section.kind != "ray":  # a cluster's nodes have their own
            cpus = cpus_here(cpus)
        wanted = section.gpus if section.kind == "ray" and section.gpus != "0" else ""
        return Limits(memory_bytes=parse_size(section.memory), cpus=cpus, gpus=wanted or None)

    def gpu_slots(self) -> list[str]:
        """Returns the GPUs of each slot on this machine ("device=0", ...), [] for none.

        Raises:
            ConfigError: GPUs this machine does not have, or sharing not asked for.
        """
        section = self.config.runner
        request = self.gpu_request()
        try:
            return gpus.slot_devices(request, self.workers, section.share_gpus, gpus.visible())
        except ConfigError as exc:
            if section.gpus:
                raise
            raise ConfigError(  # settled at the run's start, not asked for by the user
                f"this run's candidates each had {request} GPU(s) when it started: {exc}; "
                "resume it where they can have them"
            ) from None

    def budget(self) -> tuple[float, int]:
        """Returns the training budget (seconds, steps): the config's if it sets one, else the target's."""
        section = self.config.budget
        if section.seconds or section.steps:
            return section.seconds, section.steps
        return self.target.budget.seconds, self.target.budget.steps

    def budget_text(self) -> str:
        seconds, steps = self.budget()
        parts = [f"{seconds:g} s of training"] * bool(seconds) + [
            f"{steps} optimizer steps"
        ] * bool(steps)
        return " or ".join(parts) + (", whichever ends first" if len(parts) > 1 else "")


class RunLocked(SelfprogError):
    """Another driver holds the run."""


def default_run_dir(root: Path, target: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return root / f"{stamp}-{Path(target).name}"


def check_run_target(config: Config) -> Target:
    """Returns the config's target, refused if it is unsafe or cannot serve the config.

    Raises:
        SelfprogError: the target is unusable or unsafe, or has no descriptors for map-elites.
    """
    target = load_target(config.run.target)
    if config.selection.policy == "map-elites" and not target.descriptors:
        raise SelfprogError(
            f"selection.policy = map-elites places candidates by the target's descriptors, and "
            f"{target.name} declares none: add `descriptors = [...]` (keys of its evaluator's "
            "result) under [metric] in its target.toml, or choose another policy"
        )
    return target


def create_run(run_dir: Path, config: Config) -> Run:
    """Returns a new run in an empty folder: the target copied in, data prepared, config frozen."""
    if run_dir.exists() and any(run_dir.iterdir()):
        if (run_dir / ARCHIVE_FILE).exists():
            raise SelfprogError(
                f"{run_dir} already holds a run; continue it with `selfprog resume {run_dir}`"
            )
        raise SelfprogError(f"{run_dir}: folder exists and is not empty")
    source = check_run_target(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        for name in (*source.files, TARGET_FILE):
            (run_dir / TARGET_DIR / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source.root / name, run_dir / TARGET_DIR / name)
        target = load_target(run_dir / TARGET_DIR)
        data = prepare_data(target, run_dir / DATA_DIR)
        freeze(config, run_dir / CONFIG_FILE)
        run_id = f"{run_dir.name}-{uuid.uuid4().hex[:8]}"
        meta = {"run_id": run_id, "target": target.name, "data_hash": data.data_hash}
        Archive.create(run_dir / ARCHIVE_FILE, meta).close()
        return open_run(run_dir)
    except BaseException:
        discard_new_run(run_dir)
        raise


def discard_new_run(run_dir: Path) -> None:
    """Removes a run folder that this command made and that holds no candidate yet."""
    archive = run_dir / ARCHIVE_FILE
    if archive.exists():
        try:
            reader = Archive(archive, readonly=True)
            holds = reader.count() > 0
            reader.close()
        except ArchiveError:
            holds = True  # unreadable: not ours to judge, keep it
        if holds:
            return
    shutil.rmtree(run_dir, ignore_errors=True)


def open_run(run_dir: Path, readonly: bool = False) -> Run:
    """Returns an existing run, reading the config frozen into it (never the original file).

    Raises:
        ArchiveError: the folder is not a run, or its archive is foreign or newer.
    """
    if not run_dir.is_dir():
        raise ArchiveError(f"{run_dir}: no such run folder")
    archive = Archive(run_dir / ARCHIVE_FILE, readonly=readonly)
    config = thaw(run_dir / CONFIG_FILE)
    target = load_target(run_dir / TARGET_DIR)
    if config.budget.timeout:
        target = dataclasses.replace(
            target, budget=dataclasses.replace(target.budget, timeout=config.budget.timeout)
        )
    roots = [
        p
        for p in (run_dir / DATA_DIR / target.name).glob("*")
        if p.is_dir() and not p.name.startswith(".")
    ]
    if len(roots) != 1:
        raise ArchiveError(f"{run_dir}: its prepared data is missing")
    data = load_dataset(target, roots[0])
    if data.data_hash != archive.meta("data_hash"):
        raise ArchiveError(
            f"{run_dir}: its data no longer matches the hash recorded in the archive"
        )
    return Run(
        root=run_dir,
        run_id=archive.meta("run_id") or run_dir.name,
        config=config,
        target=target,
        data=data,
        archive=archive,
    )


def pin_cpus(
    run: Run, steered: Config, changes: list[tuple[str, Any, Any]]
) -> tuple[Config, list[tuple[str, Any, Any]]]:
    """Returns a steered config that keeps each candidate's CPUs when only the workers changed.

    With `runner.cpus` unset, a candidate gets this machine's CPUs divided by
    the workers: more workers would train each later candidate on fewer, and
    hold it to time limits measured on more. The CPUs it had are written in.
    """
    kind = steered.runner.kind
    if steered.run.workers == run.config.run.workers or steered.runner.cpus or kind == "ray":
        return steered, changes
    cpus = run.limits().cpus
    pinned = dataclasses.replace(steered, runner=dataclasses.replace(steered.runner, cpus=cpus))
    return pinned, [*changes, ("runner.cpus", run.config.runner.cpus, cpus)]


def record_changes(run: Run, changes: list[tuple[str, Any, Any]]) -> None:
    """Freezes a steered run's config (atomically) and records the changes, with their time."""
    staged = run.root / f".{CONFIG_FILE}.new"
    freeze(run.config, staged)
    os.replace(staged, run.root / CONFIG_FILE)
    run.archive.record_changes([(k, json.dumps(old), json.dumps(new)) for k, old, new in changes])


def _holder(handle: IO[str]) -> dict[str, Any]:
    """Returns what the driver holding the lock wrote about itself (empty if unreadable)."""
    handle.seek(0)
    try:
        info = json.loads(handle.read() or "{}")
    except ValueError:
        return {}
    return dict(info) if isinstance(info, dict) else {}


def lock_holder(run_dir: Path) -> dict[str, Any] | None:
    """Returns who holds the driver lock, or None when nobody does (reading only)."""
    path = run_dir / LOCK_FILE
    if not path.exists():
        return None
    with path.open("r") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(handle)
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


@contextmanager
def driver_lock(run_dir: Path) -> Iterator[None]:
    """Holds the run's driver lock for the block; a second driver is refused.

    Raises:
        RunLocked: another process drives the run.
    """
    handle = (run_dir / LOCK_FILE).open("a+")
    # a reader (`selfprog status`) holds the lock shared for an instant: that is not a driver
    take = Retrying(
        retry=retry_if_exception_type(BlockingIOError),
        stop=stop_after_delay(1.0),
        wait=wait_fixed(0.05),
        reraise=True,
    )
    try:
        try:
            take(fcntl.flock, handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _holder(handle)
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("since", 0))))
            raise RunLocked(
                f"{run_dir} is being driven by pid {info.get('pid', '?')} on {info.get('host', '?')} "
                f"since {since}; only one driver at a time (`selfprog status {run_dir}` reads it meanwhile)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        )
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the lock
