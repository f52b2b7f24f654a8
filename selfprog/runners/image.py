"""The sandbox image: built from sandbox/Dockerfile, or offline from this host's Python.

The offline image needs no registry: it is a minimal root filesystem holding
only the shared libraries that this host's Python and its installed packages
link against, plus an unprivileged user. The Python installation itself is
not copied; the docker runner mounts it read-only at the same path.
"""

from __future__ import annotations

import io
import logging
import site
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfprog.errors import RunnerError

log = logging.getLogger(__name__)

OFFLINE_IMAGE = "selfprog-sandbox:offline"
DOCKERFILE_IMAGE = "selfprog-sandbox:latest"
LABEL_PYTHON = "selfprog.python"
LABEL_MOUNTS = "selfprog.mounts"
SANDBOX_UID = 1000
_EMPTY_DIRS = ("program", "data", "out", "tmp", "home/sandbox", "proc", "sys", "dev", "etc")
_ALWAYS = ("libgcc_s.so.1",)  # loaded with dlopen by glibc, so ldd does not list it


@dataclass(frozen=True, slots=True)
class SandboxImage:
    """An image the docker runner can use: its tag, its Python, and host folders to mount."""

    tag: str
    python: str
    mounts: tuple[str, ...]


def describe(image: Any) -> SandboxImage:
    """Returns what the runner needs to know about a docker image, from its labels."""
    labels = image.labels or {}
    python = labels.get(LABEL_PYTHON)
    if not python:
        raise RunnerError(
            f"image {image.tags[0] if image.tags else image.id} has no {LABEL_PYTHON} label; "
            "build it with `selfprog image build`"
        )
    mounts = tuple(m for m in labels.get(LABEL_MOUNTS, "").split(":") if m)
    for mount in mounts:
        if not Path(mount).is_dir():
            raise RunnerError(
                f"image {image.tags[0]} mounts {mount} from this host, which is gone; "
                "rebuild it with `selfprog image build --offline`"
            )
    return SandboxImage(tag=image.tags[0] if image.tags else image.id, python=python, mounts=mounts)


def python_roots() -> tuple[str, ...]:
    """Returns the host folders that hold this Python and its packages, outermost only."""
    candidates = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()}
    user_site = Path(site.getusersitepackages())
    if user_site.is_dir():
        candidates.add(user_site.resolve())
    roots = sorted(candidates, key=lambda p: len(p.parts))
    kept: list[Path] = []
    for root in roots:
        if not any(root.is_relative_to(k) for k in kept):
            kept.append(root)
    for root in kept:
        if ":" in str(root):
            raise RunnerError(f"cannot mount {root} into the sandbox: ':' in its path")
    return tuple(str(k) for k in kept)


def _ldd(paths: list[str]) -> set[str]:
    """Returns the absolute paths of the shared libraries the given binaries load."""
    libs: set[str] = set()
    for i in range(0, len(paths), 64):
        done = subprocess.run(["ldd", *paths[i : i + 64]], capture_output=True, text=True)
        for line in done.stdout.splitlines():
            parts = line.strip().split()
            if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
                libs.add(parts[2])
            elif parts and parts[0].startswith("/") and not parts[0].endswith(":"):
                libs.add(parts[0])  # the dynamic loader
    return libs


def shared_libraries(roots: Iterable[str]) -> list[Path]:
    """Returns the host libraries outside roots that Python and its extension modules need."""
    folders = [Path(r) for r in roots]
    binaries = [str(Path(sys.executable).resolve())]
    for folder in folders:
        binaries += [str(p) for p in folder.rglob("*.so*") if p.is_file() and not p.is_symlink()]
    libs = {Path(p) for p in _ldd(binaries)}
    lib_dirs = {lib.parent for lib in libs}
    libs |= {d / name for d in lib_dirs for name in _ALWAYS if (d / name).is_file()}
    return sorted(lib for lib in libs if not any(lib.is_relative_to(f) for f in folders))


def _add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, int(time.time())
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, int(time.time())
    tar.addfile(info)


def offline_rootfs(libraries: Iterable[Path]) -> bytes:
    """Returns a tar of the minimal root filesystem: folders, users, the libraries."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for folder in _EMPTY_DIRS:
            _add_dir(tar, folder, 0o1777 if folder == "tmp" else 0o755)
        passwd = (
            "root:x:0:0::/root:/bin/false\n"
            f"sandbox:x:{SANDBOX_UID}:{SANDBOX_UID}::/home/sandbox:/bin/false\n"
            "nobody:x:65534:65534::/nonexistent:/bin/false\n"
        )
        _add_file(tar, "etc/passwd", passwd.encode())
        _add_file(
            tar, "etc/group", f"root:x:0:\nsandbox:x:{SANDBOX_UID}:\nnogroup:x:65534:\n".encode()
        )
        made: set[str] = set(_EMPTY_DIRS)
        for lib in libraries:
            parent = ""
            for part in lib.parent.parts[1:]:
                parent = f"{parent}/{part}" if parent else part
                if parent not in made:
                    _add_dir(tar, parent)
                    made.add(parent)
            _add_file(tar, str(lib)[1:], lib.read_bytes(), 0o755)
    return buffer.getvalue()


def build_offline(client: Any, tag: str = OFFLINE_IMAGE) -> SandboxImage:
    """Returns the offline image after building it from this host's Python environment."""
    roots = python_roots()
    libraries = shared_libraries(roots)
    python = str(Path(sys.executable).resolve())
    log.info(
        "building %s: %d libraries, Python %s mounted from %s",
        tag,
        len(libraries),
        python,
        ", ".join(roots),
    )
    repository, _, version = tag.partition(":")
    changes = [
        f'LABEL {LABEL_PYTHON}="{python}"',
        f'LABEL {LABEL_MOUNTS}="{":".join(roots)}"',
        f"USER {SANDBOX_UID}:{SANDBOX_UID}",
        "WORKDIR /program",
    ]
    client.api.import_image_from_data(
        offline_rootfs(libraries), repository=repository, tag=version or "latest", changes=changes
    )
    return describe(client.images.get(tag))


def build_from_dockerfile(client: Any, context: Path, tag: str = DOCKERFILE_IMAGE) -> SandboxImage:
    """Returns the image built from sandbox/Dockerfile (needs a registry for its base image)."""
    if not (context / "Dockerfile").is_file():
        raise RunnerError(
            f"{context}: no Dockerfile here; pass the sandbox folder of a selfprog checkout"
        )
    import docker

    try:
        image, _ = client.images.build(path=str(context), tag=tag, rm=True)
    except docker.errors.BuildError as exc:
        raise RunnerError(
            f"building {tag} failed: {exc.msg}; try `selfprog image build --offline`"
        ) from None
    except docker.errors.APIError as exc:
        raise RunnerError(
            f"building {tag} failed: {exc.explanation}; try `selfprog image build --offline`"
        ) from None
    return describe(image)
