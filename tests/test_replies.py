"""Malformed replies from an OpenAI-compatible server, through the real `openai` client: each is
an answer recorded with its reason, never an exception; a server that only answers garbage
stops a run in one line (exit 2), and resume goes on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from selfprog.errors import Outage
from selfprog.proposers.base import ProposalRequest
from selfprog.proposers.openai import GARBLED_TRIES, MAX_REPLY_BYTES, OpenAIProposer
from selfprog.proposers.reply import GarbledReply, read_completion
from tests.fakes import FakeOpenAI, Reply, chat

JSON = {"Content-Type": "application/json"}
STREAM = {"Content-Type": "text/event-stream"}
EDIT = "Raise it.\n\ntrain.py\n<<<<<<< SEARCH\nx = 1\n=======\nx = 2\n>>>>>>> REPLACE\n"
GOOD = json.dumps(chat(EDIT).body)


def proposer(url: str, attempts: int = 6) -> OpenAIProposer:
    return OpenAIProposer(
        base_url=url, model="m", timeout=5.0, attempts=attempts, backoff_initial=0.01
    )


def ask(proposer: OpenAIProposer, k: int = 1) -> list:  # type: ignore[type-arg]
    return proposer.propose(ProposalRequest(1, {"train.py": "x = 1\n"}, "improve it", 1), k)


def event(data: object) -> str:
    return f"data: {json.dumps(data)}\n\n"


def delta(text: str, finish: str | None = None) -> str:
    return event({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]})


MALFORMED = {
    "an HTML page labelled JSON": (
        Reply(200, "<html><body>502 Bad Gateway</body></html>", JSON),
        "a reply that is not JSON: '<html>",
    ),
    "an HTML page": (Reply(200, "<html>oops</html>", {"Content-Type": "text/html"}), "not JSON"),
    "plain text": (Reply(200, "upstream timed out", {"Content-Type": "text/plain"}), "not JSON"),
    "JSON cut short": (Reply(200, GOOD[:40], JSON), "not JSON"),
    "a body cut off by a hang-up": (Reply(200, GOOD, JSON, cut=30), "cut off"),
    "an empty body": (Reply(200, "", JSON), "an empty reply"),
    "bytes that are not UTF-8": (Reply(200, b'{"choices": "\xff\xfe"}', JSON), "no choices"),
    "JSON nested past reading": (Reply(200, "[" * 100_000, JSON), "not JSON"),
    "a JSON list": (Reply(200, [1, 2]), "not a chat completion: a JSON list"),
    "JSON null": (Reply(200, "null", JSON), "not a chat completion: a JSON null"),
    "an object of another kind": (Reply(200, {"status": "ok"}), "no choices in {status}"),
    "no choices": (Reply(200, {"id": "x", "choices": []}), "no choices in {choices, id}"),
    "choices not a list": (Reply(200, {"choices": "abc"}), "no choices"),
    "a choice with no message": (Reply(200, {"choices": [{"index": 0}]}), "has no message"),
    "a message that is a string": (
        Reply(200, {"choices": [{"index": 0, "message": "hi"}]}),
        "has no message",
    ),
    "a stream cut off": (Reply(200, delta("Raise"), STREAM), "a stream cut off"),
    "an empty stream": (Reply(200, "data: [DONE]\n\n", STREAM), "an empty stream"),
    "a stream of garbage": (Reply(200, "data: {oops\n\n", STREAM), "an event that is not JSON"),
    "a body larger than any answer": (
        Reply(200, b"x" * (MAX_REPLY_BYTES + 1), JSON),
        "a reply of over 8 MiB",
    ),
    "a gzip body that is not gzip": (
        Reply(200, b"not gzip", {**JSON, "Content-Encoding": "gzip"}),
        "cut off or unreadable (DecodingError",
    ),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_a_malformed_reply_is_asked_again_then_recorded_with_its_reason(name: str) -> None:
    reply, reason = MALFORMED[name]
    with FakeOpenAI([], then=reply).running() as fake:
        proposals = ask(proposer(fake.url), 2)
    assert len(fake.requests) == GARBLED_TRIES  # retried, then given up as an answer
    assert [p.text for p in proposals] == ["", ""]
    for p in proposals:
        assert p.error.startswith(f"PermanentHTTPError: no usable reply, asked {GARBLED_TRIES}")
        assert reason in p.error, p.error


def test_a_reply_dripped_a_byte_at_a_time_is_given_up_at_the_timeout() -> None:
    """Each byte comes within the read timeout; the whole body never does."""
    drip = Reply(200, GOOD, JSON, drip=0.2)
    with FakeOpenAI([], then=drip).running() as fake:
        lm = OpenAIProposer(base_url=fake.url, model="m", timeout=1.0, backoff_initial=0.01)
        [p] = ask(lm)
    assert "a reply still arriving after 1s" in p.error and len(fake.requests) == GARBLED_TRIES


def test_an_error_reply_cut_off_or_undecodable_is_a_passing_failure_not_a_crash() -> None:
    cut = Reply(502, "<html>Bad Gateway</html>" * 10, {"Content-Type": "text/html"}, cut=8)
    undecodable = Reply(500, b"not gzip", {**JSON, "Content-Encoding": "gzip"})
    for reply in (cut, undecodable):
        with FakeOpenAI([reply, chat(EDIT)]).running() as fake:
            [p] = ask(proposer(fake.url))
        assert not p.error and len(fake.requests) == 2  # retried as a server error
    with (
        FakeOpenAI([], then=undecodable).running() as fake,
        pytest.raises(
            Outage, match=r"failed after 2 attempts \(TransientHTTPError: HTTP 0: DecodingError"
        ),
    ):
        ask(proposer(fake.url, attempts=2))


def test_an_error_reply_is_read_only_as_far_as_a_refusal_needs() -> None:
    """A gzip bomb on a 400: the client would inflate all of it (256 MiB here) before raising."""
    import gzip
    import tracemalloc

    bomb = gzip.compress(b'{"error": "bad request"}' + b" " * 2**28, compresslevel=9)
    with FakeOpenAI([Reply(400, bomb, {**JSON, "Content-Encoding": "gzip"})]).running() as fake:
        tracemalloc.start()
        try:
            [p] = ask(proposer(fake.url))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert p.error.startswith('PermanentHTTPError: HTTP 400: {"error": "bad request"}')
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB"


def test_a_retry_after_beyond_reason_is_an_outage_and_one_beyond_numbers_is_ignored() -> None:
    far = Reply(503, "busy", {"Retry-After": "100000000"})
    with (
        FakeOpenAI([far]).running() as fake,
        pytest.raises(Outage, match=r"asks to be called again in 100000000s; resume then"),
    ):
        ask(proposer(fake.url))
    for value in ("inf", "1e400", "nan"):
        odd = Reply(503, "busy", {"Retry-After": value})
        with FakeOpenAI([odd, chat(EDIT)]).running() as fake:
            [p] = ask(proposer(fake.url))  # the backoff's wait, not forever nor a crash
        assert not p.error, value


def test_a_garbled_reply_once_is_asked_again_and_the_next_answer_counts() -> None:
    script = [Reply(200, "<html>proxy hiccup</html>", JSON), chat(EDIT)]
    with FakeOpenAI(script).running() as fake:
        [p] = ask(proposer(fake.url))
    assert not p.error and p.text == EDIT and len(fake.requests) == 2


def test_a_completion_under_any_label_or_as_a_stream_is_read() -> None:
    streamed = delta("Raise it.\n\n") + delta(EDIT[len("Raise it.\n\n") :], "stop")
    streamed += event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
    script = [
        Reply(200, GOOD, {"Content-Type": "text/plain"}),
        Reply(200, GOOD.encode()),  # no content type at all
        Reply(200, streamed + "data: [DONE]\n\n", STREAM),
    ]
    with FakeOpenAI(script).running() as fake:
        lm = proposer(fake.url)
        answers = [ask(lm)[0] for _ in script]
    assert [(p.text, p.error) for p in answers] == [(EDIT, "")] * 3
    assert (answers[2].tokens_in, answers[2].tokens_out, answers[2].finish) == (7, 3, "stop")


def test_a_stream_is_read_by_its_own_line_breaks_and_shapes() -> None:
    text = "a line\u2028and a separator\u0085kept"
    raw = (delta(text, "stop") + "data: [DONE]\n\n").encode()
    assert read_completion(raw, "text/event-stream").choices == ((text, "stop"),)
    for choices in ("5", "true", '{"a": 1}'):
        with pytest.raises(GarbledReply, match="choices that are not a list"):
            read_completion(f'data: {{"choices": {choices}}}\n\ndata: [DONE]\n'.encode())


def test_odd_but_readable_fields_are_read_as_empty() -> None:
    body = {
        "choices": [{"message": {"content": None}, "finish_reason": 7}],
        "usage": "lots",
        "model": ["not", "a", "name"],
    }
    completion = read_completion(json.dumps(body).encode())
    assert completion.choices == (("", ""),)
    assert (completion.tokens_in, completion.tokens_out, completion.model) == (0, 0, "")
    usage = {"prompt_tokens": True, "completion_tokens": 1e308 * 10}
    assert read_completion(json.dumps({**body, "usage": usage}).encode()).tokens_out == 0
    with pytest.raises(GarbledReply, match="choice 1 has no message"):
        read_completion(json.dumps({"choices": [{"message": {}}, None]}).encode())


def test_a_server_that_only_answers_garbage_stops_after_calls_in_a_row() -> None:
    with FakeOpenAI([], then=Reply(200, "<html>maintenance</html>", JSON)).running() as fake:
        lm = proposer(fake.url)
        assert all(p.error for p in ask(lm) + ask(lm))  # two calls recorded as failed
        with pytest.raises(Outage, match=r"refused 3 calls in a row.*not JSON: '<html>maint"):
            ask(lm)
    assert len(fake.requests) == 3 * GARBLED_TRIES


def selfprog(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "selfprog", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_a_run_against_a_server_of_garbage_stops_in_one_line_and_resume_goes_on(
    tmp_path: Path,
) -> None:
    """The whole path as a user sees it: `selfprog run` prints one line (exit 2), every call
    made is recorded, and `resume` against a working server finishes the run."""
    from selfprog.rundir import open_run
    from tests.test_loop import check_complete, variant

    run_dir = tmp_path / "run"
    args = ["--runner", "local", "--proposer", "openai", "--budget-steps", "10"]
    args += ["--generations", "3", "--population", "1", "--set", "selection.noise_seeds=1"]
    args += ["--set", "selection.confirm_seeds=1", "--set", "proposer.model=m"]
    garbage = Reply(200, "<html><h1>502 Bad Gateway</h1></html>", JSON)
    with FakeOpenAI([], then=garbage).running() as fake:
        done = selfprog(
            "run", "--run-dir", str(run_dir), *args, f"--set=proposer.base_url={fake.url}"
        )
    said = done.stdout + done.stderr
    assert done.returncode == 2, said
    assert "Traceback" not in said, said
    assert "refused 3 calls in a row" in said and "resume with" in said, said

    run = open_run(run_dir, readonly=True)
    children = [c for c in run.archive.candidates() if c.generation > 0]
    assert [c.state for c in children] == ["invalid", "invalid"]  # the third call: unrecorded
    assert all("not JSON: '<html><h1>502" in (c.reason or "") for c in children)
    run.archive.close()

    with FakeOpenAI([chat(variant(1))]).running() as fake:
        resumed = selfprog("resume", str(run_dir), f"--set=proposer.base_url={fake.url}")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    archive = check_complete(run_dir, 3, 1)
    assert [c.state for c in archive.candidates()][1:] == ["invalid", "invalid", "ok"]
