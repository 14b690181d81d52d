"""The on-disk activation cache: one LM pass per (model, hook, corpus split, size), reused by every SAE of a study.

Activations of ``blocks.{L}.hook_resid_post`` are computed with ``stop_at_layer`` (no logits), special-token
positions dropped, and written to a memory-mapped ``.npy`` with a progress file so an interrupted build resumes.
Serving shuffles rows per epoch from a seed. This module does not tokenize text (see ``saelib.corpus``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sae_lens.util import extract_layer_from_tlens_hook_name
from tqdm.auto import tqdm

from saelib.sparse_step import keep_freed_memory

log = logging.getLogger(__name__)

ACTS_FILE = "acts.npy"
LOCK_FILE = "lock"
META_FILE = "meta.json"
PROGRESS_FILE = "progress.json"
CACHE_VERSION = 1


@dataclass(frozen=True)
class CacheKey:
    """Everything that determines the cached activations; its hash names the cache folder."""

    model_name: str
    hook_name: str
    corpus_id: str
    """Dataset name + corpus version + split, from ``saelib.corpus``."""
    n_rows: int
    context_size: int
    dtype: str = "float32"
    """How rows are stored on disk (always float32 today; ``ActivationCache`` refuses anything else)."""
    lm_dtype: str = "float32"
    """The LM weights' dtype that produced the rows; a bf16 pass and an fp32 pass never share a cache."""

    def digest(self) -> str:
        fields = dict(self.__dict__)
        if fields["lm_dtype"] == "float32":
            del fields["lm_dtype"]  # caches made before the field existed were float32 passes: keep their names
        blob = json.dumps({**fields, "cache_version": CACHE_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ActivationCache:
    """A finished cache folder: ``acts`` is a read-only memmap (n_rows, d_in); ``mean_D`` its per-dimension mean."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / META_FILE).read_text())
        if not self.meta.get("complete"):
            raise RuntimeError(f"activation cache {self.folder} is incomplete; build it with build_activation_cache")
        self.acts = np.load(self.folder / ACTS_FILE, mmap_mode="r")
        if self.acts.dtype != np.float32 or self.meta.get("dtype", "float32") != "float32":
            raise ValueError(f"activation cache {self.folder}: rows are stored as {self.acts.dtype} "
                             f"(meta says {self.meta.get('dtype')!r}); this reader takes float32 rows only")
        self.lm_dtype = self.meta.get("lm_dtype", "float32")
        self.mean_D = torch.tensor(self.meta["mean"], dtype=torch.float32)

    @property
    def n_rows(self) -> int:
        return self.acts.shape[0]

    @property
    def d_in(self) -> int:
        return self.acts.shape[1]

    def rows(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return torch.from_numpy(np.array(self.acts[start:stop], dtype=np.float32))


def build_activation_cache(
    model, tokens_NS: np.ndarray, key: CacheKey, root: Path, special_ids: set[int], lm_batch_size: int = 16,
) -> ActivationCache:
    """Compute (or finish, or just open) the cache for ``key`` from token sequences ``tokens_NS``.

    Rows come from sequences in order, special-token positions excluded, until ``key.n_rows`` are written.
    """
    folder = Path(root) / key.digest()
    if _complete(folder):
        return ActivationCache(folder)
    keep_freed_memory()
    folder.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(folder / LOCK_FILE):  # parallel runs of a study share caches: one process fills each
        if _complete(folder):
            return ActivationCache(folder)
        return _fill_cache(model, tokens_NS, key, folder, special_ids, lm_batch_size)


def _complete(folder: Path) -> bool:
    return (folder / META_FILE).exists() and json.loads((folder / META_FILE).read_text()).get("complete", False)


@contextlib.contextmanager
def exclusive_lock(path: Path):
    """An exclusive advisory lock (fcntl) held for the block; released even if the process dies."""
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fill_cache(model, tokens_NS, key: CacheKey, folder: Path, special_ids, lm_batch_size: int) -> ActivationCache:
    d_in = model.cfg.d_model
    acts = _open_acts_file(folder / ACTS_FILE, key.n_rows, d_in)
    progress = _read_progress(folder)
    rows, seq = progress["rows"], progress["seqs"]
    layer = hook_layer(key.hook_name)
    bar = tqdm(total=key.n_rows, initial=rows, desc=f"caching {key.hook_name}", unit="tok")
    special = torch.tensor(sorted(special_ids), dtype=torch.long)
    while rows < key.n_rows:
        if seq >= len(tokens_NS):
            raise ValueError(
                f"cache_tokens: the corpus split {key.corpus_id} ran out after {rows} of {key.n_rows} rows; "
                "ask for fewer tokens or a larger corpus"
            )
        batch = torch.from_numpy(np.asarray(tokens_NS[seq: seq + lm_batch_size], dtype=np.int64))
        kept_RD = _hook_acts(model, batch, key.hook_name, layer, special)
        take = min(len(kept_RD), key.n_rows - rows)
        acts[rows: rows + take] = kept_RD[:take].numpy()
        acts.flush()
        rows, seq = rows + take, seq + len(batch)
        _write_json(folder / PROGRESS_FILE, {"rows": rows, "seqs": seq})
        bar.update(take)
    bar.close()
    del acts
    mean_D = _streamed_mean(np.load(folder / ACTS_FILE, mmap_mode="r"))
    _write_json(folder / META_FILE, {**key.__dict__, "d_in": d_in, "sequences_used": seq,
                                     "mean": mean_D.tolist(), "complete": True})
    return ActivationCache(folder)


@torch.no_grad()
def _hook_acts(model, tokens_BS: torch.Tensor, hook_name: str, layer: int, special: torch.Tensor) -> torch.Tensor:
    """Residual activations at ``hook_name`` for non-special positions, flattened to (rows, d_in)."""
    _, cache = model.run_with_cache(tokens_BS, names_filter=[hook_name], stop_at_layer=layer + 1)
    acts_BSD = cache[hook_name]
    keep_BS = ~torch.isin(tokens_BS, special)
    return acts_BSD[keep_BS].float()


def _open_acts_file(path: Path, n_rows: int, d_in: int) -> np.memmap:
    if path.exists():
        acts = np.load(path, mmap_mode="r+")
        if acts.shape == (n_rows, d_in):
            return acts
        path.unlink()
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_rows, d_in))


def _read_progress(folder: Path) -> dict:
    path = folder / PROGRESS_FILE
    return json.loads(path.read_text()) if path.exists() else {"rows": 0, "seqs": 0}


def hook_layer(hook_name: str) -> int:
    """The block index in a hook name (sae_lens's parser), or a ValueError naming the hook."""
    layer = extract_layer_from_tlens_hook_name(hook_name)
    if layer is None:
        raise ValueError(f"hook_name: expected a block hook such as blocks.8.hook_resid_post, got {hook_name!r}")
    return layer


def _write_json(path: Path, data: dict) -> None:
    """Write-then-rename, so a crash never leaves a half-written progress or meta file."""
    from saelib.run_files import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data)))


def _streamed_mean(acts_ND: np.ndarray, chunk: int = 65_536) -> torch.Tensor:
    total = np.zeros(acts_ND.shape[1], dtype=np.float64)
    for start in range(0, acts_ND.shape[0], chunk):
        total += acts_ND[start: start + chunk].sum(0, dtype=np.float64)
    return torch.tensor(total / acts_ND.shape[0], dtype=torch.float32)


def iter_training_batches(
    cache: "ActivationCache | ActivationStream", batch_size: int, seed: int, start_step: int = 0,
    subtract_D: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Endless shuffled batches: epoch ``e`` uses permutation ``seed + e``; an incomplete last batch is dropped.

    ``start_step`` skips exactly the batches a resumed run has already seen, so resuming is deterministic. An
    :class:`ActivationStream` serves the same rows from its mixing buffer instead.
    """
    if isinstance(cache, ActivationStream):
        yield from cache.batches(batch_size, seed, start_step, subtract_D)
        return
    per_epoch = cache.n_rows // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size: expected at most the cache size {cache.n_rows}, got {batch_size}")
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        order = np.random.default_rng(seed + epoch).permutation(cache.n_rows)
        for i in range(offset, per_epoch):
            idx = np.sort(order[i * batch_size: (i + 1) * batch_size])
            batch_BD = torch.from_numpy(cache.acts[idx].astype(np.float32, copy=False))
            yield batch_BD - subtract_D if subtract_D is not None else batch_BD
            step += 1


class ActivationStream:
    """Training rows produced by the LM as they are consumed, for hub-scale runs: nothing is written to disk.

    The rows are the ones a cache of ``n_rows`` would hold (the split's sequences in order, special-token positions
    dropped), served through an in-memory mixing buffer of ``buffer_rows``: the epoch's rows are cut into
    consecutive chunks of that size; each chunk is computed, shuffled (epoch ``e`` draws one permutation per chunk,
    in order, from ``seed + e``) and served in batches; a chunk's incomplete last batch is dropped. With a buffer
    holding the whole epoch this is exactly :func:`iter_training_batches` over the cache, batch for batch. The
    buffer lives on the LM's device. ``mean_D`` (for centring) is the mean of the first chunk.
    """

    def __init__(self, model, tokens_NS: np.ndarray, hook_name: str, n_rows: int, buffer_rows: int,
                 special_ids: set[int], lm_batch_size: int = 16):
        special = np.array(sorted(special_ids))
        rows_per_seq = (~np.isin(tokens_NS, special)).sum(1)
        self.cum_rows = np.concatenate([[0], np.cumsum(rows_per_seq)])
        if self.cum_rows[-1] < n_rows:
            raise ValueError(f"cache_tokens: the corpus split has {int(self.cum_rows[-1])} rows, fewer than the "
                             f"{n_rows} asked for")
        if buffer_rows <= 0:
            raise ValueError(f"stream_buffer_tokens: expected a positive number of rows, got {buffer_rows}")
        self.model, self.tokens_NS, self.hook_name, self.n_rows = model, tokens_NS, hook_name, n_rows
        self.buffer_rows = min(buffer_rows, n_rows)
        self.layer = hook_layer(hook_name)
        self.special = torch.tensor(sorted(special_ids), dtype=torch.long)
        self.lm_batch_size = lm_batch_size
        self.d_in = model.cfg.d_model
        self._chunk: tuple[int, torch.Tensor] | None = None
        self.mean_D = _streamed_mean(self.chunk(0).cpu().numpy())  # the cache's own arithmetic

    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // self.buffer_rows)

    def chunk(self, c: int) -> torch.Tensor:
        """Rows ``[c·buffer, (c+1)·buffer)`` of the epoch, computed by the LM (the last chunk computed is kept)."""
        if self._chunk is not None and self._chunk[0] == c:
            return self._chunk[1]
        lo, hi = c * self.buffer_rows, min((c + 1) * self.buffer_rows, self.n_rows)
        s0 = int(np.searchsorted(self.cum_rows, lo, side="right")) - 1
        s1 = int(np.searchsorted(self.cum_rows, hi, side="left"))
        device = next(self.model.parameters()).device
        self._chunk = None  # the previous chunk goes before the next is built: one buffer in memory, not two
        rows = torch.empty(hi - lo, self.d_in, dtype=torch.float32, device=device)
        # the LM sees the batches the cache gives it (sequences [b, b + lm_batch_size) for b a multiple of
        # lm_batch_size): the same shapes, so the same bits on every CPU, whose kernels may round by batch shape
        b0 = s0 // self.lm_batch_size * self.lm_batch_size
        skip, filled = lo - int(self.cum_rows[b0]), 0  # rows of sequences b0… that belong to the chunk before
        for b in tqdm(range(b0, s1, self.lm_batch_size), desc=f"streaming {self.hook_name} (chunk {c + 1})",
                      unit="batch", leave=False):
            batch = torch.from_numpy(np.asarray(self.tokens_NS[b: b + self.lm_batch_size], dtype=np.int64))
            acts = _hook_acts(self.model, batch.to(device), self.hook_name, self.layer, self.special.to(device))
            acts, skip = acts[skip:], 0
            take = min(len(acts), len(rows) - filled)
            rows[filled: filled + take] = acts[:take]
            filled += take
        assert filled == len(rows), (filled, len(rows))
        self._chunk = (c, rows)
        return rows

    def batches(self, batch_size: int, seed: int, start_step: int = 0,
                subtract_D: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        sizes = [min(self.buffer_rows, self.n_rows - c * self.buffer_rows) for c in range(self.n_chunks)]
        per_chunk = [n // batch_size for n in sizes]
        per_epoch = sum(per_chunk)
        if per_epoch == 0:
            raise ValueError(f"batch_size: expected at most the stream's buffer ({self.buffer_rows} rows), "
                             f"got {batch_size}")
        epoch, offset = divmod(start_step, per_epoch)
        while True:
            rng = np.random.default_rng(seed + epoch)
            for c, n in enumerate(sizes):
                order = rng.permutation(n)  # drawn for every chunk, so a resumed epoch draws the same ones
                if offset >= per_chunk[c]:
                    offset -= per_chunk[c]
                    continue
                rows = self.chunk(c)
                for i in range(offset, per_chunk[c]):
                    idx = torch.from_numpy(np.sort(order[i * batch_size: (i + 1) * batch_size])).to(rows.device)
                    batch_BD = rows[idx]
                    yield batch_BD - subtract_D.to(rows.device) if subtract_D is not None else batch_BD
                offset = 0
            epoch += 1


def special_token_ids(model) -> set[int]:
    """Ids of BOS/EOS/PAD (and any other special token) of the model's tokenizer; BOS=1 for tokenizer-less models."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return {1}
    return {int(i) for i in tok.all_special_ids}


def cache_for_config(cfg, model, split: str = "train") -> ActivationCache:
    """The activation cache of ``cfg`` for one corpus split, built on first use and shared by every run of a study.

    Its key holds the dtype of ``model``'s weights (load it with ``cfg.lm_precision``), so fp32 and bf16 LM
    passes are cached apart; rows are stored as float32 either way.

    ``train`` holds ``cfg.cache_tokens`` rows, ``eval`` holds ``cfg.eval_tokens`` held-out rows.
    """
    from saelib.corpus import CORPUS_VERSION
    from saelib.models import cache_root

    n_rows = cfg.cache_tokens if split == "train" else cfg.eval_tokens
    tokens_NS = split_tokens(cfg, model, split)
    key = CacheKey(cfg.model_name, cfg.hook_name, f"{cfg.dataset}/{CORPUS_VERSION}/{split}", n_rows,
                   cfg.context_size, "float32", str(model.cfg.dtype).removeprefix("torch."))
    return build_activation_cache(model, tokens_NS, key, cache_root() / "activations", special_token_ids(model))


def training_activations(cfg, model) -> ActivationCache | ActivationStream:
    """What a run trains on, by ``cfg.activations``: the shared on-disk cache, or a stream from ``model``."""
    if cfg.activations == "stream":
        return ActivationStream(model, split_tokens(cfg, model, "train"), cfg.hook_name, cfg.cache_tokens,
                                cfg.stream_buffer_tokens, special_token_ids(model))
    return cache_for_config(cfg, model, "train")


def split_tokens(cfg, model, split: str) -> np.ndarray:
    """Token sequences of one split, enough for the split's cache (and, for ``eval``, the CE/KL eval)."""
    from saelib.corpus import token_sequences
    from saelib.models import cache_root

    n_rows = cfg.cache_tokens if split == "train" else max(cfg.eval_tokens, 2 * cfg.eval_ce_tokens)
    n_seqs = int(n_rows / (cfg.context_size - 1) * 1.2) + 8  # margin for BOS between documents
    return token_sequences(model.tokenizer, cfg.dataset, split, n_seqs, cfg.context_size, cache_root() / "tokens")
