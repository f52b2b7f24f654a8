"""Self mode: the selftune target fine-tunes SmolLM2, and the fine-tuned model proposes.

Needs the real SmolLM2 (fetched once into the user's cache, see test_models)
and a Docker engine; each candidate fine-tunes for two steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from selfprog import models
from selfprog.cli import main


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return models.fetch("smollm2")


def test_the_proposer_follows_the_champions_fine_tuned_model(smollm2, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Scripted archive: a generation-1 child is the champion, so generation 2 uses its weights."""
    import torch
    from safetensors.torch import save_file

    from selfprog.breeder import Breeder
    from selfprog.config import load_config
    from selfprog.population import Population
    from selfprog.proposers.selfmode import SelfProposer
    from selfprog.rundir import MODELS, create_run
    from selfprog.scoring import Result, State

    settings = load_config(None, ["run.target=selftune", "proposer.kind=self"])
    run = create_run(tmp_path / "run", settings)
    proposer = SelfProposer.for_target(settings.proposer, run.target.base_model)
    breeder = Breeder(run, proposer, Population(run), lambda event: None, lambda: "")
    archive = run.archive
    with archive.transaction() as db:
        seed = archive.add_candidate(db, generation=0, state="pending")
        child = archive.add_candidate(db, generation=1, parent_id=seed, state="pending")
    archive.finish(seed, Result(State.OK, score=0.95), 0)
    archive.finish(child, Result(State.OK, score=0.90), 0)
    archive.set_accepted(seed, True)
    archive.set_accepted(child, True)
    name = "model.layers.29.self_attn.q_proj.weight"
    weight = dict(proposer.model.named_parameters())[name]
    base = weight.detach().clone()
    (run.root / MODELS / str(child)).mkdir(parents=True)
    save_file({name: base * 1.5}, run.root / MODELS / str(child) / "delta.safetensors")

    proposer.adopt(*breeder.weights_for(1))  # generation 1: the base model proposes
    assert proposer.model_name == "smollm2" and torch.equal(weight, base)
    proposer.adopt(*breeder.weights_for(2))  # generation 2: the champion's fine-tuned model
    assert proposer.model_name == f"smollm2+candidate-{child}"
    assert torch.allclose(weight, base * 1.5)
    proposer.adopt(*breeder.weights_for(1))  # and back, exactly
    assert torch.equal(weight, base)


def test_a_self_mode_run_records_the_chain_of_proposers(smollm2, docker_runner, tmp_path) -> None:  # type: ignore[no-untyped-def]
    run_dir = tmp_path / "run"
    code = main(
        [
            "run",
            "--run-dir",
            str(run_dir),
            "--target",
            "selftune",
            "--proposer",
            "self",
            "--generations",
            "2",
            "--population",
            "1",
            "--budget-steps",
            "2",
            "--set",
            "selection.policy=greedy",
            "--set",
            "selection.noise_seeds=1",
            "--set",
            "selection.confirm_seeds=1",
            "--set",
            "selection.z=0.0",
            "--set",
            "run.synchronous=true",  # each generation proposed by the champion of the one before
        ]
    )
    assert code == 0
    from selfprog.queries import show
    from selfprog.rundir import open_run

    run = open_run(run_dir)
    candidates = run.archive.candidates()
    assert [c.generation for c in candidates] == [0, 1, 2]
    states = [(c.state, c.reason) for c in candidates]
    assert candidates[0].state == "ok" and candidates[1].state == "ok", states
    assert candidates[2].state in ("ok", "duplicate"), states  # (it may choose a change again)
    for c in candidates:  # every scored candidate's fine-tuned weights are kept
        if c.state == "ok":
            assert 0.3 < (c.score or 0) < 2.0  # bits per byte of code
            assert (run_dir / "models" / str(c.id) / "delta.safetensors").is_file()
    first, second = (show(run, c.id)["proposer"] for c in candidates[1:])
    assert first["proposer"] == "self" and first["model"] == "smollm2"
    head = [c for c in candidates[:2] if c.accepted][-1]  # the champion when generation 2 began
    assert second["model"] == f"smollm2+candidate-{head.id}"
    assert candidates[2].parent_id == head.id


def test_kept_outputs_are_plain_files_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A candidate's output named like the kept file but linking to a host file is not kept."""
    from selfprog.scheduler import read_kept

    out = tmp_path / "out"
    out.mkdir()
    secret = tmp_path / "host-secret"
    secret.write_text("not for candidates")
    (out / "delta.safetensors").symlink_to(secret)
    (out / "extra.bin").write_bytes(b"weights")
    assert read_kept(("delta.safetensors", "extra.bin"), out) == {"extra.bin": b"weights"}


def test_an_adoption_that_fails_part_way_is_undone_by_the_next(tiny_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A delta that fails after some weights changed (here a name the model lacks) must not
    leave a mix that later proposes under a candidate's name; a corrupt file is one line."""
    import torch
    from safetensors.torch import save_file

    from selfprog.errors import SelfprogError
    from selfprog.proposers.selfmode import DELTA, SelfProposer

    lm = SelfProposer.load(str(tiny_model), edit_mode="free")
    params = dict(lm.model.named_parameters())
    first, second = "transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight"
    base = {name: params[name].detach().clone() for name in (first, second)}
    one, two, bad = (tmp_path / name for name in ("1", "2", "bad"))
    for folder in (one, two, bad):
        folder.mkdir()
    save_file({first: base[first] * 2, second: base[second] * 2}, one / DELTA)
    save_file({first: base[first] * 3, "z.not.a.parameter": torch.zeros(1)}, two / DELTA)
    (bad / DELTA).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")

    lm.adopt(1, one)
    with pytest.raises(SelfprogError, match=r"z\.not\.a\.parameter, which is not a parameter"):
        lm.adopt(2, two)
    assert torch.equal(params[first], base[first] * 3)  # part of candidate 2 was loaded
    lm.adopt(1, one)
    assert lm.model_name.endswith("+candidate-1")
    assert torch.equal(params[first], base[first] * 2)
    assert torch.equal(params[second], base[second] * 2)
    with pytest.raises(SelfprogError, match="cannot load the model fine-tuned by candidate 3"):
        lm.adopt(3, bad)
    lm.adopt(None, None)
    assert torch.equal(params[first], base[first]) and torch.equal(params[second], base[second])
