"""`selfprog export RUN --mlflow`: a run read back through MLflow's own client, re-export, errors."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from selfprog.archive import ARCHIVE_FILE, Archive
from selfprog.edits import unified_diff
from selfprog.scoring import Result
from selfprog.states import State
from selfprog.tracker import changed_settings, settings
from selfprog.untrusted import LINE_CHARS, clean
from tests.test_inspect import assert_error, fingerprint

mlflow = pytest.importorskip("mlflow", reason="MLflow is an extra: pip install 'selfprog[mlflow]'")
# MLflow's database store under SQLAlchemy 2.1, read back in this process: theirs to fix
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

HUGE = "x" * 1_000_000
LOG = f"step 1 \x1b[31mloss\x1b[0m 3.2\r\n<script>alert(1)</script>\n{HUGE}\nTraceback: boom\n"


def selfprog(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "selfprog", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@dataclass
class Built:
    """A small run made through the archive, and its ids by role."""

    root: Path
    ids: dict[str, int]
    files: dict[str, dict[str, str]]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """A seed evaluated three times, a child with two settings changed, a failure with a hostile
    log, an invalid child and one still pending."""
    from selfprog.config import load_config
    from selfprog.rundir import create_run

    run = create_run(
        tmp_path_factory.mktemp("runs") / "small", load_config(None, ["runner.kind=local"])
    )
    archive, target = run.archive, run.target
    seed_files = {name: (target.root / name).read_text() for name in target.editable}
    child_files = dict(seed_files)
    child_files["train.py"] = seed_files["train.py"].replace(
        "learning_rate = 1e-3", "learning_rate = 2e-3"
    )
    child_files["model.py"] = seed_files["model.py"].replace(
        "n_embd: int = 64", "n_embd: int = 128"
    )
    assert child_files != seed_files
    failed_files = dict(seed_files, **{"train.py": seed_files["train.py"] + "\nraise SystemExit\n"})
    with archive.transaction() as db:
        seed = archive.add_candidate(
            db,
            generation=0,
            state="pending",
            program_hash=archive.put_program(db, seed_files),
            rationale="the seed",
        )
        child = archive.add_candidate(
            db,
            generation=1,
            parent_id=seed,
            state="pending",
            program_hash=archive.put_program(db, child_files),
            diff=unified_diff(seed_files, child_files),
            rationale="wider and faster: " + "r" * 20_000,
        )
        failed = archive.add_candidate(
            db,
            generation=1,
            parent_id=seed,
            state="pending",
            program_hash=archive.put_program(db, failed_files),
            diff=unified_diff(seed_files, failed_files),
            rationale="stop early",
        )
        invalid = archive.add_candidate(
            db, generation=1, parent_id=seed, state="invalid", reason="no edits found"
        )
        pending = archive.add_candidate(
            db,
            generation=2,
            parent_id=child,
            state="pending",
            program_hash=archive.put_program(db, child_files),
        )
    archive.finish(
        seed, Result(State.OK, score=3.0, metrics={"val_bpb": 3.0, "params": 1234.0}), seed=0
    )
    archive.add_evaluation(seed, Result(State.OK, score=3.1), seed=1)
    archive.add_evaluation(seed, Result(State.OK, score=2.9), seed=2)
    curve = ((0.25, 3.5), (0.5, 3.0), (1.0, 2.6))
    archive.finish(child, Result(State.OK, score=2.5, metrics={"val_bpb": 2.5}, curve=curve), 0)
    archive.finish(failed, Result(State.TRAIN_FAILED, reason="exit code 1", log_tail=LOG), seed=0)
    archive.close()
    ids = {"seed": seed, "child": child, "failed": failed, "invalid": invalid, "pending": pending}
    return Built(run.root, ids, {"seed": seed_files, "child": child_files})


@dataclass
class Exported:
    """The built run exported once and again, and the tracker read back."""

    uri: str
    first: subprocess.CompletedProcess[str]
    again: subprocess.CompletedProcess[str]
    client: Any
    experiment: str
    runs: dict[str, Any]  # by candidate id, "run" for the parent
    count: int  # MLflow runs in the experiment
    unchanged: bool


@pytest.fixture(scope="module")
def exported(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    uri = f"sqlite:///{tmp_path_factory.mktemp('tracker')}/mlflow.db"
    before = fingerprint(built.root)
    first = selfprog("export", str(built.root), "--mlflow", uri)
    again = selfprog("export", str(built.root), "--mlflow", uri, "--json")
    unchanged = fingerprint(built.root) == before
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("selfprog-tinylm")
    assert experiment is not None, first.stderr
    found = client.search_runs([experiment.experiment_id], max_results=1000)
    runs = {r.data.tags.get("selfprog.candidate", r.data.tags["selfprog.role"]): r for r in found}
    return Exported(
        uri, first, again, client, experiment.experiment_id, runs, len(found), unchanged
    )


def test_export_writes_a_parent_and_a_nested_run_per_finished_candidate(
    built: Built, exported: Exported
) -> None:
    assert exported.first.returncode == 0, exported.first.stderr
    assert exported.first.stdout.strip() == (
        f"exported 4 candidates of {built.root} to {exported.uri} (experiment selfprog-tinylm): "
        "4 new, 0 already there; 1 still pending or running, left for the next export"
    )
    assert exported.first.stderr == ""  # no MLflow chatter, no warnings
    ids = built.ids
    assert set(exported.runs) == {"run", *(str(ids[k]) for k in ids if k != "pending")}
    parent = exported.runs["run"]
    assert parent.data.tags["selfprog.target"] == "tinylm"
    assert parent.data.tags["selfprog.metric"] == "val_bpb"
    assert parent.data.tags["selfprog.direction"] == "minimize"
    assert parent.data.tags["selfprog.run_path"] == str(built.root.resolve())
    assert parent.data.params["runner.kind"] == "local"
    assert parent.data.params["selection.noise_seeds"] == "3"
    assert parent.data.metrics["best_score"] == pytest.approx(2.5)
    assert parent.data.metrics["seed_score"] == pytest.approx(3.0)
    assert parent.info.status == "RUNNING"  # a candidate is still pending
    for key in ("seed", "child", "failed", "invalid"):
        nested = exported.runs[str(ids[key])]
        assert nested.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert nested.data.params["candidate"] == str(ids[key])
    assert {
        k: exported.runs[str(ids[k])].info.status for k in ("seed", "child", "failed", "invalid")
    } == {"seed": "FINISHED", "child": "FINISHED", "failed": "FAILED", "invalid": "FAILED"}


def test_params_and_every_evaluation_match_the_archive(built: Built, exported: Exported) -> None:
    ids, runs, client = built.ids, exported.runs, exported.client
    child = runs[str(ids["child"])]
    assert child.data.params["parent"] == str(ids["seed"])
    assert child.data.params["generation"] == "1"
    assert child.data.params["state"] == "ok"
    changed = {k: v for k, v in child.data.params.items() if k.startswith("changed/")}
    assert changed == {
        "changed/train.py/learning_rate": "0.001 -> 0.002",
        "changed/model.py/n_embd": "64 -> 128",
    }
    assert child.data.tags["selfprog.rationale"].startswith("wider and faster: rrr")
    assert len(child.data.tags["selfprog.rationale"]) <= 5000
    seed = runs[str(ids["seed"])]
    assert seed.data.params["parent"] == "none"
    history = client.get_metric_history(seed.info.run_id, "score")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (0, 3.0),
        (1, 3.1),
        (2, 2.9),
    ]
    curve = client.get_metric_history(child.info.run_id, "train_loss")  # step: ‰ of the budget
    assert sorted((m.step, m.value) for m in curve) == [(250, 3.5), (500, 3.0), (1000, 2.6)]
    assert seed.data.metrics["mean_score"] == pytest.approx(3.0)
    assert seed.data.metrics["params"] == 1234.0
    archive = Archive(built.root / ARCHIVE_FILE, readonly=True)
    try:
        created, finished = archive.db.execute(
            "SELECT created, finished FROM candidates WHERE id = ?", (ids["child"],)
        ).fetchone()
    finally:
        archive.close()
    assert (child.info.start_time, child.info.end_time) == (
        int(created * 1000),
        int(finished * 1000),
    )


def artifact(exported: Exported, candidate: int, path: str) -> str:
    run_id = exported.runs[str(candidate)].info.run_id
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=path, tracking_uri=exported.uri
    )
    return Path(local).read_text()


def test_artifacts_hold_the_diff_the_source_and_a_cleaned_log(
    built: Built, exported: Exported
) -> None:
    ids = built.ids
    child_id = exported.runs[str(ids["child"])].info.run_id
    listed = {f.path for f in exported.client.list_artifacts(child_id)}
    assert listed == {"diff.patch", "source"}
    assert {f.path for f in exported.client.list_artifacts(child_id, "source")} == {
        f"source/{name}" for name in built.files["child"]
    }
    assert artifact(exported, ids["child"], "diff.patch") == unified_diff(
        built.files["seed"], built.files["child"]
    )
    assert artifact(exported, ids["child"], "source/train.py") == built.files["child"]["train.py"]

    log = artifact(exported, ids["failed"], "log_tail.txt")
    assert "\x1b" not in log and "\r" not in log
    assert "step 1 loss 3.2\n<script>alert(1)</script>\n" in log  # stored as text, as it was
    assert max(len(line) for line in log.splitlines()) < LINE_CHARS + 50
    assert f"{len(HUGE) - LINE_CHARS} more characters]" in log
    assert log.endswith("Traceback: boom")
    assert exported.runs[str(ids["failed"])].data.tags["selfprog.reason"] == "exit code 1"


def test_export_again_adds_nothing_and_the_run_is_unchanged(exported: Exported) -> None:
    import json

    assert exported.again.returncode == 0, exported.again.stderr
    assert json.loads(exported.again.stdout) == {
        "uri": exported.uri,
        "experiment": "selfprog-tinylm",
        "new": 0,
        "already": 4,
        "unfinished": 1,
        "caught_up": 0,
        "failed": 0,
        "candidates": 4,
    }
    assert exported.count == 5  # the parent and four candidates, each once
    assert exported.unchanged


def test_a_candidate_that_finished_since_is_added_on_the_next_export(
    built: Built, exported: Exported, tmp_path: Path
) -> None:
    import shutil

    later = tmp_path / "later"
    shutil.copytree(built.root, later)
    archive = Archive(later / ARCHIVE_FILE)
    # the evaluator's result line is candidate code's to shape: names MLflow refuses, a huge int
    hostile = {"a//b": 1, "../x": 2, "": 3, "loss/": 4, "params": 10**400, "val_bpb": 2.4}
    archive.finish(built.ids["pending"], Result(State.OK, score=2.4, metrics=hostile), seed=0)
    archive.add_evaluation(
        built.ids["child"], Result(State.OK, score=2.7), seed=1
    )  # confirmed since
    archive.close()
    halfway = exported.client.create_run(  # what an export stopped halfway leaves behind
        exported.experiment,
        tags={
            "selfprog.run_id": exported.runs["run"].data.tags["selfprog.run_id"],
            "selfprog.candidate": str(built.ids["pending"]),
        },
    )
    done = selfprog("export", str(later), "--mlflow", exported.uri, "--json")
    assert done.returncode == 0, done.stderr
    assert '"new": 1, "already": 4, "unfinished": 0, "caught_up": 1, "failed": 0' in done.stdout
    found = exported.client.search_runs(
        [exported.experiment], f"tags.`selfprog.candidate` = '{built.ids['pending']}'"
    )
    assert [r.info.status for r in found] == ["FINISHED"]
    assert set(found[0].data.metrics) == {
        "a/b",
        "x",
        "unnamed",
        "loss",
        "val_bpb",
        "score",
        "mean_score",
    }  # each name made acceptable; the int beyond a double left out
    child = exported.runs[str(built.ids["child"])].info.run_id
    history = exported.client.get_metric_history(child, "score")
    assert sorted((m.step, m.value) for m in history) == [(0, 2.5), (1, 2.7)]
    assert exported.client.get_run(child).data.metrics["mean_score"] == pytest.approx(2.6)
    assert found[0].info.run_id != halfway.info.run_id
    parent = exported.client.get_run(exported.runs["run"].info.run_id)
    assert parent.data.metrics["best_score"] == pytest.approx(2.4)
    assert parent.info.status == "FINISHED"


def test_log_cleaning_and_settings_diff() -> None:
    assert clean("a\x1b[1;32mb\x1b[0m\x1b]0;title\x07c\rd\x00e") == "abc\nde"
    assert clean("y" * 10, width=4) == "yyyy… [6 more characters]"
    before = settings({"t.py": "lr = 1e-3\nsteps = 10\n", "notes.txt": "lr = 5"})
    after = settings({"t.py": "lr = 1e-3\nsteps = 20\nwarmup = 5\n"})
    assert changed_settings(before, after) == {"t.py/steps": "10 -> 20", "t.py/warmup": "- -> 5"}
    assert changed_settings(before, settings({"t.py": "lr = 1e-3\nsteps = 10.0\n"})) == {
        "t.py/steps": "10 -> 10.0"
    }


def without_mlflow(*args: str) -> list[str]:
    code = (
        "import sys; sys.modules['mlflow'] = None; from selfprog.cli import main; "
        f"sys.exit(main({list(args)!r}))"
    )
    return ["-c", code]


def junk(folder: Path) -> str:
    """Returns the URI of a database file that is no database."""
    (folder / "junk.db").write_text("not a database, " * 10)
    return f"sqlite:///{folder}/junk.db"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (lambda run, tmp: [run, "3", "--mlflow"], "export --mlflow takes the run folder alone"),
        (lambda run, tmp: [run, "3", str(tmp / "d"), "--mlflow", "sqlite:///x.db"], "alone"),
        (lambda run, tmp: [run, "3"], "export needs a candidate ID and a DEST folder"),
        (lambda run, tmp: [str(tmp), "--mlflow"], "not a selfprog run"),
        (lambda run, tmp: [run, "--mlflow", "nosuch://x"], "MLflow cannot use nosuch://x"),
        (lambda run, tmp: [run, "--mlflow", junk(tmp)], "file is not a database"),
    ],
)
def test_errors_are_one_line(
    built: Built, tmp_path: Path, args: Callable[[str, Path], list[str]], expected: str
) -> None:
    before = fingerprint(built.root)
    assert_error(selfprog("export", *args(str(built.root), tmp_path)), expected)
    assert fingerprint(built.root) == before


def test_without_mlflow_the_error_says_how_to_install_it(built: Built, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, *without_mlflow("export", str(built.root), "--mlflow")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert_error(done, "export --mlflow needs MLflow: pip install 'selfprog[mlflow]'")
    assert not (tmp_path / "mlflow.db").exists()
