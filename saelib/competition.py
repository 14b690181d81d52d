"""Streaming co-activation statistics of TopK masks and the competition score of latent pairs.

Per batch, the fired latents of each token (at most k) give k(k−1)/2 co-firing pairs; only those pairs are
counted, so the work is O(B·k²) and the memory is O(pairs kept), never O(d_sae²). Rates are exponential moving
averages over batches. This module knows nothing about decoders or losses (see ``saelib.saes``).

Competition score of a pair (i, j), with EMA firing rates p_i, p_j and EMA co-firing rate c_ij:

    s_ij = c_ij / min(p_i, p_j)        ∈ [0, 1]

the fraction of the rarer latent's firings on which the other latent fires too (the overlap coefficient of
their firing sets). It is 1 when one latent never fires without the other, whatever their base rates, which is
the situation the method targets: two latents claiming the same tokens. Normalising by the rarer latent (rather
than by the union, as Jaccard does) keeps a rare specific latent that always fires with a frequent general one
visible; normalising by the product (PMI-like) would reward rare accidental pairs without bound.
"""

from __future__ import annotations

from typing import Any

import torch


def fired_pairs(acts_BF: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fired latents per token and all unordered co-firing pairs in the batch.

    Returns ``(fired_F_count, pair_keys)``: per-latent firing counts (d_sae,) and the int64 keys i·d_sae + j
    (i < j) of every co-firing event (with repeats), computed from the top-``k`` entries of each row only.
    """
    B, F = acts_BF.shape
    k = min(k, F)
    vals_BK, idx_BK = acts_BF.detach().topk(k, dim=-1, sorted=False)
    fired_BK = vals_BK > 0
    counts_F = torch.zeros(F, dtype=torch.float32, device=acts_BF.device)
    counts_F.index_add_(0, idx_BK[fired_BK], torch.ones(int(fired_BK.sum()), device=acts_BF.device))
    lo, hi = torch.triu_indices(k, k, offset=1, device=acts_BF.device)
    a_BP, b_BP = idx_BK[:, lo], idx_BK[:, hi]
    both_BP = fired_BK[:, lo] & fired_BK[:, hi]
    i_P, j_P = torch.minimum(a_BP, b_BP)[both_BP], torch.maximum(a_BP, b_BP)[both_BP]
    return counts_F, i_P.long() * F + j_P.long()


class CompetitionStats:
    """EMA firing and co-firing rates of an SAE's latents, with the co-firing table capped at ``max_pairs``.

    ``decay`` is the EMA factor per batch (0.99 ≈ a 100-batch window). When the table would exceed
    ``max_pairs``, the pairs with the lowest co-firing rate are dropped (the least-supported evidence first).
    Rates are zero-initialised and bias-corrected (as in Adam), so early batches are not under-counted.
    """

    def __init__(self, d_sae: int, decay: float = 0.99, max_pairs: int = 1_000_000, device: str = "cpu"):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"competition_decay: expected a number in [0, 1), got {decay}")
        if max_pairs <= 0:
            raise ValueError(f"competition_max_pairs: expected a positive integer, got {max_pairs}")
        self.d_sae, self.decay, self.max_pairs = d_sae, decay, max_pairs
        self.freq_F = torch.zeros(d_sae, dtype=torch.float32, device=device)
        self.pair_keys = torch.zeros(0, dtype=torch.int64, device=device)
        self.pair_rates = torch.zeros(0, dtype=torch.float32, device=device)
        self.n_updates = 0

    @torch.no_grad()
    def update(self, acts_BF: torch.Tensor, k: int) -> None:
        """Fold one batch of SAE activations (B, d_sae) into the moving averages."""
        B = acts_BF.shape[0]
        counts_F, keys = fired_pairs(acts_BF, k)
        new_keys, new_counts = torch.unique(keys, return_counts=True)
        self.freq_F.mul_(self.decay).add_(counts_F / B, alpha=1 - self.decay)
        keys = torch.cat([self.pair_keys, new_keys])
        rates = torch.cat([self.pair_rates * self.decay, new_counts.float() / B * (1 - self.decay)])
        uniq, inverse = torch.unique(keys, return_inverse=True)
        merged = torch.zeros(len(uniq), dtype=torch.float32, device=rates.device).index_add_(0, inverse, rates)
        if len(uniq) > self.max_pairs:
            keep = merged.topk(self.max_pairs, sorted=False).indices.sort().values
            uniq, merged = uniq[keep], merged[keep]
        self.pair_keys, self.pair_rates = uniq, merged
        self.n_updates += 1

    def _bias_correction(self) -> float:
        return 1.0 - self.decay ** self.n_updates if self.n_updates else 1.0

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent indices ``(i_P, j_P)`` of every pair in the table (i < j)."""
        return self.pair_keys // self.d_sae, self.pair_keys % self.d_sae

    def scores(self) -> torch.Tensor:
        """Competition score s_ij = c_ij / min(p_i, p_j) of every pair in the table, in [0, 1]."""
        i_P, j_P = self.pairs()
        rarer = torch.minimum(self.freq_F[i_P], self.freq_F[j_P]).clamp_min(1e-12)
        return (self.pair_rates / rarer).clamp(0.0, 1.0)

    def firing_rates(self) -> torch.Tensor:
        return self.freq_F / self._bias_correction()

    def competing(self, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pairs with score > ``threshold``: ``(i_C, j_C, score_C)``."""
        score_P = self.scores()
        keep = score_P > threshold
        i_P, j_P = self.pairs()
        return i_P[keep], j_P[keep], score_P[keep]

    def nbytes(self) -> int:
        return sum(t.element_size() * t.numel() for t in (self.freq_F, self.pair_keys, self.pair_rates))

    def state_dict(self) -> dict[str, Any]:
        return {"freq_F": self.freq_F.clone(), "pair_keys": self.pair_keys.clone(),
                "pair_rates": self.pair_rates.clone(),
                "n_updates": torch.tensor(self.n_updates, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["freq_F"].shape != (self.d_sae,):
            raise ValueError(f"competition state: expected d_sae={self.d_sae}, got {tuple(state['freq_F'].shape)}")
        self.freq_F = state["freq_F"].clone()
        self.pair_keys = state["pair_keys"].clone()
        self.pair_rates = state["pair_rates"].clone()
        self.n_updates = int(state["n_updates"])
