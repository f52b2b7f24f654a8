"""tinylm's evaluator: bits per byte of the trained model on the held-out split.

Fixed file: the proposer never edits it. It runs as two processes so that the
candidate's code (model.py, imported to rebuild the model) never holds the
score or the held-out text as a whole:

- the scorer (`python evaluate.py`) reads a nonce line and then the held-out
  bytes from stdin, makes itself undumpable (so a process of the same user
  cannot read its memory or its file descriptors), and starts
- the model server (`python evaluate.py --serve`), which imports model.py,
  loads the weights from SELFPROG_OUT, and answers batches of bytes with
  logits over a pipe. It never sees the scorer's stdout or the nonce.

The scorer computes the loss itself, checks that the model is causal (position
t may not depend on bytes after t), and prints the one line the harness
trusts: `SELFPROG_RESULT <nonce> <json>`.
"""

import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

EVAL_BYTES = 131_072  # the held-out prefix that is scored, the same for every candidate
MAX_CONTEXT = 1024  # windows longer than this are cut to it
BATCH_ROWS = 64
VOCAB = 256
RESULT_MARKER = "SELFPROG_RESULT"


def _out_dir() -> Path:
    return Path(os.environ.get("SELFPROG_OUT", "out"))


def _read_exact(stream, n: int) -> bytes:
    data = stream.read(n)
    if data is None or len(data) != n:
        raise EOFError(f"expected {n} bytes, got {0 if data is None else len(data)}")
    return data


# -----------------------------------------------------------------------------
# the model server: candidate code runs here, and only here


def serve() -> None:
    import torch

    torch.set_grad_enabled(False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from model import build_model  # the candidate's model.py

    config = json.loads((_out_dir() / "model.json").read_text())
    model = build_model(config)
    state = torch.load(_out_dir() / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.to(device).eval()
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    out.write((json.dumps({"block_size": int(model.block_size)}) + "\n").encode())
    out.flush()
    while True:
        rows, cols = struct.unpack("<II", _read_exact(inp, 8))
        if rows == 0:
            return
        x = torch.frombuffer(bytearray(_read_exact(inp, rows * cols)), dtype=torch.uint8)
        logits = model(x.view(rows, cols).long().to(device))
        out.write(logits.float().cpu().contiguous().numpy().tobytes())
        out.flush()


# -----------------------------------------------------------------------------
# the scorer: trusted, never imports candidate code


def _undumpable() -> None:
    """Stops processes of the same user from reading this one's memory and descriptors."""
    import ctypes

    pr_set_dumpable = 4
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_dumpable, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")


def _count_parameters(torch) -> int:
    """Returns the number of distinct parameters in the saved weights (tied ones once)."""
    state = torch.load(_out_dir() / "model.pt", map_location="cpu", weights_only=True)
    seen, total = set(), 0
    for tensor in state.values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        if key not in seen:
            seen.add(key)
            total += tensor.numel()
    return total


class ModelServer:
    """The scorer's handle on the model server process."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=sys.stderr,
        )
        header = self.proc.stdout.readline()
        if not header:
            raise RuntimeError(f"model server exited before it was ready (code {self.proc.wait()})")
        self.block_size = int(json.loads(header)["block_size"])

    def logits(self, torch, batch):
        rows, cols = batch.shape
        self.proc.stdin.write(struct.pack("<II", rows, cols) + batch.numpy().tobytes())
        self.proc.stdin.flush()
        raw = self.proc.stdout.read(rows * cols * VOCAB * 4)
        if len(raw) != rows * cols * VOCAB * 4:
            raise RuntimeError(f"model server died mid-batch (code {self.proc.wait()})")
        logits = torch.frombuffer(bytearray(raw), dtype=torch.float32).view(rows, cols, VOCAB)
        if not torch.isfinite(logits).all():
            raise RuntimeError("the model returned non-finite logits")
        return logits

    def close(self):
        try:
            self.proc.stdin.write(struct.pack("<II", 0, 0))
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _causal_logits(torch, server, batch, generator):
    """Returns the batch's logits, raising unless each row's logits ignore later bytes.

    A probe first gives every row the tail of another row after a random cut;
    the real batch follows, so the server cannot tell the probe from real input.
    """
    rows, cols = batch.shape
    cuts = torch.randint(0, cols - 1, (rows,), generator=generator).tolist()
    probe = batch.clone()
    for r, c in enumerate(cuts):
        probe[r, c + 1 :] = batch[(r + 1) % rows, c + 1 :]
    probe_logits = server.logits(torch, probe)
    logits = server.logits(torch, batch)
    for r, c in enumerate(cuts):
        if not torch.allclose(logits[r, : c + 1], probe_logits[r, : c + 1], rtol=1e-3, atol=1e-3):
            raise RuntimeError(
                f"the model is not causal: its logits at byte {c} of a window change "
                "when only later bytes change"
            )
    return logits


def score(heldout: bytes, seed: int) -> dict:
    import torch

    data = torch.frombuffer(bytearray(heldout[:EVAL_BYTES]), dtype=torch.uint8)
    if len(data) < 2 * BATCH_ROWS:
        raise RuntimeError(f"held-out split too small: {len(data)} bytes")
    params = _count_parameters(torch)
    server = ModelServer()
    try:
        context = min(server.block_size, MAX_CONTEXT)
        if context < 2:
            raise RuntimeError(f"block_size {server.block_size} is too small to score")
        # non-overlapping windows: every byte after the first is predicted exactly once
        starts = list(range(0, len(data) - 1, context))
        full = [s for s in starts if s + context < len(data)]
        windows = [full[i : i + BATCH_ROWS] for i in range(0, len(full), BATCH_ROWS)]
        windows += [[s] for s in starts if s + context >= len(data)]  # the short last one
        generator = torch.Generator().manual_seed(seed)
        probe_index = int(torch.randint(0, max(1, len(windows) - 1), (1,), generator=generator))
        total_nats, total_bytes = 0.0, 0
        for index, batch_starts in enumerate(windows):
            width = min(context, len(data) - 1 - batch_starts[0])
            x = torch.stack([data[s : s + width] for s in batch_starts])
            y = torch.stack([data[s + 1 : s + width + 1] for s in batch_starts]).long()
            if index == probe_index:
                logits = _causal_logits(torch, server, x, generator)
            else:
                logits = server.logits(torch, x)
            total_nats += float(
                torch.nn.functional.cross_entropy(
                    logits.view(-1, VOCAB), y.view(-1), reduction="sum"
                )
            )
            total_bytes += y.numel()
    finally:
        server.close()
    return {
        "val_bpb": total_nats / total_bytes / math.log(2),
        "params": params,
        "eval_bytes": total_bytes,
        "context": context,
    }


def main() -> None:
    _undumpable()
    stdin = sys.stdin.buffer
    nonce = stdin.readline().decode().strip()
    heldout = stdin.read()
    seed = int(os.environ.get("SELFPROG_SEED", "0"))
    start = time.perf_counter()
    try:
        result = score(heldout, seed)
        result["eval_seconds"] = time.perf_counter() - start
    except Exception as exc:  # any failure is reported to the harness as the result
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(f"{RESULT_MARKER} {nonce} {json.dumps(result)}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        main()
