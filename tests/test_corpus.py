"""The offline corpus: no probing text, stable split, enough tokens, BOS-led sequences."""

import pytest

from saelib.corpus import (
    PROBING_SETS, _near_dup_key, describe_offline_corpus, offline_documents, read_sae_probes_set, split_of,
    token_sequences,
)


def test_no_probing_text_in_the_training_corpus():
    keys = {_near_dup_key(text) for _, text in offline_documents()}
    for stem in PROBING_SETS:
        for text in read_sae_probes_set(stem)["prompt"].astype(str):
            assert _near_dup_key(text) not in keys, stem


def test_split_is_a_stable_function_of_the_text():
    assert split_of("hello world") == split_of("hello world")
    docs = offline_documents()
    share = sum(split_of(text) == "eval" for _, text in docs) / len(docs)
    assert 0.015 < share < 0.025


def test_offline_corpus_is_large_and_mixed():
    table = describe_offline_corpus()
    chars = table.chars.sum()
    assert chars > 30_000_000  # ≈ 4.45 chars per Gemma 3 token (measured) → > 6.7M tokens
    shares = table.groupby("source").chars.sum() / chars
    assert shares.max() < 0.2 and len(shares) > 40


@pytest.mark.real_model
def test_offline_corpus_holds_at_least_five_million_tokens(real_model):
    docs = offline_documents()
    sample = [text for _, text in docs[:3000]]
    ids = real_model.tokenizer(sample, add_special_tokens=False)["input_ids"]
    chars_per_token = sum(map(len, sample)) / sum(map(len, ids))
    total_tokens = sum(len(text) for _, text in docs) / chars_per_token
    assert total_tokens > 5_000_000, (total_tokens, chars_per_token)


@pytest.mark.real_model
def test_token_sequences_start_with_bos_and_are_cached(real_model, tmp_path):
    seqs = token_sequences(real_model.tokenizer, "saelib-offline", "eval", 20, 64, tmp_path)
    assert seqs.shape == (20, 64) and (seqs[:, 0] == real_model.tokenizer.bos_token_id).all()
    again = token_sequences(real_model.tokenizer, "saelib-offline", "eval", 20, 64, tmp_path)
    assert (again == seqs).all() and len(list(tmp_path.glob("tokens-*.npy"))) == 1


def test_hub_dataset_offline_is_a_clear_error(monkeypatch):
    from saelib.corpus import iter_texts

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="dataset: 'monology/pile-uncopyrighted' needs the Hugging Face hub"):
        next(iter_texts("monology/pile-uncopyrighted", "train"))
