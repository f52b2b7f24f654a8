"""The docker runner's failure handling, against a hand-written fake client and a real engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import docker
import pytest
import requests

from selfprog.errors import RunnerError, SelfprogError
from selfprog.runners.docker import DockerRunner, remove_leftovers
from selfprog.runners.image import LABEL_MOUNTS, LABEL_PYTHON
from tests.conftest import SMALL, script_phase


def _api_error(status: int) -> docker.errors.APIError:
    response = requests.Response()
    response.status_code = status
    return docker.errors.APIError(f"status {status}", response=response)


class FakeImage:
    def __init__(self) -> None:
        self.tags = ["selfprog-sandbox:offline"]
        self.id = "sha256:fake"
        self.labels = {LABEL_PYTHON: "/usr/bin/python3", LABEL_MOUNTS: ""}


class FakeApi:
    """Just enough of docker.APIClient: scripted create failures and exit codes."""

    def __init__(self, create_errors: list[Exception], exit_code: int = 0):
        self.create_errors = create_errors
        self.exit_code = exit_code
        self.calls: list[str] = []

    def create_host_config(self, **kwargs: Any) -> dict[str, Any]:
        return kwargs

    def create_container_config(self, **kwargs: Any) -> dict[str, Any]:
        return {"AttachStdin": False, "StdinOnce": False, **kwargs}

    def create_container_from_config(self, config: dict[str, Any]) -> dict[str, str]:
        self.calls.append("create")
        if self.create_errors:
            raise self.create_errors.pop(0)
        return {"Id": "c1"}

    def start(self, container_id: str) -> None:
        self.calls.append("start")

    def wait(self, container_id: str, timeout: float) -> dict[str, int]:
        return {"StatusCode": self.exit_code}

    def inspect_container(self, container_id: str) -> dict[str, Any]:
        return {"State": {"ExitCode": self.exit_code, "OOMKilled": False}}

    def logs(self, container_id: str, **kwargs: Any) -> bytes:
        return b"log line\n"

    def remove_container(self, container_id: str, **kwargs: Any) -> None:
        self.calls.append("remove")

    def containers(self, **kwargs: Any) -> list[dict[str, str]]:
        self.calls.append("containers")
        raise requests.exceptions.ConnectionError("('Connection aborted.', FileNotFoundError(2))")


class FakeClient:
    def __init__(self, api: FakeApi):
        self.api = api
        self.images = self

    def get(self, tag: str) -> FakeImage:
        return FakeImage()


def test_daemon_errors_are_retried(tmp_path: Path) -> None:
    api = FakeApi([_api_error(500), requests.exceptions.ConnectionError("dropped")])
    runner = DockerRunner(client=FakeClient(api))
    outcome = runner.run(script_phase(tmp_path, "pass"), SMALL, {})
    assert outcome.exit_code == 0
    assert api.calls == ["create", "create", "create", "start", "remove"]


def test_gpus_are_requested_by_count_or_by_the_ids_a_scheduler_assigned(tmp_path: Path) -> None:
    import dataclasses

    runner = DockerRunner(client=FakeClient(FakeApi([])))
    phase = script_phase(tmp_path, "print(1)")

    def requests_for(gpus: str | None) -> list[Any]:
        limits = dataclasses.replace(SMALL, gpus=gpus)
        return runner._container_config(phase, limits, {})["host_config"]["device_requests"]

    assert requests_for(None) is None
    assert requests_for("all")[0]["Count"] == -1 and requests_for("2")[0]["Count"] == 2
    pinned = requests_for("device=1,3")[0]  # two candidates on one node never share a GPU
    assert pinned["DeviceIDs"] == ["1", "3"] and not pinned.get("Count")


def test_client_errors_and_candidate_failures_are_not_retried(tmp_path: Path) -> None:
    api = FakeApi([_api_error(400)])
    runner = DockerRunner(client=FakeClient(api))
    with pytest.raises(
        RunnerError, match=r"failed to run the train phase \(APIError: 400 Client Error"
    ):
        runner.run(script_phase(tmp_path, "pass"), SMALL, {})
    assert api.calls == ["create"]
    api = FakeApi([], exit_code=1)
    outcome = DockerRunner(client=FakeClient(api)).run(script_phase(tmp_path, "pass"), SMALL, {})
    assert outcome.exit_code == 1
    assert api.calls == ["create", "start", "remove"]


def test_what_the_engine_raises_is_one_line_before_and_after_a_run(tmp_path: Path) -> None:
    """The SDK's and requests' exceptions never leave the runner: a run refused at its
    preflight, or stopping, says what the engine did in one line."""
    from selfprog.scheduler import make_scheduler
    from tests.test_loop import make_run

    api = FakeApi([_api_error(400)] * 4)
    runner = DockerRunner(client=FakeClient(api))
    with pytest.raises(RunnerError, match=r"failed to remove this run's sandboxes \(Connection"):
        runner.stop_all({"selfprog.run": "r"})
    run = make_run(tmp_path, "runner.kind=docker")
    with pytest.raises(SelfprogError, match=r"the Docker engine failed to run the \w+ phase"):
        make_scheduler(run, runner)  # the held-out check, before any candidate


@pytest.mark.docker
def test_remove_leftovers_finds_containers_by_label(docker_runner) -> None:
    api = docker_runner.client.api
    labels = {"selfprog": "1", "selfprog.run": "leftover-test", "selfprog.candidate": "c7"}
    config = api.create_container_config(
        image=docker_runner.image.tag,
        command=[docker_runner.image.python, "-c", "pass"],
        labels=labels,
    )
    api.create_container_from_config(config)
    assert remove_leftovers(docker_runner.client, {"selfprog.run": "other-run"}) == 0
    assert remove_leftovers(docker_runner.client, {"selfprog.run": "leftover-test"}) == 1
    assert api.containers(all=True, filters={"label": "selfprog.run=leftover-test"}) == []
