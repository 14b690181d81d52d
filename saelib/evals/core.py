"""Evaluations through sae_bench itself, with the loaded model object (no hub), written as SAEBench JSON.

``core`` runs ``sae_bench.evals.core.main.run_evals`` over the held-out split. sae-bench 0.6.0 computes
explained variance and MSE incorrectly when activations have a large mean (it squares before averaging and
divides per-token errors by the batch's token count); saelib recomputes both, plus L0 and dead/dense latents, on
the held-out activation cache with sae_lens's formula in float64, puts them in the result, and keeps sae_bench's
raw values under ``eval_result_unstructured`` so nothing is hidden. This module does not train.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from saelib import run_files
from saelib.activations import ActivationCache
from saelib.evals import upstream
from saelib.evals.common import EVALS_DIR, EvalError, heldout_split, provenance

log = logging.getLogger(__name__)

DENSE_FREQUENCY = 0.1
"""A latent firing on more than this fraction of held-out tokens counts as dense."""


@torch.no_grad()
def reconstruction_metrics(sae, cache: ActivationCache, batch_size: int = 4096) -> dict[str, float]:
    """Held-out EV (sae_lens's definition: 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖², accumulated in float64), per-token MSE,
    L0, and the fractions of dead (never firing) and dense (> 10 %) latents."""
    sse = sq = 0.0
    sum_D = torch.zeros(cache.d_in, dtype=torch.float64)
    fired_F = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    l0_total = 0.0
    for start in tqdm(range(0, cache.n_rows, batch_size), desc="held-out reconstruction", leave=False):
        x_BD = cache.rows(start, start + batch_size).to(sae.device, sae.dtype)
        acts_BF = sae.encode(x_BD)
        err_BD = (sae.decode(acts_BF) - x_BD).double()
        sse += err_BD.pow(2).sum().item()
        sq += x_BD.double().pow(2).sum().item()
        sum_D += x_BD.double().sum(0).cpu()
        active_BF = acts_BF != 0
        fired_F += active_BF.double().sum(0).cpu()
        l0_total += active_BF.sum().item()
    n = cache.n_rows
    total_variance = sq - sum_D.pow(2).sum().item() / n
    freq_F = fired_F / n
    return {
        "explained_variance": 1.0 - sse / total_variance,
        "mse": sse / n,
        "l0": l0_total / n,
        "frac_dead": (freq_F == 0).double().mean().item(),
        "frac_dense": (freq_F > DENSE_FREQUENCY).double().mean().item(),
        "n_tokens": n,
    }


def eval_token_dataset(tokens_NS: np.ndarray):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": np.asarray(tokens_NS).astype(np.int64).tolist()})


def run_core(sae, model, tokens_NS: np.ndarray, cache: ActivationCache, ignore_tokens: set[int],
             n_ce_tokens: int, batch_size_prompts: int = 4) -> dict[str, Any]:
    """SAEBench core on held-out sequences, with the reconstruction metrics corrected (see module doc).

    Returns the SAEBench ``CoreEvalOutput`` as a dict. CE/KL use ``n_ce_tokens`` (full-model passes ×3).
    """
    import sae_bench.evals.core.main as core
    from sae_bench.evals.core.eval_config import CoreEvalConfig
    from sae_bench.sae_bench_utils.general_utils import load_and_format_sae
    from sae_lens.training.activations_store import ActivationsStore

    ctx = tokens_NS.shape[1]
    n_batches = max(1, math.ceil(n_ce_tokens / (batch_size_prompts * ctx)))
    needed = 2 * n_batches * batch_size_prompts
    if len(tokens_NS) < needed:
        raise ValueError(f"eval_ce_tokens: needs {needed} held-out sequences, only {len(tokens_NS)} available")
    _, sae, _ = load_and_format_sae("saelib", sae, str(sae.device))
    cfg = CoreEvalConfig(
        model_name=sae.cfg.metadata.model_name, llm_dtype="float32", batch_size_prompts=batch_size_prompts,
        n_eval_reconstruction_batches=n_batches, n_eval_sparsity_variance_batches=n_batches,
        dataset="saelib-heldout", context_size=ctx, compute_kl=True, compute_ce_loss=True,
        compute_l2_norms=True, compute_sparsity_metrics=True, compute_variance_metrics=True,
        compute_featurewise_density_statistics=True, compute_featurewise_weight_based_metrics=True,
        exclude_special_tokens_from_reconstruction=True,
    )
    dataset = eval_token_dataset(tokens_NS[:needed])
    store = ActivationsStore.from_sae(
        model, sae, dataset=dataset, context_size=ctx, store_batch_size_prompts=batch_size_prompts,
        n_batches_in_buffer=1, train_batch_size_tokens=batch_size_prompts * ctx, total_tokens=needed * ctx,
        device=str(sae.device),
    )
    start = time.time()
    scalars, feats = core.run_evals(sae=sae, activation_store=store, model=model, eval_config=cfg,
                                    ignore_tokens=set(ignore_tokens), verbose=False)
    scalars["misc_metrics"] = core.calculate_misc_metrics(feats)
    scalars = core.replace_nans_with_negative_one(scalars)
    ours = reconstruction_metrics(sae, cache)
    raw = upstream.replace_reconstruction(scalars, ours)
    out = _core_output(cfg, scalars, core.convert_feature_metrics(feats), sae, {
        "saelib_reconstruction_metrics": ours, "sae_bench_raw_reconstruction": raw,
        "note": "explained_variance and mse recomputed on held-out cached activations (sae_lens formula, "
                "float64); sae-bench 0.6.0's values kept in sae_bench_raw_reconstruction",
        "wall_time_s": time.time() - start,
    })
    return json.loads(out.to_json())


def _core_output(cfg, scalars: dict, details: list, sae, unstructured: dict):
    from sae_bench.evals.core.eval_output import (
        CoreEvalOutput, CoreMetricCategories, MiscMetrics, ModelBehaviorPreservationMetrics,
        ModelPerformancePreservationMetrics, ReconstructionQualityMetrics, ShrinkageMetrics, SparsityMetrics,
        TokenStatsMetrics,
    )

    metrics = CoreMetricCategories(
        model_behavior_preservation=ModelBehaviorPreservationMetrics(**scalars["model_behavior_preservation"]),
        model_performance_preservation=ModelPerformancePreservationMetrics(
            **scalars["model_performance_preservation"]),
        reconstruction_quality=ReconstructionQualityMetrics(**scalars["reconstruction_quality"]),
        shrinkage=ShrinkageMetrics(**scalars["shrinkage"]),
        sparsity=SparsityMetrics(**scalars["sparsity"]),
        token_stats=TokenStatsMetrics(**scalars["token_stats"]),
        misc_metrics=MiscMetrics(**scalars["misc_metrics"]),
    )
    return CoreEvalOutput(
        eval_config=cfg, eval_id=str(uuid.uuid4()), datetime_epoch_millis=int(time.time() * 1000),
        eval_result_metrics=metrics, eval_result_details=details, eval_result_unstructured=unstructured,
        **provenance(sae),
    )


def headline_metrics(core_result: dict) -> dict[str, float]:
    """The flat summary written to ``metrics.json``: the numbers a reader checks first."""
    m = core_result["eval_result_metrics"]
    ours = core_result["eval_result_unstructured"]["saelib_reconstruction_metrics"]
    return {
        "explained_variance": ours["explained_variance"],
        "mse": ours["mse"],
        "l0": ours["l0"],
        "frac_dead": ours["frac_dead"],
        "frac_dense": ours["frac_dense"],
        "ce_loss_score": m["model_performance_preservation"]["ce_loss_score"],
        "ce_loss_with_sae": m["model_performance_preservation"]["ce_loss_with_sae"],
        "ce_loss_without_sae": m["model_performance_preservation"]["ce_loss_without_sae"],
        "kl_div_score": m["model_behavior_preservation"]["kl_div_score"],
        "cossim": m["reconstruction_quality"]["cossim"],
        "heldout_tokens": ours["n_tokens"],
    }


def write_headline(run_dir: Path, core_result: dict) -> dict[str, float]:
    """Write the headline numbers of a core result into the run's ``metrics.json`` (other keys kept)."""
    path = Path(run_dir) / run_files.METRICS_FILE
    metrics = run_files.read_json(path) if path.exists() else {}
    metrics.update(headline_metrics(core_result))
    run_files.write_json_atomic(path, metrics)
    return headline_metrics(core_result)


def write_core(run_dir: Path, core_result: dict) -> dict[str, float]:
    """Write ``evals/core.json`` (SAEBench format) and ``metrics.json`` (headline) into the run folder."""
    run_dir = Path(run_dir)
    (run_dir / EVALS_DIR).mkdir(parents=True, exist_ok=True)
    run_files.write_json_atomic(run_dir / EVALS_DIR / "core.json", core_result)
    return write_headline(run_dir, core_result)


@dataclass(frozen=True)
class CoreSettings:
    """Held-out data of the core eval. ``None`` fields come from the run's cfg.json (its eval split)."""

    dataset: str | None = None
    context_size: int | None = None
    eval_tokens: int | None = None  # reconstruction metrics, from the held-out activation cache
    eval_ce_tokens: int | None = None  # CE/KL: three full-model passes over this many tokens
    batch_size_prompts: int = 4

    def resolved(self, run_dir: Path) -> "CoreSettings":
        cfg = run_files.read_json(Path(run_dir) / run_files.RUN_CFG_FILE)
        values = {f: getattr(self, f) if getattr(self, f) is not None else cfg[f]
                  for f in ("dataset", "context_size", "eval_tokens", "eval_ce_tokens")}
        return replace(self, **values)


SMOKE = CoreSettings(eval_tokens=4_096, eval_ce_tokens=1_024)


def run_core_eval(sae, model, settings: CoreSettings, artifacts_dir: Path | None = None) -> dict[str, Any]:
    """Core eval on the held-out split given by (resolved) ``settings``; the SAEBench JSON as a dict."""
    from saelib.activations import special_token_ids

    if None in (settings.dataset, settings.context_size, settings.eval_tokens, settings.eval_ce_tokens):
        raise EvalError("settings: expected CoreSettings resolved against a run (CoreSettings.resolved(run_dir))")
    eval_cache, tokens_NS = heldout_split(sae, model, settings.dataset, settings.context_size, settings.eval_tokens,
                                          settings.eval_ce_tokens)
    return run_core(sae, model, tokens_NS, eval_cache, special_token_ids(model), settings.eval_ce_tokens,
                    batch_size_prompts=settings.batch_size_prompts)
