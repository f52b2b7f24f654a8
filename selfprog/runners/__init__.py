"""Sandbox backends behind one interface (see base.Runner)."""

from __future__ import annotations

import logging
from pathlib import Path

from selfprog.errors import ConfigError
from selfprog.runners.base import Limits, Phase, PhaseOutcome, Runner

log = logging.getLogger(__name__)

RUNNERS = ("docker", "local")

__all__ = ["RUNNERS", "Limits", "Phase", "PhaseOutcome", "Runner", "make_runner"]


def make_runner(name: str, image: str | None = None, registry: Path | None = None) -> Runner:
    """Returns the runner of that name, connected and ready (registry: where local keeps its pids)."""
    if name == "docker":
        from selfprog.runners.docker import DockerRunner

        return DockerRunner(image) if image else DockerRunner()
    if name == "local":
        from selfprog.runners.local import WARNING, LocalRunner

        log.warning(WARNING)
        return LocalRunner(registry=registry)
    raise ConfigError(f"unknown runner '{name}'; choose one of: {', '.join(RUNNERS)}")
