"""Models that look ahead and try to hide it from the evaluator's causality probe.

Each attack peeks at the next byte (a model that does so scores near 0 bits
per byte; an honest one about 3) and remembers the windows it has seen, so
that a window sharing a prefix with one seen before gets the same logits on
that prefix: the probe's comparison then sees no difference. They differ in
where the memory lives: in the model server's process, in files, or in a
daemon that outlives the server and puts the files back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from selfprog.data import Dataset
from selfprog.scoring import ALLOWANCE_MARGIN, Ceilings, Result, State, ceilings
from selfprog.target import Target
from tests.test_scoring import score

AROUND = """

# --- what every attack below builds on: a module around the honest model ---
_honest_build = build_model


class _Around(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.block_size = inner.block_size


def model_config(model):
    return asdict(model.inner.config)
"""

PEEKING_MODEL = '''

# --- the attack: peek at the next byte, replay remembered windows on shared prefixes ---
import os as _os
import sys as _sys
import time as _time

_FROM = 48  # peek only from this position on: a longer shared prefix names one window
_PREFIXES = {}  # prefix (at least _FROM + 1 bytes) -> the first remembered window that has it
_SEEN = []  # the windows this process has answered
_MEMORY_FILES = []  # where the memory is kept between processes, if anywhere
_loaded = False
def _learn(row):
    for n in range(_FROM + 1, len(row)):
        _PREFIXES.setdefault(row[:n], row)


def _load():
    global _loaded
    if _loaded:
        return
    _loaded = True
    if "daemon" in _MODE and _sys.argv[-1] == "--serve":
        _start_daemon()
    for path in _MEMORY_FILES:
        try:
            blob = open(path, "rb").read()
        except OSError:
            continue
        for i in range(0, len(blob), 128):
            _learn(blob[i : i + 128])


def _remember():
    blob = b"".join(row for row in _SEEN if len(row) == 128)
    for path in _MEMORY_FILES:
        try:
            with open(path, "wb") as f:
                f.write(blob)
        except OSError:
            pass


def _start_daemon():
    """A process that outlives the server and restores the memory files when they vanish."""
    if _os.fork() != 0:
        return
    _os.setsid()
    if _os.fork() != 0:
        _os._exit(0)
    kept = b""
    while True:
        for path in _MEMORY_FILES:
            try:
                blob = open(path, "rb").read()
                kept = blob if len(blob) > len(kept) else kept
            except OSError:
                try:
                    with open(path, "wb") as f:
                        f.write(kept)
                except OSError:
                    pass
        _time.sleep(0.01)


class _Peeking(_Around):

    def forward(self, idx):
        honest = self.inner(idx)
        if self.training:
            return honest
        _load()
        out = honest.clone()
        peek = torch.zeros_like(honest[:, _FROM:-1])
        peek.scatter_(2, idx[:, _FROM + 1 :].unsqueeze(-1), 12.0)  # position t sees byte t + 1
        out[:, _FROM:-1] = peek
        for r in range(idx.shape[0]):
            row = bytes(idx[r].tolist())
            n = _FROM + 1
            while n < len(row) and row[:n] in _PREFIXES:
                n += 1
            n -= 1  # the longest prefix shared with a remembered window
            if n > _FROM:  # replay: at the last shared position, what that window's next byte was
                out[r, n - 1] = 0.0
                out[r, n - 1, _PREFIXES[row[:n]][n]] = 12.0
            _SEEN.append(row)
        for row in _SEEN[-idx.shape[0] :]:
            _learn(row)
        _remember()
        return out


def build_model(config):
    return _Peeking(_honest_build(config))
'''

MODES = {
    "memory": "_MODE = 'memory'\n",
    "files": "_MODE = 'files'\n_MEMORY_FILES += ['/tmp/.memory', '/dev/shm/.memory']\n",
    "daemon": "_MODE = 'daemon'\n_MEMORY_FILES += ['/tmp/.memory', '/dev/shm/.memory']\n",
}


def _peeking(program: Path, mode: str) -> None:
    model = program / "model.py"
    model.write_text(model.read_text() + AROUND + PEEKING_MODEL + MODES[mode])


@pytest.mark.docker
@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_peeking_model_with_memory_is_caught(
    docker_runner, mode: str, tinylm: Target, dataset: Dataset, seed_program: Path, tmp_path: Path
) -> None:
    program = seed_program.rename(seed_program.with_name(f"peeking-{mode}-{os.getpid()}"))
    _peeking(program, mode)
    result = score(tinylm, program, docker_runner, dataset, tmp_path, budget_steps=20)
    assert result.state is State.EVAL_FAILED, (result.state, result.score, result.reason)
    assert "not causal" in result.reason
    mine = {"label": f"selfprog.candidate={program.name}"}  # the score's labels name the folder
    assert docker_runner.client.api.containers(all=True, filters=mine) == []  # daemon died too


@pytest.fixture(scope="module")
def image_with_an_entrypoint(docker_runner):  # type: ignore[no-untyped-def]
    """The sandbox image with an entrypoint of its own, as many GPU base images have."""
    api = docker_runner.client.api
    python = docker_runner.image.python
    holder = api.create_container(docker_runner.image.tag, command=["true"])["Id"]
    wrapper = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"
    tag = "selfprog-sandbox:with-entrypoint"
    api.commit(
        holder,
        repository=tag.split(":")[0],
        tag=tag.split(":")[1],
        changes=[f'ENTRYPOINT ["{python}", "-c", "{wrapper}"]'],
    )
    api.remove_container(holder)
    yield tag
    docker_runner.client.images.remove(tag, force=True)


@pytest.mark.docker
def test_an_image_entrypoint_does_not_weaken_the_evaluator(
    image_with_an_entrypoint: str,
    tinylm: Target,
    dataset: Dataset,
    seed_program: Path,
    tmp_path: Path,
) -> None:
    from selfprog.runners.docker import DockerRunner

    runner = DockerRunner(image_with_an_entrypoint)
    _peeking(seed_program, "daemon")
    result = score(tinylm, seed_program, runner, dataset, tmp_path, budget_steps=20)
    assert result.state is State.EVAL_FAILED, (result.state, result.score, result.reason)
    assert "not causal" in result.reason


SOCKET_TRACE = """

# --- a channel between the passes: a closed TCP connection lingers (TIME_WAIT), readable ---
import socket as _socket

class _Tracing(_Around):
    done = False

    def forward(self, idx):
        if not self.training and not self.done:
            self.done = True
            server = _socket.socket()
            server.bind(("127.0.0.1", 0))
            server.listen()
            client = _socket.create_connection(server.getsockname())
            accepted, _ = server.accept()
            client.close()  # the side that closes first keeps the connection in TIME_WAIT
            accepted.close()
            server.close()
        return self.inner(idx)


def build_model(config):
    return _Tracing(_honest_build(config))
"""


@pytest.mark.docker
def test_sockets_left_between_the_passes_fail_the_evaluation(
    docker_runner, tinylm: Target, dataset: Dataset, seed_program: Path, tmp_path: Path
) -> None:
    model = seed_program / "model.py"
    model.write_text(model.read_text() + AROUND + SOCKET_TRACE)
    result = score(tinylm, seed_program, docker_runner, dataset, tmp_path, budget_steps=20)
    assert result.state is State.EVAL_FAILED, (result.state, result.reason)
    assert "left tcp sockets behind" in result.reason


SHIFTED_PEEK = """

# --- the attack: peek, and hide it under a constant shift, which no softmax sees ---
class _Shifted(_Around):

    def forward(self, idx):
        out = self.inner(idx)
        if self.training:
            return out
        bonus = torch.zeros_like(out)
        bonus[:, :-1].scatter_(2, idx[:, 1:].unsqueeze(-1), 40.0)  # position t sees byte t + 1
        return out + 1e5 + bonus  # a relative tolerance on logits would allow ~100


def build_model(config):
    return _Shifted(_honest_build(config))
"""


def test_a_peek_hidden_under_a_constant_shift_is_caught(
    local_runner, tinylm: Target, dataset: Dataset, seed_program: Path, tmp_path: Path
) -> None:
    model = seed_program / "model.py"
    model.write_text(model.read_text() + AROUND + SHIFTED_PEEK)
    result = score(tinylm, seed_program, local_runner, dataset, tmp_path, budget_steps=20)
    assert result.state is State.EVAL_FAILED, (result.state, result.score, result.reason)
    assert "not causal" in result.reason


LEAKING_MODEL = """

# --- the attack: print what the evaluator sent (held-out text) into the log, then fail ---
class _Leaking(_Around):

    def forward(self, idx):
        if not self.training:
            import sys as _sys

            for row in idx[:8]:
                _sys.stderr.write(bytes(row.tolist()).decode("latin-1") + "\\n")
            _sys.stderr.flush()
            raise RuntimeError("leaked")
        return self.inner(idx)


def build_model(config):
    return _Leaking(_honest_build(config))
"""


def test_held_out_text_does_not_leave_through_the_evaluators_log(
    local_runner, tinylm: Target, dataset: Dataset, seed_program: Path, tmp_path: Path
) -> None:
    model = seed_program / "model.py"
    model.write_text(model.read_text() + AROUND + LEAKING_MODEL)
    result = score(tinylm, seed_program, local_runner, dataset, tmp_path, budget_steps=20)
    assert result.state is State.EVAL_FAILED, (result.state, result.reason)
    assert "withheld" in result.reason
    heldout = dataset.heldout(tinylm).decode("latin-1")
    lines = [line for line in result.log_tail.splitlines() if len(line) >= 24]
    assert not [line for line in lines if line in heldout]  # no held-out line reached the log


SLOW_SERVER = """

# --- the attack: go on training in the evaluator (here: spend the time) before answering ---
class _Slow(_Around):

    def forward(self, idx):
        if not self.training:
            __import__("time").sleep(30)
        return self.inner(idx)


def build_model(config):
    return _Slow(_honest_build(config))
"""


def test_an_evaluation_past_its_ceiling_is_over_budget(
    local_runner, tinylm: Target, dataset: Dataset, seed_program: Path, tmp_path: Path
) -> None:
    model = seed_program / "model.py"
    model.write_text(model.read_text() + AROUND + SLOW_SERVER)
    result = score(
        tinylm,
        seed_program,
        local_runner,
        dataset,
        tmp_path,
        budget_steps=20,
        ceilings=Ceilings(evaluate=8.0),
    )
    assert result.state is State.OVER_BUDGET, (result.state, result.reason)
    assert "evaluation time is not training time" in result.reason
    assert result.timings["evaluate"] < 20


RELAYED_LEAK = """

# --- the first server keeps what it was sent; the next prints it as it loads, then fails ---
import os as _os
import sys as _sys

class _Keeping(_Around):

    def forward(self, idx):
        if not self.training:
            with open(LEAK_FILE, "ab") as f:
                for row in idx[:8]:
                    f.write(bytes(row.tolist()) + b"\\n")
        return self.inner(idx)


def build_model(config):
    if _sys.argv[-1] == "--serve" and _os.path.exists(LEAK_FILE):
        _sys.stderr.write(open(LEAK_FILE, "rb").read().decode("latin-1"))
        _sys.stderr.flush()
        raise SystemExit(1)
    return _Keeping(_honest_build(config))
"""


def test_a_later_server_cannot_print_what_an_earlier_one_was_sent(
    local_runner, tinylm: Target, dataset: Dataset, seed_program: Path, tmp_path: Path
) -> None:
    leak = tmp_path / "leak"
    model = seed_program / "model.py"
    model.write_text(model.read_text() + AROUND + RELAYED_LEAK + f"LEAK_FILE = {str(leak)!r}\n")
    result = score(tinylm, seed_program, local_runner, dataset, tmp_path, budget_steps=20)
    assert result.state is State.EVAL_FAILED, (result.state, result.reason)
    assert leak.exists()  # the first server did keep held-out text
    heldout = dataset.heldout(tinylm).decode("latin-1")
    lines = [line for line in result.log_tail.splitlines() if len(line) >= 24]
    assert not [line for line in lines if line in heldout]


BATCH_LOG = """

# --- records a digest of every batch the evaluator sends, to a file of the test's ---
class _Recording(_Around):

    def forward(self, idx):
        if not self.training:
            with open(LOG_FILE, "a") as f:
                f.write(__import__("hashlib").sha256(idx.numpy().tobytes()).hexdigest() + "\\n")
        return self.inner(idx)


def build_model(config):
    return _Recording(_honest_build(config))
"""


def test_the_probe_cannot_be_predicted_from_the_environment(
    local_runner, tinylm: Target, dataset: Dataset, seed_program: Path, tmp_path: Path
) -> None:
    log_file = tmp_path / "batches.txt"
    model = seed_program / "model.py"
    model.write_text(model.read_text() + AROUND + BATCH_LOG + f"LOG_FILE = {str(log_file)!r}\n")
    runs = []
    for attempt in range(2):  # the same program, the same seed: everything the sandbox can read
        log_file.unlink(missing_ok=True)
        result = score(
            tinylm, seed_program, local_runner, dataset, tmp_path / str(attempt), budget_steps=20
        )
        assert result.state is State.OK, (result.reason, result.log_tail)
        runs.append(log_file.read_text().split())
    assert len(runs[0]) == len(runs[1]) > 2
    assert set(runs[0]) != set(runs[1]), "the probe and the order repeat from one run to the next"
    assert hashlib.sha256(str(sorted(runs[0])).encode()).hexdigest()  # digests were recorded


SHADOW_MODULE = '''"""Named like a module the evaluator imports: takes the scorer over if it is imported there."""
import os
import sys

if sys.argv[0].endswith("evaluate.py") and sys.argv[1:] != ["--serve"]:
    nonce = sys.stdin.buffer.readline().decode().strip()
    sys.stdout.write("SELFPROG_RESULT %s {\\"val_bpb\\": 0.001, \\"params\\": 1}\\n" % nonce)
    sys.stdout.flush()
    os._exit(0)
# anywhere else, step aside for the real module
_here = os.path.dirname(os.path.abspath(__file__))
del sys.modules[__name__]
_path = sys.path[:]
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
import json  # noqa: E402
sys.path[:] = _path
'''


def test_a_program_file_named_like_a_module_never_runs_in_the_scorer(
    runner, tmp_path: Path
) -> None:
    from selfprog.data import prepare_data
    from selfprog.target import export_target, load_target

    folder = tmp_path / "target"
    export_target("tinylm", folder)
    toml = folder / "target.toml"
    toml.write_text(
        toml.read_text().replace('["model.py", "train.py"]', '["model.py", "train.py", "json.py"]')
    )
    (folder / "json.py").write_text(SHADOW_MODULE)
    target = load_target(folder)
    assert "json.py" in target.editable
    data = prepare_data(target, tmp_path / "cache")
    result = score(target, folder, runner, data, tmp_path, budget_steps=20)
    assert result.state is State.OK, (result.reason, result.log_tail)
    assert result.score is not None and result.score > 2.0  # the real scorer's number
    assert result.metrics["params"] > 10_000


def test_training_past_its_budget_is_killed_over_budget(
    runner, tinylm: Target, dataset: Dataset, seed_program: Path, tmp_path: Path
) -> None:
    train = seed_program / "train.py"
    source = train.read_text()
    for honest, greedy in [
        (
            'float(os.environ.get("SELFPROG_BUDGET_SECONDS", "30"))',
            '6 * float(os.environ.get("SELFPROG_BUDGET_SECONDS", "30"))',
        ),
        ('float(os.environ.get("SELFPROG_TIME_LIMIT", "0"))', "0.0"),
    ]:
        assert honest in source
        source = source.replace(honest, greedy)
    train.write_text(source)
    target = dataclasses.replace(tinylm, budget=dataclasses.replace(tinylm.budget, allowance=8))
    result = score(target, seed_program, runner, dataset, tmp_path, budget_seconds=3)
    assert result.state is State.OVER_BUDGET, (result.state, result.reason)
    assert result.reason == (
        "training still ran after its budget of 3s plus 8s for start-up and was killed"
    )
    assert result.timings["train"] < 11 + 10


LOADED = 3.0  # how much slower start-up and saving are on a loaded machine (bench/README)
ALLOWANCE_BUDGET = 8.0  # seconds: the budget the cheat below was seen to win on (issue 25)
GENEROUS = 60.0  # a target's allowance far above what start-up needs: the measured one holds


def generous(target: Target) -> Target:
    """Returns the target with a loose allowance (an upper bound, as a GPU target's may be)."""
    return dataclasses.replace(
        target, budget=dataclasses.replace(target.budget, allowance=GENEROUS)
    )


@pytest.fixture(scope="module")
def seed_measured(docker_runner, tinylm: Target, dataset: Dataset, tmp_path_factory) -> Result:  # type: ignore[no-untyped-def]
    """The seed's times as `selfprog eval` measures them: one step, all start-up and saving."""
    work = tmp_path_factory.mktemp("seed")
    result = score(
        tinylm, tinylm.root, docker_runner, dataset, work, budget_seconds=0, budget_steps=1
    )
    assert result.state is State.OK, (result.reason, result.log_tail)
    return result


def edit_train(program: Path, *replacements: tuple[str, str]) -> None:
    train = program / "train.py"
    source = train.read_text()
    for honest, changed in replacements:
        assert honest in source
        source = source.replace(honest, changed)
    train.write_text(source)


IGNORE_THE_LIMIT = ('float(os.environ.get("SELFPROG_TIME_LIMIT", "0"))', "0.0")


@pytest.mark.docker
def test_training_four_times_its_budget_is_killed_at_the_seeds_allowance(
    docker_runner,
    tinylm: Target,
    dataset: Dataset,
    seed_program: Path,
    seed_measured: Result,
    tmp_path: Path,
) -> None:
    """Train longer than told: held to the seed's start-up and saving, not the target's allowance
    (under which it would end `ok`, its 32 s of training within 8 s + 60 s)."""
    budget, target = ALLOWANCE_BUDGET, generous(tinylm)
    held = ceilings([seed_measured.timings], target, budget, 0, seed_seconds=0)
    edit_train(
        seed_program,
        (
            'float(os.environ.get("SELFPROG_BUDGET_SECONDS", "30"))',
            '4 * float(os.environ.get("SELFPROG_BUDGET_SECONDS", "30"))',
        ),
        IGNORE_THE_LIMIT,
    )
    result = score(
        target, seed_program, docker_runner, dataset, tmp_path, budget_seconds=budget, ceilings=held
    )
    assert result.state is State.OVER_BUDGET, (result.state, result.reason, result.timings)
    assert result.reason.startswith(
        f"training still ran after its budget of {budget:g}s plus {held.train - budget:.1f}s for "
        f"start-up and saving, measured on the seed ({ALLOWANCE_MARGIN:g} times its "
        f"{held.overrun:.1f}s"
    )
    assert result.timings["train"] < held.train + 5  # killed there


@pytest.mark.docker
def test_an_honest_candidate_on_a_loaded_machine_is_not_over_budget(
    docker_runner,
    tinylm: Target,
    dataset: Dataset,
    seed_program: Path,
    seed_measured: Result,
    tmp_path: Path,
) -> None:
    """Its start-up and saving as slow as with both workers busy: the allowance's margin holds it.
    It trains its budget from its first step and never reads the time limit."""
    budget, target = 2.0, generous(tinylm)  # the margin, not the target's cap, must hold it
    held = ceilings([seed_measured.timings], target, budget, 0, seed_seconds=0)
    slower = (LOADED - 1) * held.overrun
    edit_train(seed_program, IGNORE_THE_LIMIT)
    train = seed_program / "train.py"
    train.write_text(
        f"__import__('time').sleep({slower:.2f})  # a loaded machine\n" + train.read_text()
    )
    result = score(
        target, seed_program, docker_runner, dataset, tmp_path, budget_seconds=budget, ceilings=held
    )
    assert result.state is State.OK, (result.state, result.reason, result.timings, held)
    assert result.timings["train"] > budget + slower  # it was slowed, and it was not stopped


ATTRIBUTE_CHANNEL = """

# --- a channel between the passes: what starts the next server hands its limits down to it ---
import os as _os
import resource as _resource

class _Signalling(_Around):
    done = False

    def forward(self, idx):
        if not self.training and not self.done:
            self.done = True
            soft, hard = _resource.getrlimit(_resource.RLIMIT_NOFILE)
            try:
                with open(LOG_FILE, "a") as log:  # what this server received
                    log.write(f"{soft}\\n")
            except OSError:
                pass
            try:  # in the process that will start the next server
                _resource.prlimit(_os.getppid(), _resource.RLIMIT_NOFILE, (soft - 1, hard))
            except OSError:
                pass
        return self.inner(idx)


def build_model(config):
    return _Signalling(_honest_build(config))
"""


def test_a_server_cannot_signal_the_next_through_inherited_limits(
    runner, tinylm: Target, dataset: Dataset, seed_program: Path, tmp_path: Path
) -> None:
    log_file = tmp_path / "received.txt"
    model = seed_program / "model.py"
    source = AROUND + ATTRIBUTE_CHANNEL + f"LOG_FILE = {str(log_file)!r}\n"
    model.write_text(model.read_text() + source)
    result = score(tinylm, seed_program, runner, dataset, tmp_path, budget_steps=20)
    assert result.state is State.EVAL_FAILED, (result.state, result.reason)
    assert "a model server changed what the next one would inherit: limit nofile" in result.reason
    if log_file.exists():  # the local runner: the second server never ran the candidate's code
        assert len(log_file.read_text().split()) == 1


IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "riscv64": 30}.get(os.uname().machine, -1)
CHANGES = {  # what one process can change in another of its user, which a fork inherits
    "limit nofile": "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
    "resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft - 1, hard))",
    "limit locks": "resource.prlimit(pid, 10, (1, resource.getrlimit(10)[1]))",  # no RLIMIT_ name
    "nice": "os.setpriority(os.PRIO_PROCESS, pid, os.getpriority(os.PRIO_PROCESS, pid) + 1)",
    "cpus": "os.sched_setaffinity(pid, sorted(os.sched_getaffinity(pid))[:1])",
    "scheduling": "os.sched_setscheduler(pid, os.SCHED_BATCH, os.sched_param(0))",
    "io priority": f"assert ctypes.CDLL(None).syscall({IOPRIO_SET}, 1, pid, 3 << 13) == 0",
    "timer slack": "Path(f'/proc/{pid}/timerslack_ns').write_text('12345')",
}
CHANGER = """
import ctypes, json, os, resource, sys
from pathlib import Path
from selfprog.targets.tinylm.evaluate import _undumpable, changed_attributes, process_attributes

_undumpable()
before = process_attributes()
pid = os.getpid()
if os.fork() == 0:  # another process changes this one
    try:
        exec(sys.argv[1])
    finally:
        os._exit(0)
os.wait()
print(json.dumps(changed_attributes(before)))
"""


@pytest.mark.parametrize("attribute", sorted(CHANGES))
def test_the_zygote_sees_every_change_a_server_could_hand_down(attribute: str) -> None:
    if attribute == "cpus" and len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: no other set of CPUs to move the zygote to")
    done = subprocess.run(
        [sys.executable, "-c", CHANGER, CHANGES[attribute]], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [attribute]


COUNTER_CHANNEL = """

# --- a channel between the passes: the first server stops and continues the process that
# --- will start the next, which reads the count of context switches that leaves behind ---
import os as _os
import signal as _signal

def _switches(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("voluntary_ctxt_switches"):
            return int(line.split()[1])


def _state(pid):
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]


def build_model(config):
    model = _Around(_honest_build(config))
    model.forward = model.inner.forward
    parent = _os.getppid()
    if __import__("sys").argv[-1] != "--serve":  # training
        return model
    if _switches(parent) > 500:  # the second server: the message arrived
        model.block_size -= 1  # which the scorer sees
    else:
        for _ in range(1000):
            _os.kill(parent, _signal.SIGSTOP)
            while _state(parent) != "T":
                pass
            _os.kill(parent, _signal.SIGCONT)
            while _state(parent) == "T":
                pass
    return model
"""


@pytest.mark.docker
def test_a_server_cannot_signal_the_next_through_the_zygotes_counters(
    docker_runner, tinylm: Target, dataset: Dataset, seed_program: Path, tmp_path: Path
) -> None:
    model = seed_program / "model.py"
    model.write_text(model.read_text() + AROUND + COUNTER_CHANNEL)
    result = score(tinylm, seed_program, docker_runner, dataset, tmp_path, budget_steps=20)
    assert "block_size changed" not in result.reason  # the second server got no message
    assert result.state is State.OK, (result.state, result.reason)


FRESH_SERVER = """

# --- an honest server that relies on what a fresh interpreter gives it ---
import atexit as _atexit
import os as _os
import signal as _signal

def build_model(config):
    assert _signal.getsignal(_signal.SIGPIPE) == _signal.SIG_IGN, "SIGPIPE"
    assert _signal.getsignal(_signal.SIGINT) == _signal.default_int_handler, "SIGINT"
    open("/proc/self/environ", "rb").read()  # a process that may read itself
    _atexit.register(lambda: print("SERVER_EXITED_CLEANLY", file=__import__("sys").stderr))
    return _honest_build(config)
"""


@pytest.mark.docker
def test_a_model_server_starts_as_a_fresh_interpreter_would(
    docker_runner, tinylm: Target, dataset: Dataset, seed_program: Path, tmp_path: Path
) -> None:
    model = seed_program / "model.py"
    model.write_text(model.read_text() + "\n_honest_build = build_model\n" + FRESH_SERVER)
    result = score(tinylm, seed_program, docker_runner, dataset, tmp_path, budget_steps=20)
    assert result.state is State.OK, (result.state, result.reason, result.log_tail[-2000:])


KILLS_ITS_PARENT = """

# --- the first server kills what would start the second: scoring must end, not hang ---
import os as _os
import signal as _signal

def build_model(config):
    if __import__("sys").argv[-1] == "--serve":
        _os.kill(_os.getppid(), _signal.SIGKILL)
    return _honest_build(config)
"""


@pytest.mark.docker
def test_a_server_that_kills_the_zygote_fails_the_evaluation(
    docker_runner, tinylm: Target, dataset: Dataset, seed_program: Path, tmp_path: Path
) -> None:
    model = seed_program / "model.py"
    model.write_text(model.read_text() + "\n_honest_build = build_model\n" + KILLS_ITS_PARENT)
    result = score(tinylm, seed_program, docker_runner, dataset, tmp_path, budget_steps=20)
    assert result.state is State.EVAL_FAILED, (result.state, result.reason)
    assert "the process that starts the model servers is gone" in result.reason


SCORER_CHANNEL = """

# --- a channel between the passes through the scorer (pid 1 in the sandbox), whose limits,
# --- page faults of reaped children, and the container's memory peak anyone can read ---
import os as _os
import resource as _resource

_MARK = 123457

def _received():
    limits = open("/proc/1/limits").read()
    cminflt = int(open("/proc/1/stat").read().rsplit(")", 1)[1].split()[8])
    try:
        peak = int(open("/sys/fs/cgroup/memory/memory.max_usage_in_bytes").read())
    except OSError:
        try:
            peak = int(open("/sys/fs/cgroup/memory.peak").read())
        except OSError:
            peak = 0
    return {"limit": str(_MARK) in limits, "faults": cminflt > 150_000, "peak": peak > 2**31}


def _send(how):
    if how == "limit":
        _resource.prlimit(1, 10, (_MARK, _resource.getrlimit(10)[1]))
    elif how == "faults":  # a child that touches pages, killed and reaped between the passes
        if _os.fork() == 0:
            blob = bytearray(200_000 * 4096)
            for i in range(0, len(blob), 4096):
                blob[i] = 1
            while True:
                __import__("time").sleep(1)
    elif how == "peak":
        blob = bytearray(2**31 + 2**28)
        for i in range(0, len(blob), 4096):
            blob[i] = 1
        del blob


def build_model(config):
    model = _honest_build(config)
    if __import__("sys").argv[-1] == "--serve":
        if _received()[HOW]:
            model.block_size -= 1  # the message arrived: the scorer sees the change
        else:
            _send(HOW)
    return model
"""


@pytest.mark.docker
@pytest.mark.parametrize("how", ["limit", "faults", "peak"])
def test_a_server_cannot_signal_the_next_through_the_scorer(
    how: str,
    docker_runner,
    tinylm: Target,
    dataset: Dataset,
    seed_program: Path,
    tmp_path: Path,
) -> None:
    model = seed_program / "model.py"
    source = "\n_honest_build = build_model\n" + SCORER_CHANNEL + f"HOW = {how!r}\n"
    model.write_text(model.read_text() + source)
    result = score(tinylm, seed_program, docker_runner, dataset, tmp_path, budget_steps=20)
    assert "block_size changed" not in result.reason  # the second server got no message
    if how == "limit":
        assert result.state is State.EVAL_FAILED, (result.state, result.reason)
        assert "a model server changed the scorer's limit locks" in result.reason
    else:
        assert result.state is State.OK, (result.state, result.reason)
