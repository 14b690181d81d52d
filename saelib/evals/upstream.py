"""The sae-bench 0.6.0 behaviours saelib works around, in one place. Each is explained once here and has a test in
``tests/test_upstream.py`` that fails when sae-bench changes the behaviour, so we know when to drop the workaround:

1. **core: explained variance and MSE.** ``core.main.get_sparsity_and_variance_metrics`` builds the total variance
   from per-dimension means of x² (squared again) instead of the variance of x, and divides each token's squared
   error by the batch's token count: both are wrong for activations with a large mean (Gemma's residual stream).
   ``replace_reconstruction`` puts saelib's float64 sae_lens-formula values in their place (sae_bench's kept).
2. **sparse probing: jaxtyping memo.** ``probe_training.train_sklearn_probe`` is decorated with ``@beartype`` only,
   so under jaxtyping 0.3 it is checked inside the memo of its ``@jaxtyped`` caller ``train_probe_on_activations``,
   where ``train_dataset_size`` is bound to the per-class count: every balanced task fails the shape check.
   ``sklearn_probe`` gives it a memo of its own (and, optionally, centred inputs: see its docstring).
3. **unlearning: a path relative to the working directory.** ``unlearning.utils.feature_activation`` opens
   ``./sae_bench/evals/unlearning/data/<corpus>.jsonl``. ``unlearning_data_layout`` runs it from a scratch folder
   holding a link to the user's corpus.

Design choices that are not upstream bugs (the absorption vocabulary sample, probes trained once and stored, the
offline probing sets, padding-free LLM activations) stay with their evals; ``docs/evals.md`` explains them.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import torch


def replace_reconstruction(scalars: dict, ours: dict) -> dict:
    """Put saelib's explained variance and MSE (``core.reconstruction_metrics``: sae_lens's formula in float64 over
    the held-out tokens) into sae_bench's scalars; returns sae_bench's own values, kept in the result. Also stops
    on a non-finite CE/KL score (a degenerate SAE output), which sae_bench would report as a number."""
    recon = scalars["reconstruction_quality"]
    raw = {"explained_variance": recon["explained_variance"], "mse": recon["mse"]}
    recon["explained_variance"] = ours["explained_variance"]
    recon["mse"] = ours["mse"]
    for group in ("model_behavior_preservation", "model_performance_preservation"):
        for name, value in scalars[group].items():
            if isinstance(value, float) and not math.isfinite(value):
                raise FloatingPointError(f"core eval: {group}.{name} is {value}; the SAE output is degenerate")
    return raw


def sklearn_probe(original, centre: bool):
    """``probe_training.train_sklearn_probe`` with its own jaxtyping memo and, if ``centre``, centred inputs.

    Jaxtyping: sae-bench 0.6.0 decorates this function with ``@beartype`` only, so under jaxtyping 0.3 it is
    checked inside the dimension memo of its ``@jaxtyped`` caller ``train_probe_on_activations``, where
    ``train_dataset_size`` is bound to the per-class count and ``d_model`` to the full width: the balanced task
    (2× the rows) and the top-k slice then fail the check — with SAEBench's own data as well. Wrapping it in
    ``jaxtyped(typechecker=beartype)`` gives it a fresh memo; every check stays on.

    Centring: the probe casts its inputs to float32, and scikit-learn's lbfgs then stops after 2–3 iterations
    at w ≈ 0 when a feature carries a large constant offset (Gemma 3's residual dimension 163: mean ≈ 5,300,
    std ≈ 265 after pooling) — a constant prediction, i.e. exactly 0.5 accuracy on a balanced task. The same
    fit in float64, or on inputs minus their train-set mean, converges to the same optimum (measured: equal
    coefficients and accuracy). Since the intercept is not penalised, subtracting the train mean is an exact
    reparametrisation of SAEBench's probe: same model family, same optimum, same feature selection (a mean
    difference is shift-invariant); only the solver's conditioning changes.
    """
    from beartype import beartype
    from jaxtyping import jaxtyped

    checked = jaxtyped(typechecker=beartype)(original)
    if not centre:
        return checked

    def train_sklearn_probe(train_inputs, train_labels, test_inputs, test_labels, *args, **kwargs):
        mean_1D = train_inputs.to(torch.float64).mean(0, keepdim=True)
        train_inputs = (train_inputs.to(torch.float64) - mean_1D).to(train_inputs.dtype)
        test_inputs = (test_inputs.to(torch.float64) - mean_1D).to(test_inputs.dtype)
        return checked(train_inputs, train_labels, test_inputs, test_labels, *args, **kwargs)

    return train_sklearn_probe


@contextlib.contextmanager
def unlearning_data_layout(corpus: Path, artifacts_folder: Path, file_name: str):
    """sae_bench opens ``./sae_bench/evals/unlearning/data/bio-forget-corpus.jsonl`` relative to the CWD: run it
    from a scratch folder under ``artifacts_folder`` holding a link to the user's file (nothing lands in the CWD)."""
    scratch = artifacts_folder / "cwd"
    data = scratch / "sae_bench" / "evals" / "unlearning" / "data"
    data.mkdir(parents=True, exist_ok=True)
    link = data / file_name
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(corpus)
    old = os.getcwd()
    os.chdir(scratch)
    try:
        yield
    finally:
        os.chdir(old)
