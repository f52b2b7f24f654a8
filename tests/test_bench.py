"""The noise benchmark runs in CI; its ratio is printed, not asserted as a goal."""

from __future__ import annotations

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
