"""The serve verb: a live, read-only dashboard of a run, or of a folder of runs, in a browser."""

from __future__ import annotations

import argparse
import errno
import socket
from pathlib import Path
from typing import Any

from selfprog.errors import SelfprogError

DEFAULT_HOST = "127.0.0.1"  # this machine only, unless --host says otherwise
DEFAULT_PORT = 8765
ANY_ADDRESS = ("0.0.0.0", "::", "")


def listen(host: str, port: int) -> socket.socket:
    """Returns a socket listening on host:port (port 0: any free one).

    Raises:
        SelfprogError: the address cannot be had (the port is in use, the host is unknown).
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise SelfprogError(f"cannot serve on {host!r}: {exc}") from None
    sock = socket.socket(family, kind, proto)
    try:
        # a restart right after Ctrl-C may bind again; a port another program listens on may not
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        hint = "; choose another with --port" if exc.errno == errno.EADDRINUSE else ""
        raise SelfprogError(f"cannot serve on {host}:{port}: {exc.strerror or exc}{hint}") from None
    return sock


def port(text: str) -> int:
    """Returns a TCP port number given on the command line (0: any free one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, not {value}")
    return value


def allowed_hosts(host: str) -> list[str]:
    """Returns the Host headers to answer: loopback names, and the address asked for."""
    from selfprog.dashboard import LOCAL_HOSTS

    if host in ANY_ADDRESS:
        return ["*"]  # reachable under any name the machine has: the user asked for it
    return [*LOCAL_HOSTS, host]


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from selfprog.dashboard import make_app

    app = make_app(Path(args.run), hosts=allowed_hosts(args.host))
    sock = listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_config=None,  # the CLI's logging stays as it is
            log_level="debug" if args.verbose else "warning",
            access_log=False,
            timeout_graceful_shutdown=2,  # an open page keeps a connection: do not wait on it
        )
    )
    print(f"serving {args.run} at http://{shown}:{port}/ (read-only; Ctrl-C stops)", flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn stops gracefully, then raises the signal again
        pass
    finally:
        sock.close()
    print("stopped", flush=True)
    return 0


def add_verbs(verbs: Any) -> None:
    sv = verbs.add_parser(
        "serve",
        help="a live, read-only dashboard of a run in the browser",
        description="Serve a live dashboard of a run (or, given a folder of runs, an index of "
        "them): headline numbers, the progress plot, the lineage tree and the best and latest "
        "candidates, refreshed as the run grows, and a page for each candidate (diff, every "
        "evaluation, log tail, the proposal that made it, its lineage). It only reads the run, "
        "so it is safe while the run is driven. Ctrl-C stops it.",
    )
    sv.add_argument("run", help="a run folder, or a folder of runs such as runs/")
    sv.add_argument(
        "--port",
        type=port,
        default=DEFAULT_PORT,
        help=f"the port to serve on ({DEFAULT_PORT}; 0 picks a free one)",
    )
    sv.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"the address to serve on ({DEFAULT_HOST}: this machine only; 0.0.0.0 opens it "
        "to the network, to anyone who can reach the machine)",
    )
    sv.set_defaults(func=cmd_serve)
