"""Hostile candidates against both runners: what the sandbox must contain."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from selfprog.data import Dataset
from selfprog.runners.base import Limits, Runner, output_usage
from selfprog.target import Target
from tests.conftest import SMALL, script_phase

LABELS = {"selfprog.run": "test", "selfprog.candidate": "hostile"}


def test_host_environment_does_not_leak(
    runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-should-not-leak")
    phase = script_phase(tmp_path, "import os, json; print(json.dumps(dict(os.environ)))")
    outcome = runner.run(phase, SMALL, LABELS)
    assert outcome.exit_code == 0, outcome.log_tail
    env = json.loads(outcome.stdout_tail.strip().splitlines()[-1])
    assert "sk-secret-should-not-leak" not in outcome.stdout_tail
    assert "OPENAI_API_KEY" not in env
    assert set(env) - {"HOSTNAME"} <= {
        *(k for k in env if k.startswith("SELFPROG_")),
        "LANG",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONUNBUFFERED",
        "PYTHONHASHSEED",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "HF_HUB_OFFLINE",
        "HF_HUB_DISABLE_TELEMETRY",
        "TOKENIZERS_PARALLELISM",
        "CUDA_VISIBLE_DEVICES",
        "HOME",
        "TMPDIR",
        "USER",
        "PATH",
    }


def test_endless_candidate_times_out_and_leaves_nothing_running(runner, tmp_path: Path) -> None:
    source = "import os, time\nos.fork()\nwhile True:\n    time.sleep(0.1)\n"
    phase = script_phase(tmp_path, source, timeout=3.0)
    outcome = runner.run(phase, SMALL, {**LABELS, "selfprog.candidate": f"endless-{runner.name}"})
    assert outcome.timed_out
    assert outcome.exit_code is None
    assert 3.0 <= outcome.seconds < 30
    if runner.name == "docker":
        left = runner.client.api.containers(
            all=True, filters={"label": f"selfprog.candidate=endless-{runner.name}"}
        )
        assert left == []


def test_unbounded_allocation_ends_oom(runner, tmp_path: Path) -> None:
    source = "chunks = []\nwhile True:\n    chunks.append(bytearray(64 * 1024 * 1024))\n"
    phase = script_phase(tmp_path, source)
    outcome = runner.run(phase, SMALL, LABELS)
    assert outcome.oom, outcome.log_tail
    assert not outcome.timed_out


def test_stdout_flood_leaves_a_bounded_log(runner, tmp_path: Path) -> None:
    source = (
        "import sys\n"
        "line = 'x' * 1000 + '\\n'\n"
        "for _ in range(200_000):\n"
        "    sys.stdout.write(line)\n"
        "print('END')\n"
    )
    phase = script_phase(tmp_path, source, timeout=60.0)
    outcome = runner.run(phase, SMALL, LABELS)
    assert outcome.exit_code == 0
    assert len(outcome.log_tail) <= SMALL.log_bytes
    assert len(outcome.stdout_tail) <= SMALL.log_bytes
    assert outcome.log_tail.rstrip().endswith("END")


def test_output_beyond_the_limit_is_stopped(runner, tmp_path: Path) -> None:
    source = (
        "import os\n"
        "with open(os.path.join(os.environ['SELFPROG_OUT'], 'big.bin'), 'wb') as f:\n"
        "    for _ in range(1024):\n"
        "        f.write(b'0' * 1024 * 1024)\n"
    )
    limits = Limits(memory_bytes=1024 * 2**20, cpus=1.0, output_bytes=16 * 2**20)
    outcome = runner.run(script_phase(tmp_path, source), limits, LABELS)
    assert outcome.output_exceeded or outcome.exit_code != 0
    assert (tmp_path / "out" / "big.bin").stat().st_size <= 16 * 2**20


def test_many_small_files_in_a_locked_folder_cannot_pass_the_output_limit(
    runner, tmp_path: Path
) -> None:
    source = (
        "import os\n"
        "out = os.environ['SELFPROG_OUT']\n"
        "for i in range(5000):  # no bytes at all: only the file count can stop these\n"
        "    try:\n"
        "        open(os.path.join(out, f'empty-{i}'), 'w').close()\n"
        "    except OSError:\n"
        "        break\n"
        "hidden = os.path.join(out, 'hidden')\n"
        "os.mkdir(hidden)\n"
        "try:  # each file far below the per-file limit\n"
        "    for i in range(2000):\n"
        "        with open(os.path.join(hidden, f'{i}.bin'), 'wb') as f:\n"
        "            f.write(b'x' * 65536)\n"
        "finally:\n"
        "    os.chmod(hidden, 0)  # a watcher that skips what it cannot read sees nothing here\n"
    )
    limits = Limits(memory_bytes=1024 * 2**20, cpus=1.0, output_bytes=16 * 2**20, output_files=1000)
    outcome = runner.run(script_phase(tmp_path, source), limits, LABELS)
    assert outcome.output_exceeded, outcome.log_tail
    if runner.name == "docker":  # held by the kernel during the phase: nothing more reached us
        size, entries = output_usage(tmp_path / "out")
        assert size <= 16 * 2**20
        assert entries <= 1000


def test_output_usage_opens_what_the_phase_locked(tmp_path: Path) -> None:
    """As the local runner sees it: the phase ran as the same user (not root, which sees all)."""
    import tempfile

    root = Path(tempfile.mkdtemp())
    root.chmod(0o755)
    out = root / "out"
    for folder, mode in (("unreadable", 0), ("unsearchable", 0o600)):
        (out / folder).mkdir(parents=True)
        (out / folder / "f").write_bytes(b"x" * 1000)
        (out / folder).chmod(mode)
    user = 65534 if os.getuid() == 0 else None
    for path in [out, *out.rglob("*")] if user is not None else []:
        os.chown(path, user, user)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        try:
            if user is not None:
                os.setgid(user)
                os.setuid(user)
            os.write(write, repr(output_usage(out)).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    answer = os.read(read, 1000).decode()
    os.close(read)
    assert answer == "(2000, 4)"


@pytest.mark.docker
def test_outputs_made_to_break_the_copy_end_in_a_definite_outcome(
    docker_runner, tmp_path: Path
) -> None:
    source = (
        "import os\n"
        "out = os.environ['SELFPROG_OUT']\n"
        "open(os.path.join(out, 'model.pt'), 'wb').write(b'w' * 1000)\n"
        "deep = out\n"
        "for _ in range(1500):  # deeper than a recursive walk goes\n"
        "    deep = os.path.join(deep, 'd')\n"
        "    os.mkdir(deep)\n"
        "os.chdir(out)\n"
        "for _ in range(25):  # a path longer than a host path may be\n"
        "    os.mkdir('x' * 200)\n"
        "    os.chdir('x' * 200)\n"
        "open('f', 'w').write('x')\n"
        "for i in range(3):  # sparse: no room on the volume, 45 MiB in an archive\n"
        "    with open(os.path.join(out, f'sparse-{i}'), 'wb') as f:\n"
        "        f.truncate(15 * 2**20)\n"
        "os.symlink('/etc/passwd', os.path.join(out, 'link'))\n"
        "os.link(os.path.join(out, 'model.pt'), os.path.join(out, 'hard'))\n"
        "os.mkfifo(os.path.join(out, 'fifo'))\n"
        "os.chmod(os.path.join(out, 'd'), 0)\n"
    )
    limits = Limits(memory_bytes=1024 * 2**20, cpus=1.0, output_bytes=16 * 2**20)
    outcome = docker_runner.run(script_phase(tmp_path, source), limits, LABELS)
    assert outcome.exit_code == 0, outcome.log_tail
    out = tmp_path / "out"
    assert (out / "model.pt").read_bytes() == b"w" * 1000
    assert not (out / "link").exists() and not (out / "fifo").exists()
    assert not any(p.is_symlink() for p in out.rglob("*"))
    assert not (out / "d" / ("d/" * 20)).exists()  # too deep to copy
    size, _ = output_usage(out)
    assert size <= 16 * 2**20  # the sparse files did not come out at their apparent size


@pytest.mark.docker
def test_network_is_unreachable(docker_runner, tmp_path: Path) -> None:
    source = (
        "import socket\n"
        "for host, port in [('1.1.1.1', 53), ('172.17.0.1', 2375), ('pypi.org', 443)]:\n"
        "    try:\n"
        "        socket.create_connection((host, port), timeout=3).close()\n"
        "        print('CONNECTED', host)\n"
        "    except OSError as exc:\n"
        "        print('BLOCKED', host, type(exc).__name__)\n"
        "print(open('/proc/net/dev').read())\n"
    )
    outcome = docker_runner.run(script_phase(tmp_path, source), SMALL, LABELS)
    assert outcome.exit_code == 0, outcome.log_tail
    assert "CONNECTED" not in outcome.stdout_tail
    assert outcome.stdout_tail.count("BLOCKED") == 3
    interfaces = [
        line.split(":")[0].strip() for line in outcome.stdout_tail.splitlines() if ":" in line
    ]
    assert "eth0" not in interfaces


@pytest.mark.docker
def test_sandbox_is_locked_down(docker_runner, tmp_path: Path) -> None:
    source = (
        "import os, json\n"
        "status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines())\n"
        "def writable(p):\n"
        "    try:\n"
        "        open(os.path.join(p, 'probe'), 'w').close(); return True\n"
        "    except OSError:\n"
        "        return False\n"
        "paths = ['/', '/program', '/etc', '/tmp', '/out', '/data']\n"
        "print(json.dumps({'uid': os.getuid(), 'cap_eff': status['CapEff'].strip(),\n"
        "    'no_new_privs': status['NoNewPrivs'].strip(),\n"
        "    'writable': {p: writable(p) for p in paths}}))\n"
    )
    outcome = docker_runner.run(script_phase(tmp_path, source), SMALL, LABELS)
    report = json.loads(outcome.stdout_tail.strip().splitlines()[-1])
    assert report["uid"] != 0
    assert int(report["cap_eff"], 16) == 0
    assert report["no_new_privs"] == "1"
    assert report["writable"] == {
        "/": False,
        "/program": False,
        "/etc": False,
        "/tmp": True,
        "/out": True,
        "/data": False,
    }


# reads every file of the container but /proc, /sys and /dev; prints where each probe was found
_SEARCH_EVERYWHERE = """
import json, os, stat, sys, time
probes = {k: [bytes.fromhex(p) for p in v] for k, v in PROBES.items()}
found = {k: [] for k in probes}
deadline, scanned, too_big, complete = time.monotonic() + 45, 0, 0, True
for folder, dirs, files in os.walk("/"):
    if folder == "/":
        dirs[:] = [d for d in dirs if d not in ("proc", "sys", "dev")]
    for name in files:
        path = os.path.join(folder, name)
        try:
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode):  # a link's target is read where it lies
                continue
            if info.st_size > 64 * 2**20:  # libraries such as libtorch: no source text
                too_big += 1
                continue
            with open(path, "rb") as f:
                blob = f.read()
        except OSError:
            continue
        scanned += 1
        for k, wanted in probes.items():
            if any(p in blob for p in wanted):
                found[k].append(path)
    if time.monotonic() > deadline:
        complete = False
        break
hidden = {h: len(os.listdir(h)) if os.path.isdir(h) else None for h in sys.argv[1:]}
print(json.dumps({"complete": complete, "scanned": scanned, "too_big": too_big,
    "found": {k: v[:3] for k, v in found.items()}, "hidden": hidden}))
"""


def _search_everywhere(
    runner: Runner, tinylm: Target, dataset: Dataset, tmp_path: Path
) -> dict[str, Any]:
    """Returns what a training phase finds when it reads every file it can: probes of each split."""
    heldout = (dataset.root / tinylm.heldout_data).read_bytes()
    train = (dataset.root / tinylm.train_data[0]).read_bytes()
    step = (len(heldout) - 200) // 8
    probes = {
        "heldout": [heldout[i : i + 200] for i in range(1000, len(heldout) - 200, step)],
        "train": [train[500_000:500_200]],
    }
    assert not [p for p in probes["heldout"] if p in train], "a probe must be held-out text only"
    hexed = {k: [p.hex() for p in v] for k, v in probes.items()}
    phase = script_phase(
        tmp_path,
        f"PROBES = {hexed!r}\n{_SEARCH_EVERYWHERE}",  # as hex: the script holds no probe itself
        argv=("script.py", *dataset.hidden),
        data_files=tuple(dataset.train_files(tinylm)),
        hidden=dataset.hidden,
        timeout=120.0,
    )
    outcome = runner.run(phase, SMALL, LABELS)
    assert outcome.exit_code == 0, outcome.log_tail
    report: dict[str, Any] = json.loads(outcome.stdout_tail.strip().splitlines()[-1])
    assert report["complete"], f"the search ran out of time after {report['scanned']} files"
    assert report["found"]["train"], "the search must find training text (else it proves nothing)"
    return report


@pytest.mark.docker
def test_training_cannot_find_the_heldout_split(
    docker_runner, tinylm: Target, dataset: Dataset, tmp_path: Path
) -> None:
    report = _search_everywhere(docker_runner, tinylm, dataset, tmp_path)
    assert report["found"]["heldout"] == []
    assert dataset.hidden and all(v == 0 for v in report["hidden"].values())


@pytest.mark.docker
def test_an_image_with_its_own_python_hides_its_copy_of_the_heldout_split(
    docker_runner, tinylm: Target, dataset: Dataset, tmp_path: Path
) -> None:
    # python:3.11-slim cannot be pulled here (no registry): the offline image with a copy of
    # the held-out folders where that image keeps its stdlib stands in for sandbox/Dockerfile's
    import docker

    from selfprog.runners.docker import DockerRunner

    client = docker_runner.client
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for folder in dataset.hidden:
            tar.add(folder, arcname=f"usr/local/lib/python3.11/{Path(folder).name}")
    stdlib_labels = {"own-python-test": "/usr/local/lib/python3.11", "no-label-test": ""}
    base = client.containers.create(docker_runner.image.tag, command=["/none"])
    try:
        base.put_archive("/", archive.getvalue())
        for tag, stdlib in stdlib_labels.items():
            base.commit("selfprog-sandbox", tag, changes=[f"LABEL selfprog.stdlib={stdlib}"])
            (tmp_path / tag).mkdir()
        reports = {
            tag: _search_everywhere(
                DockerRunner(f"selfprog-sandbox:{tag}", client), tinylm, dataset, tmp_path / tag
            )
            for tag in stdlib_labels
        }
    finally:
        base.remove()
        for tag in stdlib_labels:
            with contextlib.suppress(docker.errors.ImageNotFound):
                client.images.remove(f"selfprog-sandbox:{tag}")
    assert reports["own-python-test"]["found"]["heldout"] == []
    # the attack the label defends against: without it, the image's own copy is found
    found = reports["no-label-test"]["found"]["heldout"]
    assert found and found[0].startswith("/usr/local/lib/python3.11/")
