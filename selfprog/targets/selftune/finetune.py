"""selftune's recipe: how the proposer model is fine-tuned on Python code.

The proposer may rewrite this file. It runs in the sandbox with the base
model's folder at SELFPROG_DATA/base and the training text at
SELFPROG_DATA/train.txt, stops at the budget (SELFPROG_BUDGET_SECONDS or
SELFPROG_BUDGET_STEPS; the harness kills it SELFPROG_TIME_LIMIT seconds after
it starts), and must leave in SELFPROG_OUT:

- `delta.safetensors`: the new values of the base model's parameters it
  changed (names and shapes as in the base model; float32 or bfloat16).

The fixed evaluator loads the base model, applies the delta, and scores bits
per byte on held-out code. The improved model then proposes the next recipes.
"""

import json
import math
import os
import random
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

# the recipe
learning_rate = 3e-4  # peak, after warmup
min_lr_ratio = 0.1  # the cosine decays to this fraction of the peak
warmup_steps = 4
weight_decay = 0.0
grad_clip = 1.0
batch_size = 4  # sequences per step
seq_len = 128  # tokens per sequence
chars_per_row = 1024  # text cut per sequence before tokenizing (code runs ~3.5 characters a token)
lora_rank = 8
lora_alpha = 16
lora_dropout = 0.0
first_layer = 24  # adapters on this layer and every later one (the model has 30)
target_modules = ["q_proj", "v_proj"]
log_every = 5
save_margin = 20.0  # of the harness's time limit: for loading the model and saving the delta


def budget():
    return float(os.environ.get("SELFPROG_BUDGET_SECONDS", "60")), int(
        os.environ.get("SELFPROG_BUDGET_STEPS", "0")
    )


def lr_at(progress):
    """Learning rate at a fraction of the budget (0..1) after warmup: cosine to min_lr_ratio."""
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return learning_rate * (min_lr_ratio + (1 - min_lr_ratio) * cosine)


def sample_batch(text, tokenizer, rng):
    """Returns [batch_size, seq_len] token ids from random places in the text, each from a line start."""
    rows, span = [], max(chars_per_row, 8 * seq_len)  # enough text for seq_len tokens
    while len(rows) < batch_size:
        start = text.find("\n", rng.randrange(len(text) - span)) + 1
        ids = tokenizer(text[start : start + span])["input_ids"][:seq_len]
        if len(ids) == seq_len:
            rows.append(ids)
    return torch.tensor(rows)


started = time.perf_counter()


def main():
    data, out = Path(os.environ["SELFPROG_DATA"]), Path(os.environ["SELFPROG_OUT"])
    seconds, steps = budget()
    seed = int(os.environ.get("SELFPROG_SEED", "0"))
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(data / "base")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(data / "base", dtype=torch.float32).to(device)
    layers = model.config.num_hidden_layers
    config = LoraConfig(
        r=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        layers_to_transform=list(range(min(first_layer, layers - 1), layers)),
    )
    model = get_peft_model(model, config)
    text = (data / "train.txt").read_text()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=weight_decay)
    model.train()
    start, step, loss_value = time.perf_counter(), 0, float("nan")
    time_limit = float(os.environ.get("SELFPROG_TIME_LIMIT", "0"))
    while True:
        elapsed = time.perf_counter() - start
        progress = max(elapsed / seconds if seconds else 0.0, step / steps if steps else 0.0)
        if time_limit and time.perf_counter() - started > time_limit - save_margin:
            break  # the harness would kill it before the delta is saved
        if progress >= 1.0:
            break
        lr = learning_rate * (step + 1) / warmup_steps if step < warmup_steps else lr_at(progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = sample_batch(text, tokenizer, rng).to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step, loss_value = step + 1, loss.item()
        if step % log_every == 0:
            print(f"step {step} loss {loss_value:.4f} lr {lr:.2e} {elapsed:.0f}s", flush=True)
    changed = list(model.targeted_module_names)
    merged = model.merge_and_unload()
    delta = {
        f"{name}.weight": merged.get_submodule(name).weight.detach().cpu().contiguous()
        for name in changed
    }
    save_file(delta, out / "delta.safetensors")
    summary = {"steps": step, "train_loss": loss_value, "changed_tensors": len(delta)}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
