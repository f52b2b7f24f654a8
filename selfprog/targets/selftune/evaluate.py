"""selftune's evaluator: bits per byte of the fine-tuned model on held-out Python code.

Fixed file: the proposer never edits it. No candidate code runs here: the
evaluator builds the base model from SELFPROG_DATA/base, applies the
candidate's `delta.safetensors` (tensors only, checked against the base
model's names, shapes and finiteness), reads a nonce line and then the
held-out text from stdin, and prints the one line the harness trusts:
`SELFPROG_RESULT <nonce> <json>`.
"""

import json
import math
import os
import sys
import time
from pathlib import Path

EVAL_BYTES = 8_192  # the held-out prefix that is scored, the same for every candidate
WINDOW = 512  # tokens per window; each window is scored on its own
RESULT_MARKER = "SELFPROG_RESULT"


def fail(message):
    print(message, file=sys.stderr)
    sys.exit(1)


def main():
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    nonce = sys.stdin.buffer.readline().strip().decode()
    text = sys.stdin.buffer.read()[:EVAL_BYTES].decode("utf-8", errors="ignore")
    torch.set_grad_enabled(False)
    torch.manual_seed(int(os.environ.get("SELFPROG_SEED", "0")))
    start = time.perf_counter()
    base = Path(os.environ["SELFPROG_DATA"]) / "base"
    tokenizer = AutoTokenizer.from_pretrained(base)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device).eval()
    try:
        delta = load_file(Path(os.environ["SELFPROG_OUT"]) / "delta.safetensors")
    except (OSError, SafetensorError) as exc:
        fail(f"no readable delta.safetensors: {exc}")
    own = dict(model.named_parameters())
    for name, tensor in delta.items():
        if name not in own or tuple(tensor.shape) != tuple(own[name].shape):
            fail(f"delta tensor {name} {tuple(tensor.shape)} is not a parameter of the base model")
        if not torch.isfinite(tensor).all():
            fail(f"delta tensor {name} is not finite")
        own[name].copy_(tensor.to(own[name].device, own[name].dtype))
    encoded = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    nats, scored_bytes = 0.0, 0
    for begin in range(0, len(ids) - 1, WINDOW):
        window = torch.tensor([ids[begin : begin + WINDOW]], device=device)
        if window.shape[1] < 2:
            break
        logits = model(input_ids=window).logits[0, :-1].float()
        targets = window[0, 1:]
        nats += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        for s, e in offsets[begin + 1 : begin + window.shape[1]]:
            scored_bytes += len(text[s:e].encode("utf-8"))
    bpb = nats / math.log(2) / max(1, scored_bytes)
    if not math.isfinite(bpb):
        fail(f"the score is not finite: {bpb}")
    metrics = {
        "val_bpb": bpb,
        "eval_tokens": len(ids),
        "eval_bytes": scored_bytes,
        "changed_tensors": len(delta),
        "changed_params": sum(t.numel() for t in delta.values()),
        "eval_seconds": round(time.perf_counter() - start, 2),
    }
    print(f"{RESULT_MARKER} {nonce} {json.dumps(metrics)}", flush=True)


if __name__ == "__main__":
    main()
