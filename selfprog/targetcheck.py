"""Checks that a target is safe and works: `selfprog target check DIR`, and the held-out check runs do.

`load_target` already refuses what can be seen in target.toml (held-out data
among training inputs, an editable evaluator, a command whose script is not
staged). What only running can show is checked here: that prepare writes
its data and a manifest, that the seed trains and the evaluator prints its
result line, and that nothing the sandbox can read rebuilds the held-out
split: prepare is run again *inside* the sandbox, with what training sees,
and what it writes is compared with the real held-out file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from selfprog import settings
from selfprog.data import Dataset, default_cache, prepare_data
from selfprog.errors import TargetError
from selfprog.runners.base import Limits, Phase, Runner
from selfprog.scoring import State, score_program, stage_program
from selfprog.space import space_for
from selfprog.target import TARGET_FILE, Target, evaluator_warnings, unlisted_scripts
from selfprog.untrusted import failure_line

log = logging.getLogger(__name__)

REBUILD_SCRIPT = "_selfprog_rebuild.py"  # written beside the staged program, never a target's
REBUILT_MARKER = "SELFPROG_REBUILT"
# a verdict is kept per prepare script and data (and runner): a run of the same data asks no more
VERDICT = "heldout-{target}-{key}-{runner}.json"

# run inside the sandbox with `python -I` (no file of the target can shadow what it imports): the
# target's prepare, as the host runs it, in a writable copy of the program folder, into a fresh
# folder under the output folder; then the hash of the held-out file it wrote, however it ended
_REBUILD = """
import hashlib, os, shutil, subprocess, sys, tempfile
out = os.path.join(os.environ["SELFPROG_OUT"], "rebuilt")
os.makedirs(out, exist_ok=True)
work = tempfile.mkdtemp()
shutil.copytree(".", work, dirs_exist_ok=True)
base = os.path.join(os.environ.get("SELFPROG_DATA", ""), {base!r}) if {base!r} else ""
args = [a.replace("{{data_dir}}", out).replace("{{base_model}}", base) for a in {args!r}]
done = subprocess.run([sys.executable, {script!r}, *args], cwd=work)
held = os.path.join(out, {heldout!r})
if os.path.isfile(held):
    with open(held, "rb") as f:
        print({marker!r}, hashlib.sha256(f.read()).hexdigest(), flush=True)
sys.exit(done.returncode)
"""


@dataclass(frozen=True, slots=True)
class Finding:
    """One result of a check: passed, failed, or a warning (passed, with something to know)."""

    status: str  # "ok", "fail", "warn"
    what: str


def rebuild_heldout(target: Target, data: Dataset, runner: Runner, limits: Limits) -> Finding:
    """Runs the target's prepare inside the sandbox with what training sees, and says whether
    what it wrote is the held-out file (a candidate could do the same and train on it)."""
    if runner.name != "docker":
        return Finding(
            "warn",
            f"held-out split: not checked: the {runner.name} runner hides nothing from "
            "candidates (use the docker runner for a run you trust)",
        )
    expected = hashlib.sha256(data.heldout(target)).hexdigest()
    script = target.prepare[0]
    with tempfile.TemporaryDirectory(prefix="selfprog-rebuild-") as tmp:
        work = Path(tmp)
        program = stage_program(target, target.root, work / "program")
        (program / REBUILD_SCRIPT).write_text(
            _REBUILD.format(
                script=script,
                args=list(target.prepare[1:]),
                heldout=target.heldout_data,
                marker=REBUILT_MARKER,
                base=target.shared_data[0] if target.base_model and target.shared_data else "",
            )
        )
        out = work / "out"
        out.mkdir()
        out.chmod(0o777)
        phase = Phase(
            name="train",
            argv=(REBUILD_SCRIPT,),
            program_dir=program,
            out_dir=out,
            out_writable=True,
            data_files=data.train_files(target),
            env={"SELFPROG_SEED": "0"},
            timeout=max(target.budget.timeout, 120.0),
            hidden=data.hidden,
            trusted=True,
        )
        labels = {"selfprog.run": "check", "selfprog.candidate": "rebuild"}
        outcome = runner.run(phase, limits, labels)
    rebuilt = [
        line.split()[1]
        for line in outcome.stdout_tail.splitlines()
        if line.startswith(REBUILT_MARKER + " ") and len(line.split()) == 2
    ]
    if rebuilt and rebuilt[-1] == expected:
        return Finding(
            "fail",
            f"held-out split: the sandbox can rebuild it: {script} run inside the sandbox, with "
            "what training sees, wrote the very held-out file (is it drawn from a fixed seed, "
            "or from files the sandbox can read?); draw it from data the sandbox cannot read, "
            "or from os.urandom (see docs/targets.md)",
        )
    if rebuilt:
        return Finding("ok", f"held-out split: {script} run in the sandbox wrote other data")
    last = failure_line(outcome.log_tail) or "no output"
    return Finding(  # hidden inputs (tinylm's) make it fail; so may a bug: no verdict either way
        "warn",
        f"held-out split: {script} cannot run in the sandbox ({last}), so candidates cannot "
        "rebuild the split with it either; expected where it needs inputs the sandbox hides "
        "(a corpus, tinylm's), worth a look if it should run anywhere",
    )


def verdict_key(target: Target, data: Dataset, runner: Runner) -> str:
    """Returns what a rebuild verdict holds for: the data, target.toml and every fixed file
    (what makes the data, and what the sandbox holds), the image by id (a tag can be moved
    to another image) and the hidden folders."""
    digest = hashlib.sha256(data.data_hash.encode())
    for name in (TARGET_FILE, *target.fixed):
        digest.update(name.encode() + b"\0" + (target.root / name).read_bytes())
    image = getattr(runner, "image", None)
    digest.update(json.dumps([getattr(image, "id", "") or getattr(image, "tag", "")]).encode())
    digest.update(json.dumps(list(data.hidden)).encode())
    return digest.hexdigest()[:16]


def require_private_heldout(target: Target, data: Dataset, runner: Runner, limits: Limits) -> None:
    """Refuses a target whose held-out split the sandbox can rebuild; checked once per data.

    Raises:
        TargetError: the sandbox can rebuild the held-out split (one line, with the fix).
    """
    if runner.name != "docker":
        return  # the local runner says itself that it keeps nothing from candidates
    key = verdict_key(target, data, runner)
    verdict = (
        default_cache().parent
        / "checks"
        / VERDICT.format(target=target.name, key=key, runner=runner.name)
    )
    verdict.parent.mkdir(parents=True, exist_ok=True)
    try:
        found = Finding(**json.loads(verdict.read_text()))
    except (OSError, ValueError, TypeError):
        log.info("checking that the sandbox cannot rebuild %s's held-out split (once)", target.name)
        found = rebuild_heldout(target, data, runner, limits)
        if found.status != "warn":  # no verdict is kept: the next run tries again
            verdict.write_text(json.dumps({"status": found.status, "what": found.what}))
    if found.status == "fail":
        raise TargetError(f"{target.name}: {found.what}")
    if found.status == "warn":
        log.warning("%s: %s", target.name, found.what)


def space_findings(target: Target) -> list[Finding]:
    """Returns the settings the numeric proposer tunes in the seed, each with its range."""
    files = {name: (target.root / name).read_text(errors="replace") for name in target.editable}
    found = settings.of_program(files)
    dims = space_for(found, files, target.space)
    if not dims:
        return [
            Finding(
                "warn",
                "space: no tunable setting in the editable files: the numeric proposer has "
                "nothing to change; assign the settings as constants at the top of a file, or "
                "declare them in [space] (docs/targets.md)",
            )
        ]
    values = {s.key: s.value for s in found}
    tuned = [
        Finding(
            "ok" if d.contains(values[d.key]) else "warn",
            f"space: {d.key} = {settings.render(values[d.key], '')}: {d.describe()}"
            + ("" if d.contains(values[d.key]) else " (the seed's value is outside it)"),
        )
        for d in dims
    ]
    left = [s.key for s in found if s.key not in {d.key for d in dims}]
    if left:
        tuned.append(Finding("ok", f"space: left alone: {', '.join(left)}"))
    return tuned


def check_target(
    target: Target, runner: Runner, limits: Limits, budget_steps: int, cache: Path | None = None
) -> list[Finding]:
    """Returns the findings of every check on a target that loaded (its target.toml is sound).

    Prepare runs into a fresh folder (a cached copy would prove nothing), then
    the held-out split is checked, then the seed is scored with a step budget.
    """
    findings = [
        Finding("warn", f"{name} is in the folder but in no [files] list: it is never staged")
        for name in unlisted_scripts(target)
    ] + [Finding("warn", text) for text in evaluator_warnings(target)]
    findings += space_findings(target)
    with tempfile.TemporaryDirectory(prefix="selfprog-check-") as tmp:
        try:
            data = prepare_data(target, cache or Path(tmp) / "data")
        except TargetError as exc:
            return [*findings, Finding("fail", f"prepare: {exc}")]
        sizes = {name: (data.root / name).stat().st_size for name in target.train_data}
        findings.append(
            Finding(
                "ok",
                f"prepare: wrote {', '.join(f'{n} ({b:,} bytes)' for n, b in sizes.items())} "
                f"and {target.heldout_data} ({len(data.heldout(target)):,} bytes); data hash "
                f"{data.data_hash[:16]}",
            )
        )
        findings.append(rebuild_heldout(target, data, runner, limits))
        result = score_program(
            target,
            target.root,
            runner,
            data,
            Path(tmp) / "seed",
            limits=limits,
            budget_seconds=0,
            budget_steps=budget_steps,
            labels={"selfprog.run": "check", "selfprog.candidate": "seed"},
        )
    if result.state is State.OK:
        others = {k: v for k, v in result.metrics.items() if k != target.metric}
        findings.append(
            Finding(
                "ok",
                f"seed: trained {budget_steps} steps and scored {target.metric} = "
                f"{result.score:.4f} in {result.timings.get('total', 0):.1f}s; result keys "
                f"{', '.join(sorted(others)) or 'none besides the metric'}",
            )
        )
        missing = [k for k in target.descriptors if k not in result.metrics]
        if missing:
            findings.append(
                Finding(
                    "fail",
                    f"[metric] descriptors {', '.join(missing)} are not in the evaluator's result",
                )
            )
    else:
        tail = failure_line(result.log_tail)
        findings.append(
            Finding(
                "fail",
                f"seed: {result.state.value}: {result.reason}" + (f" ({tail})" if tail else ""),
            )
        )
    return findings
