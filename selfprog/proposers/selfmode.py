"""The `self` proposer: the model that a run's own target fine-tunes proposes the next recipes.

It is the `transformers` proposer over the target's base model (the target's
`[model] base`, e.g. SmolLM2 for the bundled `selftune` target) plus, from
generation 2 on, the fine-tuned weights of the run's champion: the recipe
accepted as best so far, whose training left `delta.safetensors` in the run
folder (`models/<candidate>/`). Generation 1 is proposed by the base model
itself. The model's name in the archive (`calls.model`) says which weights
proposed: `smollm2` or `smollm2+candidate-7`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfprog.config import ProposerSection
from selfprog.errors import ConfigError, SelfprogError
from selfprog.proposers.transformers import TransformersProposer

log = logging.getLogger(__name__)

DELTA = "delta.safetensors"
MIXED = -1  # `adopted` while weights change: the next adopt restores and loads, whatever it is


@dataclass
class SelfProposer(TransformersProposer):
    """A transformers proposer whose weights follow the run's best fine-tuned model."""

    name: str = "self"
    base: str = ""  # the base model's name, which model_name extends with the adopted candidate
    adopted: int | None = None  # the candidate whose fine-tuned weights are loaded
    pristine: dict[str, Any] = field(default_factory=dict)  # base values a delta replaced

    def __post_init__(self) -> None:
        self.base = self.base or self.model_name

    @classmethod
    def for_target(
        cls, section: ProposerSection, base_model: str, device: str = ""
    ) -> SelfProposer:
        if not base_model:
            raise ConfigError(
                "the self proposer needs a target that fine-tunes a model ([model] base in "
                "target.toml), such as --target selftune"
            )
        proposer = cls.load(
            base_model, section.temperature, section.max_new_tokens, section.edit_mode, device
        )
        assert isinstance(proposer, SelfProposer)
        return proposer

    def adopt(self, candidate_id: int | None, folder: Path | None) -> None:
        """Loads the fine-tuned weights a candidate left in folder, or the base model's with None.

        Raises:
            SelfprogError: the folder lacks the weights or they do not fit the base model.
        """
        if candidate_id == self.adopted:
            return
        if candidate_id is not None and (folder is None or not folder.is_dir()):
            raise SelfprogError(
                f"candidate {candidate_id} is the best, but its fine-tuned model is not in {folder}"
            )
        import torch
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        params = dict(self.model.named_parameters())
        self.adopted = MIXED  # until the change is whole: a failure part way leaves no name
        with torch.no_grad():
            for name, value in self.pristine.items():  # back to the base model first
                params[name].copy_(value)
            self.pristine = {}
            if candidate_id is not None:
                assert folder is not None
                try:
                    delta = load_file(folder / DELTA)
                except (OSError, ValueError, SafetensorError) as exc:
                    raise SelfprogError(
                        f"cannot load the model fine-tuned by candidate {candidate_id}: {exc}"
                    ) from None
                for name, value in delta.items():
                    if name not in params or params[name].shape != value.shape:
                        raise SelfprogError(
                            f"candidate {candidate_id}'s {DELTA} has {name}, which is not a "
                            f"parameter of {self.base}"
                        )
                    self.pristine[name] = params[name].detach().clone()
                    params[name].copy_(value.to(params[name].dtype))
        self.adopted = candidate_id
        self.model_name = (
            self.base if candidate_id is None else f"{self.base}+candidate-{candidate_id}"
        )
        log.info("the proposer is now %s", self.model_name)
