"""How often does a local model's proposal become a valid edit, free-form and constrained?

The real prompt for the tinylm seed (no history yet) goes to the
`transformers` proposer in each edit mode, side by side in one run. A
proposal is valid when it parses, applies to the parent and every edited
file compiles, and it changes the program. Prints, per mode, the valid
share, proposals per minute and tokens per proposal, then
`valid_free=A valid_constrained=B`.

    python bench/proposals.py                  # smollm2 (fetch it first), 3 calls x 4
    python bench/proposals.py --model PATH --calls 5
    python bench/proposals.py --endpoint http://127.0.0.1:8000/v1 --model NAME   # a served model
"""

from __future__ import annotations

import argparse
import time

from selfprog.edits import EditError, apply_edits, parse_edits
from selfprog.prompt import build_prompt
from selfprog.proposers.base import Proposal, ProposalRequest
from selfprog.proposers.mutate import tunable_literals
from selfprog.proposers.openai import OpenAIProposer
from selfprog.proposers.transformers import TransformersProposer
from selfprog.records import Candidate
from selfprog.target import load_target


def valid(proposal: Proposal, files: dict[str, str], editable: list[str], fixed: list[str]) -> str:
    """Returns "" for a valid edit, else why not."""
    if proposal.error:
        return proposal.error
    try:
        edits = parse_edits(proposal.text, editable)
        if not edits:
            return "no edit found"
        after = apply_edits(files, edits, editable, fixed)
    except EditError as exc:
        return str(exc)
    return "" if after != files else "changes nothing"


def changed_settings(proposal: Proposal, files: dict[str, str], editable: list[str]) -> set[str]:
    """Returns the settings (file: name) whose values a valid proposal changed."""
    after = apply_edits(files, parse_edits(proposal.text, editable), editable, [])
    before = {
        (lit.path, lit.name): lit.value for p in files for lit in tunable_literals(p, files[p])
    }
    now = {(lit.path, lit.name): lit.value for p in after for lit in tunable_literals(p, after[p])}
    return {f"{path}: {name}" for (path, name), v in now.items() if before.get((path, name)) != v}


def main() -> None:
    parser = argparse.ArgumentParser(description="valid proposals of a local model, per edit mode")
    parser.add_argument("--model", default="smollm2", help="a fetched alias or a model folder")
    parser.add_argument(
        "--endpoint", help="an OpenAI-compatible base_url: ask the model it serves as --model"
    )
    parser.add_argument("--calls", type=int, default=3, help="proposer calls per mode (3)")
    parser.add_argument("--k", type=int, default=4, help="proposals per call (4)")
    parser.add_argument("--free-tokens", type=int, default=384, help="new tokens, free mode")
    parser.add_argument(
        "--modes", default="free,constrained", help="edit modes to run, comma-separated"
    )
    args = parser.parse_args()
    target = load_target("tinylm")
    files = {name: (target.root / name).read_text() for name in target.editable}
    seed = Candidate(1, 0, None, None, None, "ok", 3.3, {}, "", "", {}, "", "", None, 1, 3, True)
    proposer: TransformersProposer | OpenAIProposer
    if args.endpoint:
        proposer = OpenAIProposer(
            args.endpoint, args.model, max_new_tokens=args.free_tokens, timeout=600.0
        )
    else:
        proposer = TransformersProposer.load(args.model, 0.8, args.free_tokens, "free")
    shares = {"free": float("nan"), "constrained": float("nan")}
    for mode in args.modes.split(","):
        proposer.edit_mode = mode
        prompt = build_prompt(
            target, seed, files, "30 s of training", [], [], 6000, proposer.template
        )
        results: list[str] = []
        settings: set[str] = set()  # which settings the valid proposals changed
        tokens_in = tokens_out = 0
        start = time.perf_counter()
        for call in range(args.calls):
            request = ProposalRequest(parent_id=1, files=files, prompt=prompt, seed=call)
            for p in proposer.propose(request, args.k):
                results.append(valid(p, files, list(target.editable), list(target.fixed)))
                if not results[-1]:
                    settings |= changed_settings(p, files, list(target.editable))
                tokens_in += p.tokens_in
                tokens_out += p.tokens_out
        minutes = (time.perf_counter() - start) / 60
        n = len(results)
        shares[mode] = sum(not r for r in results) / n
        print(
            f"{mode:12s} valid {n - sum(map(bool, results))}/{n} ({shares[mode]:.0%})  "
            f"{n / minutes:.1f} proposals/min  prompt {tokens_in / args.calls:.0f} tokens/call  "
            f"output {tokens_out / n:.0f} tokens/proposal  "
            f"distinct settings changed {len(settings)} ({', '.join(sorted(settings))})"
        )
        for reason in sorted({r for r in results if r}):
            print(f"    {results.count(reason)}x {reason[:110]}")
    print(f"valid_free={shares['free']:.3f} valid_constrained={shares['constrained']:.3f}")


if __name__ == "__main__":
    main()
