"""The seed on a GPU: throughput, model FLOP utilisation, fixed cost and candidates per GPU-hour.

Run on a GPU machine (it runs on CPUs too, slowly, to check the script):

    python bench/gpu.py                      # tinylm at its default budget, with default limits
    python bench/gpu.py --target gpulm       # the GPU seed
    python bench/gpu.py --budget-steps 2 --skip-default   # the fixed cost only
    python bench/gpu.py --target gpulm --set batch_size=128   # a setting of train.py changed

Each candidate is scored end to end as a run scores it: the local runner,
the default limits (4 GiB of memory, 2 CPUs), the GPU the run's plan gives
the first slot. The fixed cost is a one-step candidate's wall time (start-up,
CUDA, saving, both evaluation passes). Throughput is what the training
program reports in train.json; model FLOPs per byte are 6 x parameters plus
attention's 12 x layers x width x context (PaLM's count), against the card's
dense bf16 peak.

The last line reads `mfu=X fixed_cost_s=Y bytes_per_s=Z`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from selfprog import gpus
from selfprog.data import default_cache, prepare_data
from selfprog.proposers.mutate import changed_files, tunable_literals
from selfprog.runners.base import Limits, cpus_here
from selfprog.runners.local import LocalRunner
from selfprog.scoring import Result, score_program
from selfprog.target import load_target

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, per card


def card() -> tuple[str, float]:
    """Returns the first GPU's name and its dense bf16 peak in FLOP/s (0 when unknown)."""
    try:
        name = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "no GPU", 0.0
    peak = next((flops for key, flops in PEAK_BF16.items() if key in name), 0.0)
    return name.strip(), peak


def score(
    target_name: str, seconds: float | None, steps: int | None, work: Path, train: str = ""
) -> tuple[Result, float]:
    target = load_target(target_name)
    program = target.root
    if train:  # a program of its own: the target's files with this train.py
        program = work / "program"
        shutil.copytree(target.root, program)
        (program / "train.py").write_text(train)
    data = prepare_data(target, default_cache())  # as a run does: prepared once, then reused
    slots = gpus.slot_devices("", 1, False, gpus.visible())  # the run's default plan
    limits = Limits(cpus=cpus_here(None), gpus=slots[0] if slots else None)
    start = time.perf_counter()
    result = score_program(
        target,
        program,
        LocalRunner(registry=work / "pids"),
        data,
        work / "score",
        limits=limits,
        budget_seconds=seconds,
        budget_steps=steps,
        labels={"selfprog.run": "bench-gpu"},
    )
    return result, time.perf_counter() - start


def with_settings(target_name: str, pairs: list[str]) -> str:
    """Returns the seed's train.py with each NAME=VALUE setting changed ("" when none)."""
    if not pairs:
        return ""
    source = (load_target(target_name).root / "train.py").read_text()
    settings = {x.name: x for x in tunable_literals("train.py", source)}
    changes = []
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in settings:
            raise SystemExit(f"train.py has no setting {name!r}; it has {', '.join(settings)}")
        try:
            changes.append((settings[name], type(settings[name].value)(value)))
        except ValueError:
            raise SystemExit(f"{pair}: not a {type(settings[name].value).__name__}") from None
    return changed_files({"train.py": source}, changes)["train.py"]


def flops_per_byte(result: Result, config: Path) -> float:
    """Returns the training FLOPs per byte: 6 per parameter, plus attention's 12 x layers x
    width x context (as PaLM counts model FLOPs), where the saved model config says them."""
    per_byte = 6 * float(result.metrics.get("params", 0.0))
    try:
        sizes = json.loads(config.read_text())
        per_byte += 12 * sizes["n_layer"] * sizes["n_embd"] * sizes["block_size"]
    except (OSError, ValueError, KeyError, TypeError):
        print("(the model config gives no layers, width or context: attention left out)")
    return per_byte


def describe(label: str, result: Result, wall: float) -> None:
    metrics = result.metrics
    print(
        f"{label}: {result.state.value} in {wall:.1f} s "
        f"(train {result.timings.get('train', 0):.1f} s, of which "
        f"{metrics.get('train_startup_s', float('nan')):.1f} s before the first step; "
        f"evaluate {result.timings.get('evaluate', 0):.1f} s, of which "
        f"{metrics.get('eval_seconds', float('nan')):.1f} s scoring after the scorer's imports), "
        f"val_bpb {result.score if result.score is not None else float('nan'):.4f}, "
        f"trained on {metrics.get('train_device', '?')}, evaluated on {metrics.get('device', '?')}, "
        f"{metrics.get('train_steps', 0)} steps, {metrics.get('train_bytes_per_s', 0):,.0f} bytes/s, "
        f"{metrics.get('params', 0):,} parameters"
        + ("" if result.score is not None else f"; {result.reason}: {result.log_tail[-400:]}")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="tinylm")
    parser.add_argument("--budget-steps", type=int, default=1, help="the fixed-cost candidate's")
    parser.add_argument("--skip-default", action="store_true", help="the fixed cost only")
    parser.add_argument(
        "--oom-check", action="store_true", help="also score a program that exhausts GPU memory"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting of train.py for the default-budget run (repeatable): batch_size=128",
    )
    args = parser.parse_args()
    train = with_settings(args.target, args.set)

    name, peak = card()
    print(
        f"card: {name} (dense bf16 peak {peak / 1e12:.0f} TFLOP/s); GPUs visible: {gpus.visible()}"
    )
    with tempfile.TemporaryDirectory(prefix="selfprog-bench-gpu-") as tmp:
        work = Path(tmp)
        score(args.target, 0, 1, work / "warm")  # caches, data, the first CUDA start: not counted
        fixed, fixed_wall = score(args.target, 0, args.budget_steps, work / "fixed")
        describe(f"{args.budget_steps}-step candidate (the fixed cost)", fixed, fixed_wall)
        if args.oom_check:
            greedy = (
                "import torch\nhoard = [torch.empty(2**34, device='cuda') for _ in range(64)]\n"
            )
            oom, _ = score(args.target, 0, 1, work / "oom", train=greedy)
            print(f"a program that exhausts GPU memory: {oom.state.value}: {oom.reason}")
        mfu = rate = 0.0
        if not args.skip_default:
            full, wall = score(args.target, None, None, work / "default", train=train)
            describe(
                f"default budget{' with ' + ', '.join(args.set) if args.set else ''}", full, wall
            )
            rate = float(full.metrics.get("train_bytes_per_s", 0.0))
            per_byte = flops_per_byte(full, work / "default" / "score" / "out" / "model.json")
            mfu = per_byte * rate / peak if peak else 0.0
            print(
                f"model FLOP utilisation {mfu:.1%} ({per_byte / 1e6:.1f} M FLOPs per byte), "
                f"{3600 / wall:.0f} candidates per GPU-hour at the default budget"
            )
    print(f"mfu={mfu:.4f} fixed_cost_s={fixed_wall:.2f} bytes_per_s={rate:.0f}")


if __name__ == "__main__":
    main()
