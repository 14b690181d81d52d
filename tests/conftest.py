"""Shared fixtures: a tiny random model, synthetic activation caches, and (marked) the real embedded model."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from saelib.activations import CacheKey, build_activation_cache
from saelib.models import tiny_random_model


_SHARED_CACHE = os.environ.get("SAELIB_CACHE")  # the converted model lives here (or in ~/.cache/saelib)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch, request):
    """Every test gets its own saelib cache, except real-model tests, which share the converted model; and no
    hold on 'auto' (``$SAELIB_AUTO_PRECISION``)."""
    if "real_model" not in request.keywords:
        monkeypatch.setenv("SAELIB_CACHE", str(tmp_path / "saelib-cache"))
    monkeypatch.delenv("SAELIB_AUTO_PRECISION", raising=False)  # a hold exported in the shell must not decide tests


@pytest.fixture(scope="session")
def tiny_model():
    return tiny_random_model()


def synthetic_tokens(n_seqs=64, ctx=32, seed=0, vocab=512):
    tokens = np.random.default_rng(seed).integers(3, vocab, size=(n_seqs, ctx))
    tokens[:, 0] = 1  # BOS
    tokens[::5, ctx // 2] = 1  # a document boundary inside some sequences
    return tokens


@pytest.fixture
def tiny_cache(tiny_model, tmp_path):
    key = CacheKey("tiny-random", "blocks.0.hook_resid_post", "synthetic", 1500, 32)
    return build_activation_cache(tiny_model, synthetic_tokens(), key, tmp_path / "acts", {1}, lm_batch_size=8)


@pytest.fixture(scope="session")
def real_model():
    from saelib.models import load_model

    return load_model("gemma-3-270m")


@pytest.fixture(scope="session")
def gemma_tokenizer():
    """The embedded model's tokenizer (from the shared model cache: `make model` runs before the tests)."""
    from saelib.models import embedded_tokenizer

    saved = os.environ.get("SAELIB_CACHE")
    try:
        if _SHARED_CACHE is None:
            os.environ.pop("SAELIB_CACHE", None)
        else:
            os.environ["SAELIB_CACHE"] = _SHARED_CACHE
        return embedded_tokenizer()
    finally:
        if saved is not None:
            os.environ["SAELIB_CACHE"] = saved


@pytest.fixture(scope="session")
def tiny_text_model(gemma_tokenizer):
    """A tiny random 2-layer model that reads text with the embedded Gemma tokenizer (vocab 262,144)."""
    return tiny_random_model(tokenizer=gemma_tokenizer)
