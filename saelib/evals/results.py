"""Every eval result of a study as one tidy table: (run, config, architecture, tau, lambda, seed, eval, metric, value).

Used by every notebook that compares runs. Reads ``runs/<study>/<run>/cfg.json``, each ``evals/<eval>.json``
(SAEBench format; metrics flattened as ``<group>.<metric>``, with saelib's own additions to an eval from
``eval_result_unstructured.saelib_metrics``, e.g. ``absorption/firing.*``; the competition eval's per-τ numbers are
``competition/tau_<τ>.*``) and, when the train notebook measured it, the held-out competition at the run's own τ in
``metrics.json`` (eval ``competition``, keys ``competition_*``/``competing_*``; studies skip it and compare the eval's
per-τ numbers). Every run folder under the study folder counts. Only finite numbers become rows; nothing is computed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from saelib import run_files
from saelib.config import SEED_NAME
from saelib.evals.common import EVALS_DIR

#: The numbers the study reports: "eval/metric" → (display name, +1 higher is better / −1 lower is better / 0 neither)
HEADLINE: dict[str, tuple[str, int]] = {
    "core/reconstruction_quality.explained_variance": ("explained variance", +1),
    "core/model_performance_preservation.ce_loss_score": ("CE-loss recovered", +1),
    "core/model_behavior_preservation.kl_div_score": ("KL score", +1),
    "core/sparsity.l0": ("L0", 0),
    "absorption/mean.mean_absorption_fraction_score": ("absorption (mean fraction)", -1),
    "absorption/mean.mean_full_absorption_score": ("full absorption", -1),
    "absorption/mean.mean_num_split_features": ("split features", 0),
    "absorption/firing.mean_main_silent_rate": ("main latents silent (firing-based absorption)", -1),
    "sparse_probing/sae.sae_top_1_test_accuracy": ("sparse probing top-1", +1),
    "sparse_probing/sae.sae_top_5_test_accuracy": ("sparse probing top-5", +1),
    "unlearning_proxy/unlearning.unlearning_score": ("unlearning proxy score", +1),
    "competition/tau_0.02.competing_weighted_cos2": ("competing pairs' weighted cos² (τ 0.02)", 0),
    "competition/tau_0.02.competing_mean_cos2": ("competing pairs' mean cos² (τ 0.02)", 0),
}

COLUMNS = ["run", "config", "architecture", "tau", "lambda", "seed", "eval", "metric", "value"]
SEED_SUFFIX = SEED_NAME
"""Runs that differ only by seed are named ``<config>_s<seed>``; ``config`` drops that suffix."""

_TAU_ARCHS = {"sgo_topk"}
_LAMBDA_ARCHS = {"sgo_topk", "ortsae_topk", "gram_topk"}


def flatten_metrics(metrics: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """``{"a": {"b": 1.0}}`` → ("a.b", 1.0); non-numeric and non-finite leaves are left out."""
    if isinstance(metrics, dict):
        for key, value in metrics.items():
            yield from flatten_metrics(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(metrics, (int, float)) and not isinstance(metrics, bool) and math.isfinite(metrics):
        yield prefix, float(metrics)


def run_identity(run_dir: Path) -> dict[str, Any]:
    cfg = run_files.read_json(Path(run_dir) / run_files.RUN_CFG_FILE)
    arch = cfg["architecture"]
    return {
        "run": Path(run_dir).name,
        "config": SEED_SUFFIX.sub("", Path(run_dir).name),
        "architecture": arch,
        "tau": cfg.get("competition_threshold") if arch in _TAU_ARCHS else math.nan,
        "lambda": cfg.get("orth_pen") if arch in _LAMBDA_ARCHS else math.nan,
        "seed": cfg.get("seed"),
    }


#: Fields of a run's training key (``RunConfig.training_key``) that shape neither the weights nor the evals' numbers.
BOOKKEEPING = {"log_every", "n_checkpoints"}


def matched_baselines(study_dir: Path, runs: pd.DataFrame, baseline: str = "topk") -> dict[str, str]:
    """Each configuration's TopK baseline: the ``topk``-architecture configuration of the study trained and evaluated
    like it — equal training keys (``RunConfig.training_key``: batch size, tokens, lr, width, k, precision, eval
    sizes, …), the seed, ``BOOKKEEPING``, the resolved precisions and the fields only other architectures take (λ, τ,
    Matryoshka widths, …) aside; ``baseline`` when it is one of several that match, else the first by name.
    Configurations no TopK matches, and TopK configurations, are left out: the callers measure them against
    ``baseline`` and say so. ``runs``: one row per run with columns ``run``, ``config`` and ``architecture``."""
    from saelib.config import config_of_run
    from saelib.settings import SETTINGS_GROUPS, arch_fields

    ignored = ({f for group in SETTINGS_GROUPS for f in group.own_fields()} - arch_fields("topk")) | BOOKKEEPING | {
        "seed", "architecture"}
    first = runs.drop_duplicates("config").set_index("config")
    keys = {config: {k: v for k, v in config_of_run(Path(study_dir) / run).training_key().items()
                     if k not in ignored and not k.endswith("_used")}
            for config, run in first["run"].items()}
    topks = sorted(c for c in keys if first.at[c, "architecture"] == "topk")
    out = {}
    for config, key in keys.items():
        same = [t for t in topks if keys[t] == key]
        if first.at[config, "architecture"] != "topk" and same:
            out[config] = baseline if baseline in same else same[0]
    return out


def against_column(runs: pd.DataFrame, baselines: dict[str, str], order: list[str], baseline: str = "topk"):
    """``config`` → the configuration it is measured against, "topk (not trained alike)" where no TopK matched; None
    when every configuration meets plain ``baseline`` (the tables then need no such column)."""
    arch = runs.drop_duplicates("config").set_index("config")["architecture"]
    names = [baselines.get(c) or (baseline if arch.get(c) == "topk" else f"{baseline} (not trained alike)")
             for c in order]
    return None if all(n == baseline for n in names) else pd.DataFrame({"config": order, "against": names})


def run_rows(run_dir: Path) -> list[dict[str, Any]]:
    run_dir = Path(run_dir)
    if not (run_dir / run_files.RUN_CFG_FILE).exists():
        return []
    ident = run_identity(run_dir)
    rows = []
    for path in sorted((run_dir / EVALS_DIR).glob("*.json")) if (run_dir / EVALS_DIR).is_dir() else []:
        result = run_files.read_json(path)
        eval_name = path.stem  # saelib's eval name (e.g. unlearning_proxy), not sae_bench's eval_type_id
        metrics = {**result.get("eval_result_metrics", {}),
                   **(result.get("eval_result_unstructured") or {}).get("saelib_metrics", {})}
        for metric, value in flatten_metrics(metrics):
            rows.append({**ident, "eval": eval_name, "metric": metric, "value": value})
    metrics_path = run_dir / run_files.METRICS_FILE
    if metrics_path.exists():
        for key, value in flatten_metrics(run_files.read_json(metrics_path)):
            if key.startswith(("competition_", "competing_")):
                rows.append({**ident, "eval": "competition", "metric": key, "value": value})
    return rows


def study_results(study_dir: Path) -> pd.DataFrame:
    """The tidy table of every run folder under ``study_dir`` (runs without results contribute no rows)."""
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise FileNotFoundError(f"study_dir: expected a study folder such as runs/default, got {str(study_dir)!r}")
    rows = [row for run_dir in sorted(p for p in study_dir.iterdir() if p.is_dir()) for row in run_rows(run_dir)]
    return pd.DataFrame(rows, columns=COLUMNS)


def wide(results: pd.DataFrame, metrics: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per run, one column per (eval, metric) — or per ``metrics`` entry {"eval/metric": "column name"}."""
    table = results.assign(key=results["eval"] + "/" + results["metric"])
    if metrics:
        table = table[table["key"].isin(metrics)]
    values = table.pivot_table(index="run", columns="key", values="value", aggfunc="first")
    ident = results.drop_duplicates("run").set_index("run")[["config", "architecture", "tau", "lambda", "seed"]]
    out = ident.join(values).reset_index()
    out.columns.name = None
    return out.rename(columns=metrics or {})
