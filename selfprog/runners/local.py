"""The local runner: plain subprocesses with resource limits and a process-group kill.

It isolates far less than the docker runner: the candidate runs as your user,
can read your files and reach the network. With a GPU its memory limit is on
private data only (CUDA reserves more address space than it uses), which
shared mappings escape, and its GPUs are pinned by CUDA_VISIBLE_DEVICES alone. Its output limits are checked after
each phase (only the per-file size limit holds during it), and an evaluator's
isolation between its own processes is weaker. Use it where Docker is not
available.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from selfprog.runners.base import Limits, Phase, PhaseOutcome, TailBuffer, output_usage, pump

log = logging.getLogger(__name__)

WARNING = (
    "the local runner isolates far less than docker: candidate code runs as your user, "
    "with your files and network in reach, and output limits are checked only after each phase"
)
WATCH_POLL = 0.1  # seconds between looks at a watched phase
_OOM_SIGNS = ("MemoryError", "std::bad_alloc", "can't allocate memory", "Cannot allocate memory")


def harness_env(limits: Limits, extra: Mapping[str, str]) -> dict[str, str]:
    """Returns a phase's whole environment: nothing of the host's, only what the harness sets."""
    threads = str(limits.threads)
    env = {
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONHASHSEED": "0",
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if limits.gpus is None:
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif limits.gpus.startswith("device="):  # the GPUs a scheduler assigned, and no others
        env["CUDA_VISIBLE_DEVICES"] = limits.gpus.removeprefix("device=")
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # numbered as nvidia-smi numbers them
    env.update(extra)
    return env


def _start_time(pid: int) -> str | None:
    """Returns a process's start time in clock ticks, which tells it from a later one with its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


class LocalRunner:
    """Runs each phase as a host subprocess in its own process group.

    Each live process group is registered as a file in `registry`, with its
    labels, so that a later driver can kill what a killed one left running.
    """

    name = "local"

    def __init__(self, python: str = sys.executable, registry: Path | None = None):
        self.python = python
        self.registry = registry or Path(tempfile.mkdtemp(prefix="selfprog-local-"))
        self.registry.mkdir(parents=True, exist_ok=True)

    def stop_all(self, labels: Mapping[str, str]) -> int:
        stopped = 0
        for entry in self.registry.glob("*.json"):
            try:
                record = json.loads(entry.read_text())
            except (OSError, ValueError):
                continue
            if any(record["labels"].get(k) != v for k, v in labels.items()):
                continue
            pgid = int(entry.stem)
            if _start_time(pgid) == record["start"]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                    stopped += 1
            entry.unlink(missing_ok=True)
        return stopped

    def run(self, phase: Phase, limits: Limits, labels: Mapping[str, str]) -> PhaseOutcome:
        scratch = phase.out_dir.parent / f"{phase.name}-scratch"
        data = phase.out_dir.parent / f"{phase.name}-data"
        for folder in (scratch, data):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        for source in phase.data_files:  # copies: the program may not change the prepared data
            if source.is_dir():
                shutil.copytree(source, data / source.name)
            else:
                shutil.copyfile(source, data / source.name)
        env = harness_env(
            limits,
            {
                **phase.env,
                "HOME": str(scratch),
                "TMPDIR": str(scratch),
                "PATH": "/usr/bin:/bin",
                "SELFPROG_DATA": str(data),
                "SELFPROG_OUT": str(phase.out_dir),
                **_driver_path(limits),
            },
        )

        # CUDA reserves far more address space than it uses: with a GPU, the limit is on data
        # (private writable memory, what torch's host tensors take), else on address space
        memory = (
            resource.RLIMIT_AS if env.get("CUDA_VISIBLE_DEVICES") == "" else resource.RLIMIT_DATA
        )

        def limit_resources() -> None:
            resource.setrlimit(memory, (limits.memory_bytes, limits.memory_bytes))
            resource.setrlimit(resource.RLIMIT_FSIZE, (limits.output_bytes, limits.output_bytes))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

        stdout, log_tail = TailBuffer(limits.log_bytes), TailBuffer(limits.log_bytes)
        start = time.perf_counter()
        proc = subprocess.Popen(
            phase.command(self.python),
            cwd=phase.program_dir,
            env=env,
            stdin=subprocess.PIPE if phase.stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, killed as a whole
            preexec_fn=limit_resources,
        )
        entry = self.registry / f"{proc.pid}.json"
        entry.write_text(json.dumps({"labels": dict(labels), "start": _start_time(proc.pid)}))
        try:
            assert proc.stdout is not None and proc.stderr is not None
            watched = (phase.watch,) if phase.watch is not None else ()
            pumps = [pump(proc.stdout, stdout, log_tail, *watched), pump(proc.stderr, log_tail)]
            if phase.stdin is not None:
                threading.Thread(target=_feed, args=(proc, phase.stdin), daemon=True).start()
            timed_out, stopped = _wait(proc, phase)
        finally:
            _kill_group(proc)
            entry.unlink(missing_ok=True)
        for thread in pumps:
            thread.join(timeout=5)
        seconds = time.perf_counter() - start
        text = log_tail.text()
        code = proc.returncode
        # checked after the phase: during it, only RLIMIT_FSIZE (per file) holds
        size, entries = output_usage(phase.out_dir) if phase.out_writable else (0, 0)
        exceeded = (
            code == -signal.SIGXFSZ or size > limits.output_bytes or entries > limits.output_files
        )
        oom = not timed_out and code != 0 and any(sign in text for sign in _OOM_SIGNS)
        return PhaseOutcome(
            exit_code=None if timed_out else code,
            seconds=seconds,
            stdout_tail=stdout.text(),
            log_tail=text,
            timed_out=timed_out,
            oom=oom,
            output_exceeded=exceeded,
            stopped=stopped,
        )


def _driver_path(limits: Limits) -> dict[str, str]:
    """Returns where this host's CUDA driver lives (LD_LIBRARY_PATH), for a phase with a GPU.

    Only absolute folders: an empty entry would search the program's own folder.
    """
    folders = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p.startswith("/")]
    return {"LD_LIBRARY_PATH": ":".join(folders)} if limits.gpus and folders else {}


def _wait(proc: subprocess.Popen[bytes], phase: Phase) -> tuple[bool, str]:
    """Waits for the phase to end or its watch to say stop (the caller then kills it); returns
    (whether it timed out, why it was stopped or "")."""
    deadline = time.monotonic() + phase.timeout
    while (left := deadline - time.monotonic()) > 0:
        try:  # a watched phase is looked at every WATCH_POLL seconds
            proc.wait(timeout=left if phase.watch is None else min(left, WATCH_POLL))
            return False, ""  # it ended on its own (a last report's verdict came too late)
        except subprocess.TimeoutExpired:
            pass
        if phase.watch is not None and phase.watch.stopped.is_set():
            return False, phase.watch.reason
    return True, ""


def _feed(proc: subprocess.Popen[bytes], payload: bytes) -> None:
    assert proc.stdin is not None
    try:
        proc.stdin.write(payload)
        proc.stdin.close()
    except OSError:
        pass  # the phase exited without reading all of it


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kills the phase's whole process group, leftovers included, and reaps the leader."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
