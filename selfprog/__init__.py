"""selfprog: a self-programming agent loop with a sandboxed, tamper-proof scorer."""

__version__ = "0.1.0"
