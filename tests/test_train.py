"""Training through sae_lens: round trip through load_from_disk, exact mean folding, deterministic resume,
non-finite loss stop, every baseline architecture trains."""

import numpy as np
import pytest
import torch
from sae_lens import SAE

from saelib import run_files
from saelib.activations import ActivationCache, CacheKey, build_activation_cache
from saelib.config import build_config
from saelib.train import HistoryTrainer, NonFiniteLossError, build_training_sae, fold_input_mean, train_sae


def tiny_cfg(tmp_path, **overrides):
    params = dict(model_name="tiny-random", hook_layer=0, context_size=32, d_sae=96, k=6, cache_tokens=1500,
                  training_tokens=2048, batch_size=128, runs_dir=str(tmp_path / "runs"), n_checkpoints=2,
                  log_every=2, dead_feature_window=5)
    params.update(overrides)
    return build_config(params)


def test_trained_sae_round_trips_through_sae_lens(tmp_path, tiny_cache):
    cfg = tiny_cfg(tmp_path)
    trained = train_sae(cfg, tiny_cache)
    loaded = SAE.load_from_disk(cfg.run_dir / run_files.SAE_DIR)
    assert loaded.cfg.architecture() == "topk" and loaded.cfg.d_sae == 96
    assert loaded.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
    x = tiny_cache.rows(0, 256)
    torch.testing.assert_close(loaded(x), trained(x), rtol=1e-4, atol=1e-4)
    history = run_files.read_history(cfg.run_dir)
    assert len(history) == 16 // 2 and history["metrics/l0"].iloc[-1] == pytest.approx(6)
    assert history["losses/mse_loss"].iloc[-1] < history["losses/mse_loss"].iloc[0]


def test_centring_is_folded_exactly(tmp_path, tiny_cache):
    cfg = tiny_cfg(tmp_path, centre_activations=True)
    trained = train_sae(cfg, tiny_cache)
    x = tiny_cache.rows(0, 256)
    # undo the fold: the same SAE on centred input must give the centred reconstruction
    centred = SAE.load_from_disk(cfg.run_dir / run_files.SAE_DIR)
    with torch.no_grad():
        centred.b_dec -= tiny_cache.mean_D
    torch.testing.assert_close(trained(x), centred(x - tiny_cache.mean_D) + tiny_cache.mean_D, rtol=1e-4, atol=1e-3)


def test_fold_input_mean_without_b_dec_on_input():
    from sae_lens import StandardSAE, StandardSAEConfig

    sae = StandardSAE(StandardSAEConfig(d_in=8, d_sae=16, apply_b_dec_to_input=False))
    torch.nn.init.normal_(sae.b_enc)
    x, mean = torch.randn(5, 8), torch.randn(8)
    before = sae(x - mean) + mean
    fold_input_mean(sae, mean)
    torch.testing.assert_close(sae(x), before, rtol=1e-5, atol=1e-5)


def crash_then_resume(cfg, cache, monkeypatch, at_step=12):
    """Train until ``at_step`` (after the first checkpoint), die, check what is left, resume to the end."""
    real_step = HistoryTrainer.step

    def crash_after_checkpoint(self, batch):
        if self.n_training_steps == at_step:
            raise KeyboardInterrupt
        return real_step(self, batch)

    monkeypatch.setattr(HistoryTrainer, "step", crash_after_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train_sae(cfg, cache)
    assert run_files.latest_checkpoint(cfg.run_dir) is not None
    assert not (cfg.run_dir / run_files.SAE_DIR).exists()
    monkeypatch.setattr(HistoryTrainer, "step", real_step)
    return train_sae(cfg, cache)


def test_resume_after_a_crash_gives_the_same_weights(tmp_path, tiny_cache, monkeypatch):
    uninterrupted = train_sae(tiny_cfg(tmp_path / "a"), tiny_cache)
    cfg = tiny_cfg(tmp_path / "b")
    resumed = crash_then_resume(cfg, tiny_cache, monkeypatch)
    for name, value in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0, msg=name)
    steps = run_files.read_history(cfg.run_dir)["step"].tolist()
    assert steps == sorted(set(steps))


def test_non_finite_loss_stops_and_keeps_checkpoints(tmp_path, tiny_model):
    tokens = np.random.default_rng(0).integers(3, 512, size=(64, 32))
    tokens[:, 0] = 1
    key = CacheKey("tiny-random", "blocks.0.hook_resid_post", "nan", 1500, 32)
    cache = build_activation_cache(tiny_model, tokens, key, tmp_path / "acts", {1})
    poisoned = np.load(cache.folder / "acts.npy", mmap_mode="r+")
    poisoned[700:] = np.inf  # later batches explode
    poisoned.flush()
    cache = ActivationCache(cache.folder)
    cache.mean_D = torch.zeros(cache.d_in)
    cfg = tiny_cfg(tmp_path, normalize_activations="none", centre_activations=False)
    with pytest.raises(NonFiniteLossError, match="training loss became"):
        train_sae(cfg, cache)
    assert not (cfg.run_dir / run_files.SAE_DIR).exists()


def test_a_finished_run_is_never_replaced_and_an_unfinished_one_starts_fresh(tmp_path, tiny_cache):
    import shutil

    first = tiny_cfg(tmp_path)
    train_sae(first, tiny_cache)
    cfg = tiny_cfg(tmp_path, d_sae=64, k=4, run_name=first.run_name)
    with pytest.raises(FileExistsError, match="finished SAE of another configuration .*d_sae, k"):
        train_sae(cfg, tiny_cache)
    assert run_files.read_json(cfg.run_dir / run_files.RUN_CFG_FILE)["d_sae"] == first.d_sae
    shutil.rmtree(cfg.run_dir / run_files.SAE_DIR)  # as if killed before the end: its checkpoints are another config's
    sae = train_sae(cfg, tiny_cache)
    assert sae.cfg.d_sae == 64
    assert run_files.read_json(cfg.run_dir / run_files.RUN_CFG_FILE)["d_sae"] == 64


@pytest.mark.parametrize("architecture, extra, saved_as", [
    ("batchtopk", {}, "jumprelu"),
    ("matryoshka_batchtopk", {}, "jumprelu"),
    ("standard", {"l1_coefficient": 1.0}, "standard"),
])
def test_baseline_architectures_train_and_load(tmp_path, tiny_cache, architecture, extra, saved_as):
    cfg = tiny_cfg(tmp_path, architecture=architecture, **extra)
    train_sae(cfg, tiny_cache)
    loaded = SAE.load_from_disk(cfg.run_dir / run_files.SAE_DIR)
    assert loaded.cfg.architecture() == saved_as
    assert torch.isfinite(loaded(tiny_cache.rows(0, 64))).all()
    if saved_as == "jumprelu":  # the BatchTopK family trains on the sparse step, whose threshold reaches the save
        assert (loaded.threshold > 0).all()


@pytest.mark.parametrize("scheme, widths", [("quarters", [64, 256, 1024]),
                                            ("saebench", [32, 96, 224, 480, 1024])])
def test_matryoshka_widths_reach_the_training_sae(scheme, widths):
    cfg = build_config({"architecture": "matryoshka_batchtopk", "matryoshka_widths": scheme, "d_sae": 1024})
    assert build_training_sae(cfg, d_in=16).cfg.matryoshka_widths == widths


def test_a_finished_run_is_loaded_not_retrained(tmp_path, tiny_cache, monkeypatch):
    cfg = tiny_cfg(tmp_path)
    first = train_sae(cfg, tiny_cache)
    monkeypatch.setattr(HistoryTrainer, "fit", lambda self: (_ for _ in ()).throw(AssertionError("retrained")))
    again = train_sae(cfg, tiny_cache)
    x = tiny_cache.rows(0, 64)
    torch.testing.assert_close(again(x), first(x), rtol=1e-4, atol=1e-4)


def test_study_metrics_table_lists_finished_runs(tmp_path):
    study = tmp_path / "s"
    for name, lam in (("a", 0.0), ("b", 0.02)):
        (study / name).mkdir(parents=True)
        run_files.write_json_atomic(study / name / run_files.RUN_CFG_FILE, {"architecture": "sgo_topk", "competition_threshold": 0.02,
                                                             "orth_pen": lam, "seed": 0})
        run_files.write_json_atomic(study / name / run_files.METRICS_FILE, {"explained_variance": 0.9 + lam})
    (study / "unfinished").mkdir()
    table = run_files.study_metrics(study)
    assert table.run.tolist() == ["a", "b"]
    assert table.loc[table.run == "b", "explained_variance"].item() == pytest.approx(0.92)


def test_resumed_adam_states_take_their_parameters_layout(tmp_path):
    """A checkpoint whose Adam states are row-major (as saelib wrote them before W_enc became latent-major) resumes
    to the same update as the uninterrupted trainer: the fused kernel pairs elements by memory position."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.constants import TRAINER_STATE_FILENAME

    from saelib.sparse_step import SparseTopKTrainingSAE, SparseTopKTrainingSAEConfig

    def trainer():
        torch.manual_seed(0)
        sae = SparseTopKTrainingSAE(SparseTopKTrainingSAEConfig(d_in=8, d_sae=48, k=4, sae_precision="float32"))
        cfg = SAETrainerConfig(total_training_samples=64 * 10, train_batch_size_samples=64, lr=1e-2, lr_end=1e-2,
                               device="cpu", dead_feature_window=1000, n_checkpoints=0,
                               checkpoint_path=str(tmp_path), save_final_checkpoint=False)
        return HistoryTrainer(cfg, sae, data_provider=iter(()), log_every=10**9, history_path=tmp_path / "h.jsonl")

    batches = torch.randn(3, 64, 8, generator=torch.Generator().manual_seed(1))
    first = trainer()
    first.step(batches[0])
    first.save_checkpoint("ck")
    state_file = tmp_path / "ck" / TRAINER_STATE_FILENAME
    state = torch.load(state_file)
    for param_state in state["optimizer"]["state"].values():
        for name in ("exp_avg", "exp_avg_sq"):
            param_state[name] = param_state[name].contiguous()
    torch.save(state, state_file)
    resumed = trainer()
    resumed.sae.load_state_dict(first.sae.state_dict())
    resumed.load_trainer_state(tmp_path / "ck")
    for param, param_state in resumed.optimizer.state.items():
        assert param_state["exp_avg"].stride() == param.stride()
    for batch in batches[1:]:
        first.step(batch)
        resumed.step(batch)
    for name, value in first.sae.state_dict().items():
        torch.testing.assert_close(resumed.sae.state_dict()[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("fused", [True, False])
def test_contiguous_adam_updates_a_transposed_matrix_as_adam_updates_a_contiguous_one(fused):
    from saelib.train import ContiguousAdam

    torch.manual_seed(0)
    values, bias = torch.randn(6, 10), torch.randn(10)
    plain = [torch.nn.Parameter(values.clone()), torch.nn.Parameter(bias.clone())]
    latent_major = [torch.nn.Parameter(values.T.contiguous().T), torch.nn.Parameter(bias.clone())]
    assert latent_major[0].stride() == (1, 6)
    opt_plain = torch.optim.Adam(plain, lr=1e-2, fused=fused)
    opt_lm = ContiguousAdam(latent_major, lr=1e-2, fused=fused)
    for step in range(3):
        grads = torch.randn(6, 10), torch.randn(10)
        for params, opt in ((plain, opt_plain), (latent_major, opt_lm)):
            ((params[0] * grads[0]).sum() + (params[1] * grads[1]).sum() + (params[0] ** 2).sum()).backward()
            opt.step()
            opt.zero_grad()
    assert latent_major[0].stride() == (1, 6)
    assert opt_lm.state[latent_major[0]]["exp_avg"].stride() == (1, 6)
    for a, b in zip(plain, latent_major):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_contiguous_adam_takes_a_gradient_set_by_hand_in_another_layout():
    from saelib.train import ContiguousAdam

    values, grad = torch.randn(6, 10), torch.randn(6, 10)
    plain = torch.nn.Parameter(values.clone())
    latent_major = torch.nn.Parameter(values.T.contiguous().T)
    opt_plain, opt_lm = torch.optim.Adam([plain], lr=1e-2, fused=True), ContiguousAdam([latent_major], lr=1e-2,
                                                                                         fused=True)
    plain.grad, latent_major.grad = grad.clone(), grad.clone()  # row-major gradient on a latent-major parameter
    opt_plain.step()
    opt_lm.step()
    torch.testing.assert_close(latent_major, plain, rtol=0, atol=0)
    opt_lm.state[latent_major]["exp_avg"] = opt_lm.state[latent_major]["exp_avg"].contiguous()
    latent_major.grad = grad.T.contiguous().T
    with pytest.raises(RuntimeError, match="laid out unlike its parameter"):
        opt_lm.step()
