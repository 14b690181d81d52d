"""Streaming co-activation statistics of TopK masks and the competition score of latent pairs.

Per batch, the fired latents of each token (at most k) give k(k−1)/2 co-firing pairs; only those pairs are
counted, so the work is O(B·k²) and the memory is O(pairs kept), never O(d_sae²). Rates are exponential moving
averages over windows of batches. This module knows nothing about decoders or losses (see ``saelib.saes``).

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

import numpy as np
import torch


def fired_pairs(acts_BF: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fired latents per token and all unordered co-firing pairs in the batch.

    Returns ``(fired_F_count, pair_keys)``: per-latent firing counts (d_sae,) and the int64 keys i·d_sae + j
    (i < j) of every co-firing event (with repeats), computed from the top-``k`` entries of each row only.
    """
    k = min(k, acts_BF.shape[1])
    vals_BK, idx_BK = acts_BF.detach().topk(k, dim=-1, sorted=False)
    return fired_pairs_topk(idx_BK, vals_BK > 0, acts_BF.shape[1])


def fired_pairs_topk(idx_BK: torch.Tensor, fired_BK: torch.Tensor, d_sae: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``fired_pairs`` from a TopK selection already made: latent ids ``idx_BK`` and whether each fired."""
    F = d_sae
    k = idx_BK.shape[1]
    all_fired = bool(fired_BK.all())  # the usual TopK case: no masking needed
    fired_idx = idx_BK.reshape(-1) if all_fired else idx_BK[fired_BK]
    counts_F = torch.bincount(fired_idx, minlength=F).to(torch.float32)
    lo, hi = torch.triu_indices(k, k, offset=1, device=idx_BK.device)
    a_BP, b_BP = idx_BK[:, lo], idx_BK[:, hi]
    keys_BP = torch.minimum(a_BP, b_BP).long() * F + torch.maximum(a_BP, b_BP).long()
    if all_fired:
        return counts_F, keys_BP.reshape(-1)
    return counts_F, keys_BP[fired_BK[:, lo] & fired_BK[:, hi]]


def _unique(keys: torch.Tensor, return_counts: bool = False, return_inverse: bool = False):
    """Sorted unique int64 keys (+ counts or inverse). On CPU through numpy, whose sort measured ≈ 6× faster than
    torch's for 500k int64 keys (benchmarks/bench_sgo.py motivates this); elsewhere ``torch.unique``."""
    if keys.device.type != "cpu":
        return torch.unique(keys, return_counts=return_counts, return_inverse=return_inverse)
    out = np.unique(keys.numpy(), return_counts=return_counts, return_inverse=return_inverse)
    return tuple(torch.from_numpy(np.ascontiguousarray(x)).to(torch.int64) for x in out)


class CompetitionStats:
    """Moving-average firing and co-firing rates of an SAE's latents, co-firing table capped at ``max_pairs``.

    Batches are gathered into windows of ``window`` updates: per update only the fired pairs are listed
    (O(B·k²)); at the end of a window they are counted once and folded into the table as an EMA with factor
    ``decay ** window`` (so ``decay`` is the per-batch factor: 0.99 ≈ a 100-batch horizon). Counting once per
    window instead of once per batch divides the sort-and-merge cost by ``window``. When the table would exceed
    ``max_pairs``, the pairs with the lowest co-firing rate are dropped (the least-supported evidence first).
    Scores and competing sets are computed from the folded table only and cached until the next fold.
    """

    def __init__(self, d_sae: int, decay: float = 0.99, max_pairs: int = 1_000_000, window: int = 10,
                 device: str = "cpu"):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"competition_decay: expected a number in [0, 1), got {decay}")
        if max_pairs <= 0:
            raise ValueError(f"competition_max_pairs: expected a positive integer, got {max_pairs}")
        if window <= 0:
            raise ValueError(f"competition_window: expected a positive integer, got {window}")
        self.d_sae, self.decay, self.max_pairs, self.window = d_sae, decay, max_pairs, window
        self.freq_F = torch.zeros(d_sae, dtype=torch.float32, device=device)
        self.pair_keys = torch.zeros(0, dtype=torch.int64, device=device)
        self.pair_rates = torch.zeros(0, dtype=torch.float32, device=device)
        self.n_updates = 0
        self._pending_counts_F = torch.zeros(d_sae, dtype=torch.float32, device=device)
        self._pending_keys: list[torch.Tensor] = []
        self._pending_tokens = 0
        self._competing_cache: tuple[float, tuple] | None = None

    @torch.no_grad()
    def update(self, acts_BF: torch.Tensor, k: int) -> None:
        """Add one batch of SAE activations (B, d_sae); fold the window into the averages when it is full."""
        self._add(*fired_pairs(acts_BF, k), acts_BF.shape[0])

    @torch.no_grad()
    def update_fired(self, idx_BK: torch.Tensor, fired_BK: torch.Tensor) -> None:
        """``update`` from a TopK selection already made (the sparse step's): no dense activations needed."""
        self._add(*fired_pairs_topk(idx_BK, fired_BK, self.d_sae), idx_BK.shape[0])

    def _add(self, counts_F: torch.Tensor, keys: torch.Tensor, n_tokens: int) -> None:
        self._pending_counts_F += counts_F
        self._pending_keys.append(keys)
        self._pending_tokens += n_tokens
        self.n_updates += 1
        if len(self._pending_keys) >= self.window:
            self.flush()

    @torch.no_grad()
    def flush(self) -> None:
        """Fold the pending batches into the moving averages (a no-op when nothing is pending)."""
        if not self._pending_keys:
            return
        decay = self.decay ** len(self._pending_keys)
        new_keys, new_counts = _unique(torch.cat(self._pending_keys), return_counts=True)
        tokens = self._pending_tokens
        self.freq_F.mul_(decay).add_(self._pending_counts_F / tokens, alpha=1 - decay)
        keys = torch.cat([self.pair_keys, new_keys])
        rates = torch.cat([self.pair_rates * decay, new_counts.float() / tokens * (1 - decay)])
        uniq, inverse = _unique(keys, return_inverse=True)
        merged = torch.zeros(len(uniq), dtype=torch.float32, device=rates.device).index_add_(0, inverse, rates)
        if len(uniq) > self.max_pairs:
            keep = merged.topk(self.max_pairs, sorted=False).indices.sort().values
            uniq, merged = uniq[keep], merged[keep]
        self.pair_keys, self.pair_rates = uniq, merged
        self._pending_counts_F.zero_()
        self._pending_keys, self._pending_tokens = [], 0
        self._competing_cache = None

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent indices ``(i_P, j_P)`` of every pair in the table (i < j)."""
        return self.pair_keys // self.d_sae, self.pair_keys % self.d_sae

    def scores(self) -> torch.Tensor:
        """Competition score s_ij = c_ij / min(p_i, p_j) of every pair in the table, in [0, 1]."""
        i_P, j_P = self.pairs()
        rarer = torch.minimum(self.freq_F[i_P], self.freq_F[j_P]).clamp_min(1e-12)
        return (self.pair_rates / rarer).clamp(0.0, 1.0)

    def competing(self, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pairs with score > ``threshold``: ``(i_C, j_C, score_C)``, cached until the next fold."""
        if self._competing_cache is not None and self._competing_cache[0] == threshold:
            return self._competing_cache[1]
        score_P = self.scores()
        keep = score_P > threshold
        i_P, j_P = self.pairs()
        result = (i_P[keep], j_P[keep], score_P[keep])
        self._competing_cache = (threshold, result)
        return result

    def nbytes(self) -> int:
        tensors = [self.freq_F, self.pair_keys, self.pair_rates, self._pending_counts_F, *self._pending_keys]
        return sum(t.element_size() * t.numel() for t in tensors)

    def state_dict(self) -> dict[str, Any]:
        """Everything, pending window included, so a resumed run continues identically."""
        pending = torch.cat(self._pending_keys) if self._pending_keys else torch.zeros(0, dtype=torch.int64)
        lengths = torch.tensor([len(k) for k in self._pending_keys], dtype=torch.int64)
        return {"freq_F": self.freq_F.clone(), "pair_keys": self.pair_keys.clone(),
                "pair_rates": self.pair_rates.clone(), "n_updates": torch.tensor(self.n_updates),
                "pending_counts_F": self._pending_counts_F.clone(), "pending_keys": pending.clone(),
                "pending_lengths": lengths, "pending_tokens": torch.tensor(self._pending_tokens)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["freq_F"].shape != (self.d_sae,):
            raise ValueError(f"competition state: expected d_sae={self.d_sae}, got {tuple(state['freq_F'].shape)}")
        self.freq_F = state["freq_F"].clone()
        self.pair_keys = state["pair_keys"].clone()
        self.pair_rates = state["pair_rates"].clone()
        self.n_updates = int(state["n_updates"])
        self._pending_counts_F = state["pending_counts_F"].clone()
        self._pending_keys = list(state["pending_keys"].split(state["pending_lengths"].tolist()))
        self._pending_tokens = int(state["pending_tokens"])
        self._competing_cache = None
