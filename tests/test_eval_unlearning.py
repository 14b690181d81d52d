"""Unlearning eval: the offline proxy end to end on a tiny model, its shortcuts, and the online mode's refusal."""

import dataclasses
import time

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter
from sae_bench.evals.unlearning.eval_output import UnlearningEvalOutput

from saelib.evals.common import EvalError, EvalUnavailable
from saelib.evals.unlearning import (
    SMOKE, UnlearningSettings, activation_frequency, run_unlearning, tail_token_losses,
)
from tests.test_evals import tiny_sae

TINY = UnlearningSettings(
    retain_thresholds=(0.05, 0.5), n_features_list=(0, 4), multipliers=(0, 5), context_size=32,
    select_tokens=1_500, score_tokens=300, min_doc_tokens=8, lm_batch_size=8,
)


@pytest.fixture(scope="module")
def proxy_result(tiny_text_model, tmp_path_factory):
    sae = tiny_sae()
    return run_unlearning(sae, tiny_text_model, TINY, tmp_path_factory.mktemp("unl"))


def test_proxy_end_to_end_validates_and_keeps_one_row_per_grid_point(proxy_result):
    TypeAdapter(UnlearningEvalOutput).validate_python(proxy_result)
    assert proxy_result["eval_type_id"] == "unlearning_proxy"
    u = proxy_result["eval_result_unstructured"]
    table = u["settings_table"]
    assert len(table) == 2 * 2 * 2
    assert {(r["retain_threshold"], r["n_features"], r["multiplier"]) for r in table} == {
        (t, n, m) for t in TINY.retain_thresholds for n in TINY.n_features_list for m in TINY.multipliers}
    assert proxy_result["eval_config"]["multipliers"] == [0, 5]
    score = proxy_result["eval_result_metrics"]["unlearning"]["unlearning_score"]
    admissible = [r["score"] for r in table if r["admissible"]]
    assert score == (max(0.0, max(admissible)) if admissible else 0.0)
    assert u["shortcut_max_abs_diff_nats"] < 1e-3


def test_no_latents_is_exactly_zero_and_a_clamp_changes_the_loss(proxy_result):
    table = proxy_result["eval_result_unstructured"]["settings_table"]
    for row in table:
        if row["n_features_selected"] == 0:  # the control: no latent selected → the hook is the identity
            assert row["forget_loss_rise"] == 0.0 and row["retain_loss_rise"] == 0.0 and row["score"] == 0.0
    clamped = [r for r in table if r["n_features_selected"] > 0 and r["multiplier"] == 5]
    assert clamped and all(r["forget_rows_run"] > 0 for r in clamped)
    assert any(abs(r["forget_loss_rise"]) > 1e-4 for r in clamped)  # would catch a hook that is never applied
    ablated = [r for r in table if r["n_features_selected"] > 0 and r["multiplier"] == 0]
    assert any(r["forget_loss_rise"] != 0.0 for r in ablated)  # multiplier 0 = ablation in SAEBench, not a no-op


def test_proxy_is_deterministic_and_reuses_the_lm_side(tiny_text_model, tmp_path):
    settings = dataclasses.replace(TINY, n_features_list=(4,), multipliers=(5,))
    a = run_unlearning(tiny_sae(), tiny_text_model, settings, tmp_path)
    stored = list(tmp_path.glob("unlearning_proxy-*.pt"))
    assert len(stored) == 1
    b = run_unlearning(tiny_sae(), tiny_text_model, settings, tmp_path)
    assert a["eval_result_unstructured"]["settings_table"] == b["eval_result_unstructured"]["settings_table"]


def test_start_at_layer_shortcut_equals_a_full_forward(tiny_text_model):
    model = tiny_text_model
    tokens = torch.randint(3, 5000, (3, 16))
    tokens[:, 0] = model.tokenizer.bos_token_id
    full = model(tokens, return_type="loss", loss_per_token=True)
    _, cache = model.run_with_cache(tokens, stop_at_layer=1, names_filter="blocks.0.hook_resid_post")
    mask = torch.ones(3, 15, dtype=torch.bool)
    mask[1, :4] = False  # only some positions, as the proxy asks after the first changed one
    tail = tail_token_losses(model, cache["blocks.0.hook_resid_post"], tokens, 1, mask)
    torch.testing.assert_close(tail, full[mask], rtol=1e-5, atol=1e-5)


def test_activation_frequency_matches_sae_bench(tiny_text_model):
    from sae_bench.sae_bench_utils.activation_collection import (
        get_bos_pad_eos_mask, get_feature_activation_sparsity,
    )
    from sae_bench.sae_bench_utils.general_utils import load_and_format_sae

    model = tiny_text_model
    _, sae, _ = load_and_format_sae("saelib", tiny_sae(), "cpu")
    tokens = torch.randint(3, 5000, (4, 16))
    tokens[:, 0] = model.tokenizer.bos_token_id
    tokens[2, 10:] = model.tokenizer.pad_token_id
    ref = get_feature_activation_sparsity(tokens, model, sae, batch_size=2, layer=0,
                                          hook_name="blocks.0.hook_resid_post", mask_bos_pad_eos_tokens=True)
    _, cache = model.run_with_cache(tokens, stop_at_layer=1, names_filter="blocks.0.hook_resid_post")
    rows = cache["blocks.0.hook_resid_post"][get_bos_pad_eos_mask(tokens, model.tokenizer)]
    np.testing.assert_allclose(activation_frequency(sae, rows), ref.numpy(), atol=1e-6)


def test_online_mode_offline_is_unavailable_fast_with_a_clear_message(tiny_text_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    with pytest.raises(EvalUnavailable) as err:
        run_unlearning(tiny_sae(), tiny_text_model, UnlearningSettings(mode="sae_bench"), tmp_path)
    assert time.time() - start < 10
    msg = str(err.value)
    assert "gemma-2-2b-it" in msg and repr(tiny_text_model.cfg.model_name) in msg
    assert str(tmp_path / "sae_bench_unlearning" / "bio-forget-corpus.jsonl") in msg
    assert "Hugging Face hub" in msg and "HF_HUB_OFFLINE" in msg
    assert "mode='proxy'" in msg
    assert not list(tmp_path.iterdir())  # nothing was started


@pytest.mark.parametrize("change, name", [
    ({"multipliers": (-5,)}, "multipliers"),
    ({"multipliers": (2.5,)}, "multipliers"),
    ({"mode": "online"}, "mode"),
    ({"n_features_list": ()}, "n_features_list"),
    ({"retain_thresholds": ()}, "retain_thresholds"),
    ({"retain_thresholds": (1.5,)}, "retain_thresholds"),
    ({"score_tokens": 0}, "score_tokens"),
    ({"forget_set": "no_such_set"}, "forget_set"),
])
def test_bad_input_names_the_parameter(tiny_text_model, tmp_path, change, name):
    with pytest.raises(EvalError, match=rf"^{name}: expected"):
        run_unlearning(tiny_sae(), tiny_text_model, dataclasses.replace(TINY, **change), tmp_path)


@pytest.mark.real_model
def test_smoke_on_the_real_model(real_model, tmp_path):
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)  # a random SAE at the real hook: CI has no trained run (the flow, not the score, is tested)
    meta = SAEMetadata(model_name="gemma-3-270m", hook_name="blocks.8.hook_resid_post", context_size=128,
                       prepend_bos=True)
    sae = TopKSAE(TopKSAEConfig(d_in=640, d_sae=512, k=16, metadata=meta))
    result = run_unlearning(sae, real_model, SMOKE, tmp_path)
    TypeAdapter(UnlearningEvalOutput).validate_python(result)
    u = result["eval_result_unstructured"]
    assert len(u["settings_table"]) == len(SMOKE.retain_thresholds) * len(SMOKE.n_features_list) * len(
        SMOKE.multipliers)
    assert u["shortcut_max_abs_diff_nats"] < 1e-3
    assert 1.0 < u["baseline_loss"]["forget"] < 6.0  # real weights, ordinary text


def test_selection_and_scoring_texts_are_disjoint_and_scoring_text_is_held_out():
    from saelib.corpus import split_of
    from saelib.evals.unlearning import proxy_texts

    texts = proxy_texts(UnlearningSettings())
    assert len(texts["forget_score"]) >= 30 and len(texts["retain_score"]) >= 1000
    for side in ("forget", "retain"):
        assert not set(texts[f"{side}_select"]) & set(texts[f"{side}_score"])
        assert all(split_of(t) == "eval" for t in texts[f"{side}_score"])  # never in the SAE's training split
    assert not set(texts["forget_score"]) & set(texts["retain_score"])


def test_sae_bench_reads_the_forget_corpus_through_a_link_and_the_cwd_is_restored(tmp_path):
    import os

    from saelib.evals.unlearning import FORGET_CORPUS_FILE
    from saelib.evals.upstream import unlearning_data_layout

    corpus = tmp_path / "mine.jsonl"
    corpus.write_text('{"text": "x"}\n')
    cwd = os.getcwd()
    with unlearning_data_layout(corpus, tmp_path / "art", FORGET_CORPUS_FILE):
        # the CWD-relative path sae_bench's feature_activation.get_forget_retain_data opens
        assert open("./sae_bench/evals/unlearning/data/bio-forget-corpus.jsonl").read() == '{"text": "x"}\n'
    assert os.getcwd() == cwd
