"""The fixed evaluator: mean squared error of the trained MLP on the held-out rows.

It runs no candidate code: it rebuilds the MLP from model.json with its own
code and loads model.pt as plain tensors, so nothing the candidate wrote runs
while it is scored. Everything above `score` is the harness's protocol and
needs no change: the first stdin line is a one-time nonce, the rest is the
held-out file; the one result that counts is the stdout line
`SELFPROG_RESULT <nonce> <json>`. Write your metric in `score`.
"""

import ctypes
import json
import os
import sys
import time
from pathlib import Path

RESULT_MARKER = "SELFPROG_RESULT"


def undumpable() -> None:
    """Stops processes of the same user from reading this one's memory (the nonce) or files."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE = 4
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")


def main() -> None:
    undumpable()
    stdin = sys.stdin.buffer
    nonce = stdin.readline().decode().strip()
    heldout = stdin.read()
    start = time.perf_counter()
    try:
        result = score(heldout, Path(os.environ.get("SELFPROG_OUT", "out")))
        result["eval_seconds"] = time.perf_counter() - start
    except Exception as exc:  # a failure is the result: the harness records it
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(f"{RESULT_MARKER} {nonce} {json.dumps(result)}", flush=True)


# -----------------------------------------------------------------------------
# your part: load what training left, compute the metric


ACTIVATIONS = ("relu", "tanh", "gelu", "silu")
MAX_WIDTH, MAX_LAYERS = 4096, 16


def score(heldout: bytes, out_dir: Path) -> dict:
    import numpy as np
    import torch

    config = json.loads((out_dir / "model.json").read_text())
    hidden, layers, activation = int(config["hidden"]), int(config["layers"]), config["activation"]
    if (
        activation not in ACTIVATIONS
        or not 0 < hidden <= MAX_WIDTH
        or not 0 <= layers <= MAX_LAYERS
    ):
        raise ValueError(f"model.json asks for an MLP this evaluator does not build: {config}")
    n, width = np.frombuffer(heldout[:8], dtype=np.int32)
    table = torch.from_numpy(np.frombuffer(heldout[8:], dtype=np.float32).reshape(n, width).copy())
    x, y = table[:, :-1], table[:, -1:]
    act = {
        "relu": torch.nn.ReLU,
        "tanh": torch.nn.Tanh,
        "gelu": torch.nn.GELU,
        "silu": torch.nn.SiLU,
    }
    parts: list = []
    inputs = x.shape[1]
    for _ in range(layers):
        parts += [torch.nn.Linear(inputs, hidden), act[activation]()]
        inputs = hidden
    parts.append(torch.nn.Linear(inputs, 1))
    model = torch.nn.Sequential(*parts)
    state = torch.load(out_dir / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)  # exactly this MLP's tensors, nothing else
    with torch.no_grad():
        mse = torch.nn.functional.mse_loss(model(x), y).item()
    params = sum(p.numel() for p in model.parameters())
    return {"val_mse": mse, "params": params}


if __name__ == "__main__":
    main()
