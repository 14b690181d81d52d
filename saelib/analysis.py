"""Post-hoc feature-competition analysis of a trained SAE on held-out activations.

The same competition score as training (``saelib.competition``), but from exact firing rates over the whole
held-out set instead of moving averages, so every architecture — TopK, SGO, ReLU — is measured alike.
This module trains nothing and writes nothing.
"""

from __future__ import annotations

import torch

from saelib.activations import ActivationCache
from saelib.competition import CompetitionStats
from saelib.saes import pair_cos2_values


@torch.no_grad()
def heldout_competition(sae, cache: ActivationCache, batch_size: int = 4096,
                        max_pairs: int = 5_000_000) -> CompetitionStats:
    """Exact firing and co-firing rates of ``sae``'s latents over the held-out cache (equal weight per token):
    every batch goes into one window, folded once with decay 0, so the rates are pooled counts ÷ tokens."""
    n_batches = -(-cache.n_rows // batch_size)
    stats = CompetitionStats(sae.cfg.d_sae, decay=0.0, max_pairs=max_pairs, window=n_batches)
    for start in range(0, cache.n_rows, batch_size):
        acts_BF = sae.encode(cache.rows(start, start + batch_size).to(sae.device, sae.dtype))
        stats.update(acts_BF, k=int((acts_BF > 0).sum(-1).max().clamp_min(1)))
    stats.flush()
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
