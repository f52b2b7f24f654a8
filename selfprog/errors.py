"""The exceptions selfprog raises; the CLI turns each into a one-line message."""


class SelfprogError(Exception):
    """Root of every error selfprog reports to the user."""


class ConfigError(SelfprogError):
    """A configuration value or option is wrong."""


class TargetError(SelfprogError):
    """A target folder or its target.toml is malformed."""


class ProgramError(SelfprogError):
    """A program folder to score is missing or unusable."""


class RunnerError(SelfprogError):
    """The sandbox cannot run at all (no engine, no image); not a candidate's failure."""


class Outage(SelfprogError):
    """Something the run depends on is gone (a cluster); the run stops cleanly and resume continues."""
