"""Numbered questions: how an answer by number is read, and what a question lists."""

from __future__ import annotations

import pytest

from selfprog.proposers.base import Proposal
from selfprog.proposers.menu import Menu
from selfprog.proposers.numbered import LISTED, Question, number, opening


@pytest.mark.parametrize(
    ("answer", "chosen"),
    [
        ("3", 3),
        ("3.", 3),
        (" 3\n", 3),
        ("Option 3", 3),
        ("Answer: 3", 3),
        ("**3**", 3),
        ("#12", 12),
        ("I choose 3 because the learning rate 0.001 is too high", 3),
        ("3, so 3", 3),
        ("3. n_layer = 4 (now 2)", 3),  # an option's words echoed: 4 and 2 are values
        ("3. model.py: n_layer = 4", 3),
        ("3 because a batch of 64 is steadier", 3),  # 64 is no option: not a second choice
        ("3 (lr 1e-3 -> 5e-4)", 3),
    ],
)
def test_an_answer_by_number_is_read_leniently(answer: str, chosen: int) -> None:
    assert number(answer, 20) == chosen


@pytest.mark.parametrize(
    ("answer", "wrong"),
    [
        ("3 or 5", "names more than one option (3 and 5)"),
        ("1. 1.1.1\n2. 1.1.", "names more than one option (1 and 2)"),  # SmolLM2 writing a list
        ("25", "names 25, not an option from 1 to 20"),
        ("0", "names 0, not an option from 1 to 20"),
        ("9" * 30, "names 999999999999, not an option from 1 to 20"),  # no int() of them
        ("1000000", "names 1000000, not an option from 1 to 20"),
        ("3,000", "gives no option number"),
        ("3-4", "gives no option number"),
        ("x" * 401, "is too long (401 characters) to be one number"),  # and slow to read
        ("The learning rate.", "gives no option number"),
        ("lr = 0.0005", "gives no option number"),
        ("", "is empty"),
    ],
)
def test_an_answer_by_number_is_read_strictly(answer: str, wrong: str) -> None:
    with pytest.raises(ValueError) as raised:
        number(answer, 20)
    assert str(raised.value) == wrong


def test_a_question_lists_each_setting_once_before_any_twice_under_the_prompts_opening() -> None:
    files = {"a.py": "lr = 0.001\nlayers = 2\n", "b.py": "lr = 0.1\nwidth = 64\n"}
    prompt = "Improve it.\n\n# Task\nLower the loss.\n\n# The parent program\nSECRET SOURCE\n"
    question = Question.of(Menu.of(files), prompt)
    example, shown, asked = question.messages
    assert example["role"] == "user" and shown == {"role": "assistant", "content": "2"}
    assert asked["content"].startswith("Improve it.\n\n# Task\nLower the loss.\n\nChanges:\n1. ")
    assert "SECRET" not in asked["content"]  # the source and the history stay out
    rows = [line for line in asked["content"].split("\n") if line[:1].isdigit()]
    assert len(rows) == len(question.options) <= LISTED
    names = [lit.name for lit, _ in question.options]
    assert names[:8] == ["lr", "layers", "lr", "width"] * 2  # a round of settings at a time
    assert rows[0].startswith("1. a.py: lr = ") and rows[1].startswith("2. layers = ")
    assert rows[0].endswith("(now 0.001)")  # the file only where two settings share a name
    assert question.option("4") == question.options[3]


def test_a_second_question_shows_the_answer_and_what_was_wrong() -> None:
    question = Question.of(Menu.of({"a.py": "lr = 0.001\n"}), "Improve it.")
    count = len(question.options)
    wrong = question.wrong(Proposal(text="1 or 2"))
    assert wrong == "names more than one option (1 and 2)"
    again = question.again("1 or 2", wrong)
    assert again.options == question.options and again.messages[:3] == question.messages
    assert again.messages[3] == {"role": "assistant", "content": "1 or 2"}
    assert again.messages[4]["content"] == (
        f"Your answer names more than one option (1 and 2). Answer with the number of one "
        f"change, from 1 to {count}, and nothing else."
    )
    assert question.wrong(Proposal(text="", error="HTTP 400")) == ""  # a refusal: not asked again


def test_the_opening_is_the_text_before_the_second_heading() -> None:
    assert opening("A.\n# Task\nB.\n# Parent\nC.") == "A.\n# Task\nB."
    assert opening("Just this.") == "Just this."
    assert len(opening("x" * 10_000)) == 1500


def test_an_answer_quoting_another_option_than_the_one_it_names_is_refused() -> None:
    files = {"a.py": "lr = 0.001\nlayers = 2\nwidth = 64\n"}
    question = Question.of(Menu.of(files), "Improve it.")
    rows = question.messages[-1]["content"].split("Changes:\n")[1].split("\n\n")[0].split("\n")
    first, second = (row.split(". ", 1)[1].split(" (now")[0] for row in rows[:2])
    assert question.option(f"1. {first} (now x)") == question.options[0]  # its own words: fine
    with pytest.raises(ValueError, match=rf"names option 1 but quotes another change \({second}\)"):
        question.option(f"1. {second}")
    with pytest.raises(ValueError, match=r"quotes another change \(num_layers = 6\)"):
        question.option("1. num_layers = 6 (now 4)")  # the worked example, copied
