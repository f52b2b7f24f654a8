"""The menu of constrained edits: a parent's settings and each one's nearby values.

Small models write free-form edits badly, so in `constrained` edit mode they
choose from a menu instead: one setting (a number assigned in a module's
settings or a class body, as `mutate` finds them) and one of its nearby
values, with a reason first. One menu serves both ways of constraining the
answer: a local model decodes under the menu's Lark grammar
(`transformers`), a served one answers under its JSON schema
(`response_format`, in `openai`), or by an option's number where the server
does not enforce the schema (selfprog.proposers.numbered). Every way the
answer is checked against the menu before it becomes a SEARCH/REPLACE edit,
so an answer off the menu costs an invalid proposal, never a wrong edit.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from selfprog import untrusted
from selfprog.edits import rationale
from selfprog.proposers.base import Proposal
from selfprog.proposers.mutate import Literal, change, changed_files, neighbours, tunable_literals

REASON_CHARS = 160
CHOOSE_SYSTEM = "You are an expert ML engineer who tunes training programs one setting at a time."
NO_SETTINGS = (
    "constrained edits need a number assigned in the program's settings, with a "
    "nearby value not tried yet; found none"
)


@dataclass(frozen=True)
class Menu:
    """The structured edit space of a parent: its settings and each one's nearby values."""

    settings: list[tuple[Literal, list[int | float], str]]  # (setting, values, its line)

    @classmethod
    def of(
        cls,
        files: Mapping[str, str],
        known: Callable[[Mapping[str, str]], bool] | None = None,
    ) -> Menu:
        """Returns the menu of a program; with known, values whose program exists are left out."""
        settings = []
        for path in sorted(files):
            if not path.endswith(".py"):
                continue
            try:
                found = tunable_literals(path, files[path])
            except SyntaxError:
                continue
            lines = files[path].split("\n")
            named = set()
            for lit in found:
                if lit.name in named:  # a second `dropout` (another class's): one option per name
                    continue
                named.add(lit.name)
                values = [
                    v
                    for v in neighbours(lit.number)
                    if known is None or not known(changed_files(files, [(lit, v)]))
                ]
                if values:
                    settings.append((lit, values, lines[lit.line - 1].strip()))
        return cls(settings)

    @property
    def options(self) -> list[str]:
        """Every choice the menu offers, as an answer names it: `file: name = value`."""
        return [f"{self._key(lit)} {v}" for lit, values, _ in self.settings for v in values]

    def choice(self, answer: str) -> tuple[Literal, int | float] | None:
        """Returns the setting and value an answer names, if it is on the menu.

        The answer is a JSON object whose `choice` is an option, or lines one
        of which is an option.
        """
        _, named = _parts(answer)
        for line in named:
            for lit, values, _ in self.settings:
                key = self._key(lit) + " "
                for value in values:
                    if line.strip() == key + str(value):
                        return lit, value
        return None

    def shuffled(self, rng: random.Random) -> Menu:
        """Returns the menu in an order of its own: a small model leans to what it reads first."""
        settings = [
            (lit, rng.sample(values, len(values)), line) for lit, values, line in self.settings
        ]
        return Menu(rng.sample(settings, len(settings)))

    def without(self, answer: str) -> Menu:
        """Returns the menu less the choice an answer made (the same menu when it was the last)."""
        return self.less(self.choice(answer))

    def less(self, chosen: tuple[Literal, int | float] | None, last: bool = False) -> Menu:
        """Returns the menu less one option (the same menu when it was the last); with last,
        the chosen setting's other values go to the end, after every other setting."""
        settings: list[tuple[Literal, list[int | float], str]] = []
        chosen_setting: list[tuple[Literal, list[int | float], str]] = []
        for lit, values, line in self.settings:
            left = [v for v in values if chosen != (lit, v)]
            if left:
                mine = last and chosen is not None and chosen[0] == lit
                (chosen_setting if mine else settings).append((lit, left, line))
        settings += chosen_setting
        return Menu(settings) if settings else self  # all taken: repeats are better than none

    def listed(self, limit: int) -> list[tuple[Literal, int | float]]:
        """Returns up to limit options in menu order, each setting once before any twice."""
        rounds = max((len(values) for _, values, _ in self.settings), default=0)
        spread = [
            (lit, values[i])
            for i in range(rounds)
            for lit, values, _ in self.settings
            if i < len(values)
        ]
        return spread[:limit]

    @staticmethod
    def _key(lit: Literal) -> str:
        return f"{lit.path}: {lit.name} ="

    def describe(self, as_json: bool = False) -> str:
        """Returns the prompt's list of settings, their current lines and the values to choose from."""
        rows = [
            f"- {self._key(lit)} one of {', '.join(map(str, values))}   (now: {line})"
            for lit, values, line in self.settings
        ]
        if as_json:
            answer = (
                'Answer with one JSON object, the reason first: {"reason": "<what you expect to '
                'help this program and why>", "choice": "<file: name = value>"}, the choice one '
                "setting and one of its values from the list."
            )
        else:
            answer = (
                "First one line `Reason: ` with what you expect to help this program and why, "
                "then one line `file: name = value` with the setting and one of its values "
                "from the list."
            )
        return "# Settings you can change\n" + "\n".join(rows) + "\n\n# Answer\n" + answer

    @property
    def max_tokens(self) -> int:
        """The new tokens an answer may need: a choice and a reason, a token a character at worst."""
        return 24 + REASON_CHARS

    def grammar(self) -> str:
        """Returns the Lark grammar of an answer: a reason, then one listed setting and value."""
        choices = [
            f"{json.dumps(self._key(lit) + ' ')} ({' | '.join(json.dumps(str(v)) for v in values)})"
            for lit, values, _ in self.settings
        ]
        return (
            'start: "Reason: " REASON "\\n" choice "\\n"\n'
            f"choice: {' | '.join(choices)}\n"
            f"REASON: /[^\\r\\n]{{1,{REASON_CHARS}}}/\n"
        )

    def json_schema(self) -> dict[str, Any]:
        """Returns the JSON schema of an answer: a reason, then one of the options."""
        return {
            "type": "object",
            "properties": {
                "reason": {"type": "string", "maxLength": REASON_CHARS},
                "choice": {"type": "string", "enum": self.options},
            },
            "required": ["reason", "choice"],
            "additionalProperties": False,
        }

    def proposal(self, files: Mapping[str, str], answer: Proposal) -> Proposal:
        """Returns the SEARCH/REPLACE proposal an answer chose, or the answer with an error."""
        chosen = self.choice(answer.text)
        if chosen is None:
            named = answer.text.strip().replace("\n", " | ")[:80]
            return dataclasses.replace(
                answer, error=f"the answer names no listed setting and value: {named!r}"
            )
        reason, _ = _parts(answer.text)
        return edit(files, chosen, answer, reason)


def edit(
    files: Mapping[str, str], chosen: tuple[Literal, int | float], answer: Proposal, reason: str
) -> Proposal:
    """Returns an answer as the SEARCH/REPLACE edit of its chosen option, the reason one line."""
    made = change(files, [chosen])
    reason = one_line(reason)  # never an edit block of its own
    why = f"{made.rationale}: {reason}" if reason else made.rationale
    return dataclasses.replace(answer, text=f"{why}\n\n{made.text}", rationale=rationale(why))


def _parts(answer: str) -> tuple[str, list[str]]:
    """Returns an answer's reason and the lines that may name its choice.

    A JSON answer (perhaps in a code fence) gives its `reason` and `choice`;
    any other gives its `Reason:` line and every line.
    """
    text = answer.strip()
    if text.startswith("```"):
        text = text.strip("`").removeprefix("json").strip()
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        parsed = None
    if isinstance(parsed, dict):
        reason, choice = parsed.get("reason"), parsed.get("choice")
        return one_line(reason), [choice] if isinstance(choice, str) else []
    lines = answer.strip().split("\n")
    reason = next((x.strip()[7:] for x in lines if x.strip().startswith("Reason:")), "")
    return one_line(reason), lines


def one_line(reason: Any) -> str:
    """Returns a reason as one short line of valid UTF-8: no line break of any kind can start
    an edit block, no escape or control character reaches a terminal, and a lone surrogate
    (JSON's `\\ud800`) cannot stop the archive storing it."""
    if not isinstance(reason, str):
        return ""
    return untrusted.one_line(reason.encode("utf-8", "replace").decode(), REASON_CHARS)
