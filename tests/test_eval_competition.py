"""The competition eval on a tiny SAE: counts per τ against a direct computation, the graph, contexts, errors."""

import numpy as np
import pytest
import torch

from saelib.evals.common import EvalError
from saelib.evals.competition import CompetitionSettings, _row_token_positions, _validate, analyse
from tests.test_evals import tiny_sae


class CharTokenizer:
    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


def test_competition_counts_match_a_dense_computation(tiny_cache):
    sae = tiny_sae(k=8)
    settings = CompetitionSettings(taus=(0.1, 0.5), reference_tau=0.5, n_top_pairs=5, n_context_pairs=2,
                                   n_contexts=2, context_tokens=3, dense_freq=0.3, dataset="x", context_size=32, eval_tokens=1500)
    tokens = np.arange(60 * 32).reshape(60, 32) % 500 + 3
    tokens[:, 0] = 1
    rows = _row_token_positions(tokens, {1}, tiny_cache.n_rows)
    result = analyse(sae, tiny_cache, settings, row_tokens=rows, tokenizer=CharTokenizer())
    with torch.no_grad():
        fired = (sae.encode(tiny_cache.rows()) > 0).double()
    n = fired.shape[0]
    co = fired.T @ fired / n
    p = fired.mean(0)
    score = co / torch.minimum(p[:, None], p[None, :]).clamp_min(1e-12)
    upper = torch.triu(torch.ones_like(score, dtype=torch.bool), diagonal=1) & (co > 0)
    for tau in (0.1, 0.5):
        expected = int((score[upper] > tau).sum())
        assert result["eval_result_metrics"][f"tau_{tau:g}"]["n_competing_pairs"] == expected
    graph = result["eval_result_metrics"]["graph"]
    dense = p > settings.dense_freq
    plain = upper & ~dense[:, None] & ~dense[None, :]
    assert graph["n_edges"] == int((score[plain] > 0.5).sum())
    assert graph["competing_pairs_with_dense_latent"] == int((score[upper & ~plain] > 0.5).sum())
    hist = result["eval_result_unstructured"]["degree_histogram"]
    assert sum(d * c for d, c in zip(hist["degree"], hist["latents"])) == 2 * graph["n_edges"]
    pairs = result["eval_result_unstructured"]["top_pairs"]
    assert pairs and all(pp["score"] > 0.5 and pp["cofirings"] >= 5 for pp in pairs)
    assert pairs[0]["score"] >= pairs[-1]["score"]
    first = pairs[0]
    assert len(first["contexts"]) == 2 and first["contexts"][0]["token"].startswith("<")
    assert sum(result["eval_result_unstructured"]["score_histogram"]["counts"]) == int(upper.sum())


def test_row_positions_skip_special_tokens():
    tokens = np.array([[1, 5, 6, 1, 7], [1, 8, 9, 10, 11]])
    rows, _ = _row_token_positions(tokens, {1}, 5)
    assert rows.tolist() == [[0, 1], [0, 2], [0, 4], [1, 1], [1, 2]]


def test_bad_settings_are_clear_errors():
    with pytest.raises(EvalError, match="taus: expected"):
        _validate(CompetitionSettings(taus=(1.5,)))
    with pytest.raises(EvalError, match="n_contexts: expected"):
        _validate(CompetitionSettings(n_contexts=-1))
