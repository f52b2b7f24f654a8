"""Reading a chat-completions reply that an outside server sent: every shape is checked here.

A proxy's HTML error page, a body cut off, JSON of another shape, a stream
where one reply was asked for: each becomes a `GarbledReply` naming what was
wrong, never an exception from deep inside a client library. Servers differ
in what they leave out (`usage`, `model`, `finish_reason`, content as a list
of parts), and what is merely missing is read as empty.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


class GarbledReply(Exception):
    """A 2xx reply that is no chat completion: not JSON, another shape, cut off, too large."""


@dataclass(frozen=True, slots=True)
class Completion:
    """A chat completion as selfprog reads it: each choice's text and finish reason, and usage."""

    choices: tuple[tuple[str, str], ...]  # (text, finish reason) per choice, never empty
    tokens_in: int = 0
    tokens_out: int = 0
    model: str = ""


def read_completion(raw: bytes, content_type: str = "") -> Completion:
    """Returns the completion a reply's body holds, whatever content type it was labelled with.

    Raises:
        GarbledReply: the body is not a chat completion, with a short excerpt of it.
    """
    if "event-stream" in content_type.lower() or raw.lstrip().startswith(b"data:"):
        return _read_stream(raw)
    return _read_object(_json(raw))


def _excerpt(raw: bytes) -> str:
    text = raw[:120].decode("utf-8", "replace")
    return repr(text) + ("..." if len(raw) > 120 else "")


def _json(raw: bytes) -> Any:
    if not raw.strip():
        raise GarbledReply("an empty reply")
    try:  # bytes that are not UTF-8 (a tokenizer that split a character) read as "?"
        return json.loads(raw.decode("utf-8", "replace"))
    except (ValueError, RecursionError):  # not JSON, cut off, or nested past reading
        raise GarbledReply(f"a reply that is not JSON: {_excerpt(raw)}") from None


def _read_object(data: Any) -> Completion:
    if not isinstance(data, dict):
        kinds = {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}
        raise GarbledReply(f"not a chat completion: a JSON {kinds.get(type(data), 'null')}")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise GarbledReply(f"not a chat completion: no choices in {_keys(data)}")
    read = []
    for index, choice in enumerate(choices):
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            raise GarbledReply(f"not a chat completion: choice {index} has no message")
        read.append((_text(message.get("content")), _finish(choice)))
    return Completion(tuple(read), *_usage(data.get("usage")), _model(data))


def _read_stream(raw: bytes) -> Completion:
    """Returns the completion a server-sent event stream assembles, if it ended with [DONE]."""
    texts: dict[int, list[str]] = {}
    finishes: dict[int, str] = {}
    usage: Any = None
    model = ""
    done = False
    for line in raw.decode("utf-8", "replace").split("\n"):  # JSON may hold a raw U+2028
        line = line.rstrip("\r")
        if not line.startswith("data:"):
            continue  # comments, event names, blank separators
        payload = line[5:].strip()
        if payload == "[DONE]":
            done = True
            break
        try:
            chunk = json.loads(payload)
        except (ValueError, RecursionError):
            raise GarbledReply(
                f"a stream with an event that is not JSON: {payload[:80]!r}"
            ) from None
        if not isinstance(chunk, dict):
            raise GarbledReply("a stream with an event that is not an object")
        usage = chunk.get("usage") or usage
        model = model or _model(chunk)
        choices = chunk.get("choices") or []
        if not isinstance(choices, list):
            raise GarbledReply("a stream with choices that are not a list")
        for choice in choices:
            if not isinstance(choice, dict) or not isinstance(choice.get("index", 0), int):
                raise GarbledReply("a stream with a choice of another shape")
            index = choice.get("index", 0)
            delta = choice.get("delta")
            if isinstance(delta, dict):
                texts.setdefault(index, []).append(_text(delta.get("content")))
            finishes[index] = _finish(choice) or finishes.get(index, "")
    if not done:
        raise GarbledReply("a stream cut off before its end ([DONE])")
    if not texts:
        raise GarbledReply("an empty stream")
    choices = tuple(("".join(texts[i]), finishes.get(i, "")) for i in sorted(texts))
    return Completion(choices, *_usage(usage), model)


def _keys(data: dict[str, Any]) -> str:
    keys = sorted(str(k)[:20] for k in data)[:6]
    return "{" + ", ".join(keys) + (", ..." if len(data) > 6 else "") + "}"


def _text(content: Any) -> str:
    """Returns an answer's text: a string, or the text parts of a list; valid UTF-8 either way."""
    if isinstance(content, list):
        content = "".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    if not isinstance(content, str):
        return ""
    return content.encode("utf-8", "replace").decode("utf-8")  # a lone surrogate becomes "?"


def _finish(choice: dict[str, Any]) -> str:
    finish = choice.get("finish_reason")
    return finish[:40] if isinstance(finish, str) else ""


def _model(data: dict[str, Any]) -> str:
    model = data.get("model")
    return model[:200] if isinstance(model, str) else ""


def _usage(usage: Any) -> tuple[int, int]:
    """Returns the prompt and completion tokens a server reported; 0 for none or nonsense."""
    if not isinstance(usage, dict):
        return 0, 0
    return _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))


def _count(value: Any) -> int:
    """Returns a usage count a server sent, or 0 for none, nonsense or a negative number."""
    if isinstance(value, bool):
        return 0
    try:
        return max(0, min(int(value or 0), 2**40))
    except (TypeError, ValueError, OverflowError):
        return 0
