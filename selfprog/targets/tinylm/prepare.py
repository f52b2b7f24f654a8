"""Data for tinylm: a deterministic code corpus, split into train and held-out.

Fixed file: the proposer never edits it. It runs twice over:
- on the host, once per run, as `python prepare.py OUT_DIR [--corpus DIR]`, to
  build `train.bin`, `heldout.bin` and `manifest.json` (with their hashes);
- inside the sandbox, imported by train.py for `load_train()` and `get_batch()`.

By default the corpus is the Python standard library that ships with the
running interpreter. The held-out split is whole stdlib packages that training
and evaluation never import (HELDOUT_PACKAGES, those this Python has), so the
sandbox can hide their folders from the candidate. With --site-packages the
training split also takes the .py files of the interpreter's site-packages
(the sandbox can read them anyway: torch lives there), up to --max-train-bytes:
enough for minutes of GPU training without repeating much. With --corpus DIR
the files of DIR are split by a hash of their path instead (DIR is never
mounted into the sandbox).
"""

import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path

TRAIN_FILE = "train.bin"
HELDOUT_FILE = "heldout.bin"
MANIFEST_FILE = "manifest.json"

TRAIN_MAX_BYTES = 4_000_000  # more than a CPU sees in minutes of training
HELDOUT_MAX_BYTES = 262_144
MIN_TRAIN_BYTES = 1_000_000
MIN_HELDOUT_BYTES = 100_000
# Never imported by torch, accelerate, numpy, transformers or safetensors. In this order
# they fill heldout.bin; every one present is held out and hidden. Distribution
# Pythons ship without idlelib, turtledemo and tkinter; 3.13 drops lib2to3 and msilib.
# lib2to3 comes last: forks of it (black's blib2to3) may lie in site-packages.
HELDOUT_PACKAGES = (
    "idlelib",
    "turtledemo",
    "tkinter",
    "xmlrpc",
    "wsgiref",
    "curses",
    "dbm",
    "venv",
    "ensurepip",
    "msilib",
    "lib2to3",
)
SKIPPED_PACKAGES = ("site-packages", "dist-packages", "test", "tests", "__pycache__")
FILE_SEPARATOR = b"\n\n"


# ---------------------------------------------------------------------------
# building the corpus (host side, once per run)


def _python_files(root: Path, skipped: tuple[str, ...] = SKIPPED_PACKAGES) -> list[Path]:
    """Returns the .py files under root in a fixed order, skipping tests and packages."""
    files = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if any(part in skipped for part in relative.parts[:-1]):
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read_capped(files: list[Path], cap: int) -> bytes:
    """Returns the files joined by a separator, stopping once cap bytes are reached."""
    chunks, total = [], 0
    for path in files:
        text = path.read_bytes()
        chunks.append(text)
        total += len(text) + len(FILE_SEPARATOR)
        if total >= cap:
            break
    return FILE_SEPARATOR.join(chunks)[:cap]


def split_stdlib(stdlib: Path) -> tuple[list[Path], list[Path], list[str]]:
    """Returns (train files, held-out files, held-out folders) of the standard library."""
    heldout_dirs = [stdlib / name for name in HELDOUT_PACKAGES if (stdlib / name).is_dir()]
    heldout = [f for d in heldout_dirs for f in _python_files(d)]
    train = [
        f for f in _python_files(stdlib) if f.relative_to(stdlib).parts[0] not in HELDOUT_PACKAGES
    ]
    return train, heldout, [str(d.resolve()) for d in heldout_dirs]


def split_folder(corpus: Path) -> tuple[list[Path], list[Path], list[str]]:
    """Returns (train files, held-out files, held-out folders) of a user's folder, by path hash."""
    train, heldout = [], []
    for path in _python_files(corpus):
        key = path.relative_to(corpus).as_posix().encode()
        bucket = int(hashlib.sha256(key).hexdigest(), 16) % 10
        (heldout if bucket == 0 else train).append(path)
    return train, heldout, []


def site_packages() -> list[Path]:
    """Returns the .py files of this interpreter's site-packages, in a fixed order.

    Packages named like a held-out one (a fork of lib2to3) are left out.
    """
    paths = sysconfig.get_paths()
    roots = sorted({Path(paths["purelib"]), Path(paths["platlib"])})
    files = []
    for root in roots:
        for path in _python_files(root, ("test", "tests", "__pycache__")):
            if not any(part in HELDOUT_PACKAGES for part in path.relative_to(root).parts):
                files.append(path)
    return files


def _shingles(text: bytes, width: int = 6) -> set[int]:
    """Returns hashes of each run of `width` non-blank lines (stripped): a text's fingerprint."""
    lines = [hash(line.strip()) for line in text.splitlines() if line.strip()]
    return {hash(tuple(lines[i : i + width])) for i in range(len(lines) - width + 1)}


def _copies(path: Path, heldout: set[int]) -> bool:
    """Returns whether a file copies held-out text: a fifth of its fingerprint (a fork of a
    held-out package under another name, such as black's blib2to3 of lib2to3)."""
    mine = _shingles(path.read_bytes())
    shared = len(mine & heldout)
    return shared >= 3 and shared * 5 >= len(mine)


def build(
    out_dir: Path,
    corpus: Path | None = None,
    stdlib: Path | None = None,
    with_site_packages: bool = False,
    max_train_bytes: int = TRAIN_MAX_BYTES,
) -> dict:
    """Writes train.bin, heldout.bin and manifest.json into out_dir; returns the manifest."""
    if corpus is None:
        source = stdlib or Path(sysconfig.get_paths()["stdlib"])
        train_files, heldout_files, hidden = split_stdlib(source)
        if with_site_packages:
            seen = set().union(*(_shingles(f.read_bytes()) for f in heldout_files))
            train_files = train_files + [f for f in site_packages() if not _copies(f, seen)]
    else:
        source = corpus
        train_files, heldout_files, hidden = split_folder(corpus)
    train = _read_capped(train_files, max_train_bytes)
    heldout = _read_capped(heldout_files, HELDOUT_MAX_BYTES)
    if len(train) < MIN_TRAIN_BYTES or len(heldout) < MIN_HELDOUT_BYTES:
        found = ""
        if corpus is None:
            names = ", ".join(Path(h).name for h in hidden) or "none"
            found = f" (held-out packages found: {names}, of {', '.join(HELDOUT_PACKAGES)})"
        raise SystemExit(
            f"corpus too small in {source}: {len(train)} train bytes (need {MIN_TRAIN_BYTES}), "
            f"{len(heldout)} held-out bytes (need {MIN_HELDOUT_BYTES}){found}; pass --corpus DIR"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / TRAIN_FILE).write_bytes(train)
    (out_dir / HELDOUT_FILE).write_bytes(heldout)
    digest = hashlib.sha256()
    for blob in (train, heldout):
        digest.update(hashlib.sha256(blob).digest())
    manifest = {
        "source": str(source),
        "python": sys.version.split()[0],
        "train_bytes": len(train),
        "heldout_bytes": len(heldout),
        "train_files": len(train_files),
        "heldout_files": len(heldout_files),
        "hidden_folders": hidden,  # the sandbox masks these so a candidate cannot read them
        "data_hash": digest.hexdigest(),
    }
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# ---------------------------------------------------------------------------
# reading the data (sandbox side, imported by train.py)


def load_train():
    """Returns the training split as a 1-D uint8 tensor (the sandbox mounts only this split)."""
    import torch

    path = Path(os.environ.get("SELFPROG_DATA", ".")) / TRAIN_FILE
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)


def get_batch(data, batch_size: int, block_size: int, generator=None):
    """Returns (inputs, targets), each [batch_size, block_size] int64, from random offsets."""
    import torch

    starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)
    rows = torch.stack([data[s : s + block_size + 1] for s in starts.tolist()]).long()
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build the tinylm corpus.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--corpus", type=Path, help="a folder of .py files instead of the stdlib")
    parser.add_argument(
        "--site-packages", action="store_true", help="train on site-packages too (the GPU seed)"
    )
    parser.add_argument("--max-train-bytes", type=int, default=TRAIN_MAX_BYTES)
    args = parser.parse_args()
    manifest = build(
        args.out_dir,
        args.corpus,
        with_site_packages=args.site_packages,
        max_train_bytes=args.max_train_bytes,
    )
    print(json.dumps(manifest))
