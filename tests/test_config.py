"""Run configuration: defaults, unknown keys, overrides, freezing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from selfprog.config import Config, default_text, freeze, from_dict, load_config, thaw
from selfprog.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_the_commented_defaults_are_the_defaults() -> None:
    assert from_dict(tomllib.loads(default_text())) == Config()


def test_overrides_are_typed_and_win(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[run]\nworkers = 2\ngenerations = 9\n[runner]\nkind = 'local'\n")
    config = load_config(path, ["run.workers=3", "proposer.model=my-model", "budget.seconds=10"])
    assert config.run.workers == 3 and config.run.generations == 9
    assert config.runner.kind == "local" and config.proposer.model == "my-model"
    assert config.budget.seconds == 10.0 and isinstance(config.budget.seconds, float)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["run.wrokers=2"], "unknown key 'wrokers' in [run]; did you mean 'workers'?"),
        (["runer.kind=local"], "unknown table [runer]; did you mean 'runner'?"),
        (["run.workers=two"], "run.workers must be int, not str"),
        (["run.workers=-1"], "run.workers must be >= 0"),
        (["runner.kind=podman"], "runner.kind must be one of docker, local, ray"),
        (["runner.memory=lots"], "not a size: 'lots'"),
        (["workers=2"], "expected table.key=value"),
    ],
)
def test_bad_values_are_refused_with_a_precise_message(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_a_run_frozen_before_the_final_pick_goes_on_confirming_as_it_goes(tmp_path: Path) -> None:
    import json

    raw = Config().to_json()
    del raw["selection"]["finalists"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert thaw(tmp_path / "config.json").selection.finalists == 0
    assert Config().selection.finalists == 2  # a new run picks at its end


def test_frozen_config_round_trips(tmp_path: Path) -> None:
    config = load_config(None, ["run.seed=4", "proposer.kind=openai"])
    freeze(config, tmp_path / "config.json")
    assert thaw(tmp_path / "config.json") == config


def test_steering_changes_only_what_may_change_mid_run() -> None:
    from selfprog.config import Config, steer

    config = Config()
    steered, changes = steer(config, ["run.generations=6", "runner.memory=8g", "run.workers=0"])
    assert steered.run.generations == 6 and steered.runner.memory == "8g"
    assert changes == [("run.generations", 4, 6), ("runner.memory", "4g", "8g")]  # no-ops dropped
    for key, why in [
        ("budget.steps=3", "another budget would not be comparable"),
        ("run.seed=2", "decides every draw"),
        ('runner.kind="local"', "the sandbox decides what a score means"),
        ('runner.image="x"', "the sandbox decides what a score means"),
        ("selection.noise_seeds=2", "fixed when the run began"),
    ]:
        with pytest.raises(ConfigError, match=f"cannot change in a run under way .*{why}"):
            steer(config, [key])
    with pytest.raises(ConfigError, match="did you mean 'generations'"):
        steer(config, ["run.generatons=6"])
    with pytest.raises(ConfigError, match="must be >= 0"):
        steer(config, ["run.workers=-1"])


def test_not_a_number_is_refused() -> None:
    for key in ("selection.z=nan", "run.max_hours=inf"):
        with pytest.raises(ConfigError, match="must be a finite number"):
            load_config(None, [key])
