"""gpulm's training program: trains model.py, sized for one GPU, on the training split within the budget.

The harness sets the environment: SELFPROG_DATA (a folder with train.bin only),
SELFPROG_OUT (where the weights go), SELFPROG_BUDGET_SECONDS and/or
SELFPROG_BUDGET_STEPS, SELFPROG_TIME_LIMIT (the harness kills this program that
many seconds after it starts: the budget plus a start-up allowance) and
SELFPROG_SEED. Contract with the fixed evaluator:
leave model.pt (a state_dict) and model.json (the dict build_model takes) in
SELFPROG_OUT. Whatever this program prints about its own loss is not the score.
"""

import json
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from model import GPTConfig, build_model, model_config
from prepare import get_batch, load_train

# -----------------------------------------------------------------------------
# settings

budget_seconds = float(os.environ.get("SELFPROG_BUDGET_SECONDS", "30"))  # 0 = no time budget
budget_steps = int(os.environ.get("SELFPROG_BUDGET_STEPS", "0"))  # 0 = no step budget
time_limit = float(os.environ.get("SELFPROG_TIME_LIMIT", "0"))  # enforced by the harness; 0 = none
save_margin = 5.0  # of the time limit: the last step, saving, the sandbox's start and end
seed = int(os.environ.get("SELFPROG_SEED", "0"))
out_dir = Path(os.environ.get("SELFPROG_OUT", "out"))

batch_size = 64  # sequences per step
micro_batch = 64 if torch.cuda.is_available() else 8  # per forward pass: a CPU holds fewer
block_size = 512  # context length in bytes
n_layer = 8  # with n_head and n_embd: about 25M parameters
n_head = 8
n_embd = 512
learning_rate = 1e-3  # peak, after warmup
min_lr_ratio = 0.1  # the cosine decays to this fraction of the peak
warmup_steps = 100
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
log_every = 25

# -----------------------------------------------------------------------------
# setup


def seconds_since_launch() -> float:
    """Returns how long this process has run (its imports included), as the harness counts."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")


started = time.perf_counter() - seconds_since_launch()  # the harness's clock starts here

torch.manual_seed(seed)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
data = load_train()
generator = torch.Generator().manual_seed(seed)

accumulate = max(1, batch_size // micro_batch)
config = GPTConfig(block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd, bias=False)
model = build_model(vars(config))
n_params = sum(p.numel() for p in model.parameters())
accelerator.print(f"model: {n_params:,} parameters, {config}")

decay = [p for p in model.parameters() if p.dim() >= 2]
no_decay = [p for p in model.parameters() if p.dim() < 2]
optimizer = torch.optim.AdamW(
    [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
    lr=learning_rate,
    betas=(beta1, beta2),
    fused=torch.cuda.is_available(),  # one kernel for the whole update on a GPU
)
model, optimizer = accelerator.prepare(model, optimizer)


def progress(step: int, elapsed: float) -> float:
    """Fraction of the budget used, by whichever budget (or the time limit) runs out first."""
    fractions = []
    if time_limit > 0:
        fractions.append((time.perf_counter() - started) / max(time_limit - save_margin, 1e-9))
    if budget_seconds > 0:
        fractions.append(elapsed / budget_seconds)
    if budget_steps > 0:
        fractions.append(step / budget_steps)
    return max(fractions) if fractions else 0.0


def lr_at(step: int, done: float) -> float:
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
    return learning_rate * (min_lr_ratio + (1 - min_lr_ratio) * cosine)


# -----------------------------------------------------------------------------
# training loop: stops when the budget is spent

model.train()
start = time.perf_counter()
step = 0
running, counted = torch.zeros((), device=accelerator.device), 0  # loss since the last report
while True:
    elapsed = time.perf_counter() - start
    done = progress(step, elapsed)
    if done >= 1.0:
        break
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, done)
    optimizer.zero_grad(set_to_none=True)
    for _ in range(accumulate):  # one step, in micro-batches where memory is short
        x, y = get_batch(data, micro_batch, block_size, generator)
        x, y = x.to(accelerator.device), y.to(accelerator.device)
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        accelerator.backward(loss / accumulate)
    if grad_clip > 0:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    running, counted = running + loss.detach(), counted + 1
    if step % log_every == 0:
        bpb = running.item() / counted / math.log(2)  # the mean since the last report
        accelerator.print(f"step {step:5d} | train bpb {bpb:.3f} | {elapsed:6.1f}s")
        # the harness keeps this curve, and may stop a run clearly worse than the seed's
        accelerator.print(f"SELFPROG_PROGRESS {done:.4f} {bpb:.6g}")
        running, counted = torch.zeros_like(running), 0
    step += 1

elapsed = time.perf_counter() - start
tokens = step * batch_size * block_size
accelerator.print(f"trained {step} steps, {tokens:,} bytes in {elapsed:.1f}s")

# -----------------------------------------------------------------------------
# save what the evaluator needs to rebuild the model

out_dir.mkdir(parents=True, exist_ok=True)
unwrapped = accelerator.unwrap_model(model)
torch.save(unwrapped.state_dict(), out_dir / "model.pt")
(out_dir / "model.json").write_text(json.dumps(model_config(unwrapped)))
# what training did, for the run's log and metrics (not the score): the harness reads it
stats = {
    "device": accelerator.device.type,
    "steps": step,
    "bytes": tokens,
    "seconds": elapsed,
    "startup": start - started,  # from launch to the first step: imports, device, model, data
}
(out_dir / "train.json").write_text(json.dumps(stats))
