"""SAEBench evals through sae_bench itself, with the loaded model object, written as SAEBench JSON.

``evaluate_run(run_dir, model, evals)`` is the entry point (saelib.evals.suite); one module per eval.
"""

from saelib.evals.common import EVALS_DIR, EvalError, EvalUnavailable
from saelib.evals.competition import competition_for_run
from saelib.evals.core import headline_metrics, reconstruction_metrics, run_core, write_core
from saelib.evals.suite import EVALS, core_for_run, evaluate_run, run_results

__all__ = [
    "EVALS", "EVALS_DIR", "EvalError", "EvalUnavailable", "competition_for_run", "core_for_run", "evaluate_run",
    "headline_metrics", "reconstruction_metrics", "run_core", "run_results", "write_core",
]
