"""Hand-written fakes: an OpenAI-compatible chat server on loopback."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """One scripted answer: a status, headers and a body, after an optional delay."""

    status: int = 200
    body: Any = None  # a dict is sent as JSON, a str or bytes as is
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    cut: int | None = None  # send only this many bytes of the body, then hang up
    drip: float = 0.0  # seconds between the body's bytes, sent one at a time


def chat(*contents: str, prompt_tokens: int = 100, completion_tokens: int = 50) -> Reply:
    """Returns a successful chat-completions reply with one choice per content."""
    return Reply(
        body={
            "id": "chatcmpl-fake",
            "model": "fake-model",
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c},
                    "finish_reason": "stop",
                }
                for i, c in enumerate(contents)
            ],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
        }
    )


class FakeOpenAI:
    """Answers POST /v1/chat/completions from a script, and records every request."""

    def __init__(self, script: list[Reply], then: Reply | None = None):
        self.script = list(script)
        self.then = then or Reply(500, "script exhausted")  # every answer after the script
        self.requests: list[dict[str, Any]] = []
        self.times: list[float] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                fake.requests.append(
                    {
                        "path": self.path,
                        "auth": self.headers.get("Authorization"),
                        "body": json.loads(self.rfile.read(length)),
                    }
                )
                fake.times.append(time.monotonic())
                reply = fake.script.pop(0) if fake.script else fake.then
                time.sleep(reply.delay)
                if isinstance(reply.body, bytes):
                    data = reply.body  # as is, even bytes that are not UTF-8
                elif isinstance(reply.body, dict | list):
                    data = json.dumps(reply.body).encode()
                else:
                    data = str(reply.body).encode()
                try:
                    self.send_response(reply.status)
                    headers = dict(reply.headers)
                    if isinstance(reply.body, dict | list):
                        headers.setdefault("Content-Type", "application/json")
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if reply.drip:
                        for i in range(len(data[: reply.cut])):
                            self.wfile.write(data[i : i + 1])
                            self.wfile.flush()
                            time.sleep(reply.drip)
                    else:
                        self.wfile.write(data[: reply.cut])
                    self.close_connection = reply.cut is not None
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @contextmanager
    def running(self) -> Iterator[FakeOpenAI]:
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()


class FakeScheduler:
    """Scores every job at once with a scripted function; can fail like a lost cluster."""

    def __init__(
        self,
        score: Any,
        slots: int = 1,
        outage_after: int | None = None,
        hold: frozenset[int] = frozenset(),
        hold_for: int = 0,
        hold_polls: int = 0,
    ):
        self.score = score  # job -> Result
        self.slots = slots
        self.hold = hold  # candidates whose jobs end only after hold_for other jobs ended
        self.hold_for = hold_for
        self.hold_polls = hold_polls  # or until this many looks went by (a slow candidate)
        self.polls = 0
        self.outage_after = outage_after  # raise Outage once this many jobs have ended
        self.queue: list[Any] = []
        self.ended = 0
        self.cancelled = 0

    def submit(self, job: Any) -> None:
        self.queue.append(job)

    def wait(self, timeout: float) -> list[Any]:
        from selfprog.errors import Outage
        from selfprog.scheduler import Outcome

        if self.outage_after is not None and self.ended >= self.outage_after:
            raise Outage("lost the fake cluster")
        if not self.queue:
            return []
        self.polls += 1
        free = [j for j in self.queue if j.candidate_id not in self.hold]
        patience = not self.hold_polls or self.polls < self.hold_polls
        if not free and self.ended < self.hold_for and patience:
            time.sleep(0.01)
            return []  # a slow candidate: still running
        job = (free or self.queue)[0]
        self.queue.remove(job)
        self.ended += 1
        return [Outcome(job, self.score(job), "fake-node")]

    def cancel(self) -> None:
        self.cancelled += 1

    def stop_all(self, labels: Any) -> int:
        return 0

    def close(self) -> None:
        pass
