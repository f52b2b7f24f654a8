"""A program's settings: what is found, the space inferred or declared, families, and edits."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from selfprog import settings
from selfprog.archive import Archive
from selfprog.edits import apply_edits, parse_edits
from selfprog.errors import TargetError
from selfprog.scaffold import new_target
from selfprog.schema import SCHEMA_VERSION
from selfprog.space import Declared, infer, parse_declared, space_for
from selfprog.target import load_target

PROGRAM = '''"""A training program in a common style: constants at the top, a config class."""
import os
from dataclasses import dataclass

LEARNING_RATE = 3e-4
OPTIMIZER = "adamw"  # or "sgd"
USE_AMP = False
SEED = 1337
out_dir = "out"
warmup = 0
betas = 0.9
layers = 3
width = 64
schedule = 'cosine'
note = """two
lines"""

os.makedirs(out_dir, exist_ok=True)
late = 5  # after the first statement: not a setting


@dataclass
class Config:
    dropout: float = 0.1
    layers: int = 2


def make(name):
    if OPTIMIZER == "sgd":
        return name
    return {"cosine": 1, "linear": 2, "constant": 3}[schedule]
'''


def test_settings_are_every_constant_at_the_top_and_in_class_bodies() -> None:
    found = settings.of_program({"train.py": PROGRAM, "notes.txt": "lr = 1"})
    assert [(s.key, s.value) for s in found] == [
        ("LEARNING_RATE", 3e-4),
        ("OPTIMIZER", "adamw"),
        ("USE_AMP", False),
        ("SEED", 1337),
        ("out_dir", "out"),
        ("warmup", 0),
        ("betas", 0.9),
        ("train.py:layers", 3),  # twice in one file: the first keeps the key, the second is left
        ("width", 64),
        ("schedule", "cosine"),
        ("dropout", 0.1),
    ]
    assert [s.key for s in settings.numbers("train.py", PROGRAM) if s.upper] == []


def test_the_inferred_space_reads_the_program_and_leaves_what_is_no_hyperparameter() -> None:
    files = {"train.py": PROGRAM}
    space = space_for(settings.of_program(files), files, Declared())
    shown = {d.key: d.describe() for d in space}
    assert shown == {
        "LEARNING_RATE": "float 3e-05 .. 0.003, log",
        "OPTIMIZER": 'one of "adamw", "sgd"',  # compared with in the program
        "USE_AMP": "one of False, True",
        "warmup": "int 0 .. 4",
        "betas": "float 0.6 .. 0.975",
        "train.py:layers": "int 1 .. 12, log",
        "width": "one of 16, 32, 64, 128, 256",
        "schedule": 'one of "cosine", "linear", "constant"',  # a dict's keys
        "dropout": "float 0.01 .. 0.95, log",
    }  # SEED and out_dir read as no hyperparameter


def test_a_declared_space_overrides_includes_and_excludes() -> None:
    files = {"train.py": PROGRAM}
    declared, problems = parse_declared(
        {
            "include": ["width"],
            "exclude": ["dropout"],
            "LEARNING_RATE": {"low": 1e-5, "high": 1e-2, "log": True},
            "SEED": {"choices": [1, 2]},
            "dropout": {"low": 0.0, "high": 0.5},
        }
    )
    assert problems == []
    space = space_for(settings.of_program(files), files, declared)
    assert [(d.key, d.describe()) for d in space] == [
        ("LEARNING_RATE", "float 1e-05 .. 0.01, log"),
        ("SEED", "one of 1, 2"),  # declared, so tuned though the name reads as no hyperparameter
        ("width", "one of 16, 32, 64, 128, 256"),
    ]  # with include, nothing else is inferred; excluded beats declared


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ({"lr": {"low": 1, "hihg": 2}}, "[space.lr] unknown key 'hihg'; did you mean 'high'?"),
        ({"lr": {"low": 2, "high": 1}}, "[space.lr] low (2) must be below high (1)"),
        (
            {"lr": {"low": 0.0, "high": 1.0, "log": True}},
            "[space.lr] a log scale needs low above 0",
        ),
        ({"lr": {"choices": [1, "a"]}}, "[space.lr] choices must be all strings, all integers"),
        ({"lr": {"choices": []}}, "[space.lr] choices must be a non-empty list"),
        ({"lr": 3}, "[space] lr must be a table ([space.lr] with low/high or choices)"),
        ({"exclude": "SEED"}, "[space] exclude must be a list of setting names"),
    ],
)
def test_a_declared_space_that_cannot_be_read_says_why(raw: dict, problem: str) -> None:
    _, problems = parse_declared(raw)
    assert len(problems) == 1 and problems[0].startswith(problem)


def test_a_target_declaring_a_setting_its_program_lacks_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "mlp"
    new_target("mlp", folder)
    toml = folder / "target.toml"
    toml.write_text(toml.read_text() + "\n[space.learning_rat]\nlow = 0.001\nhigh = 0.1\n")
    with pytest.raises(TargetError, match="did you mean 'learning_rate'"):
        load_target(folder)
    toml.write_text(toml.read_text().replace("learning_rat]", "learning_rate]"))
    assert load_target(folder).space.dimensions["learning_rate"].describe() == "float 0.001 .. 0.1"


def test_programs_differing_only_in_settings_are_one_family() -> None:
    files = {"train.py": PROGRAM}
    found = {s.key: s for s in settings.of_program(files)}
    tuned = settings.changed_files(
        files, [(found["OPTIMIZER"], "sgd"), (found["width"], 128), (found["USE_AMP"], True)]
    )
    assert settings.family_key(tuned) == settings.family_key(files)
    restructured = {"train.py": PROGRAM.replace("return name", "return name * 2")}
    assert settings.family_key(restructured) != settings.family_key(files)


def test_an_edit_of_settings_applies_as_an_lm_edit_would() -> None:
    files = {"train.py": PROGRAM}
    found = {s.key: s for s in settings.of_program(files)}
    changes = [
        (found["schedule"], "linear"),
        (found["LEARNING_RATE"], 1.23e-4),
        (found["USE_AMP"], True),
        (found["dropout"], 0.25),
    ]
    text, rationale = settings.edit_text(files, changes)
    applied = apply_edits(files, parse_edits(text, ("train.py",)), ("train.py",), ())
    assert applied == settings.changed_files(files, changes)
    values = settings.values(applied)
    assert (values["schedule"], values["LEARNING_RATE"], values["USE_AMP"], values["dropout"]) == (
        "linear",
        1.23e-4,  # the style of 3e-4, three significant digits
        True,
        0.25,
    )
    assert "schedule = 'linear'" in applied["train.py"]  # its own quotes
    assert "train.py: USE_AMP False → True" in rationale


def test_the_archive_keeps_each_programs_family_and_settings(tmp_path: Path) -> None:
    archive = Archive.create(tmp_path / "archive.sqlite", {"run_id": "r"})
    files = {"train.py": PROGRAM}
    found = {s.key: s for s in settings.of_program(files)}
    other = settings.changed_files(files, [(found["width"], 128)])
    with archive.transaction() as db:
        for program, state in ((files, "ok"), (other, "pending"), (other, "duplicate")):
            phash = archive.put_program(db, program)
            archive.add_candidate(db, generation=0, program_hash=phash, state=state)
    family = archive.family_of(archive.candidate(1).program_hash or "")
    history = archive.family_history(family)
    assert [(t.candidate_id, t.state, t.values["width"]) for t in history] == [
        (1, "ok", 64),
        (2, "pending", 128),
    ]  # the duplicate is no trial of its own
    archive.close()


def test_an_older_archive_gains_its_programs_settings_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "archive.sqlite"
    archive = Archive.create(path, {"run_id": "r"})
    with archive.transaction() as db:
        phash = archive.put_program(db, {"train.py": PROGRAM})
        archive.add_candidate(db, generation=0, program_hash=phash, state="ok")
    archive.close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE program_settings")  # as schema 7 wrote it
    db.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    old = Archive(path, readonly=True)
    assert old.version == 7 and old.family_history("any") == []  # a reader: no table, no error
    old.close()
    archive = Archive(path)
    assert archive.version == SCHEMA_VERSION
    history = archive.family_history(archive.family_of(phash))
    assert [t.values["LEARNING_RATE"] for t in history] == [3e-4]
    archive.close()


# ---- what a hostile or odd program does to them (each found by an attack) ---------------


def test_a_huge_or_odd_literal_is_no_setting_and_never_stops_the_archive(tmp_path: Path) -> None:
    source = (
        f"width = 0x{'f' * 4000}\nhuge = 1e308\ntiny = 5e-324\nlong = '{'x' * 500}'\n"
        "lr = 0.1\nwidth2 = 64\nlr = 0.2\nshift = -0.5\n"
    )
    files = {"train.py": source}
    found = {s.key: s.value for s in settings.of_program(files)}
    assert found == {"huge": 1e308, "tiny": 5e-324, "width2": 64, "shift": -0.5}  # lr: set twice
    space = space_for(settings.of_program(files), files, Declared())
    assert [d.key for d in space] == ["width2"]  # no range a float cannot hold; none below zero
    archive = Archive.create(tmp_path / "archive.sqlite", {"run_id": "r"})
    with archive.transaction() as db:  # json.dumps of the 4,800-digit int used to raise here
        phash = archive.put_program(db, files)
    assert archive.family_of(phash)
    archive.close()


def test_two_settings_on_one_line_are_both_set() -> None:
    files = {"train.py": "lr = 0.001; wd = 0.0\nwidth = 64\n"}
    found = {s.key: s for s in settings.of_program(files)}
    changed = settings.changed_files(files, [(found["lr"], 0.000123), (found["wd"], 0.25)])
    assert changed["train.py"] == "lr = 0.000123; wd = 0.25\nwidth = 64\n"


def test_a_fraction_near_one_keeps_its_distance_to_one() -> None:
    beta2 = settings.of_program({"train.py": "beta2 = 0.999\n"})[0]
    dim = infer(beta2, {})
    assert dim is not None and dim.high < 1.0 and settings.rounded(0.99951) == 0.99951
    assert settings.render(settings.rounded(1.2345e-4), "3e-4") == "1.23e-4"
    assert settings.render(3e-4, "1e-3") == "3.0e-4"  # as mutate has always written it


def test_a_declared_range_across_zero_keeps_the_setting_a_setting() -> None:
    files = {"train.py": "shift = 0.5\nwidth = 64\n"}
    found = {s.key: s for s in settings.of_program(files)}
    child = settings.changed_files(files, [(found["shift"], -0.166)])
    assert settings.values(child)["shift"] == -0.166
    assert settings.family_key(child) == settings.family_key(files)


def test_a_family_ignores_layout_and_comments_as_program_keys_do() -> None:
    plain = {"t.py": "lr=0.001\nx = lr*2\n"}
    spaced = {"t.py": "lr = 0.002  # faster\nx = lr * 2\n"}
    assert settings.family_key(plain) == settings.family_key(spaced)


def test_a_program_of_thousands_of_constants_is_searched_by_its_first() -> None:
    source = "".join(f"x{i} = {i}\n" for i in range(5000))
    assert len(settings.in_source("train.py", source)) == settings.MAX_SETTINGS


def test_choices_that_are_not_finite_are_refused() -> None:
    _, problems = parse_declared({"dropout": {"choices": [float("nan"), 0.1]}})
    assert problems == ["[space.dropout] choices must be finite numbers"]
