"""Writes the data: training rows, held-out rows, and the manifest (runs on the host, once).

The rows follow a hidden function whose weights are drawn here from the
operating system's randomness and never saved: nothing the sandbox can read
(this file included) can rebuild the held-out rows. A fixed seed here would
let a candidate run this file and score on rows it has seen.
"""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

INPUTS, HIDDEN = 8, 16
TRAIN_ROWS, HELDOUT_ROWS = 8192, 2048


def rows(rng: np.random.Generator, w1: np.ndarray, w2: np.ndarray, n: int) -> bytes:
    x = rng.standard_normal((n, INPUTS)).astype(np.float32)
    y = np.tanh(x @ w1) @ w2 + 0.05 * rng.standard_normal((n, 1))
    table = np.concatenate([x, y.astype(np.float32)], axis=1)
    return np.array([n, INPUTS + 1], dtype=np.int32).tobytes() + table.astype(np.float32).tobytes()


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng()  # the OS's entropy: no seed a candidate could replay
    w1 = rng.standard_normal((INPUTS, HIDDEN)) / np.sqrt(INPUTS)
    w2 = rng.standard_normal((HIDDEN, 1))
    train, heldout = rows(rng, w1, w2, TRAIN_ROWS), rows(rng, w1, w2, HELDOUT_ROWS)
    (out / "train.bin").write_bytes(train)
    (out / "heldout.bin").write_bytes(heldout)
    digest = hashlib.sha256(train + heldout).hexdigest()
    manifest = {"data_hash": digest, "train_rows": TRAIN_ROWS, "heldout_rows": HELDOUT_ROWS}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
