"""A sparse, bf16-aware training step for TopK SAEs, as a sae_lens training SAE (``saelib_topk``).

Same loss, same parameters and same saved form as sae_lens's ``TopKTrainingSAE``; only the arithmetic differs:

* the encoder matmul stays dense (batch × d_sae pre-activations, no autograd graph), in bf16 where the device
  has native bf16 (``sae_precision``), fp32 otherwise;
* TopK then picks k latents per row; everything after it is sparse: the decoder is an ``embedding_bag`` over the
  k active rows of ``W_dec``, and the encoder's backward touches only the active columns (a sparse × dense
  product for ``W_enc``, an ``index_add_`` for ``b_enc``), so no dense batch × d_sae gradient is ever formed;
* the TopK auxiliary loss gathers only the dead latents' columns;
* ``feature_acts`` reach sae_lens's trainer as a coalesced sparse COO tensor, which its statistics accept.

Parameters (and Adam's state) stay fp32. The trainer is sae_lens's own ``SAETrainer``; ``saelib.train`` only
gives it a fused Adam.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
import torch
import torch.nn.functional as F
from sae_lens import TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig, register_sae_training_class
from sae_lens.saes.sae import SAEConfig, TrainStepInput, TrainStepOutput

PRECISIONS = ("auto", "float32", "bfloat16")
_FREED_MEMORY_KEPT: bool | None = None


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep large freed blocks for reuse instead of returning them to the kernel.

    By default every block over 32 MiB is its own ``mmap``, unmapped on free, so each step's large temporaries (a
    batch × d_sae pre-activation matrix, a d_sae × d_in gradient) are page-faulted in afresh: measured here, zeroing
    a 42 MB tensor took 12 ms that way and 1 ms from reused memory (``benchmarks/bench_speed.py`` prints the effect on
    whole steps). Process-wide, once; the resident size then stays at its high-water mark. True where it took effect
    (glibc), False elsewhere (other C libraries manage memory their own way)."""
    global _FREED_MEMORY_KEPT
    if _FREED_MEMORY_KEPT is None:
        import ctypes
        import ctypes.util

        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c"))
            _FREED_MEMORY_KEPT = bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
        except (OSError, AttributeError, TypeError):
            _FREED_MEMORY_KEPT = False
    return _FREED_MEMORY_KEPT


def bf16_native(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware (not emulated): AVX512-BF16 or AMX on x86 CPUs,
    the BF16 extension on Arm (oneDNN's check), or a CUDA GPU that reports bf16 support."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type != "cpu":
        return False
    import platform

    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        # oneDNN's own check also says True for plain AVX512, where bf16 is emulated and slower than fp32
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: str | torch.device, field: str = "sae_precision") -> str:
    """``auto`` → ``bfloat16`` where native on ``device``, else ``float32``. Forcing ``bfloat16`` where it is
    not native raises a ValueError naming ``field``."""
    if precision not in PRECISIONS:
        raise ValueError(f"{field}: expected one of {list(PRECISIONS)}, got {precision!r}")
    native = bf16_native(device)
    if precision == "bfloat16" and not native:
        raise ValueError(f"{field}: 'bfloat16' was asked for, but {torch.device(device)} has no native bf16 "
                         "(it would be emulated, slower than fp32); use 'auto' or 'float32'")
    if precision == "auto":
        return "bfloat16" if native else "float32"
    return precision


# ---------------------------------------------------------------------------------------------- autograd pieces
class _GatheredPreacts(torch.autograd.Function):
    """Pre-activations ``(x − b_dec) · W_enc[:, j] + b_enc[j]`` at chosen latents ``idx_BM``, whose values were
    already computed by the dense forward. The backward is sparse: it touches only the chosen columns."""

    @staticmethod
    def forward(ctx, pre_BM, idx_BM, sae_in_BD, W_enc_DF, b_enc_F, b_dec_D):
        ctx.save_for_backward(idx_BM, sae_in_BD, W_enc_DF)
        ctx.has_b_dec = b_dec_D is not None
        return pre_BM.clone()

    @staticmethod
    def backward(ctx, grad_BM):
        idx_BM, sae_in_BD, W_enc_DF = ctx.saved_tensors
        D, F_ = W_enc_DF.shape
        flat = idx_BM.reshape(-1)
        grad_flat = grad_BM.reshape(-1).to(sae_in_BD.dtype)
        grad_b_enc = torch.zeros(F_, dtype=grad_flat.dtype, device=grad_flat.device).index_add_(0, flat, grad_flat)
        grad_W_enc = None
        if ctx.needs_input_grad[3]:
            # W_enc.grad[:, j] = Σ over (row b, slot m) with idx[b, m] = j of grad[b, m] · x_b: a CSR (d_sae × B)
            # matrix, rows sorted by latent, times x
            order = torch.argsort(flat)
            rows_per_latent = torch.bincount(flat, minlength=F_)
            crow = torch.zeros(F_ + 1, dtype=torch.int64, device=flat.device)
            crow[1:] = rows_per_latent.cumsum(0)
            batch_of = torch.arange(idx_BM.shape[0], device=flat.device).repeat_interleave(idx_BM.shape[1])
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                G_FB = torch.sparse_csr_tensor(crow, batch_of[order], grad_flat[order], (F_, idx_BM.shape[0]),
                                               check_invariants=False)
            grad_W_enc = (G_FB @ sae_in_BD).T
        grad_b_dec = -(W_enc_DF @ grad_b_enc) if ctx.has_b_dec else None  # sae_in = x − b_dec
        return None, None, None, grad_W_enc, grad_b_enc if ctx.needs_input_grad[4] else None, grad_b_dec


def _dense_preacts(sae_in_BD: torch.Tensor, W_enc_DF: torch.Tensor, b_enc_F: torch.Tensor, dtype: torch.dtype):
    """``sae_in @ W_enc + b_enc`` without an autograd graph, computed in ``dtype``."""
    with torch.no_grad():
        if dtype == torch.float32:
            return torch.addmm(b_enc_F.float(), sae_in_BD.float(), W_enc_DF.float())
        return torch.addmm(b_enc_F.to(dtype), sae_in_BD.to(dtype), W_enc_DF.to(dtype))


@dataclass
class StepState:
    """What one sparse forward leaves for the losses and statistics of the same step."""

    idx_BK: torch.Tensor
    """Chosen latents per row, ascending."""
    acts_BK: torch.Tensor
    """Their activations (ReLU of the TopK values; may be 0), with autograd graph."""
    hidden_pre_BF: torch.Tensor
    """Dense pre-activations as used for selection (scaled by decoder norms where sae_lens does), no graph."""
    sae_in_BD: torch.Tensor
    """Encoder input (``x − b_dec`` where sae_lens applies it), no graph."""
    W_dec_norm_F: torch.Tensor | None
    """Decoder row norms with autograd graph (``rescale_acts_by_decoder_norm``), else None."""


def sparse_feature_acts(idx_BK: torch.Tensor, acts_BK: torch.Tensor, d_sae: int) -> torch.Tensor:
    """A coalesced (B, d_sae) COO tensor of TopK activations; ``idx_BK`` must be ascending within each row."""
    B, K = idx_BK.shape
    rows = torch.arange(B, device=idx_BK.device).repeat_interleave(K)
    return torch.sparse_coo_tensor(torch.stack([rows, idx_BK.reshape(-1)]), acts_BK.reshape(-1), (B, d_sae),
                                   is_coalesced=True, check_invariants=False)


# ---------------------------------------------------------------------------------------------- the SAE
@dataclass
class SparseTopKTrainingSAEConfig(TopKTrainingSAEConfig):
    """sae_lens's TopK training config plus the step's precision. Saved for inference as a plain ``topk`` SAE."""

    sae_precision: str = "auto"
    """Encoder matmul precision: ``auto`` (bf16 where native on the device, else fp32), ``float32`` or
    ``bfloat16`` (an error where not native). Weights and optimiser state are fp32 in every case."""

    @classmethod
    def architecture(cls) -> str:
        return "saelib_topk"

    def __post_init__(self):
        super().__post_init__()
        resolve_precision(self.sae_precision, self.device)

    def get_inference_config_class(self) -> type[SAEConfig]:
        return TopKSAEConfig


class SparseTopKTrainingSAE(TopKTrainingSAE):
    """sae_lens's TopK training SAE with the sparse step (see the module docstring).

    Configurations the sparse step does not cover (activation reshaping, normalisations applied inside the SAE,
    non-fp32 weights) fall back to sae_lens's dense step, unchanged.
    """

    cfg: SparseTopKTrainingSAEConfig

    def __init__(self, cfg: SparseTopKTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.precision = resolve_precision(cfg.sae_precision, cfg.device)
        self.step_state: StepState | None = None

    def sparse_step_supported(self) -> bool:
        return (self.cfg.reshape_activations == "none" and self.W_enc.dtype == torch.float32
                and self.cfg.normalize_activations in ("none", "expected_average_only_in"))

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        if not self.sparse_step_supported():
            self.step_state = None
            return super().training_forward_pass(step_input)
        state = self._sparse_encode(step_input.sae_in)
        self.step_state = state
        sae_out = self._sparse_decode(state.idx_BK, state.acts_BK, state.W_dec_norm_F) + self.b_dec
        mse_loss = self.mse_loss_fn(sae_out, step_input.sae_in).sum(dim=-1).mean()
        feature_acts = sparse_feature_acts(state.idx_BK, state.acts_BK.detach(), self.cfg.d_sae)
        aux_losses = self.calculate_aux_loss(step_input=step_input, feature_acts=feature_acts,
                                             hidden_pre=state.hidden_pre_BF, sae_out=sae_out)
        losses = {"mse_loss": mse_loss, **aux_losses}
        total = mse_loss
        for value in aux_losses.values():
            total = total + value
        return TrainStepOutput(sae_in=step_input.sae_in, sae_out=sae_out, feature_acts=feature_acts,
                               hidden_pre=state.hidden_pre_BF, loss=total, losses=losses)

    def _sparse_encode(self, x_BD: torch.Tensor) -> StepState:
        with torch.no_grad():
            sae_in_BD = self.process_sae_in(x_BD)  # x − b_dec (when applied); its b_dec gradient is ours
        dtype = torch.bfloat16 if self.precision == "bfloat16" else torch.float32
        hidden_pre_BF = _dense_preacts(sae_in_BD, self.W_enc, self.b_enc, dtype)
        norm_F = self.W_dec.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else None
        if norm_F is not None:
            hidden_pre_BF.mul_(norm_F.detach().to(dtype))
        top_BK, idx_BK = hidden_pre_BF.topk(self.cfg.k, dim=-1, sorted=False)
        idx_BK, order = idx_BK.sort(dim=-1)
        top_BK = top_BK.gather(-1, order).float()
        hidden_BK = self._hidden_at(top_BK, idx_BK, sae_in_BD, norm_F)
        return StepState(idx_BK, hidden_BK.relu(), hidden_pre_BF, sae_in_BD, norm_F)

    def _hidden_at(self, scaled_BM, idx_BM, sae_in_BD, norm_F):
        """Hidden pre-activations (scaled as for selection) at ``idx_BM``, differentiable in every parameter."""
        b_dec = self.b_dec if self.cfg.apply_b_dec_to_input else None
        if norm_F is None:
            return _GatheredPreacts.apply(scaled_BM, idx_BM, sae_in_BD, self.W_enc, self.b_enc, b_dec)
        norm_BM = norm_F[idx_BM]
        pre_BM = _GatheredPreacts.apply(scaled_BM / norm_BM.detach(), idx_BM, sae_in_BD, self.W_enc, self.b_enc,
                                        b_dec)
        return pre_BM * norm_BM

    def _sparse_decode(self, idx_BM, acts_BM, norm_F) -> torch.Tensor:
        """Σ_m acts[b, m] · W_dec[idx[b, m]] (divided by the row norm where sae_lens rescales), without b_dec."""
        weights_BM = acts_BM / norm_F[idx_BM] if norm_F is not None else acts_BM
        return F.embedding_bag(idx_BM, self.W_dec, per_sample_weights=weights_BM, mode="sum")

    def calculate_topk_aux_loss(self, sae_in, sae_out, hidden_pre, dead_neuron_mask):
        """sae_lens's TopK auxiliary loss, computed on the dead latents' columns only."""
        state = self.step_state
        if state is None:
            return super().calculate_topk_aux_loss(sae_in, sae_out, hidden_pre, dead_neuron_mask)
        if dead_neuron_mask is None or (num_dead := int(dead_neuron_mask.sum())) == 0:
            return sae_out.new_tensor(0.0)
        residual_BD = (sae_in - sae_out).detach()
        k_aux = sae_in.shape[-1] // 2
        scale = min(num_dead / k_aux, 1.0)
        k_aux = min(k_aux, num_dead)
        dead_F = dead_neuron_mask.nonzero().squeeze(1)
        with torch.no_grad():
            top_BA, pos_BA = state.hidden_pre_BF.index_select(1, dead_F).topk(k_aux, dim=-1, sorted=False)
        idx_BA = dead_F[pos_BA]
        hidden_BA = self._hidden_at(top_BA.float(), idx_BA, state.sae_in_BD, state.W_dec_norm_F)
        recons_BD = self._sparse_decode(idx_BA, hidden_BA, state.W_dec_norm_F)
        auxk_loss = (recons_BD - residual_BD).pow(2).sum(dim=-1).mean()
        return self.cfg.aux_loss_coefficient * scale * auxk_loss

    def fired(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(idx_BK, fired_BK)`` of the current step's TopK (None on the dense fallback)."""
        if self.step_state is None:
            return None
        return self.step_state.idx_BK, self.step_state.acts_BK.detach() > 0


register_sae_training_class("saelib_topk", SparseTopKTrainingSAE, SparseTopKTrainingSAEConfig)
