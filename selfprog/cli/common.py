"""What every verb module shares: exit codes, argument types, logging setup."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from selfprog import config
from selfprog.errors import ConfigError

EXIT_ERROR = 2  # bad input or an unusable environment
EXIT_NOT_OK = 3  # the candidate was scored but did not end `ok`


def parse_size(text: str) -> int:
    """Returns bytes for a size given on the command line."""
    try:
        return config.parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {kind.__name__}: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0: {text!r}")
        return value

    return convert


def setup_logging(verbose: bool) -> None:
    """Live, coloured output on a terminal; one plain line per event otherwise."""
    level = logging.DEBUG if verbose else logging.INFO
    from selfprog.progress import console, interactive

    if interactive():  # the panel's console: its lines scroll above the panel
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(
            console=console(), show_path=False, rich_tracebacks=False, markup=False
        )
        handler.setFormatter(CleanFormatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(CleanFormatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in ("urllib3", "docker"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class CleanFormatter(logging.Formatter):
    """Formats a record with no escapes or control characters and no giant lines in it.

    Log messages quote candidate output (a failure's last line, a reason): an
    ANSI escape in it must not reach the terminal, and a megabyte line must not
    flood it.
    """

    def format(self, record: logging.LogRecord) -> str:
        from selfprog.untrusted import clean

        return clean(super().format(record))
