"""The `openai` proposer: any OpenAI-compatible chat endpoint (vLLM, llama.cpp, Ollama, hosted).

It speaks through the official `openai` client (any base_url), with the
client's own retries off: tenacity is the one retry policy.

Rate limits (429), server errors (5xx), timeouts and dropped connections are
retried with exponential backoff and jitter, waiting at least as long as a
Retry-After header asks. When the retries run out, or the server refuses the
key, the model or the path (401, 403, 404), the endpoint is down for the
run, not for one candidate: an `Outage` stops the run cleanly, the call is
not recorded, and `selfprog resume` asks it again once the server is back.
Any other 4xx is reported on the proposals, whose candidates end `invalid`,
and the run goes on, unless `FAILING` calls in a row are refused: a model
the server does not serve or a prompt beyond its context fails every call,
so that stops the run too, naming the server's answer.

A 2xx reply is read by selfprog, not the client (selfprog.proposers.reply):
a body that is no chat completion (not JSON, another shape, no choices or
message, cut off, an unfinished stream, over MAX_REPLY_BYTES) is asked again
up to GARBLED_TRIES times, then recorded like a refusal, so a server that
only answers garbage stops the run as one that refuses every call does.

Servers differ: some refuse `n` > 1 (llama.cpp), reasoning models refuse
`max_tokens` (they take `max_completion_tokens`) and `temperature`. A 400
that names one of these optional parameters drops it for the rest of the
run, with one warning, and the call is asked again at once.

In `constrained` edit mode (`proposer.edit_mode`; `auto` chooses it when the
model's name gives a size below a billion parameters, such as
`SmolLM2-135M-Instruct` or `qwen2.5:0.5b`) the model chooses one setting and
value from the parent's menu (selfprog.proposers.menu), and the request
carries the menu's JSON schema as `response_format`, which vLLM, llama.cpp's
server, SGLang and hosted APIs enforce: OpenAI's `json_schema` form first,
then (refused) the `json_object` form with a `schema` that llama.cpp's and
llama-cpp-python's servers take, then none, each for the rest of the run.
Answers of one call that choose the same edit are asked again, with the
menu less what was chosen, up to `ROUNDS` times. The run's first call asks
for one answer, to see whether the server enforces the schema.

A server that does not (it refused every form, or it ignores them and an
answer is not JSON: `transformers serve`) lets a small model answer as it
likes, and SmolLM2-135M continues the prompt instead. From then on, with one
warning, the proposer asks as such a model can answer
(selfprog.proposers.numbered): a short numbered list of the menu's options
after a worked example, answered by one number, read leniently but strictly,
and asked once more with what was wrong before it is recorded invalid.
Through `transformers serve` that took SmolLM2 from 0 to 20 of 20 valid
proposals. Either way every answer is checked against the menu, and every
call's tokens are counted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import openai
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt
from tenacity.stop import stop_base
from tenacity.wait import wait_exponential_jitter

from selfprog.config import ProposerSection
from selfprog.edits import rationale
from selfprog.errors import ConfigError, Outage
from selfprog.proposers.base import Proposal, ProposalRequest
from selfprog.proposers.menu import CHOOSE_SYSTEM, NO_SETTINGS, Menu
from selfprog.proposers.numbered import TRIES, Question
from selfprog.proposers.reply import Completion, GarbledReply, read_completion

log = logging.getLogger(__name__)

SYSTEM = "You are an expert ML engineer who edits training code with precise SEARCH/REPLACE blocks."


class TransientHTTPError(Exception):
    """A response worth retrying: 429 or 5xx, with the server's Retry-After if it sent one."""

    def __init__(self, status: int, message: str, retry_after: float | None):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.retry_after = retry_after


class PermanentHTTPError(Exception):
    """A response not worth retrying: a 4xx other than 429, or a body that is not a chat reply."""

    def __init__(self, message: str, status: int = 0, body: str = ""):
        super().__init__(message)
        self.status = status
        self.body = body


UNUSABLE = (401, 403, 404)  # the key, the model or the path: no call of the run can succeed
# what a server may refuse
OPTIONAL = ("n", "temperature", "max_tokens", "max_completion_tokens", "response_format")
SMALL_MODEL = 1_000_000_000  # parameters: below this, `auto` constrains the edits
ROUNDS = 3  # calls that may ask again for answers that repeated a choice
FAILING = 3  # calls in a row the server refuses: a misconfiguration, not bad luck
GARBLED_TRIES = 3  # attempts at a call whose replies are garbled, before one is recorded as such
MAX_REPLY_BYTES = 8 * 2**20  # no chat answer is this large: a body past it is not read on
MAX_REFUSAL_BYTES = 16 * 2**10  # of an error reply's body, as sent (a refusal says it in less)
MAX_RETRY_AFTER = 600.0  # seconds: a server asking to wait longer is down for now (an outage)


REFUSING = (
    "unsupported",
    "not supported",
    "unrecognized",
    "unknown parameter",
    "not allowed",
    "only one",
    "input should be",  # pydantic's words for a value a server's schema does not allow
)
VALIDATION = "validation error"  # a 5xx saying this is a refusal mislabelled (llama-cpp-python)


def refused_parameter(body: str, sent: set[str]) -> str | None:
    """Returns the optional parameter a 400's body says the server does not support, if any.

    Servers name it in `error.param` (OpenAI: trusted as is), or quote it in a
    message that says it is unsupported; a server that allows one choice only
    says "only one ... choice" (llama.cpp). A 400 that merely mentions one (a
    prompt too long for `max_tokens`, a request echoed back) is no refusal.
    """
    candidates = sent & set(OPTIONAL)
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and error.get("param"):
        return str(error["param"]) if error["param"] in candidates else None
    lowered = body.lower()
    if not any(word in lowered for word in REFUSING):
        return None
    for name in sorted(candidates, key=len, reverse=True):  # max_completion_tokens before n
        if any(f"{q}{name}{q}" in body for q in "'\"`"):
            return name
    if "n" in candidates and "choice" in lowered:
        return "n"
    return None


def size_in_name(model: str) -> float | None:
    """Returns the parameter count a model's name gives (`-135M`, `:0.5b`, `-8B`), if any."""
    found = re.findall(r"(?<![\w.])(\d+(?:\.\d+)?)([mb])(?![a-z])", model.lower().replace("x", " "))
    sizes = [float(number) * (1e6 if unit == "m" else 1e9) for number, unit in found]
    return max(sizes, default=None)  # `Qwen2.5-7B-Instruct-1M`: 7B, its context is the 1M


def _retry_after(response: Any) -> float | None:
    """Returns the seconds a response's Retry-After asks for, if it gives a finite number."""
    value = response.headers.get("Retry-After")
    try:
        seconds = float(value) if value is not None else math.nan
    except ValueError:
        return None  # an HTTP date: fall back to the backoff
    return max(0.0, seconds) if math.isfinite(seconds) else None


class _BoundedBody(httpx2.SyncByteStream):
    """A response body read with limits: an error reply's is cut at MAX_REFUSAL_BYTES (and
    ends quietly where the connection fails), any body still arriving after `seconds` fails."""

    def __init__(self, inner: Any, refusal: bool, seconds: float):
        self.inner = inner
        self.refusal = refusal
        self.deadline = time.monotonic() + seconds
        self.seconds = seconds

    def __iter__(self) -> Iterator[bytes]:
        size = 0
        try:
            for chunk in self.inner:
                if time.monotonic() > self.deadline:  # a drip of bytes, each within the timeout
                    raise httpx2.ReadTimeout(f"a reply still arriving after {self.seconds:g}s")
                size += len(chunk)
                if self.refusal and size > MAX_REFUSAL_BYTES:
                    yield chunk[: len(chunk) - (size - MAX_REFUSAL_BYTES)]
                    return
                yield chunk
        except httpx2.HTTPError:
            if not self.refusal:
                raise
            # an error reply cut off: its status says enough

    def close(self) -> None:
        self.inner.close()


def _transient(exc: BaseException) -> bool:
    # a connection refused or dropped, a server restarting mid-answer, a timeout, a body cut
    # off or garbled by a proxy on the way (a few tries only: see _GarbledAgain)
    return isinstance(exc, TransientHTTPError | openai.APIConnectionError | GarbledReply)


class _GarbledAgain(stop_base):
    """Stops retrying a call whose replies stay garbled after GARBLED_TRIES attempts."""

    def __call__(self, state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        return isinstance(exc, GarbledReply) and state.attempt_number >= GARBLED_TRIES


def _read_capped(response: Any, limit: int) -> bytes:
    """Returns a response's body, or raises GarbledReply once it grows past limit bytes."""
    chunks, size = [], 0
    try:
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > limit:
                raise GarbledReply(f"a reply of over {limit // 2**20} MiB, more than any answer")
            chunks.append(chunk)
    except httpx2.HTTPError as exc:  # the status came, the body was cut off or cannot be decoded
        raise GarbledReply(f"a reply cut off or unreadable ({type(exc).__name__}: {exc})") from None
    return b"".join(chunks)


class _WaitRetryAfter:
    """Waits the exponential backoff with jitter, or the server's Retry-After if that is longer."""

    def __init__(self, initial: float, maximum: float):
        self.backoff = wait_exponential_jitter(multiplier=initial, max=maximum, jitter=initial)

    def __call__(self, state: RetryCallState) -> float:
        wait = self.backoff(state)
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, TransientHTTPError) and exc.retry_after is not None:
            wait = max(wait, exc.retry_after)
        return wait


@dataclass
class OpenAIProposer:
    """Asks a chat-completions endpoint for k proposals."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)  # never in a log or a traceback
    temperature: float = 0.8
    max_new_tokens: int = 2048  # 0: not sent (the server's default)
    timeout: float = 120.0
    attempts: int = 6
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    edit_mode: str = "free"  # or "constrained"
    name: str = "openai"
    dropped: set[str] = field(default_factory=set)  # the optional parameters this server refused
    client: openai.OpenAI | None = field(default=None, repr=False)  # made at the first call
    enforced: bool | None = None  # does the server enforce the schema? (None: not seen yet)
    unread: int = 0  # answers in a row that did not read as a choice of the menu
    schema_form: str = "json_schema"  # the response_format form this server takes, or "json_object"
    refusals: int = 0  # calls refused in a row

    @property
    def template(self) -> str:
        """The prompt template the loop fills for this proposer."""
        return "choose.md" if self.edit_mode == "constrained" else "propose.md"

    def adopt(self, candidate_id: int | None, folder: Path | None) -> None:
        pass  # a served model does not follow the run

    @classmethod
    def from_config(cls, section: ProposerSection) -> OpenAIProposer:
        if not section.base_url or not section.model:
            raise ConfigError(
                "the openai proposer needs proposer.base_url and proposer.model "
                "(e.g. --set proposer.base_url=http://localhost:8000/v1 --set proposer.model=NAME)"
            )
        if not section.base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"proposer.base_url must start with http:// or https://, not {section.base_url!r}"
            )
        api_key = (os.environ.get(section.api_key_env) or "").strip() or None
        if api_key is not None and not (api_key.isascii() and api_key.isprintable()):
            raise ConfigError(  # never the key itself: it would land in logs
                f"the key in ${section.api_key_env} holds characters no HTTP header can carry"
            )
        edit_mode = section.edit_mode
        if edit_mode == "auto":
            size = size_in_name(section.model)
            edit_mode = "constrained" if size is not None and size < SMALL_MODEL else "free"
        proposer = cls(
            base_url=section.base_url.rstrip("/"),
            model=section.model,
            api_key=api_key,
            temperature=section.temperature,
            max_new_tokens=section.max_new_tokens,
            timeout=section.timeout,
            edit_mode=edit_mode,
        )
        try:  # now, not at the first call: a proxy or certificate setting it cannot use
            proposer._client()
        except (ImportError, ValueError, OSError) as exc:
            raise ConfigError(
                f"cannot make a client for {section.base_url} with this environment's proxy "
                f"and certificate settings: {type(exc).__name__}: {str(exc)[:200]}"
            ) from None
        return proposer

    def _client(self) -> openai.OpenAI:
        if self.client is None:
            # the client reads an error reply's body whole, before we see it: bounded here
            hooks = {"response": [self._bound_body]}
            self.client = openai.OpenAI(
                base_url=self.base_url,
                api_key=self.api_key or "none",  # a local server takes any
                timeout=self.timeout,
                max_retries=0,  # tenacity retries, honouring Retry-After
                http_client=openai.DefaultHttpxClient(event_hooks=hooks),
            )
        return self.client

    def _bound_body(self, response: httpx2.Response) -> None:
        response.stream = _BoundedBody(response.stream, response.status_code >= 400, self.timeout)

    def _post(self, body: dict[str, Any]) -> Completion:
        """Returns the server's reply to one request, read and checked by us, not the client.

        Raises:
            TransientHTTPError: a 429 or 5xx.
            PermanentHTTPError: any other refusal.
            GarbledReply: a 2xx whose body is no chat completion, cut off or too large.
            openai.APIConnectionError: no answer.
        """
        try:
            completions = self._client().chat.completions.with_streaming_response
            with completions.create(**body) as response:
                raw = _read_capped(response, MAX_REPLY_BYTES)
                content_type = str(response.headers.get("content-type") or "")
        except openai.APIStatusError as exc:
            status, text = exc.status_code, exc.response.text
            if status >= 500 and VALIDATION in text.lower():
                status = 400  # the request, not the server: asking again cannot help
            if status == 429 or status >= 500:
                wait = _retry_after(exc.response)
                if wait is not None and wait > MAX_RETRY_AFTER:
                    raise Outage(
                        f"the proposer's endpoint {self.base_url} answered HTTP {status} and "
                        f"asks to be called again in {wait:.0f}s; resume then"
                    ) from None
                raise TransientHTTPError(status, text[:200], wait) from None
            raise PermanentHTTPError(f"HTTP {status}: {text[:300]}", status, text[:2000]) from None
        except httpx2.HTTPError as exc:  # an error reply whose body cannot even be decoded
            raise TransientHTTPError(0, f"{type(exc).__name__}: {exc}", None) from None
        return read_completion(raw, content_type)

    def _body(self, prompt: str | Question, n: int, menu: Menu | None) -> dict[str, Any]:
        if isinstance(prompt, Question):  # by number: messages of its own
            messages = [{"role": "system", "content": CHOOSE_SYSTEM}, *prompt.messages]
        else:
            system = SYSTEM if menu is None else CHOOSE_SYSTEM
            messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        if menu is not None and "response_format" not in self.dropped:
            schema = menu.json_schema()
            body["response_format"] = (
                {
                    "type": "json_schema",
                    "json_schema": {"name": "setting_choice", "strict": True, "schema": schema},
                }
                if self.schema_form == "json_schema"
                else {"type": "json_object", "schema": schema}
            )
        if "temperature" not in self.dropped:
            body["temperature"] = self.temperature
        limit = self.max_new_tokens
        if menu is not None:  # an answer is short: a reason and a choice in JSON
            limit = min(limit or menu.max_tokens + 16, menu.max_tokens + 16)
        if isinstance(prompt, Question):
            limit = min(limit or prompt.max_tokens, prompt.max_tokens)
        if limit:
            for key in ("max_tokens", "max_completion_tokens"):  # the second for reasoning models
                if key not in self.dropped:
                    body[key] = limit
                    break
        if n > 1 and "n" not in self.dropped:
            body["n"] = n
        return body

    def _say_retrying(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        tries = (
            min(self.attempts, GARBLED_TRIES) if isinstance(exc, GarbledReply) else self.attempts
        )
        log.warning("openai: %s; retrying (attempt %d of %d)", exc, state.attempt_number + 1, tries)

    def _call(self, prompt: str | Question, n: int, menu: Menu | None = None) -> Completion:
        """Returns the server's reply, dropping what it refuses and retrying what is passing.

        Raises:
            Outage: the endpoint is down after every retry, or refuses the key, model or path.
            PermanentHTTPError: it refused this request, or its replies stayed garbled (the
                proposals record why).
        """
        retrying = Retrying(
            retry=retry_if_exception(_transient),
            stop=stop_after_attempt(self.attempts) | _GarbledAgain(),
            wait=_WaitRetryAfter(self.backoff_initial, self.backoff_max),
            before_sleep=self._say_retrying,
            reraise=True,
        )
        while True:
            body = self._body(prompt, n, menu)
            try:
                return retrying(self._post, body)
            except PermanentHTTPError as exc:
                refused = refused_parameter(exc.body, set(body)) if exc.status == 400 else None
                if refused is None:
                    if exc.status in UNUSABLE:
                        raise Outage(
                            f"the proposer's endpoint {self.base_url} refused: {exc}"
                        ) from None
                    raise
                if refused == "response_format" and self.schema_form == "json_schema":
                    self.schema_form = "json_object"
                    log.warning("openai: the server refused a json_schema; trying json_object")
                    continue
                self.dropped.add(refused)
                log.warning("openai: the server refused `%s`; not sent from now on", refused)
            except GarbledReply as exc:  # an answer, if a useless one: recorded, the run goes on
                tries = retrying.statistics.get("attempt_number", 1)
                asked = "once" if tries == 1 else f"{tries} times"
                raise PermanentHTTPError(f"no usable reply, asked {asked}: {exc}") from None
            except (TransientHTTPError, openai.APIConnectionError) as exc:
                cause = f" ({exc.__cause__})" if exc.__cause__ else ""  # e.g. too many redirects
                raise Outage(
                    f"the proposer's endpoint {self.base_url} failed after {self.attempts} "
                    f"attempts ({type(exc).__name__}: {str(exc)[:200]}{cause[:200]})"
                ) from None

    def propose(self, request: ProposalRequest, k: int) -> list[Proposal]:
        if self.edit_mode == "constrained":
            return self._choose(request, k)
        return self._answers(request.prompt, k, None)

    def _choose(self, request: ProposalRequest, k: int) -> list[Proposal]:
        """Returns k proposals, each a setting and value the model chose from the parent's menu."""
        menu = Menu.of(request.files, request.known).shuffled(random.Random(request.seed))
        if not menu.settings:
            return [Proposal(text="", error=NO_SETTINGS, model=self.model) for _ in range(k)]
        proposals: list[Proposal] = []
        left, spent_in, spent_out = menu, 0, 0  # the tokens of answers asked again
        again = ROUNDS - 1  # calls that may ask again for answers that repeated a choice
        while len(proposals) < k:  # each call answers at least one: an error fills them all
            if self.enforced is False:  # the rest by number
                proposals += self._by_number(request, left, k - len(proposals))
                break
            # one each: a smaller menu; one first: k long answers are wasted where it is ignored
            one = "n" in self.dropped or self.enforced is None
            want = 1 if one else k - len(proposals)
            answers = self._answers(f"{request.prompt}\n{left.describe(as_json=True)}", want, left)
            if all(answer.error for answer in answers):  # a refusal answers for the whole call
                proposals += [answers[0]] * (k - len(proposals))
                break
            self._check_enforced(answers, menu)
            repeated = False
            for answer in answers:
                unread = not answer.error and menu.choice(answer.text) is None
                if unread and self.enforced is False:
                    spent_in, spent_out = spent_in + answer.tokens_in, spent_out + answer.tokens_out
                    continue  # asked again, by number
                repeat = not answer.error and left.choice(answer.text) is None
                if repeat and menu.choice(answer.text) and again > 0:
                    spent_in, spent_out = spent_in + answer.tokens_in, spent_out + answer.tokens_out
                    repeated = True
                    continue  # asked again
                proposals.append(answer if answer.error else menu.proposal(request.files, answer))
                left = left.without(answer.text)
            again -= repeated
        if not proposals:
            return proposals
        first = proposals[0]
        proposals[0] = dataclasses.replace(
            first, tokens_in=first.tokens_in + spent_in, tokens_out=first.tokens_out + spent_out
        )
        return proposals

    def _by_number(self, request: ProposalRequest, menu: Menu, k: int) -> list[Proposal]:
        """Returns k proposals, each the option of a numbered list the model answered by number.

        One call each, and one more where the answer does not read, showing what was wrong.
        """
        proposals: list[Proposal] = []
        for _ in range(k):
            question = Question.of(menu, request.prompt)
            answers: list[Proposal] = []
            while len(answers) < TRIES:
                answers += self._answers(question, 1, None)
                wrong = question.wrong(answers[-1])
                if not wrong:
                    break
                question = question.again(answers[-1].text, wrong)
            proposals.append(question.proposal(request.files, answers))
            if not proposals[-1].error:  # the next question lists the other settings first
                menu = menu.less(question.option(answers[-1].text), last=True)
        return proposals

    def _check_enforced(self, answers: list[Proposal], menu: Menu) -> None:
        """Notes whether the server enforces the schema, from whether its answers read as a
        choice of the menu; where not, asks by number from now on.

        A JSON answer cut at the token limit says nothing either way (prose cut there is
        unread); two in a row that do not read overturn an earlier verdict.
        """
        if self.enforced is False:
            return
        if "response_format" in self.dropped:
            self._ask_by_number("refused response_format")
            return
        for answer in answers:
            cut = answer.finish == "length" and answer.text.lstrip().startswith("{")
            if answer.error or cut:  # JSON cut at the token limit: says nothing either way
                continue
            if menu.choice(answer.text) is not None:
                self.unread = 0
                self.enforced = True
                continue
            self.unread += 1
            if self.enforced is None or self.unread >= 2:
                self._ask_by_number("ignored response_format (an answer is not a choice)")
                return

    def _ask_by_number(self, why: str) -> None:
        self.enforced = False
        log.warning(
            "openai: %s %s; from now on the menu is asked for by number (a numbered list, "
            "answered with one number) and checked against the menu",
            self.base_url,
            why,
        )

    def _answers(self, prompt: str | Question, k: int, menu: Menu | None) -> list[Proposal]:
        """Returns k answers to a prompt (under a menu's schema), as few calls as the server allows."""
        proposals: list[Proposal] = []
        while len(proposals) < k:  # servers that ignore n answer one choice per call
            start = time.perf_counter()
            want = k - len(proposals)
            try:
                reply = self._call(prompt, want, menu)
            except PermanentHTTPError as exc:
                self.refusals += 1
                if self.refusals >= FAILING:
                    raise Outage(
                        f"the proposer's endpoint {self.base_url} refused {FAILING} calls in a "
                        f"row, the last with {str(exc)[:300]}"
                    ) from None
                error = f"{type(exc).__name__}: {exc}"
                proposals += [Proposal(text="", error=error, model=self.model) for _ in range(want)]
                break
            self.refusals = 0
            latency = time.perf_counter() - start
            choices = reply.choices[:want]
            tokens_in, tokens_out = reply.tokens_in, reply.tokens_out
            for i, (text, finish) in enumerate(choices):
                proposals.append(
                    Proposal(
                        text=text,
                        rationale=rationale(text),
                        tokens_in=tokens_in if i == 0 else 0,  # the prompt is paid once per call
                        tokens_out=tokens_out // len(choices)
                        + (tokens_out % len(choices) if i == 0 else 0),
                        latency=latency,
                        model=reply.model or self.model,
                        finish=finish,
                    )
                )
        return proposals
