"""The docker runner: one locked-down container per phase of a candidate.

Each container has no network; memory, CPU, process and file-size limits; a
read-only root with a small tmpfs scratch; a non-root user with every
capability dropped and no privilege escalation; an environment holding only
what the harness sets; a wall-clock timeout after which it is killed; a
bounded log. Containers carry labels naming the run and candidate and are
removed in every case.

A training phase writes its outputs to `/out`, a tmpfs with a size and a
file-count limit that the kernel enforces: the phase runs under a supervisor
(supervisor.py) that keeps the container, and so the volume, alive after the
phase ends, until the runner has copied the regular files out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import socket
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import IO, Any

import docker
import requests
from docker.types import DeviceRequest, LogConfig, Mount, Ulimit
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from selfprog.curves import Watch
from selfprog.errors import RunnerError
from selfprog.runners import supervisor
from selfprog.runners.base import Limits, Phase, PhaseOutcome
from selfprog.runners.image import (
    OFFLINE_IMAGE,
    SandboxImage,
    build_offline,
    describe,
    masked_paths,
)
from selfprog.runners.local import harness_env

log = logging.getLogger(__name__)

LABEL = "selfprog"  # every container of ours carries it
POLL_SECONDS = 0.25
HIDDEN_TMPFS = "ro,size=4k,mode=0555"
MiB = 1024 * 1024
MAX_DEPTH = 16  # deeper output folders are not copied (a deep tree breaks recursive tools)
SUPERVISOR = Path(supervisor.__file__).read_text()  # passed with -c: nothing to mount


def _transient(exc: BaseException) -> bool:
    """Returns whether a Docker API error is the daemon's passing trouble, worth a retry."""
    if isinstance(exc, requests.exceptions.ConnectionError):
        return True
    return isinstance(exc, docker.errors.APIError) and exc.is_server_error()


# only infrastructure calls are retried: never a candidate's own run
_retry = retry(
    retry=retry_if_exception(_transient),
    stop=stop_after_attempt(4),
    wait=wait_exponential_jitter(multiplier=0.5, max=5),
    reraise=True,
)


@contextlib.contextmanager
def engine_errors(action: str) -> Iterator[None]:
    """Turns what the Docker SDK raises (its own errors, requests' below it) into one line."""
    try:
        yield
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RunnerError(
            f"the Docker engine failed to {action} ({type(exc).__name__}: {first[:240]})"
        ) from exc


def connect() -> Any:
    """Returns a client for the Docker engine named by the environment (DOCKER_HOST).

    Raises:
        RunnerError: no engine answers.
    """
    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except docker.errors.DockerException as exc:
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RunnerError(
            f"cannot reach the Docker engine at {where} ({first[:160]}); "
            "start it (e.g. `dockerd &`) or use --runner local"
        ) from None
    return client


def ensure_image(client: Any, tag: str = OFFLINE_IMAGE) -> SandboxImage:
    """Returns the sandbox image, building the offline one first if it is missing."""
    try:
        return describe(client.images.get(tag))
    except docker.errors.ImageNotFound:
        if tag != OFFLINE_IMAGE:
            raise RunnerError(
                f"image {tag} not found; build it with `selfprog image build`"
            ) from None
    log.warning("sandbox image %s not found: building it offline from this Python (once)", tag)
    return build_offline(client, tag)


def _sandbox_user() -> tuple[int, int]:
    uid = os.getuid()
    return (uid, os.getgid()) if uid != 0 else (65534, 65534)


class DockerRunner:
    """Runs each phase of a candidate in a fresh, locked-down container."""

    name = "docker"

    def __init__(self, image: str = OFFLINE_IMAGE, client: Any = None):
        self.client = client or connect()
        with engine_errors(f"find or build the sandbox image {image}"):
            self.image = ensure_image(self.client, image)

    def _container_config(
        self, phase: Phase, limits: Limits, labels: Mapping[str, str], nonce: str = ""
    ) -> dict[str, Any]:
        uid, gid = _sandbox_user()
        mounts = [Mount("/program", str(phase.program_dir.resolve()), type="bind", read_only=True)]
        tmpfs = {"/tmp": f"rw,nosuid,nodev,size={limits.scratch_bytes},mode=1777"}
        command = phase.command(self.image.python)
        memory = limits.memory_bytes
        if phase.out_writable:  # a volume the kernel keeps to its limits, held by the supervisor
            tmpfs["/out"] = (
                f"rw,nosuid,nodev,size={limits.output_bytes},nr_inodes={limits.output_files},"
                f"uid={uid},gid={gid}"
            )
            command = [self.image.python, "-I", "-c", SUPERVISOR, *command]
            memory += limits.output_bytes  # tmpfs pages count as the container's memory
        else:
            mounts.append(Mount("/out", str(phase.out_dir.resolve()), type="bind", read_only=True))
            # the container's cgroup counters (memory peak, page faults, pids) are shared by
            # every process of the evaluation: a channel from one model server to the next
            tmpfs["/sys/fs/cgroup"] = HIDDEN_TMPFS
        mounts += [
            Mount(f"/data/{f.name}", str(f.resolve()), type="bind", read_only=True)
            for f in phase.data_files
        ]
        mounts += [Mount(m, m, type="bind", read_only=True) for m in self.image.mounts]
        # held-out folders, mounted from the host or in the image's own Python: an empty tmpfs
        tmpfs |= {m: HIDDEN_TMPFS for m in masked_paths(self.image, phase.hidden)}
        env = harness_env(
            limits,
            {
                **phase.env,
                "HOME": "/tmp",
                "TMPDIR": "/tmp",
                "USER": "sandbox",
                "PATH": "/usr/bin:/bin",
                "SELFPROG_DATA": "/data",
                "SELFPROG_OUT": "/out",
                **({supervisor.NONCE_VARIABLE: nonce} if nonce else {}),
            },
        )
        gpus = None
        if limits.gpus is not None and limits.gpus.startswith("device="):  # these GPUs exactly
            ids = limits.gpus.removeprefix("device=").split(",")
            gpus = [DeviceRequest(device_ids=ids, capabilities=[["gpu"]])]
        elif limits.gpus is not None:
            count = -1 if limits.gpus == "all" else int(limits.gpus)
            gpus = [DeviceRequest(count=count, capabilities=[["gpu"]])]
        return {
            "image": self.image.tag,
            "command": command,
            "entrypoint": [""],  # an image's own entrypoint would take the first process's place
            "working_dir": "/program",
            "user": f"{uid}:{gid}",
            "environment": env,
            "labels": {LABEL: "1", **labels},
            "stdin_open": phase.stdin is not None,
            "host_config": self.client.api.create_host_config(
                mounts=mounts,
                tmpfs=tmpfs,
                network_mode="none",
                mem_limit=memory,
                memswap_limit=memory,  # no swap: past the limit is an OOM kill
                nano_cpus=int(limits.cpus * 1e9),
                pids_limit=limits.pids,
                read_only=True,
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                ulimits=[
                    Ulimit(name="fsize", soft=limits.output_bytes, hard=limits.output_bytes),
                    Ulimit(name="core", soft=0, hard=0),
                ],
                log_config=LogConfig(
                    type="json-file",
                    config={"max-size": str(max(limits.log_bytes * 4, 65536)), "max-file": "1"},
                ),
                device_requests=gpus,
                init=False,
            ),
        }

    def stop_all(self, labels: Mapping[str, str]) -> int:
        with engine_errors("remove this run's sandboxes"):
            return remove_leftovers(self.client, labels)

    def gpu_support(self) -> bool:
        """Returns whether the engine can pass NVIDIA GPUs into containers: NVIDIA's runtime is
        registered, or its hook (which `--gpus` calls) is installed beside a local engine."""
        with engine_errors("say which runtimes it has"):
            if "nvidia" in (self.client.info().get("Runtimes") or {}):
                return True
        local = os.environ.get("DOCKER_HOST", "unix://").startswith("unix://")
        return local and shutil.which("nvidia-container-runtime-hook") is not None

    @_retry
    def _create(self, config: dict[str, Any]) -> Any:
        api = self.client.api
        container_config = api.create_container_config(**config)
        # stdin closes when our attach closes, so the phase reads to the end of its input
        container_config["StdinOnce"] = container_config["AttachStdin"] = config["stdin_open"]
        return api.create_container_from_config(container_config)["Id"]

    @_retry
    def _remove(self, container_id: str) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            self.client.api.remove_container(container_id, force=True, v=True)

    def run(self, phase: Phase, limits: Limits, labels: Mapping[str, str]) -> PhaseOutcome:
        nonce = secrets.token_hex(16) if phase.out_writable else ""
        with engine_errors(f"run the {phase.name} phase"):
            container_id = self._create(self._container_config(phase, limits, labels, nonce))
            try:
                return self._run(container_id, phase, limits, nonce)
            finally:
                self._remove(container_id)

    def _phase_end(self, container_id: str, nonce: str) -> int | None:
        """Returns the phase's exit code once the supervisor has reported it, else None."""
        if not nonce:
            return None
        last = self.client.api.logs(container_id, stdout=True, stderr=False, tail=2)
        for line in last.decode("utf-8", "replace").splitlines():
            if line.startswith(f"{supervisor.MARKER} {nonce} "):
                code = int(line.split()[-1])
                return 128 - code if code < 0 else code  # killed by a signal: as docker says it
        return None

    def _kill(self, container_id: str) -> None:
        """Kills the container and waits for it to be gone (a slow death is not an error)."""
        try:
            self.client.api.kill(container_id)
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # 409: it exited on its own in the meantime
                raise
        with contextlib.suppress(
            requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError
        ):
            self.client.api.wait(container_id, timeout=30)

    def _collect(self, container_id: str, dest: Path, limits: Limits) -> tuple[int, int, str]:
        """Copies /out's files out of the container into dest: (bytes, entries, what failed).

        The archiver runs inside the container (the daemon's archive API cannot
        see a tmpfs), after everything of the phase was killed. Whatever the
        phase left there, a failure to copy is the candidate's, never an error.
        """
        api = self.client.api
        uid, gid = _sandbox_user()
        command = [self.image.python, "-I", "-c", SUPERVISOR, "--archive", str(limits.output_bytes)]
        exec_id = api.exec_create(container_id, command, user=f"{uid}:{gid}")["Id"]
        stream = (out for out, _ in api.exec_start(exec_id, stream=True, demux=True) if out)
        try:
            size, entries = _copy_out(stream, dest, limits)
        except (tarfile.TarError, OSError, RunnerError) as exc:
            return 0, 0, f"{type(exc).__name__}: {exc}"[:200]
        code = api.exec_inspect(exec_id).get("ExitCode")
        return size, entries, "" if code == 0 else f"the archiver exited with code {code}"

    def _run(self, container_id: str, phase: Phase, limits: Limits, nonce: str) -> PhaseOutcome:
        api = self.client.api
        sock = None
        if phase.stdin is not None:
            sock = api.attach_socket(container_id, params={"stdin": 1, "stream": 1})
        start = time.perf_counter()
        api.start(container_id)
        if phase.watch is not None:
            self._follow(container_id, phase.watch)
        if sock is not None:
            _write_stdin(sock, phase.stdin or b"")
        timed_out, ended, stopped = False, None, ""
        while True:
            try:
                api.wait(container_id, timeout=POLL_SECONDS)
                break  # the phase (or the supervisor) exited
            except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
                pass
            ended = self._phase_end(container_id, nonce)
            if ended is not None:
                break
            if phase.watch is not None and phase.watch.stopped.is_set():
                stopped = phase.watch.reason
                self._kill(container_id)
                break
            if time.perf_counter() - start > phase.timeout:
                timed_out = True
                self._kill(container_id)
                break
        seconds = time.perf_counter() - start
        if ended is None and not timed_out and not stopped:  # said so as it exited?
            ended = self._phase_end(container_id, nonce)
        exceeded, copy_failed = False, ""
        if ended is not None and api.inspect_container(container_id)["State"].get("Running"):
            size, entries, copy_failed = self._collect(container_id, phase.out_dir, limits)
            exceeded = ended != 0 and (
                size > limits.output_bytes - MiB or entries >= limits.output_files - 1
            )
        elif ended is not None:
            copy_failed = "the container stopped before its outputs were copied"
        if ended is not None:  # the supervisor holds on: stop it, so docker says if it saw an OOM
            self._kill(container_id)
        state = api.inspect_container(container_id)["State"]
        stdout = _without_marker(api.logs(container_id, stdout=True, stderr=False, tail=200))
        both = _without_marker(api.logs(container_id, stdout=True, stderr=True, tail=400))
        return PhaseOutcome(
            exit_code=None if timed_out else ended if ended is not None else state.get("ExitCode"),
            seconds=seconds,
            stdout_tail=stdout[-limits.log_bytes :],
            log_tail=both[-limits.log_bytes :],
            timed_out=timed_out,
            oom=bool(state.get("OOMKilled")) and not timed_out,
            output_exceeded=exceeded,
            output_lost=copy_failed,
            stopped=stopped,
        )

    def _follow(self, container_id: str, watch: Watch) -> None:
        """Feeds the container's stdout to the watch as it comes, on a thread of its own that
        ends with the container."""
        stream = self.client.api.logs(
            container_id, stdout=True, stderr=False, stream=True, follow=True
        )

        def copy() -> None:
            with contextlib.suppress(Exception):  # the container went: the watch has what came
                for chunk in stream:
                    watch.write(chunk)

        threading.Thread(target=copy, daemon=True).start()


def _without_marker(log: bytes) -> str:
    lines = log.decode("utf-8", "replace").splitlines(keepends=True)
    return "".join(line for line in lines if not line.startswith(supervisor.MARKER))


def _copy_out(stream: Any, dest: Path, limits: Limits) -> tuple[int, int]:
    """Writes the regular files and folders of a tar stream of /out into dest.

    Returns (bytes, entries). Links, devices and paths leaving dest are
    skipped; the stream is bounded by what the volume can hold.
    """
    bound = limits.output_bytes + 1024 * limits.output_files + MiB  # headers and padding
    with tempfile.TemporaryFile() as buffer:
        received = 0
        for chunk in stream:
            received += len(chunk)
            if received > bound:
                raise RunnerError(f"the output archive is larger than {bound} bytes")
            buffer.write(chunk)
        buffer.seek(0)
        return _extract(buffer, dest)


def _extract(buffer: IO[bytes], dest: Path) -> tuple[int, int]:
    size = entries = 0
    with tarfile.open(fileobj=buffer, mode="r|") as tar:
        for member in tar:
            parts = PurePosixPath(member.name).parts[1:]  # inside "out/"
            if not parts or len(parts) > MAX_DEPTH or any(p in ("", ".", "..", "/") for p in parts):
                continue
            target = dest.joinpath(*parts)
            entries += 1
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None
                with source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out)
                size += member.size
    return size, entries


def _write_stdin(sock: Any, payload: bytes) -> None:
    raw = getattr(sock, "_sock", sock)  # the SDK wraps the socket on unix transports
    try:
        raw.sendall(payload)
        raw.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the phase exited without reading all of it
    finally:
        sock.close()


def remove_leftovers(client: Any, labels: Mapping[str, str]) -> int:
    """Removes the containers carrying all the given labels; returns how many."""
    selector = [LABEL] + [f"{k}={v}" for k, v in labels.items()]
    containers = client.api.containers(all=True, filters={"label": selector})
    for container in containers:
        try:
            client.api.remove_container(container["Id"], force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # 409: another cleaner is removing it already
                raise
    return len(containers)
