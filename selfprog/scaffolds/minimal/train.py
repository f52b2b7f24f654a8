"""Trains the MLP on the training rows and saves it for the evaluator (editable: the proposer's).

The harness sets SELFPROG_DATA (a folder holding train.bin only), SELFPROG_OUT
(where model.pt and model.json go), SELFPROG_BUDGET_SECONDS and/or
SELFPROG_BUDGET_STEPS, and SELFPROG_SEED. What this program prints is its own
business: the score comes from evaluate.py on rows it never sees.
"""

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

hidden = 32
layers = 2
activation = "relu"
learning_rate = 0.01
batch_size = 128
weight_decay = 0.0

budget_seconds = float(os.environ.get("SELFPROG_BUDGET_SECONDS", "10"))
budget_steps = int(os.environ.get("SELFPROG_BUDGET_STEPS", "0"))
out_dir = Path(os.environ.get("SELFPROG_OUT", "out"))
torch.manual_seed(int(os.environ.get("SELFPROG_SEED", "0")))

ACTIVATIONS = {
    "relu": torch.nn.ReLU,
    "tanh": torch.nn.Tanh,
    "gelu": torch.nn.GELU,
    "silu": torch.nn.SiLU,
}


def load(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    raw = path.read_bytes()
    n, width = np.frombuffer(raw[:8], dtype=np.int32)
    table = torch.from_numpy(np.frombuffer(raw[8:], dtype=np.float32).reshape(n, width).copy())
    return table[:, :-1], table[:, -1:]


def build(inputs: int) -> torch.nn.Sequential:
    parts: list[torch.nn.Module] = []
    width = inputs
    for _ in range(layers):
        parts += [torch.nn.Linear(width, hidden), ACTIVATIONS[activation]()]
        width = hidden
    parts.append(torch.nn.Linear(width, 1))
    return torch.nn.Sequential(*parts)


def main() -> None:
    x, y = load(Path(os.environ.get("SELFPROG_DATA", ".")) / "train.bin")
    model = build(x.shape[1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    start, step = time.time(), 0
    losses: list[float] = []  # since the last progress report
    reported = 0.0  # the fraction of the budget at the last one
    while True:
        # the fraction of the budget used: of the steps, if counted, else of the seconds
        if budget_steps:
            done = step / budget_steps
        else:
            done = (time.time() - start) / budget_seconds if budget_seconds > 0 else 1.0
        if done >= 1.0:
            break
        pick = torch.randint(0, x.shape[0], (batch_size,))
        loss = torch.nn.functional.mse_loss(model(x[pick]), y[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        step += 1
        if done - reported >= 0.03:  # the harness keeps this curve (docs/targets.md)
            print(f"SELFPROG_PROGRESS {done:.4f} {sum(losses) / len(losses):.6g}", flush=True)
            losses.clear()
            reported = done
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out_dir / "model.pt")
    config = {"hidden": hidden, "layers": layers, "activation": activation}
    (out_dir / "model.json").write_text(json.dumps(config))
    print(f"trained {step} steps, last batch mse {loss.item():.4f}")


if __name__ == "__main__":
    main()
