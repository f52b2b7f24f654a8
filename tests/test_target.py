"""Loading and exporting targets."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfprog.errors import TargetError
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
        (('"train.py"]', '"train.py", "gone.py"]'), "listed file gone.py is not in"),
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
