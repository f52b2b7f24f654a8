"""The held-out split: built on any Python's stdlib, kept out of training, hidden in every image."""

from __future__ import annotations

import ast
import json
import logging
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from selfprog.runners.image import SandboxImage, masked_paths, python_layout, python_mounts
from selfprog.targets.tinylm import prepare

TARGETS = Path(prepare.__file__).resolve().parents[1]


def _stdlib_copy(dest: Path, without: tuple[str, ...]) -> Path:
    """Returns a copy of this host's stdlib sources without some packages, as distributions ship it."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skipped = {*without, *prepare.SKIPPED_PACKAGES}

    def ignore(folder: str, names: list[str]) -> list[str]:
        return [
            n
            for n in names
            if n in skipped or (not n.endswith(".py") and not (Path(folder) / n).is_dir())
        ]

    shutil.copytree(stdlib, dest, ignore=ignore, symlinks=True)
    return dest


def test_heldout_split_works_without_idlelib_and_turtledemo(tmp_path: Path) -> None:
    stdlib = _stdlib_copy(tmp_path / "python3", without=("idlelib", "turtledemo"))
    manifest = prepare.build(tmp_path / "data", stdlib=stdlib)
    assert manifest["heldout_bytes"] >= prepare.MIN_HELDOUT_BYTES
    assert manifest["train_bytes"] >= prepare.MIN_TRAIN_BYTES
    hidden = [Path(h) for h in manifest["hidden_folders"]]
    assert hidden and all(h.parent == stdlib.resolve() and h.is_dir() for h in hidden)
    assert {h.name for h in hidden} <= set(prepare.HELDOUT_PACKAGES) - {"idlelib", "turtledemo"}
    train = (tmp_path / "data" / prepare.TRAIN_FILE).read_bytes()
    heldout = (tmp_path / "data" / prepare.HELDOUT_FILE).read_bytes()
    probes = [heldout[i : i + 200] for i in range(0, len(heldout) - 200, 4096)]
    assert len(probes) > 20 and not [p for p in probes if p in train]
    train_files = prepare.split_stdlib(stdlib)[0]  # train.bin is capped: check the whole list
    assert not [f for f in train_files if any(f.resolve().is_relative_to(h) for h in hidden)]
    assert prepare.build(tmp_path / "again", stdlib=stdlib)["data_hash"] == manifest["data_hash"]


def test_a_stdlib_without_heldout_packages_fails_clearly(tmp_path: Path) -> None:
    stdlib = tmp_path / "python3"
    stdlib.mkdir()
    for i in range(12):  # enough training text, no held-out package
        (stdlib / f"module{i}.py").write_text(f"x{i} = {i}\n" * 20_000)
    with pytest.raises(SystemExit, match=r"0 held-out bytes .*found: none, of idlelib"):
        prepare.build(tmp_path / "data", stdlib=stdlib)


# what training and evaluation code does with the ML stack, beyond importing it
_USE_THE_STACK = """
import json, sys
import numpy, safetensors.torch, torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel
model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=1, vocab_size=16, n_positions=8))
lora = LoraConfig(r=2, target_modules=["c_attn"])
model = Accelerator(cpu=True).prepare(get_peft_model(model, lora))
model(torch.zeros(1, 4, dtype=torch.long)).logits.sum().backward()
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_the_ml_stack_imports_no_heldout_package() -> None:
    # a held-out folder is an empty mount in the sandbox: importing from it would fail there
    done = subprocess.run([sys.executable, "-c", _USE_THE_STACK], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = set(json.loads(done.stdout.splitlines()[-1]))
    assert loaded & set(prepare.HELDOUT_PACKAGES) == set()
    for program in TARGETS.glob("*/*.py"):  # every target file: seed programs and fixed ones
        assert _imports(program) & set(prepare.HELDOUT_PACKAGES) == set(), program


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


# The Dockerfile image (python:3.11-slim) cannot be built here, where no registry is
# reachable; these describe it, and other images, as its labels do.
DOCKERFILE_LIKE = SandboxImage(
    tag="selfprog-sandbox:latest",
    python="/usr/local/bin/python",
    mounts=(),
    stdlib="/usr/local/lib/python3.11",
    purelib="/usr/local/lib/python3.11/site-packages",
    platlib="/usr/local/lib/python3.11/site-packages",
)


def test_heldout_folders_are_masked_in_an_image_with_its_own_python() -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    hidden = prepare.split_stdlib(stdlib)[2]
    assert hidden
    masks = masked_paths(DOCKERFILE_LIKE, hidden)
    assert masks == [f"/usr/local/lib/python3.11/{Path(h).name}" for h in hidden]


def _host_layout(root: Path) -> dict[str, str]:
    stdlib = root / "lib" / "python3.12"
    for package in ("idlelib", "xmlrpc", "site-packages/heldpkg"):
        (stdlib / package).mkdir(parents=True)
    site = str(stdlib / "site-packages")
    return {"stdlib": str(stdlib), "purelib": site, "platlib": site}


def test_masks_map_each_folder_by_the_most_specific_python_path(tmp_path: Path) -> None:
    host = _host_layout(tmp_path / "host")
    hidden = [f"{host['stdlib']}/idlelib", f"{host['purelib']}/heldpkg"]
    assert masked_paths(DOCKERFILE_LIKE, hidden, host) == [
        "/usr/local/lib/python3.11/idlelib",
        "/usr/local/lib/python3.11/site-packages/heldpkg",
    ]
    # the offline image mounts the host's own folders: each is covered once, where it is
    offline = SandboxImage("offline", "/x/bin/python", (host["stdlib"],), **host)
    assert masked_paths(offline, hidden, host) == hidden


def test_a_mounted_python_without_the_folder_gets_no_mask(tmp_path: Path) -> None:
    host = _host_layout(tmp_path / "host")
    other = tmp_path / "other" / "lib" / "python3.11"
    (other / "xmlrpc").mkdir(parents=True)  # another Python's copy, and no idlelib
    image = SandboxImage("other", "/x/bin/python", (str(other),), stdlib=str(other))
    hidden = [f"{host['stdlib']}/idlelib", f"{host['stdlib']}/xmlrpc"]
    # a mount point cannot be made inside a read-only bind mount, and there is nothing to hide
    assert masked_paths(image, hidden, host) == [str(other / "xmlrpc")]


def test_an_image_without_labels_masks_what_it_mounts_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    host = _host_layout(tmp_path / "host")
    hidden = [f"{host['stdlib']}/idlelib", f"{host['stdlib']}/xmlrpc"]
    old = SandboxImage("unlabelled-test", "/usr/local/bin/python", ())
    with caplog.at_level(logging.WARNING, logger="selfprog.runners.image"):
        assert masked_paths(old, hidden, host) == []
        assert masked_paths(old, hidden, host) == []
    assert [r.getMessage() for r in caplog.records] == [
        "image unlabelled-test has no selfprog.stdlib label: held-out folders in its own "
        "Python stay readable; rebuild it with `selfprog image build`"
    ]
    old_offline = SandboxImage("old-offline-test", "/x/bin/python", (str(tmp_path / "host"),))
    caplog.clear()
    assert masked_paths(old_offline, hidden, host) == hidden
    assert caplog.records == []  # all it shows of the host is covered: nothing to warn about


@pytest.mark.parametrize("python", [sys.executable, "/usr/bin/python3"])
def test_the_offline_image_mounts_only_what_its_python_needs(python: str) -> None:
    if not Path(python).is_file():
        pytest.skip(f"no {python} here")
    layout = python_layout(python)
    mounts = python_mounts(python, layout["sys_path"])
    on_path = {Path(p).resolve() for p in layout["sys_path"] if Path(p).is_absolute()}
    assert str(Path(python).resolve()) in mounts
    # no prefix (for a distribution Python, /usr): other Pythons' held-out copies stay out
    assert all(Path(m) in on_path for m in mounts if Path(m).is_dir())
    assert str(Path(layout["stdlib"]).resolve()) in mounts


def test_a_fork_of_a_heldout_package_in_site_packages_stays_out_of_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    heldout_files = prepare.split_stdlib(stdlib)[1]
    site = tmp_path / "site-packages"
    (site / "fork").mkdir(parents=True)
    copied = heldout_files[len(heldout_files) // 2]
    text = copied.read_bytes()
    (site / "fork" / "renamed.py").write_bytes(b"# vendored, renamed\n" + text)
    (site / "own").mkdir()
    (site / "own" / "code.py").write_text("def own():\n    return 'nothing held out'\n" * 50)
    monkeypatch.setattr(prepare, "site_packages", lambda: sorted(site.rglob("*.py")))
    manifest = prepare.build(
        tmp_path / "data", with_site_packages=True, max_train_bytes=200_000_000
    )
    train = (tmp_path / "data" / prepare.TRAIN_FILE).read_bytes()
    assert b"nothing held out" in train  # site-packages did join the training split
    assert text[:2000] not in train, f"{copied.name}'s fork was trained on"
    assert manifest["train_files"] == len(prepare.split_stdlib(stdlib)[0]) + 1
