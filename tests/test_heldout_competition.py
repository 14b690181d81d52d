"""Held-out competition analysis against a dense reference."""

import torch

from saelib.evals.competition import competing_cos2, heldout_competition
from tests.test_evals import tiny_sae


def test_heldout_rates_match_dense_counts(tiny_cache):
    sae = tiny_sae(d_sae=32, k=4)
    stats = heldout_competition(sae, tiny_cache, batch_size=256)  # several batches of unequal size
    with torch.no_grad():
        mask = (sae.encode(tiny_cache.rows()) > 0).float()
    n = mask.shape[0]
    torch.testing.assert_close(stats.freq_F, mask.mean(0))
    co = torch.triu(mask.T @ mask, diagonal=1) / n
    i, j = stats.pairs()
    torch.testing.assert_close(stats.pair_rates, co[i, j])
    assert len(i) == int((co > 0).sum())


def test_competing_cos2_splits_pairs_by_threshold(tiny_cache):
    sae = tiny_sae(d_sae=32, k=4)
    stats = heldout_competition(sae, tiny_cache)
    low, high = competing_cos2(sae, stats, 0.0), competing_cos2(sae, stats, 0.5)
    assert low["n_competing_pairs"] == low["n_cofiring_pairs"] >= high["n_competing_pairs"] > 0
    W = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
    i, j = stats.pairs()
    keep = stats.scores() > 0.5
    expected = (W[i[keep]] * W[j[keep]]).sum(-1).square().mean().item()
    assert abs(high["competing_mean_cos2"] - expected) < 1e-6


def test_heldout_competition_bounds_memory_for_large_l0(tiny_cache, monkeypatch):
    """A dense ReLU-like SAE lists L0² pairs per token: chunks shrink and the sample stops at the event budget,
    and the rates over the counted tokens equal a direct count on those tokens."""
    import saelib.evals.competition as analysis

    sae = tiny_sae(k=64)  # 64 of 128 latents fire: 2,016 pairs per token
    monkeypatch.setattr(analysis, "PAIR_EVENTS_PER_CHUNK", 10_000)
    stats = analysis.heldout_competition(sae, tiny_cache, batch_size=500, max_pair_events=600_000)
    assert 0 < stats.n_tokens < tiny_cache.n_rows
    with torch.no_grad():
        fired = (sae.encode(tiny_cache.rows(0, stats.n_tokens)) > 0).double()
    co = fired.T @ fired / stats.n_tokens
    i_P, j_P = stats.pairs()
    assert torch.allclose(stats.pair_rates.double(), co[i_P, j_P], atol=1e-6)
    assert torch.allclose(stats.freq_F.double(), fired.mean(0), atol=1e-6)


def test_absorbers_are_counted_per_nested_prefix_of_the_run(tmp_path):
    import json

    from saelib.evals.absorption import absorbers_by_prefix

    run = tmp_path / "matryoshka_s0"
    (run / "evals").mkdir(parents=True)
    (run / "cfg.json").write_text(json.dumps({"architecture": "matryoshka_batchtopk", "d_sae": 64,
                                              "matryoshka_widths": "quarters"}))
    pairs = [{"letter": "a", "main_latent": 40, "absorbing_latent": 1}, {"letter": "a", "main_latent": 40,
             "absorbing_latent": 1}, {"letter": "b", "main_latent": 20, "absorbing_latent": 3},
             {"letter": "b", "main_latent": 20, "absorbing_latent": 63}]
    (run / "evals" / "absorption.json").write_text(json.dumps({"eval_result_unstructured": {"absorbing_pairs": pairs}}))
    counts = absorbers_by_prefix(run)  # quarters at 64: prefixes 4, 16, 64
    assert counts == {"widths": [4, 16, 64], "absorbing": [2, 0, 1], "main": [0, 0, 2]}
    assert absorbers_by_prefix(run, [2, 64])["absorbing"] == [1, 2]
