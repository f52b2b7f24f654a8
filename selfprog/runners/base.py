"""The runner interface: run one phase of a candidate in isolation and report what happened."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol

from selfprog.errors import ConfigError

if TYPE_CHECKING:
    from selfprog.curves import Watch

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits for each phase of a candidate."""

    memory_bytes: int = 4096 * MiB
    cpus: float = 2.0
    pids: int = 256
    output_bytes: int = 512 * MiB  # the output folder, in total
    output_files: int = 4096  # files and folders in the output folder
    scratch_bytes: int = 256 * MiB  # the writable /tmp
    log_bytes: int = 16 * 1024  # the log tail kept per phase
    gpus: str | None = None  # None: no GPU; "all", a count such as "1", or "device=0,2"

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus))


def cpus_here(cpus: float | None) -> float:
    """Returns a CPU limit this machine can give: 2 (or all it has) when none is asked for.

    Raises:
        ConfigError: more CPUs are asked for than this machine has.
    """
    have = os.cpu_count() or 1
    if cpus is None:
        return float(min(2, have))
    if cpus > have:
        raise ConfigError(f"{cpus:g} CPUs asked for (--cpus, runner.cpus); this machine has {have}")
    return cpus


@dataclass(frozen=True, slots=True)
class Phase:
    """One phase of a candidate: a script of the program folder and what it may see."""

    name: str  # "train" or "evaluate"
    argv: tuple[str, ...]  # a script of the program folder and its arguments
    program_dir: Path  # mounted read-only as the working folder
    out_dir: Path  # where training leaves its weights
    out_writable: bool
    data_files: tuple[Path, ...] = ()  # the only data files visible, read-only
    env: Mapping[str, str] = field(default_factory=dict)  # besides the paths the runner sets
    stdin: bytes | None = None
    timeout: float = 300.0
    hidden: tuple[str, ...] = ()  # host folders to hide from the phase where it could see them
    trusted: bool = False  # the target's own code: run isolated, nothing of its folder importable
    watch: Watch | None = None  # reads stdout as it comes; the phase is killed once it says stop

    def command(self, python: str) -> list[str]:
        """Returns the command line: trusted code runs with `python -I` (no script folder on
        sys.path), so a candidate's file named like a module the scorer imports is not imported."""
        return [python, *(["-I"] if self.trusted else []), *self.argv]


@dataclass(frozen=True, slots=True)
class PhaseOutcome:
    """What happened when a phase ran."""

    exit_code: int | None
    seconds: float
    stdout_tail: str  # the harness reads results from stdout only
    log_tail: str  # stdout and stderr together
    timed_out: bool = False
    oom: bool = False
    output_exceeded: bool = False
    output_lost: str = ""  # why the phase's outputs could not be copied out, if they could not
    stopped: str = ""  # why the harness stopped it early (its watch said so)


class Runner(Protocol):
    """A sandbox backend."""

    name: str

    def run(self, phase: Phase, limits: Limits, labels: Mapping[str, str]) -> PhaseOutcome:
        """Returns the outcome of running the phase; never raises for the candidate's faults."""
        ...

    def stop_all(self, labels: Mapping[str, str]) -> int:
        """Kills every phase carrying these labels, this process's or a dead driver's; returns how many."""
        ...


class Sink(Protocol):
    def write(self, chunk: bytes) -> None: ...


class TailBuffer:
    """Keeps the last max_bytes written to it, thread-safely."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._data = bytearray()
        self._lock = threading.Lock()

    def write(self, chunk: bytes) -> None:
        with self._lock:
            self._data += chunk
            if len(self._data) > 2 * self.max_bytes:
                del self._data[: len(self._data) - self.max_bytes]

    def text(self) -> str:
        with self._lock:
            return bytes(self._data[-self.max_bytes :]).decode("utf-8", errors="replace")


def pump(stream: IO[bytes], *sinks: Sink) -> threading.Thread:
    """Returns a started thread copying stream into the sinks until it closes."""

    def copy() -> None:
        fd = stream.fileno()
        for chunk in iter(lambda: os.read(fd, 65536), b""):
            for sink in sinks:
                sink.write(chunk)

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    return thread


def output_usage(path: Path) -> tuple[int, int]:
    """Returns (bytes of regular files, files and folders) under path, which we own.

    A folder the phase made unreadable is opened up first, so it cannot hide
    what it holds; links are counted, not followed.
    """
    size = entries = 0
    pending = [path]
    while pending:
        folder = pending.pop()
        try:
            mode = folder.lstat().st_mode
            if mode & 0o700 != 0o700:  # readable but not searchable hides sizes too
                folder.chmod(mode | 0o700)
            children = list(os.scandir(folder))
        except FileNotFoundError:
            continue
        for entry in children:
            entries += 1
            if entry.is_dir(follow_symlinks=False):
                pending.append(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                size += entry.stat(follow_symlinks=False).st_size
    return size, entries
