"""Activation cache: correct rows, special tokens out, resumable, keyed; training batches shuffled and resumable."""

import json

import numpy as np
import pytest
import torch

from saelib.activations import (
    META_FILE, PROGRESS_FILE, CacheKey, build_activation_cache, iter_training_batches,
)
from tests.conftest import synthetic_tokens


def direct_rows(model, tokens, n_rows):
    _, cache = model.run_with_cache(torch.from_numpy(tokens), names_filter=["blocks.0.hook_resid_post"],
                                    stop_at_layer=1)
    acts = cache["blocks.0.hook_resid_post"]
    return acts[torch.from_numpy(tokens) != 1][:n_rows]


def test_cache_matches_a_direct_forward_without_special_tokens(tiny_model, tiny_cache):
    expected = direct_rows(tiny_model, synthetic_tokens(), tiny_cache.n_rows)
    torch.testing.assert_close(tiny_cache.rows(), expected, rtol=1e-5, atol=1e-5)
    assert tiny_cache.n_rows == 1500 and tiny_cache.d_in == 64
    torch.testing.assert_close(tiny_cache.mean_D, expected.mean(0), rtol=1e-4, atol=1e-5)


def test_interrupted_build_resumes_to_the_same_result(tiny_model, tmp_path, monkeypatch):
    import saelib.activations as acts_mod

    key = CacheKey("tiny-random", "blocks.0.hook_resid_post", "synthetic", 1500, 32)
    calls = {"n": 0}
    real = acts_mod._hook_acts

    def dies_on_third_batch(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(acts_mod, "_hook_acts", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        build_activation_cache(tiny_model, synthetic_tokens(), key, tmp_path, {1}, lm_batch_size=8)
    folder = tmp_path / key.digest()
    assert json.loads((folder / PROGRESS_FILE).read_text())["seqs"] == 16
    assert not (folder / META_FILE).exists()
    monkeypatch.setattr(acts_mod, "_hook_acts", real)
    resumed = build_activation_cache(tiny_model, synthetic_tokens(), key, tmp_path, {1}, lm_batch_size=8)
    fresh = build_activation_cache(tiny_model, synthetic_tokens(), key, tmp_path / "fresh", {1}, lm_batch_size=8)
    np.testing.assert_array_equal(resumed.acts, fresh.acts)


def test_cache_key_separates_everything_that_matters():
    base = CacheKey("m", "blocks.0.hook_resid_post", "c", 100, 32)
    variants = [CacheKey("m2", "blocks.0.hook_resid_post", "c", 100, 32),
                CacheKey("m", "blocks.1.hook_resid_post", "c", 100, 32),
                CacheKey("m", "blocks.0.hook_resid_post", "c2", 100, 32),
                CacheKey("m", "blocks.0.hook_resid_post", "c", 101, 32),
                CacheKey("m", "blocks.0.hook_resid_post", "c", 100, 64),
                CacheKey("m", "blocks.0.hook_resid_post", "c", 100, 32, "float16")]
    assert len({base.digest(), *(v.digest() for v in variants)}) == 7


def test_corpus_too_small_is_a_clear_error(tiny_model, tmp_path):
    key = CacheKey("tiny-random", "blocks.0.hook_resid_post", "synthetic", 10_000, 32)
    with pytest.raises(ValueError, match="cache_tokens: the corpus split synthetic ran out"):
        build_activation_cache(tiny_model, synthetic_tokens(8), key, tmp_path, {1})


class ArangeCache:
    """Rows are their own index, so coverage is checkable exactly."""

    def __init__(self, n_rows):
        self.acts = np.arange(n_rows, dtype=np.float32)[:, None].repeat(2, 1)
        self.n_rows = n_rows


def test_batches_cover_each_row_once_per_epoch_and_differ_between_epochs():
    cache = ArangeCache(1050)
    stream = iter_training_batches(cache, 100, seed=3)
    epoch0 = torch.cat([next(stream) for _ in range(10)])[:, 0]
    epoch1 = torch.cat([next(stream) for _ in range(10)])[:, 0]
    assert epoch0.unique().numel() == 1000 and epoch1.unique().numel() == 1000  # last 50 of each epoch dropped
    assert set(epoch0.tolist()) != set(epoch1.tolist()) or not torch.equal(epoch0, epoch1)
    assert not torch.equal(epoch0, epoch1)


def test_batch_larger_than_cache_is_an_error():
    with pytest.raises(ValueError, match="batch_size: expected at most the cache size 10"):
        next(iter_training_batches(ArangeCache(10), 100, seed=0))


def test_start_step_resumes_the_same_stream(tiny_cache):
    full = iter_training_batches(tiny_cache, 100, seed=1)
    seq = [next(full) for _ in range(40)]
    resumed = iter_training_batches(tiny_cache, 100, seed=1, start_step=23)
    for expected in seq[23:]:
        torch.testing.assert_close(next(resumed), expected, rtol=0, atol=0)


def test_centring_subtracts_the_mean(tiny_cache):
    plain = next(iter_training_batches(tiny_cache, 100, seed=0))
    centred = next(iter_training_batches(tiny_cache, 100, seed=0, subtract_D=tiny_cache.mean_D))
    torch.testing.assert_close(plain - tiny_cache.mean_D, centred)


def test_cache_build_takes_an_exclusive_lock(tiny_model, tmp_path, monkeypatch):
    """Parallel runs of a study share a cache: the builder holds a lock, and a second builder that got it after the
    first finished opens the finished cache instead of writing again."""
    import saelib.activations as acts

    key = CacheKey("tiny-random", "blocks.0.hook_resid_post", "synthetic", 300, 32)
    held = []
    real_fill = acts._fill_cache

    def fill(*args, **kwargs):
        lock = tmp_path / "acts" / key.digest() / acts.LOCK_FILE
        import fcntl
        with open(lock) as other:  # a second process would block here
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)
            except BlockingIOError:
                held.append(True)
        return real_fill(*args, **kwargs)

    monkeypatch.setattr(acts, "_fill_cache", fill)
    first = build_activation_cache(tiny_model, synthetic_tokens(), key, tmp_path / "acts", {1}, lm_batch_size=8)
    second = build_activation_cache(tiny_model, synthetic_tokens(), key, tmp_path / "acts", {1}, lm_batch_size=8)
    assert held == [True]  # filled once, under the lock
    assert torch.equal(first.rows(), second.rows())


def test_bf16_and_fp32_lm_passes_never_share_a_cache_and_old_names_stay():
    fp32 = CacheKey("m", "blocks.0.hook_resid_post", "c", 100, 32)
    assert fp32.digest() == CacheKey("m", "blocks.0.hook_resid_post", "c", 100, 32, "float32", "float32").digest()
    assert CacheKey("m", "blocks.0.hook_resid_post", "c", 100, 32, "float32", "bfloat16").digest() != fp32.digest()


def test_a_cache_of_non_float32_rows_is_refused(tiny_model, tmp_path):
    import numpy as np

    from saelib.activations import ACTS_FILE, ActivationCache

    key = CacheKey("tiny-random", "blocks.0.hook_resid_post", "synthetic", 300, 32)
    cache = build_activation_cache(tiny_model, synthetic_tokens(), key, tmp_path / "acts", {1}, lm_batch_size=8)
    np.save(cache.folder / ACTS_FILE, np.asarray(cache.acts).astype(np.float16))
    with pytest.raises(ValueError, match="rows are stored as float16.*float32 rows only"):
        ActivationCache(cache.folder)


def test_a_bf16_lm_pass_is_cached_apart_and_close_to_fp32(tmp_path, monkeypatch):
    import saelib.sparse_step as s
    from saelib.activations import cache_for_config
    from saelib.config import build_config
    from saelib.models import load_model

    monkeypatch.setattr(s, "bf16_native", lambda device="cpu": True)  # bf16 runs (emulated if need be) on any CPU
    monkeypatch.setattr(s, "cpu_bf16_speedup", lambda: 1.0)  # untimed: emulated bf16 would take seconds to time
    cfg = build_config({"model_name": "tiny-random", "hook_layer": 0, "cache_tokens": 600, "batch_size": 100,
                        "training_tokens": 600, "eval_tokens": 100, "context_size": 32})
    monkeypatch.setattr("saelib.activations.split_tokens", lambda cfg, model, split: synthetic_tokens())
    monkeypatch.setattr("saelib.activations.special_token_ids", lambda model: {1})
    fp32 = cache_for_config(cfg, load_model("tiny-random", precision="float32"))
    bf16 = cache_for_config(cfg, load_model("tiny-random", precision="bfloat16"))
    assert fp32.folder != bf16.folder and bf16.lm_dtype == "bfloat16" and fp32.lm_dtype == "float32"
    a, b = fp32.rows(), bf16.rows()
    assert b.dtype == torch.float32 and 0 < float((a - b).norm() / a.norm()) < 0.02


# ---------------------------------------------------------------------------------------------- streaming
HOOK = "blocks.0.hook_resid_post"


def tiny_stream(tiny_model, buffer_rows, n_rows=1500):
    from saelib.activations import ActivationStream

    return ActivationStream(tiny_model, synthetic_tokens(), HOOK, n_rows, buffer_rows, {1}, lm_batch_size=8)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_a_stream_with_a_whole_epoch_buffer_serves_the_cache_batch_for_batch(tiny_model, tiny_cache):
    stream = tiny_stream(tiny_model, buffer_rows=10_000)
    assert torch.equal(stream.mean_D, tiny_cache.mean_D)
    for start in (0, 7, 25):  # across epochs (11 batches each), and resumed part-way
        cached = take(iter_training_batches(tiny_cache, 128, 3, start, tiny_cache.mean_D), 15)
        streamed = take(iter_training_batches(stream, 128, 3, start, stream.mean_D), 15)
        assert all(torch.equal(a, b) for a, b in zip(cached, streamed))


def test_a_small_buffer_mixes_within_chunks_covers_the_epoch_and_resumes(tiny_model, tiny_cache):
    stream = tiny_stream(tiny_model, buffer_rows=400)  # chunks of 400, 400, 400, 300 rows: 3 + 3 + 3 + 2 batches
    from collections import Counter

    cached = [row.tobytes() for row in np.asarray(tiny_cache.acts)]
    where: dict[bytes, set[int]] = {}
    for i, row in enumerate(cached):  # a few rows of the tiny model repeat (same token, same context)
        where.setdefault(row, set()).add(i // 400)
    batches = take(iter_training_batches(stream, 128, 5), 22)
    rows = [[r.numpy().tobytes() for r in b] for b in batches]
    expected = [0] * 3 + [1] * 3 + [2] * 3 + [3] * 2  # each batch from one chunk, in order
    assert all(all(chunk in where[r] for r in b) for b, chunk in zip(rows[:11], expected))
    first_epoch = Counter(r for b in rows[:11] for r in b)
    assert sum(first_epoch.values()) == 11 * 128 and not first_epoch - Counter(cached)  # no row twice in an epoch
    assert rows[11] != rows[0]  # the next epoch draws new permutations
    for start in (13, 16, 20):  # resumed within the next epoch's first, second and last chunk
        resumed = take(iter_training_batches(stream, 128, 5, start_step=start), 22 - start)
        assert all(torch.equal(a, b) for a, b in zip(resumed, batches[start:]))


def test_each_chunk_is_computed_in_the_caches_lm_batches(tiny_model, tmp_path, monkeypatch):
    """A CPU's kernels may round by batch shape (an Intel Xeon did, in fp32): the stream gives the LM the batches
    the cache gave it, so its chunks equal the cache's rows bit for bit wherever a chunk starts or ends. Here the
    LM's output carries its batch's size, so any other batching shows."""
    from saelib import activations

    real = activations._hook_acts
    monkeypatch.setattr(activations, "_hook_acts", lambda model, tokens_BS, *a: real(model, tokens_BS, *a)
                        + len(tokens_BS) / 1024)
    key = CacheKey("tiny-random", HOOK, "synthetic", 1500, 32)
    cache = build_activation_cache(tiny_model, synthetic_tokens(), key, tmp_path / "acts", {1}, lm_batch_size=8)
    stream = tiny_stream(tiny_model, buffer_rows=400)  # chunks start inside sequences and inside LM batches
    for c in range(stream.n_chunks):
        assert np.array_equal(stream.chunk(c).numpy(), np.asarray(cache.acts[c * 400: (c + 1) * 400])), c


def test_training_on_the_stream_equals_training_on_the_cache(tmp_path, tiny_model, tiny_cache):
    from saelib.train import train_sae
    from tests.test_train import tiny_cfg

    from_cache = train_sae(tiny_cfg(tmp_path / "cache"), tiny_cache)
    stream_cfg = tiny_cfg(tmp_path / "stream", activations="stream", stream_buffer_tokens=10_000)
    from_stream = train_sae(stream_cfg, tiny_stream(tiny_model, stream_cfg.stream_buffer_tokens))
    for name, value in from_cache.state_dict().items():
        assert torch.equal(from_stream.state_dict()[name], value), name


@pytest.mark.parametrize("overrides, field", [({"activations": "disk"}, "activations"),
                                              ({"activations": "stream", "stream_buffer_tokens": 100}, "stream_buffer_tokens")])
def test_bad_streaming_settings_name_the_field(overrides, field):
    from saelib.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=f"^{field}: expected"):
        build_config({"batch_size": 256, **overrides})


@pytest.mark.real_model
def test_the_embedded_model_streams_what_it_caches_and_writes_nothing(real_model, tmp_path):
    from saelib.activations import cache_for_config, training_activations
    from saelib.config import build_config
    from saelib.models import cache_root

    cfg = build_config({"cache_tokens": 2048, "batch_size": 256, "runs_dir": str(tmp_path), "activations": "stream",
                        "stream_buffer_tokens": 4096})
    before = set((cache_root() / "activations").glob("*"))
    stream = training_activations(cfg, real_model)
    streamed = take(iter_training_batches(stream, 256, 0, 3, stream.mean_D), 6)
    assert set((cache_root() / "activations").glob("*")) == before  # a stream leaves nothing on disk
    cache = cache_for_config(cfg, real_model, "train")
    cached = take(iter_training_batches(cache, 256, 0, 3, cache.mean_D), 6)
    assert all(torch.equal(a, b) for a, b in zip(cached, streamed))
