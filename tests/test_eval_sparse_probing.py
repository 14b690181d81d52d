"""Sparse probing through sae_bench: end to end on the tiny model, the offline tasks, bad input, the real model."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter
from sae_bench.evals.sparse_probing.eval_output import SparseProbingEvalOutput

from saelib.evals.common import EvalError
from saelib.evals.sparse_probing import (
    OFFLINE_DATASETS, SMOKE, SparseProbingSettings, probing_headline, offline_class_pools, offline_train_test,
    run_sparse_probing, sae_bench_patched,
)
from tests.test_evals import tiny_sae as _unfolded_tiny_sae


def tiny_sae(seed=0):
    sae = _unfolded_tiny_sae(seed=seed)
    with torch.no_grad():  # unit-norm decoder rows, as sae_bench expects (a random SAE: no need to fold)
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
    return sae


TINY = SparseProbingSettings(
    dataset_names=("saelib/news_category", "saelib/parlspeech_language"), probe_train_set_size=16,
    probe_test_set_size=8, context_length=32, k_values=(1, 2, 5), llm_batch_size=8,
)


class CountingModel:
    """Counts forward passes of a HookedTransformer (sae_bench calls ``run_with_hooks``)."""

    def __init__(self, model, monkeypatch):
        self.calls = 0
        original = model.run_with_hooks

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(model, "run_with_hooks", counted)


def test_end_to_end_on_the_tiny_model_reuses_the_llm_side(tiny_text_model, tmp_path, monkeypatch):
    counter = CountingModel(tiny_text_model, monkeypatch)
    first = run_sparse_probing(tiny_sae(), tiny_text_model, TINY, tmp_path)
    TypeAdapter(SparseProbingEvalOutput).validate_python(first)
    assert first["eval_type_id"] == "sparse_probing"
    assert counter.calls > 0
    calls, files = counter.calls, sorted(tmp_path.rglob("*_activations.pt"))
    assert len(files) == 2
    mtimes = [f.stat().st_mtime_ns for f in files]

    second = run_sparse_probing(tiny_sae(seed=1), tiny_text_model, TINY, tmp_path)
    assert counter.calls == calls  # no new LLM forward pass
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    ours = [r["eval_result_unstructured"]["saelib_sparse_probing"] for r in (first, second)]
    assert ours[0]["llm_side_computed_for"] == list(TINY.dataset_names)
    assert ours[1]["llm_side_computed_for"] == []

    for result in (first, second):
        metrics = result["eval_result_metrics"]
        for side in ("llm", "sae"):
            for k in (None, 1, 2, 5):
                key = f"{side}_test_accuracy" if k is None else f"{side}_top_{k}_test_accuracy"
                assert 0.0 <= metrics[side][key] <= 1.0
        assert [d["dataset_name"] for d in result["eval_result_details"]] == [
            f"{n}_results" for n in TINY.dataset_names]
        per_class = result["eval_result_unstructured"]["saelib/parlspeech_language_results"]
        assert set(per_class["sae_top_1_test_accuracy"]) == {"en", "de", "es", "nl"}
        assert result["eval_config"]["probe_train_set_size"] == 16
        assert result["eval_config"]["k_values"] == [1, 2, 5]
        assert result["sae_lens_id"] == "saelib"
    # the LLM side is the same stored result; the SAE side differs between the two SAEs
    assert first["eval_result_metrics"]["llm"] == second["eval_result_metrics"]["llm"]
    headline = probing_headline(first)
    assert headline["sparse_probing_sae_top_1"] == first["eval_result_metrics"]["sae"]["sae_top_1_test_accuracy"]
    assert headline["sparse_probing_llm_full"] == first["eval_result_metrics"]["llm"]["llm_test_accuracy"]
    json.dumps(dataclasses.asdict(TINY))  # the lead stores the settings as JSON


def test_same_inputs_give_the_same_numbers(tiny_text_model, tmp_path):
    a = run_sparse_probing(tiny_sae(), tiny_text_model, TINY, tmp_path / "a")
    b = run_sparse_probing(tiny_sae(), tiny_text_model, TINY, tmp_path / "a")  # stored LLM side
    c = run_sparse_probing(tiny_sae(), tiny_text_model, TINY, tmp_path / "c")  # computed afresh
    assert a["eval_result_metrics"] == b["eval_result_metrics"] == c["eval_result_metrics"]


def test_sae_bench_is_restored_after_the_eval(tiny_text_model, tmp_path):
    import sae_bench.evals.sparse_probing.probe_training as probe_training
    import sae_bench.sae_bench_utils.dataset_info as dataset_info
    import sae_bench.sae_bench_utils.dataset_utils as dataset_utils

    before = (dataset_utils.get_multi_label_train_test_data, probe_training.train_sklearn_probe,
              dict(dataset_info.chosen_classes_per_dataset))
    with sae_bench_patched(TINY):
        assert "saelib/ag_news" in dataset_info.chosen_classes_per_dataset
    after = (dataset_utils.get_multi_label_train_test_data, probe_training.train_sklearn_probe,
             dict(dataset_info.chosen_classes_per_dataset))
    assert before == after


def test_the_top_k_probe_passes_sae_benchs_type_checks_and_fits_offset_features():
    """sae_bench's top-k probe under its jaxtyping/beartype checks, on features with a Gemma-like offset."""
    import sae_bench.evals.sparse_probing.probe_training as probe_training

    gen = torch.Generator().manual_seed(0)

    def acts(n):  # dimension 0: large constant offset, class signal 1 std; the rest noise
        out = {}
        for i, cls in enumerate(("a", "b", "c")):
            x = torch.randn(n, 16, generator=gen)
            x[:, 0] = 5300 + 265 * torch.randn(n, generator=gen) + 600 * (i == 0)
            out[cls] = x
        return out

    train, test = acts(100), acts(50)
    with sae_bench_patched(TINY):
        torch.manual_seed(0)
        _, accuracies = probe_training.train_probe_on_activations(train, test, select_top_k=1)
    assert accuracies["a"] > 0.75  # an unconditioned float32 lbfgs fit returns a constant predictor: 0.5


def test_skipping_padding_gives_sae_benchs_activations(tiny_text_model):
    """The padding-free wrapper returns what sae_bench's ``get_llm_activations`` computes on padded batches."""
    import sae_bench.sae_bench_utils.activation_collection as activation_collection
    from sae_bench.sae_bench_utils.dataset_utils import tokenize_data_dictionary

    original = activation_collection.get_llm_activations
    texts = ["A short one.", "A somewhat longer sentence about the weather in spring.", "Mid length text here.",
             "x " * 40, "Hello", "Another sentence of moderate length for the batch."]
    tokens = tokenize_data_dictionary({"a": texts}, tiny_text_model.tokenizer, 48, "cpu")["a"]["input_ids"]
    expected = original(tokens, tiny_text_model, 4, 0, "blocks.0.hook_resid_post", mask_bos_pad_eos_tokens=True)
    with sae_bench_patched(TINY):
        patched = activation_collection.get_llm_activations
        assert patched is not original
        got = patched(tokens, tiny_text_model, 4, 0, "blocks.0.hook_resid_post", mask_bos_pad_eos_tokens=True)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert activation_collection.get_llm_activations is original


# ------------------------------------------------------------------------------------------- offline tasks

def test_offline_tasks_are_balanced_with_the_requested_sizes():
    for name in OFFLINE_DATASETS:
        train, test = offline_train_test(name, 40, 20, random_seed=3)
        assert list(train) == list(test) == list(OFFLINE_DATASETS[name])
        assert all(len(texts) == 20 for texts in train.values())
        assert all(len(texts) == 10 for texts in test.values())
        everything = [t for texts in (*train.values(), *test.values()) for t in texts]
        assert len(set(everything)) == len(everything)  # no text in two classes or in both splits
        again, _ = offline_train_test(name, 40, 20, random_seed=3)
        assert again == train


def test_offline_task_texts_are_not_in_the_sae_training_corpus():
    from saelib.corpus import _near_dup_key, offline_documents

    corpus_keys = {_near_dup_key(text) for _, text in offline_documents()}
    rng = np.random.default_rng(0)
    for name in OFFLINE_DATASETS:
        for cls, pool in offline_class_pools(name).items():
            sample = [pool[i] for i in rng.choice(len(pool), size=min(200, len(pool)), replace=False)]
            assert not {_near_dup_key(t) for t in sample} & corpus_keys, (name, cls)


def test_language_task_has_four_languages_of_real_sentences():
    pools = offline_class_pools("saelib/parlspeech_language")
    assert set(pools) == {"en", "de", "es", "nl"}
    assert all(len(p) > 5000 for p in pools.values())
    assert any(" und " in s for s in pools["de"][:200]) and any(" que " in s for s in pools["es"][:200])


# --------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("change, parameter", [
    ({"dataset_names": ("saelib/no_such_task",)}, "dataset_names"),
    ({"dataset_names": ("LabHC/bias_in_bios_class_set1",)}, "dataset_names"),
    ({"probe_train_set_size": 4000}, "probe_train_set_size"),
    ({"probe_test_set_size": 7}, "probe_test_set_size"),
    ({"k_values": (3,)}, "k_values"),
    ({"context_length": 100_000}, "context_length"),
    ({"dataset_source": "web"}, "dataset_source"),
])
def test_bad_input_is_an_eval_error_naming_the_parameter(tiny_text_model, tmp_path, change, parameter):
    settings = dataclasses.replace(TINY, **change)
    with pytest.raises(EvalError, match=f"^{parameter}"):
        run_sparse_probing(tiny_sae(), tiny_text_model, settings, tmp_path)
    assert not list(tmp_path.rglob("*.pt"))


def test_hub_source_offline_is_unavailable(tiny_text_model, tmp_path, monkeypatch):
    from saelib.evals.common import EvalUnavailable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EvalUnavailable, match="hub"):
        run_sparse_probing(tiny_sae(), tiny_text_model, SparseProbingSettings(dataset_source="hub"), tmp_path)


def test_smoke_settings_are_valid():
    assert set(SMOKE.dataset_names) <= set(OFFLINE_DATASETS)
    for name in SMOKE.dataset_names:
        offline_train_test(name, SMOKE.probe_train_set_size, SMOKE.probe_test_set_size, SMOKE.random_seed)


# ------------------------------------------------------------------------------------------- real model

@pytest.mark.real_model
def test_real_model_hidden_states_beat_chance_on_every_offline_task(real_model, tmp_path):
    """Hidden-state sanity: the LLM's own activations (all dims) separate every offline task's classes."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(model_name="gemma-3-270m", hook_name="blocks.8.hook_resid_post", context_size=128,
                       prepend_bos=True)
    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=640, d_sae=256, k=16, metadata=meta))  # the SAE side is not checked here
    # Small: 20 train + 20 test texts per class, 64 tokens (≈ 2.5 min on 2 busy cores). Seeded, so the numbers
    # are fixed; measured: full-width LLM probe 0.68–0.73 on the three profession sets (64 tokens of a Pile
    # snippet often miss the occupation), 0.76–0.98 elsewhere, mean 0.83. Chance is 0.5 (balanced tasks).
    settings = SparseProbingSettings(probe_train_set_size=40, probe_test_set_size=40, context_length=64,
                                     k_values=(1, 5))
    result = run_sparse_probing(sae, real_model, settings, tmp_path)
    details = {d["dataset_name"]: d for d in result["eval_result_details"]}
    assert len(details) == len(OFFLINE_DATASETS)
    for name, detail in details.items():
        assert detail["llm_test_accuracy"] >= 0.65, (name, detail)
    assert result["eval_result_metrics"]["llm"]["llm_test_accuracy"] >= 0.8
    assert result["eval_result_metrics"]["llm"]["llm_top_5_test_accuracy"] >= 0.6
