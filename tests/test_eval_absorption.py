"""Absorption (first letter) through sae_bench on tiny models: end to end, probe reuse, a crafted absorbing SAE,
and clear errors for bad settings."""

import copy
from dataclasses import replace

import pandas as pd
import pytest
import torch
from pydantic import TypeAdapter
from sae_bench.evals.absorption.eval_output import AbsorptionEvalOutput
from sae_lens import TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata

import saelib.evals.absorption as absorption
from saelib.evals.absorption import AbsorptionSettings, first_letter, probe_split, run_absorption, vocab_sample
from saelib.evals.common import EvalError, EvalUnavailable
from tests.test_evals import tiny_sae as _tiny_topk


def tiny_sae(d_in=64, seed=0):
    """tests.test_evals.tiny_sae with unit-norm decoder rows (sae_bench's absorption assumes them; a TopK SAE
    without ``rescale_acts_by_decoder_norm`` cannot fold them)."""
    sae = _tiny_topk(d_in=d_in, seed=seed)
    with torch.no_grad():
        sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True)
    return sae

# A random model knows no spelling: its probe's test F1 is chance level, so the end-to-end test lowers
# sae_bench's gate (F1 > 0.6 for >= 20 letters) to F1 > 0 for >= 2 letters. The crafted model below does know
# the first letters and passes the real gate.
TINY = AbsorptionSettings(vocab_sample_size=300, probe_num_epochs=10, k_sparse_probe_num_epochs=10, max_k_value=3,
                          min_GT_probe_f1=0.0, min_feats_for_eval=2, llm_batch_size=16)


def test_end_to_end_validates_and_reuses_the_probe(tiny_text_model, tmp_path, monkeypatch):
    calls = []
    original = absorption.train_probe
    probe_trainings = []
    import sae_bench.evals.absorption.common as common

    real_create = common.create_and_train_probe
    monkeypatch.setattr(common, "create_and_train_probe",
                        lambda *a, **k: (probe_trainings.append(1), real_create(*a, **k))[1])
    monkeypatch.setattr(absorption, "train_probe", lambda *a, **k: (calls.append(1), original(*a, **k))[1])

    first = run_absorption(tiny_sae(), tiny_text_model, TINY, tmp_path)
    TypeAdapter(AbsorptionEvalOutput).validate_python(first)
    assert first["eval_type_id"] == "absorption_first_letter"
    assert first["eval_config"]["model_name"] == tiny_text_model.cfg.model_name
    assert first["eval_config"]["min_GT_probe_f1"] == 0.0
    extra = first["eval_result_unstructured"]
    assert extra["saelib_settings"]["vocab_sample_size"] == 300
    assert extra["wall_time_s"] > 0
    assert len(first["eval_result_details"]) == extra["letters_passing_probe"] >= 2
    mean = first["eval_result_metrics"]["mean"]
    assert 0.0 <= mean["mean_absorption_fraction_score"] <= 1.0
    assert first["sae_bench_commit_hash"].startswith("sae-bench==")
    probe_dirs = list((tmp_path / "absorption").iterdir())
    assert len(probe_dirs) == 1
    probe_file = next(probe_dirs[0].rglob("probe.pth"))
    mtime = probe_file.stat().st_mtime_ns
    stored = probe_dirs[0] / "absorption_prompt_acts.npz"
    assert stored.exists()

    second = run_absorption(tiny_sae(seed=1), tiny_text_model, TINY, tmp_path)  # another SAE: probe reused
    TypeAdapter(AbsorptionEvalOutput).validate_python(second)
    assert len(probe_trainings) == 1 and len(calls) == 2
    assert probe_file.stat().st_mtime_ns == mtime
    assert list((tmp_path / "absorption").iterdir()) == probe_dirs  # SAE-side files are not kept

    again = run_absorption(tiny_sae(), tiny_text_model, TINY, tmp_path)  # same inputs, same numbers
    assert again["eval_result_metrics"] == first["eval_result_metrics"]
    assert again["eval_result_details"] == first["eval_result_details"]


def test_stop_at_layer_proxy_gives_the_full_model_activations(tiny_text_model):
    prompts = ["\n cat has the first letter: C\n dog has the first letter:", "\n ant has the first letter: A\n bee "
               "has the first letter:"]
    hook = "blocks.0.hook_resid_post"
    _, full = tiny_text_model.run_with_cache(prompts, names_filter=[hook])
    _, fast = absorption._StopAtLayer(tiny_text_model, hook, 0, True).run_with_cache(prompts, names_filter=[hook])
    torch.testing.assert_close(fast[hook], full[hook])


# ------------------------------------------------------------------------------------- crafted absorption

SEED = 42
N_WORDS = 600
ABSORBED_PER_LETTER = 4
SCALE = 10.0  # residual-stream scale: sae_bench's probe (Adam, lr 1e-2 decaying) needs inputs well above unit norm
LETTERS = "abcdefghijklmnopqrstuvwxyz"
CRAFTED = AbsorptionSettings(vocab_sample_size=N_WORDS, seed=SEED, k_sparse_probe_num_epochs=20,
                             max_k_value=3, llm_batch_size=32)  # sae_bench's own gate: F1 > 0.6 for >= 20 letters


@pytest.fixture(scope="module")
def crafted(tiny_text_model):
    """A model whose hook activation at the word is its first-letter direction u_L (plus small noise), and a
    few test words whose activation also has a word-specific direction v_w (orthogonal to everything else).

    The hook is ``blocks.0.hook_resid_post`` with attention/MLP outputs and position embeddings zeroed, so the
    activation is the token embedding. SAEs are TopK with k = 1, latents 0..25 are "general" letter latents
    (encoder = decoder = u_L); latent 26 + m belongs to absorbed word m.
    """
    torch.manual_seed(0)
    model = copy.deepcopy(tiny_text_model)
    d = model.cfg.d_model
    basis = torch.linalg.qr(torch.randn(d, d))[0]  # orthonormal columns
    u = basis[:, :26].T  # letter directions
    words = vocab_sample(model.tokenizer, N_WORDS, SEED, CRAFTED.min_words_per_letter, CRAFTED)
    test = probe_split(words, CRAFTED)[1]
    counts = pd.Series([first_letter(w) for w in test]).value_counts()
    letters = list(counts.index[:5])  # the five letters with the most test words
    absorbed = [w for c in letters for w in [w for w in test if first_letter(w) == c][:ABSORBED_PER_LETTER]]
    v = basis[:, 26:26 + len(absorbed)].T
    with torch.no_grad():
        for block in model.blocks:
            for p in (block.attn.W_O, block.attn.b_O, block.mlp.W_out, block.mlp.b_out):
                p.zero_()
        model.pos_embed.W_pos.zero_()
        for w in words:
            (tok,) = model.tokenizer(w, add_special_tokens=False)["input_ids"]
            model.embed.W_E[tok] = SCALE * (u[LETTERS.index(first_letter(w))] + 0.05 * torch.randn(d))
        for m, w in enumerate(absorbed):
            (tok,) = model.tokenizer(w, add_special_tokens=False)["input_ids"]
            model.embed.W_E[tok] += SCALE * v[m]
    return model, u, v, absorbed, letters


def _crafted_sae(u, v, absorbed, absorbing: bool, aligned: bool = True):
    d, d_sae = u.shape[1], 128
    meta = SAEMetadata(model_name="tiny-random", hook_name="blocks.0.hook_resid_post", context_size=32,
                       prepend_bos=True)
    sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=d_sae, k=1, metadata=meta))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        filler = torch.randn(d_sae, d, generator=g)
        sae.W_dec.copy_(filler / filler.norm(dim=-1, keepdim=True))
        sae.W_enc.zero_()
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.W_dec[:26] = u
        sae.W_enc[:, :26] = u.T
        for m, w in enumerate(absorbed):
            u_l = u[LETTERS.index(first_letter(w))]
            if absorbing:  # fires instead of the letter latent on this word, and carries the letter direction
                direction = (u_l + v[m]) / 2 ** 0.5
                sae.W_enc[:, 26 + m] = direction
                # aligned=False: the same firing, but the decoder turned away from the letter (an orthogonality
                # penalty's doing): SAEBench's cosine filter no longer sees an absorber
                sae.W_dec[26 + m] = direction if aligned else v[m]
            else:  # a word-specific latent that never wins the top-1: the letter latent fires on every word
                sae.W_dec[26 + m] = v[m]
    return sae


def test_an_absorbing_sae_scores_worse_than_a_clean_one(crafted, tmp_path):
    model, u, v, absorbed, letters = crafted
    clean = run_absorption(_crafted_sae(u, v, absorbed, absorbing=False), model, CRAFTED, tmp_path)
    probe_dir = next((tmp_path / "absorption").iterdir())
    test_df = pd.read_csv(next(probe_dir.rglob("test_df.csv")), keep_default_na=False)
    assert set(absorbed) <= set(test_df["token"])  # the absorbed words are test words, as intended
    bad = run_absorption(_crafted_sae(u, v, absorbed, absorbing=True), model, CRAFTED, tmp_path)
    for result in (clean, bad):
        TypeAdapter(AbsorptionEvalOutput).validate_python(result)
        assert result["eval_result_unstructured"]["letters_passing_probe"] >= 20  # the real gate passes
    m_clean, m_bad = clean["eval_result_metrics"]["mean"], bad["eval_result_metrics"]["mean"]
    assert m_clean["mean_absorption_fraction_score"] == 0.0
    assert m_clean["mean_full_absorption_score"] == 0.0
    assert m_bad["mean_absorption_fraction_score"] > 0.02
    assert m_bad["mean_full_absorption_score"] > 0.02
    assert m_clean["mean_num_split_features"] == m_bad["mean_num_split_features"] == 1.0
    by_letter = {r["first_letter"]: r for r in bad["eval_result_details"]}
    for c in letters:  # each absorbed word is a full absorption of its letter; other letters are untouched
        assert by_letter[c]["num_full_absorption"] == ABSORBED_PER_LETTER
        assert by_letter[c]["full_absorption_rate"] == pytest.approx(
            ABSORBED_PER_LETTER / by_letter[c]["num_probe_true_positives"])
    assert all(r["num_full_absorption"] == 0 for c, r in by_letter.items() if c not in letters)
    # the firing-based measure sees the same words: the letter latent silent where the probe finds the letter
    firing = bad["eval_result_unstructured"]["firing_per_letter"]
    for c in letters:
        assert firing[c]["main_silent_rate"] == pytest.approx(by_letter[c]["full_absorption_rate"])
        assert firing[c]["silent_uncounted_rate"] == 0.0
    assert clean["eval_result_unstructured"]["saelib_metrics"]["firing"]["mean_main_silent_rate"] == 0.0

    # the measurement trap: the same latents fire, only the absorbers' decoders are turned away from the probe
    hidden = run_absorption(_crafted_sae(u, v, absorbed, absorbing=True, aligned=False), model, CRAFTED, tmp_path)
    assert hidden["eval_result_metrics"]["mean"]["mean_absorption_fraction_score"] == 0.0  # SAEBench sees none
    assert hidden["eval_result_metrics"]["mean"]["mean_full_absorption_score"] == 0.0
    firing_hidden = hidden["eval_result_unstructured"]["firing_per_letter"]
    for c in letters:  # firing does
        assert firing_hidden[c]["main_silent_rate"] == pytest.approx(firing[c]["main_silent_rate"])
        assert firing_hidden[c]["silent_uncounted_rate"] == pytest.approx(firing[c]["main_silent_rate"])


# ------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("change, parameter", [
    ({"vocab_sample_size": 10**7}, "vocab_sample_size"),
    ({"vocab_sample_size": 10}, "vocab_sample_size"),
    ({"min_feats_for_eval": 27}, "min_feats_for_eval"),
    ({"prompt_template": "first letter of it:"}, "prompt_template"),
    ({"prompt_token_pos": -3}, "prompt_token_pos"),
    ({"llm_batch_size": 0}, "llm_batch_size"),
])
def test_bad_settings_name_the_parameter(tiny_text_model, tmp_path, change, parameter):
    with pytest.raises(EvalError, match=f"^{parameter}: expected"):
        run_absorption(tiny_sae(), tiny_text_model, replace(TINY, **change), tmp_path)


def test_bad_sae_inputs_name_the_parameter(tiny_text_model, tmp_path):
    sae = tiny_sae()
    sae.cfg.metadata.hook_name = "blocks.0.hook_mlp_out"
    with pytest.raises(EvalError, match="hook_name: expected blocks.<layer>.hook_resid_post"):
        run_absorption(sae, tiny_text_model, TINY, tmp_path)
    with pytest.raises(EvalError, match="^sae.cfg.d_in"):
        run_absorption(tiny_sae(d_in=32), tiny_text_model, TINY, tmp_path)
    with pytest.raises(EvalError, match="^sae.W_dec: expected unit-norm decoder rows"):
        run_absorption(_tiny_topk(), tiny_text_model, TINY, tmp_path)  # TopK, no rescale: cannot fold


def test_too_few_letters_is_unavailable_with_the_count(tiny_text_model, tmp_path):
    with pytest.raises(EvalUnavailable, match="of 26 first-letter probes reach F1 > 0.99"):
        run_absorption(tiny_sae(), tiny_text_model, replace(TINY, min_GT_probe_f1=0.99, min_feats_for_eval=20),
                       tmp_path)


def test_absorbing_pairs_name_main_and_absorbing_latents():
    import pandas as pd

    from saelib.evals.absorption import absorbing_pairs

    raw = pd.DataFrame([
        {"letter": "a", "token": " apple", "split_feats": [3], "top_projection_feat": 7, "absorption_fraction": 0.9,
         "is_full_absorption": True},
        {"letter": "a", "token": " ant", "split_feats": [3], "top_projection_feat": 3, "absorption_fraction": 0.0,
         "is_full_absorption": False},  # no absorption: no pair
        {"letter": "b", "token": " bee", "split_feats": [4, 5], "top_projection_feat": 9, "absorption_fraction": 0.4,
         "is_full_absorption": False},
    ])
    pairs = absorbing_pairs(raw)
    assert [(p["main_latent"], p["absorbing_latent"]) for p in pairs] == [(3, 7), (4, 9), (5, 9)]
    assert pairs[0]["is_full_absorption"] and not pairs[1]["is_full_absorption"]
    assert absorbing_pairs(raw, limit=2) == pairs[:2]
