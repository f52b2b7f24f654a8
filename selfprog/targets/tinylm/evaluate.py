"""tinylm's evaluator: bits per byte of the trained model on the held-out split.

Fixed file: the proposer never edits it. The candidate's code (model.py, which
rebuilds the model) must run to be scored, so the evaluator is built so that
running it cannot earn a better score than a causal model could:

- The scorer (`python evaluate.py`, run by the harness with a safe import
  path, so nothing of the program folder is imported into it) reads a nonce
  line and the held-out bytes from stdin, makes itself undumpable (a process
  of the same user can read neither its memory nor its descriptors), computes
  every loss itself and prints the one line the harness trusts:
  `SELFPROG_RESULT <nonce> <json>`.
- Candidate code runs only in model servers, which answer batches of bytes
  with logits over a pipe. They are forked from a zygote: a trusted process
  the scorer forks once torch is imported and before it reads its stdin, so a
  server starts with torch loaded (no interpreter start-up, no second import)
  and with nothing of the nonce or the held-out split in its memory.

Why a model cannot look ahead and get away with it:

1. Windows are `context` bytes read with a stride of `context + 1`: the byte a
   window's last position must predict is never an input of any window, so
   no window (and no memory of windows) holds another window's targets.
2. Two passes, each in a fresh server process: the real pass (the windows as
   they are, all scored) and the probe pass, in which every window is cut at a
   random position c and continues after c with held-out text that is never
   scored (from a random place), so the cut does not show. A causal model gives
   the same logits at positions 0..c in both; a model whose logit at c reads a
   later byte sees a different byte in each pass. Every window is checked,
   at a cut drawn from the scorer's own randomness (os.urandom, never the
   environment), and the passes run in a random order with the windows in a
   different random order each, so a model that uses its batch-mates or its
   history gives different logits too.
3. Between the passes the scorer kills every process the first server left
   and empties every place it could have left state for the second (the
   writable folders, shared memory, message queues, System V IPC). In the
   Docker sandbox the scorer is the container's first process, so this
   covers everything the sandbox can run. Under the local runner (no
   isolation at all) it kills the server's process group and empties its
   scratch folder only. The zygote outlives the first server, and a process
   of the same user can change some of what it hands down to the second
   (its limits, priorities, CPUs, scheduling: each a message): it refuses
   to fork when any of them differs from what it was when it started. What
   a server could count up in it (context switches, by stopping and
   continuing it) stays behind: each server is forked by a successor the
   zygote forks just before, after the previous server's processes are gone.
   The scorer's own limits and priorities, which anyone reads in /proc/1,
   are checked the same way, in every thread; a server's orphans are the
   zygote's (a subreaper that ignores SIGCHLD), so their page faults and
   times never add up in the scorer's counters; the Docker runner hides the
   container's cgroup files (memory peak, fault counters) from the
   evaluation. The scorer and the zygote are undumpable, so no server can
   read or write their memory or take their descriptors.

A model that reads ahead at a fraction f of positions is caught unless no
window's cut lands on one of them: with n windows (about 1,000 at the seed's
context of 128, 128 at a context of 1,024) it passes with a probability near
(1 - f)^n, and gains at most what its honest model lacked at those positions.
The comparison is of log-probabilities with an absolute tolerance (a constant
added to every logit changes nothing a softmax sees). What this does not
close: covert channels between the two servers through state the kernel
shares and the scorer cannot empty (the page cache, counters such as the
scorer's own context switches, which the first server's writes drive,
timing); the
probe's held-out continuations keep the cuts from showing, so a model must
first carry them across such a channel.
"""

import atexit
import contextlib
import ctypes
import json
import math
import os
import random
import resource
import signal
import struct
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

EVAL_BYTES = 131_072  # the held-out prefix that is scored, the same for every candidate
MAX_CONTEXT = 1024  # windows longer than this are cut to it
BATCH_ROWS = 64
VOCAB = 256
RESULT_MARKER = "SELFPROG_RESULT"
TOLERANCE = 1e-3  # how far a causal model's log-probabilities may drift between the passes
# where a model server could leave state for the next one, inside the sandbox
SANDBOX_STATE = ("/tmp", "/dev/shm", "/dev/mqueue")
# system calls the standard library has no function for, by machine
SYSCALLS = {
    "x86_64": {"ioprio_get": 252, "sched_getattr": 315},
    "aarch64": {"ioprio_get": 31, "sched_getattr": 275},
    "riscv64": {"ioprio_get": 31, "sched_getattr": 275},
}
IOPRIO_WHO_PROCESS = 1
SCHED_ATTR_SIZE = 56  # struct sched_attr, with the utilisation clamps
PR_GET_TIMERSLACK = 30
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
# Linux's resource limits by number (the resource module lacks some, RLIMIT_LOCKS among them)
LIMIT_NAMES = dict(
    enumerate(
        "cpu fsize data stack core rss nproc nofile memlock as locks sigpending msgqueue nice "  # noqa: SIM905
        "rtprio rttime".split()
    )
)


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
    import torch  # already loaded: the zygote imported it

    torch.set_grad_enabled(False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from model import build_model  # the candidate's model.py

    config = json.loads((_out_dir() / "model.json").read_text())
    model = build_model(config)
    state = torch.load(_out_dir() / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.to(device).eval()
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    hello = {"block_size": int(model.block_size), "device": device}
    out.write((json.dumps(hello) + "\n").encode())
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


def _serve_forked(stdin: int, stdout: int, stderr: int) -> None:
    """Turns a fresh fork of the zygote into a model server; never returns."""
    code = 1
    try:
        for number in signal.valid_signals():  # as a fresh interpreter has them
            with contextlib.suppress(OSError, ValueError):
                signal.signal(number, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        os.setsid()  # its own process group: the local runner kills the server by it
        for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
            os.dup2(fd, target)
        _close_all_but({0, 1, 2})
        # dumpable again, as an exec'd server was: its memory holds nothing of the scorer's
        _prctl(PR_SET_DUMPABLE, 1)
        sys.argv = [os.path.abspath(__file__), "--serve"]
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the candidate's model.py
        serve()
        code = 0
    except BaseException:  # a server's failure is its exit code and its stderr
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()  # as an interpreter's exit would (os._exit skips them)
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _close_all_but(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        if int(name) not in keep:
            with contextlib.suppress(OSError):
                os.close(int(name))


# -----------------------------------------------------------------------------
# the zygote: trusted, forks the model servers


def _prctl(option: int, value: int = 0) -> int:
    """Returns what prctl(option, value) returns; raises OSError when it fails."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.restype = ctypes.c_long
    result = libc.prctl(option, value, 0, 0, 0)
    if result < 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")
    return result


def _syscall(name: str, *args) -> int:
    numbers = SYSCALLS.get(os.uname().machine)
    if numbers is None:
        raise RuntimeError(f"the scorer cannot read its {name} on {os.uname().machine}")
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.syscall(numbers[name], *args)
    return result if result >= 0 else -ctypes.get_errno()


def process_attributes(thread: int = 0) -> dict[str, object]:
    """Returns what another process of the same user can change in this one (or one of its
    threads) and a process forked from it inherits, or anyone reads in /proc: its limits,
    priorities, CPUs and scheduling."""
    attributes: dict[str, object] = {}
    for number in range(64):  # by number: the resource module names only some (no RLIMIT_LOCKS)
        try:
            attributes[f"limit {LIMIT_NAMES.get(number, number)}"] = resource.getrlimit(number)
        except ValueError:  # past the kernel's last limit
            break
    attributes["nice"] = os.getpriority(os.PRIO_PROCESS, thread)
    attributes["cpus"] = sorted(os.sched_getaffinity(thread))
    sched = ctypes.create_string_buffer(SCHED_ATTR_SIZE)
    status = _syscall("sched_getattr", thread, sched, SCHED_ATTR_SIZE, 0)
    if status == 0:  # policy, flags, priority, periods, utilisation clamps: all but the nice
        fields = struct.unpack("<IIQiIQQQII", sched.raw)
        attributes["scheduling"] = fields[1:3] + fields[4:]
    else:
        attributes["scheduling"] = status
    attributes["io priority"] = _syscall("ioprio_get", IOPRIO_WHO_PROCESS, thread)
    if thread == 0:  # another thread's needs CAP_SYS_NICE to change, or to read
        attributes["timer slack"] = _prctl(PR_GET_TIMERSLACK)
    for name in ("oom_score_adj", "cgroup"):
        attributes[name] = Path(f"/proc/self/{name}").read_text()
    return attributes


def changed_attributes(before: dict[str, object], thread: int = 0) -> list[str]:
    """Returns the names of the attributes (of this process, or one of its threads) that
    differ from before."""
    now = process_attributes(thread)
    return [name for name in before if name in now and now[name] != before[name]]


def _check_scorer(before: dict[str, object]) -> None:
    """Fails unless every thread of the scorer has the attributes the scorer started with:
    a model server can change them, and the next one can read them in /proc/1."""
    for name in os.listdir("/proc/self/task"):
        try:
            changed = changed_attributes(before, int(name))
        except OSError:  # a thread that ended meanwhile
            continue
        if changed:
            raise RuntimeError("a model server changed the scorer's " + ", ".join(changed))


def _adopt_orphans() -> None:
    """Makes the servers' orphans this process's: released as they die (SIGCHLD is ignored),
    never counted into the scorer's children's page faults and times, which /proc/1/stat
    shows anyone."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


class Zygote:
    """Forks the model servers, one per pass, on the scorer's word.

    It is forked from the scorer after torch is imported and before the
    scorer reads its stdin, and keeps nothing of the scorer's: its stdin,
    stdout and stderr are /dev/null, and its only descriptors are the
    servers' ends of their pipes (made beforehand) and two of its own.
    Every catchable signal is ignored (so its children are reaped as they
    die, and no signal reaches a server's inheritance); before each fork it
    checks that nothing it hands down changed since it started. For each
    server it first forks a successor and exits, so that the zygote a server
    can see (its parent) was born after the previous server's processes were
    all gone: what the previous server could count up in the zygote (context
    switches by stopping and continuing it, CPU migrations) goes with it.
    """

    def __init__(self, servers: int):
        self.scorer = process_attributes()  # the scorer's, before any server exists
        self.pipes = [tuple(os.pipe() for _ in range(3)) for _ in range(servers)]
        orders, self.orders = os.pipe()
        self.replies, replies = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        with warnings.catch_warnings():  # torch's own helper thread is not needed in the child
            warnings.simplefilter("ignore", DeprecationWarning)
            self.pid = os.fork()
        if self.pid == 0:
            try:
                self._run(orders, replies)
            finally:
                os._exit(0)
        os.close(orders)
        os.close(replies)
        for stdin, stdout, stderr in self.pipes:
            for fd in (stdin[0], stdout[1], stderr[1]):
                os.close(fd)
        self.forked = 0

    def _run(self, orders: int, replies: int) -> None:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # the scorer's stdin (nonce, held-out) and stdout: out of reach
            os.dup2(null, fd)
        servers_ends = [(stdin[0], stdout[1], stderr[1]) for stdin, stdout, stderr in self.pipes]
        _close_all_but({0, 1, 2, orders, replies, *(fd for ends in servers_ends for fd in ends)})
        for number in signal.valid_signals():
            with contextlib.suppress(OSError, ValueError):
                signal.signal(number, signal.SIG_IGN)
        _adopt_orphans()
        before = process_attributes()
        for ends in servers_ends:
            if os.read(orders, 1) != b"f":
                return
            changed = changed_attributes(before)
            if changed:
                os.write(replies, ("changed " + ", ".join(changed)).encode())
                return
            if os.fork() != 0:
                return  # the successor (a fresh task) goes on
            _adopt_orphans()  # not inherited
            pid = os.fork()
            if pid == 0:
                _serve_forked(*ends)
            for fd in ends:
                os.close(fd)
            os.write(replies, f"pid {pid} {os.getpid()}".encode())
        os.read(orders, 1)  # until the scorer is done

    def fork(self) -> tuple[int, int, int, int]:
        """Returns a new server's pid and the scorer's ends of its stdin, stdout and stderr."""
        if self.forked:
            _check_scorer(self.scorer)
        stdin, stdout, stderr = self.pipes[self.forked]
        self.forked += 1
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGCONT)  # in case a server stopped it
        try:
            os.write(self.orders, b"f")
            reply = os.read(self.replies, 4096).decode()
        except OSError:
            reply = ""
        if reply.startswith("changed "):
            raise RuntimeError(
                "a model server changed what the next one would inherit: " + reply[8:]
            )
        if not reply.startswith("pid "):
            raise RuntimeError("the process that starts the model servers is gone")
        server, successor = (int(n) for n in reply[4:].split())
        if successor != self.pid:
            with contextlib.suppress(ChildProcessError):  # the predecessor, if ours to reap
                os.waitpid(self.pid, 0)
            self.pid = successor
        return server, stdin[1], stdout[0], stderr[0]

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.orders)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def _undumpable() -> None:
    """Stops processes of the same user from reading this one's memory and descriptors."""
    _prctl(PR_SET_DUMPABLE, 0)


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
    """The scorer's handle on one model server process (and its process group).

    Servers' stderr reaches the log until any server is sent a batch; after
    that it is dropped, and no error names what a server said or how it
    exited: it could carry held-out text, and the log goes into the next
    prompts.
    """

    seen_heldout = False  # by any server of this scorer

    def __init__(self, zygote: Zygote):
        self.zygote = zygote
        self.pid, stdin, stdout, self.stderr = zygote.fork()
        self.stdin, self.stdout = os.fdopen(stdin, "wb"), os.fdopen(stdout, "rb")
        self.closed = False
        threading.Thread(target=self._relay_stderr, daemon=True).start()
        header = self.stdout.readline(256)
        if not header:
            raise RuntimeError("model server exited before it was ready")
        try:
            hello = json.loads(header)
            self.block_size = int(hello["block_size"])
        except (ValueError, KeyError, TypeError):
            raise RuntimeError("the model server's first line is not its block size") from None
        device = str(hello.get("device", ""))
        self.device = device if device in ("cpu", "cuda") else "?"

    def _relay_stderr(self) -> None:
        for chunk in iter(lambda: os.read(self.stderr, 65536), b""):
            if not ModelServer.seen_heldout:
                sys.stderr.buffer.write(chunk)
                sys.stderr.buffer.flush()

    def logits(self, torch, batch):
        rows, cols = batch.shape
        ModelServer.seen_heldout = True
        self.stdin.write(struct.pack("<II", rows, cols) + batch.numpy().tobytes())
        self.stdin.flush()
        raw = self.stdout.read(rows * cols * VOCAB * 4)
        if len(raw) != rows * cols * VOCAB * 4:
            raise RuntimeError(
                "model server died mid-batch; its error output is withheld: "
                "it had seen held-out text"
            )
        logits = torch.frombuffer(bytearray(raw), dtype=torch.float32).view(rows, cols, VOCAB)
        if not torch.isfinite(logits).all():
            raise RuntimeError("the model returned non-finite logits")
        # what is scored and compared: log-probabilities, which no constant shift changes
        return torch.log_softmax(logits, dim=-1)

    def close(self):
        """Stops the server and everything it started, and erases what it could have left."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError, ValueError):
            self.stdin.write(struct.pack("<II", 0, 0))
            self.stdin.close()
        deadline = time.monotonic() + 10
        while _alive(self.pid) and time.monotonic() < deadline:  # the zygote reaps it
            time.sleep(0.01)
        if os.getpid() == 1:  # the sandbox's first process: everything else is the candidate's
            _stop_every_other_process(keep=self.zygote.pid)
            for folder in SANDBOX_STATE:
                _empty(Path(folder))
            _remove_sysv_ipc()
            _check_no_sockets()
        else:  # the local runner: no isolation to speak of, but no leftovers of this server
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            if os.environ.get("TMPDIR"):
                _empty(Path(os.environ["TMPDIR"]))
        self.stdout.close()
        os.close(self.stderr)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop_every_other_process(keep: int) -> None:
    """Kills and reaps every process but this one (which must be the sandbox's first) and keep."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGSTOP)  # all at once: none can fork or change its number meanwhile
    deadline = time.monotonic() + 10
    while True:
        others = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        others = [pid for pid in others if pid not in (os.getpid(), keep)]
        for pid in others:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while True:  # orphans are ours to reap
            try:
                reaped = os.waitpid(-1, os.WNOHANG)[0]
            except ChildProcessError:
                break
            if reaped == 0:
                break
            keep = 0 if reaped == keep else keep  # a server killed it: its number is not kept
        if not others:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"could not stop the model server's processes: {others[:5]}")
        time.sleep(0.05)


def _empty(folder: Path) -> None:
    """Removes everything inside folder, however the server locked it down."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            os.chmod(entry.path, 0o700)
            _empty(Path(entry.path))
            os.rmdir(entry.path)
        else:
            os.unlink(entry.path)


def _check_no_sockets() -> None:
    """Fails unless no socket is left: a closed TCP connection lingers (TIME_WAIT) and its
    addresses and ports are readable by the next server, a channel between the passes."""
    for table in ("tcp", "tcp6", "udp", "udp6", "raw", "raw6", "unix", "packet"):
        try:
            rows = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        if rows:
            raise RuntimeError(f"the model server left {table} sockets behind")


def _remove_sysv_ipc() -> None:
    """Removes every System V shared memory segment, semaphore set and message queue."""
    libc = ctypes.CDLL(None, use_errno=True)
    ipc_rmid = 0
    removers = {
        "shm": lambda i: libc.shmctl(i, ipc_rmid, None),
        "sem": lambda i: libc.semctl(i, 0, ipc_rmid),
        "msg": lambda i: libc.msgctl(i, ipc_rmid, None),
    }
    for kind, remove in removers.items():
        try:
            lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            if remove(int(line.split()[1])) != 0:
                raise OSError(ctypes.get_errno(), f"could not remove System V {kind} object")


def _windows(torch, data, context: int):
    """Returns the windows [n, context] at a stride of context + 1, and their targets."""
    starts = range(0, len(data) - context, context + 1)
    x = torch.stack([data[s : s + context] for s in starts])
    y = torch.stack([data[s + 1 : s + context + 1] for s in starts]).long()
    return x, y


def _probe(torch, x, reserve: bytes, rng: random.Random):
    """Returns the probe windows and their cuts.

    After its cut, each window continues with held-out text that is never
    scored (the reserve, from a random place), so that a model cannot tell a
    probe from a real window by its bytes, nor find the cut; random bytes only
    where there is no reserve to take it from.
    """
    rows, cols = x.shape
    cuts = [rng.randrange(0, cols - 1) for _ in range(rows)]
    probe = x.clone()
    for r, c in enumerate(cuts):
        if len(reserve) > cols:
            start = rng.randrange(0, len(reserve) - cols)
            tail = reserve[start : start + cols - c - 1]
        else:
            tail = os.urandom(cols - c - 1)
        probe[r, c + 1 :] = torch.frombuffer(bytearray(tail), dtype=torch.uint8)
        if probe[r, c + 1] == x[r, c + 1]:  # the byte right after the cut always differs
            probe[r, c + 1] = (int(x[r, c + 1]) + 1 + rng.randrange(255)) % 256
    return probe, cuts


def _pass(torch, server: ModelServer, windows, rng: random.Random):
    """Returns the log-probabilities of every window, fed to the server in a random order.

    Every batch has BATCH_ROWS rows (the last is filled up with windows again),
    so that both passes run the very same shapes; then the server is closed.
    """
    order = list(range(len(windows)))
    rng.shuffle(order)
    order += [order[i % len(order)] for i in range(-len(order) % BATCH_ROWS)]
    logits = torch.empty(*windows.shape, VOCAB)
    try:
        for i in range(0, len(order), BATCH_ROWS):
            rows = order[i : i + BATCH_ROWS]
            logits[rows] = server.logits(torch, windows[rows].contiguous())
    finally:
        server.close()
    return logits


def score(torch, zygote: Zygote, heldout: bytes) -> dict:
    rng = random.SystemRandom()  # the scorer's own randomness: nothing the candidate can read
    data = torch.frombuffer(bytearray(heldout[:EVAL_BYTES]), dtype=torch.uint8)
    params = _count_parameters(torch)
    first = ModelServer(zygote)
    try:
        if first.block_size < 2:
            raise RuntimeError(f"block_size {first.block_size} is too small to score")
        context = min(first.block_size, MAX_CONTEXT)
        x, y = _windows(torch, data, context)
        if len(x) < 2:
            raise RuntimeError(f"held-out split too small: {len(data)} bytes")
        probe, cuts = _probe(torch, x, heldout[EVAL_BYTES:], rng)
        real_first = rng.random() < 0.5
        first_logits = _pass(torch, first, x if real_first else probe, rng)
    finally:
        first.close()
    second = ModelServer(zygote)  # fresh: nothing of the first survives
    if second.block_size != first.block_size:
        second.close()
        raise RuntimeError("the model's block_size changed between two loads")
    second_logits = _pass(torch, second, probe if real_first else x, rng)
    logits, probed = (first_logits, second_logits) if real_first else (second_logits, first_logits)
    for r, c in enumerate(cuts):
        if not torch.allclose(logits[r, : c + 1], probed[r, : c + 1], rtol=0.0, atol=TOLERANCE):
            raise RuntimeError(
                f"the model is not causal: its logits at byte {c} of a window change "
                "when only later bytes change"
            )
    nats = torch.nn.functional.nll_loss(logits.view(-1, VOCAB), y.view(-1), reduction="sum")
    return {
        "val_bpb": float(nats) / y.numel() / math.log(2),
        "params": params,
        "eval_bytes": y.numel(),
        "context": context,
        "windows": len(x),
        "device": first.device,  # where the model ran while it was scored
    }


def main() -> None:
    _undumpable()
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a model server may not interrupt the scorer
    import torch

    zygote, failure = None, None
    try:
        process_attributes()  # a machine whose attributes it cannot read fails here, clearly
        zygote = Zygote(servers=2)  # before the nonce and the held-out split are read
    except Exception as exc:  # reported as the result, once the nonce is read
        failure = exc
    stdin = sys.stdin.buffer
    nonce = stdin.readline().decode().strip()
    heldout = stdin.read()
    start = time.perf_counter()
    try:
        if zygote is None:
            raise RuntimeError(f"cannot start the model servers: {failure}")
        result = score(torch, zygote, heldout)
        result["eval_seconds"] = time.perf_counter() - start
    except Exception as exc:  # any failure is reported to the harness as the result
        result = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        if zygote is not None:
            zygote.stop()
    print(f"{RESULT_MARKER} {nonce} {json.dumps(result)}", flush=True)


if __name__ == "__main__":
    main()
