"""Hostile candidates against both runners: what the sandbox must contain."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from selfprog.data import Dataset
from selfprog.runners.base import Limits
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


@pytest.mark.docker
def test_training_cannot_find_the_heldout_split(
    docker_runner, tinylm: Target, dataset: Dataset, tmp_path: Path
) -> None:
    heldout = (dataset.root / tinylm.heldout_data).read_bytes()
    train = (dataset.root / tinylm.train_data[0]).read_bytes()
    probes = {"heldout": heldout[50_000:50_200], "train": train[500_000:500_200]}
    (tmp_path / "probes.json").write_text(
        json.dumps({k: v.decode("latin-1") for k, v in probes.items()})
    )
    stdlib = os.path.dirname(os.__file__)
    # search every readable file where code lives: the data, the program, the scratch and the stdlib
    source = (
        "import json, os, sys\n"
        "raw = json.loads(open('/program/probes.json').read())\n"
        "probes = {k: v.encode('latin-1') for k, v in raw.items()}\n"
        "found = {k: [] for k in probes}\n"
        f"roots = ['/data', '/program', '/tmp', '/out', '/etc', {stdlib!r}]\n"
        "for root in roots:\n"
        "    for folder, dirs, files in os.walk(root):\n"
        "        dirs[:] = [d for d in dirs if d != 'site-packages']\n"
        "        for name in files:\n"
        "            try:\n"
        "                blob = open(os.path.join(folder, name), 'rb').read()\n"
        "            except OSError:\n"
        "                continue\n"
        "            for k, p in probes.items():\n"
        "                if p in blob:\n"
        "                    found[k].append(os.path.join(folder, name))\n"
        "hidden = {h: os.listdir(h) if os.path.isdir(h) else None for h in sys.argv[1:]}\n"
        "print(json.dumps({'found': found, 'hidden': hidden}))\n"
    )
    phase = script_phase(
        tmp_path,
        source,
        argv=("script.py", *dataset.hidden),
        data_files=tuple(dataset.train_files(tinylm)),
        hidden=dataset.hidden,
    )
    (phase.program_dir / "probes.json").write_text((tmp_path / "probes.json").read_text())
    outcome = docker_runner.run(phase, SMALL, LABELS)
    assert outcome.exit_code == 0, outcome.log_tail
    report = json.loads(outcome.stdout_tail.strip().splitlines()[-1])
    assert report["found"]["train"], "the search must find training text (else it proves nothing)"
    assert report["found"]["heldout"] == []
    assert dataset.hidden and all(v == [] for v in report["hidden"].values())
