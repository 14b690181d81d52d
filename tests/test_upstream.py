"""Each sae-bench 0.6.0 behaviour that ``saelib.evals.upstream`` works around, shown still present: a test here
fails when sae-bench changes it, and the workaround can go (see the module's list)."""

import inspect
from types import SimpleNamespace

import pytest
import torch

from saelib.evals import upstream


class _Model:
    def __init__(self, acts):
        self.acts = acts

    def run_with_cache(self, tokens, prepend_bos, names_filter, stop_at_layer, **kwargs):
        return None, {names_filter[0]: self.acts}


class _SAE:
    """Reconstructs ``acts`` as ``recon`` (whatever it is given), with 4 latents."""

    def __init__(self, recon):
        self.recon, self.device = recon, torch.device("cpu")
        self.cfg = SimpleNamespace(hook_name="blocks.0.hook_resid_post", hook_head_index=None, hook_layer=0, d_sae=4)

    def encode(self, x):
        return torch.relu(x[..., :4])

    def decode(self, acts):
        return self.recon


def test_sae_bench_core_explained_variance_is_wrong_for_activations_with_a_large_mean():
    from sae_bench.evals.core.main import get_sparsity_and_variance_metrics

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, generator=gen) * 3 + 100.0  # Gemma's residual stream has a large mean too
    x_hat = x + 2.0 * torch.randn(2, 16, 8, generator=gen)
    store = SimpleNamespace(get_batch_tokens=lambda n: torch.ones(2, 16, dtype=torch.long))
    metrics, _ = get_sparsity_and_variance_metrics(
        _SAE(x_hat), _Model(x), store, n_batches=1, compute_l2_norms=False, compute_sparsity_metrics=False,
        compute_variance_metrics=True, compute_featurewise_density_statistics=False, eval_batch_size_prompts=2,
        model_kwargs={})
    flat, flat_hat = x.reshape(-1, 8).double(), x_hat.reshape(-1, 8).double()
    ev = 1 - (flat - flat_hat).pow(2).sum() / (flat - flat.mean(0)).pow(2).sum()
    mse = (flat - flat_hat).pow(2).sum(-1).mean()
    assert 0.2 < ev.item() < 0.7  # the right answer: a poor reconstruction (1 − 2² / 3² ≈ 0.56 expected)
    assert metrics["explained_variance"] > ev.item() + 0.3  # sae_bench calls it ≈ perfect (drop the fix if this fails)
    assert metrics["mse"] < 0.1 * mse.item()  # per-token errors divided by the batch's 32 tokens


def test_replace_reconstruction_keeps_sae_benchs_values_beside_saelibs():
    scalars = {"reconstruction_quality": {"explained_variance": -3.0, "mse": 0.1, "cossim": 0.9},
               "model_behavior_preservation": {"kl_div_score": 0.9}, "model_performance_preservation": {}}
    raw = upstream.replace_reconstruction(scalars, {"explained_variance": 0.95, "mse": 2.0})
    assert raw == {"explained_variance": -3.0, "mse": 0.1}
    assert scalars["reconstruction_quality"] == {"explained_variance": 0.95, "mse": 2.0, "cossim": 0.9}
    scalars["model_behavior_preservation"]["kl_div_score"] = float("nan")
    with pytest.raises(FloatingPointError, match="kl_div_score"):
        upstream.replace_reconstruction(scalars, {"explained_variance": 0.95, "mse": 2.0})


def _balanced_task():
    gen = torch.Generator().manual_seed(0)
    train = {c: torch.randn(10, 6, generator=gen) + 3 * i for i, c in enumerate(("a", "b"))}
    test = {c: torch.randn(6, 6, generator=gen) + 3 * i for i, c in enumerate(("a", "b"))}
    return train, test


def test_sae_bench_probe_training_fails_its_own_shape_check_on_a_balanced_task(monkeypatch):
    from sae_bench.evals.sparse_probing import probe_training

    train, test = _balanced_task()
    with pytest.raises(Exception, match="train_dataset_size|dimension|shape|Type-check"):
        probe_training.train_probe_on_activations(train, test, select_top_k=None)  # upstream, unpatched
    monkeypatch.setattr(probe_training, "train_sklearn_probe",
                        upstream.sklearn_probe(probe_training.train_sklearn_probe, centre=True))
    _, accuracies = probe_training.train_probe_on_activations(train, test, select_top_k=None)
    assert min(accuracies.values()) > 0.9  # with its own memo, every check on, the probes train


def test_sae_bench_unlearning_still_reads_its_corpus_relative_to_the_working_directory():
    from sae_bench.evals.unlearning.utils import feature_activation

    assert 'open(f"./sae_bench/evals/unlearning/data/{forget_corpora}.jsonl")' in inspect.getsource(
        feature_activation)
