"""Served models: constrained edits over an endpoint (a fake server for each fault), and a
real `transformers serve` of SmolLM2 driven by a short run, free then constrained."""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from selfprog import models
from selfprog.cli import main
from selfprog.config import ProposerSection
from selfprog.edits import apply_edits, parse_edits
from selfprog.errors import Outage
from selfprog.proposers import numbered
from selfprog.proposers.base import ProposalRequest
from selfprog.proposers.menu import Menu
from selfprog.proposers.openai import OpenAIProposer
from selfprog.target import Target
from tests.fakes import FakeOpenAI, Reply, chat


def files_of(target: Target) -> dict[str, str]:
    return {name: (target.root / name).read_text() for name in target.editable}


def chooser(url: str) -> OpenAIProposer:
    return OpenAIProposer(
        base_url=url, model="m", timeout=2.0, attempts=2, backoff_initial=0.05,
        edit_mode="constrained",
    )  # fmt: skip


def answer(option: str, reason: str = "a smaller step is steadier") -> str:
    return json.dumps({"reason": reason, "choice": option})


def numbered_rows(request: dict) -> list[str]:  # type: ignore[type-arg]
    """Returns the options a numbered question lists, without their numbers."""
    asked = [m["content"] for m in request["body"]["messages"] if "Changes:" in m["content"]][-1]
    return [line.split(". ", 1)[1] for line in asked.split("\n") if re.match(r"\d+\. ", line)]


def schema_enum(request: dict) -> list[str]:  # type: ignore[type-arg]
    form = request["body"]["response_format"]
    schema = form["json_schema"]["schema"] if form["type"] == "json_schema" else form["schema"]
    return schema["properties"]["choice"]["enum"]


def test_constrained_answers_come_from_the_menus_schema_and_become_edits(tinylm: Target) -> None:
    files = files_of(tinylm)
    options = Menu.of(files).options
    script = [chat(answer(options[0])), chat(answer(options[-1])), chat(*map(answer, options[1:3]))]
    with FakeOpenAI(script).running() as fake:
        lm = chooser(fake.url)
        proposals = lm.propose(ProposalRequest(1, files, "tune it", seed=3), 2)
        proposals += lm.propose(ProposalRequest(1, files, "tune it", seed=4), 2)
    body = fake.requests[0]["body"]
    assert sorted(schema_enum(fake.requests[0])) == sorted(options)
    assert "n" not in body and body["max_tokens"] < 300  # a short answer, not 2048 tokens
    assert body["messages"][1]["content"].rstrip().endswith("one of its values from the list.")
    # the run's first call asks for one answer: is the schema enforced? Then k in one call
    assert lm.enforced and fake.requests[2]["body"]["n"] == 2 and len(fake.requests) == 3
    edited = []
    for p in proposals:
        assert not p.error, p.error
        assert p.rationale.endswith("a smaller step is steadier")
        after = apply_edits(files, parse_edits(p.text, tinylm.editable), tinylm.editable, [])
        edited.append(after)
    assert all(after != files for after in edited) and edited[0] != edited[1]


def test_a_repeated_choice_is_asked_again_without_it_and_every_token_counted(
    tinylm: Target,
) -> None:
    files = files_of(tinylm)
    options = Menu.of(files).options
    first = chat(answer(options[0]), answer(options[0]), prompt_tokens=900, completion_tokens=80)
    second = chat(answer(options[1]), prompt_tokens=880, completion_tokens=30)
    with FakeOpenAI([first, second]).running() as fake:
        proposals = chooser(fake.url).propose(ProposalRequest(1, files, "tune it", seed=3), 2)
    assert len(fake.requests) == 2
    assert options[0] not in schema_enum(fake.requests[1])
    assert options[0] not in fake.requests[1]["body"]["messages"][1]["content"].split("# Answer")[0]
    assert [p.error for p in proposals] == ["", ""]
    assert proposals[0].text != proposals[1].text
    assert sum(p.tokens_in for p in proposals) == 1780
    assert sum(p.tokens_out for p in proposals) == 110


def test_a_server_refusing_structured_output_is_asked_without_it(
    tinylm: Target, caplog: pytest.LogCaptureFixture
) -> None:
    files = files_of(tinylm)
    options = Menu.of(files).options
    refusal = Reply(
        400,
        {"error": {"message": "response_format is not supported", "param": "response_format"}},
    )
    lines = f"Reason: worth a try\n{options[2]}"
    script = [refusal, refusal, chat(lines), chat("2")]
    with caplog.at_level(logging.WARNING), FakeOpenAI(script).running() as fake:
        lm = chooser(fake.url)
        proposals = lm.propose(ProposalRequest(1, files, "tune it", seed=3), 2)
    forms = [r["body"].get("response_format", {}).get("type") for r in fake.requests]
    assert forms == ["json_schema", "json_object", None, None]  # OpenAI's, llama.cpp's, none
    assert schema_enum(fake.requests[1]) == schema_enum(fake.requests[0])
    assert lm.dropped == {"response_format"}
    assert proposals[0].error == "" and proposals[0].rationale.endswith("worth a try")
    # then by number, the server enforcing nothing
    assert "refused response_format; from now on the menu is asked for by number" in caplog.text
    assert numbered_rows(fake.requests[3]) and proposals[1].error == ""


def test_a_server_ignoring_structured_output_is_asked_by_number_from_then_on(
    tinylm: Target, caplog: pytest.LogCaptureFixture
) -> None:
    """As `transformers serve`: the first answer is prose; from then on one number per call,
    with a worked example first, and every call's tokens counted."""
    files = files_of(tinylm)
    prose = chat(
        "The next section is about what worked.", prompt_tokens=4000, completion_tokens=200
    )
    numbers = [
        chat(x, prompt_tokens=600, completion_tokens=2) for x in ("1", "Option 2.", "3", "1")
    ]
    with caplog.at_level(logging.WARNING), FakeOpenAI([prose, *numbers]).running() as fake:
        lm = chooser(fake.url)
        first = lm.propose(ProposalRequest(1, files, "tune it", seed=3), 2)
        second = lm.propose(ProposalRequest(1, files, "tune it", seed=4), 2)
    assert [p.error for p in first + second] == ["", "", "", ""]
    assert caplog.text.count("ignored response_format") == 1
    assert "asked for by number" in caplog.text and lm.enforced is False
    assert len(fake.requests) == 5 and "response_format" in fake.requests[0]["body"]
    for request in fake.requests[1:]:
        body = request["body"]
        assert "response_format" not in body and "n" not in body and body["max_tokens"] <= 16
        example, *_ = body["messages"][1:]
        assert example["content"].endswith(numbered.ASK) and body["messages"][2] == {
            "role": "assistant",
            "content": numbered.EXAMPLE_ANSWER,
        }
    assert sum(p.tokens_in for p in first) == 4000 + 2 * 600
    assert sum(p.tokens_out for p in first) == 200 + 2 * 2
    # the next question lists the other settings before the one chosen (a small model leans
    # to the top of a list), each setting once before any twice
    chosen = numbered_rows(fake.requests[1])[0].split(" = ")[0]
    listed = [row.split(" = ")[0] for row in numbered_rows(fake.requests[2])]
    assert len(listed) == numbered.LISTED and list(dict.fromkeys(listed))[-1] == chosen


def test_an_answer_by_number_becomes_the_edit_of_the_option_listed_under_it(
    tinylm: Target,
) -> None:
    files = files_of(tinylm)
    script = [chat("Sure! Here is"), chat("I choose 3 because a smaller step is steadier")]
    with FakeOpenAI(script).running() as fake:
        [p] = chooser(fake.url).propose(ProposalRequest(1, files, "tune it", seed=3), 1)
    assert not p.error, p.error
    name, value = numbered_rows(fake.requests[1])[2].split(" (now")[0].split(" = ")
    after = apply_edits(files, parse_edits(p.text, tinylm.editable), tinylm.editable, [])
    changed = [x for f in after for x in after[f].split("\n") if x not in files[f].split("\n")]
    assert len(changed) == 1 and re.match(rf"\s*{name}\b.*= {value}\b", changed[0]), changed
    assert p.rationale.endswith(f"{value}: because a smaller step is steadier")


def test_an_answer_that_does_not_read_is_asked_once_more_with_what_was_wrong(
    tinylm: Target,
) -> None:
    files = files_of(tinylm)
    prose = chat("Sure! Here is", prompt_tokens=4000, completion_tokens=200)
    tries = [chat(x, prompt_tokens=600, completion_tokens=3) for x in ("5 or 6", "6", "99", "99")]
    with FakeOpenAI([prose, *tries]).running() as fake:
        lm = chooser(fake.url)
        [read] = lm.propose(ProposalRequest(1, files, "tune it", seed=3), 1)
        [unread] = lm.propose(ProposalRequest(1, files, "tune it", seed=4), 1)
    assert read.error == "" and (read.tokens_in, read.tokens_out) == (4000 + 1200, 200 + 6)
    asked = fake.requests[2]["body"]["messages"]
    assert asked[-2] == {"role": "assistant", "content": "5 or 6"}
    assert asked[-1]["content"].startswith("Your answer names more than one option (5 and 6).")
    assert numbered_rows(fake.requests[2]) == numbered_rows(fake.requests[1])  # the same list
    assert unread.error == "the answer names 99, not an option from 1 to 20: '99'"
    assert len(fake.requests) == 5 and unread.tokens_in == 1200  # twice, then invalid


def test_auto_constrains_a_model_whose_name_says_it_is_small() -> None:
    def mode(model: str, edit_mode: str = "auto") -> str:
        section = ProposerSection(
            kind="openai", base_url="http://127.0.0.1:9/v1", model=model, edit_mode=edit_mode
        )
        return OpenAIProposer.from_config(section).edit_mode

    assert mode("HuggingFaceTB/SmolLM2-135M-Instruct") == "constrained"
    assert mode("qwen2.5:0.5b") == "constrained"
    assert mode("meta-llama/Llama-3.1-8B-Instruct") == "free"
    assert mode("gpt-4o") == "free"  # no size in the name
    assert mode("gpt-4o", "constrained") == "constrained"
    assert mode("SmolLM2-135M", "free") == "free"


def test_a_menu_with_nothing_left_is_an_error_on_every_proposal_and_no_call() -> None:
    with FakeOpenAI([]).running() as fake:
        proposals = chooser(fake.url).propose(ProposalRequest(1, {"a.py": "X = 1\n"}, "p", 1), 2)
    assert fake.requests == []
    assert all("found none" in p.error for p in proposals)


def test_calls_refused_in_a_row_stop_the_run_with_the_servers_words() -> None:
    """A model the server does not serve fails every call: the third stops the run."""
    pinned = Reply(400, {"detail": "Server is pinned to 'smollm2'; requested 'gpt-4o'."})
    script = [pinned, pinned, chat("Reason: fine\nnothing"), pinned, pinned, pinned]
    with FakeOpenAI(script).running() as fake:
        lm = OpenAIProposer(base_url=fake.url, model="gpt-4o", timeout=2.0, attempts=2)
        request = ProposalRequest(1, {}, "p", 1)
        for _ in range(3):  # two refusals, then an answer: the streak starts again
            assert len(lm.propose(request, 1)) == 1
        assert all(p.error for p in lm.propose(request, 1) + lm.propose(request, 1))
        with pytest.raises(Outage, match=r"refused 3 calls in a row.*pinned to 'smollm2'"):
            lm.propose(request, 1)
    assert len(fake.requests) == 6


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Yields the base_url and model name of `transformers serve` with SmolLM2 on loopback."""
    folder = models.fetch("smollm2")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [str(Path(sys.executable).with_name("transformers")), "serve", str(folder)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"transformers serve did not come up:\n{log.read_text()[-2000:]}")
                time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1", str(folder)
    finally:
        server.terminate()
        server.wait(30)


def test_a_run_against_transformers_serve_free_then_constrained(
    served: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole path through a real server: requests it takes, ignores or refuses, a token
    ledger from its usage, every proposal recorded with its outcome, steering the edit mode."""
    from selfprog.rundir import open_run

    url, model = served
    run_dir = tmp_path / "run"
    settings = [f"proposer.base_url={url}", f"proposer.model={model}", "proposer.edit_mode=free"]
    settings += [
        "proposer.max_new_tokens=96",
        "selection.noise_seeds=1",
        "selection.confirm_seeds=1",
    ]
    args = ["run", "--run-dir", str(run_dir), "--runner", "local", "--proposer", "openai"]
    args += ["--generations", "1", "--population", "2", "--budget-steps", "20"]
    assert main(args + [f"--set={s}" for s in settings]) == 0
    capsys.readouterr()
    assert (
        main(["resume", str(run_dir), "--generations=2", "--set=proposer.edit_mode=constrained"])
        == 0
    )
    said = "".join(capsys.readouterr())
    run = open_run(run_dir)
    calls = run.archive.db.execute(
        "SELECT generation, k, tokens_in, tokens_out, model FROM calls ORDER BY generation"
    ).fetchall()
    assert [(g, k) for g, k, *_ in calls] == [(1, 2), (2, 2)]
    for _, _, tokens_in, tokens_out, served_model in calls:
        assert tokens_in > 1000 and 0 < tokens_out <= 2 * 200, calls  # the server's own usage
        assert served_model == model
    proposals = run.archive.db.execute(
        "SELECT calls.generation, proposals.response, proposals.error, proposals.finish "
        "FROM proposals JOIN calls ON calls.id = proposals.call_id ORDER BY proposals.id"
    ).fetchall()
    assert len(proposals) == 4 and all(response or error for _, response, error, _ in proposals)
    children = [c for c in run.archive.candidates() if c.generation > 0]
    assert len(children) == 4
    for child in children:  # each one scored, or refused with its reason: nothing lost
        assert child.state in ("ok", "invalid", "duplicate", "failed", "over_budget"), child
        assert child.state != "invalid" or child.reason, child
    # transformers serve takes no response_format: the run says so, and asks by number
    assert "ignored response_format" in said and "asked for by number" in said
    constrained = [c for c in children if c.generation == 2]
    assert all(c.state != "invalid" for c in constrained), [c.reason for c in constrained]


def test_a_small_model_on_transformers_serve_makes_valid_proposals_by_number(
    served: tuple[str, str], tinylm: Target
) -> None:
    """transformers serve ignores response_format: SmolLM2-135M asked for JSON made 0 of 9
    valid proposals, continuing the prompt; asked by number, at least 90 % are valid.

    This holds the form of its answers, not their judgment: the model mostly answers 1, and a
    server that always did would pass too (the menu is shuffled per call)."""
    from bench.proposals import valid
    from selfprog.prompt import build_prompt
    from selfprog.records import Candidate

    url, model = served
    files = files_of(tinylm)
    parent = Candidate(1, 0, None, None, None, "ok", 3.3, {}, "", "", {}, "", "", None, 1, 3, True)
    prompt = build_prompt(tinylm, parent, files, "30 s of training", [], [], 6000, "choose.md")
    lm = OpenAIProposer(
        base_url=url, model=model, max_new_tokens=16, timeout=120.0, edit_mode="constrained"
    )  # 16: the one answer asked for as JSON (to see the schema is ignored) stops early
    proposals = [
        p for seed in range(5) for p in lm.propose(ProposalRequest(1, files, prompt, seed), 4)
    ]
    wrong = [valid(p, files, list(tinylm.editable), list(tinylm.fixed)) for p in proposals]
    assert len(proposals) == 20 and sum(not w for w in wrong) >= 18, wrong
    assert lm.enforced is False  # seen, and asked by number from then on
    assert all(p.tokens_in > 0 and p.tokens_out > 0 for p in proposals)  # the server's usage
    assert len({p.text for p in proposals if not p.error}) >= 10  # not one choice over and over


def test_an_answer_that_is_not_utf8_or_empty_is_recorded_with_its_reason(tinylm: Target) -> None:
    raw = json.dumps(chat("placeholder").body).encode().replace(b"placeholder", b"\xff\xfe 3")
    files = files_of(tinylm)
    with FakeOpenAI([Reply(200, raw), chat(""), chat("")]).running() as fake:
        lm = chooser(fake.url)
        lm.enforced = False  # a server seen to ignore the schema: asked by number
        garbled = lm.propose(ProposalRequest(1, files, "p", 1), 1)
        empty = lm.propose(ProposalRequest(1, files, "p", 2), 1)  # and a second try, as empty
    assert not garbled[0].error  # bytes that are not UTF-8 read as "?": the number stands
    assert empty[0].error == "the answer is empty: ''" and len(fake.requests) == 3


def test_a_reason_cannot_smuggle_an_edit_off_the_menu(tinylm: Target) -> None:
    """Line breaks of any kind in a reason (here \\r, which parse_edits splits on) are spaces."""
    files = files_of(tinylm)
    option = next(o for o in Menu.of(files).options if "batch_size" in o)
    block = "train.py\r<<<<<<< SEARCH\rlog_every = 25\r=======\rimport os; log_every = 25\r>>>>>>> REPLACE"
    texts = [f"Reason: x\r{block}\n{option}", answer(option, reason=f"x\r{block}\u2028")]
    # by number, an answer quoting `name = value` of no listed option is refused: this one quotes none
    bare = "train.py\r<<<<<<< SEARCH\rimport math\r=======\rimport os\r>>>>>>> REPLACE"
    for script in ([chat(texts[0])], [chat(texts[1])], [chat("prose"), chat(f"1 x\r{bare}\x85")]):
        with FakeOpenAI(script).running() as fake:  # the last by number: a reason follows it
            [p] = chooser(fake.url).propose(ProposalRequest(1, files, "tune", seed=1), 1)
        assert not p.error, p.error
        after = apply_edits(files, parse_edits(p.text, tinylm.editable), tinylm.editable, [])
        changed = [x for f in after for x in after[f].split("\n") if x not in files[f]]
        setting = "batch_size" if len(script) == 1 else numbered_rows(fake.requests[1])[0]
        assert len(changed) == 1 and setting.split(" = ")[0] in changed[0], changed
    assert "[^\\r\\n]" in Menu.of(files).grammar()  # the local grammar allows no \r either


def test_a_setting_named_twice_in_a_file_is_offered_once() -> None:
    source = "dropout = 0.1\nclass A:\n    dropout = 0.2\nclass B:\n    dropout = 0.3\n"
    options = Menu.of({"model.py": source}).options
    assert len(options) == len(set(options)) and all("dropout" in o for o in options)
    assert all(float(o.split("= ")[1]) > 0 for o in Menu.of({"model.py": "p = 0.5\n"}).options)


def test_a_server_answering_one_at_a_time_sees_the_menu_shrink(tinylm: Target) -> None:
    files = files_of(tinylm)
    options = Menu.of(files).options
    with FakeOpenAI([chat(answer(options[0])), chat(answer(options[1]))]).running() as fake:
        lm = chooser(fake.url)
        lm.dropped.add("n")  # as llama.cpp's server, once it refused n
        proposals = lm.propose(ProposalRequest(1, files, "tune", seed=2), 2)
    assert [p.error for p in proposals] == ["", ""]
    assert options[0] in schema_enum(fake.requests[0])
    assert options[0] not in schema_enum(fake.requests[1])


def test_odd_reply_shapes_are_read_or_recorded_never_a_crash(tinylm: Target) -> None:
    files = files_of(tinylm)
    option = Menu.of(files).options[0]
    parts = chat("")
    parts.body["choices"][0]["message"]["content"] = [{"type": "text", "text": answer(option)}]
    parts.body["usage"] = {"prompt_tokens": "n/a", "completion_tokens": -5}
    surrogate = chat(answer(option, reason="\ud800 odd"))
    deep = chat("[" * 5000)
    with FakeOpenAI([parts, surrogate, deep]).running() as fake:
        lm = chooser(fake.url)
        read, odd, nested = (lm.propose(ProposalRequest(1, files, "p", s), 1)[0] for s in (1, 2, 3))
    assert not read.error and (read.tokens_in, read.tokens_out) == (0, 0)
    assert not odd.error
    odd.text.encode("utf-8")  # storable: the archive encodes it
    assert "names no listed setting" in nested.error


def test_a_context_length_in_the_name_is_not_the_size() -> None:
    from selfprog.proposers.openai import size_in_name

    assert size_in_name("Qwen/Qwen2.5-7B-Instruct-1M") == 7e9
    assert size_in_name("THUDM/glm-4-9b-chat-1m") == 9e9
    assert size_in_name("HuggingFaceTB/SmolLM2-135M-Instruct") == 135e6


def test_a_validation_error_labelled_500_is_a_refusal_not_an_outage(tinylm: Target) -> None:
    """llama-cpp-python's server answers a response_format it does not take with a 500."""
    files = files_of(tinylm)
    option = Menu.of(files).options[0]
    message = (
        "1 validation error: {'type': 'literal_error', 'loc': ('body', 'response_format', "
        "'type'), 'msg': \"Input should be 'text' or 'json_object'\", 'input': 'json_schema'}"
    )
    script = [Reply(500, {"error": {"message": message}}), chat(answer(option))]
    with FakeOpenAI(script).running() as fake:
        [p] = chooser(fake.url).propose(ProposalRequest(1, files, "tune", seed=1), 1)
    assert not p.error and len(fake.requests) == 2  # not retried as a server error
    assert fake.requests[1]["body"]["response_format"]["type"] == "json_object"


def test_whether_a_server_enforces_the_schema_is_judged_by_answers_that_read(
    tinylm: Target,
) -> None:
    """A first answer that only starts like JSON is no proof; a fenced one that reads is;
    and two answers in a row that do not read overturn an earlier verdict."""
    files = files_of(tinylm)
    option = Menu.of(files).options[0]
    fenced = chat(f"```json\n{answer(option)}\n```")
    prose = chat('{"reason": "a smaller learning rate, because it is steadier."} I think.')
    with FakeOpenAI([prose, chat("1")]).running() as fake:
        lm = chooser(fake.url)
        [p] = lm.propose(ProposalRequest(1, files, "tune", seed=1), 1)
    assert lm.enforced is False and not p.error  # asked again by number
    with FakeOpenAI([fenced]).running() as fake:
        lm = chooser(fake.url)
        [p] = lm.propose(ProposalRequest(1, files, "tune", seed=1), 1)
    assert lm.enforced is True and not p.error
    script = [chat("prose, not a choice")] * 2 + [chat("1")]
    with FakeOpenAI(script).running() as fake:  # a proposer that has seen it enforced
        lm = chooser(fake.url)
        lm.enforced = True
        one = lm.propose(ProposalRequest(1, files, "tune", seed=2), 1)
        two = lm.propose(ProposalRequest(1, files, "tune", seed=3), 1)
    assert "names no listed setting" in one[0].error and lm.enforced is False
    assert not two[0].error and numbered_rows(fake.requests[2])  # asked again, by number


def test_a_refused_first_call_answers_for_the_whole_call(tinylm: Target) -> None:
    """Undecided whether the schema is enforced, the first call asks for one answer: a refusal
    still fills all k proposals with its reason, as one call, not k calls in a row."""
    files = files_of(tinylm)
    too_long = Reply(400, {"error": {"message": "maximum context length is 2048 tokens"}})
    with FakeOpenAI([too_long]).running() as fake:
        proposals = chooser(fake.url).propose(ProposalRequest(1, files, "tune", seed=1), 4)
    assert len(fake.requests) == 1 and len(proposals) == 4
    assert all("maximum context length" in p.error for p in proposals)


def test_a_reason_shows_no_escape_or_control_character(tinylm: Target) -> None:
    files = files_of(tinylm)
    option = Menu.of(files).options[0]
    hostile = "\x1b[2J\x1b]0;pwned\x07 ok\x00\u202e"
    with FakeOpenAI([chat(answer(option, reason=hostile))]).running() as fake:
        [p] = chooser(fake.url).propose(ProposalRequest(1, files, "tune", seed=1), 1)
    assert not p.error
    for ch in ("\x1b", "\x07", "\x00", "\u202e"):
        assert ch not in p.rationale and ch not in p.text, repr(p.rationale)
