"""Shared fixtures: the tinylm target, its prepared data, and both runners."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from selfprog.data import Dataset, prepare_data
from selfprog.errors import RunnerError
from selfprog.runners.base import Limits, Phase
from selfprog.runners.local import LocalRunner
from selfprog.target import Target, export_target, load_target

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.fixture(scope="session")
def tinylm() -> Target:
    return load_target("tinylm")


@pytest.fixture(scope="session")
def dataset(tinylm: Target, tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return prepare_data(tinylm, tmp_path_factory.mktemp("data-cache"))


@pytest.fixture(scope="session")
def docker_runner():  # type: ignore[no-untyped-def]
    from selfprog.runners.docker import DockerRunner

    try:
        return DockerRunner()
    except RunnerError as exc:
        if os.environ.get("SELFPROG_REQUIRE_DOCKER"):
            raise
        pytest.skip(f"no Docker engine: {exc}")


@pytest.fixture(scope="session")
def local_runner() -> LocalRunner:
    return LocalRunner()


@pytest.fixture(params=["docker", "local"])
def runner(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    return request.getfixturevalue(f"{request.param}_runner")


@pytest.fixture
def seed_program(tmp_path: Path) -> Path:
    dest = tmp_path / "seed"
    export_target("tinylm", dest)
    return dest


def script_phase(tmp_path: Path, source: str, **overrides: object) -> Phase:
    """Returns a train-like phase that runs one Python script of our own."""
    program = tmp_path / "program"
    program.mkdir(exist_ok=True)
    (program / "script.py").write_text(source)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    out.chmod(0o777)
    fields: dict[str, object] = {
        "name": "train",
        "argv": ("script.py",),
        "program_dir": program,
        "out_dir": out,
        "out_writable": True,
        "timeout": 60.0,
    }
    fields.update(overrides)
    return Phase(**fields)  # type: ignore[arg-type]


SMALL = Limits(memory_bytes=1024 * 2**20, cpus=1.0, log_bytes=4096, output_bytes=64 * 2**20)
