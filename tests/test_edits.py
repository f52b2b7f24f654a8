"""Parsing and applying edits: golden cases, near misses and junk."""

from __future__ import annotations

import pytest

from selfprog.edits import Edit, EditError, apply_edits, parse_edits, rationale, unified_diff

FILES = ("model.py", "train.py", "prepare.py", "evaluate.py")
EDITABLE, FIXED = ("model.py", "train.py"), ("prepare.py", "evaluate.py")
TRAIN = (
    "import torch\n\nbatch_size = 16\nlearning_rate = 1e-3\n\n\ndef step():\n\tx = 1\n\treturn x\n"
)
PROGRAM = {"model.py": "n_layer = 2\n", "train.py": TRAIN}


def block(path: str, search: str, replace: str) -> str:
    return f"{path}\n<<<<<<< SEARCH\n{search}=======\n{replace}>>>>>>> REPLACE\n"


def test_search_replace_golden() -> None:
    text = "Raise the learning rate.\n\n" + block(
        "train.py", "learning_rate = 1e-3\n", "learning_rate = 2e-3\n"
    )
    edits = parse_edits(text, FILES)
    assert edits == [Edit("train.py", "learning_rate = 1e-3\n", "learning_rate = 2e-3\n")]
    after = apply_edits(PROGRAM, edits, EDITABLE, FIXED)
    assert after["train.py"] == TRAIN.replace("1e-3", "2e-3")
    assert after["model.py"] == PROGRAM["model.py"]
    assert rationale(text) == "Raise the learning rate."
    assert unified_diff(PROGRAM, after) == (
        "--- a/train.py\n+++ b/train.py\n@@ -1,7 +1,7 @@\n import torch\n \n batch_size = 16\n"
        "-learning_rate = 1e-3\n+learning_rate = 2e-3\n \n \n def step():\n"
    )


def test_file_named_in_fence_or_prose() -> None:
    fenced = "```python\n# File: `model.py`\n<<<<<<< SEARCH\nn_layer = 2\n=======\nn_layer = 4\n>>>>>>> REPLACE\n```\n"
    assert parse_edits(fenced, FILES)[0].path == "model.py"
    prose = (
        "Here is the change to **train.py**:\n"
        + block("", "batch_size = 16\n", "batch_size = 32\n")[1:]
    )
    assert parse_edits(prose, FILES)[0].path == "train.py"


def test_whole_file_replacement() -> None:
    text = "A deeper model.\n```python model.py\nn_layer = 6\n```\n"
    edits = parse_edits(text, FILES)
    assert edits == [Edit("model.py", None, "n_layer = 6\n")]
    assert apply_edits(PROGRAM, edits, EDITABLE, FIXED)["model.py"] == "n_layer = 6\n"


def test_a_plain_code_block_is_not_an_edit() -> None:
    with pytest.raises(EditError, match="no edits found"):
        parse_edits("Try this:\n```python\nprint('hi')\n```\n", FILES)


def test_near_miss_trailing_whitespace_and_crlf() -> None:
    text = block(
        "train.py",
        "batch_size = 16   \nlearning_rate = 1e-3\n",
        "batch_size = 8\nlearning_rate = 1e-3\n",
    )
    after = apply_edits(PROGRAM, parse_edits(text.replace("\n", "\r\n"), FILES), EDITABLE, FIXED)
    assert "batch_size = 8\nlearning_rate = 1e-3\n" in after["train.py"]


def test_near_miss_indentation_is_reindented() -> None:
    # the file indents with a tab; the LM wrote four spaces
    text = block("train.py", "    x = 1\n    return x\n", "    x = 2\n    return x\n")
    after = apply_edits(PROGRAM, parse_edits(text, FILES), EDITABLE, FIXED)
    assert "\tx = 2\n\treturn x\n" in after["train.py"]


def test_search_that_matches_twice() -> None:
    program = {"train.py": "a = 1\nb = 2\na = 1\n", "model.py": ""}
    with pytest.raises(EditError, match="matches 2 places"):
        apply_edits(
            program, parse_edits(block("train.py", "a = 1\n", "a = 3\n"), FILES), EDITABLE, FIXED
        )


def test_search_not_found_names_the_nearest_line() -> None:
    text = block("train.py", "learning_rate = 3e-4\n", "learning_rate = 1e-4\n")
    with pytest.raises(
        EditError, match=r"train.py: SEARCH text not found; nearest line: 'learning_rate = 1e-3'"
    ):
        apply_edits(PROGRAM, parse_edits(text, FILES), EDITABLE, FIXED)


def test_edit_to_a_fixed_file() -> None:
    text = block("evaluate.py", "EVAL = 1\n", "EVAL = 2\n")
    with pytest.raises(EditError, match=r"edits fixed file evaluate.py"):
        apply_edits(PROGRAM, parse_edits(text, FILES), EDITABLE, FIXED)


def test_edit_to_an_unknown_file() -> None:
    text = block("other.py", "x = 1\n", "x = 2\n")
    with pytest.raises(EditError, match=r"edits unknown file other.py"):
        apply_edits(PROGRAM, parse_edits(text, FILES), EDITABLE, FIXED)


def test_edit_that_breaks_the_syntax() -> None:
    text = block("train.py", "batch_size = 16\n", "batch_size = (16\n")
    with pytest.raises(EditError, match=r"train.py does not parse after the edits: .* \(line 3\)"):
        apply_edits(PROGRAM, parse_edits(text, FILES), EDITABLE, FIXED)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no edits found"),
        ("I would increase the learning rate.", "no edits found"),
        ("\x00\x01 junk <<<<<<< SEARCH junk", "no edits found"),
        ("<<<<<<< SEARCH\nx = 1\n=======\nx = 2\n>>>>>>> REPLACE\n", "does not name its file"),
        ("train.py\n<<<<<<< SEARCH\nx = 1\n>>>>>>> REPLACE\n", "has no '======='"),
        ("train.py\n<<<<<<< SEARCH\nx = 1\n=======\nx = 2\n", "has no '>>>>>>> REPLACE'"),
    ],
)
def test_junk_and_broken_blocks(text: str, message: str) -> None:
    with pytest.raises(EditError, match=message):
        parse_edits(text, FILES)


def test_several_blocks_apply_in_order() -> None:
    text = block("train.py", "batch_size = 16\n", "batch_size = 32\n") + block(
        "train.py",
        "batch_size = 32\nlearning_rate = 1e-3\n",
        "batch_size = 32\nlearning_rate = 5e-4\n",
    )
    after = apply_edits(PROGRAM, parse_edits(text, FILES), EDITABLE, FIXED)
    assert "batch_size = 32\nlearning_rate = 5e-4\n" in after["train.py"]
