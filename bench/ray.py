"""Candidates per hour on a Ray cluster of 2 worker nodes against 1, the same resources per node.

Each cluster is real Ray on this machine (`ray.cluster_utils.Cluster`: a head
that scores nothing and worker nodes of 1 CPU each); each node scores its
candidates in Docker sandboxes of 1 CPU. The same `selfprog run --runner ray`
(mutate proposer, a step budget, one generation) is timed on each, one after
the other. The last line reads `speedup=X` (candidates/hour on 2 nodes over 1).

    python bench/ray.py              # 9 children (10 candidates: whole rounds on 2 nodes), 150 steps
    python bench/ray.py --quick      # 4 children, 60 steps
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# run as `python bench/ray.py`, this file's folder comes first on the path and would shadow Ray
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def per_hour(nodes: int, children: int, steps: int, folder: Path) -> float:
    """Returns candidates per hour for one run on a fresh cluster of that many worker nodes."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False}
    )
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        argv = [
            sys.executable,
            "-m",
            "selfprog",
            "run",
            "--run-dir",
            str(folder / f"nodes-{nodes}"),
            "--runner",
            "ray",
            "--generations",
            "1",
            "--population",
            str(children),
            "--budget-steps",
            str(steps),
            "--seed",
            "1",
            "--set",
            f"runner.address={cluster.address}",
            "--set",
            "runner.cpus=1",
            "--set",
            "runner.memory=2g",
            "--set",
            "selection.noise_seeds=1",
            "--set",
            "selection.confirm_seeds=1",
        ]
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True)
        wall = time.perf_counter() - start
    finally:
        cluster.shutdown()
    if done.returncode != 0:
        raise SystemExit(f"selfprog run failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    candidates = children + 1
    rate = candidates / wall * 3600
    archive = sqlite3.connect(folder / f"nodes-{nodes}" / "archive.sqlite")
    timings = [json.loads(t) for (t,) in archive.execute("SELECT timings FROM candidates")]
    archive.close()
    mean = statistics.mean(t["total"] for t in timings if "total" in t)
    print(
        f"{nodes} node(s): {candidates} candidates in {wall:.1f} s = {rate:.0f} candidates/hour "
        f"(a candidate took {mean:.1f} s on average)",
        flush=True,
    )
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=9)
    parser.add_argument("--steps", type=int, default=150, help="training steps per candidate")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    children, steps = (4, 60) if args.quick else (args.children, args.steps)
    with tempfile.TemporaryDirectory(prefix="selfprog-ray-") as tmp:
        one = per_hour(1, children, steps, Path(tmp))
        two = per_hour(2, children, steps, Path(tmp))
    print(f"speedup={two / one:.3f}")


if __name__ == "__main__":
    main()
