"""The noise benchmark runs in CI; its ratio is printed, not asserted as a goal."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_noise_bench_quick_prints_its_ratio() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "noise.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    print(f"\nbench/noise.py --quick: {last}")
    assert re.fullmatch(r"false_keep_ratio=\d+\.\d{3} true_score_delta=[+-]\d+\.\d{4}", last)


def test_archive_bench_small_runs_every_command_and_step() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "archive.py"), "--candidates", "2000", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr  # a failed command exits non-zero
    lines = done.stdout.strip().splitlines()
    print(f"\nbench/archive.py --candidates 2000: {lines[-1]}")
    assert lines[0].startswith("built 2000 candidates over 8 generations")
    timed = {line.rsplit(maxsplit=2)[0] for line in lines[1:-1]}
    verbs = {f"selfprog {verb}" for verb in ("status", "top", "show", "lineage", "report")}
    steps = {"population.members", "population.select", "judge.settle", "breeder.next_call"}
    assert verbs | steps <= timed
    assert re.fullmatch(r"archive_100k slowest=\d+\.\d{3}", lines[-1])


def test_gpu_bench_runs_on_cpus_and_says_where_it_trained() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "gpu.py"), "--skip-default"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},  # the CPU path, on any machine
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    print(f"\nbench/gpu.py --skip-default: {lines[-1]}")
    assert (
        "1-step candidate (the fixed cost): ok" in done.stdout and "trained on cpu" in done.stdout
    )
    assert re.fullmatch(r"mfu=0\.0000 fixed_cost_s=\d+\.\d\d bytes_per_s=0", lines[-1])


def test_gpu_bench_changes_only_the_settings_it_is_given() -> None:
    from bench.gpu import with_settings
    from selfprog.target import load_target

    seed = (load_target("gpulm").root / "train.py").read_text()
    changed = with_settings("gpulm", ["batch_size=128", "learning_rate=2e-3"])
    differing = [
        (a, b) for a, b in zip(seed.splitlines(), changed.splitlines(), strict=True) if a != b
    ]
    assert [b.split("#")[0].strip() for _, b in differing] == [
        "batch_size = 128",
        "learning_rate = 2.0e-3",
    ]
    assert with_settings("gpulm", []) == ""
