"""Train one SAE of any registered architecture with sae_lens's own ``SAETrainer``, fed from the activation cache.

What saelib adds around the trainer: a seeded, resumable data stream; the centring mean folded into ``b_dec``;
a training history (loss, L0, explained variance and every architecture-specific loss) written as JSON lines;
a stop on a non-finite loss that keeps the last good checkpoint. It writes no training loop of its own.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE, SAETrainer
from sae_lens.config import SAETrainerConfig
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import SAEMetadata, TrainingSAE
from sae_lens.training.optim import get_lr_scheduler

from saelib import run_files, settings
from saelib.activations import ActivationCache, ActivationStream, iter_training_batches
from saelib.config import RunConfig
from saelib.sparse_step import keep_freed_memory

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the run folder keeps its last good checkpoint."""


def sae_config_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """Architecture-specific sae_lens config fields for ``cfg.architecture``: k, and its settings groups' fields."""
    return {**({} if cfg.architecture == "standard" else {"k": cfg.k}), **settings.sae_kwargs(cfg)}


#: Architectures trained by saelib's sparse step under another registered training name (saved as sae_lens saves
#: them: ``topk``, or ``jumprelu`` for the BatchTopK family); the orthogonal ones are built on that step already.
SPARSE_STEP = {"topk": "saelib_topk", "batchtopk": "saelib_batchtopk",
               "matryoshka_batchtopk": "saelib_matryoshka_batchtopk"}


def build_training_sae(cfg: RunConfig, d_in: int) -> TrainingSAE:
    """A freshly initialised training SAE of ``cfg.architecture`` from sae_lens's registry, seeded by ``cfg.seed``."""
    import saelib.saes  # noqa: F401  (registers saelib's architectures with sae_lens)

    sae_cls, sae_cfg_cls = get_sae_training_class(SPARSE_STEP.get(cfg.architecture, cfg.architecture))
    metadata = SAEMetadata(
        model_name=cfg.model_name, hook_name=cfg.hook_name, context_size=cfg.context_size, prepend_bos=True,
        dataset_path=cfg.dataset, exclude_special_tokens=True,
    )
    sae_cfg = sae_cfg_cls(
        d_in=d_in, d_sae=cfg.d_sae, dtype=cfg.dtype, device=cfg.device,
        normalize_activations=cfg.normalize_activations, metadata=metadata, **sae_config_kwargs(cfg),
    )
    torch.manual_seed(cfg.seed)
    return sae_cls(sae_cfg)


def _laid_out_like(param: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t``'s values (and dtype) in ``param``'s memory layout."""
    return torch.empty_like(param, dtype=t.dtype).copy_(t)


class ContiguousAdam(torch.optim.Adam):
    """torch's Adam, handing its kernel each transposed-contiguous matrix (``W_enc`` kept latent-major by the sparse
    step) as its contiguous transpose: the same elements, updated in place, with no copy. The fused CPU kernel
    copies a non-contiguous parameter, gradient and both states to contiguous memory and back (+12 ms a step for
    ``W_enc`` at 16,384 latents on 2 cores). Gradients and states follow their parameter's strides (autograd and
    ``zeros_like`` keep them; ``HistoryTrainer.load_trainer_state`` restores them), so all are transposed alike."""

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps):
        has_complex = super()._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                          state_steps)
        for i, param in enumerate(params):
            if param.dim() != 2 or param.is_contiguous() or not param.T.is_contiguous():
                continue
            if grads[i].stride() != param.stride():  # a gradient set by hand: read-only here, so a copy serves
                grads[i] = _laid_out_like(param, grads[i])
            states = [exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if group["amsgrad"] else [])
            if any(s[i].stride() != param.stride() for s in states):
                raise RuntimeError("ContiguousAdam: an Adam state is laid out unlike its parameter "
                                   f"{tuple(param.shape)}; HistoryTrainer.load_trainer_state lays them out alike")
            for tensors in [params, grads] + states:
                tensors[i] = tensors[i].T
        return has_complex


class HistoryTrainer(SAETrainer):
    """sae_lens's trainer, plus a history row every ``log_every`` steps, a stop on a non-finite loss and a fused
    Adam (same update as sae_lens's, one kernel per step instead of a loop over parameters: 6 ms instead of 60 ms
    at 16k latents on 2 CPU cores)."""

    def __init__(self, *args, log_every: int, history_path: Path, **kwargs):
        super().__init__(*args, **kwargs)
        self.log_every = log_every
        self.history_path = history_path
        self._use_fused_adam()

    def _use_fused_adam(self) -> None:
        params = list(self.sae.parameters())
        if not all(p.dtype in (torch.float32, torch.float64) for p in params):
            return
        self.optimizer = ContiguousAdam(params, lr=self.cfg.lr, betas=(self.cfg.adam_beta1, self.cfg.adam_beta2),
                                        fused=True)
        self.lr_scheduler = get_lr_scheduler(
            self.cfg.lr_scheduler_name, lr=self.cfg.lr, optimizer=self.optimizer,
            warm_up_steps=self.cfg.lr_warm_up_steps, decay_steps=self.cfg.lr_decay_steps,
            training_steps=self.cfg.total_training_steps, lr_end=self.cfg.lr_end, num_cycles=self.cfg.n_restart_cycles,
        )

    def load_trainer_state(self, checkpoint_path) -> None:
        """sae_lens's, then each Adam state laid out as its parameter: the fused kernel walks parameter, gradient and
        states as flat memory, so a state saved row-major for a latent-major ``W_enc`` (or the reverse) would be
        paired with the wrong elements, silently."""
        super().load_trainer_state(checkpoint_path)
        for param, state in self.optimizer.state.items():
            for name, value in state.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    state[name] = _laid_out_like(param, value)

    def save_checkpoint(self, checkpoint_name: str, base_path=None, wandb_aliases=None) -> None:
        """sae_lens's checkpoint plus the SAE's competition statistics, written first: the trainer state
        (written last by sae_lens) is what marks a checkpoint complete."""
        from saelib.saes import competition_state

        state = competition_state(self.sae)
        if state is not None:
            folder = Path(base_path or self.cfg.checkpoint_path) / checkpoint_name
            folder.mkdir(parents=True, exist_ok=True)
            save_file(state, folder / run_files.COMPETITION_FILE)
        super().save_checkpoint(checkpoint_name, base_path, wandb_aliases)

    def step(self, batch: torch.Tensor):
        if hasattr(self.sae, "metrics_due"):
            self.sae.metrics_due = self.n_training_steps % self.log_every == 0  # the row written below
        output = super().step(batch)
        if not math.isfinite(output.loss.item()):
            raise NonFiniteLossError(
                f"training loss became {output.loss.item()} at step {self.n_training_steps}; "
                f"the last good checkpoint is kept under {self.cfg.checkpoint_path}"
            )
        if self.n_training_steps % self.log_every == 0:
            row = self.build_train_step_log_dict(output, n_training_samples=self.n_training_samples)
            row = {"step": self.n_training_steps, **{k: v for k, v in row.items() if not k.startswith("plots/")}}
            with self.history_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        return output


def trainer_config(cfg: RunConfig, run_dir: Path) -> SAETrainerConfig:
    return SAETrainerConfig(
        total_training_samples=cfg.training_tokens, train_batch_size_samples=cfg.batch_size, lr=cfg.lr, lr_end=cfg.lr / 10,
        lr_warm_up_steps=cfg.lr_warm_up_steps, device=cfg.device, dead_feature_window=cfg.dead_feature_window,
        feature_sampling_window=cfg.dead_feature_window, n_checkpoints=cfg.n_checkpoints,
        checkpoint_path=str(run_dir / run_files.CHECKPOINTS_DIR), save_final_checkpoint=False,
        n_batches_for_norm_estimate=max(1, min(100, cfg.cache_tokens // cfg.batch_size)),
    )


def train_sae(cfg: RunConfig, cache: ActivationCache | ActivationStream, run_dir: Path | None = None) -> TrainingSAE:
    """Train (or resume from the latest checkpoint) and save the inference SAE to ``run_dir/sae``.

    A run folder that already holds a finished SAE for the same configuration is loaded, not retrained.
    The returned SAE works on raw activations: the centring mean and the normalisation scale are folded in.
    """
    run_dir = Path(run_dir or cfg.run_dir)
    keep_freed_memory()
    used = cfg.resolved_precisions()
    reset = run_files.prepare_run_dir(run_dir, {**cfg.to_dict(), **used}, cfg.training_key())
    log.info("%s: SAE step in %s, LM in %s ('auto': bf16 where native and measured faster, or as a study holds it)",
             run_dir, used["sae_precision_used"], used["lm_precision_used"])
    if not reset and (run_dir / run_files.SAE_DIR / SAE_CFG_FILENAME).exists():
        log.info("%s is already trained with this configuration; loading it", run_dir)
        return SAE.load_from_disk(run_dir / run_files.SAE_DIR, device=cfg.device)
    sae = build_training_sae(cfg, cache.d_in)
    history = run_dir / run_files.HISTORY_FILE
    mean_D = cache.mean_D if cfg.centre_activations else None
    trainer = HistoryTrainer(trainer_config(cfg, run_dir), sae, data_provider=iter(()),
                             log_every=cfg.log_every, history_path=history)
    start = _resume_from_latest_checkpoint(trainer, run_dir)
    if start == 0:
        history.unlink(missing_ok=True)
        _estimate_scale(trainer, cfg, cache, mean_D)
    else:
        run_files.truncate_history(history, start - 1)
    trainer.data_provider = iter_training_batches(cache, cfg.batch_size, cfg.seed, start, mean_D)
    sae = trainer.fit()
    if mean_D is not None:
        fold_input_mean(sae, mean_D)
    sae.save_inference_model(run_dir / run_files.SAE_DIR)
    return sae


def _estimate_scale(trainer: SAETrainer, cfg: RunConfig, cache: ActivationCache, mean_D) -> None:
    """Estimate the normalisation scale from its own stream, so training batches don't depend on it."""
    if cfg.normalize_activations != "expected_average_only_in":
        return
    probe = iter_training_batches(cache, cfg.batch_size, cfg.seed + 10_007, 0, mean_D)
    trainer.activation_scaler.estimate_scaling_factor(
        d_in=cache.d_in, data_provider=probe, n_batches_for_norm_estimate=trainer.cfg.n_batches_for_norm_estimate
    )


def _resume_from_latest_checkpoint(trainer: SAETrainer, run_dir: Path) -> int:
    ckpt = run_files.latest_checkpoint(run_dir)
    if ckpt is None:
        return 0
    _load_checkpoint(trainer, ckpt)
    # thresholds already passed must not be checkpointed again
    trainer.checkpoint_thresholds = [t for t in trainer.checkpoint_thresholds if t >= trainer.n_training_samples]
    log.info("resuming %s from %s (step %d)", run_dir, ckpt.name, trainer.n_training_steps)
    return trainer.n_training_steps


def _load_checkpoint(trainer: SAETrainer, ckpt: Path) -> None:
    trainer.sae.load_state_dict(load_file(ckpt / SAE_WEIGHTS_FILENAME))
    if hasattr(trainer.sae, "competition"):
        trainer.sae.competition.load_state_dict(load_file(ckpt / run_files.COMPETITION_FILE))
    trainer.load_trainer_state(ckpt)
    # sae_lens checkpoints before it increments n_training_steps, so the saved count is one short of the
    # steps taken; the sample count is right. Without this, a resumed run would replay one batch.
    trainer.n_training_steps = trainer.n_training_samples // trainer.cfg.train_batch_size_samples


def checkpoint_sae(cfg: RunConfig, cache: ActivationCache, ckpt: Path, out_dir: Path):
    """Save to ``out_dir`` the inference SAE as it stood at checkpoint ``ckpt`` of a run of ``cfg``, finished as
    training finishes its last step (normalisation scale and centring mean folded in), so that it evaluates like a
    run's own SAE. Returns it."""
    ckpt, out_dir = Path(ckpt), Path(out_dir)
    if not (ckpt / SAE_WEIGHTS_FILENAME).exists():
        raise FileNotFoundError(f"ckpt: expected a checkpoint folder holding {SAE_WEIGHTS_FILENAME}, got {ckpt}")
    trainer = HistoryTrainer(trainer_config(cfg, out_dir), build_training_sae(cfg, cache.d_in), data_provider=iter(()),
                             log_every=cfg.log_every, history_path=out_dir / run_files.HISTORY_FILE)
    _load_checkpoint(trainer, ckpt)
    sae = trainer.sae
    if trainer.activation_scaler.scaling_factor is not None:  # as SAETrainer.fit ends
        sae.fold_activation_norm_scaling_factor(trainer.activation_scaler.scaling_factor)
    trainer.set_final_sae_metadata()
    if cfg.centre_activations:
        fold_input_mean(sae, cache.mean_D)
    sae.save_inference_model(out_dir)
    return sae


@torch.no_grad()
def fold_input_mean(sae, mean_D: torch.Tensor) -> None:
    """Make an SAE trained on ``x - mean`` exact on raw ``x``: b_dec absorbs the mean on both sides."""
    mean_D = mean_D.to(sae.b_dec.device, sae.b_dec.dtype)
    if not sae.cfg.apply_b_dec_to_input:
        sae.b_enc -= mean_D @ sae.W_enc
    sae.b_dec += mean_D
