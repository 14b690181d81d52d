"""Core eval through sae_bench on the tiny model (real code paths), and the corrected reconstruction metrics."""

import json

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter
from sae_bench.evals.core.eval_output import CoreEvalOutput
from sae_lens import TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata

from saelib.activations import CacheKey, build_activation_cache
from saelib.evals import reconstruction_metrics, run_core, write_core
from tests.conftest import synthetic_tokens


def tiny_sae(d_in=64, d_sae=128, k=8, seed=0):
    torch.manual_seed(seed)
    meta = SAEMetadata(model_name="tiny-random", hook_name="blocks.0.hook_resid_post", context_size=32,
                       prepend_bos=True)
    return TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=meta))


def test_reconstruction_metrics_match_a_direct_computation(tiny_cache):
    sae = tiny_sae()
    with torch.no_grad():
        sae.b_dec += 50.0  # a large offset, like Gemma's outlier dimensions: the case sae-bench 0.6.0 gets wrong
    metrics = reconstruction_metrics(sae, tiny_cache, batch_size=200)
    x = tiny_cache.rows().double()
    with torch.no_grad():
        acts = sae.encode(x.float())
        x_hat = sae.decode(acts).double()
    ev = 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert metrics["explained_variance"] == pytest.approx(ev.item(), rel=1e-6)
    assert metrics["mse"] == pytest.approx((x - x_hat).pow(2).sum(-1).mean().item(), rel=1e-6)
    assert metrics["l0"] == pytest.approx(8.0)
    fired = (acts != 0).any(0)
    assert metrics["frac_dead"] == pytest.approx(1 - fired.double().mean().item())


def test_core_eval_runs_through_sae_bench_and_validates(tiny_model, tiny_cache, tmp_path):
    sae = tiny_sae()
    tokens = synthetic_tokens(n_seqs=32, ctx=32, seed=1)
    result = run_core(sae, tiny_model, tokens, tiny_cache, {1}, n_ce_tokens=256, batch_size_prompts=4)
    TypeAdapter(CoreEvalOutput).validate_python(result)
    assert result["eval_type_id"] == "core"
    metrics = result["eval_result_metrics"]
    ours = result["eval_result_unstructured"]["saelib_reconstruction_metrics"]
    assert metrics["reconstruction_quality"]["explained_variance"] == ours["explained_variance"]
    assert metrics["sparsity"]["l0"] == pytest.approx(8.0)
    assert np.isfinite(metrics["model_performance_preservation"]["ce_loss_score"])
    assert len(result["eval_result_details"]) == 128
    headline = write_core(tmp_path, result)
    assert json.loads((tmp_path / "metrics.json").read_text()) == headline
    assert json.loads((tmp_path / "evals" / "core.json").read_text())["eval_id"] == result["eval_id"]


def test_core_eval_with_too_few_sequences_is_a_clear_error(tiny_model, tiny_cache):
    with pytest.raises(ValueError, match="eval_ce_tokens: needs"):
        run_core(tiny_sae(), tiny_model, synthetic_tokens(n_seqs=4), tiny_cache, {1}, n_ce_tokens=4096)


@pytest.mark.real_model
def test_real_model_cache_rows_are_the_hook_activations(real_model, tmp_path):
    """The cache holds blocks.8.hook_resid_post of the real model at non-special positions, BOS excluded."""
    tok = real_model.tokenizer
    ids = tok(["The cat sat on the mat and looked out of the window at the rain."] * 2,
              return_tensors="np")["input_ids"]
    key = CacheKey("gemma-3-270m", "blocks.8.hook_resid_post", "test", 20, ids.shape[1])
    cache = build_activation_cache(real_model, ids, key, tmp_path, {tok.bos_token_id})
    _, direct = real_model.run_with_cache(torch.from_numpy(ids), names_filter=["blocks.8.hook_resid_post"])
    expected = direct["blocks.8.hook_resid_post"][:, 1:].reshape(-1, 640)[:20]
    torch.testing.assert_close(cache.rows(), expected, rtol=1e-4, atol=1e-2)
    assert cache.rows().norm(dim=-1).max() < 40_000  # no BOS row (BOS norm ≈ 83,000)
