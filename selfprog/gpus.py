"""GPUs: which this machine has, and which one each candidate slot gets.

`runner.gpus` is a request per candidate: "" (the default) is one GPU each
when the machine has any, none otherwise; "0" is none; "N" is N each; "all"
is every GPU to one candidate at a time; "device=0,2" those exactly. Each
slot is pinned to GPUs of its own, so with G GPUs and `run.workers` unset, G
candidates run at once. A wall-clock budget is fair only when candidates do
not share a device: sharing is refused unless `runner.share_gpus` is set.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from pathlib import Path

from selfprog.errors import ConfigError


@functools.cache
def visible() -> tuple[str, ...]:
    """Returns the ids of the NVIDIA GPUs selfprog may hand out (none without a driver).

    Ids are nvidia-smi's (PCI bus order; candidates and the proposer get
    CUDA_DEVICE_ORDER=PCI_BUS_ID so that CUDA counts alike).
    CUDA_VISIBLE_DEVICES, where set, narrows them as it would for any CUDA
    program: by index or by UUID; anything else ("-1", "") hides them all.
    """
    uuids: dict[str, str] = {}
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        for line in listed.stdout.splitlines():
            found = re.match(r"GPU (\d+):.*\(UUID: ([^)]+)\)", line)
            if found:
                uuids[found.group(1)] = found.group(2)
            elif line.startswith("GPU "):
                uuids[line.split()[1].rstrip(":")] = ""
        ids = tuple(uuids)
    except (OSError, subprocess.SubprocessError):
        devices = [
            p.name for p in Path("/dev").glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name)
        ]
        ids = tuple(sorted((d.removeprefix("nvidia") for d in devices), key=int))
    narrowed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if narrowed is None:
        return ids
    chosen = []
    for entry in narrowed.split(","):
        entry = entry.strip()
        match = [i for i in ids if entry == i or (entry and uuids.get(i, "").startswith(entry))]
        if not match:
            break  # CUDA stops at the first entry it cannot use
        chosen.append(match[0])
    return tuple(dict.fromkeys(chosen))


def per_candidate(request: str, have: tuple[str, ...]) -> int:
    """Returns how many GPUs each candidate asks for (0: none).

    Raises:
        ConfigError: a request this machine cannot meet, or that is not one.
    """
    request = request.strip()
    if request == "":
        return 1 if have else 0
    if request == "all":
        needed = len(have)
    elif request.startswith("device="):
        wanted = request.removeprefix("device=").split(",")
        missing = [i for i in wanted if i not in have]
        if missing:
            raise ConfigError(
                f"runner.gpus asks for GPU {','.join(missing)}; this machine has "
                f"{', '.join(have) or 'none'}"
            )
        return len(wanted)
    elif request.isdigit():
        needed = int(request)
        if needed == 0:
            return 0
    else:
        raise ConfigError(f"runner.gpus must be a count, 'all' or device=IDS, not {request!r}")
    if not have:
        raise ConfigError(
            "runner.gpus asks for GPUs; this machine has none (nvidia-smi finds none)"
        )
    if needed > len(have):
        raise ConfigError(
            f"runner.gpus asks for {needed} GPUs per candidate; this machine has {len(have)}"
        )
    return needed


def slot_devices(request: str, workers: int, share: bool, have: tuple[str, ...]) -> list[str]:
    """Returns each slot's GPUs as a runner limit ("device=0", "device=1,2"); [] for none.

    Raises:
        ConfigError: more GPUs than the machine has, or sharing that was not asked for.
    """
    request = request.strip()
    each = per_candidate(request, have)
    if each == 0:
        return []
    if request.startswith("device="):
        groups = [request]
    else:
        groups = [
            "device=" + ",".join(have[i : i + each]) for i in range(0, len(have) - each + 1, each)
        ]
    if workers > len(groups) and not share:
        raise ConfigError(
            f"{workers} candidates at once with {each} GPU(s) each need {workers * each} GPUs; "
            f"this machine has {len(have)}: a wall-clock budget is unfair on a shared GPU "
            "(fewer workers, or runner.share_gpus = true to share anyway)"
        )
    return [groups[i % len(groups)] for i in range(workers)]


def default_workers(request: str, have: tuple[str, ...]) -> int:
    """Returns how many candidates run at once when `run.workers` is unset: one per GPU group."""
    each = per_candidate(request, have)
    if each == 0 or request.startswith("device="):
        return 1
    return max(1, len(have) // each)


def proposer_device(request: str, slots: list[str], have: tuple[str, ...]) -> str:
    """Returns the torch device for the proposer's own model: one the candidates do not use.

    "" picks the first GPU no slot holds, else the CPU: a model on a candidate's
    GPU would take its memory and time. "cuda:N" counts as torch does, among
    the GPUs this process sees.

    Raises:
        ConfigError: not cpu, cuda or cuda:N of a GPU this machine has.
    """
    if request in ("cpu", "cuda") or (
        request.startswith("cuda:") and request[5:].isdigit() and int(request[5:]) < len(have)
    ):
        return request
    if request:
        raise ConfigError(
            f"proposer.device must be cpu, cuda or cuda:N of the {len(have)} GPU(s) here, "
            f"not {request!r}"
        )
    taken = {i for slot in slots for i in slot.removeprefix("device=").split(",")}
    free = [i for i in have if i not in taken]
    return f"cuda:{have.index(free[0])}" if free else "cpu"
