"""Feature-competition patterns of one SAE on held-out text (a saelib eval, not an SAEBench one).

The competition score is the training one (``saelib.competition``: s_ij = c_ij / min(p_i, p_j)) from exact
held-out firing rates, so every architecture is measured alike. For a grid of thresholds τ it records how many
pairs compete and the decoder cos² of competing vs non-competing co-firing pairs; at a reference τ it describes the
co-activation graph (degree distribution, largest connected clusters); it lists the strongest competing pairs with
the held-out contexts where both fire; and, if the run has an absorption result, whether each absorbing latent was
competing with the main latent it absorbed from (its score = the largest τ that would still flag the pair).
Written as ``<run>/evals/competition.json`` in SAEBench's result layout; read by ``notebooks/competition.ipynb``.
The held-out measurement itself (``heldout_competition``, ``competing_cos2``) also serves the train notebook's
``competition_for_run``; across a study's finished runs, ``competition_patterns`` and ``absorbing_pair_flags`` read
the results back for the answers and the competition notebook. Competition lives in two modules: the statistics
training keeps in ``saelib.competition``, everything measured and read about it here.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from saelib import run_files
from saelib.activations import ActivationCache
from saelib.competition import CompetitionStats
from saelib.evals.common import EvalError, heldout_split
from saelib.evals.results import run_identity, wide
from saelib.saes import pair_cos2_values
from saelib.stats import ci_row

EVAL_TYPE_ID = "saelib_competition"

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


@dataclass(frozen=True)
class CompetitionSettings:
    taus: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
    reference_tau: float = 0.02  # the co-activation graph and the listed pairs use this τ
    min_cofirings: int = 5  # listed pairs and contexts need at least this many held-out co-firings
    n_top_pairs: int = 50
    n_context_pairs: int = 5
    n_contexts: int = 4
    context_tokens: int = 12
    n_clusters: int = 10
    dense_freq: float = 0.1  # latents firing on more than this fraction of tokens are left out of the graph/lists
    dataset: str | None = None  # None: the run's held-out split (from cfg.json)
    context_size: int | None = None
    eval_tokens: int | None = None

    def resolved(self, run_dir: Path) -> "CompetitionSettings":
        cfg = run_files.read_json(Path(run_dir) / run_files.RUN_CFG_FILE)
        return replace(self, **{f: getattr(self, f) if getattr(self, f) is not None else cfg[f]
                                for f in ("dataset", "context_size", "eval_tokens")})


SMOKE = CompetitionSettings(n_top_pairs=20, n_context_pairs=3, n_contexts=3)


def _validate(s: CompetitionSettings) -> None:
    if not s.taus or any(not 0 <= t <= 1 for t in s.taus):
        raise EvalError(f"taus: expected a non-empty list of thresholds in [0, 1], got {s.taus!r}")
    if not 0 <= s.reference_tau <= 1:
        raise EvalError(f"reference_tau: expected a threshold in [0, 1], got {s.reference_tau!r}")
    if not 0 < s.dense_freq <= 1:
        raise EvalError(f"dense_freq: expected a firing fraction in (0, 1], got {s.dense_freq!r}")
    for name in ("min_cofirings", "n_top_pairs", "n_context_pairs", "n_contexts", "context_tokens", "n_clusters"):
        if getattr(s, name) < 0:
            raise EvalError(f"{name}: expected a non-negative integer, got {getattr(s, name)!r}")


def run_competition(sae, model, settings: CompetitionSettings, artifacts_dir: Path | None = None,
                    run_dir: Path | None = None) -> dict[str, Any]:
    """The competition analysis of ``sae`` on the held-out split named by (resolved) ``settings``."""
    from saelib.activations import special_token_ids

    _validate(settings)
    if None in (settings.dataset, settings.context_size, settings.eval_tokens):
        raise EvalError("settings: expected CompetitionSettings resolved against a run (.resolved(run_dir))")
    start = time.time()
    cache, tokens_NS = heldout_split(sae, model, settings.dataset, settings.context_size, settings.eval_tokens)
    row_tokens = _row_token_positions(tokens_NS, special_token_ids(model), cache.n_rows)
    absorption = None
    if run_dir is not None and (Path(run_dir) / "evals" / "absorption.json").exists():
        absorption = run_files.read_json(Path(run_dir) / "evals" / "absorption.json")
    return analyse(sae, cache, settings, row_tokens=row_tokens, tokenizer=getattr(model, "tokenizer", None),
                   absorption=absorption, started=start)


def _row_token_positions(tokens_NS: np.ndarray, special: set[int], n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(sequence, position) of every cache row: rows are the split's tokens in order, special tokens dropped."""
    tokens = np.asarray(tokens_NS)
    keep = ~np.isin(tokens, np.fromiter(special, dtype=np.int64))
    seq, pos = np.nonzero(keep)
    return np.stack([seq[:n_rows], pos[:n_rows]], axis=1), tokens


@torch.no_grad()
def analyse(sae, cache, settings: CompetitionSettings, row_tokens=None, tokenizer=None, absorption=None,
            started: float | None = None) -> dict[str, Any]:
    from saelib.saes import pair_cos2_values

    started = started or time.time()
    stats = heldout_competition(sae, cache)
    n_tokens = stats.n_tokens  # may be fewer than cache.n_rows for SAEs with a large L0 (see heldout_competition)
    at_tau = {f"tau_{tau:g}": competing_cos2(sae, stats, tau) for tau in settings.taus}
    i_P, j_P = stats.pairs()
    score_P = stats.scores()
    cofire_P = (stats.pair_rates * n_tokens).round().long()
    competing = score_P > settings.reference_tau
    # a dense latent co-fires with nearly everything, so every rarer latent "competes" with it (s = 1): such pairs
    # are counted, but left out of the graph and the listed pairs, which would otherwise show only them
    freq = stats.freq_F
    dense = freq > settings.dense_freq
    with_dense = dense[i_P] | dense[j_P]
    edges = competing & ~with_dense
    graph = _graph(i_P[edges].cpu().numpy(), j_P[edges].cpu().numpy(), sae.cfg.d_sae, settings.n_clusters)
    graph["dense_latents"] = int(dense.sum())
    graph["competing_pairs_with_dense_latent"] = int((competing & with_dense).sum())
    solid = edges & (cofire_P >= settings.min_cofirings)
    order = torch.argsort(score_P[solid] * 1e6 + cofire_P[solid].float(), descending=True)[: settings.n_top_pairs]
    top_i, top_j = i_P[solid][order], j_P[solid][order]
    cos2_top = pair_cos2_values(sae.W_dec, top_i, top_j)
    top_pairs = [{"latent_i": int(i), "latent_j": int(j), "score": float(s), "cofirings": int(c),
                  "freq_i": float(freq[i]), "freq_j": float(freq[j]), "cos2": float(c2)}
                 for i, j, s, c, c2 in zip(top_i, top_j, score_P[solid][order], cofire_P[solid][order], cos2_top)]
    if row_tokens is not None and tokenizer is not None and settings.n_context_pairs:
        chosen = top_pairs[: settings.n_context_pairs]
        found = _contexts(sae, cache, [(p["latent_i"], p["latent_j"]) for p in chosen], row_tokens, tokenizer,
                          settings)
        for pair, contexts in zip(chosen, found):
            pair["contexts"] = contexts
    hist_edges = np.concatenate([[0.0], np.logspace(-3, 0, 31)])
    score_hist, _ = np.histogram(score_P.cpu().numpy(), bins=hist_edges)
    metrics = {**at_tau, "graph": {k: v for k, v in graph.items() if not isinstance(v, list)},
               "n_cofiring_pairs": {"count": int(len(i_P))}}
    unstructured = {
        "score_histogram": {"bin_edges": hist_edges.tolist(), "counts": score_hist.tolist()},
        "degree_histogram": graph["degree_histogram"], "largest_clusters": graph["largest_clusters"],
        "top_pairs": top_pairs, "n_tokens": n_tokens, "wall_time_s": time.time() - started,
    }
    if absorption is not None:
        unstructured["absorption_vs_competition"] = _absorption_pairs(absorption, stats)
    return {
        "eval_type_id": EVAL_TYPE_ID, "eval_config": asdict(settings), "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000), "eval_result_metrics": metrics,
        "eval_result_details": [], "eval_result_unstructured": unstructured,
        "sae_lens_id": "saelib", "sae_lens_release_id": "saelib",
    }


def _graph(i_E: np.ndarray, j_E: np.ndarray, d_sae: int, n_clusters: int) -> dict[str, Any]:
    """Degree distribution and connected components of the competition graph (latents = nodes)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    degree = np.bincount(np.concatenate([i_E, j_E]), minlength=d_sae)
    adjacency = coo_matrix((np.ones(len(i_E)), (i_E, j_E)), shape=(d_sae, d_sae))
    _, labels = connected_components(adjacency, directed=False)
    involved = degree > 0
    sizes = np.bincount(labels[involved]) if involved.any() else np.zeros(0, dtype=int)
    order = np.argsort(-sizes)[:n_clusters]
    clusters = [{"size": int(sizes[c]), "latents": np.flatnonzero((labels == c) & involved)[:30].tolist()}
                for c in order if sizes[c] > 0]
    values, counts = np.unique(degree[involved], return_counts=True)
    return {
        "n_edges": int(len(i_E)), "n_latents_competing": int(involved.sum()),
        "mean_degree": float(degree[involved].mean()) if involved.any() else 0.0,
        "max_degree": int(degree.max()) if len(degree) else 0,
        "n_clusters": int((sizes > 0).sum()), "largest_cluster": int(sizes.max()) if len(sizes) else 0,
        "degree_histogram": {"degree": values.tolist(), "latents": counts.tolist()},
        "largest_clusters": clusters,
    }


def _contexts(sae, cache, pairs: list[tuple[int, int]], row_tokens, tokenizer,
              s: CompetitionSettings) -> list[list[dict]]:
    """Per pair: held-out tokens where both latents fire, strongest product first, with the text before them
    (one pass over the cache for all pairs)."""
    positions, tokens = row_tokens
    best: list[list[tuple[float, int]]] = [[] for _ in pairs]
    i_Q = torch.tensor([i for i, _ in pairs])
    j_Q = torch.tensor([j for _, j in pairs])
    for start in range(0, cache.n_rows, 4096):
        acts = sae.encode(cache.rows(start, start + 4096).to(sae.device, sae.dtype))
        both_BQ = acts[:, i_Q] * acts[:, j_Q]
        for q in range(len(pairs)):
            top = torch.topk(both_BQ[:, q], min(s.n_contexts, len(both_BQ)))
            best[q] += [(float(v), start + int(r)) for v, r in zip(top.values, top.indices) if v > 0]
    out = []
    for found in best:
        found.sort(reverse=True)
        contexts = []
        for strength, row in found[: s.n_contexts]:
            seq, pos = positions[row]
            before = tokens[seq, max(0, pos - s.context_tokens): pos]
            contexts.append({"text": tokenizer.decode(before.tolist()),
                             "token": tokenizer.decode([int(tokens[seq, pos])]), "product": strength})
        out.append(contexts)
    return out


def _absorption_pairs(absorption: dict, stats) -> list[dict]:
    """For each (absorbing latent, main latent) pair named by the absorption result: its competition score."""
    raw = (absorption.get("eval_result_unstructured") or {})
    pairs = raw.get("absorbing_pairs") or []
    if not pairs:
        return []
    keys = stats.pair_keys.cpu().numpy()
    scores = stats.scores().cpu().numpy()
    out = []
    for item in pairs:
        a, m = int(item["absorbing_latent"]), int(item["main_latent"])
        key = min(a, m) * stats.d_sae + max(a, m)
        at = np.searchsorted(keys, key)
        score = float(scores[at]) if at < len(keys) and keys[at] == key else 0.0
        out.append({**item, "score": score})
    return out


def competition_for_run(cfg, sae, eval_cache) -> dict[str, float]:
    """Held-out competition of the run's SAE at its τ, merged into metrics.json under ``competition_*`` keys."""

    result = competing_cos2(sae, heldout_competition(sae, eval_cache), cfg.competition_threshold)
    path = Path(cfg.run_dir) / run_files.METRICS_FILE
    metrics = run_files.read_json(path) if path.exists() else {}
    metrics.update({f"competition_{k}" if not k.startswith("competing") else k: v for k, v in result.items()})
    run_files.write_json_atomic(path, metrics)
    return result


# ---------------------------------------------------------------------- across a study's finished runs
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
