"""The `transformers` proposer: a local causal LM, by path or model id, placed with accelerate.

The prompt goes through the tokenizer's chat template when it has one, and
the k proposals come from one batched, sampled `generate` call, seeded so
that a resumed run would draw the same samples.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from selfprog.config import ProposerSection
from selfprog.edits import rationale
from selfprog.errors import ConfigError
from selfprog.proposers.base import Proposal, ProposalRequest
from selfprog.proposers.openai import SYSTEM

log = logging.getLogger(__name__)


@dataclass
class TransformersProposer:
    """Samples k proposals from a local causal LM."""

    model: Any
    tokenizer: Any
    model_name: str
    temperature: float = 0.8
    max_new_tokens: int = 2048
    name: str = "transformers"

    @classmethod
    def from_config(cls, section: ProposerSection) -> TransformersProposer:
        if not section.model:
            raise ConfigError(
                "the transformers proposer needs proposer.model: a local folder or model id"
            )
        return cls.load(section.model, section.temperature, section.max_new_tokens)

    @classmethod
    def load(
        cls, name: str, temperature: float = 0.8, max_new_tokens: int = 2048
    ) -> TransformersProposer:
        """Returns the proposer with the model loaded and placed (no download when name is a folder)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
            dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
            model = AutoModelForCausalLM.from_pretrained(name, device_map="auto", dtype=dtype)
        except OSError as exc:
            raise ConfigError(
                f"cannot load the model {name!r}: {str(exc).splitlines()[0]}"
            ) from None
        model.eval()
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        log.info(
            "loaded %s (%.1fM parameters) on %s", name, model.num_parameters() / 1e6, model.device
        )
        return cls(model, tokenizer, name, temperature, max_new_tokens)

    def context_length(self) -> int | None:
        """Returns the longest input the model takes, if its config says."""
        config = self.model.config
        for key in ("max_position_embeddings", "n_positions", "seq_length"):
            value = getattr(config, key, None)
            if isinstance(value, int):
                return value
        return None

    def _input_text(self, prompt: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
            return str(
                self.tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False
                )
            )
        return f"{SYSTEM}\n\n{prompt}\n\n"

    def propose(self, request: ProposalRequest, k: int) -> list[Proposal]:
        import torch

        inputs = self.tokenizer(self._input_text(request.prompt), return_tensors="pt").to(
            self.model.device
        )
        prompt_length = inputs["input_ids"].shape[1]
        context = self.context_length()
        if context and prompt_length + self.max_new_tokens > context:
            error = (
                f"the prompt ({prompt_length} tokens) and {self.max_new_tokens} new tokens exceed "
                f"the model's context of {context}; lower proposer.prompt_tokens or max_new_tokens"
            )
            return [Proposal(text="", error=error, model=self.model_name) for _ in range(k)]
        torch.manual_seed(request.seed)
        start = time.perf_counter()
        with torch.no_grad():
            output = self.model.generate(
                **inputs,
                do_sample=True,
                temperature=self.temperature,
                max_new_tokens=self.max_new_tokens,
                num_return_sequences=k,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        latency = time.perf_counter() - start
        proposals = []
        for i, row in enumerate(output):
            generated = row[prompt_length:]
            generated = generated[generated != self.tokenizer.pad_token_id]
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            proposals.append(
                Proposal(
                    text=text,
                    rationale=rationale(text),
                    tokens_in=prompt_length if i == 0 else 0,  # one prompt for the whole batch
                    tokens_out=len(generated),
                    latency=latency,
                    model=self.model_name,
                )
            )
        return proposals
