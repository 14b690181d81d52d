"""SAEBench feature absorption (first letter) through sae_bench's own code, with the loaded model object.

What sae_bench 0.6.0 does, what saelib changes and why:
``docs/evals.md``, section "Absorption" (in detail).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import random
import re
import shutil
import statistics
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from saelib import run_files
from saelib.evals.common import EvalError, EvalUnavailable, provenance

log = logging.getLogger(__name__)

LETTERS = "abcdefghijklmnopqrstuvwxyz"
HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")
PROBE_FORMAT = 1
"""Bump when the stored probe folder's layout or meaning changes."""


@dataclass(frozen=True)
class AbsorptionSettings:
    """Every knob of the absorption eval; sae_bench's names where it has them. Defaults: the embedded Gemma 3
    270M at ``blocks.8.hook_resid_post`` (≥ 20 letters pass sae_bench's gate; see the module doc for costs)."""

    vocab_sample_size: int = 4000
    """Words drawn (seeded) from the tokenizer's alphabetic tokens; 80 % train the probe, 20 % test it."""
    min_words_per_letter: int = 40
    """Top-up so every letter has this many words (sae_bench needs each letter in both probe splits, and its
    metrics are per-letter averages, so rare letters like x, q, y, z need enough test words)."""
    seed: int = 42
    probe_batch_size: int = 64
    """sae_bench's ``create_and_train_probe`` batch size (LLM forward batches and probe training batches)."""
    probe_num_epochs: int = 50
    probe_lr: float = 1e-2
    llm_batch_size: int = 32
    """LLM batch size of the absorption calculator."""
    max_k_value: int = 10
    f1_jump_threshold: float = 0.03
    prompt_template: str = "{word} has the first letter:"
    prompt_token_pos: int = -6
    k_sparse_probe_l1_decay: float = 0.01
    k_sparse_probe_batch_size: int = 128
    k_sparse_probe_num_epochs: int = 50
    eval_k_sparse_probe_batch_size: int = 24
    precalc_k_sparse_probe_sae_acts: bool = True
    min_GT_probe_f1: float = 0.6
    min_feats_for_eval: int = 20
    stop_at_hook_layer: bool = True
    """Stop the LLM after the hook layer (same activations, faster)."""
    reuse_prompt_activations: bool = True
    """Store the absorption prompts' hook activations next to the probe and reuse them for later SAEs."""


SMOKE = AbsorptionSettings(vocab_sample_size=200, min_words_per_letter=12, min_GT_probe_f1=0.4, min_feats_for_eval=2,
                           k_sparse_probe_num_epochs=10, max_k_value=4)
"""A fast pipeline check on the real model (≈ 1–2 min): far too few words for sae_bench's gate (F1 > 0.6 for
≥ 20 letters), so the gate is lowered; its numbers are not comparable to the default profile's."""


# --------------------------------------------------------------------------------------------- checks


def _hook_layer(sae, model) -> tuple[str, int]:
    hook = getattr(sae.cfg.metadata, "hook_name", None) if hasattr(sae.cfg, "metadata") else None
    hook = hook or getattr(sae.cfg, "hook_name", None)
    match = HOOK_RE.match(str(hook))
    if match is None:
        raise EvalError(f"sae.cfg.metadata.hook_name: expected blocks.<layer>.hook_resid_post (sae_bench's "
                        f"absorption reads the residual stream), got {hook!r}")
    layer = int(match.group(1))
    if layer >= model.cfg.n_layers:
        raise EvalError(f"sae.cfg.metadata.hook_name: layer {layer} does not exist in a {model.cfg.n_layers}-layer "
                        f"model")
    if sae.cfg.d_in != model.cfg.d_model:
        raise EvalError(f"sae.cfg.d_in: expected the model's d_model {model.cfg.d_model}, got {sae.cfg.d_in}")
    return hook, layer


def _check_settings(s: AbsorptionSettings, n_alpha: int) -> None:
    def need(ok: bool, name: str, expected: str, got: Any) -> None:
        if not ok:
            raise EvalError(f"{name}: expected {expected}, got {got!r}")

    need(isinstance(s, AbsorptionSettings), "settings", "an AbsorptionSettings", type(s).__name__)
    need(s.vocab_sample_size <= n_alpha, "vocab_sample_size",
         f"at most the {n_alpha} alphabetic tokens of the tokenizer", s.vocab_sample_size)
    need(0 <= s.min_words_per_letter <= 1000, "min_words_per_letter", "0..1000", s.min_words_per_letter)
    need(s.vocab_sample_size >= 100, "vocab_sample_size", "at least 100 words (20 % are the test split)",
         s.vocab_sample_size)
    need("{word}" in s.prompt_template, "prompt_template", "a template containing {word}", s.prompt_template)
    need(s.prompt_token_pos != 0, "prompt_token_pos", "the word's position (negative, from the end)",
         s.prompt_token_pos)
    need(2 <= s.min_feats_for_eval <= 26, "min_feats_for_eval",
         "2..26 letters (the output has standard deviations over letters)", s.min_feats_for_eval)
    need(0.0 <= s.min_GT_probe_f1 < 1.0, "min_GT_probe_f1", "a number in [0, 1)", s.min_GT_probe_f1)
    for name in ("probe_batch_size", "probe_num_epochs", "llm_batch_size", "max_k_value",
                 "k_sparse_probe_batch_size", "k_sparse_probe_num_epochs", "eval_k_sparse_probe_batch_size"):
        need(int(getattr(s, name)) >= 1, name, "a positive integer", getattr(s, name))


def _check_prompt_position(model, s: AbsorptionSettings, words: list[str]) -> None:
    """The probe reads ``prompt_token_pos``: it must be the word itself (a single token) in the template."""
    for word in words[:20]:
        ids = model.to_tokens(s.prompt_template.format(word=word))[0]
        word_ids = model.tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(word_ids) != 1 or ids[s.prompt_token_pos].item() != word_ids[0]:
            raise EvalError(f"prompt_token_pos: expected the position of the (single-token) word in "
                            f"{s.prompt_template.format(word=word)!r}, got {s.prompt_token_pos}")


# --------------------------------------------------------------------------------------------- helpers


_ALPHA_CACHE: dict[tuple, tuple[list[str], int]] = {}


def alpha_vocabulary(tokenizer, template: str = "{word} has the first letter:") -> list[str]:
    """sae_bench's alphabetic tokens, deduplicated and sorted (the tokenizer's dict order is not guaranteed),
    keeping only words that stay one token inside ``"\n" + template`` (sae_bench's calculator needs equal-length
    prompts and reads the word at a fixed position; for Gemma 3 this drops 3 words such as " YYYY")."""
    return _alpha(tokenizer, template)[0]


def _alpha(tokenizer, template: str) -> tuple[list[str], int]:
    from sae_bench.evals.absorption.vocab import get_alpha_tokens

    key = (id(tokenizer), len(tokenizer), template)
    if key not in _ALPHA_CACHE:
        words = sorted(set(get_alpha_tokens(tokenizer)))
        ids = tokenizer(["\n" + template.format(word=w) for w in words], add_special_tokens=False)["input_ids"]
        single = tokenizer(words, add_special_tokens=False)["input_ids"]
        lengths = pd.Series([len(i) for i in ids])
        usual = lengths.mode().iloc[0]
        kept = [w for w, n, one in zip(words, lengths, single) if n == usual and len(one) == 1]
        _ALPHA_CACHE.clear()
        _ALPHA_CACHE[key] = kept, len(words) - len(kept)
    return _ALPHA_CACHE[key]


def first_letter(word: str) -> str:
    return word.strip()[0].lower()


def vocab_sample(tokenizer, size: int, seed: int, min_per_letter: int = 0,
                 settings: AbsorptionSettings | None = None) -> list[str]:
    """The seeded, sorted sample of alphabetic tokens every stage sees: ``size`` words drawn uniformly, then
    topped up (same generator) so every letter has at least ``min_per_letter`` words and, given ``settings``,
    at least one word in each of the probe's train and test splits (sae_bench needs every letter in both)."""
    alpha = alpha_vocabulary(tokenizer, settings.prompt_template if settings is not None else
                             AbsorptionSettings.prompt_template)
    if size > len(alpha):
        raise EvalError(f"vocab_sample_size: expected at most the {len(alpha)} alphabetic tokens, got {size}")
    rng = random.Random(seed)
    sample = set(rng.sample(alpha, size))

    def top_up(letter: str, n: int) -> None:
        pool = [w for w in alpha if first_letter(w) == letter and w not in sample]
        sample.update(rng.sample(pool, min(n, len(pool))))

    for letter in LETTERS:
        have = sum(first_letter(w) == letter for w in sample)
        if have < min_per_letter:
            top_up(letter, min_per_letter - have)
    for _ in range(100 if settings is not None else 0):
        train, test = probe_split(sorted(sample), settings)
        missing = sorted((set(LETTERS) - {first_letter(w) for w in train})
                         | (set(LETTERS) - {first_letter(w) for w in test}))
        if not missing:
            break
        for letter in missing:
            top_up(letter, 1)
    return sorted(sample)


def probe_split(words: list[str], settings: AbsorptionSettings) -> tuple[list[str], list[str]]:
    """The probe's train and test words: sae_bench's ``create_dataset_probe_training`` under the seed, exactly
    as ``train_probe`` calls it (cheap: no model)."""
    from sae_bench.evals.absorption.probing import create_dataset_probe_training
    from sae_bench.evals.absorption.prompting import first_letter_formatter

    with _seeded(settings.seed):
        train, test = create_dataset_probe_training(
            vocab=words, formatter=first_letter_formatter(), num_prompts_per_token=1,
            base_template=settings.prompt_template)
    return [p.word for p, _ in train], [p.word for p, _ in test]


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed Python's ``random``, NumPy and torch, and restore their states afterwards."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


@contextlib.contextmanager
def _vocabulary(words: list[str]):
    """Make sae_bench's ``get_alpha_tokens`` (where its absorption code calls it) return ``words``."""
    import sae_bench.evals.absorption.common as common
    import sae_bench.evals.absorption.feature_absorption as feature_absorption

    modules = (common, feature_absorption)
    saved = [m.get_alpha_tokens for m in modules]
    for m in modules:
        m.get_alpha_tokens = lambda *_args, **_kwargs: list(words)
    try:
        yield
    finally:
        for m, original in zip(modules, saved):
            m.get_alpha_tokens = original


class _PromptActivations:
    """Hook activations at the word position, keyed by the exact prompt text (stored next to the probe)."""

    FILE = "absorption_prompt_acts.npz"

    def __init__(self, folder: Path):
        self.path = Path(folder) / self.FILE
        self.rows: dict[str, np.ndarray] = {}
        self.added = 0
        if self.path.exists():
            data = np.load(self.path)
            self.rows = dict(zip(data["keys"].tolist(), data["acts"]))

    @staticmethod
    def key(prompt: str) -> str:
        return hashlib.sha1(prompt.encode()).hexdigest()

    def save(self) -> None:
        if not self.added:
            return
        if self.path.exists():  # another process may have added rows meanwhile: keep them
            data = np.load(self.path)
            for k, a in zip(data["keys"].tolist(), data["acts"]):
                self.rows.setdefault(k, a)
        keys = sorted(self.rows)
        run_files.atomic_write(self.path, lambda tmp: np.savez(tmp, keys=np.array(keys),
                                                                acts=np.stack([self.rows[k] for k in keys])),
                               keep_suffix=True)
        self.added = 0


class _StopAtLayer:
    """The model, except that ``run_with_cache`` stops after the hook layer (sae_bench reads only that hook)
    and, given ``stored``, serves the word-position activations of prompts it has seen (see module doc)."""

    def __init__(self, model, hook: str, layer: int, stop: bool, stored: _PromptActivations | None = None,
                 pos: int = -6):
        self._model, self._hook, self._layer, self._stop = model, hook, layer, stop
        self._stored, self._pos = stored, pos

    def __getattr__(self, name):
        return getattr(self._model, name)

    def _forward(self, inputs, names_filter):
        kwargs = {"stop_at_layer": self._layer + 1} if self._stop else {}
        with torch.no_grad():
            return self._model.run_with_cache(inputs, names_filter=names_filter, **kwargs)[1]

    def run_with_cache(self, inputs, names_filter=None, **kwargs):
        if kwargs or list(names_filter or []) != [self._hook]:
            raise RuntimeError(f"unexpected run_with_cache call from sae_bench: {names_filter}, {kwargs}")
        if self._stored is None or not isinstance(inputs, list):
            return None, self._forward(inputs, names_filter)
        keys = [self._stored.key(p) for p in inputs]
        missing = [p for p, k in zip(inputs, keys) if k not in self._stored.rows]
        if missing:
            acts = self._forward(missing, names_filter)[self._hook][:, self._pos].float().cpu().numpy()
            for p, a in zip(missing, acts):
                self._stored.rows[self._stored.key(p)] = a.copy()
            self._stored.added += len(missing)
        rows = torch.from_numpy(np.stack([self._stored.rows[k] for k in keys]))
        seq = -self._pos if self._pos < 0 else self._pos + 1
        out = torch.full((len(inputs), seq, rows.shape[-1]), float("nan"), dtype=self._model.cfg.dtype)
        out[:, self._pos] = rows.to(out.dtype)
        return None, {self._hook: out}


def _words(model, s: AbsorptionSettings) -> list[str]:
    return vocab_sample(model.tokenizer, s.vocab_sample_size, s.seed, s.min_words_per_letter, s)


def _probe_key(model, hook: str, s: AbsorptionSettings, n_alpha: int) -> dict:
    return {
        "format": PROBE_FORMAT, "sae_bench": version("sae_bench"), "model": model.cfg.model_name, "hook": hook,
        "d_model": model.cfg.d_model, "n_alpha_tokens": n_alpha, "vocab_sample_size": s.vocab_sample_size,
        "min_words_per_letter": s.min_words_per_letter, "seed": s.seed, "prompt_template": s.prompt_template,
        "prompt_token_pos": s.prompt_token_pos,
        "probe_batch_size": s.probe_batch_size, "probe_num_epochs": s.probe_num_epochs, "probe_lr": s.probe_lr,
        "dtype": str(model.cfg.dtype),
    }


def _probe_dir(artifacts_dir: Path, key: dict) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    name = f"probe-{key['model']}-{key['hook']}-n{key['vocab_sample_size']}-seed{key['seed']}-{digest}"
    return Path(artifacts_dir) / "absorption" / name


def probe_f1_by_letter(model, probes_dir: Path, layer: int) -> dict[str, float]:
    """The LLM probe's test F1 per letter, as sae_bench's ``build_metrics_df`` computes ``f1_probe``."""
    from sae_bench.evals.absorption.common import load_probe, load_probe_data_split
    from sklearn import metrics

    probe = load_probe(model.cfg.model_name, layer, probes_dir, torch.float32, "cpu")
    acts, labels = load_probe_data_split(model, layer, "test", probes_dir, torch.float32, "cpu")
    with torch.no_grad():
        scores = probe(acts).numpy()
    y = np.array([label for _, label in labels])
    return {letter: float(metrics.f1_score(y == i, scores[:, i] > 0.0)) for i, letter in enumerate(LETTERS)}


def train_probe(model, hook: str, settings: AbsorptionSettings, artifacts_dir: Path) -> Path:
    """Train (once) and store the first-letter probe with sae_bench's ``create_and_train_probe``.

    Returns the ``probes_dir`` to hand to sae_bench; it holds ``key.json`` and ``probe_report.json``
    (per-letter test F1, sample, wall time). Reused when present.
    """
    from sae_bench.evals.absorption.common import create_and_train_probe
    from sae_bench.evals.absorption.prompting import first_letter_formatter

    match = HOOK_RE.match(hook)
    if match is None:
        raise EvalError(f"hook: expected blocks.<layer>.hook_resid_post, got {hook!r}")
    layer = int(match.group(1))
    if "{word}" not in str(settings.prompt_template):
        raise EvalError(f"prompt_template: expected a template containing {{word}}, got {settings.prompt_template!r}")
    n_alpha = len(alpha_vocabulary(model.tokenizer, settings.prompt_template))
    _check_settings(settings, n_alpha)
    key = _probe_key(model, hook, settings, n_alpha)
    final = _probe_dir(artifacts_dir, key)
    if (final / "probe_report.json").exists():
        return final
    words = _words(model, settings)
    _check_prompt_position(model, settings, words)
    train_words, test_words = probe_split(words, settings)
    for split, split_words in (("train", train_words), ("test", test_words)):
        missing = sorted(set(LETTERS) - {first_letter(w) for w in split_words})
        if missing:  # sae_bench's k-sparse probes and ROC AUC need every letter in both splits
            raise EvalError(f"vocab_sample_size: expected every letter in the probe's {split} split, letters "
                            f"{''.join(missing)} have none")
    final.parent.mkdir(parents=True, exist_ok=True)
    log.info("absorption: training the first-letter probe on %d words at %s (once per model/hook/settings)",
             len(words), hook)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}")
    start = time.time()
    try:
        with _seeded(settings.seed), _vocabulary(words), torch.enable_grad():
            create_and_train_probe(
                model=_StopAtLayer(model, hook, layer, settings.stop_at_hook_layer), formatter=first_letter_formatter(),
                hook_point=hook, probes_dir=tmp, vocab=words, batch_size=settings.probe_batch_size,
                num_epochs=settings.probe_num_epochs, lr=settings.probe_lr, device=torch.device("cpu"),
                base_template=settings.prompt_template, pos_idx=settings.prompt_token_pos,
            )
        stored_test = pd.read_csv(next(tmp.rglob("test_df.csv")), keep_default_na=False, na_values=[""])
        if stored_test["token"].tolist() != test_words:
            raise RuntimeError("sae_bench's probe split differs from probe_split(): sae_bench changed?")
        f1 = probe_f1_by_letter(model, tmp, layer)
        report = {"key": key, "n_words": len(words), "n_train": len(train_words), "n_test": len(test_words),
                  "words_sha1": hashlib.sha1("\n".join(words).encode()).hexdigest(),
                  "f1_probe": f1, "letters_passing": sum(v > settings.min_GT_probe_f1 for v in f1.values()),
                  "mean_f1": float(np.mean(list(f1.values()))), "wall_time_s": time.time() - start}
        (tmp / "key.json").write_text(json.dumps(key, indent=1))
        (tmp / "probe_report.json").write_text(json.dumps(report, indent=1))
        for dat in tmp.rglob("*_act_tensor.dat"):  # memmaps duplicated in data.npz
            dat.unlink()
        try:
            os.rename(tmp, final)
        except OSError:  # another process stored the same probe meanwhile
            if not (final / "probe_report.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _unit_decoder(sae):
    norms = sae.W_dec.detach().norm(dim=-1)
    if torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
        return sae, False
    sae = copy.deepcopy(sae)
    try:
        sae.fold_W_dec_norm()
    except NotImplementedError as err:
        raise EvalError(f"sae.W_dec: expected unit-norm decoder rows (absorption projects activation × cosine) "
                        f"or an SAE that can fold them, got norms {norms.min():.3g}..{norms.max():.3g} ({err})")
    return sae, True


# --------------------------------------------------------------------------------------------- the eval


def run_absorption(sae, model, settings: AbsorptionSettings, artifacts_dir: Path) -> dict:
    """SAEBench first-letter absorption of ``sae`` through sae_bench (docs/evals.md); returns the
    ``AbsorptionEvalOutput`` as a JSON dict. The probe is trained once per model/hook/settings under
    ``artifacts_dir``; SAE-side files live in a temporary folder."""
    from sae_bench.sae_bench_utils.general_utils import load_and_format_sae

    start = time.time()
    s = settings
    hook, layer = _hook_layer(sae, model)
    probes_dir = train_probe(model, hook, s, artifacts_dir)
    probe_time = time.time() - start
    report = json.loads((probes_dir / "probe_report.json").read_text())
    passing = [c for c, f in report["f1_probe"].items() if f > s.min_GT_probe_f1]
    if len(passing) < s.min_feats_for_eval:
        raise EvalUnavailable(
            f"absorption: only {len(passing)} of 26 first-letter probes reach F1 > {s.min_GT_probe_f1} at {hook} "
            f"of {model.cfg.model_name} with vocab_sample_size={s.vocab_sample_size} (sae_bench needs "
            f"min_feats_for_eval={s.min_feats_for_eval}); use a larger sample or another layer")

    sae, folded = _unit_decoder(sae)
    _, sae, _ = load_and_format_sae("saelib", sae, str(sae.device))
    sae_start = time.time()
    k_sparse, raw = _sae_experiments(sae, model, s, hook, layer, probes_dir)
    details, fractions, full_rates, n_split = _passing_letters(raw, k_sparse, s)
    firing = firing_absorption(raw, [d.first_letter for d in details])
    per_letter = {
        row["letter"]: {
            "f1_probe": float(row["f1_probe"]), "auc_probe": float(row["auc_probe"]),
            "f1_sparse_sae_1": float(row["f1_sparse_sae_1"]),
            "split_feats": [int(i) for i in row["split_feats"]],
        }
        for _, row in k_sparse.iterrows()
    }
    unstructured = {
        "saelib_metrics": {"firing": {k: v for k, v in firing.items() if k != "per_letter"}},
        "firing_per_letter": firing["per_letter"],
        "absorbing_pairs": absorbing_pairs(raw),
        "saelib_settings": asdict(s), "hook_name": hook, "n_alpha_tokens": report["key"]["n_alpha_tokens"],
        "n_alpha_tokens_dropped_multi_token": _alpha(model.tokenizer, s.prompt_template)[1],
        "vocab_words_sha1": report["words_sha1"],
        "n_words": report["n_words"], "n_probe_train": report["n_train"], "n_probe_test": report["n_test"],
        "letters_passing_probe": len(details),
        "probe_mean_f1": report["mean_f1"], "per_letter_k_sparse": per_letter,
        "decoder_norms_folded": folded, "probe_dir": probes_dir.name,
        "wall_time_s": time.time() - start, "wall_time_probe_s": probe_time,
        "wall_time_sae_s": time.time() - sae_start,
    }
    return _output(sae, model, s, details, fractions, full_rates, n_split, unstructured)


def _sae_experiments(sae, model, s: AbsorptionSettings, hook: str, layer: int, probes_dir: Path):
    """sae_bench's two SAE-side stages, seeded: the k-sparse probing experiment (its per-letter frame) and the
    feature-absorption experiment (its raw per-word frame)."""
    from sae_bench.evals.absorption.feature_absorption import run_feature_absortion_experiment
    from sae_bench.evals.absorption.k_sparse_probing import run_k_sparse_probing_experiment

    words = _words(model, s)
    stored = _PromptActivations(probes_dir) if s.reuse_prompt_activations else None
    device = str(sae.device)
    stages = tqdm(total=2, desc="absorption (k-sparse probes, absorption)", leave=False)
    with tempfile.TemporaryDirectory(prefix="saelib-absorption-") as work, _vocabulary(words), \
            torch.enable_grad():
        work = Path(work)
        with _seeded(s.seed):
            k_sparse = run_k_sparse_probing_experiment(
                model=_StopAtLayer(model, hook, layer, s.stop_at_hook_layer), sae=sae, layer=layer,
                sae_name="sae", max_k_value=s.max_k_value, prompt_template=s.prompt_template,
                prompt_token_pos=s.prompt_token_pos, device=device, experiment_dir=work / "k_sparse_probing",
                probes_dir=probes_dir, force=True, f1_jump_threshold=s.f1_jump_threshold,
                k_sparse_probe_l1_decay=s.k_sparse_probe_l1_decay,
                k_sparse_probe_batch_size=s.k_sparse_probe_batch_size,
                k_sparse_probe_num_epochs=s.k_sparse_probe_num_epochs,
                precalc_k_sparse_probe_sae_acts=s.precalc_k_sparse_probe_sae_acts,
                eval_batch_size=s.eval_k_sparse_probe_batch_size, verbose=False,
            )
        stages.update(1)
        # sae_bench's own gate (main.run_eval), on the same probe F1 as train_probe's
        n_pass = int((k_sparse["f1_probe"] > s.min_GT_probe_f1).sum())
        if n_pass < s.min_feats_for_eval:
            raise EvalUnavailable(f"absorption: only {n_pass} letters pass sae_bench's probe F1 gate at {hook}")
        with _seeded(s.seed):
            raw = run_feature_absortion_experiment(
                model=_StopAtLayer(model, hook, layer, s.stop_at_hook_layer, stored, s.prompt_token_pos),
                sae=sae, layer=layer, sae_name="sae", max_k_value=s.max_k_value, prompt_template=s.prompt_template,
                prompt_token_pos=s.prompt_token_pos, device=device, experiment_dir=work / "feature_absorption",
                sparse_probing_experiment_dir=work / "k_sparse_probing", probes_dir=probes_dir, force=True,
                feature_split_f1_jump_threshold=s.f1_jump_threshold, batch_size=s.llm_batch_size,
            )
        stages.update(1)
    stages.close()
    if stored is not None:
        stored.save()
    return k_sparse, raw


def _passing_letters(raw, k_sparse, s: AbsorptionSettings):
    """As sae_bench's main.run_eval: the letters whose LLM probe passes the F1 gate — their result details and
    absorption fractions, full-absorption rates and split-feature counts."""
    from sae_bench.evals.absorption.eval_output import AbsorptionResultDetail
    from sae_bench.evals.absorption.main import _aggregate_results_df

    agg = _aggregate_results_df(raw) if len(raw) else pd.DataFrame(columns=["letter"])
    f1_by_letter = dict(zip(k_sparse["letter"], k_sparse["f1_probe"]))
    fractions, full_rates, n_split, details = [], [], [], []
    for _, row in agg.iterrows():
        if f1_by_letter[row["letter"]] > s.min_GT_probe_f1:
            fractions.append(row["mean_absorption_fraction"])
            full_rates.append(row["full_absorption_rate"])
            n_split.append(row["num_split_feats"])
            details.append(AbsorptionResultDetail(
                first_letter=row["letter"], mean_absorption_fraction=float(row["mean_absorption_fraction"]),
                full_absorption_rate=float(row["full_absorption_rate"]),
                num_full_absorption=int(row["num_full_absorption"]),
                num_probe_true_positives=int(row["num_probe_true_positives"]),
                num_split_features=int(row["num_split_feats"]),
            ))
    if len(details) < 2:
        raise EvalUnavailable(f"absorption: only {len(details)} passing letters have probe true positives")
    return details, fractions, full_rates, n_split


def _output(sae, model, s: AbsorptionSettings, details, fractions, full_rates, n_split, unstructured) -> dict:
    """SAEBench's ``AbsorptionEvalOutput`` (validated) as a JSON dict."""
    from pydantic import TypeAdapter
    from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig
    from sae_bench.evals.absorption.eval_output import (
        EVAL_TYPE_ID_ABSORPTION, AbsorptionEvalOutput, AbsorptionMeanMetrics, AbsorptionMetricCategories,
    )

    config = AbsorptionEvalConfig(
        model_name=model.cfg.model_name, random_seed=s.seed, f1_jump_threshold=s.f1_jump_threshold,
        max_k_value=s.max_k_value, prompt_template=s.prompt_template, prompt_token_pos=s.prompt_token_pos,
        llm_batch_size=s.llm_batch_size, llm_dtype=str(model.cfg.dtype).replace("torch.", ""),
        k_sparse_probe_l1_decay=s.k_sparse_probe_l1_decay, k_sparse_probe_batch_size=s.k_sparse_probe_batch_size,
        k_sparse_probe_num_epochs=s.k_sparse_probe_num_epochs, min_GT_probe_f1=s.min_GT_probe_f1,
        min_feats_for_eval=s.min_feats_for_eval, eval_k_sparse_probe_batch_size=s.eval_k_sparse_probe_batch_size,
        precalc_k_sparse_probe_sae_acts=s.precalc_k_sparse_probe_sae_acts,
    )
    out = AbsorptionEvalOutput(
        eval_type_id=EVAL_TYPE_ID_ABSORPTION, eval_config=config, eval_id=str(uuid.uuid4()),
        datetime_epoch_millis=int(time.time() * 1000),
        eval_result_metrics=AbsorptionMetricCategories(mean=AbsorptionMeanMetrics(
            mean_absorption_fraction_score=float(statistics.mean(fractions)),
            mean_full_absorption_score=float(statistics.mean(full_rates)),
            mean_num_split_features=float(statistics.mean(n_split)),
            std_dev_absorption_fraction_score=float(statistics.stdev(fractions)),
            std_dev_full_absorption_score=float(statistics.stdev(full_rates)),
            std_dev_num_split_features=float(statistics.stdev(n_split)),
        )),
        eval_result_details=details, eval_result_unstructured=unstructured,
        **provenance(sae),
    )
    result = json.loads(out.to_json())
    TypeAdapter(AbsorptionEvalOutput).validate_python(result)
    return result


def firing_absorption(raw: pd.DataFrame, letters: list[str]) -> dict[str, Any]:
    """Absorption read from firing alone, with no filter on decoder directions, over the letters SAEBench averages.

    sae_bench's per-word rows are the test words whose LLM probe is right, with the activations of the letter's main
    (split) latents. Per letter: ``main_silent_rate`` = words on which every main latent is silent / the probe's
    true positives (the feature is present, its latents do not fire: some other latent carries the token), and
    ``silent_uncounted_rate``, the part of it that SAEBench does not count as absorption (absorption fraction 0:
    no latent that fired has decoder cosine ≥ its threshold with the probe, or they carry too little of the
    projection). A decoder-orthogonality penalty can lower SAEBench's absorption by turning the firing absorbers'
    decoders away from the probe, which moves words from counted to uncounted and leaves ``main_silent_rate`` as it
    was; only a change in what fires lowers ``main_silent_rate``. Means are over ``letters``."""
    per_letter = {}
    for letter in letters:
        rows = raw[raw["letter"] == letter]
        if not len(rows):
            continue
        positives = float(rows["num_probe_true_positives"].iloc[0])
        silent = rows["split_feat_acts"].map(lambda acts: all(a <= 0 for a in acts)).to_numpy(bool)
        uncounted = silent & (rows["absorption_fraction"].to_numpy(float) <= 0)
        per_letter[letter] = {"main_silent_rate": int(silent.sum()) / positives,
                              "silent_uncounted_rate": int(uncounted.sum()) / positives}
    if not per_letter:
        return {"mean_main_silent_rate": 0.0, "mean_silent_uncounted_rate": 0.0, "per_letter": {}}
    return {"mean_main_silent_rate": statistics.mean(r["main_silent_rate"] for r in per_letter.values()),
            "mean_silent_uncounted_rate": statistics.mean(r["silent_uncounted_rate"] for r in per_letter.values()),
            "per_letter": per_letter}


def absorbing_pairs(raw: pd.DataFrame, limit: int = 1000) -> list[dict]:
    """(main latent, absorbing latent) pairs from sae_bench's per-word absorption rows: on a word where absorption
    happened, the latent with the largest probe projection that is not one of the letter's main (split) latents
    absorbed from each main latent. Read by the competition eval (were such pairs competing?)."""
    pairs = []
    if raw is None or not len(raw):
        return pairs
    for _, row in raw.iterrows():
        if not row.get("absorption_fraction", 0) > 0:
            continue
        main = [int(i) for i in row["split_feats"]]
        absorbing = int(row["top_projection_feat"])
        if absorbing in main:
            continue
        for latent in main:
            pairs.append({"letter": row["letter"], "token": str(row["token"]), "main_latent": latent,
                          "absorbing_latent": absorbing, "absorption_fraction": float(row["absorption_fraction"]),
                          "is_full_absorption": bool(row["is_full_absorption"])})
            if len(pairs) >= limit:
                return pairs
    return pairs


def absorbers_by_prefix(run_dir: Path, widths: list[int] | None = None) -> dict[str, list[int]]:
    """Where the absorption eval's distinct absorbing and main latents sit among nested prefixes: counts per group
    ``[0, w₁), [w₁, w₂), …``. ``widths`` default to the run's own Matryoshka prefixes (SAEBench's five for any other
    architecture, to compare against). Matryoshka's first group holding most absorbers is what docs/power.md found."""
    from saelib.settings import matryoshka_widths

    cfg = run_files.read_json(Path(run_dir) / run_files.RUN_CFG_FILE)
    if widths is None:
        scheme = cfg.get("matryoshka_widths", "quarters") if cfg["architecture"] == "matryoshka_batchtopk" \
            else "saebench"
        widths = matryoshka_widths(cfg["d_sae"], scheme)
    result = run_files.read_json(Path(run_dir) / "evals" / "absorption.json")
    pairs = result["eval_result_unstructured"].get("absorbing_pairs") or []
    edges = [0, *widths]

    def per_group(ids: set[int]) -> list[int]:
        return [sum(lo <= i < hi for i in ids) for lo, hi in zip(edges, edges[1:])]

    return {"widths": list(widths), "absorbing": per_group({p["absorbing_latent"] for p in pairs}),
            "main": per_group({p["main_latent"] for p in pairs})}
