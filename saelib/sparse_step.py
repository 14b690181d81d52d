"""A sparse, bf16-aware training step for TopK SAEs, as a sae_lens training SAE (``saelib_topk``).

Same loss, same parameters and same saved form as sae_lens's ``TopKTrainingSAE``; only the arithmetic differs:

* the encoder matmul stays dense (batch × d_sae pre-activations, no autograd graph, the bias and the decoder-norm
  scale folded into it), in bf16 where the device has native bf16 and its matmul is measured faster than fp32's
  (``sae_precision: auto``; :func:`auto_precision`), fp32 otherwise;
* TopK then picks k latents per row; everything after it is sparse: the decoder's forward is an ``embedding_bag``
  over the k active rows of ``W_dec`` and its backward two sparse products (CSR × dense for ``W_dec``, a sampled
  product for the activations), and the encoder's backward touches only the active columns (a CSR × dense product
  for ``W_enc``, an ``index_add_`` for ``b_enc``), so no dense batch × d_sae gradient is ever formed;
* the TopK auxiliary loss gathers only the dead latents' columns;
* ``W_enc`` keeps sae_lens's (d_in × d_sae) shape but is stored latent by latent (``latent_major``), the layout its
  sparse gradient is built in; it is saved row-major;
* ``feature_acts`` reach sae_lens's trainer as a coalesced sparse COO tensor, which its statistics accept.

The BatchTopK family takes the same step (``saelib_batchtopk``, ``saelib_matryoshka_batchtopk``): only the
selection differs (the k·B largest pre-activations of the whole batch, a varying number per row), and Matryoshka's
inner levels are sparse decodes of the chosen latents below each width. Parameters (and Adam's state) stay fp32.
The trainer is sae_lens's own ``SAETrainer``; ``saelib.train`` only gives it a fused Adam.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from sae_lens import (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, MatryoshkaBatchTopKTrainingSAE,
                      MatryoshkaBatchTopKTrainingSAEConfig, TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig,
                      register_sae_training_class)
from sae_lens.saes.sae import SAEConfig, TrainStepInput, TrainStepOutput

from saelib.settings import PrecisionSettings

PRECISIONS = ("auto", "float32", "bfloat16")
AUTO_ENV = "SAELIB_AUTO_PRECISION"  # holds what 'auto' means (a study keeping its finished runs' precision)
BF16_MIN_SPEEDUP = 1.2  # 'auto' takes bf16 only where its matmul is at least this much faster than fp32's
SPEED_FILE = "bf16_speed.json"
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


def require_device(device: str | torch.device) -> torch.device:
    """``device`` if this machine has it; else a ValueError naming the ``device`` field and the CPU default (so a
    GPU profile run on a machine without one stops at once instead of deep inside torch)."""
    dev = torch.device(device)
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device: {str(device)!r} was asked for, but torch sees "
                         f"{torch.cuda.device_count()} CUDA device(s) here; the CPU default is device: cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device: 'mps' was asked for, but this machine has no MPS backend; the CPU default is "
                         "device: cpu")
    return dev


def device_here(device: str) -> bool:
    """Whether this machine has ``device`` (a GPU profile stays declarable on a CPU machine; running it is checked)."""
    try:
        require_device(device)
    except ValueError:
        return False
    return True


def cpu_fields(wanted: tuple[str, ...] = ("model name",)) -> dict[str, str]:
    """The first value of each ``wanted`` field of ``/proc/cpuinfo`` present on this machine (none elsewhere)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key in wanted and key not in fields:
                fields[key] = value
    except OSError:
        pass
    return fields


def cpu_name() -> str:
    """This CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows of it."""
    import platform

    return cpu_fields().get("model name") or platform.processor() or platform.machine()


def cpu_id() -> str:
    """This CPU in words that tell machines apart, for the bf16 timing's record: its name; family/model/stepping (a
    cloud VM's name is as generic as "Intel(R) Xeon(R) Processor"), or an Arm CPU's implementer/part; and which bf16
    instructions it exposes (two VMs on one CPU model can mask them differently)."""
    import platform

    wanted = ("cpu family", "model", "stepping", "CPU implementer", "CPU part")
    fields = cpu_fields(wanted)
    numbers = "/".join(fields[k] for k in wanted if k in fields)
    flags = [flag for flag, has in (("avx512_bf16", torch.cpu._is_avx512_bf16_supported),
                                    ("amx", torch.cpu._is_amx_tile_supported)) if has()]
    return (f"{cpu_name()} [{platform.machine()}" + (f" {numbers}" if numbers else "") + "".join(f" {f}" for f in flags)
            + "]")


def time_matmuls(m: int = 1024, k: int = 640, n: int = 4096, repeats: int = 3) -> dict[str, float]:
    """Seconds of an (m × k) · (k × n) product on this CPU, ``{"float32": ..., "bfloat16": ...}``: the fastest of
    ``repeats`` interleaved rounds after a warm-up, on one thread (so that every process times alike, whatever its
    thread count). The default is a TopK SAE step's and an LM layer's shape: ≈ 0.4 s in all."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        own = torch.Generator().manual_seed(0)  # never the global RNG: timing must not move a seeded init
        a, b = torch.randn(m, k, generator=own), torch.randn(k, n, generator=own)
        pairs = {"float32": (a, b), "bfloat16": (a.bfloat16(), b.bfloat16())}
        for x, y in pairs.values():
            x @ y
        best = {name: math.inf for name in pairs}
        for _ in range(repeats):
            for name, (x, y) in pairs.items():
                start = time.perf_counter()
                x @ y
                best[name] = min(best[name], time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return best


def bf16_speedup(device: str | torch.device = "cpu") -> float:
    """How many times faster a bf16 matmul runs than an fp32 one on ``device``: 0.0 where bf16 is not native, inf on
    a CUDA GPU with bf16 (untimed). A CPU can report native bf16 (``avx512_bf16``) and still run it slower than fp32 —
    measured on an Intel Xeon (family 6, model 207) at 0.5× — so a CPU's is timed (:func:`cpu_bf16_speedup`)."""
    if not bf16_native(device):
        return 0.0
    if torch.device(device).type != "cpu":
        return math.inf
    return cpu_bf16_speedup()


@lru_cache(maxsize=None)
def cpu_bf16_speedup() -> float:
    """This CPU's bf16 ÷ fp32 matmul speed (:func:`time_matmuls`), timed once per CPU (:func:`cpu_id`) and torch
    version and kept in ``$SAELIB_CACHE/bf16_speed.json`` (default ``~/.cache/saelib``), so every process on the
    machine decides alike: a study's runs, each notebook's kernel. Delete the record to time again. A cache that
    cannot be written only costs the next process a new timing."""
    from saelib.models import cache_root
    from saelib.run_files import write_json_atomic

    key = f"{cpu_id()} | torch {torch.__version__}"
    path = cache_root() / SPEED_FILE
    try:
        known = json.loads(path.read_text())
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), dict) and isinstance(known[key].get("speedup"), (int, float)):
        return float(known[key]["speedup"])
    seconds = time_matmuls()
    speedup = round(seconds["float32"] / seconds["bfloat16"], 3)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {**known, key: {"float32_s": seconds["float32"], "bfloat16_s": seconds["bfloat16"],
                                                "speedup": speedup}})
    except OSError:
        pass
    return speedup


def auto_precision(device: str | torch.device, field: str = "sae_precision") -> str:
    """What ``auto`` means on ``device``: ``bfloat16`` where it is native and its matmul at least
    ``BF16_MIN_SPEEDUP`` times fp32's (:func:`bf16_speedup`), else ``float32``. ``$SAELIB_AUTO_PRECISION`` holds it
    instead (:func:`auto_held`; empty or ``auto``: no hold); a bad value, or bf16 held where it is not native, is a
    ValueError naming ``field`` and the variable."""
    held = os.environ.get(AUTO_ENV, "")
    if held not in ("", "auto"):
        if held not in ("float32", "bfloat16"):
            raise ValueError(f"{field}: 'auto' is held by ${AUTO_ENV}, which must be 'float32' or 'bfloat16' (or "
                             f"unset), got {held!r}")
        if held == "bfloat16" and not bf16_native(device):
            raise ValueError(f"{field}: 'auto' is held at 'bfloat16' by ${AUTO_ENV}, but {torch.device(device)} has "
                             f"no native bf16; unset {AUTO_ENV} or set {field}: float32")
        return held
    return "bfloat16" if bf16_speedup(device) >= BF16_MIN_SPEEDUP else "float32"


@contextmanager
def auto_held(precision: str | None):
    """Within the block, ``auto`` resolves to ``precision`` in this process and in the processes it starts (the
    notebooks' kernels): a study finishing on a machine that alone would pick the other precision. None: no hold."""
    before = os.environ.get(AUTO_ENV)
    if precision is not None:
        os.environ[AUTO_ENV] = precision
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(AUTO_ENV, None)
        else:
            os.environ[AUTO_ENV] = before


def resolve_precision(precision: str, device: str | torch.device, field: str = "sae_precision") -> str:
    """``auto`` → :func:`auto_precision` (bf16 where native and measured faster, else fp32). Forcing ``bfloat16``
    where it is not native raises a ValueError naming ``field``; a device this machine lacks raises one naming
    ``device``."""
    require_device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"{field}: expected one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "bfloat16" and not bf16_native(device):
        raise ValueError(f"{field}: 'bfloat16' was asked for, but {torch.device(device)} has no native bf16 "
                         "(it would be emulated, slower than fp32); use 'auto' or 'float32'")
    if precision == "auto":
        return auto_precision(device, field)
    return precision


# ---------------------------------------------------------------------------------------------- autograd pieces
class _GatheredPreacts(torch.autograd.Function):
    """Pre-activations ``(x_r − b_dec) · W_enc[:, j] + b_enc[j]`` at chosen (row r, latent j) pairs, whose values
    were already computed by the dense forward. The backward is sparse: it touches only the chosen columns."""

    @staticmethod
    def forward(ctx, pre_N, rows_N, cols_N, sae_in_BD, W_enc_DF, b_enc_F, b_dec_D):
        ctx.save_for_backward(rows_N, cols_N, sae_in_BD, W_enc_DF)
        ctx.has_b_dec = b_dec_D is not None
        return pre_N.clone()

    @staticmethod
    def backward(ctx, grad_N):
        rows_N, cols_N, sae_in_BD, W_enc_DF = ctx.saved_tensors
        D, F_ = W_enc_DF.shape
        grad_N = grad_N.to(sae_in_BD.dtype)
        grad_b_enc = torch.zeros(F_, dtype=grad_N.dtype, device=grad_N.device).index_add_(0, cols_N, grad_N)
        grad_W_enc = None
        if ctx.needs_input_grad[4]:
            # W_enc.grad[:, j] = Σ over chosen (r, j) of grad · x_r: a CSR (d_sae × B) matrix, rows sorted by
            # latent, times x
            order, crow = _by_latent(cols_N, F_)
            grad_W_enc = (csr_matrix(crow, rows_N[order], grad_N[order], (F_, sae_in_BD.shape[0])) @ sae_in_BD).T
        grad_b_dec = -(W_enc_DF @ grad_b_enc) if ctx.has_b_dec else None  # sae_in = x − b_dec
        return (None, None, None, None, grad_W_enc, grad_b_enc if ctx.needs_input_grad[5] else None, grad_b_dec)


def csr_matrix(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A CSR tensor built without torch's invariant check (callers build it sorted) or its beta warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _by_latent(cols_N: torch.Tensor, n_latents: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, crow)`` that lay flat (row, latent) entries, sorted by row, out as a CSR (d_sae × B) matrix, rows by
    latent (a stable sort keeps each latent's batch rows ascending, as CSR wants its columns)."""
    crow = torch.zeros(n_latents + 1, dtype=torch.int64, device=cols_N.device)
    crow[1:] = torch.bincount(cols_N, minlength=n_latents).cumsum(0)
    return torch.argsort(cols_N, stable=True), crow


class _SparseDecode(torch.autograd.Function):
    """``Σ w · W_dec[latent]`` over each row's chosen (latent, weight) entries, as ``F.embedding_bag`` computes it.

    The backward is two sparse products where ``embedding_bag``'s takes 35 ms (16,384 latents, 4,096 × 32 entries,
    2 threads): ``W_dec``'s gradient as a CSR (d_sae × B) matrix of the weights times the output gradient (13 ms),
    and the weights' gradient as that output gradient times ``W_decᵀ`` sampled at the chosen entries (13 ms)."""

    @staticmethod
    def forward(ctx, cols_N, rows_N, offsets_B, weights_N, W_dec_FD):
        ctx.save_for_backward(cols_N, rows_N, offsets_B, weights_N, W_dec_FD)
        return F.embedding_bag(cols_N, W_dec_FD, offsets_B, per_sample_weights=weights_N, mode="sum")

    @staticmethod
    def backward(ctx, grad_BD):
        cols_N, rows_N, offsets_B, weights_N, W_dec_FD = ctx.saved_tensors
        (B, _), (F_, _) = grad_BD.shape, W_dec_FD.shape
        grad_BD = grad_BD.contiguous()
        grad_w = grad_W = None
        if ctx.needs_input_grad[3]:
            crow = torch.cat([offsets_B, offsets_B.new_tensor([len(cols_N)])])
            pattern = csr_matrix(crow, cols_N, grad_BD.new_zeros(len(cols_N)), (B, F_))
            grad_w = torch.sparse.sampled_addmm(pattern, grad_BD, W_dec_FD.T, beta=0.0).values()
        if ctx.needs_input_grad[4]:
            order, crow = _by_latent(cols_N, F_)
            grad_W = csr_matrix(crow, rows_N[order], weights_N[order], (F_, B)) @ grad_BD
        return None, None, None, grad_w, grad_W


class _DenseAuxDecode(torch.autograd.Function):
    """The TopK auxiliary reconstruction ``Σ pre · W_dec[j]`` over each row's chosen dead latents ``j``, computed
    densely over the dead latents' columns: a (B × n_dead) matrix of the chosen raw pre-activations (zero elsewhere)
    times ``W_dec[dead]``, and a backward of three dense matmuls over those columns. Once a tenth of 16,384 latents
    are dead, sae_lens's ``k_aux = d_in / 2`` (320) entries a row make the sparse path gather 1.3M decoder rows a step;
    dense products over the n_dead columns cost less while ``n_dead`` is a small multiple of ``k_aux``
    (``SparseTopKTrainingSAE.aux_dense_max_ratio``). Same value and gradients as the sparse path: the raw
    pre-activation does not depend on the decoder norm, and the norm's two factors (hidden · norm, then ÷ norm in
    the decode) cancel, so no gradient reaches it. Matmuls in ``dtype`` with float32 results."""

    @staticmethod
    def forward(ctx, raw_BN, mask_BN, dead_N, sae_in_BD, W_enc_DF, b_enc_F, W_dec_FD, b_dec_D, dtype):
        W_dec_ND = W_dec_FD.detach().index_select(0, dead_N).to(dtype)
        acts_BN = torch.where(mask_BN, raw_BN, 0.0)
        ctx.save_for_backward(acts_BN, mask_BN, dead_N, sae_in_BD, W_enc_DF, W_dec_ND)
        ctx.has_b_dec, ctx.dtype = b_dec_D is not None, dtype
        return (acts_BN @ W_dec_ND).float()

    @staticmethod
    def backward(ctx, grad_BD):
        acts_BN, mask_BN, dead_N, sae_in_BD, W_enc_DF, W_dec_ND = ctx.saved_tensors
        (D, F_), dtype = W_enc_DF.shape, ctx.dtype
        g_BD = grad_BD.to(dtype)
        grad_W_enc = grad_b_enc = grad_W_dec = grad_b_dec = None
        grad_pre_BN = torch.where(mask_BN, g_BD @ W_dec_ND.T, 0.0)  # d loss / d raw pre at the chosen entries
        if ctx.needs_input_grad[6]:
            grad_W_dec = W_dec_ND.new_zeros(F_, D, dtype=torch.float32)
            grad_W_dec.index_copy_(0, dead_N, (acts_BN.T @ g_BD).float())
        if ctx.needs_input_grad[4]:  # built (d_sae × d_in), rows copied whole, returned as its transpose
            grad_W_enc_FD = W_enc_DF.new_zeros(F_, D)
            grad_W_enc_FD.index_copy_(0, dead_N, (grad_pre_BN.T @ sae_in_BD.to(dtype)).float())
            grad_W_enc = grad_W_enc_FD.T
        grad_b_enc_N = grad_pre_BN.sum(0, dtype=torch.float32)
        if ctx.needs_input_grad[5]:
            grad_b_enc = W_enc_DF.new_zeros(F_).index_copy_(0, dead_N, grad_b_enc_N)
        if ctx.has_b_dec:  # sae_in = x − b_dec
            grad_b_dec = -(W_enc_DF.index_select(1, dead_N) @ grad_b_enc_N)
        return None, None, None, None, grad_W_enc, grad_b_enc, grad_W_dec, grad_b_dec, None


def _norms_at(norm_F: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``norm_F[idx]`` whose backward is ``index_add_``: autograd's backward of advanced indexing (index_put with
    accumulate) sums repeated indices in a thread-dependent order on the CPU once they number ≈ 10⁵ (the aux loss
    gathers batch × 320), so the same step gave different gradients run to run and λ = 0 drifted from TopK."""
    return norm_F.index_select(0, idx.reshape(-1)).view(idx.shape)


class _RowNorm(torch.autograd.Function):
    """``W.norm(dim=-1)`` whose backward is one pass over ``W`` (autograd's is three: a division, a mask and a
    product)."""

    @staticmethod
    def forward(ctx, W_FD):
        norm_F = torch.linalg.vector_norm(W_FD, dim=-1)
        ctx.save_for_backward(W_FD, norm_F)
        return norm_F

    @staticmethod
    def backward(ctx, grad_F):
        W_FD, norm_F = ctx.saved_tensors
        return W_FD * torch.where(norm_F > 0, grad_F / norm_F, 0.0)[:, None]


def _dense_preacts(sae_in_BD: torch.Tensor, W_enc_DF: torch.Tensor, b_enc_F: torch.Tensor, dtype: torch.dtype,
                   scale_F: torch.Tensor | None = None) -> torch.Tensor:
    """``(sae_in @ W_enc + b_enc) · scale`` without an autograd graph, computed in ``dtype``.

    The bias and the scale ride inside the one matmul: ``sae_in`` gains a column of ones (and zero padding to a
    multiple of 16 columns) and ``W_enc``, scaled column-wise, a row ``b_enc · scale``. An ``addmm`` would first copy
    the bias into every row of the B × d_sae output and a scale would be one more pass over it: at batch 4,096 ×
    16,384 latents in bf16 the folded matmul takes 107 ms where ``addmm`` and ``mul_`` took 123 ms, and it rounds the
    bias once instead of twice (``benchmarks/bench_speed.py`` measures the whole step).

    The copy of ``W_enc`` follows its memory layout: latent-major (``SparseTopKTrainingSAE`` stores it so) gives a
    (d_sae × P) matrix used transposed, which the bf16 matmul also runs faster (105 against 115 ms here, same
    result bit for bit); a row-major ``W_enc`` gives (P × d_sae)."""
    with torch.no_grad():
        B, D = sae_in_BD.shape
        F_ = W_enc_DF.shape[1]
        P = D + 16 - D % 16
        x_BP = sae_in_BD.new_zeros(B, P, dtype=dtype)
        x_BP[:, :D] = sae_in_BD
        x_BP[:, D] = 1
        if W_enc_DF.stride(0) == 1 and F_ > 1:  # latent-major: built as (d_sae × P), each op in memory order
            W_FP = W_enc_DF.new_empty(F_, P, dtype=dtype)
            if scale_F is None:
                W_FP[:, :D] = W_enc_DF.T
                W_FP[:, D] = b_enc_F
            else:
                torch.mul(W_enc_DF.T, scale_F[:, None], out=W_FP[:, :D])
                torch.mul(b_enc_F, scale_F, out=W_FP[:, D])
            W_FP[:, D + 1:] = 0
            return x_BP @ W_FP.T
        W_PF = W_enc_DF.new_empty(P, F_, dtype=dtype)
        if scale_F is None:
            W_PF[:D] = W_enc_DF
            W_PF[D] = b_enc_F
        else:
            torch.mul(W_enc_DF, scale_F, out=W_PF[:D])
            torch.mul(b_enc_F, scale_F, out=W_PF[D])
        W_PF[D + 1:] = 0
        return x_BP @ W_PF


@dataclass
class StepState:
    """What one sparse forward leaves for the losses and statistics of the same step."""

    idx: torch.Tensor
    """Chosen latents: (B, k), ascending within each row (TopK), or flat (N,) sorted by row then latent, the rows in
    ``rows`` (BatchTopK, a varying number per row)."""
    acts: torch.Tensor
    """Their activations (ReLU of the chosen values; may be 0), shaped like ``idx``, with autograd graph."""
    hidden_pre_BF: torch.Tensor
    """Dense pre-activations as used for selection (scaled by decoder norms where sae_lens does), no graph."""
    sae_in_BD: torch.Tensor
    """Encoder input (``x − b_dec`` where sae_lens applies it), no graph."""
    W_dec_norm_F: torch.Tensor | None
    """Decoder row norms with autograd graph (``rescale_acts_by_decoder_norm``), else None."""
    rows: torch.Tensor | None = None
    """Row of each flat entry (None when ``idx`` is (B, k))."""


def _row_of(idx_BM: torch.Tensor) -> torch.Tensor:
    """The row of each entry of a (B, M) selection, flattened: 0 × M, 1 × M, …"""
    return torch.arange(idx_BM.shape[0], device=idx_BM.device).repeat_interleave(idx_BM.shape[1])


def sparse_feature_acts(idx: torch.Tensor, acts: torch.Tensor, d_sae: int, rows: torch.Tensor | None = None,
                        n_rows: int | None = None) -> torch.Tensor:
    """A coalesced (B, d_sae) COO tensor of chosen activations: ``idx`` (B, k) ascending within each row, or flat with
    the row of each entry in ``rows`` (sorted by row then latent; ``n_rows`` = B)."""
    B = idx.shape[0] if rows is None else n_rows
    return torch.sparse_coo_tensor(torch.stack([_row_of(idx) if rows is None else rows, idx.reshape(-1)]),
                                   acts.reshape(-1), (B, d_sae), is_coalesced=True, check_invariants=False)


# ---------------------------------------------------------------------------------------------- the SAE
def latent_major(W_enc_DF: torch.Tensor) -> torch.Tensor:
    """The same (d_in × d_sae) values stored latent by latent (strides (1, d_in)), as the sparse step keeps ``W_enc``.

    Its gradient is built that way (a CSR (d_sae × B) matrix times the batch) and the encoder's matmul runs faster
    on a latent-major copy; a row-major parameter made autograd transpose every step's 42 MB gradient into its
    layout (9.5 ms at 16,384 latents on 2 cores). Optimiser states follow the parameter's strides
    (``saelib.train.HistoryTrainer``); what is saved is row-major, as sae_lens and SAEBench read it."""
    return W_enc_DF.T.contiguous().T


def _row_major_W_enc(state_dict: dict) -> None:
    """safetensors writes contiguous tensors only."""
    if "W_enc" in state_dict:
        state_dict["W_enc"] = state_dict["W_enc"].contiguous()


@dataclass
class SparseTopKTrainingSAEConfig(PrecisionSettings, TopKTrainingSAEConfig):
    """sae_lens's TopK training config plus the step's precision (``PrecisionSettings``). Saved for inference as a
    plain ``topk`` SAE."""

    @classmethod
    def architecture(cls) -> str:
        return "saelib_topk"

    def __post_init__(self):
        super().__post_init__()
        self.check_settings()

    def get_inference_config_class(self) -> type[SAEConfig]:
        return TopKSAEConfig


class SparseTopKTrainingSAE(TopKTrainingSAE):
    """sae_lens's TopK training SAE with the sparse step (see the module docstring).

    Configurations the sparse step does not cover (activation reshaping, normalisations applied inside the SAE,
    non-fp32 weights) fall back to sae_lens's dense step, unchanged.
    """

    cfg: SparseTopKTrainingSAEConfig
    aux_dense_max_ratio = {"bfloat16": 16.0, "float32": 5.0}
    """By precision: the aux loss goes dense over the dead columns while ``n_dead ≤ ratio · k_aux`` (0: always
    sparse). Where dense/sparse time crosses 1 at 16,384 latents, batch 4,096, d_in 640 on 2 Zen 5 cores
    (``benchmarks/bench_aux.py``, docs/speed.md)."""

    def __init__(self, cfg: SparseTopKTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.precision = resolve_precision(cfg.sae_precision, cfg.device)
        self.step_state: StepState | None = None
        self.W_enc = torch.nn.Parameter(latent_major(self.W_enc.data))

    def process_state_dict_for_saving(self, state_dict: dict) -> None:
        super().process_state_dict_for_saving(state_dict)
        _row_major_W_enc(state_dict)

    def process_state_dict_for_saving_inference(self, state_dict: dict) -> None:
        super().process_state_dict_for_saving_inference(state_dict)
        _row_major_W_enc(state_dict)

    def sparse_step_supported(self) -> bool:
        return (self.cfg.reshape_activations == "none" and self.W_enc.dtype == torch.float32
                and self.cfg.normalize_activations in ("none", "expected_average_only_in"))

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        if not self.sparse_step_supported():
            self.step_state = None
            return super().training_forward_pass(step_input)
        state = self._sparse_encode(step_input.sae_in)
        self.step_state = state
        sae_out = self._sparse_decode(state.idx, state.acts, state.W_dec_norm_F, state.rows,
                                      len(step_input.sae_in)) + self.b_dec
        mse_loss = self.mse_loss_fn(sae_out, step_input.sae_in).sum(dim=-1).mean()
        feature_acts = sparse_feature_acts(state.idx, state.acts.detach(), self.cfg.d_sae, state.rows,
                                           len(step_input.sae_in))
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
        norm_F = _RowNorm.apply(self.W_dec) if self.cfg.rescale_acts_by_decoder_norm else None
        hidden_pre_BF = _dense_preacts(sae_in_BD, self.W_enc, self.b_enc, dtype,
                                       None if norm_F is None else norm_F.detach())
        values, idx, rows = self._select(hidden_pre_BF)
        hidden = self._hidden_at(values.float(), idx, sae_in_BD, norm_F, rows)
        return StepState(idx, hidden.relu(), hidden_pre_BF, sae_in_BD, norm_F, rows)

    def _select(self, hidden_pre_BF: torch.Tensor):
        """``(values, idx, rows)`` of the latents this step keeps: TopK's ``k`` per row, as (B, k) tensors ascending
        within each row, ``rows`` None."""
        top_BK, idx_BK = hidden_pre_BF.topk(self.cfg.k, dim=-1, sorted=False)
        idx_BK, order = idx_BK.sort(dim=-1)
        return top_BK.gather(-1, order), idx_BK, None

    def _hidden_at(self, scaled, idx, sae_in_BD, norm_F, rows=None):
        """Hidden pre-activations (scaled as for selection) at ``idx`` — (B, M), or flat with ``rows`` — differentiable
        in every parameter."""
        b_dec = self.b_dec if self.cfg.apply_b_dec_to_input else None
        flat_idx = idx.reshape(-1)
        norm = _norms_at(norm_F, flat_idx) if norm_F is not None else None
        pre = _GatheredPreacts.apply(scaled.reshape(-1) if norm is None else scaled.reshape(-1) / norm.detach(),
                                     _row_of(idx) if rows is None else rows, flat_idx, sae_in_BD, self.W_enc,
                                     self.b_enc, b_dec)
        return (pre if norm is None else pre * norm).view(idx.shape)

    def _sparse_decode(self, idx, acts, norm_F, rows=None, B=None) -> torch.Tensor:
        """Σ acts · W_dec[idx] per row (divided by the row norm where sae_lens rescales), without b_dec. ``idx`` is
        (B, M), or flat with the (sorted) row of each entry in ``rows`` and the batch size ``B``."""
        weights = acts / _norms_at(norm_F, idx) if norm_F is not None else acts
        if rows is None:
            B, M = idx.shape
            offsets = torch.arange(0, B * M, M, device=idx.device)
            return _SparseDecode.apply(idx.reshape(-1), _row_of(idx), offsets, weights.reshape(-1), self.W_dec)
        offsets = torch.zeros(B, dtype=torch.int64, device=idx.device)
        offsets[1:] = torch.bincount(rows, minlength=B)[:-1].cumsum(0)
        return _SparseDecode.apply(idx, rows, offsets, weights, self.W_dec)

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
        dense = num_dead <= self.aux_dense_max_ratio.get(self.precision, 0.0) * k_aux
        with torch.no_grad():
            pre_BN = state.hidden_pre_BF.index_select(1, dead_F)
            top_BA, pos_BA = pre_BN.topk(k_aux, dim=-1, sorted=False)
        if dense:
            recons_BD = self._dense_aux_decode(state, dead_F, pre_BN, pos_BA)
        else:
            with torch.no_grad():
                pos_BA, order = pos_BA.sort(dim=-1)  # ascending within rows (dead_F is ascending): a canonical CSR
                top_BA = top_BA.gather(-1, order)
            idx_BA = dead_F[pos_BA]
            hidden_BA = self._hidden_at(top_BA.float(), idx_BA, state.sae_in_BD, state.W_dec_norm_F)
            recons_BD = self._sparse_decode(idx_BA, hidden_BA, state.W_dec_norm_F)
        auxk_loss = (recons_BD - residual_BD).pow(2).sum(dim=-1).mean()
        return self.cfg.aux_loss_coefficient * scale * auxk_loss

    def _dense_aux_decode(self, state: StepState, dead_F: torch.Tensor, pre_BN: torch.Tensor,
                          pos_BA: torch.Tensor) -> torch.Tensor:
        """The aux reconstruction by ``_DenseAuxDecode``: the chosen (row, dead latent) entries ``pos_BA`` as a mask
        over the dead columns, their raw pre-activations from the step's dense forward ``pre_BN`` (its dead columns,
        scaled as for selection)."""
        dtype = torch.bfloat16 if self.precision == "bfloat16" else torch.float32
        with torch.no_grad():
            pre_BN = pre_BN.to(dtype)  # in the dense forward's precision
            if state.W_dec_norm_F is not None:
                pre_BN = pre_BN / state.W_dec_norm_F.detach().index_select(0, dead_F).to(dtype)
            mask_BN = torch.zeros(pre_BN.shape, dtype=torch.bool, device=pre_BN.device).scatter_(1, pos_BA, True)
        b_dec = self.b_dec if self.cfg.apply_b_dec_to_input else None
        return _DenseAuxDecode.apply(pre_BN, mask_BN, dead_F, state.sae_in_BD, self.W_enc, self.b_enc, self.W_dec,
                                     b_dec, dtype)

    def fired(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(idx_BK, fired_BK)`` of the current step's TopK (None on the dense fallback)."""
        if self.step_state is None or self.step_state.rows is not None:
            return None
        return self.step_state.idx, self.step_state.acts.detach() > 0


# ---------------------------------------------------------------------------------------------- BatchTopK family
@dataclass
class SparseBatchTopKTrainingSAEConfig(BatchTopKTrainingSAEConfig, SparseTopKTrainingSAEConfig):
    """sae_lens's BatchTopK training config plus the step's precision. Saved for inference as a JumpReLU SAE."""

    @classmethod
    def architecture(cls) -> str:
        return "saelib_batchtopk"


class SparseBatchTopKTrainingSAE(SparseTopKTrainingSAE, BatchTopKTrainingSAE):
    """sae_lens's BatchTopK training SAE with the sparse step: the ``k · B`` largest pre-activations of the whole
    batch are kept (a varying number per row), then the same sparse decode and backward as TopK. The threshold
    that the saved JumpReLU SAE uses is updated as sae_lens does."""

    cfg: SparseBatchTopKTrainingSAEConfig

    CANDIDATES_PER_K = 4
    """Each row's top ``4·k`` are the first candidates (see ``_select``)."""

    def _select(self, hidden_pre_BF: torch.Tensor):
        """The ``k · B`` largest entries of the batch as flat tensors sorted by row then latent (sae_lens takes them
        after a ReLU; without it the choice differs only among entries whose activation is 0 either way).

        A top-k over all B·d_sae entries costs twice the whole sparse step at 16k latents, so it is done in two
        stages with the same result (up to the order of ties): each row's top ``4·k`` are candidates, and the
        ``k · B``-th largest candidate ``t`` bounds the true threshold from below; a row whose every candidate
        reaches ``t`` may hold more, so all of its entries join the candidates; every entry left out is then below
        ``t``, below the final threshold."""
        B, F_ = hidden_pre_BF.shape
        n, m = int(self.cfg.k * B), min(F_, self.CANDIDATES_PER_K * math.ceil(self.cfg.k))
        if n >= B * m:
            values, flat = hidden_pre_BF.flatten().topk(n, sorted=False)
        else:
            cand_BM, col_BM = hidden_pre_BF.topk(m, dim=-1, sorted=False)
            flat = (torch.arange(B, device=col_BM.device)[:, None] * F_ + col_BM).flatten()
            values = cand_BM.flatten()
            bound = values.topk(n, sorted=False).values.min()
            full = (cand_BM.min(dim=-1).values >= bound).nonzero().squeeze(1)
            if len(full):
                keep = ~torch.isin(flat // F_, full)
                values = torch.cat([values[keep], hidden_pre_BF[full].flatten()])
                flat = torch.cat([flat[keep], (full[:, None] * F_ + torch.arange(F_, device=full.device)).flatten()])
            values, pick = values.topk(n, sorted=False)
            flat = flat[pick]
        flat, order = flat.sort()
        return values[order], flat % F_, flat // F_

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        output = super().training_forward_pass(step_input)  # sae_lens's dense step updates the threshold itself
        if self.step_state is not None:
            self.update_topk_threshold(self.step_state.acts.detach())
            output.metrics["topk_threshold"] = self.topk_threshold
        return output


@dataclass
class SparseMatryoshkaBatchTopKTrainingSAEConfig(MatryoshkaBatchTopKTrainingSAEConfig,
                                                 SparseBatchTopKTrainingSAEConfig):
    """sae_lens's Matryoshka BatchTopK training config plus the step's precision. Saved as a JumpReLU SAE."""

    @classmethod
    def architecture(cls) -> str:
        return "saelib_matryoshka_batchtopk"


class SparseMatryoshkaBatchTopKTrainingSAE(SparseBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAE):
    """sae_lens's Matryoshka BatchTopK training SAE with the sparse step: each inner level's reconstruction is a
    sparse decode of the chosen latents below its width, added to the previous level's, as sae_lens nests them."""

    cfg: SparseMatryoshkaBatchTopKTrainingSAEConfig

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        output = super().training_forward_pass(step_input)  # the dense fallback adds the inner losses itself
        state = self.step_state
        if state is None:
            return output
        decoded, prev = self.b_dec, 0
        for width in self.cfg.matryoshka_widths[:-1]:  # the outer level is the base SAE's own loss
            level = (state.idx >= prev) & (state.idx < width)
            decoded = decoded + self._sparse_decode(state.idx[level], state.acts[level], state.W_dec_norm_F,
                                                    state.rows[level], len(step_input.sae_in))
            inner = self.run_time_activation_norm_fn_out(decoded)
            loss = self.mse_loss_fn(inner, step_input.sae_in).sum(dim=-1).mean()
            output.losses[f"inner_mse_loss_{width}"] = loss
            output.loss = output.loss + loss
            prev = width
        return output


register_sae_training_class("saelib_topk", SparseTopKTrainingSAE, SparseTopKTrainingSAEConfig)
register_sae_training_class("saelib_batchtopk", SparseBatchTopKTrainingSAE, SparseBatchTopKTrainingSAEConfig)
register_sae_training_class("saelib_matryoshka_batchtopk", SparseMatryoshkaBatchTopKTrainingSAE,
                            SparseMatryoshkaBatchTopKTrainingSAEConfig)
