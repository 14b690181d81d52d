"""What every saelib eval shares: the error types, result files in a run folder, and the SAE/model checks."""

from __future__ import annotations


class EvalError(ValueError):
    """Bad input to an eval (which parameter, what was expected)."""


class EvalUnavailable(RuntimeError):
    """The eval cannot run on this machine (e.g. it needs the hub or a gated dataset); the message says why."""
