"""Verbs that score one program: eval, target export, image build."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from selfprog.cli.common import EXIT_ERROR, EXIT_NOT_OK, parse_size, positive
from selfprog.errors import SelfprogError

log = logging.getLogger("selfprog")
EVAL_SEED = {"selfprog.run": "eval", "selfprog.candidate": "seed"}  # the seed measured first


def cmd_eval(args: argparse.Namespace) -> int:
    from selfprog import gpus
    from selfprog.data import prepare_data
    from selfprog.runners import Limits, make_runner
    from selfprog.runners.base import cpus_here
    from selfprog.scheduler import runner_gpus
    from selfprog.scoring import State, ceilings, score_program
    from selfprog.target import BUNDLED, TARGET_FILE, bundled_root, load_target
    from selfprog.targetcheck import require_private_heldout

    where = args.target
    own = Path(args.program or ".") / TARGET_FILE
    if where is None and args.program and own.is_file():
        # a bundled target's own target.toml (`target export`): that target, our code, scores it
        same = [
            n for n in BUNDLED if (bundled_root(n) / TARGET_FILE).read_bytes() == own.read_bytes()
        ]
        where = same[0] if same else None
    if where is None:
        if args.program and own.is_file():
            # its prepare would run on this machine, outside the sandbox, and its evaluator
            # would grade it: a folder's own target is used when asked for by name
            raise SelfprogError(
                f"{args.program} has its own {TARGET_FILE}: score it against it with "
                f"`--target {args.program}` (its prepare runs on this machine, unsandboxed: "
                "trust the folder first), or against a bundled target with `--target tinylm`"
            )
        where = "tinylm"
    target = load_target(where)
    if args.timeout is not None:
        target = dataclasses.replace(
            target, budget=dataclasses.replace(target.budget, timeout=args.timeout)
        )
    program = Path(args.program) if args.program else target.root
    seconds, steps = None, None
    if args.budget_seconds is not None:
        seconds, steps = args.budget_seconds, 0
    if args.budget_steps is not None:
        seconds, steps = 0, args.budget_steps
    request = "0" if args.gpus is None else args.gpus  # eval: no GPU unless asked for
    slots = gpus.slot_devices(request, 1, False, gpus.visible())
    cpus = cpus_here(args.cpus)
    runner = make_runner(args.runner, args.image)
    if slots and not runner_gpus(runner, request):
        slots = []
    limits = Limits(memory_bytes=args.memory, cpus=cpus, gpus=slots[0] if slots else None)
    data = prepare_data(target, args.data_cache, args.corpus)
    require_private_heldout(target, data, runner, limits)
    with tempfile.TemporaryDirectory(prefix="selfprog-eval-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        score = functools.partial(
            score_program,
            target,
            runner=runner,
            data=data,
            limits=limits,
            seed=args.seed,
            budget_seconds=seconds,
            budget_steps=steps,
        )
        held = None
        seconds_now = target.budget.seconds if seconds is None else seconds
        steps_now = target.budget.steps if steps is None else steps
        only_steps = steps_now > 0 and not seconds_now
        if not _is_seed(target, program):
            # as in a run: training under a seconds budget (its allowance for start-up and
            # saving), a step budget (steps cannot be counted from outside) and the evaluation
            # (where candidate code could go on training) are held to the seed's times
            log.info("scoring the seed first: %s is held to the seed's time", program)
            measured = score(
                program_dir=target.root,
                work_dir=work / "seed",
                labels=EVAL_SEED,
                # else one step: its evaluation's time, and its training's all start-up and saving
                budget_seconds=seconds if only_steps else 0,
                budget_steps=steps if only_steps else 1,
            )
            if measured.state is not State.OK:
                raise SelfprogError(
                    f"the seed ended {measured.state.value} ({measured.reason}): "
                    "without its time the program's cannot be held"
                )
            held = ceilings([measured.timings], target, seconds_now, steps_now, seed_seconds=0)
            log.info(
                "the seed was evaluated in %.1fs: %s may be evaluated %.0fs%s",
                measured.timings["evaluate"],
                program,
                held.evaluate,
                f" and train {held.train:.0f}s" if held.train else "",
            )
        result = score(
            program_dir=program,
            work_dir=work,
            ceilings=held,
            labels={"selfprog.run": "eval", "selfprog.candidate": program.name or "program"},
        )
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(format_result(result, target.metric, target.direction))
    return 0 if result.state is State.OK else EXIT_NOT_OK


def _is_seed(target: Any, program: Path) -> bool:
    """Returns whether program's editable files are the target's seed's."""
    try:
        return all(
            (program / name).read_bytes() == (target.root / name).read_bytes()
            for name in target.editable
        )
    except OSError:
        return False


def format_result(result: object, metric: str, direction: str) -> str:
    """Returns the readable summary of a scoring result."""
    from selfprog.scoring import Result, State

    assert isinstance(result, Result)
    lines = [f"state    {result.state.value}"]
    if result.state is State.OK and result.score is not None:
        lines.append(f"score    {metric} = {result.score:.4f} ({direction})")
        others = {k: v for k, v in result.metrics.items() if k != metric}
        lines.append("metrics  " + ", ".join(f"{k}={_short(v)}" for k, v in others.items()))
    else:
        lines.append(f"reason   {result.reason}")
    lines.append("timings  " + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()))
    lines.append(f"data     {result.data_hash[:16]}")
    if result.state is not State.OK and result.log_tail:
        tail = result.log_tail.rstrip().splitlines()[-15:]
        lines += ["log tail:", *("  " + line for line in tail)]
    return "\n".join(lines)


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def cmd_target_export(args: argparse.Namespace) -> int:
    from selfprog.target import export_target

    written = export_target(args.target, Path(args.dest))
    print(f"wrote {len(written)} files to {args.dest}")
    return 0


def cmd_target_new(args: argparse.Namespace) -> int:
    from selfprog.scaffold import new_target

    dest = Path(args.dir or args.name)
    written = new_target(args.name, dest, args.template)
    print(
        f"wrote target {args.name} ({args.template}, {len(written)} files) to {dest}; "
        f"check it with: selfprog target check {dest}"
    )
    return 0


def cmd_target_check(args: argparse.Namespace) -> int:
    from selfprog.runners import Limits, make_runner
    from selfprog.runners.base import cpus_here
    from selfprog.target import load_target
    from selfprog.targetcheck import check_target

    target = load_target(args.target)  # every target.toml problem, the unsafe ones too, at once
    print(f"ok    {target.name}: target.toml is complete and safe as written")
    runner = make_runner(args.runner, args.image)
    limits = Limits(memory_bytes=args.memory, cpus=cpus_here(None))
    findings = check_target(target, runner, limits, args.budget_steps)
    for finding in findings:
        print(f"{finding.status:<5} {finding.what}", flush=True)
    failed = [f for f in findings if f.status == "fail"]
    if failed:
        print(f"{target.root}: {len(failed)} check(s) failed", file=sys.stderr)
        return EXIT_NOT_OK
    print(f"{target.root}: ready: selfprog run --target {args.target}")
    return 0


def cmd_image_build(args: argparse.Namespace) -> int:
    from selfprog.runners.docker import connect
    from selfprog.runners.image import (
        DOCKERFILE_IMAGE,
        OFFLINE_IMAGE,
        build_from_dockerfile,
        build_offline,
    )

    client = connect()
    if args.offline:
        image = build_offline(client, args.tag or OFFLINE_IMAGE)
    else:
        context = (
            Path(args.context) if args.context else Path(__file__).resolve().parents[2] / "sandbox"
        )
        image = build_from_dockerfile(client, context, args.tag or DOCKERFILE_IMAGE)
    print(f"built {image.tag} (python {image.python})")
    return 0


def add_verbs(verbs: Any) -> None:
    ev = verbs.add_parser(
        "eval",
        help="train and score one program folder in the sandbox",
        description="Train a program folder with its own code (training split only), then score "
        "it with the target's fixed evaluator (held-out split). Exit code 0 when the "
        f"candidate ends `ok`, {EXIT_NOT_OK} when it ends in another state, "
        f"{EXIT_ERROR} on an error.",
    )
    ev.add_argument("program", nargs="?", help="the program folder (default: the target's seed)")
    ev.add_argument(
        "--target",
        help="a bundled target name or a target folder (default: tinylm; a program folder with "
        "its own target.toml needs --target DIR, since its prepare runs unsandboxed)",
    )
    ev.add_argument("--runner", default="docker", choices=("docker", "local"), help="the sandbox")
    budget = ev.add_mutually_exclusive_group()
    budget.add_argument("--budget-seconds", type=positive(float), help="training wall-clock budget")
    budget.add_argument("--budget-steps", type=positive(int), help="training step budget")
    ev.add_argument("--timeout", type=positive(float), help="hard limit on training, seconds")
    ev.add_argument("--memory", type=parse_size, default=parse_size("4g"), help="memory limit (4g)")
    ev.add_argument("--cpus", type=positive(float), help="CPU limit (2, or all there are)")
    ev.add_argument(
        "--gpus", help="GPUs for the program: a count, 'all' or device=IDS (default: none)"
    )
    ev.add_argument("--seed", type=int, default=0, help="the training and evaluation seed (0)")
    ev.add_argument(
        "--image", help="the sandbox image (default: the offline image, built if missing)"
    )
    ev.add_argument(
        "--data-cache", type=Path, help="where prepared data is kept (~/.cache/selfprog)"
    )
    ev.add_argument(
        "--corpus", type=Path, help="a folder of code to train on instead of the stdlib"
    )
    ev.add_argument("--keep", help="keep the work folder (staged program, weights) here")
    ev.add_argument("--json", action="store_true", help="print the result as JSON")
    ev.set_defaults(func=cmd_eval)

    tg = verbs.add_parser(
        "target", help="work with target programs", description="Work with target programs."
    )
    tg_verbs = tg.add_subparsers(dest="target_verb", metavar="VERB", required=True)
    te = tg_verbs.add_parser(
        "export",
        help="write a target's files into a folder",
        description="Write a target's program files and target.toml into an empty folder.",
    )
    te.add_argument("target", help="a bundled target name (tinylm) or a target folder")
    te.add_argument("dest", help="the folder to write")
    te.set_defaults(func=cmd_target_export)
    tn = tg_verbs.add_parser(
        "new",
        help="make a new target folder from a template",
        description="Write a new target: `minimal` (a small regression task whose evaluator "
        "already speaks the harness's protocol; you write the metric) or `tinylm` (the bundled "
        "language model, to change into your own). See docs/targets.md.",
    )
    tn.add_argument("name", help="the target's name (letters, digits, '-', '_')")
    tn.add_argument("--from", dest="template", default="minimal", choices=("minimal", "tinylm"))
    tn.add_argument("--dir", help="the folder to write (default: ./NAME)")
    tn.set_defaults(func=cmd_target_new)
    tc = tg_verbs.add_parser(
        "check",
        help="check that a target is safe and works",
        description="Report every target.toml problem at once and refuse unsafe targets "
        "(held-out data among training inputs, an editable evaluator or prepare script, a "
        "command whose script is not staged); then run prepare into a fresh folder, check that "
        "the sandbox cannot rebuild the held-out split, and score the seed with a few steps. "
        f"Exit code 0 when every check passes, {EXIT_NOT_OK} when one fails, {EXIT_ERROR} when "
        "target.toml is unusable or unsafe.",
    )
    tc.add_argument("target", help="a target folder (or a bundled target's name)")
    tc.add_argument("--runner", default="docker", choices=("docker", "local"), help="the sandbox")
    tc.add_argument("--image", help="the sandbox image (default: the offline image)")
    tc.add_argument(
        "--budget-steps", type=positive(int), default=5, help="the seed's training steps (5)"
    )
    tc.add_argument("--memory", type=parse_size, default=parse_size("4g"), help="memory limit (4g)")
    tc.set_defaults(func=cmd_target_check)

    im = verbs.add_parser(
        "image", help="build the sandbox image", description="Build the sandbox image."
    )
    im_verbs = im.add_subparsers(dest="image_verb", metavar="VERB", required=True)
    ib = im_verbs.add_parser(
        "build",
        help="build the sandbox image",
        description="Build the sandbox image from sandbox/Dockerfile (needs a registry), or with "
        "--offline from this host's Python environment (needs none).",
    )
    ib.add_argument("--offline", action="store_true", help="build without a registry")
    ib.add_argument("--tag", help="the image tag")
    ib.add_argument("--context", help="the folder holding the Dockerfile (default: sandbox/)")
    ib.set_defaults(func=cmd_image_build)
