"""Numbered questions: the menu for a served model whose server does not enforce its schema.

A server that ignores `response_format` (`transformers serve`) lets a small
model answer as it likes, and SmolLM2-135M given the whole prompt and asked
for JSON continues the prompt's text instead of answering. Asked a short
question after one worked example, it answers with a number. So once the
`openai` proposer sees that the schema is not enforced, it asks this way:
the prompt's opening (the task and the metric, not the parent's source or
the history), a numbered list of at most `LISTED` options of the menu (each
setting once before any twice), and the request for one number, after an
example exchange. The answer is read leniently but strictly (`number`); one
that does not read is shown to the model with what was wrong, once, before
it is recorded invalid. The option read becomes the same edit a JSON answer
makes, so nothing but a listed option can reach the program.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass

from selfprog.proposers.base import Proposal
from selfprog.proposers.menu import Menu, edit, one_line
from selfprog.proposers.mutate import Literal

LISTED = 20  # options in one question: a prompt a small model answers rather than continues
ANSWER_TOKENS = 16  # a number, or a few words around one
TRIES = 2  # the question, then once more with what was wrong
OPENING_CHARS = 1500  # of the prompt's opening

ASK = "Answer with the number of one change only."
EXAMPLE_TASK = "You are improving a training program. Choose ONE setting to change."
EXAMPLE_CHANGES = (
    "1. warmup_ratio = 0.05 (now 0.1)",
    "2. num_layers = 6 (now 4)",
    "3. grad_accum = 2 (now 1)",
)
EXAMPLE_ANSWER = "2"

# `name = value` and `(now value)`: an option's words echoed, whose numbers are values
_VALUE = re.compile(r"[A-Za-z_][\w.]*\s*=\s*[-+]?[\w.]+|\(now [^)]*\)")
# a whole number standing alone: not in a decimal, an exponent, a name, 3,000 or a range 3-4
_WHOLE = re.compile(r"(?<![\w.+\-,])\d+(?![\w]|[.,-]\d)")
# `name = value` as an option gives it: a quote of another option than the one named is refused
_QUOTE = re.compile(r"([A-Za-z_][\w.]*)\s*=\s*([-+]?[\w.]+)")
MAX_ANSWER_CHARS = 400  # a number and a few words; longer is no answer (and slow to read)


def opening(prompt: str) -> str:
    """Returns a prompt's opening: its text before the second heading (choose.md: the task)."""
    headings = [m.start() for m in re.finditer(r"^# ", prompt, re.MULTILINE)]
    end = headings[1] if len(headings) > 1 else len(prompt)
    return prompt[:end].strip()[:OPENING_CHARS]


def number(answer: str, count: int) -> int:
    """Returns the option number an answer gives, from 1 to count.

    The answer may say more ("Option 3.", "I choose 3 because ..."), and may
    echo an option's words (`n_layer = 4`, whose 4 is a value), but it must
    name exactly one number in range, however often.

    Raises:
        ValueError: what is wrong with the answer, as a clause ("gives no option number").
    """
    if not answer.strip():
        raise ValueError("is empty")
    if len(answer) > MAX_ANSWER_CHARS:
        raise ValueError(f"is too long ({len(answer)} characters) to be one number")
    found = _WHOLE.findall(_VALUE.sub(" ", answer))
    named = list(dict.fromkeys(n for n in map(_whole, found) if 1 <= n <= count))
    if len(named) == 1:
        return named[0]
    if named:
        listed = ", ".join(map(str, named[:-1])) + f" and {named[-1]}"
        raise ValueError(f"names more than one option ({listed})")
    if found:
        raise ValueError(f"names {found[0][:12]}, not an option from 1 to {count}")
    raise ValueError("gives no option number")


def _whole(digits: str) -> int:
    return int(digits) if len(digits) < 7 else 0  # any digits: full-width and Arabic-Indic ones too


@dataclass(frozen=True)
class Question:
    """A numbered list of options and the messages that ask for one (after the system's)."""

    options: list[tuple[Literal, int | float]]
    messages: list[dict[str, str]]
    max_tokens: int = ANSWER_TOKENS

    @classmethod
    def of(cls, menu: Menu, prompt: str) -> Question:
        """Returns the question for a menu's first options, with a prompt's opening as the task."""
        options = menu.listed(LISTED)
        files = {(lit.name, lit.path) for lit, _ in options}
        twice = {name for name, _ in files if sum(n == name for n, _ in files) > 1}
        rows = [  # the file only where two settings share a name
            f"{i}. {lit.path + ': ' if lit.name in twice else ''}"
            f"{lit.name} = {value} (now {lit.value})"
            for i, (lit, value) in enumerate(options, 1)
        ]
        return cls(
            options,
            [
                {"role": "user", "content": _asking(EXAMPLE_TASK, EXAMPLE_CHANGES)},
                {"role": "assistant", "content": EXAMPLE_ANSWER},
                {"role": "user", "content": _asking(opening(prompt), rows)},
            ],
        )

    def again(self, answer: str, wrong: str) -> Question:
        """Returns the question asked once more, after the answer and what was wrong with it."""
        retry = (
            f"Your answer {wrong}. Answer with the number of one change, from 1 to "
            f"{len(self.options)}, and nothing else."
        )
        said = {"role": "assistant", "content": answer[:400]}
        return dataclasses.replace(
            self, messages=[*self.messages, said, {"role": "user", "content": retry}]
        )

    def option(self, answer: str) -> tuple[Literal, int | float]:
        """Returns the option an answer names.

        Raises:
            ValueError: what is wrong with the answer, as a clause.
        """
        chosen = number(answer, len(self.options))
        lit, value = self.options[chosen - 1]
        for name, quoted in _QUOTE.findall(answer):  # an echo of the list's words must be its own
            if (name, quoted) != (lit.name, str(value)):
                raise ValueError(
                    f"names option {chosen} but quotes another change ({name} = {quoted})"
                )
        return lit, value

    def wrong(self, answer: Proposal) -> str:
        """Returns what is wrong with an answer, or "" when it reads (or failed: not asked again)."""
        if answer.error:
            return ""
        try:
            self.option(answer.text)
        except ValueError as exc:
            return str(exc)
        return ""

    def proposal(self, files: Mapping[str, str], answers: list[Proposal]) -> Proposal:
        """Returns the edit the last answer chose, or its error, with every answer's cost."""
        last = answers[-1]
        spent = dataclasses.replace(
            last,
            tokens_in=sum(a.tokens_in for a in answers),
            tokens_out=sum(a.tokens_out for a in answers),
            latency=sum(a.latency for a in answers),
        )
        if last.error:
            return spent
        try:
            chosen = self.option(last.text)
        except ValueError as exc:
            said = one_line(last.text)[:80]
            return dataclasses.replace(spent, error=f"the answer {exc}: {said!r}")
        return edit(files, chosen, spent, _after_number(last.text, self.options.index(chosen) + 1))


def _asking(task: str, rows: list[str] | tuple[str, ...]) -> str:
    # no headings: after `# Answer` SmolLM2 writes a list of its own (5 of 12 answers), not a number
    return f"{task}\n\nChanges:\n" + "\n".join(rows) + f"\n\n{ASK}"


def _after_number(answer: str, chosen: int) -> str:
    """Returns what an answer says after its number ("because ..."), as its reason."""
    for found in _WHOLE.finditer(answer):
        if _whole(found.group()) == chosen:
            return answer[found.end() :].lstrip(" .:)*-")
    return ""
