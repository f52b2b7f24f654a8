"""The `transformers` proposer: a local causal LM, by path, alias or model id, placed with accelerate.

The prompt goes through the tokenizer's chat template when it has one, and
the k proposals come from one batched, sampled `generate` call, seeded so
that a resumed run would draw the same samples.

Two edit modes (`proposer.edit_mode`):
- `free`: the model writes SEARCH/REPLACE blocks, as an API model does.
- `constrained`: the model chooses one setting of the parent's source (a
  number assigned in a module's settings or a class body, as `mutate` finds
  them) and one of its nearby values, and gives a reason. A grammar compiled
  by llguidance masks the logits while decoding, so every answer names a real
  setting and a listed value: a valid edit by construction, while the choice
  is the model's. Small models write free-form edits badly; `auto` picks
  `constrained` below a billion parameters.
"""

from __future__ import annotations

import copy
import inspect
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfprog.config import ProposerSection
from selfprog.edits import rationale
from selfprog.errors import ConfigError
from selfprog.proposers.base import Proposal, ProposalRequest
from selfprog.proposers.menu import CHOOSE_SYSTEM, NO_SETTINGS, Menu
from selfprog.proposers.openai import SYSTEM

log = logging.getLogger(__name__)

SMALL_MODEL = 1_000_000_000  # parameters: below this, `auto` constrains the edits


@dataclass
class TransformersProposer:
    """Samples k proposals from a local causal LM."""

    model: Any
    tokenizer: Any
    model_name: str
    temperature: float = 0.8
    max_new_tokens: int = 2048
    edit_mode: str = "free"  # or "constrained"
    vocabulary: Any = None  # the tokenizer as llguidance reads it (made once: about a second)
    name: str = "transformers"

    @property
    def template(self) -> str:
        """The prompt template the loop fills for this proposer."""
        return "choose.md" if self.edit_mode == "constrained" else "propose.md"

    def adopt(self, candidate_id: int | None, folder: Path | None) -> None:
        pass  # a fixed model; self mode's proposer follows the run

    @classmethod
    def from_config(cls, section: ProposerSection, device: str = "") -> TransformersProposer:
        if not section.model:
            raise ConfigError(
                "the transformers proposer needs proposer.model: a local folder, a fetched "
                "alias (smollm2) or a model id"
            )
        return cls.load(
            section.model, section.temperature, section.max_new_tokens, section.edit_mode, device
        )

    @classmethod
    def load(
        cls,
        name: str,
        temperature: float = 0.8,
        max_new_tokens: int = 2048,
        edit_mode: str = "auto",
        device: str = "",
    ) -> TransformersProposer:
        """Returns the proposer with the model loaded and placed (no download when name is a folder).

        `name` may be an alias of a fetched model (see selfprog.models).
        """
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from selfprog.models import resolve

        if not temperature > 0:  # generate() samples k answers: greedy decoding gives one
            raise ConfigError(
                f"a local model samples its answers: proposer.temperature must be above 0, "
                f"not {temperature:g} (e.g. 0.8)"
            )
        path = resolve(name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            on_gpu = device.startswith("cuda") or (not device and torch.cuda.is_available())
            dtype = torch.bfloat16 if on_gpu else torch.float32
            placed = {"": device} if device else "auto"
            model = AutoModelForCausalLM.from_pretrained(path, device_map=placed, dtype=dtype)
        except (OSError, ValueError, KeyError) as exc:  # missing, or not a causal LM it knows
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"cannot load the model {name!r}: {first[:300]}") from None
        model.eval()
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        parameters = model.num_parameters()
        if edit_mode == "auto":
            edit_mode = "constrained" if parameters < SMALL_MODEL else "free"
        vocabulary = grammar_vocabulary(tokenizer, name) if edit_mode == "constrained" else None
        log.info(
            "loaded %s (%.1fM parameters) on %s; %s edits",
            name,
            parameters / 1e6,
            model.device,
            edit_mode,
        )
        return cls(model, tokenizer, name, temperature, max_new_tokens, edit_mode, vocabulary)

    def context_length(self) -> int | None:
        """Returns the longest input the model takes, if its config says."""
        config = self.model.config
        for key in ("max_position_embeddings", "n_positions", "seq_length"):
            value = getattr(config, key, None)
            if isinstance(value, int):
                return value
        return None

    def _input_text(self, prompt: str) -> str:
        system = CHOOSE_SYSTEM if self.edit_mode == "constrained" else SYSTEM
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
            return str(
                self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False
                )
            )
        return f"{system}\n\n{prompt}\n\n"

    def propose(self, request: ProposalRequest, k: int) -> list[Proposal]:
        if self.edit_mode != "constrained":
            return self._generate(request.prompt, request.seed, k, self.max_new_tokens, None)
        menu = Menu.of(request.files, request.known).shuffled(random.Random(request.seed))
        if not menu.settings:
            return [Proposal(text="", error=NO_SETTINGS, model=self.model_name) for _ in range(k)]
        prompt = f"{request.prompt}\n{menu.describe()}"
        budget = min(self.max_new_tokens, menu.max_tokens)
        answers = self._generate(prompt, request.seed, k, budget, menu)
        return [menu.proposal(request.files, a) if not a.error else a for a in answers]

    def _generate(
        self, prompt: str, seed: int, k: int, max_new_tokens: int, menu: Menu | None
    ) -> list[Proposal]:
        """Returns k sampled answers to the prompt.

        With no menu the k answers are sampled together. With a menu they are
        sampled one after another, each constrained to the menu's grammar less
        the choices the answers before it made, so no two are the same edit.
        Either way the prompt is read once and its cache copied.
        """
        import torch
        from transformers import DynamicCache

        inputs = self.tokenizer(self._input_text(prompt), return_tensors="pt").to(self.model.device)
        prompt_length = inputs["input_ids"].shape[1]
        context = self.context_length()
        if context and prompt_length + max_new_tokens > context:
            error = (
                f"the prompt ({prompt_length} tokens) and {max_new_tokens} new tokens exceed "
                f"the model's context of {context}; lower proposer.prompt_tokens or max_new_tokens"
            )
            return [Proposal(text="", error=error, model=self.model_name) for _ in range(k)]
        torch.manual_seed(seed)
        start = time.perf_counter()
        with torch.no_grad():
            prefix = DynamicCache(config=self.model.config)
            self.model(input_ids=inputs["input_ids"][:, :-1], **{self._cache_arg: prefix})
            if menu is None:
                rows = list(self._sample(inputs, prefix, k, max_new_tokens, None))
            else:
                rows, left = [], menu
                for _ in range(k):
                    grammar = left.grammar()
                    row = self._sample(inputs, copy.deepcopy(prefix), 1, max_new_tokens, grammar)[0]
                    rows.append(row)
                    left = left.without(self.tokenizer.decode(row[prompt_length:]))
        latency = time.perf_counter() - start
        proposals = []
        for i, row in enumerate(rows):
            generated = row[prompt_length:]
            generated = generated[generated != self.tokenizer.pad_token_id]
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            proposals.append(
                Proposal(
                    text=text,
                    rationale=rationale(text),
                    tokens_in=prompt_length if i == 0 else 0,  # one prompt for the whole call
                    tokens_out=len(generated),
                    latency=latency,
                    model=self.model_name,
                )
            )
        return proposals

    @property
    def _cache_arg(self) -> str:
        """The name a model takes its KV cache by: `cache` in newer transformers, else the old one."""
        forward = inspect.signature(type(self.model).forward).parameters
        return "cache" if "cache" in forward else "past_key_values"

    def _sample(
        self, inputs: Any, prefix: Any, rows: int, max_new_tokens: int, grammar: str | None
    ) -> Any:
        """Returns rows sampled continuations (with the prompt) from the prompt's cache."""
        from transformers import LogitsProcessorList

        processors = LogitsProcessorList()
        if grammar is not None:
            if self.vocabulary is None:
                self.vocabulary = grammar_vocabulary(self.tokenizer, self.model_name)
            processors.append(GrammarConstraint(self.vocabulary, grammar, rows))
        prefix.batch_repeat_interleave(rows)
        return self.model.generate(
            input_ids=inputs["input_ids"].repeat(rows, 1),
            attention_mask=inputs["attention_mask"].repeat(rows, 1),
            **{self._cache_arg: prefix},
            do_sample=True,
            temperature=self.temperature,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            logits_processor=processors,
        )


def grammar_vocabulary(tokenizer: Any, name: str) -> Any:
    """Returns the tokenizer's vocabulary as llguidance reads it.

    Raises:
        ConfigError: llguidance cannot read this tokenizer (it takes fast tokenizers only).
    """
    import llguidance.hf
    from transformers import TokenizersBackend

    if not isinstance(tokenizer, TokenizersBackend):
        raise ConfigError(
            f"constrained edits need a fast tokenizer, and {name!r} has a "
            f"{type(tokenizer).__name__}; set proposer.edit_mode=free"
        )
    return llguidance.hf.from_tokenizer(tokenizer)


class GrammarConstraint:
    """A logits processor: each row of the batch may only continue its answer within the grammar."""

    def __init__(self, vocabulary: Any, grammar: str, rows: int):
        import llguidance
        import llguidance.torch

        self._torch = llguidance.torch
        compiled = llguidance.LLMatcher.grammar_from_lark(grammar)
        self.matchers = [llguidance.LLMatcher(vocabulary, compiled) for _ in range(rows)]
        for matcher in self.matchers:
            if matcher.is_error():
                raise ConfigError(f"the edit grammar does not compile: {matcher.get_error()}")
        self.mask = self._torch.allocate_token_bitmask(rows, vocabulary.vocab_size)
        self.prompt_length: int | None = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        else:  # the token each row chose last step
            for row, matcher in enumerate(self.matchers):
                if not matcher.is_stopped():
                    matcher.consume_token(int(input_ids[row, -1]))
        for row, matcher in enumerate(self.matchers):
            self._torch.fill_next_token_bitmask(matcher, self.mask, row)
        self._torch.apply_token_bitmask_inplace(scores, self.mask.to(scores.device))
        return scores
