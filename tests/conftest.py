"""Shared fixtures: the tinylm target, its prepared data, and both runners."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from selfprog.data import Dataset, prepare_data
from selfprog.errors import RunnerError
from selfprog.runners.base import Limits, Phase
from selfprog.runners.local import LocalRunner
from selfprog.target import Target, export_target, load_target

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.fixture(scope="session")
def tinylm() -> Target:
    return load_target("tinylm")


@pytest.fixture(scope="session")
def dataset(tinylm: Target, tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return prepare_data(tinylm, tmp_path_factory.mktemp("data-cache"))


@pytest.fixture(scope="session")
def docker_runner():  # type: ignore[no-untyped-def]
    from selfprog.runners.docker import DockerRunner

    try:
        return DockerRunner()
    except RunnerError as exc:
        if os.environ.get("SELFPROG_REQUIRE_DOCKER"):
            raise
        pytest.skip(f"no Docker engine: {exc}")


@pytest.fixture(scope="session")
def local_runner() -> LocalRunner:
    return LocalRunner()


@pytest.fixture(params=["docker", "local"])
def runner(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    return request.getfixturevalue(f"{request.param}_runner")


@pytest.fixture
def seed_program(tmp_path: Path) -> Path:
    dest = tmp_path / "seed"
    export_target("tinylm", dest)
    return dest


def script_phase(tmp_path: Path, source: str, **overrides: object) -> Phase:
    """Returns a train-like phase that runs one Python script of our own."""
    program = tmp_path / "program"
    program.mkdir(exist_ok=True)
    (program / "script.py").write_text(source)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    out.chmod(0o777)
    fields: dict[str, object] = {
        "name": "train",
        "argv": ("script.py",),
        "program_dir": program,
        "out_dir": out,
        "out_writable": True,
        "timeout": 60.0,
    }
    fields.update(overrides)
    return Phase(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random GPT-2-shaped model and a BPE tokenizer trained on the spot, saved locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-model")
    corpus = [Path(__file__).read_text(), (Path(__file__).parent / "test_edits.py").read_text()] * 4
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.save_pretrained(folder)
    eos = fast.eos_token_id
    config = GPT2Config(
        vocab_size=fast.vocab_size,
        n_positions=16384,  # the whole proposer prompt fits, with room for the template to grow
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


SMALL = Limits(memory_bytes=1024 * 2**20, cpus=1.0, log_bytes=4096, output_bytes=64 * 2**20)
