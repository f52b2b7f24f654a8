"""New targets from a template: `selfprog target new NAME [--from minimal|tinylm]`.

`minimal` is a small regression task (not a language model) whose evaluator
already speaks the harness's protocol, so a user writes only "load what
training left, compute the metric"; `tinylm` is the bundled seed target, to
change into one's own language model.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from selfprog.errors import TargetError
from selfprog.target import NAME, TARGET_FILE, export_target

TEMPLATES = ("minimal", "tinylm")


def new_target(name: str, dest: Path, template: str = "minimal") -> list[Path]:
    """Writes a new target named name into dest (empty or absent); returns the files written.

    Raises:
        TargetError: a bad name, an unknown template, or dest holds files.
    """
    if not NAME.fullmatch(name):
        raise TargetError(
            f"target name {name!r}: use letters, digits, '-' and '_', starting with a letter"
        )
    if template not in TEMPLATES:
        raise TargetError(f"no template {template!r}; choose one of {', '.join(TEMPLATES)}")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise TargetError(f"{dest}: exists and is not an empty folder")
    if template == "tinylm":
        written = export_target("tinylm", dest)
        toml = dest / TARGET_FILE
        text = toml.read_text()
        toml.write_text(text.replace('name = "tinylm"', f'name = "{name}"', 1))
        return written
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    source = resources.files("selfprog") / "scaffolds" / template
    for item in sorted(source.iterdir(), key=lambda i: i.name):
        if not item.is_file() or item.name.startswith(("_", ".")):
            continue
        text = item.read_text()
        if item.name == TARGET_FILE:
            text = text.replace("{name}", name)
        out = dest / item.name
        out.write_text(text)
        written.append(out)
    return written
