"""Targets: loading, exporting, the scaffold, the checks, and the refusal of unsafe ones."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from selfprog.errors import TargetError
from selfprog.scaffold import new_target
from selfprog.target import export_target, load_target


def test_bundled_tinylm() -> None:
    target = load_target("tinylm")
    assert target.editable == ("model.py", "train.py")
    assert target.fixed == ("prepare.py", "evaluate.py")
    assert (target.metric, target.direction) == ("val_bpb", "minimize")
    assert target.budget.seconds == 30 and target.budget.steps == 0
    assert target.better(2.9, 3.0) and not target.better(3.1, 3.0)


def _exported(tmp_path: Path) -> Path:
    export_target("tinylm", tmp_path / "t")
    return tmp_path / "t"


def test_export_round_trips(tmp_path: Path) -> None:
    folder = _exported(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == [
        "evaluate.py",
        "model.py",
        "prepare.py",
        "target.toml",
        "train.py",
    ]
    assert load_target(folder).files == load_target("tinylm").files


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("[budget]", "[budget]\ntimeuot = 3"),
            "unknown key 'timeuot' in [budget]; did you mean 'timeout'?",
        ),
        (
            ('fixed = ["prepare.py"', 'fixed = ["model.py", "prepare.py"'),
            "model.py cannot be both editable and fixed",
        ),
        (
            ('direction = "minimize"', 'direction = "down"'),
            "direction must be 'minimize' or 'maximize'",
        ),
        (('"train.py"]', '"train.py", "gone.py"]'), "listed file 'gone.py' is not in"),
        (("seconds = 30 ", "seconds = -1 "), "[budget] seconds must be a number >= 0"),
        (("[data]", "[dtaa]"), "unknown key 'dtaa' at the top level; did you mean 'data'?"),
    ],
)
def test_malformed_target_toml(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    folder = _exported(tmp_path)
    toml = folder / "target.toml"
    text = toml.read_text()
    assert edit[0] in text
    toml.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(TargetError) as err:
        load_target(folder)
    assert message in str(err.value)


def test_not_a_target_folder(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="not a target folder"):
        load_target(tmp_path)


# -- bring your own program: the scaffold, the checks, the refusals ----------------

README = Path(__file__).resolve().parents[1] / "README.md"


def selfprog(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return subprocess.run(
        [sys.executable, "-m", "selfprog", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=900,
    )


def one_line_error(done: subprocess.CompletedProcess[str], expected: str) -> None:
    """The command failed with exit code 2 and one error line (progress lines aside)."""
    lines = [
        line
        for line in done.stderr.strip().splitlines()
        if not re.match(r"\d\d:\d\d:\d\d INFO ", line)
    ]
    assert done.returncode == 2, done.stdout + done.stderr
    assert len(lines) == 1 and lines[0].startswith("selfprog: error:"), done.stderr
    assert expected in lines[0], done.stderr


def scaffold(tmp_path: Path, name: str = "mytask") -> Path:
    new_target(name, tmp_path / name)
    return tmp_path / name


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


# each unsafe target: how it is made from the scaffold, and what the refusal says
UNSAFE = {
    "heldout in training": (
        ("target.toml", 'train = ["train.bin"]', 'train = ["train.bin", "heldout.bin"]'),
        "the held-out file heldout.bin is in [data] train",
    ),
    "heldout in training by another name": (
        ("target.toml", 'train = ["train.bin"]', 'train = ["train.bin", "./heldout.bin"]'),
        "the held-out file heldout.bin is in [data] train ('./heldout.bin')",
    ),
    "the data folder shared": (
        ("target.toml", 'train = ["train.bin"]', 'train = ["train.bin"]\nshared = ["./"]'),
        "the held-out file heldout.bin is in [data] shared ('./')",
    ),
    "data outside the data folder": (
        ("target.toml", 'train = ["train.bin"]', 'train = ["train.bin"]\nshared = [".."]'),
        "[data] shared '..' must be a name inside the data folder",
    ),
    "two data files by one name": (
        ("target.toml", 'train = ["train.bin"]', 'train = ["a/meta.pkl"]\nshared = ["b/meta.pkl"]'),
        "[data] shared 'b/meta.pkl' and [data] train 'a/meta.pkl' would both appear as meta.pkl",
    ),
    "editable evaluator": (
        (
            "target.toml",
            'editable = ["train.py"]                 # the proposer may rewrite these\n'
            'fixed = ["prepare.py", "evaluate.py"]',
            'editable = ["train.py", "evaluate.py"]\nfixed = ["prepare.py"]',
        ),
        "evaluate.py (evaluate) is editable: a candidate could rewrite it to score itself",
    ),
    "editable prepare": (
        (
            "target.toml",
            'editable = ["train.py"]                 # the proposer may rewrite these\n'
            'fixed = ["prepare.py", "evaluate.py"]',
            'editable = ["train.py", "prepare.py"]\nfixed = ["evaluate.py"]',
        ),
        "prepare.py (prepare) is editable",
    ),
    "an editable file given to the evaluator": (
        ("target.toml", 'evaluate = ["evaluate.py"]', 'evaluate = ["evaluate.py", "train.py"]'),
        "[commands] evaluate names train.py, which is editable",
    ),
    "unstaged script": (
        ("target.toml", 'train = ["train.py"] ', 'train = ["helper.py"] '),
        "[commands] train runs 'helper.py', which is not in [files]",
    ),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_targets_are_refused_with_the_fix(tmp_path: Path, case: str) -> None:
    (name, old, new), expected = UNSAFE[case]
    folder = scaffold(tmp_path)
    (folder / "helper.py").write_text("print('helper')\n")
    edit(folder / name, old, new)
    with pytest.raises(TargetError, match=re.escape(expected)):
        load_target(folder)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    folder = scaffold(tmp_path)
    edit(folder / "target.toml", 'direction = "minimize"', 'direction = "down"\nunits = "mse"')
    edit(folder / "target.toml", "seconds = 10 ", "seconds = -1 ")
    with pytest.raises(TargetError) as err:
        load_target(folder)
    message = str(err.value)
    assert "3 problems:" in message and "\n" not in message
    for part in ("unknown key 'units' in [metric]", "direction must be", "[budget] seconds"):
        assert part in message


def test_a_name_that_is_not_bundled_lists_the_bundled_ones(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="the bundled targets are tinylm, selftune, gpulm"):
        load_target("tinylmm")


def test_run_eval_and_check_refuse_an_unsafe_target_before_anything_runs(tmp_path: Path) -> None:
    folder = scaffold(tmp_path)
    edit(folder / "target.toml", 'train = ["train.bin"]', 'train = ["train.bin", "heldout.bin"]')
    expected = "the held-out file heldout.bin is in [data] train"
    run_dir = tmp_path / "run"
    one_line_error(selfprog("run", "--target", str(folder), "--run-dir", str(run_dir)), expected)
    assert not run_dir.exists()
    one_line_error(
        selfprog("eval", str(folder), "--target", str(folder), "--runner", "local"), expected
    )
    one_line_error(selfprog("target", "check", str(folder), "--runner", "local"), expected)


@pytest.mark.parametrize(
    ("write", "expected"),
    [
        ('(out / "train.bin").write_bytes(heldout)', "data train.bin is the held-out file's copy"),
        ('(out / "train.bin").symlink_to("heldout.bin")', "data train.bin is a link"),
    ],
)
def test_data_that_shows_the_held_out_file_is_refused(
    tmp_path: Path, write: str, expected: str
) -> None:
    folder = scaffold(tmp_path)
    edit(folder / "prepare.py", '(out / "train.bin").write_bytes(train)', write)
    done = selfprog("target", "check", str(folder), "--runner", "local")
    assert done.returncode == 3 and "fail  prepare: " in done.stdout and expected in done.stdout
    run_dir = tmp_path / "run"
    done = selfprog("run", "--target", str(folder), "--run-dir", str(run_dir), "--runner", "local")
    one_line_error(done, expected)
    assert not run_dir.exists()


def test_eval_scores_a_folder_against_its_own_target_when_asked(tmp_path: Path) -> None:
    folder = scaffold(tmp_path)
    cache = tmp_path / "cache"
    # its prepare would run here unsandboxed, and its evaluator would grade it: asked for by name
    one_line_error(selfprog("eval", str(folder), "--runner", "local"), f"--target {folder}")
    done = selfprog(
        "eval", str(folder), "--target", str(folder), "--runner", "local", "--budget-steps",
        "30", "--json", "--data-cache", str(cache),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["state"] == "ok" and set(result["metrics"]) >= {"val_mse", "params"}
    # a result line without the nonce: the reason says what is wrong with it
    edit(folder / "evaluate.py", 'print(f"{RESULT_MARKER} {nonce} ', 'print(f"{RESULT_MARKER} ')
    done = selfprog(
        "eval", str(folder), "--target", str(folder), "--runner", "local", "--budget-steps",
        "30", "--json", "--data-cache", str(cache),
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "without this evaluation's nonce" in json.loads(done.stdout)["reason"]


def test_check_warns_of_unlisted_scripts_and_an_evaluator_reaching_candidate_code(
    tmp_path: Path,
) -> None:
    folder = scaffold(tmp_path)
    (folder / "helper.py").write_text("x = 1\n")
    edit(
        folder / "evaluate.py",
        "    import numpy as np\n",
        "    import numpy as np\n    sys.path.insert(0, '.')\n",
    )
    done = selfprog("target", "check", str(folder), "--runner", "local", "--budget-steps", "20")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "warn  helper.py is in the folder but in no [files] list: it is never staged" in lines
    assert 'ok    space: activation = "relu": one of "relu", "tanh", "gelu", "silu"' in lines
    assert "ok    space: learning_rate = 0.01: float 0.001 .. 0.1, log" in lines
    assert any(line.startswith("ok    seed: trained 20 steps and scored val_mse") for line in lines)
    assert any(line.startswith("warn  held-out split: not checked") for line in lines)
    assert "warn  evaluate.py reaches the program folder (sys.path): candidate code must run" in (
        done.stdout
    )


def test_prompts_speak_of_the_target_not_of_tinylm(tmp_path: Path) -> None:
    from selfprog.prompt import build_prompt
    from selfprog.records import Candidate

    folder = scaffold(tmp_path)
    target = load_target(folder)
    seed = Candidate(
        1, 0, None, None, None, "ok", 0.5, {}, "", "", {}, "the seed", "", None, 0, 1, None
    )
    files = {name: (folder / name).read_text() for name in target.editable}
    for template in ("propose.md", "choose.md"):
        text = build_prompt(target, seed, files, "10 s", [], [], 6000, template)
        assert "You are improving a small PyTorch MLP that regresses" in text
        assert "language model" not in text and "block_size" not in text
    text = build_prompt(target, seed, files, "10 s", [], [], 6000, "propose.md")
    assert "- train.py must leave model.pt" in text and "torch and numpy only" in text
    tinylm = load_target("tinylm")
    own = {name: (tinylm.root / name).read_text() for name in tinylm.editable}
    lm = build_prompt(tinylm, seed, own, "30 s", [], [], 6000, "propose.md")
    assert "small language model" in lm and "`block_size`" in lm  # tinylm's own rules, from it
    assert "train.py\n<<<<<<< SEARCH\nlearning_rate" in lm  # the example names the right file


def test_map_elites_needs_the_targets_descriptors(tmp_path: Path) -> None:
    folder = scaffold(tmp_path)
    edit(folder / "target.toml", 'descriptors = ["params"]', "")
    done = selfprog(
        "run", "--target", str(folder), "--run-dir", str(tmp_path / "run"),
        "--set", "selection.policy=map-elites", "--runner", "local",
    )  # fmt: skip
    one_line_error(done, "declares none: add `descriptors = [...]`")
    assert load_target("tinylm").descriptors == ("params", "context")


def docker_or_skip() -> None:
    from selfprog.errors import RunnerError
    from selfprog.runners.docker import DockerRunner

    try:
        DockerRunner()
    except RunnerError as exc:
        if os.environ.get("SELFPROG_REQUIRE_DOCKER"):
            raise
        pytest.skip(f"no Docker engine: {exc}")


@pytest.mark.docker
def test_the_readme_example_makes_checks_and_runs_a_target(tmp_path: Path) -> None:
    """The README's lines as they are: target new, target check, a short run; children `ok`."""
    docker_or_skip()
    text = README.read_text()
    block = text[text.index("<!-- target-example") :]
    block = block[block.index("```bash\n") + 8 : block.index("```", block.index("```bash") + 7)]
    commands = [line.split("#")[0].split() for line in block.strip().splitlines()]
    assert [c[:2] for c in commands] == [["selfprog", "target"]] * 2 + [["selfprog", "run"]]
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    for command in commands:
        done = selfprog(*command[1:], cwd=tmp_path, env=env)
        assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"
        if command[1] == "target" and command[2] == "check":
            assert (
                "ok    held-out split: prepare.py run in the sandbox wrote other data"
                in done.stdout
            )
    from selfprog.archive import ARCHIVE_FILE, Archive

    runs = list((tmp_path / "runs").iterdir())
    archive = Archive(runs[0] / ARCHIVE_FILE, readonly=True)
    children = archive.in_generation(1)
    assert len(children) == 2 and archive.seed() is not None and archive.seed().state == "ok"
    trained = ("ok", "pruned")  # pruned: trained, and clearly worse than the seed's curve
    assert any(c.state in trained for c in children), children
    assert all(c.state in (*trained, "duplicate") for c in children), [
        (c.state, c.reason) for c in children
    ]


@pytest.mark.docker
def test_a_held_out_split_the_sandbox_can_rebuild_is_refused(tmp_path: Path) -> None:
    """The attack: prepare.py is staged into the sandbox and draws held-out rows from a fixed
    seed, so a candidate can run it and train on them. check, run and eval refuse it."""
    docker_or_skip()
    folder = scaffold(tmp_path)
    edit(folder / "prepare.py", "rng = np.random.default_rng()", "rng = np.random.default_rng(0)")
    # and it writes beside itself: the rebuild runs in a writable copy, so this hides nothing
    edit(
        folder / "prepare.py",
        "    out = Path(sys.argv[1])\n",
        "    out = Path(sys.argv[1])\n    Path('prepare.log').write_text('x')\n",
    )
    # and it writes into the folder it is given without making it (the host's exists already)
    edit(folder / "prepare.py", "    out.mkdir(parents=True, exist_ok=True)\n", "")
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = selfprog("target", "check", str(folder), env=env)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "fail  held-out split: the sandbox can rebuild it" in done.stdout
    expected = "held-out split: the sandbox can rebuild it"
    run_dir = tmp_path / "run"
    done = selfprog("run", "--target", str(folder), "--run-dir", str(run_dir), env=env)
    one_line_error(done, expected)
    assert not run_dir.exists()
    one_line_error(selfprog("eval", str(folder), "--target", str(folder), env=env), expected)


def test_a_rebuild_verdict_holds_for_one_image_not_its_tag(tinylm, dataset) -> None:  # type: ignore[no-untyped-def]
    from selfprog.runners.image import SandboxImage
    from selfprog.targetcheck import verdict_key

    def runner(image_id: str) -> object:
        image = SandboxImage(
            tag="selfprog-sandbox:offline", python="python3", mounts=(), id=image_id
        )
        return type("Runner", (), {"name": "docker", "image": image})()

    assert verdict_key(tinylm, dataset, runner("sha256:aa")) == verdict_key(
        tinylm, dataset, runner("sha256:aa")
    )
    assert verdict_key(tinylm, dataset, runner("sha256:aa")) != verdict_key(
        tinylm, dataset, runner("sha256:bb")
    )
