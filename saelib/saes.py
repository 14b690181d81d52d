"""saelib's SAE architectures, registered with sae_lens so its trainer, saving and loading work unchanged.

* ``sgo_topk`` — sparsity-guided orthogonality: a TopK SAE whose decoder rows are pushed apart only for latent
  pairs that compete (co-fire, see ``saelib.competition``), weighted by how strongly they compete.
* ``ortsae_topk`` — OrtSAE-style (arXiv 2509.22033): every latent's largest squared cosine to the other latents
  of a random chunk, so the cost is linear in d_sae.
* ``gram_topk`` — the exact but quadratic reference: mean squared off-diagonal entry of the decoder Gram matrix.

All three are TopK SAEs at inference (saved as sae_lens ``topk``). The penalty lives in ``calculate_aux_loss``
under the key ``orth_loss``; this module does not train (``saelib.train`` does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sae_lens import register_sae_training_class
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput

from saelib import competition
from saelib.competition import CompetitionStats
from saelib.settings import OrthSettings, OrtSAESettings, SGOSettings
from saelib.sparse_step import SparseTopKTrainingSAE, SparseTopKTrainingSAEConfig, csr_matrix

ORTH_LOSS = "orth_loss"


# ---------------------------------------------------------------------------------------------- pair penalty
def _pair_csr(i_P: torch.Tensor, j_P: torch.Tensor, v_P: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inverse, M)``: the entries (i_p, j_p, v_p) as a canonical CSR (n × n) matrix — sorted by row then column,
    repeated entries summed into one — and each entry's position among M's values (``inverse``)."""
    keys, inverse = torch.unique(i_P * n + j_P, sorted=True, return_inverse=True)
    values = torch.zeros(len(keys), dtype=v_P.dtype, device=v_P.device).index_add_(0, inverse, v_P)
    crow = torch.zeros(n + 1, dtype=torch.int64, device=i_P.device)
    crow[1:] = torch.bincount(keys // n, minlength=n).cumsum(0)
    return inverse, csr_matrix(crow, keys % n, values, (n, n))


def _exact(W_FD: torch.Tensor) -> torch.Tensor:
    """``W`` in a dtype the sparse products take (float32 or float64; a bf16/fp16 decoder is computed in float32)."""
    return W_FD if W_FD.dtype in (torch.float32, torch.float64) else W_FD.float()


def _pair_dots(W_FD: torch.Tensor, i_P: torch.Tensor, j_P: torch.Tensor) -> torch.Tensor:
    """``W_i · W_j`` of each pair: ``W Wᵀ`` sampled at the (distinct) pairs, without gathering rows."""
    W_FD = _exact(W_FD)
    inverse, pattern = _pair_csr(i_P, j_P, W_FD.new_zeros(len(i_P)), W_FD.shape[0])
    return torch.sparse.sampled_addmm(pattern, W_FD, W_FD.T, beta=0.0).values()[inverse]


class _PairCos2(torch.autograd.Function):
    """Σ_p w_p cos²(d_{i_p}, d_{j_p}) over pairs of rows of the raw decoder, as sparse products: the dots are
    ``W Wᵀ`` sampled at the pairs, and the gradient is a sparse (d_sae × d_sae) matrix of pair coefficients (each
    row's self term on its diagonal) times ``W``. No gathered copy of the rows is kept, so memory is
    O(pairs + d_sae·d_in) however many pairs; the forward's sparse matrix is canonical (sorted, repeats summed),
    the backward's sums run in a fixed order (``_row_combinations``), so a resumed run stays bit-identical on CPU.
    Computed in float32 for a lower-precision decoder. 16,384 pairs at 16k × 640, forward and backward: 19 ms where gathering the rows took
    30 ms (2 threads); the backward as one ``embedding_bag``: 10.7 → 5.2 ms (2026-12-01)."""

    @staticmethod
    def forward(ctx, W_FD, i_P, j_P, w_P):
        W = _exact(W_FD)
        norm_F = torch.linalg.vector_norm(W, dim=-1).clamp_min(1e-8)
        cos_P = _pair_dots(W, i_P, j_P) / (norm_F[i_P] * norm_F[j_P])
        ctx.save_for_backward(W_FD, i_P, j_P, w_P, norm_F, cos_P)
        return (w_P * cos_P.square()).sum().to(W_FD.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        # cos = W_i·W_j / (n_i n_j): d/dW_i = W_j / (n_i n_j) − cos · W_i / n_i², and symmetrically for j
        W_FD, i_P, j_P, w_P, norm_F, cos_P = ctx.saved_tensors
        W = _exact(W_FD)
        coef_P = 2 * w_P * cos_P * grad_out
        both_i, both_j = torch.cat([i_P, j_P]), torch.cat([j_P, i_P])
        self_F = torch.zeros_like(norm_F).index_add_(0, both_i, (-coef_P * cos_P).repeat(2))
        mine = self_F.nonzero().squeeze(1)  # the self term W_i · self_i / n_i², as one more entry of row i
        grad = _row_combinations(torch.cat([both_i, mine]), torch.cat([both_j, mine]),
                                 torch.cat([(coef_P / (norm_F[i_P] * norm_F[j_P])).repeat(2),
                                            self_F[mine] / norm_F[mine].square()]), W)
        return grad.to(W_FD.dtype), None, None, None


def _row_combinations(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """The (n × d) matrix whose row r is Σ vals[e] · W[cols[e]] over the entries e with rows[e] = r (zero elsewhere):
    the product of the sparse matrix (rows, cols, vals) with ``W``, as one ``embedding_bag`` with per-entry
    weights. Each row's terms are summed in a fixed order (entries stably sorted by row), so it is deterministic.
    The penalty's backward at 16,384 pairs, 16k × 640: 5.2 ms where a CSR product plus a row-scaling pass over
    ``W`` took 10.7 ms (2 threads)."""
    rows, order = rows.sort(stable=True)
    offsets = torch.zeros(W.shape[0] + 1, dtype=torch.int64, device=W.device)
    offsets[1:] = torch.bincount(rows, minlength=W.shape[0]).cumsum(0)
    return torch.nn.functional.embedding_bag(cols[order], W, offsets, mode="sum", per_sample_weights=vals[order],
                                             include_last_offset=True)


def weighted_pair_cos2(W_dec_FD: torch.Tensor, i_P: torch.Tensor, j_P: torch.Tensor, w_P: torch.Tensor):
    """Weighted mean of squared decoder cosine similarity over pairs: Σ w·cos²(d_i, d_j) / Σ w (0 if no pair)."""
    if len(i_P) == 0:
        return W_dec_FD.new_zeros(())
    return _PairCos2.apply(W_dec_FD, i_P, j_P, w_P) / w_P.sum()


@torch.no_grad()
def pair_cos2_values(W_dec_FD: torch.Tensor, i_P: torch.Tensor, j_P: torch.Tensor) -> torch.Tensor:
    """cos²(d_i, d_j) of each pair (sparse products: memory O(pairs), no row gathered)."""
    norm_F = torch.linalg.vector_norm(W_dec_FD, dim=-1).clamp_min(1e-8)
    return (_pair_dots(W_dec_FD, i_P, j_P) / (norm_F[i_P] * norm_F[j_P])).square()


def multinomial_table(w_P: torch.Tensor) -> np.ndarray | None:
    """The cumulative table ``torch.multinomial`` builds from ``w_P`` on the CPU (a sequential float32 running sum
    divided by the total, its last entry 1, as float64), built once so that ``draw_pairs`` need not rebuild it at
    every draw; None off the CPU (there ``torch.multinomial`` runs on the device)."""
    if not competition._host_numpy(w_P) or w_P.dtype != torch.float32 or not 0 < len(w_P) <= 2**24:
        return None  # beyond 2^24 categories torch.multinomial refuses: it says so itself
    w = w_P.numpy()
    table = np.cumsum(w, dtype=np.float32)
    if not (np.isfinite(table[-1]) and table[-1] > 0 and w.min() >= 0):
        return None  # let torch.multinomial name the bad weights
    table /= table[-1]
    table[-1] = 1.0
    return table.astype(np.float64)


def draw_pairs(w_P: torch.Tensor, n: int, generator: torch.Generator, table: np.ndarray | None = None) -> torch.Tensor:
    """``n`` positions drawn with replacement with probability ∝ ``w_P``: ``torch.multinomial(w_P, n,
    replacement=True, generator=generator)`` draw for draw. With ``multinomial_table(w_P)`` given, the draws are
    the kernel's own — ``n`` uniform float64s from the generator, each placed by binary search (lower bound) in the
    table — with the table built once per competing set and the searches run in sorted order: 800k pairs,
    16,384 draws, 1.5 ms where ``torch.multinomial`` took 4.0 (it rebuilds the table every call). A single draw
    is left to ``torch.multinomial``, which takes it another way (an argmax of exponentials)."""
    if table is None or n == 1:
        return torch.multinomial(w_P, n, replacement=True, generator=generator)
    u = torch.rand(n, dtype=torch.float64, generator=generator).numpy()
    order = np.argsort(u)
    pick = np.empty(n, dtype=np.int64)
    pick[order] = np.searchsorted(table, u[order], side="left")
    return torch.from_numpy(pick)


def sampled_pair_cos2(W_dec_FD, i_P, j_P, w_P, n_samples: int, generator: torch.Generator,
                      table: np.ndarray | None = None):
    """``weighted_pair_cos2`` over all pairs, or, with more than ``n_samples`` > 0 pairs, its unbiased estimate:
    the plain mean cos² of ``n_samples`` pairs drawn with replacement with probability ∝ w (``draw_pairs``;
    ``table``: ``multinomial_table(w_P)``, kept by the caller while ``w_P`` stays the same)."""
    if 0 < n_samples < len(i_P):
        pick = draw_pairs(w_P, n_samples, generator, table)
        return weighted_pair_cos2(W_dec_FD, i_P[pick], j_P[pick], torch.ones(n_samples, device=w_P.device))
    return weighted_pair_cos2(W_dec_FD, i_P, j_P, w_P)


def latent_balanced_weights(i_P: torch.Tensor, j_P: torch.Tensor, s_P: torch.Tensor, n_latents: int) -> torch.Tensor:
    """Pair weights under which the weighted mean of cos² is the mean over latents of each latent's score-weighted
    mean cos² to its competitors: w_ij = s_ij (1/S_i + 1/S_j), with S_a the sum of latent a's scores. They sum to
    the number of competing latents, so ``weighted_pair_cos2`` with them is exactly

        (1/|A|) Σ_{a∈A} Σ_{b competes with a} s_ab cos²(d_a, d_b) / S_a

    (A: latents with a competitor), and sampling pairs ∝ w estimates it without bias."""
    S_F = torch.zeros(n_latents, dtype=s_P.dtype, device=s_P.device).index_add_(0, i_P, s_P).index_add_(0, j_P, s_P)
    return s_P * (1 / S_F[i_P] + 1 / S_F[j_P])


def competition_rows(n_rows: int, n_tokens: int, device: torch.device | str = "cpu") -> torch.Tensor | slice:
    """Rows of a batch that feed the competition statistics: every row when ``n_tokens`` is 0 or at least
    ``n_rows``, else ``n_tokens`` evenly spaced rows. A training batch is a random draw of tokens kept in cache
    order, so evenly spaced rows are a random sample spread over the whole batch (its first rows would not be)."""
    if n_tokens <= 0 or n_tokens >= n_rows:
        return slice(None)
    return torch.arange(n_tokens, device=device) * n_rows // n_tokens


def chunked_max_cos2(W_dec_FD: torch.Tensor, chunk_size: int, generator: torch.Generator) -> torch.Tensor:
    """OrtSAE-style: mean over latents of the max squared cosine to another latent of the same random chunk.

    The max's gradient reaches only its argmax, so the chunks' cosines are computed without a graph (one batched
    matmul, float32) to find each latent's partner, and the penalty is then the mean cos² over those F pairs with the
    sparse pair products: same value and gradient as autograd through the max (ties aside), in ≈ 1/10 the time and
    memory at 16k latents (no F × chunk graph kept)."""
    F = W_dec_FD.shape[0]
    perm = torch.randperm(F, generator=generator).to(W_dec_FD.device)
    partner_F = torch.full((F,), -1, dtype=torch.long, device=W_dec_FD.device)
    with torch.no_grad():
        W = _exact(W_dec_FD)
        W_hat_FD = W / torch.linalg.vector_norm(W, dim=-1, keepdim=True).clamp_min(1e-8)
        n_full = F // chunk_size
        groups = [perm[:n_full * chunk_size].view(n_full, chunk_size), perm[n_full * chunk_size:].view(1, -1)]
        for idx_NC in groups:
            if idx_NC.shape[1] < 2:
                continue
            block_NCD = W_hat_FD[idx_NC]
            cos2_NCC = torch.bmm(block_NCD, block_NCD.transpose(1, 2)).square_()
            cos2_NCC.diagonal(dim1=1, dim2=2).fill_(-1.0)  # never its own partner
            partner_F[idx_NC] = idx_NC.gather(1, cos2_NCC.argmax(dim=-1))
    i_P = torch.nonzero(partner_F >= 0).squeeze(1)
    if len(i_P) == 0:
        return W_dec_FD.new_zeros(())
    j_P = partner_F[i_P]
    return _PairCos2.apply(W_dec_FD, i_P, j_P, torch.ones(len(i_P), dtype=torch.float32, device=W_dec_FD.device)) / F


def gram_offdiag_cos2(W_dec_FD: torch.Tensor) -> torch.Tensor:
    """‖Ŵ Ŵᵀ − I‖²_F / (F(F−1)): mean squared cosine over all ordered pairs of distinct latents."""
    F = W_dec_FD.shape[0]
    W_hat_FD = W_dec_FD / W_dec_FD.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    gram = W_hat_FD @ W_hat_FD.T
    return (gram - torch.eye(F, device=gram.device, dtype=gram.dtype)).square().sum() / (F * (F - 1))


# ---------------------------------------------------------------------------------------------- configs
# Each config class inherits its settings group (declared, defaulted and validated once in saelib.settings) before
# sae_lens's base, so the group's fields follow the base's.
@dataclass
class OrthTopKTrainingSAEConfig(OrthSettings, SparseTopKTrainingSAEConfig):
    """Shared by the orthogonal TopK variants (on saelib's sparse TopK step). Saved for inference as a plain
    sae_lens TopK SAE."""


@dataclass
class SGOTopKTrainingSAEConfig(SGOSettings, OrthTopKTrainingSAEConfig):
    """Sparsity-guided orthogonality. Penalised pairs: competition score s_ij > τ (see ``saelib.competition``)."""

    @classmethod
    def architecture(cls) -> str:
        return "sgo_topk"


@dataclass
class OrtSAETopKTrainingSAEConfig(OrtSAESettings, OrthTopKTrainingSAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return "ortsae_topk"


@dataclass
class GramTopKTrainingSAEConfig(OrthTopKTrainingSAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return "gram_topk"


# ---------------------------------------------------------------------------------------------- SAEs
class _OrthTopKTrainingSAE(SparseTopKTrainingSAE):
    """saelib's sparse TopK training SAE plus ``orth_loss = λ · penalty(W_dec)``; subclasses define the penalty."""

    cfg: OrthTopKTrainingSAEConfig

    def __init__(self, cfg, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.orth_metrics: dict[str, float] = {}
        self.metrics_due = True
        """Whether this step's logging-only metrics are recorded (the trainer clears it between logged steps;
        ``competing_mean_cos2`` then keeps its last value instead of costing ≈ 10 % of an SGO step)."""

    def orth_penalty(self, step_input: TrainStepInput, feature_acts: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def calculate_aux_loss(self, step_input, feature_acts, hidden_pre, sae_out) -> dict[str, torch.Tensor]:
        losses = super().calculate_aux_loss(step_input, feature_acts, hidden_pre, sae_out)
        penalty = self.orth_penalty(step_input, feature_acts)
        if penalty is None or self.cfg.orth_pen == 0:
            losses[ORTH_LOSS] = sae_out.new_zeros(())  # adding an exact 0 keeps λ = 0 bit-identical to TopK
        else:
            losses[ORTH_LOSS] = self.cfg.orth_pen * penalty
        return losses

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        output = super().training_forward_pass(step_input)
        output.metrics.update(self.orth_metrics)
        return output


class SGOTopKTrainingSAE(_OrthTopKTrainingSAE):
    """TopK SAE with a sparsity-guided orthogonality penalty on competing latent pairs.

    With EMA firing rates p, co-firing rates c and competition scores s_ij = c_ij / min(p_i, p_j), the
    competing set is C = {(i, j) : s_ij > τ}, and after ``competition_warmup_steps`` steps

        orth_loss = λ · Σ_{(i,j)∈C} s_ij · cos²(d_i, d_j) / Σ_{(i,j)∈C} s_ij

    (``competition_normalisation="pairs"``; with ``"latents"`` the weights s_ij become w_ij of
    ``latent_balanced_weights``: a mean over competing latents instead of over pairs)

    where d_i is row i of W_dec. Statistics are updated from each batch's TopK mask (no gradient); the loss
    reaches W_dec only through the rows of competing latents. When C holds more than M =
    ``competition_sample_pairs`` pairs, the weighted mean is estimated without bias from M pairs drawn with
    probability ∝ their weight (s_ij, or w_ij per latent; their plain mean cos²), so a step's pair work is O(M)
    however many pairs compete (plus one pass over W_dec for norms and the gradient); M = 0 always uses every pair. Draws use a generator seeded by the step, never the global RNG, so λ = 0 stays
    bit-identical to TopK and a resumed run draws the same pairs. Logged metrics: ``n_competing_pairs`` and
    ``competing_mean_cos2`` (unweighted mean cos² over C, from a uniform sample of M pairs, before the step).
    """

    cfg: SGOTopKTrainingSAEConfig

    def __init__(self, cfg: SGOTopKTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.competition = CompetitionStats(cfg.d_sae, cfg.competition_decay, cfg.competition_max_pairs,
                                            cfg.competition_window, device=cfg.device)
        self._weights_for: torch.Tensor | None = None
        self._weights: tuple[torch.Tensor, np.ndarray | None] | None = None

    def orth_penalty(self, step_input, feature_acts):
        fired = self.fired()
        rows = competition_rows(feature_acts.shape[0], self.cfg.competition_stat_tokens, feature_acts.device)
        if fired is not None:
            self.competition.update_fired(fired[0][rows], fired[1][rows])
        else:  # sae_lens's dense step: the TopK is taken again from its dense activations
            self.competition.update(feature_acts[rows], self.cfg.k)
        if step_input.n_training_steps < self.cfg.competition_warmup_steps:
            self.orth_metrics = {"n_competing_pairs": 0, "competing_mean_cos2": float("nan")}
            return None
        i_C, j_C, s_C = self.competition.competing(self.cfg.competition_threshold)
        generator = torch.Generator(device=s_C.device).manual_seed(2_000_003 + step_input.n_training_steps)
        if self.metrics_due or "competing_mean_cos2" not in self.orth_metrics:
            # a logging-only number with its own generator: whether it is computed never changes the penalty's draws
            metric_gen = torch.Generator().manual_seed(3_000_017 + step_input.n_training_steps)
            mean_cos2 = self._sampled_mean_cos2(i_C, j_C, metric_gen)
        else:
            mean_cos2 = self.orth_metrics["competing_mean_cos2"]
        self.orth_metrics = {"n_competing_pairs": len(i_C), "competing_mean_cos2": mean_cos2}
        if len(i_C) == 0 or self.cfg.orth_pen == 0:
            return None
        weights, table = self._pair_weights(i_C, j_C, s_C)
        return sampled_pair_cos2(self.W_dec, i_C, j_C, weights, self.cfg.competition_sample_pairs, generator, table)

    def _pair_weights(self, i_C, j_C, s_C) -> tuple[torch.Tensor, np.ndarray | None]:
        """The penalty's pair weights (``competition_normalisation``) and their draw table (``multinomial_table``,
        when pairs are sampled), computed once per competing set: it is cached until the next fold, so are they."""
        if self._weights_for is not s_C:
            weights = s_C if self.cfg.competition_normalisation == "pairs" else \
                latent_balanced_weights(i_C, j_C, s_C, self.cfg.d_sae)
            sampled = 0 < self.cfg.competition_sample_pairs < len(s_C)
            self._weights_for, self._weights = s_C, (weights, multinomial_table(weights) if sampled else None)
        return self._weights

    @torch.no_grad()
    def _sampled_mean_cos2(self, i_C, j_C, generator) -> float:
        """Unweighted mean cos² over competing pairs (a uniform sample of ``competition_sample_pairs`` of them)."""
        if len(i_C) == 0:
            return float("nan")
        M = self.cfg.competition_sample_pairs
        if 0 < M < len(i_C):
            pick = torch.randint(0, len(i_C), (M,), generator=generator)
            i_C, j_C = i_C[pick], j_C[pick]
        return pair_cos2_values(self.W_dec, i_C, j_C).mean().item()


class OrtSAETopKTrainingSAE(_OrthTopKTrainingSAE):
    """orth_loss = λ · mean_i max_{j in chunk(i), j≠i} cos²(d_i, d_j), chunks re-drawn each step.

    The chunk permutation is seeded by the step number, so a resumed run draws the same chunks.
    """

    cfg: OrtSAETopKTrainingSAEConfig

    def orth_penalty(self, step_input, feature_acts):
        generator = torch.Generator().manual_seed(1_000_003 + step_input.n_training_steps)
        penalty = chunked_max_cos2(self.W_dec, self.cfg.orth_chunk_size, generator)
        self.orth_metrics = {"chunk_mean_max_cos2": penalty.item()}
        return penalty


class GramTopKTrainingSAE(_OrthTopKTrainingSAE):
    """orth_loss = λ · ‖Ŵ Ŵᵀ − I‖²_F / (d_sae (d_sae − 1)) — exact, O(d_sae² · d_in) per step."""

    cfg: GramTopKTrainingSAEConfig

    def orth_penalty(self, step_input, feature_acts):
        penalty = gram_offdiag_cos2(self.W_dec)
        self.orth_metrics = {"gram_mean_cos2": penalty.item()}
        return penalty


def competition_state(sae) -> dict[str, Any] | None:
    """The SAE's competition statistics for a checkpoint, or None for architectures without them."""
    stats = getattr(sae, "competition", None)
    return stats.state_dict() if stats is not None else None


register_sae_training_class("sgo_topk", SGOTopKTrainingSAE, SGOTopKTrainingSAEConfig)
register_sae_training_class("ortsae_topk", OrtSAETopKTrainingSAE, OrtSAETopKTrainingSAEConfig)
register_sae_training_class("gram_topk", GramTopKTrainingSAE, GramTopKTrainingSAEConfig)
