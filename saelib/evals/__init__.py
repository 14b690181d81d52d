"""SAEBench evals through sae_bench itself, with the loaded model object, written as SAEBench JSON."""

from saelib.evals.common import EvalError, EvalUnavailable
from saelib.evals.core import (
    EVALS_DIR, competition_for_run, core_for_run, headline_metrics, reconstruction_metrics, run_core, write_core,
)

__all__ = [
    "EVALS_DIR", "EvalError", "EvalUnavailable", "competition_for_run", "core_for_run", "headline_metrics",
    "reconstruction_metrics", "run_core", "write_core",
]
