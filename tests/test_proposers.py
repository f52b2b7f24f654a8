"""Proposers: mutate (seeded, valid by construction), openai (fake server), transformers (tiny model)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from selfprog.config import ProposerSection
from selfprog.edits import apply_edits, parse_edits
from selfprog.errors import ConfigError, Outage
from selfprog.proposers.base import Proposal, ProposalRequest
from selfprog.proposers.mutate import MutateProposer, perturb, tunable_literals
from selfprog.proposers.openai import OpenAIProposer
from selfprog.target import Target
from tests.fakes import FakeOpenAI, Reply, chat

EDIT = (
    "Raise the learning rate.\n\ntrain.py\n<<<<<<< SEARCH\nlearning_rate = 1e-3  # peak, after warmup\n"
    "=======\nlearning_rate = 2e-3  # peak, after warmup\n>>>>>>> REPLACE\n"
)


def seed_files(target: Target) -> dict[str, str]:
    return {name: (target.root / name).read_text() for name in target.editable}


def test_mutate_is_seeded_and_always_valid(tinylm: Target) -> None:
    files = seed_files(tinylm)
    request = ProposalRequest(parent_id=1, files=files, prompt="", seed=7)
    first = MutateProposer().propose(request, 20)
    assert [p.text for p in first] == [p.text for p in MutateProposer().propose(request, 20)]
    assert [p.text for p in first] != [
        p.text for p in MutateProposer().propose(ProposalRequest(1, files, "", 8), 20)
    ]
    for proposal in first:
        child = apply_edits(
            files, parse_edits(proposal.text, tinylm.files), tinylm.editable, tinylm.fixed
        )
        assert child != files
        assert " → " in proposal.rationale


def test_mutate_keeps_types_and_sizes_sensible() -> None:
    import random

    rng = random.Random(0)
    for _ in range(200):
        assert perturb(64, rng) in (32, 128)
        ints = perturb(50, rng)
        assert isinstance(ints, int) and ints > 0 and ints != 50
        lr = perturb(1e-3, rng)
        assert isinstance(lr, float) and 1e-5 < lr < 1e-1
        beta = perturb(0.95, rng)
        assert 0.5 < beta < 1.0


def test_mutate_leaves_constants_and_loop_state_alone() -> None:
    source = "VOCAB = 256\nlr = 0.1\nx = f(1)\nsetup()\nstep = 0\n"
    assert [lit.name for lit in tunable_literals("train.py", source)] == ["lr"]


def request() -> ProposalRequest:
    return ProposalRequest(parent_id=1, files={}, prompt="improve it", seed=0)


def proposer(url: str, **kw: object) -> OpenAIProposer:
    fields = {
        "base_url": url,
        "model": "m",
        "api_key": "sk-test",
        "timeout": 2.0,
        "backoff_initial": 0.05,
        "backoff_max": 0.2,
    }
    fields.update(kw)
    return OpenAIProposer(**fields)  # type: ignore[arg-type]


def test_openai_success_k_samples_in_one_call() -> None:
    with FakeOpenAI(
        [chat(EDIT, EDIT + " ", prompt_tokens=120, completion_tokens=61)]
    ).running() as fake:
        proposals = proposer(fake.url).propose(request(), 2)
    assert [p.error for p in proposals] == ["", ""]
    assert proposals[0].rationale == "Raise the learning rate."
    assert sum(p.tokens_in for p in proposals) == 120 and sum(p.tokens_out for p in proposals) == 61
    assert fake.requests[0]["body"]["n"] == 2
    assert fake.requests[0]["auth"] == "Bearer sk-test"
    assert fake.requests[0]["path"] == "/v1/chat/completions"


def test_openai_server_ignoring_n_is_asked_again() -> None:
    with FakeOpenAI([chat(EDIT), chat(EDIT)]).running() as fake:
        proposals = proposer(fake.url).propose(request(), 2)
    assert len(proposals) == 2 and len(fake.requests) == 2
    assert fake.requests[0]["body"]["n"] == 2 and "n" not in fake.requests[1]["body"]


def test_openai_server_refusing_n_gets_one_choice_per_call() -> None:
    refusal = Reply(400, {"error": {"message": "Only one completion choice is allowed"}})
    script = [refusal, chat(EDIT), chat(EDIT), chat(EDIT), chat(EDIT)]
    with FakeOpenAI(script).running() as fake:
        lm = proposer(fake.url)
        first, second = lm.propose(request(), 2), lm.propose(request(), 2)
    assert [p.error for p in first + second] == [""] * 4
    assert fake.requests[0]["body"]["n"] == 2
    assert all("n" not in r["body"] for r in fake.requests[1:])  # remembered: asked once


def test_openai_reasoning_model_refusing_max_tokens_and_temperature() -> None:
    def refuse(param: str) -> Reply:
        message = f"Unsupported parameter: '{param}' is not supported with this model."
        return Reply(400, {"error": {"message": message, "param": param}})

    script = [refuse("max_tokens"), refuse("temperature"), chat(EDIT)]
    with FakeOpenAI(script).running() as fake:
        proposals = proposer(fake.url, max_new_tokens=300).propose(request(), 1)
    assert proposals[0].error == ""
    last = fake.requests[-1]["body"]
    assert "temperature" not in last and "max_tokens" not in last
    assert last["max_completion_tokens"] == 300
    with FakeOpenAI([chat(EDIT)]).running() as fake:
        proposer(fake.url, max_new_tokens=0).propose(request(), 1)
    assert not {"max_tokens", "max_completion_tokens"} & set(fake.requests[0]["body"])


def test_openai_null_usage_and_a_cut_answer_are_recorded() -> None:
    reply = chat(EDIT, EDIT + " ")
    reply.body["usage"] = {"prompt_tokens": None, "completion_tokens": None}
    reply.body["choices"][1]["finish_reason"] = "length"
    with FakeOpenAI([reply]).running() as fake:
        proposals = proposer(fake.url).propose(request(), 2)
    assert [p.tokens_in for p in proposals] == [0, 0]
    assert [p.finish for p in proposals] == ["stop", "length"]


def test_openai_key_is_not_in_the_repr() -> None:
    lm = proposer("http://127.0.0.1:9/v1", api_key="sk-secret-123")
    assert "sk-secret-123" not in repr(lm)


def test_openai_429_honours_retry_after() -> None:
    script = [Reply(429, {"error": "slow down"}, {"Retry-After": "1"}), chat(EDIT)]
    with FakeOpenAI(script).running() as fake:
        proposals = proposer(fake.url).propose(request(), 1)
    assert proposals[0].error == ""
    assert fake.times[1] - fake.times[0] >= 1.0


def test_openai_500s_are_retried_then_the_endpoint_is_an_outage() -> None:
    with FakeOpenAI([Reply(500, "oops"), Reply(503, "busy"), chat(EDIT)]).running() as fake:
        assert proposer(fake.url).propose(request(), 1)[0].error == ""
        assert len(fake.requests) == 3
    failing = FakeOpenAI([Reply(500, "oops")] * 3)
    outage = r"failed after 3 attempts \(TransientHTTPError: HTTP 500"
    with failing.running() as fake, pytest.raises(Outage, match=outage):
        proposer(fake.url, attempts=3).propose(request(), 2)


def test_openai_unreachable_or_unauthorised_endpoint_is_an_outage() -> None:
    with FakeOpenAI([]).running() as fake:
        url = fake.url
    with pytest.raises(Outage, match="ConnectionError"):  # nothing listens there any more
        proposer(url, attempts=2).propose(request(), 1)
    for status in (401, 404):
        with FakeOpenAI([Reply(status, {"error": "no"})]).running() as fake:
            with pytest.raises(Outage, match=f"refused: HTTP {status}"):
                proposer(fake.url).propose(request(), 1)
            assert len(fake.requests) == 1


def test_openai_timeout_is_retried() -> None:
    with FakeOpenAI([Reply(200, {}, delay=3.0), chat(EDIT)]).running() as fake:
        start = time.monotonic()
        proposals = proposer(fake.url, timeout=0.5).propose(request(), 1)
    assert proposals[0].error == ""
    assert time.monotonic() - start < 3.0


def test_openai_client_error_is_not_retried() -> None:
    with FakeOpenAI([Reply(400, {"error": "bad model"})]).running() as fake:
        proposals = proposer(fake.url).propose(request(), 2)
    assert len(fake.requests) == 1
    assert all(p.error.startswith("PermanentHTTPError: HTTP 400") for p in proposals)


def test_openai_needs_an_endpoint_and_model() -> None:
    with pytest.raises(ConfigError, match=r"needs proposer.base_url and proposer.model"):
        OpenAIProposer.from_config(ProposerSection(kind="openai"))


def test_transformers_k_samples_from_a_local_model(tiny_model: Path, tinylm: Target) -> None:
    from selfprog.proposers.transformers import TransformersProposer

    section = ProposerSection(
        kind="transformers", model=str(tiny_model), max_new_tokens=24, temperature=1.0
    )
    lm = TransformersProposer.from_config(section)
    req = ProposalRequest(parent_id=1, files=seed_files(tinylm), prompt="improve train.py", seed=3)
    proposals = lm.propose(req, 3)
    assert len(proposals) == 3
    assert proposals[0].tokens_in > 0 and all(0 < p.tokens_out <= 24 for p in proposals)
    assert [p.text for p in proposals] == [p.text for p in lm.propose(req, 3)]  # seeded


def test_transformers_missing_model_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from selfprog.proposers.transformers import TransformersProposer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="cannot load the model"):
        TransformersProposer.load(str(tmp_path / "no-model"))


def test_transformers_prompt_beyond_the_context_is_an_error_not_a_crash(tiny_model: Path) -> None:
    from selfprog.proposers.transformers import TransformersProposer

    lm = TransformersProposer.load(str(tiny_model), max_new_tokens=16000, edit_mode="free")
    proposals = lm.propose(ProposalRequest(parent_id=1, files={}, prompt="x " * 400, seed=0), 2)
    assert [p.text for p in proposals] == ["", ""]
    assert all("exceed the model's context of 16384" in p.error for p in proposals)


def test_constrained_decoding_makes_even_a_random_model_propose_valid_edits(
    tiny_model: Path, tinylm
) -> None:  # type: ignore[no-untyped-def]
    """The grammar, not the model, guarantees the form: a random model's answers all apply."""
    from selfprog.proposers.menu import Menu
    from selfprog.proposers.transformers import TransformersProposer

    lm = TransformersProposer.load(str(tiny_model), 1.0, max_new_tokens=512)
    assert lm.edit_mode == "constrained" and lm.template == "choose.md"  # auto: a tiny model
    files = {name: (tinylm.root / name).read_text() for name in tinylm.editable}
    proposals = lm.propose(ProposalRequest(1, files, "Improve the program.", seed=5), 4)
    settings = {(lit.path, lit.name) for p in files for lit in tunable_literals(p, files[p])}
    for p in proposals:
        assert not p.error, p.error
        after = apply_edits(files, parse_edits(p.text, tinylm.editable), tinylm.editable, [])
        changed = [name for name in files if after[name] != files[name]]
        assert len(changed) == 1
        assert p.rationale.split(":")[0] in {path for path, _ in settings}
    menu = Menu.of(files)
    bad = Proposal(text="train.py: learning_rate = 42\nReason: no")  # not a listed value
    assert "names no listed setting and value" in menu.proposal(files, bad).error


def test_constrained_answers_of_one_call_differ_and_skip_known_programs(
    tiny_model: Path, tinylm
) -> None:  # type: ignore[no-untyped-def]
    """No two answers of a call make the same edit, and none remakes a program the archive has."""
    from selfprog.proposers.menu import Menu
    from selfprog.proposers.mutate import changed_files, tunable_literals
    from selfprog.proposers.transformers import TransformersProposer
    from selfprog.records import program_hash

    lm = TransformersProposer.load(str(tiny_model), 1.0, max_new_tokens=512)
    files = {"train.py": (tinylm.root / "train.py").read_text()}
    lit = next(x for x in tunable_literals("train.py", files["train.py"]) if x.name == "batch_size")
    known = {program_hash(changed_files(files, [(lit, v)])) for v in (4, 8, 32)}  # all but 64

    def in_archive(program) -> bool:  # type: ignore[no-untyped-def]
        return program_hash(program) in known

    menu = Menu.of(files, in_archive)
    assert [values for x, values, _ in menu.settings if x.name == "batch_size"] == [[64]]
    proposals = lm.propose(ProposalRequest(1, files, "Improve it.", seed=1, known=in_archive), 6)
    texts = [p.text.split("\n\n")[1] for p in proposals if not p.error]  # the SEARCH/REPLACE part
    assert len(texts) == 6 and len(set(texts)) == 6
    for p in proposals:
        after = apply_edits(files, parse_edits(p.text, ["train.py"]), ["train.py"], [])
        assert program_hash(after) not in known


def test_mutate_edits_a_setting_on_a_line_with_non_ascii_text() -> None:
    from selfprog.proposers.mutate import changed_files, tunable_literals

    source = "σ_init = 0.5  # naïve start\nlr = 3e-4\n"
    literals = tunable_literals("model.py", source)
    assert [(lit.name, lit.value) for lit in literals] == [("σ_init", 0.5), ("lr", 3e-4)]
    changed = changed_files({"model.py": source}, [(literals[0], 0.25)])["model.py"]
    assert changed == "σ_init = 0.25  # naïve start\nlr = 3e-4\n"


def test_a_400_that_only_mentions_a_parameter_drops_nothing() -> None:
    from selfprog.proposers.openai import refused_parameter

    sent = {"n", "temperature", "max_tokens"}
    too_long = "'max_tokens' or 'max_completion_tokens' is too large: 2048. This model's maximum"
    assert refused_parameter(json.dumps({"error": {"message": too_long}}), sent) is None
    echoed = {"error": {"message": "validation error", "input": {"temperature": 0.8, "n": 2}}}
    assert refused_parameter(json.dumps(echoed), sent) is None
    other = {"error": {"message": "Unsupported parameter 'n'", "param": "response_format"}}
    assert refused_parameter(json.dumps(other), sent) is None  # the server named another one
    with FakeOpenAI([Reply(400, {"error": {"message": too_long}})]).running() as fake:
        lm = proposer(fake.url)
        assert "is too large" in lm.propose(request(), 1)[0].error
    assert lm.dropped == set()


def test_a_bad_key_or_url_is_a_config_error_that_never_shows_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    section = ProposerSection(kind="openai", base_url="http://127.0.0.1:9/v1", model="m")
    monkeypatch.setenv("OPENAI_API_KEY", "  sk-abc\n")
    assert OpenAIProposer.from_config(section).api_key == "sk-abc"  # stripped
    monkeypatch.setenv("OPENAI_API_KEY", "sk-\u00e9t\u00e9")
    with pytest.raises(ConfigError, match="characters no HTTP header can carry") as caught:
        OpenAIProposer.from_config(section)
    assert "sk-" not in str(caught.value)
    with pytest.raises(ConfigError, match="must start with http"):
        OpenAIProposer.from_config(
            ProposerSection(kind="openai", base_url="localhost:8/v1", model="m")
        )


def test_the_menu_is_shuffled_per_call_and_the_reason_comes_first(tinylm: Target) -> None:
    import random

    from selfprog.proposers.menu import Menu

    files = seed_files(tinylm)
    menu = Menu.of(files)
    orders = {seed: Menu.of(files).shuffled(random.Random(seed)).describe() for seed in (1, 2)}
    assert orders[1] == menu.shuffled(random.Random(1)).describe()  # seeded
    assert orders[1] != orders[2] and orders[1] != menu.describe()
    assert menu.grammar().startswith('start: "Reason: " REASON')
    lit, values, _ = menu.settings[0]
    answer = Proposal(text=f"Reason: it should help\n{lit.path}: {lit.name} = {values[0]}")
    chosen = menu.proposal(files, answer)
    assert not chosen.error and chosen.rationale.endswith("it should help")


def test_a_local_model_that_cannot_serve_the_run_is_refused_before_it_starts(
    tiny_model: Path, tmp_path: Path
) -> None:
    """What transformers or llguidance would raise mid-run is one line at load instead."""
    import shutil

    from selfprog.proposers.transformers import TransformersProposer

    with pytest.raises(ConfigError, match=r"temperature must be above 0, not 0"):
        TransformersProposer.load(str(tiny_model), temperature=0.0)
    unknown = tmp_path / "unknown"
    shutil.copytree(tiny_model, unknown)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "nope"}))
    with pytest.raises(ConfigError, match=r"cannot load the model .*nope"):
        TransformersProposer.load(str(unknown))


def test_a_constrained_local_model_needs_a_tokenizer_llguidance_reads(tiny_model: Path) -> None:
    from selfprog.proposers.transformers import TransformersProposer, grammar_vocabulary

    lm = TransformersProposer.load(str(tiny_model), edit_mode="constrained")
    assert lm.vocabulary is not None  # read once at load, not at every call

    class SlowTokenizer:  # the kind llguidance.hf refuses ("Only fast tokenizers")
        pass

    with pytest.raises(ConfigError, match=r"need a fast tokenizer.*SlowTokenizer.*edit_mode=free"):
        grammar_vocabulary(SlowTokenizer(), "m")


def test_a_proxy_setting_the_client_cannot_use_is_refused_before_the_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    section = ProposerSection(kind="openai", base_url="https://example.invalid/v1", model="m")
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "ftp://proxy.invalid:21")
    with pytest.raises(ConfigError, match=r"proxy and certificate settings: ValueError"):
        OpenAIProposer.from_config(section)
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setenv("SSL_CERT_FILE", "/nonexistent/ca.pem")
    with pytest.raises(ConfigError, match=r"FileNotFoundError"):
        OpenAIProposer.from_config(section)
