"""The sandbox image: built from sandbox/Dockerfile, or offline from this host's Python.

The offline image needs no registry: it is a minimal root filesystem holding
only the shared libraries that this host's Python and its installed packages
link against, plus an unprivileged user. The Python installation itself is
not copied; the docker runner mounts its binary and the folders on its
sys.path read-only at the same paths, and no other host folder.

Every image names in its labels where its Python keeps its library, so the
runner can hide the held-out folders in it (`masked_paths`).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import subprocess
import sys
import sysconfig
import tarfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from selfprog.errors import RunnerError

log = logging.getLogger(__name__)

OFFLINE_IMAGE = "selfprog-sandbox:offline"
DOCKERFILE_IMAGE = "selfprog-sandbox:latest"
LABEL_PYTHON = "selfprog.python"
LABEL_MOUNTS = "selfprog.mounts"
PYTHON_PATHS = ("stdlib", "purelib", "platlib")  # sysconfig paths an image names in its labels
SANDBOX_UID = 1000
_EMPTY_DIRS = ("program", "data", "out", "tmp", "home/sandbox", "proc", "sys", "dev", "etc")
_ALWAYS = ("libgcc_s.so.1",)  # loaded with dlopen by glibc, so ldd does not list it


@dataclass(frozen=True, slots=True)
class SandboxImage:
    """An image the docker runner can use: its tag, its Python, host paths to mount, its library."""

    tag: str
    python: str
    mounts: tuple[str, ...]
    # where the image's Python keeps its sysconfig paths (labels selfprog.stdlib, ...); None: unsaid
    stdlib: str | None = None
    purelib: str | None = None
    platlib: str | None = None
    id: str = ""  # the image's own id: a tag can be moved to another image


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
        if not Path(mount).exists():
            raise RunnerError(
                f"image {image.tags[0]} mounts {mount} from this host, which is gone; "
                "rebuild it with `selfprog image build --offline`"
            )
    paths = {name: labels.get(f"selfprog.{name}") or None for name in PYTHON_PATHS}
    tag = image.tags[0] if image.tags else image.id
    return SandboxImage(tag=tag, python=python, mounts=mounts, id=image.id or "", **paths)


# asks a Python what it puts on sys.path; -E: without PYTHON* variables, as in the sandbox
_LAYOUT = (
    "import json, sys, sysconfig\n"
    "print(json.dumps({'sys_path': sys.path, **sysconfig.get_paths()}))\n"
)


def python_layout(python: str) -> dict[str, Any]:
    """Returns a Python's sys.path (as `sys_path`) and its sysconfig paths, asked of it."""
    done = subprocess.run([python, "-E", "-c", _LAYOUT], capture_output=True, text=True, cwd="/")
    if done.returncode != 0:
        raise RunnerError(
            f"{python} did not say where its library is: {done.stderr.strip()[-300:]}"
        )
    layout: dict[str, Any] = json.loads(done.stdout)
    return layout


def python_mounts(python: str, sys_path: Iterable[str]) -> tuple[str, ...]:
    """Returns what the sandbox mounts: the binary and the sys.path entries, outermost only."""
    candidates = {Path(python).resolve()}
    candidates |= {Path(p).resolve() for p in sys_path if os.path.isabs(p) and Path(p).exists()}
    kept: list[Path] = []
    for path in sorted(candidates, key=lambda p: len(p.parts)):
        if not any(path.is_relative_to(k) for k in kept):
            kept.append(path)
    for path in kept:
        if ":" in str(path):
            raise RunnerError(f"cannot mount {path} into the sandbox: ':' in its path")
    return tuple(str(k) for k in sorted(kept))


def _host_paths() -> dict[str, str]:
    """Returns this Python's sysconfig paths, by which prepare found the held-out folders."""
    paths = sysconfig.get_paths()
    return {name: paths[name] for name in PYTHON_PATHS}


def _within(path: str, folders: Iterable[str]) -> bool:
    return any(Path(path).is_relative_to(folder) for folder in folders)


@functools.cache
def _warn_unlabelled(tag: str, name: str) -> None:
    log.warning(
        "image %s has no selfprog.%s label: held-out folders in its own Python stay readable; "
        "rebuild it with `selfprog image build`",
        tag,
        name,
    )


def masked_paths(
    image: SandboxImage, hidden: Iterable[str], host: Mapping[str, str] | None = None
) -> list[str]:
    """Returns the paths in a container of image to cover so that no copy of hidden is readable.

    A hidden host folder is covered where the image mounts it, and at the same
    place relative to the image's own stdlib, purelib or platlib (from its
    labels), so an image with its own Python hides its copy too.
    """
    host = host or _host_paths()
    masks: dict[str, None] = {}  # ordered, without repeats
    for folder in hidden:
        if _within(folder, image.mounts):
            masks[folder] = None
        # the most specific host path holding it: site-packages lies inside the stdlib
        holders = [
            (name, Path(root).resolve())
            for name, root in host.items()
            if Path(folder).is_relative_to(Path(root).resolve())
        ]
        if not holders:
            continue
        name, root = max(holders, key=lambda holder: len(holder[1].parts))
        inside = getattr(image, name)
        if inside is None:
            if folder not in masks:
                _warn_unlabelled(image.tag, name)
            continue
        target = str(PurePosixPath(inside) / Path(folder).relative_to(root).as_posix())
        if _within(target, image.mounts) and not Path(target).is_dir():
            continue  # a mounted host folder without it: nothing to hide, and no mount point to make
        masks[target] = None
    return list(masks)


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


def shared_libraries(python: str, mounts: Iterable[str]) -> list[Path]:
    """Returns the host libraries outside mounts that Python and its extension modules need."""
    folders = [Path(m) for m in mounts]
    binaries = [str(Path(python).resolve())]
    for folder in (f for f in folders if f.is_dir()):
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


def build_offline(
    client: Any, tag: str = OFFLINE_IMAGE, python: str = sys.executable
) -> SandboxImage:
    """Returns the offline image after building it from a host Python (by default this one)."""
    python = str(Path(python).resolve())
    layout = python_layout(python)
    mounts = python_mounts(python, layout["sys_path"])
    libraries = shared_libraries(python, mounts)
    log.info(
        "building %s: %d libraries, Python %s mounted from %s",
        tag,
        len(libraries),
        python,
        ", ".join(mounts),
    )
    repository, _, version = tag.partition(":")
    changes = [
        f'LABEL {LABEL_PYTHON}="{python}"',
        f'LABEL {LABEL_MOUNTS}="{":".join(mounts)}"',
        *(f'LABEL selfprog.{name}="{Path(layout[name]).resolve()}"' for name in PYTHON_PATHS),
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
