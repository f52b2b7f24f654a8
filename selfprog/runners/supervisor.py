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

MARKER = "SELFPROG_PHASE_END"
NONCE_VARIABLE = "SELFPROG_PHASE_NONCE"


def main() -> None:
    nonce = os.environ.pop(NONCE_VARIABLE, "")
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE: no reading our memory or environ
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as the namespace's init: dropped, not raised
    code = subprocess.Popen(sys.argv[1:], env=dict(os.environ)).wait()
    while True:  # what the phase left running: killed, and reaped (orphans are ours)
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)
        try:
            if os.waitpid(-1, 0)[0] == 0:
                break
        except ChildProcessError:
            break
    print(f"\n{MARKER} {nonce} {code}", flush=True)
    while True:
        time.sleep(3600)


def archive() -> None:
    import tarfile

    for folder, dirs, files in os.walk("/out"):  # top-down: each folder opened before entering
        for name in dirs + files:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(folder, name), 0o700 if name in dirs else 0o600)
    with tarfile.open(fileobj=sys.stdout.buffer, mode="w|") as tar:
        tar.add("/out", arcname="out", filter=lambda m: m if m.isreg() or m.isdir() else None)


if __name__ == "__main__":
    archive() if sys.argv[1:] == ["--archive"] else main()
