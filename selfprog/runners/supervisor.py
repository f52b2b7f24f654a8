"""The first process of a training container: runs the phase, then holds its output volume.

The docker runner gives a training phase its `/out` as a size- and
file-count-limited tmpfs, which lives only as long as the container. This
program (passed with `python -I -c`, so nothing of the sandbox's folders is
imported) starts the phase as its child, waits for it, kills whatever else
the phase left running, prints one line naming the phase's exit code, and
then waits to be killed, so that the harness can copy `/out` out first. The
copy is the same program run with `--archive` inside the container (the
daemon's own archive API cannot see a tmpfs): it writes the regular files and
folders of `/out` to stdout as a tar stream, opening up whatever the phase
locked, while nothing of the phase runs any more.

It is the container's first process: a process inside the container cannot
signal it (the kernel drops such signals to a namespace's init unless it
handles them, and this one handles none), and it makes itself undumpable.
Whatever the phase does to it can only end its own run early.

Standard library only: it runs with the sandbox's Python, whatever that has.
"""

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

MARKER = "SELFPROG_PHASE_END"
NONCE_VARIABLE = "SELFPROG_PHASE_NONCE"
SCRATCH = ("/tmp", "/dev/shm", "/dev/mqueue")  # freed before the copy, which needs the memory
MAX_PATH = 2048  # longer paths inside /out are not copied (the host's path must stay valid)


def main() -> None:
    if os.getpid() != 1:  # an image's entrypoint started us: nothing here would hold
        print("the supervisor is not the container's first process", file=sys.stderr)
        sys.exit(125)
    nonce = os.environ.pop(NONCE_VARIABLE, "")
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE: no reading our memory or environ
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as the namespace's init: dropped, not raised
    code = subprocess.Popen(sys.argv[1:], env=dict(os.environ)).wait()
    while True:  # what the phase left running: killed, and reaped (orphans are ours)
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    for folder in SCRATCH:
        _empty(folder)
    _remove_shared_memory()
    print(f"\n{MARKER} {nonce} {code}", flush=True)
    while True:
        time.sleep(3600)


def _empty(root: str) -> None:
    for folder, _, files in _walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))
    for folder, dirs, _ in reversed(list(_walk(root))):
        for name in dirs:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(folder, name))


def _remove_shared_memory() -> None:
    libc = ctypes.CDLL(None)
    with contextlib.suppress(OSError), open("/proc/sysvipc/shm") as table:
        for line in table.read().splitlines()[1:]:
            libc.shmctl(int(line.split()[1]), 0, None)  # IPC_RMID


def _walk(root: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """Yields (folder, subfolders, files) top-down without recursion, opening locked folders."""
    pending = [root]
    while pending:
        folder = pending.pop()
        with contextlib.suppress(OSError):
            os.chmod(folder, 0o700)
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        dirs = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
        files = [e.name for e in entries if not e.is_dir(follow_symlinks=False)]
        yield folder, dirs, files
        pending += [os.path.join(folder, d) for d in dirs]


def archive(max_bytes: int) -> None:
    """Writes /out's folders and regular files, up to max_bytes of them, as a tar stream."""
    import stat
    import tarfile

    total = 0
    # dereference: a hard link is a file of its own, with its content (and counts again)
    with tarfile.open(
        fileobj=sys.stdout.buffer, mode="w|", format=tarfile.PAX_FORMAT, dereference=True
    ) as tar:
        for folder, dirs, files in _walk("/out"):
            for name in sorted(dirs) + sorted(files):
                path = os.path.join(folder, name)
                if len(path) > MAX_PATH:
                    continue
                with contextlib.suppress(OSError):
                    info = os.lstat(path)
                    if stat.S_ISDIR(info.st_mode):
                        tar.addfile(tar.gettarinfo(path, "out" + path[len("/out") :]))
                    elif stat.S_ISREG(info.st_mode) and total + info.st_size <= max_bytes:
                        os.chmod(path, 0o600)
                        with open(path, "rb") as source:
                            member = tar.gettarinfo(
                                arcname="out" + path[len("/out") :], fileobj=source
                            )
                            tar.addfile(member, source)
                        total += info.st_size


if __name__ == "__main__":
    if sys.argv[1:2] == ["--archive"]:
        archive(int(sys.argv[2]))
    else:
        main()
