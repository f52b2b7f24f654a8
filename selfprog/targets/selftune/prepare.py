"""Data for selftune: Python source to fine-tune on, held-out code to score on, and the base model.

Fixed file: the proposer never edits it. It runs on the host, once per run,
as `python prepare.py OUT_DIR --base MODEL_DIR [--corpus DIR]`, and writes
`train.txt`, `heldout.txt`, `base/` (the model's files, hard-linked when the
file system allows) and `manifest.json` (with their hashes).

By default the text is the Python standard library of the running
interpreter. The held-out split is whole packages that machine-learning code
never imports (idlelib, turtledemo, tkinter, xmlrpc, ...: every one of them
this Python has), so the sandbox can hide their folders. With
--corpus DIR the files of DIR are split by a hash of their path.
"""

import hashlib
import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path

TRAIN_MAX_BYTES = 2_000_000  # far more than a CPU fine-tunes on in minutes
HELDOUT_MAX_BYTES = 65_536
MIN_TRAIN_BYTES = 200_000
MIN_HELDOUT_BYTES = 32_768
# the same packages as tinylm's held-out split; distribution Pythons lack the first ones
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
SKIPPED = ("site-packages", "dist-packages", "test", "tests", "__pycache__")
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


def python_files(root: Path) -> list[Path]:
    """Returns the .py files under root in a fixed order, without tests and installed packages."""
    found = [
        p for p in root.rglob("*.py") if not set(p.relative_to(root).parts[:-1]) & set(SKIPPED)
    ]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def joined(files: list[Path], cap: int) -> str:
    """Returns the files' text, separated by blank lines, cut at cap bytes on a line boundary."""
    text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files[:4000])
    cut = text.encode()[:cap].decode(errors="ignore")
    return cut[: cut.rfind("\n") + 1]


def split(corpus: Path | None) -> tuple[list[Path], list[Path], list[str]]:
    """Returns (train files, held-out files, folders to hide from the sandbox)."""
    if corpus is not None:
        train, heldout = [], []
        for path in python_files(corpus):
            key = path.relative_to(corpus).as_posix().encode()
            (heldout if int(hashlib.sha256(key).hexdigest(), 16) % 10 == 0 else train).append(path)
        return train, heldout, []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    held = [stdlib / name for name in HELDOUT_PACKAGES if (stdlib / name).is_dir()]
    heldout = [f for d in held for f in python_files(d)]
    train = [
        f for f in python_files(stdlib) if f.relative_to(stdlib).parts[0] not in HELDOUT_PACKAGES
    ]
    return train, heldout, [str(d.resolve()) for d in held]


def link_model(base: Path, dest: Path) -> str:
    """Links (or copies) the base model's files into dest; returns a hash of their contents' names and sizes."""
    dest.mkdir(parents=True)
    digest = hashlib.sha256()
    for name in MODEL_FILES:
        if not (base / name).is_file():
            continue
        try:
            os.link(base / name, dest / name)
        except OSError:  # another file system
            shutil.copyfile(base / name, dest / name)
        os.chmod(dest / name, 0o644)  # the sandbox's user is not the owner
        digest.update(f"{name}:{(base / name).stat().st_size}".encode())
    if not (dest / "config.json").is_file() or not (dest / "model.safetensors").is_file():
        raise SystemExit(f"{base} is not a Hugging Face model folder with model.safetensors")
    marker = base / "selfprog-model.json"
    if marker.is_file():
        digest.update(json.loads(marker.read_text()).get("gguf_sha256", "").encode())
    return digest.hexdigest()


def build(out_dir: Path, base: Path, corpus: Path | None = None) -> dict:
    train_files, heldout_files, hidden = split(corpus)
    train, heldout = joined(train_files, TRAIN_MAX_BYTES), joined(heldout_files, HELDOUT_MAX_BYTES)
    if len(train.encode()) < MIN_TRAIN_BYTES or len(heldout.encode()) < MIN_HELDOUT_BYTES:
        raise SystemExit(
            f"corpus too small: {len(train)} train, {len(heldout)} held-out characters"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train.txt").write_text(train, encoding="utf-8")
    (out_dir / "heldout.txt").write_text(heldout, encoding="utf-8")
    model_hash = link_model(base, out_dir / "base")
    digest = hashlib.sha256()
    for part in (train.encode(), heldout.encode(), model_hash.encode()):
        digest.update(hashlib.sha256(part).digest())
    manifest = {
        "python": sys.version.split()[0],
        "base": str(base),
        "train_bytes": len(train.encode()),
        "heldout_bytes": len(heldout.encode()),
        "hidden_folders": hidden,
        "data_hash": digest.hexdigest(),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build selftune's data folder.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--base", type=Path, required=True, help="the base model's folder")
    parser.add_argument("--corpus", type=Path, help="a folder of .py files instead of the stdlib")
    args = parser.parse_args()
    print(json.dumps(build(args.out_dir, args.base, args.corpus)))
