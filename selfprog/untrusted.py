"""Candidate output and LM text made safe to show: no escapes, no control characters, no giant lines.

A candidate's log and a proposer's answer are hostile: an ANSI escape can
clear a terminal or rewrite what it shows, a bidi override can reorder text,
and a megabyte line can stall a panel, a page or a tracker. Everything that
shows such text (prompts, the live panel, the dashboard, the log, an export)
passes it through here first.
"""

from __future__ import annotations

import re
import unicodedata

# CSI (colours, cursor moves), OSC (titles, links) ended on its line, and the two-byte escapes;
# an OSC left open loses only its ESC: what follows it is shown, not swallowed to the end
ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b\n]*(?:\x07|\x1b\\)|[@-Z\\-_])")
LINE_CHARS = 2000  # a line longer than this is cut, and says how much was cut


def printable(line: str) -> str:
    """Returns line without control and format characters (ESC, NUL, bidi overrides); tabs stay."""
    return "".join(ch for ch in line if ch == "\t" or unicodedata.category(ch) not in ("Cc", "Cf"))


def clean(text: str | None, width: int = LINE_CHARS, lines: int = 0) -> str:
    """Returns text without escapes or control characters, each line cut at width, and
    only its last `lines` lines when lines is set (saying how many were left out)."""
    rows = ANSI.sub("", text or "").splitlines()
    dropped = len(rows) - lines if lines and len(rows) > lines else 0
    kept = [f"[{dropped} earlier lines not shown]"] if dropped else []
    for row in rows[dropped:]:
        row = printable(row).rstrip()
        if len(row) > width:
            row = f"{row[:width]}… [{len(row) - width} more characters]"
        kept.append(row)
    return "\n".join(kept)


def one_line(text: str, width: int = 60) -> str:
    """Returns text cleaned and flattened to one line of at most width characters."""
    head = text[: width * 20]  # a megabyte of text is not flattened to show sixty characters
    spaced = " ".join(ANSI.sub("", head).split())  # line breaks are spaces, not removed
    flat = " ".join(printable(spaced).split())
    cut = len(flat) > width or len(head) < len(text)
    return flat[: width - 1] + "…" if cut else flat


_RAISED = re.compile(r"[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b")


def failure_line(log_tail: str, width: int = 200) -> str:
    """Returns the line of a failed phase's log that says why: the exception it raised (a
    Python traceback's last line), where stdout printed after it, else its last line."""
    lines = [line.strip() for line in log_tail.strip().splitlines() if line.strip()]
    raised = next((line for line in reversed(lines) if _RAISED.match(line)), None)
    return one_line(raised or (lines[-1] if lines else ""), width)
