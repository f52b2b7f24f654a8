"""Edits: parse an LM's response into edits, apply them to a program, diff and check the result.

Two forms are accepted. SEARCH/REPLACE blocks, the file named on the line
before the block (a fence line in between is fine):

    train.py
    <<<<<<< SEARCH
    learning_rate = 1e-3
    =======
    learning_rate = 2e-3
    >>>>>>> REPLACE

and whole-file replacements, a fenced block whose info string names the file
(```python train.py). Each SEARCH must match exactly once: exactly first,
then ignoring trailing whitespace, then ignoring indentation.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from selfprog.errors import SelfprogError
from selfprog.records import parse_python

SEARCH, DIVIDER, REPLACE = "<<<<<<< SEARCH", "=======", ">>>>>>> REPLACE"
_FENCE = re.compile(r"^\s*(```+|~~~+)\s*(.*)$")
_NAME_CHARS = re.compile(r"[`*'\"#:]+")


class EditError(SelfprogError):
    """A response whose edits cannot be parsed or applied: the candidate is `invalid`."""


@dataclass(frozen=True, slots=True)
class Edit:
    """One change to one file: SEARCH/REPLACE, or a whole new file when search is None."""

    path: str
    search: str | None
    replace: str


def _file_name(line: str, known: Sequence[str]) -> str | None:
    """Returns the program file a line names ('model.py', '`model.py`', 'File: model.py')."""
    words = _NAME_CHARS.sub(" ", line).split()
    for word in reversed(words):
        if word in known or re.fullmatch(r"[\w./-]+\.\w+", word):
            return word
    return None


def parse_edits(text: str, known: Sequence[str]) -> list[Edit]:
    """Returns the edits in an LM response.

    Raises:
        EditError: no edits at all, or a SEARCH block that is not closed or names no file.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    edits: list[Edit] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == SEARCH:
            path = _preceding_name(lines, i, known)
            if path is None:
                raise EditError(f"SEARCH block at line {i + 1} does not name its file")
            search, i = _collect(lines, i + 1, DIVIDER)
            replace, i = _collect(lines, i, REPLACE)
            edits.append(Edit(path, search, replace))
            continue
        fence = _FENCE.match(lines[i])
        if fence and fence.group(2):
            info = fence.group(2).replace(":", " ").replace("=", " ").split()
            named = [w.strip("`'\"") for w in info if w.strip("`'\"") in known]
            body_end = _fence_end(lines, i + 1, fence.group(1))
            body = lines[i + 1 : body_end]
            if named and not any(line.strip() == SEARCH for line in body):
                edits.append(Edit(named[0], None, "\n".join(body) + "\n"))
                i = body_end + 1
                continue
        i += 1
    if not edits:
        raise EditError("no edits found: expected SEARCH/REPLACE blocks or a whole file")
    return edits


def _preceding_name(lines: list[str], index: int, known: Sequence[str]) -> str | None:
    """Returns the file named on the nearest line above a SEARCH block (a bare fence skipped)."""
    for j in range(index - 1, max(-1, index - 4), -1):
        line = lines[j].strip()
        fence = _FENCE.match(line)
        if not line or (fence and not fence.group(2)):
            continue
        return _file_name(fence.group(2) if fence else line, known)
    return None


def _collect(lines: list[str], start: int, end_marker: str) -> tuple[str, int]:
    """Returns the text up to end_marker and the index after it."""
    for j in range(start, len(lines)):
        if lines[j].strip() == end_marker:
            body = lines[start:j]
            return ("\n".join(body) + "\n") if body else "", j + 1
        if lines[j].strip() in (SEARCH, DIVIDER, REPLACE):
            break
    raise EditError(f"block starting at line {start} has no {end_marker!r} line")


def _fence_end(lines: list[str], start: int, fence: str) -> int:
    for j in range(start, len(lines)):
        if lines[j].strip().startswith(fence[:3]) and not lines[j].strip()[3:].strip():
            return j
    return len(lines)


# ---------------------------------------------------------------------------
# applying


def _line_matches(haystack: list[str], needle: list[str], ignore_indent: bool) -> list[int]:
    """Returns where needle's lines occur in haystack, ignoring trailing (or all) whitespace."""
    normalise = str.strip if ignore_indent else str.rstrip
    hay = [normalise(line) for line in haystack]
    want = [normalise(line) for line in needle]
    n = len(want)
    return [i for i in range(len(hay) - n + 1) if hay[i : i + n] == want]


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def apply_edit(source: str, edit: Edit) -> str:
    """Returns source with one SEARCH/REPLACE edit applied.

    Raises:
        EditError: the SEARCH text matches nowhere or more than once.
    """
    assert edit.search is not None
    source = source.replace("\r\n", "\n")
    if not edit.search.strip():
        raise EditError(f"{edit.path}: a SEARCH block is empty")
    count = source.count(edit.search)
    if count == 1:
        return source.replace(edit.search, edit.replace, 1)
    if count > 1:
        raise EditError(f"{edit.path}: SEARCH text matches {count} places; include more lines")
    lines = source.split("\n")
    needle = edit.search.rstrip("\n").split("\n")
    replacement = edit.replace.rstrip("\n").split("\n") if edit.replace else []
    for ignore_indent in (False, True):  # trailing whitespace first, then indentation too
        found = _line_matches(lines, needle, ignore_indent)
        if len(found) > 1:
            raise EditError(
                f"{edit.path}: SEARCH text matches {len(found)} places; include more lines"
            )
        if found:
            start = found[0]
            if ignore_indent:  # re-indent the replacement by the indentation found
                first = next((k for k, line in enumerate(needle) if line.strip()), 0)
                have, want = _indent(needle[first]), _indent(lines[start + first])
                replacement = [
                    want + line[len(have) :] if line.startswith(have) else line
                    for line in replacement
                ]
            return "\n".join(lines[:start] + replacement + lines[start + len(needle) :])
    hint = difflib.get_close_matches(needle[0].strip(), [s.strip() for s in lines], n=1)
    near = f"; nearest line: {hint[0]!r}" if hint else ""
    raise EditError(f"{edit.path}: SEARCH text not found{near}")


def apply_edits(
    files: Mapping[str, str], edits: Sequence[Edit], editable: Sequence[str], fixed: Sequence[str]
) -> dict[str, str]:
    """Returns the program after the edits; every edited Python file must still parse.

    Raises:
        EditError: an edit touches a fixed or unknown file, does not apply, or breaks the syntax.
    """
    result = dict(files)
    for edit in edits:
        if edit.path in fixed:
            raise EditError(f"edits fixed file {edit.path}, which only the target may change")
        if edit.path not in editable:
            raise EditError(f"edits unknown file {edit.path}; editable: {', '.join(editable)}")
        if edit.search is None:
            result[edit.path] = edit.replace
        else:
            result[edit.path] = apply_edit(result[edit.path], edit)
    for path in {e.path for e in edits}:
        if path.endswith(".py"):
            try:
                parse_python(result[path], filename=path)
            except SyntaxError as exc:
                raise EditError(
                    f"{path} does not parse after the edits: {exc.msg} (line {exc.lineno})"
                ) from None
            except (ValueError, RecursionError, MemoryError) as exc:  # nesting the parser refuses
                raise EditError(
                    f"{path} does not parse after the edits: {type(exc).__name__}"
                ) from None
    return result


def unified_diff(before: Mapping[str, str], after: Mapping[str, str]) -> str:
    """Returns the unified diff between two versions of a program, file by file."""
    chunks: list[str] = []
    for path in sorted(set(before) | set(after)):
        a, b = before.get(path, ""), after.get(path, "")
        if a != b:
            chunks += difflib.unified_diff(
                a.splitlines(keepends=True), b.splitlines(keepends=True), f"a/{path}", f"b/{path}"
            )
    return "".join(chunks)


def rationale(text: str, limit: int = 500) -> str:
    """Returns the prose before the first edit of a response: the proposer's reason."""
    head = re.split(r"^\s*(?:```|<<<<<<< SEARCH)", text, maxsplit=1, flags=re.MULTILINE)[0]
    lines = [line for line in head.strip().splitlines() if line.strip()]
    if lines and _file_name(lines[-1], ()) == lines[-1].strip("`*: "):
        lines = lines[:-1]  # the file name line of the first edit
    return " ".join(" ".join(lines).split())[:limit]
