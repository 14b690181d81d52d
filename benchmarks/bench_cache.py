"""Activation-cache throughput next to a bare ``stop_at_layer`` forward pass over the same token batches.

    .venv/bin/python benchmarks/bench_cache.py [--tokens 32768]

Both sides run on the embedded Gemma 3 270M at blocks.8.hook_resid_post, batch 16 × 128, interleaved batch by
batch so machine noise hits both alike. The cache side includes everything it does per batch (hook capture,
special-token masking, memmap write, progress file); the ratio is cache tokens/s ÷ bare tokens/s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from saelib.activations import CacheKey, build_activation_cache, special_token_ids
from saelib.config import build_config
from saelib.corpus import token_sequences
from saelib.models import cache_root, load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32_768)
    args = parser.parse_args()
    cfg = build_config({})
    model = load_model(cfg.model_name)
    n_seqs = args.tokens // cfg.context_size
    tokens = token_sequences(model.tokenizer, cfg.dataset, "train", n_seqs, cfg.context_size, cache_root() / "tokens")
    bare = cached = 0.0
    n_rows = 0
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for start in range(0, n_seqs, 16):
            batch = tokens[start:start + 16]
            t0 = time.perf_counter()
            model(torch.from_numpy(batch.astype("int64")), stop_at_layer=cfg.hook_layer + 1)
            bare += time.perf_counter() - t0
            key = CacheKey(cfg.model_name, cfg.hook_name, f"bench-{start}", int((batch != 2).sum()), cfg.context_size)
            t0 = time.perf_counter()
            cache = build_activation_cache(model, batch, key, Path(tmp), special_token_ids(model))
            cached += time.perf_counter() - t0
            n_rows += cache.n_rows
    n_tokens = n_seqs * cfg.context_size
    print(f"bare stop_at_layer forward: {n_tokens / bare:,.0f} tokens/s ({n_tokens} tokens)")
    print(f"activation cache build:     {n_tokens / cached:,.0f} tokens/s ({n_rows} non-special rows stored)")
    print(f"ratio cache / bare:         {bare / cached:.3f}")


if __name__ == "__main__":
    main()
