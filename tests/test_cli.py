"""The command line: help on every verb, one-line errors, and a real eval through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from selfprog.cli import build_parser, parse_size

VERBS = [
    [],
    ["eval"],
    ["run"],
    ["resume"],
    ["status"],
    ["config"],
    ["target"],
    ["target", "export"],
    ["image"],
    ["image", "build"],
]


def selfprog(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "selfprog", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=600,
    )


@pytest.mark.parametrize("verb", VERBS, ids=lambda v: " ".join(v) or "selfprog")
def test_every_verb_has_help(verb: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([*verb, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: selfprog")
    assert len(text.splitlines()) > 3


def assert_one_line_error(done: subprocess.CompletedProcess[str], expected: str) -> None:
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("selfprog: error:")]
    assert len(errors) == 1, done.stderr
    assert expected in errors[0]


def test_malformed_target_toml(tmp_path: Path) -> None:
    assert selfprog("target", "export", "tinylm", str(tmp_path / "t")).returncode == 0
    toml = tmp_path / "t" / "target.toml"
    toml.write_text(toml.read_text().replace("[metric]", "[metric]\nnmae = 'x'"))
    done = selfprog(
        "eval", str(tmp_path / "t"), "--target", str(tmp_path / "t"), "--runner", "local"
    )
    assert_one_line_error(done, "unknown key 'nmae' in [metric]; did you mean 'name'?")
    toml.write_text("name = [unclosed\n")
    done = selfprog("eval", "--target", str(tmp_path / "t"), "--runner", "local")
    assert_one_line_error(done, "not valid TOML")


def test_missing_program_folder(tmp_path: Path) -> None:
    done = selfprog("eval", str(tmp_path / "nope"), "--runner", "local")
    assert_one_line_error(done, f"{tmp_path / 'nope'}: no such program folder")


def test_unreachable_docker_engine(tmp_path: Path) -> None:
    done = selfprog("eval", "--runner", "docker", env={"DOCKER_HOST": f"unix://{tmp_path}/no.sock"})
    assert_one_line_error(done, "cannot reach the Docker engine")
    assert "--runner local" in done.stderr


def test_export_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    done = selfprog("target", "export", "tinylm", str(tmp_path))
    assert_one_line_error(done, "folder exists and is not empty")
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.docker
@pytest.mark.slow
def test_eval_the_exported_seed_in_docker(docker_runner, tmp_path: Path) -> None:
    assert selfprog("target", "export", "tinylm", str(tmp_path / "seed")).returncode == 0
    done = selfprog("eval", str(tmp_path / "seed"), "--budget-seconds", "10", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["state"] == "ok"
    assert 1.0 < result["score"] < 8.0
    assert set(result) >= {"state", "score", "metrics", "reason", "log_tail", "timings"}


def test_parse_size() -> None:
    assert parse_size("512m") == 512 * 2**20
    assert parse_size("4GiB") == 4 * 2**30
    assert parse_size("1048576") == 2**20


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--set", f"runner.cpus={(os.cpu_count() or 1) + 62}"], "CPUs asked for"),
        (["--proposer", "openai"], "needs proposer.base_url"),
        (["--set", "proposer.timeout=0"], "proposer.timeout must be above 0"),
    ],
    ids=["too-many-cpus", "openai-without-url", "no-timeout"],
)
def test_bad_run_input_is_one_line_and_leaves_nothing(
    flags: list[str], expected: str, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    done = selfprog("run", "--run-dir", str(run_dir), "--runner", "local", *flags)
    assert_one_line_error(done, expected)
    assert not run_dir.exists()


def test_a_gpu_count_given_with_set_is_a_count(tmp_path: Path) -> None:
    from selfprog.config import load_config

    assert load_config(None, ["runner.gpus=1"]).runner.gpus == "1"


def test_eval_holds_a_step_budget_to_the_seeds_time(tmp_path: Path) -> None:
    """A program that ignores a step budget and trains on is stopped as a run would stop it."""
    target = tmp_path / "mytask"
    assert selfprog("target", "new", "mytask", "--dir", str(target)).returncode == 0
    toml = target / "target.toml"
    toml.write_text(toml.read_text().replace("allowance = 20 ", "allowance = 2 "))
    greedy = tmp_path / "greedy"
    greedy.mkdir()
    train = (target / "train.py").read_text()
    for honest, ignoring in [
        ('int(os.environ.get("SELFPROG_BUDGET_STEPS", "0"))', "0"),
        ('float(os.environ.get("SELFPROG_BUDGET_SECONDS", "10"))', "25.0"),
    ]:
        assert honest in train
        train = train.replace(honest, ignoring)
    (greedy / "train.py").write_text(train)
    done = selfprog(
        "eval", str(greedy), "--target", str(target), "--runner", "local", "--budget-steps", "5"
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert "scoring the seed first" in done.stderr
    assert "state    over_budget" in done.stdout
    assert "the step budget's ceiling, from the seed's training time" in done.stdout


def test_eval_holds_the_evaluation_to_the_seeds_time(tmp_path: Path) -> None:
    """Candidate code the evaluator runs could go on training there: eval holds it as a run does,
    under a seconds budget too (the seed's evaluation measured with one step)."""
    from tests.test_cheats import AROUND

    program = tmp_path / "slow"
    assert selfprog("target", "export", "tinylm", str(program)).returncode == 0
    model = program / "model.py"
    slow_once = (
        "\n\nclass _Slow(_Around):\n    slept = False\n\n    def forward(self, idx):\n"
        "        if not self.training and not _Slow.slept:\n"
        "            _Slow.slept = True\n            __import__('time').sleep(25)\n"
        "        return self.inner(idx)\n\n\ndef build_model(config):\n"
        "    return _Slow(_honest_build(config))\n"
    )
    model.write_text(model.read_text() + AROUND + slow_once)
    done = selfprog("eval", str(program), "--runner", "local", "--budget-seconds", "2")
    assert done.returncode == 3, done.stdout + done.stderr
    assert "scoring the seed first" in done.stderr
    assert "state    over_budget" in done.stdout
    assert "evaluation time is not training time" in done.stdout
