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

import time
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
    """``fired_pairs`` from a TopK selection already made: latent ids ``idx_BK`` and whether each fired.

    Keys are int32 while d_sae² fits (d_sae ≤ 46,340), which halves the memory and the sort of the fold."""
    F = d_sae
    k = idx_BK.shape[1]
    all_fired = bool(fired_BK.all())  # the usual TopK case: no masking needed
    fired_idx = idx_BK.reshape(-1) if all_fired else idx_BK[fired_BK]
    counts_F = torch.bincount(fired_idx, minlength=F).to(torch.float32)
    idx_BK, order = idx_BK.sort(dim=-1)  # ascending rows: the lower id of a pair is always the first
    if not all_fired:
        fired_BK = fired_BK.gather(-1, order)
    key_dtype = torch.int32 if F * F < 2**31 else torch.int64
    idx_BK = idx_BK.to(key_dtype)
    lo, hi = torch.triu_indices(k, k, offset=1, device=idx_BK.device)
    keys_BP = (idx_BK * F)[:, lo] + idx_BK[:, hi]
    if all_fired:
        return counts_F, keys_BP.reshape(-1)
    return counts_F, keys_BP[fired_BK[:, lo] & fired_BK[:, hi]]


def _host_numpy(t: torch.Tensor) -> bool:
    """Whether ``t``'s work may go through numpy (on the CPU: the cap's partition, and the fold's sort where numpy's
    is faster); on any other device it stays there in torch (no copy to the host)."""
    return t.device.type == "cpu"


#: On the CPU, which library sorts a fold's keys ("numpy" or "torch") by (torch's thread count, key dtype): chosen
#: by ``_sort_keys``'s first large sort of each (torch's radix sort runs on every thread, numpy's on one).
_CPU_SORTER: dict[tuple[int, str], str] = {}
SORT_PROBE_KEYS = 1 << 20  # a fold with at least this many keys times both sorts once, if not chosen yet
_CPU_SORTS = {"torch": lambda keys: keys.sort().values,  # the order the probe times them in
              "numpy": lambda keys: torch.from_numpy(np.sort(keys.numpy()))}


def _sort_keys(keys: torch.Tensor) -> torch.Tensor:
    """``keys`` (1-D integers) sorted ascending. Off the CPU by torch on the device. On the CPU by numpy's sort
    (introsort, or AVX-512 quicksort where numpy dispatches it) or torch's (a parallel radix sort), whichever ran
    faster in this process's first sort of ``SORT_PROBE_KEYS`` or more keys of that dtype at that thread count (each
    timed twice there, interleaved, on those very keys). 5M int32 keys took 288–309 ms by numpy and 113 ms by torch
    on an AMD EPYC (a fold's 6M: 79 ms by torch with freed memory kept), 36 against 72–86 ms on an Intel Xeon with
    AMX (2 threads). Both give the same array, so the choice changes the speed only."""
    if not _host_numpy(keys):
        return keys.sort().values
    which = (torch.get_num_threads(), str(keys.dtype))
    choice = _CPU_SORTER.get(which)
    if choice is None and len(keys) >= SORT_PROBE_KEYS:
        spent: dict[str, list[float]] = {name: [] for name in _CPU_SORTS}
        for _ in range(2):
            for name, sort in _CPU_SORTS.items():
                start = time.perf_counter()
                result = sort(keys)
                spent[name].append(time.perf_counter() - start)
        _CPU_SORTER[which] = min(spent, key=lambda name: min(spent[name]))
        return result
    return _CPU_SORTS[choice or "torch"](keys)


def _new_rates(counts: torch.Tensor, tokens: int, weight: float) -> torch.Tensor:
    """A window's co-firing counts as the rates it adds to the moving average."""
    return counts.float() / tokens * weight


def _fold(table_keys, table_rates, raw_keys, tokens: int, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a window's raw co-firing keys (with repeats) into the table ``(table_keys, table_rates)`` (sorted unique
    int64 keys; rates already decayed): the union of keys, sorted, each rate plus ``count / tokens · weight``.

    One sort on the tensors' device (no host copy): the window's raw keys as ``2·key`` and the table's as
    ``2·key + 1``, sorted together (int32 while they fit). Each run of equal keys is then one pair: its length less
    its tag is the window's count, and tagged entries come out in the table's own (sorted) order, so its rates need
    no search. The sort is ``_sort_keys``'s: on the CPU, numpy's or torch's, whichever this machine runs faster."""
    n_raw = len(raw_keys)
    if n_raw + len(table_keys) == 0:
        return table_keys.clone(), table_rates.clone()
    top = max(int(raw_keys.max()) if n_raw else 0, int(table_keys[-1]) if len(table_keys) else 0)
    tagged = torch.empty(n_raw + len(table_keys), device=raw_keys.device,
                         dtype=torch.int32 if 2 * top + 1 < 2**31 else torch.int64)
    tagged[:n_raw], tagged[n_raw:] = raw_keys, table_keys
    tagged.bitwise_left_shift_(1)
    tagged[n_raw:] += 1
    tagged = _sort_keys(tagged)
    key = tagged >> 1
    first = torch.empty(len(key), dtype=torch.bool, device=key.device)  # where a run of equal keys begins
    first[0] = True
    torch.ne(key[1:], key[:-1], out=first[1:])
    starts = first.nonzero().squeeze(1)
    ends = torch.empty_like(starts)
    ends[:-1], ends[-1] = starts[1:], len(key)
    in_table = (tagged[ends - 1] & 1).bool()  # a pair's table entry sorts last among its equal keys
    rates = torch.zeros(len(starts), dtype=table_rates.dtype, device=table_rates.device)
    rates.masked_scatter_(in_table, table_rates)
    rates += _new_rates(ends - starts - in_table.long(), tokens, weight)  # x + 0 = x: a pair the window missed
    return key[starts].to(torch.int64), rates


def _top_positions(values: torch.Tensor, n: int) -> torch.Tensor:
    """Ascending positions of the ``n`` largest values (numpy's partition on CPU: ≈ 2× torch.topk there; the
    positions put in order by a mask, not a sort)."""
    if not _host_numpy(values):
        return values.topk(n, sorted=False).indices.sort().values
    v = values.numpy()
    kept = np.zeros(len(v), dtype=bool)
    kept[np.argpartition(v, len(v) - n)[len(v) - n:]] = True
    return torch.from_numpy(np.flatnonzero(kept))


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
        tokens = self._pending_tokens
        self.freq_F.mul_(decay).add_(self._pending_counts_F / tokens, alpha=1 - decay)
        uniq, merged = _fold(self.pair_keys, self.pair_rates * decay, torch.cat(self._pending_keys), tokens,
                             1 - decay)
        if len(uniq) > self.max_pairs:
            keep = _top_positions(merged, self.max_pairs)
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
        return self._scores(*self.pairs())

    def _scores(self, i_P: torch.Tensor, j_P: torch.Tensor) -> torch.Tensor:
        rarer = torch.minimum(self.freq_F[i_P], self.freq_F[j_P]).clamp_min(1e-12)
        return (self.pair_rates / rarer).clamp(0.0, 1.0)

    def competing(self, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pairs with score > ``threshold``: ``(i_C, j_C, score_C)``, cached until the next fold."""
        if self._competing_cache is not None and self._competing_cache[0] == threshold:
            return self._competing_cache[1]
        i_P, j_P = self.pairs()
        score_P = self._scores(i_P, j_P)
        keep = (score_P > threshold).nonzero().squeeze(1)  # one search, three gathers
        result = (i_P.index_select(0, keep), j_P.index_select(0, keep), score_P.index_select(0, keep))
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
        device = self.freq_F.device  # a checkpoint loads on the CPU; the statistics stay where the SAE is
        self.freq_F = state["freq_F"].to(device, copy=True)
        self.pair_keys = state["pair_keys"].to(device, copy=True)
        self.pair_rates = state["pair_rates"].to(device, copy=True)
        self.n_updates = int(state["n_updates"])
        self._pending_counts_F = state["pending_counts_F"].to(device, copy=True)
        self._pending_keys = list(state["pending_keys"].to(device).split(state["pending_lengths"].tolist()))
        self._pending_tokens = int(state["pending_tokens"])
        self._competing_cache = None
