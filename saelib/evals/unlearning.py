"""SAEBench unlearning: sae_bench's own eval (online), and an offline *proxy* of it built on the same method.

What sae_bench 0.6.0 does, what saelib changes and why:
``docs/evals.md``, section "Unlearning and the unlearning proxy" (in detail).
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from saelib.evals import upstream
from saelib.evals.common import EvalError, EvalUnavailable, provenance, sae_fingerprint
from saelib.evals.unlearning_proxy import (  # the offline proxy lives in its own module
    BIOMEDICAL_SETS, activation_frequency, proxy_texts, run_proxy, tail_token_losses, validated_output,
)

MODES = ("proxy", "sae_bench")
#: Models sae_bench's unlearning eval has an instruct prompt template for (utils/metrics.py hard-codes them).
SAE_BENCH_MODELS = ("gemma-2-2b-it", "gemma-2-9b-it")
FORGET_CORPUS_FILE = "bio-forget-corpus.jsonl"


@dataclass(frozen=True)
class UnlearningSettings:
    """Knobs of the unlearning eval; defaults = the default profile (proxy on the embedded model)."""

    mode: str = "proxy"
    """"proxy" (offline, saelib) or "sae_bench" (sae_bench's own eval: hub, gated WMDP file, gemma-2-*-it)."""
    # SAEBench's grid (UnlearningEvalConfig defaults), used by both modes.
    retain_thresholds: tuple[float, ...] = (0.001, 0.01)
    n_features_list: tuple[int, ...] = (10, 20)
    multipliers: tuple[int, ...] = (25, 50, 100, 200)
    seed: int = 42
    # proxy
    forget_set: str = "101_disease_class"
    retain_exclude: tuple[str, ...] = BIOMEDICAL_SETS
    context_size: int = 128
    select_tokens: int = 16_384
    """Tokens per side (forget / retain) for the activation frequencies (packed rows, BOS masked)."""
    score_tokens: int = 512
    """Scored next-token targets per side (held-out forget / retain text), one document per row. The per-SAE cost
    is ≈ linear in it (16 grid points, ≈ 18 s each at 768 on one thread); 512 keeps the default study in one night."""
    min_doc_tokens: int = 32
    retain_tolerance: float = 0.01
    """A setting is admissible if the retain loss rises by at most this fraction of the baseline retain loss."""
    lm_batch_size: int = 8
    # sae_bench mode
    forget_corpus_path: str = ""
    """The gated WMDP ``bio-forget-corpus.jsonl``; "" = ``<artifacts_dir>/sae_bench_unlearning/bio-forget-corpus.jsonl``."""
    dataset_size: int = 1024
    seq_len: int = 1024
    llm_batch_size: int = 0
    """0 = sae_bench's table (``LLM_NAME_TO_BATCH_SIZE[model] // 8``, as its main does)."""


SMOKE = UnlearningSettings(n_features_list=(10,), multipliers=(50, 200), select_tokens=4_096, score_tokens=256)


def run_unlearning(sae, model, settings: UnlearningSettings, artifacts_dir: Path) -> dict:
    """The unlearning eval of ``sae`` on ``model``: SAEBench's ``UnlearningEvalOutput`` as a JSON dict."""
    _validate(settings)
    if settings.mode == "sae_bench":
        return _run_sae_bench(sae, model, settings, Path(artifacts_dir))
    return run_proxy(sae, model, settings, Path(artifacts_dir))


def _validate(s: UnlearningSettings) -> None:
    def need(ok: bool, name: str, expected: str, got: Any) -> None:
        if not ok:
            raise EvalError(f"{name}: expected {expected}, got {got!r}")

    need(s.mode in MODES, "mode", f"one of {MODES}", s.mode)
    for name in ("retain_thresholds", "n_features_list", "multipliers"):
        need(len(getattr(s, name)) > 0, name, "a non-empty list", getattr(s, name))
    need(all(isinstance(t, (int, float)) and 0 <= t <= 1 for t in s.retain_thresholds), "retain_thresholds",
         "frequencies in [0, 1]", s.retain_thresholds)
    need(all(isinstance(n, int) and n >= 0 for n in s.n_features_list), "n_features_list",
         "non-negative integers", s.n_features_list)
    need(all(isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in s.multipliers), "multipliers",
         "non-negative integers (latents are clamped to -multiplier, as in SAEBench)", s.multipliers)
    need(s.context_size >= 8, "context_size", "an integer >= 8", s.context_size)
    need(s.select_tokens > 0, "select_tokens", "a positive integer", s.select_tokens)
    need(s.score_tokens > 0, "score_tokens", "a positive integer", s.score_tokens)
    need(1 <= s.min_doc_tokens < s.context_size, "min_doc_tokens", "an integer in [1, context_size)",
         s.min_doc_tokens)
    need(0 <= s.retain_tolerance, "retain_tolerance", "a non-negative fraction", s.retain_tolerance)
    need(s.lm_batch_size > 0, "lm_batch_size", "a positive integer", s.lm_batch_size)


# ----------------------------------------------------------------------------------------------------------------
# sae_bench mode
# ----------------------------------------------------------------------------------------------------------------

def forget_corpus_path(settings: UnlearningSettings, artifacts_dir: Path) -> Path:
    if settings.forget_corpus_path:
        return Path(settings.forget_corpus_path).expanduser()
    return Path(artifacts_dir) / "sae_bench_unlearning" / FORGET_CORPUS_FILE


def sae_bench_preconditions(model, settings: UnlearningSettings, artifacts_dir: Path) -> list[str]:
    """What sae_bench's unlearning eval needs and this machine lacks (empty list: it can run). Fast (≤ 3 s)."""
    missing = []
    name = getattr(getattr(model, "cfg", None), "model_name", None)
    if name not in SAE_BENCH_MODELS:
        missing.append(f"an instruct model sae_bench has a prompt template for ({' or '.join(SAE_BENCH_MODELS)}, "
                       f"loaded as a HookedTransformer); got model {name!r}")
    path = forget_corpus_path(settings, artifacts_dir)
    if not path.is_file():
        missing.append(f"the gated WMDP bio forget corpus at {path} (request it via "
                       "https://huggingface.co/datasets/cais/wmdp-corpora, or set settings.forget_corpus_path)")
    from saelib.models import hub_problem

    problem = hub_problem()
    if problem:
        missing.append(f"the Hugging Face hub (cais/wmdp, cais/mmlu, wikitext); {problem}")
    return missing


def _run_sae_bench(sae, model, settings: UnlearningSettings, artifacts_dir: Path) -> dict:
    missing = sae_bench_preconditions(model, settings, artifacts_dir)
    if missing:
        raise EvalUnavailable(
            "unlearning (mode='sae_bench') cannot run here; it needs: " + "; ".join(missing)
            + ". The offline proxy runs with UnlearningSettings(mode='proxy')."
        )
    import sae_bench.sae_bench_utils.activation_collection as activation_collection
    from sae_bench.evals.unlearning.eval_config import UnlearningEvalConfig
    from sae_bench.evals.unlearning.eval_output import (
        UnlearningEvalOutput, UnlearningMetricCategories, UnlearningMetrics,
    )
    from sae_bench.evals.unlearning.main import get_metrics_df, get_unlearning_scores
    from sae_bench.evals.unlearning.utils.eval import run_eval_single_sae
    from sae_bench.sae_bench_utils.general_utils import load_and_format_sae

    start = time.time()
    model_name = model.cfg.model_name
    batch = settings.llm_batch_size or activation_collection.LLM_NAME_TO_BATCH_SIZE[model_name] // 8
    config = UnlearningEvalConfig(
        model_name=model_name, random_seed=settings.seed, retain_thresholds=list(settings.retain_thresholds),
        n_features_list=list(settings.n_features_list), multipliers=list(settings.multipliers),
        dataset_size=settings.dataset_size, seq_len=settings.seq_len, llm_batch_size=batch,
        llm_dtype=str(model.cfg.dtype).removeprefix("torch."),
    )
    _, sae, _ = load_and_format_sae("saelib", sae, str(sae.device))
    sae_name = f"saelib_{sae_fingerprint(sae)}"
    artifacts_folder = (artifacts_dir / "sae_bench_unlearning" / model_name).resolve()
    artifacts_folder.mkdir(parents=True, exist_ok=True)
    random.seed(config.random_seed)
    torch.manual_seed(config.random_seed)
    grad = torch.is_grad_enabled()
    try:
        with upstream.unlearning_data_layout(forget_corpus_path(settings, artifacts_dir).resolve(), artifacts_folder,
                                            FORGET_CORPUS_FILE):
            run_eval_single_sae(model, sae, config, str(artifacts_folder), sae_name, False)
    finally:
        torch.set_grad_enabled(grad)  # run_eval_single_sae switches gradients off globally
    score = float(get_unlearning_scores(get_metrics_df(str(artifacts_folder / sae_name / "results/metrics"))))
    out = UnlearningEvalOutput(
        eval_config=config, eval_id=str(uuid.uuid4()), datetime_epoch_millis=int(time.time() * 1000),
        eval_result_metrics=UnlearningMetricCategories(unlearning=UnlearningMetrics(unlearning_score=score)),
        eval_result_details=[], eval_result_unstructured={"wall_time_s": time.time() - start,
                                                           "saelib_settings": asdict(settings)},
        **provenance(sae),
    )
    return validated_output(out)


__all__ = ["SMOKE", "UnlearningSettings", "run_unlearning", "sae_bench_preconditions", "tail_token_losses",
           "activation_frequency", "proxy_texts"]
