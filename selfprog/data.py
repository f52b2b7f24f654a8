"""A target's data, prepared once by its fixed prepare command and cached by content."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from selfprog.errors import TargetError
from selfprog.models import MARKER, resolve
from selfprog.target import Target

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Dataset:
    """A prepared data folder: where it is, its hash, and the host folders to hide."""

    root: Path
    data_hash: str
    hidden: tuple[str, ...]  # host folders holding held-out text, hidden from candidates
    manifest: dict[str, object]

    def train_files(self, target: Target) -> tuple[Path, ...]:
        """Returns what the training phase sees: the training split and the shared data."""
        return tuple(self.root / name for name in (*target.train_data, *target.shared_data))

    def shared_files(self, target: Target) -> tuple[Path, ...]:
        """Returns what the evaluation phase sees besides stdin: the shared data only."""
        return tuple(self.root / name for name in target.shared_data)

    def heldout(self, target: Target) -> bytes:
        return (self.root / target.heldout_data).read_bytes()


def default_cache() -> Path:
    """Returns the user's cache folder for prepared data."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "selfprog" / "data"


def _cache_key(target: Target, corpus: Path | None, base: str) -> str:
    digest = hashlib.sha256()
    for name in target.fixed:
        digest.update(name.encode() + b"\0" + (target.root / name).read_bytes())
    digest.update(json.dumps([list(target.prepare), sys.version, str(corpus), base]).encode())
    marker = Path(base) / MARKER if base else None
    if marker is not None and marker.is_file():  # a fetched model converted again is new data
        digest.update(marker.read_bytes())
    return digest.hexdigest()[:16]


def prepare_data(target: Target, cache: Path | None = None, corpus: Path | None = None) -> Dataset:
    """Returns the target's prepared data, running its prepare command on the host if needed.

    Raises:
        TargetError: the prepare command failed or left no valid manifest.
    """
    cache = (cache or default_cache()).resolve()  # prepare runs in the target's folder
    base = str(Path(resolve(target.base_model)).resolve()) if target.base_model else ""
    root = cache / target.name / _cache_key(target, corpus, base)
    if not (root / target.manifest).is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        log.info("preparing %s data into %s (once)", target.name, root)
        tmp = tempfile.mkdtemp(dir=root.parent, prefix=".building-")
        try:
            args = [
                a.replace("{data_dir}", tmp).replace("{base_model}", base) for a in target.prepare
            ]
            argv = [sys.executable, str(target.root / args[0]), *args[1:]]
            if corpus is not None:
                argv += ["--corpus", str(corpus)]
            done = subprocess.run(argv, cwd=target.root, capture_output=True, text=True)
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                raise TargetError(f"{target.name}: prepare failed: {tail[0]}")
            shutil.rmtree(root, ignore_errors=True)
            os.replace(tmp, root)  # appears whole or not at all
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_dataset(target, root)


def load_dataset(target: Target, root: Path) -> Dataset:
    """Returns the dataset in a prepared folder, checked against its manifest."""
    try:
        manifest = json.loads((root / target.manifest).read_text())
        data_hash = str(manifest["data_hash"])
    except (OSError, ValueError, KeyError) as exc:
        raise TargetError(f"{root}: no valid data manifest ({exc})") from None
    for name in (*target.train_data, target.heldout_data):
        if not (root / name).is_file():
            raise TargetError(f"{root}: data file {name} is missing")
    for name in target.shared_data:
        if not (root / name).exists():
            raise TargetError(f"{root}: shared data {name} is missing")
    _check_apart(target, root)
    hidden = tuple(str(p) for p in manifest.get("hidden_folders", []))
    return Dataset(root=root, data_hash=data_hash, hidden=hidden, manifest=manifest)


def _check_apart(target: Target, root: Path) -> None:
    """Refuses data that shows the held-out file to a phase: a link, or a copy under a training name."""
    heldout = root / target.heldout_data
    for name in (*target.train_data, *target.shared_data, target.heldout_data):
        if (root / name).is_symlink():
            raise TargetError(f"{root}: data {name} is a link: prepare must write plain files")
    inside = heldout.resolve()
    for name in (*target.train_data, *target.shared_data):
        seen = (root / name).resolve()
        if inside == seen or seen in inside.parents:  # through a link to a folder, say
            raise TargetError(f"{root}: the held-out file is inside data {name}: candidates see it")
    size = heldout.stat().st_size
    digest = hashlib.sha256(heldout.read_bytes()).hexdigest()
    for name in (*target.train_data, *target.shared_data):
        path = root / name
        same = path.is_file() and path.stat().st_size == size
        if same and hashlib.sha256(path.read_bytes()).hexdigest() == digest:
            raise TargetError(
                f"{root}: data {name} is the held-out file's copy: candidates would see it"
            )
