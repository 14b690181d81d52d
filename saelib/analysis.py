"""Post-hoc feature-competition analysis of a trained SAE on held-out activations.

The same competition score as training (``saelib.competition``), but from exact firing rates over the whole
held-out set instead of moving averages, so every architecture — TopK, SGO, ReLU — is measured alike.
Across a study's finished runs: the competition patterns the answers report. This module trains nothing and writes
nothing.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import torch

from saelib import run_files
from saelib.activations import ActivationCache
from saelib.competition import CompetitionStats
from saelib.evals.results import run_identity, wide
from saelib.saes import pair_cos2_values
from saelib.stats import ci_row


#: At most this many fired-pair events are listed at once (int64 keys: 8 bytes each → 128 MB; the count table holds them all until one fold: ≤ 0.8 GB at MAX_PAIR_EVENTS). TopK with k = 32
#: lists 496 pairs per token; a ReLU SAE with L0 ≈ 400 lists ≈ 80,000, so its batches must be much smaller.
PAIR_EVENTS_PER_CHUNK = 16_000_000
#: Pair events counted in total before the held-out sample is cut short (bounds the count table's memory).
MAX_PAIR_EVENTS = 100_000_000


@torch.no_grad()
def heldout_competition(sae, cache: ActivationCache, batch_size: int = 4096,
                        max_pairs: int = 5_000_000, max_pair_events: int = MAX_PAIR_EVENTS) -> CompetitionStats:
    """Exact firing and co-firing rates of ``sae``'s latents over the held-out cache (equal weight per token):
    every batch goes into one window, folded once with decay 0, so the rates are pooled counts ÷ tokens.

    Memory is bounded for SAEs with a large L0 (the number of fired pairs grows as L0²): rows are listed in chunks
    of at most ``PAIR_EVENTS_PER_CHUNK`` pair events, and the sample stops after ``max_pair_events`` events
    (``stats.n_tokens`` says how many held-out tokens were counted)."""
    stats = CompetitionStats(sae.cfg.d_sae, decay=0.0, max_pairs=max_pairs, window=10**9, device=sae.device)
    events = 0
    tokens = 0
    for start in range(0, cache.n_rows, batch_size):
        acts_BF = sae.encode(cache.rows(start, start + batch_size).to(sae.device, sae.dtype))
        l0_B = (acts_BF > 0).sum(-1)
        k_max = int(l0_B.max().clamp_min(1))
        rows_per_chunk = max(1, PAIR_EVENTS_PER_CHUNK // max(1, k_max * (k_max - 1) // 2))
        for lo in range(0, len(acts_BF), rows_per_chunk):
            chunk = acts_BF[lo: lo + rows_per_chunk]
            k = int((chunk > 0).sum(-1).max().clamp_min(1))
            stats.update(chunk, k=k)
            events += int((l0_B[lo: lo + rows_per_chunk] * (l0_B[lo: lo + rows_per_chunk] - 1) // 2).sum())
            tokens += len(chunk)
            if events >= max_pair_events:
                break
        if events >= max_pair_events:
            break
    stats.flush()
    stats.n_tokens = tokens
    return stats


@torch.no_grad()
def competing_cos2(sae, stats: CompetitionStats, threshold: float) -> dict[str, float]:
    """Number of pairs with score > τ and their decoder cos² (plain and score-weighted mean), next to the mean
    cos² of all co-firing pairs below τ (the non-competing control)."""
    i_P, j_P = stats.pairs()
    score_P = stats.scores()
    cos2_P = pair_cos2_values(sae.W_dec, i_P, j_P)
    comp = score_P > threshold
    nan = float("nan")
    return {
        "tau": threshold,
        "n_competing_pairs": int(comp.sum()),
        "competing_mean_cos2": cos2_P[comp].mean().item() if comp.any() else nan,
        "competing_weighted_cos2": ((score_P * cos2_P)[comp].sum() / score_P[comp].sum()).item() if comp.any() else nan,
        "noncompeting_mean_cos2": cos2_P[~comp].mean().item() if (~comp).any() else nan,
        "n_cofiring_pairs": len(i_P),
    }


# ---------------------------------------------------------------------------------------------- across a study
def competition_patterns(study_dir: Path, results: pd.DataFrame) -> pd.DataFrame:
    """Per configuration, on held-out text at the competition eval's reference τ: levels of the competition counts,
    decoder overlaps and graph (mean [CI]), and two within-run differences with verdicts: competing − non-competing
    pairs' mean cos², and the % of absorbing pairs flagged as competing − the % of all co-firing pairs."""
    tau = next((run_files.read_json(p)["eval_config"].get("reference_tau") for p in
                sorted(Path(study_dir).glob("*/evals/competition.json"))), 0.02)
    t = f"competition/tau_{tau:g}."
    names = {t + "n_cofiring_pairs": "co-firing pairs", t + "n_competing_pairs": f"competing at τ {tau:g}",
             t + "competing_mean_cos2": "competing cos²", t + "noncompeting_mean_cos2": "non-competing cos²",
             "competition/graph.n_latents_competing": "latents in graph",
             "competition/graph.mean_degree": "mean degree", "competition/graph.largest_cluster": "largest cluster"}
    per_run = wide(results, names).set_index("run").reindex(columns=["config", *names.values()])
    derived = {"competing − non-competing cos²": per_run["competing cos²"] - per_run["non-competing cos²"]}
    absorbing = absorbing_pair_flags(study_dir).query("tau == @tau").set_index("run")
    derived["absorbing flagged − base rate (points)"] = 100 * (absorbing["flagged"] - absorbing["base_rate"])
    per_run = per_run.join(pd.DataFrame(derived))
    rows = [{"config": config, "metric": name, **ci_row(part[name].dropna(), 0 if name in derived else None)}
            for name in [*names.values(), *derived] for config, part in per_run.groupby("config")
            if part[name].notna().any()]
    return pd.DataFrame(rows, columns=["config", "metric", "seeds", "mean", "low", "high", "difference", "verdict"])


def absorbing_pair_flags(study_dir: Path) -> pd.DataFrame:
    """Per run and τ: the distinct (absorbed, absorbing) latent pairs the absorption eval found, how many co-fire on
    held-out text (score > 0), the fraction of those flagged as competing at τ, and the base rate (fraction of all
    co-firing pairs flagged) — both over co-firing pairs, so they compare."""
    rows = []
    for run_dir in sorted(p for p in Path(study_dir).iterdir() if (p / "evals" / "competition.json").exists()):
        result = run_files.read_json(run_dir / "evals" / "competition.json")
        pairs = result.get("eval_result_unstructured", {}).get("absorption_vs_competition") or []
        if not pairs:
            continue
        distinct = pd.DataFrame(pairs).drop_duplicates(["main_latent", "absorbing_latent"])
        cofiring = distinct[distinct["score"] > 0]
        for tau in result["eval_config"]["taus"]:
            per_tau = result["eval_result_metrics"].get(f"tau_{tau:g}") or {}
            if per_tau.get("n_cofiring_pairs"):
                rows.append({"run": run_dir.name, "config": run_identity(run_dir)["config"], "tau": float(tau),
                             "pairs": len(distinct), "cofiring": len(cofiring),
                             "flagged": float((cofiring["score"] > tau).mean()) if len(cofiring) else math.nan,
                             "base_rate": per_tau["n_competing_pairs"] / per_tau["n_cofiring_pairs"]})
    return pd.DataFrame(rows, columns=["run", "config", "tau", "pairs", "cofiring", "flagged", "base_rate"])


def absorbers_by_prefix(run_dir: Path, widths: list[int] | None = None) -> dict[str, list[int]]:
    """Where the absorption eval's distinct absorbing and main latents sit among nested prefixes: counts per group
    ``[0, w₁), [w₁, w₂), …``. ``widths`` default to the run's own Matryoshka prefixes (SAEBench's five for any other
    architecture, to compare against). Matryoshka's first group holding most absorbers is what docs/power.md found."""
    from saelib.settings import matryoshka_widths

    cfg = run_files.read_json(Path(run_dir) / run_files.RUN_CFG_FILE)
    if widths is None:
        scheme = cfg.get("matryoshka_widths", "quarters") if cfg["architecture"] == "matryoshka_batchtopk" \
            else "saebench"
        widths = matryoshka_widths(cfg["d_sae"], scheme)
    result = run_files.read_json(Path(run_dir) / "evals" / "absorption.json")
    pairs = result["eval_result_unstructured"].get("absorbing_pairs") or []
    edges = [0, *widths]

    def per_group(ids: set[int]) -> list[int]:
        return [sum(lo <= i < hi for i in ids) for lo, hi in zip(edges, edges[1:])]

    return {"widths": list(widths), "absorbing": per_group({p["absorbing_latent"] for p in pairs}),
            "main": per_group({p["main_latent"] for p in pairs})}
