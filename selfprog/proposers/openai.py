"""The `openai` proposer: any OpenAI-compatible chat endpoint (vLLM, llama.cpp, Ollama, hosted).

Rate limits (429), server errors (5xx), timeouts and dropped connections are
retried with exponential backoff and jitter, waiting at least as long as a
Retry-After header asks. Any other 4xx is not retried: it is reported on the
proposals, whose candidates end `invalid`, and the run goes on.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_exponential_jitter

from selfprog.config import ProposerSection
from selfprog.edits import rationale
from selfprog.errors import ConfigError
from selfprog.proposers.base import Proposal, ProposalRequest

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


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to the backoff


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, TransientHTTPError | requests.Timeout | requests.ConnectionError)


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
    api_key: str | None
    temperature: float = 0.8
    max_new_tokens: int = 2048
    timeout: float = 120.0
    attempts: int = 6
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    name: str = "openai"
    template: str = "propose.md"

    def adopt(self, candidate_id: int | None, folder: Path | None) -> None:
        pass  # a served model does not follow the run

    @classmethod
    def from_config(cls, section: ProposerSection) -> OpenAIProposer:
        if not section.base_url or not section.model:
            raise ConfigError(
                "the openai proposer needs proposer.base_url and proposer.model "
                "(e.g. --set proposer.base_url=http://localhost:8000/v1 --set proposer.model=NAME)"
            )
        return cls(
            base_url=section.base_url.rstrip("/"),
            model=section.model,
            api_key=os.environ.get(section.api_key_env) or None,
            temperature=section.temperature,
            max_new_tokens=section.max_new_tokens,
            timeout=section.timeout,
        )

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        response = requests.post(
            f"{self.base_url}/chat/completions", json=body, headers=headers, timeout=self.timeout
        )
        if response.status_code == 429 or response.status_code >= 500:
            raise TransientHTTPError(
                response.status_code, response.text[:200], _retry_after(response)
            )
        if response.status_code >= 400:
            raise PermanentHTTPError(f"HTTP {response.status_code}: {response.text[:300]}")
        try:
            reply = response.json()
            reply["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise PermanentHTTPError(f"not a chat completion: {response.text[:200]!r}") from None
        return dict(reply)

    def _call(self, prompt: str, n: int) -> dict[str, Any]:
        body = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": prompt},
            ],
            "temperature": self.temperature,
            "max_tokens": self.max_new_tokens,
            "n": n,
        }
        retrying = Retrying(
            retry=retry_if_exception(_transient),
            stop=stop_after_attempt(self.attempts),
            wait=_WaitRetryAfter(self.backoff_initial, self.backoff_max),
            before_sleep=lambda s: log.warning(
                "openai: %s; retrying (attempt %d of %d)",
                s.outcome.exception() if s.outcome else "?",
                s.attempt_number + 1,
                self.attempts,
            ),
            reraise=True,
        )
        return retrying(self._post, body)

    def propose(self, request: ProposalRequest, k: int) -> list[Proposal]:
        proposals: list[Proposal] = []
        while len(proposals) < k:  # servers that ignore n answer one choice per call
            start = time.perf_counter()
            want = k - len(proposals)
            try:
                reply = self._call(request.prompt, want)
            except (TransientHTTPError, PermanentHTTPError, requests.RequestException) as exc:
                error = f"{type(exc).__name__}: {exc}"
                proposals += [Proposal(text="", error=error, model=self.model) for _ in range(want)]
                break
            latency = time.perf_counter() - start
            choices = [c["message"].get("content") or "" for c in reply["choices"]][:want]
            usage = reply.get("usage") or {}
            tokens_in, tokens_out = (
                int(usage.get("prompt_tokens", 0)),
                int(usage.get("completion_tokens", 0)),
            )
            for i, text in enumerate(choices):
                proposals.append(
                    Proposal(
                        text=text,
                        rationale=rationale(text),
                        tokens_in=tokens_in if i == 0 else 0,  # the prompt is paid once per call
                        tokens_out=tokens_out // len(choices)
                        + (tokens_out % len(choices) if i == 0 else 0),
                        latency=latency,
                        model=str(reply.get("model") or self.model),
                    )
                )
        return proposals
