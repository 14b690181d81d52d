"""The orthogonal SAEs act: λ = 0 is TopK bit for bit; the SGO gradient reaches exactly the competing rows and
lowers their cos²; the chunked pair loss matches an eager reference; configs reject bad values by name."""

import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.sae import TrainStepInput

from saelib import run_files
from saelib.config import ConfigError, build_config
from saelib.saes import (
    ORTH_LOSS, SGOTopKTrainingSAE, SGOTopKTrainingSAEConfig, chunked_max_cos2, competition_rows, gram_offdiag_cos2,
    _row_combinations, draw_pairs, latent_balanced_weights, multinomial_table, sampled_pair_cos2, weighted_pair_cos2,
)
from saelib.train import train_sae
from tests.test_train import crash_then_resume, tiny_cfg


def eager_pair_cos2(W, i, j, w):
    W_hat = W / W.norm(dim=-1, keepdim=True)
    return (w * (W_hat[i] * W_hat[j]).sum(-1).square()).sum() / w.sum()


def test_sparse_pair_loss_matches_eager_reference_and_finite_differences():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(30, 12, generator=g, dtype=torch.float64, requires_grad=True)
    i = torch.cat([torch.randint(0, 15, (25,), generator=g), torch.tensor([3, 3, 20, 3])])  # rows shared, a pair repeated
    j = torch.cat([torch.randint(15, 30, (25,), generator=g), torch.tensor([20, 5, 3, 20])])
    w = torch.rand(29, generator=g, dtype=torch.float64)
    ours = weighted_pair_cos2(W, i, j, w)
    (grad_ours,) = torch.autograd.grad(ours, W)
    ref = eager_pair_cos2(W, i, j, w)
    (grad_ref,) = torch.autograd.grad(ref, W)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(grad_ours, grad_ref)
    assert torch.autograd.gradcheck(lambda W_: weighted_pair_cos2(W_, i, j, w), (W,))
    # a second backward through the same graph gives the same gradient (nothing saved is overwritten)
    again = weighted_pair_cos2(W, i, j, w)
    first, = torch.autograd.grad(again, W, retain_graph=True)
    second, = torch.autograd.grad(again, W)
    torch.testing.assert_close(first, grad_ref)
    torch.testing.assert_close(second, grad_ref)


def eager_per_latent_cos2(W, i, j, s):
    """Mean over latents with a competitor of each one's score-weighted mean cos² to its competitors, by loops."""
    W_hat = W / W.norm(dim=-1, keepdim=True)
    per_latent = []
    for a in sorted(set(i.tolist()) | set(j.tolist())):
        mine = [(int(b), float(w)) for x, y, w in zip(i, j, s) for c, b in ((x, y), (y, x)) if c == a]
        num = sum(w * (W_hat[a] @ W_hat[b]).square() for b, w in mine)
        per_latent.append(num / sum(w for _, w in mine))
    return torch.stack(per_latent).mean()


def test_per_latent_normalisation_is_the_mean_over_latents_and_its_gradient_matches():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(12, 7, generator=g, dtype=torch.float64, requires_grad=True)
    i = torch.tensor([0, 0, 0, 0, 1, 2, 5, 3])  # latent 0 competes with four others: a hub
    j = torch.tensor([1, 2, 3, 4, 2, 9, 6, 4])
    s = torch.rand(8, generator=g, dtype=torch.float64)
    w = latent_balanced_weights(i, j, s, 12)
    assert w.sum().item() == pytest.approx(8.0)  # the number of latents with a competitor
    ours = weighted_pair_cos2(W, i, j, w)
    ref = eager_per_latent_cos2(W, i, j, s)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, W)[0], torch.autograd.grad(ref, W)[0])
    # the hub's four pairs weigh less than under the per-pair mean
    assert (w[:4] / w.sum()).sum() < (s[:4] / s.sum()).sum()


def test_sgo_penalty_uses_the_chosen_normalisation(tmp_path, tiny_cache):
    common = dict(architecture="sgo_topk", orth_pen=1.0, competition_threshold=0.02, competition_warmup_steps=2,
                  competition_sample_pairs=0)
    cfg = tiny_cfg(tmp_path / "lat", competition_normalisation="latents", **common)
    assert cfg.run_name.endswith("_perlatent_s0") and cfg.training_key()["competition_normalisation"] == "latents"
    runs = {norm: train_sae(tiny_cfg(tmp_path / norm, competition_normalisation=norm, **common), tiny_cache)
            for norm in ("pairs", "latents")}
    assert not torch.equal(runs["pairs"].W_dec, runs["latents"].W_dec)


def test_a_low_precision_decoder_gets_the_penalty_in_float32():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(20, 8, generator=g)
    i, j, w = torch.tensor([0, 1, 2, 2]), torch.tensor([5, 6, 7, 7]), torch.rand(4, generator=g)
    for dtype in (torch.bfloat16, torch.float16):
        low = W.to(dtype).requires_grad_(True)
        ours = weighted_pair_cos2(low, i, j, w)
        ref = eager_pair_cos2(low.detach().float().requires_grad_(True), i, j, w)
        (grad,) = torch.autograd.grad(ours, low)
        assert grad.dtype == dtype and grad.shape == low.shape
        torch.testing.assert_close(ours.float(), ref, atol=1e-2, rtol=1e-2)


def test_gram_penalty_matches_its_definition_and_is_zero_for_orthonormal_rows():
    W = torch.randn(6, 10, dtype=torch.float64)
    W_hat = W / W.norm(dim=-1, keepdim=True)
    cos2 = (W_hat @ W_hat.T).square()
    torch.testing.assert_close(gram_offdiag_cos2(W), (cos2.sum() - 6) / 30)
    assert gram_offdiag_cos2(torch.eye(6, 10)).item() == pytest.approx(0.0)


def test_ortsae_penalty_is_the_mean_within_chunk_max():
    W = torch.randn(8, 5, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    W_hat = W / W.norm(dim=-1, keepdim=True)
    expected = 0.0
    for chunk in (perm[:4], perm[4:]):
        cos2 = (W_hat[chunk] @ W_hat[chunk].T).square().fill_diagonal_(0)
        expected += cos2.max(-1).values.sum().item()
    assert chunked_max_cos2(W, 4, g).item() == pytest.approx(expected / 8)


def make_sgo(d_in=8, d_sae=6, k=2, orth_pen=1.0, tau=0.5):
    torch.manual_seed(0)
    return SGOTopKTrainingSAE(SGOTopKTrainingSAEConfig(
        d_in=d_in, d_sae=d_sae, k=k, orth_pen=orth_pen, competition_threshold=tau, competition_warmup_steps=0,
        competition_decay=0.0, competition_window=1))


def test_sgo_gradient_reaches_only_the_competing_pair_and_lowers_its_cos2():
    sae = make_sgo()
    with torch.no_grad():  # latents 1 and 4 overlap; every token fires exactly them
        sae.W_dec[4] = sae.W_dec[1] + 0.3 * sae.W_dec[4]
    acts = torch.zeros(16, 6)
    acts[:, 1], acts[:, 4] = 1.0, 0.5
    step = TrainStepInput(sae_in=torch.randn(16, 8), coefficients={}, dead_neuron_mask=None,
                          n_training_steps=0, is_logging_step=False)
    orth = sae.calculate_aux_loss(step, acts, acts, torch.zeros(16, 8))[ORTH_LOSS]
    assert sae.orth_metrics["n_competing_pairs"] == 1
    (grad,) = torch.autograd.grad(orth, sae.W_dec)
    touched = grad.abs().sum(-1) > 0
    assert touched.tolist() == [False, True, False, False, True, False]

    def cos2(W):
        a, b = W[1] / W[1].norm(), W[4] / W[4].norm()
        return (a @ b).square().item()

    before = cos2(sae.W_dec.detach())
    assert cos2(sae.W_dec.detach() - 0.01 * grad) < before


def test_sgo_with_lambda_zero_is_topk_bit_for_bit(tmp_path, tiny_cache):
    topk = train_sae(tiny_cfg(tmp_path / "topk"), tiny_cache)
    sgo_cfg = tiny_cfg(tmp_path / "sgo", architecture="sgo_topk", orth_pen=0.0, competition_threshold=0.02,
                       competition_warmup_steps=2)
    sgo = train_sae(sgo_cfg, tiny_cache)
    for name, value in topk.state_dict().items():
        assert torch.equal(sgo.state_dict()[name], value), name
    history = run_files.read_history(sgo_cfg.run_dir)
    assert history["metrics/n_competing_pairs"].iloc[-1] > 0  # the statistics ran, the penalty was zero


def test_sgo_with_lambda_changes_the_weights_and_lowers_competing_cos2(tmp_path, tiny_cache):
    common = dict(architecture="sgo_topk", competition_threshold=0.02, competition_warmup_steps=2,
                  training_tokens=4096)
    runs = {lam: train_sae(tiny_cfg(tmp_path / str(lam), orth_pen=lam, **common), tiny_cache)
            for lam in (0.0, 1.0)}
    assert not torch.equal(runs[0.0].W_dec, runs[1.0].W_dec)
    final = {lam: run_files.read_history(tiny_cfg(tmp_path / str(lam), orth_pen=lam, **common).run_dir)
             ["metrics/competing_mean_cos2"].iloc[-1] for lam in runs}
    assert final[1.0] < final[0.0]


@pytest.mark.parametrize("architecture, extra", [("sgo_topk", {"competition_warmup_steps": 2}),
                                                 ("ortsae_topk", {"orth_chunk_size": 32}), ("gram_topk", {})])
def test_orthogonal_saes_save_as_topk_and_resume_exactly(tmp_path, tiny_cache, monkeypatch, architecture, extra):
    cfg = tiny_cfg(tmp_path / "full", architecture=architecture, orth_pen=0.5, **extra)
    full = train_sae(cfg, tiny_cache)
    loaded = SAE.load_from_disk(cfg.run_dir / run_files.SAE_DIR)
    assert loaded.cfg.architecture() == "topk"
    torch.testing.assert_close(loaded(tiny_cache.rows(0, 64)), full(tiny_cache.rows(0, 64)), rtol=1e-4, atol=1e-4)

    crashed = tiny_cfg(tmp_path / "crash", architecture=architecture, orth_pen=0.5, **extra)
    resumed = crash_then_resume(crashed, tiny_cache, monkeypatch)
    for name, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


@pytest.mark.parametrize("params, field", [
    ({"architecture": "sgo_topk", "competition_threshold": 1.5}, "competition_threshold"),
    ({"architecture": "sgo_topk", "competition_threshold": -0.1}, "competition_threshold"),
    ({"architecture": "sgo_topk", "orth_pen": -0.01}, "orth_pen"),
    ({"architecture": "sgo_topk", "orth_pen": float("inf")}, "orth_pen"),
    ({"architecture": "topk", "orth_pen": 0.02}, "orth_pen"),
    ({"architecture": "gram_topk", "competition_threshold": 0.02}, "competition_threshold"),
    ({"architecture": "sgo_topk", "competition_warmup_steps": 64, "training_tokens": 65_536, "batch_size": 1024},
     "competition_warmup_steps"),
    ({"architecture": "ortsae_topk", "orth_chunk_size": 1}, "orth_chunk_size"),
    ({"architecture": "sgo_topk", "competition_stat_tokens": -1}, "competition_stat_tokens"),
    ({"architecture": "topk", "competition_stat_tokens": 512}, "competition_stat_tokens"),
    ({"architecture": "sgo_topk", "competition_normalisation": "latent"}, "competition_normalisation"),
    ({"architecture": "topk", "competition_normalisation": "latents"}, "competition_normalisation"),
])
def test_penalty_parameters_are_validated(params, field):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        build_config(params)


def test_plain_orth_pen_means_the_sgo_sae():
    assert build_config({"orth_pen": 0.02}).architecture == "sgo_topk"
    with pytest.raises(ConfigError, match="orth_pen: architecture 'topk' takes no orth_pen; it is a parameter of"):
        build_config({"architecture": "topk", "orth_pen": 0.02})


def test_sampled_penalty_is_an_unbiased_estimate_of_the_weighted_mean():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 16, generator=g)
    i, j = torch.randint(0, 20, (300,), generator=g), torch.randint(20, 40, (300,), generator=g)
    w = torch.rand(300, generator=g)
    exact = eager_pair_cos2(W, i, j, w).item()
    estimates = torch.tensor([sampled_pair_cos2(W, i, j, w, 64, torch.Generator().manual_seed(n)).item()
                              for n in range(400)])
    assert estimates.std() > 0  # it does sample
    assert abs(estimates.mean().item() - exact) < 4 * estimates.std().item() / 20  # within 4 standard errors
    assert sampled_pair_cos2(W, i, j, w, 0, g).item() == pytest.approx(exact, rel=1e-5)  # 0 = exact


@pytest.mark.parametrize("n_weights", [1, 5, 1000, 200_000])
def test_pair_draws_from_the_kept_table_are_torch_multinomials_draws(n_weights):
    g = torch.Generator().manual_seed(n_weights)
    w = torch.rand(n_weights, generator=g) ** 4  # skewed, as competition scores are
    w[::7] = 0.0 if n_weights > 1 else w[::7]  # zero weights are never drawn
    table = multinomial_table(w)
    assert table is not None and table.dtype.name == "float64" and table[-1] == 1.0
    for n, seed in ((1, 0), (7, 1), (4096, 2)):
        ours = draw_pairs(w, n, torch.Generator().manual_seed(seed), table)
        theirs = torch.multinomial(w, n, replacement=True, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(ours, theirs), (n, seed)
    assert multinomial_table(w.double()) is None  # only float32 weights are reproduced; others go to torch
    assert multinomial_table(torch.zeros(4)) is None
    assert multinomial_table(torch.tensor([1.0, -0.5, 2.0])) is None  # torch.multinomial refuses these itself
    assert multinomial_table(torch.tensor([1.0, float("inf")])) is None
    with pytest.raises(RuntimeError):  # and torch.multinomial names what is wrong with them
        draw_pairs(torch.zeros(4), 2, torch.Generator(), multinomial_table(torch.zeros(4)))


def test_row_combinations_is_the_sparse_product_in_a_fixed_order():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(9, 5, generator=g, dtype=torch.float64)
    rows = torch.tensor([4, 0, 4, 4, 7, 0])  # repeated entries, rows in any order, rows 1-3, 5, 6, 8 empty
    cols = torch.tensor([1, 2, 1, 8, 7, 0])
    vals = torch.rand(6, generator=g, dtype=torch.float64)
    dense = torch.zeros(9, 9, dtype=torch.float64).index_put_((rows, cols), vals, accumulate=True)
    ours = _row_combinations(rows, cols, vals, W)
    torch.testing.assert_close(ours, dense @ W)
    assert ours[[1, 2, 3, 5, 6, 8]].abs().sum() == 0
    assert torch.equal(ours, _row_combinations(rows, cols, vals, W))


def test_sample_pairs_validation():
    with pytest.raises(ConfigError, match="^competition_sample_pairs: "):
        build_config({"architecture": "sgo_topk", "competition_sample_pairs": -1})


def test_statistics_read_only_the_evenly_spaced_tokens_asked_for():
    assert competition_rows(4096, 0) == slice(None) and competition_rows(100, 100) == slice(None)
    assert competition_rows(4096, 1024).tolist() == list(range(0, 4096, 4))
    assert competition_rows(10, 4).tolist() == [0, 2, 5, 7]  # spread over the batch, not its first rows
    with pytest.raises(ValueError, match="^competition_stat_tokens: "):
        SGOTopKTrainingSAEConfig(d_in=8, d_sae=6, k=2, competition_stat_tokens=-3)
    g = torch.Generator().manual_seed(0)
    acts = torch.rand(16, 6, generator=g) * (torch.rand(16, 6, generator=g) > 0.5)
    step = TrainStepInput(sae_in=torch.randn(16, 8), coefficients={}, dead_neuron_mask=None,
                          n_training_steps=0, is_logging_step=False)
    sampled, full = make_sgo(), make_sgo()
    sampled.cfg.competition_stat_tokens = 4
    sampled.calculate_aux_loss(step, acts, acts, torch.zeros(16, 8))
    full.competition.update(acts[competition_rows(16, 4)], full.cfg.k)
    assert sampled.competition.n_updates == 1
    for name, value in full.competition.state_dict().items():
        assert torch.equal(sampled.competition.state_dict()[name], value), name


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device on this machine"))]


def _orth_steps(architecture: str, device: str, steps: int = 4):
    """A few sparse training steps of an orthogonal SAE on ``device``: (sae, losses, W_dec gradient of the last)."""
    from sae_lens.registry import get_sae_training_class

    extra = {"sgo_topk": dict(competition_threshold=0.05, competition_warmup_steps=0, competition_decay=0.5,
                              competition_window=2, competition_sample_pairs=64),
             "ortsae_topk": dict(orth_chunk_size=16), "gram_topk": {}}[architecture]
    sae_cls, cfg_cls = get_sae_training_class(architecture)
    torch.manual_seed(0)
    sae = sae_cls(cfg_cls(d_in=16, d_sae=64, k=4, orth_pen=1.0, device=device, **extra))
    g = torch.Generator().manual_seed(1)
    losses, grad = [], None
    for step in range(steps):
        sae.zero_grad()
        x = torch.randn(32, 16, generator=g).to(device)
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={"orth_pen": 1.0},
                                                       dead_neuron_mask=None, n_training_steps=step,
                                                       is_logging_step=False))
        out.loss.backward()
        losses.append(out.losses[ORTH_LOSS].detach())
        grad = sae.W_dec.grad
    return sae, losses, grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("architecture", ["sgo_topk", "ortsae_topk", "gram_topk"])
def test_orthogonal_penalties_run_on_the_sae_device(architecture, device):
    sae, losses, grad = _orth_steps(architecture, device)
    kind = torch.device(device).type
    tensors = [*losses, *(p for p in sae.parameters()), *(p.grad for p in sae.parameters())]
    if architecture == "sgo_topk":
        stats = sae.competition
        tensors += [stats.freq_F, stats.pair_keys, stats.pair_rates, *stats.competing(0.05)]
        assert len(stats.competing(0.05)[0]) > 0
    assert {t.device.type for t in tensors} == {kind}
    assert losses[-1].item() > 0 and grad.abs().sum() > 0


def test_sgo_device_path_on_the_cpu_equals_the_numpy_path(monkeypatch):
    """The whole SGO step along the branch a GPU takes (no numpy, no host copy), run on the CPU: same penalty and
    decoder gradient as the CPU's numpy branch."""
    import saelib.competition as competition

    _, ref_losses, ref_grad = _orth_steps("sgo_topk", "cpu")
    monkeypatch.setattr(competition, "_host_numpy", lambda t: False)
    monkeypatch.setattr(torch.Tensor, "numpy", lambda self, *a, **k: pytest.fail("Tensor.numpy() on the device path"))
    _, losses, grad = _orth_steps("sgo_topk", "cpu")
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses))
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("F, chunk", [(40, 8), (43, 8), (9, 4), (1000, 128)])
def test_ortsae_penalty_and_gradient_equal_autograd_through_the_max(F, chunk):
    """The partner-then-pairs penalty equals the eager max over each chunk's cos² (value and gradient), with a last
    partial chunk and a last chunk of one latent (skipped)."""
    g = torch.Generator().manual_seed(F)
    W = torch.randn(F, 6, generator=g, dtype=torch.float64, requires_grad=True)

    def eager(W_dec, generator):
        perm = torch.randperm(F, generator=generator)
        W_hat = W_dec / W_dec.norm(dim=-1, keepdim=True)
        total = W_dec.new_zeros(())
        for s in range(0, F, chunk):
            idx = perm[s:s + chunk]
            if len(idx) >= 2:
                cos2 = (W_hat[idx] @ W_hat[idx].T).square()
                total = total + (cos2 - torch.diag_embed(cos2.diagonal())).max(dim=-1).values.sum()
        return total / F

    ours = chunked_max_cos2(W, chunk, torch.Generator().manual_seed(7))
    ref = eager(W, torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, ref)
    (g_ours,) = torch.autograd.grad(ours, W)
    (g_ref,) = torch.autograd.grad(ref, W)
    torch.testing.assert_close(g_ours, g_ref)
