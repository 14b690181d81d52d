"""The offline unlearning *proxy*: SAEBench's latent selection and clamping intervention on the embedded model,
scored on held-out medical text (forget) and general text (retain) instead of WMDP/MMLU (which need the hub).
``saelib.evals.unlearning`` is the eval's entry point (settings, validation, dispatch); details in docs/evals.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from saelib import run_files
from saelib.evals.common import EvalError, provenance

PROXY_EVAL_TYPE_ID = "unlearning_proxy"
PROXY_DATA_VERSION = "unlearning-proxy/v1"
#: Biomedical Pile subsets kept out of the retain text (the forget topic is medicine).
BIOMEDICAL_SETS = (
    "69_blood-pressure", "72_gene-expression", "73_control-group", "75_cell-lines", "80_side-effects",
    "81_public-health", "84_clinical-trials", "85_mental-health",
)


# ----------------------------------------------------------------------------------------------------------------
# proxy: data
# ----------------------------------------------------------------------------------------------------------------

def _forget_texts(forget_set: str) -> list[str]:
    from saelib.corpus import (
        PROBING_SETS, PROSE_SETS, SHORT_SETS, _near_dup_key, offline_documents, read_sae_probes_set,
    )

    if forget_set in PROSE_SETS + SHORT_SETS:
        return [text for source, text in offline_documents() if source == f"sae_probes/{forget_set}"]
    if forget_set in PROBING_SETS:  # never trained on: deduplicate the same way the corpus does
        seen, texts = set(), []
        for text in read_sae_probes_set(forget_set)["prompt"].astype(str):
            text, key = text.strip(), _near_dup_key(text)
            if text and key not in seen:
                seen.add(key)
                texts.append(text)
        return texts
    raise EvalError(f"forget_set: expected a sae-probes set of saelib.corpus (PROSE_SETS, SHORT_SETS or "
                    f"PROBING_SETS), got {forget_set!r}")


def proxy_texts(settings) -> dict[str, list[str]]:
    """The four disjoint text lists: forget/retain × select (corpus train split) / score (held-out eval split)."""
    from saelib.corpus import offline_documents, split_of

    forget = _forget_texts(settings.forget_set)
    excluded = {f"sae_probes/{stem}" for stem in (settings.forget_set, *settings.retain_exclude)}
    retain = [text for source, text in offline_documents() if source not in excluded]
    out = {}
    for side, texts in (("forget", forget), ("retain", retain)):
        texts = list(texts)
        random.Random(f"{settings.seed}/{side}").shuffle(texts)
        out[f"{side}_select"] = [t for t in texts if split_of(t) == "train"]
        out[f"{side}_score"] = [t for t in texts if split_of(t) == "eval"]
    return out


def _packed_rows(tokenizer, texts: list[str], ctx: int, budget: int) -> torch.Tensor:
    """Selection rows packed like the SAE's training sequences (BOS first and between documents, as
    ``saelib.corpus`` does), enough for ``budget`` tokens; special positions are masked later, as sae_bench does."""
    from saelib.corpus import _tokenize

    rows = _tokenize(tokenizer, iter(texts), math.ceil(budget / (ctx - 1)), ctx)
    if len(rows) == 0:
        raise EvalError("forget_set: no selection text (its train split is empty)")
    return torch.from_numpy(rows.astype(np.int64))


def _rows(tokenizer, texts: list[str], ctx: int, min_tokens: int, budget: int, what: str) -> torch.Tensor:
    """Scoring rows ``[BOS, first ctx-1 tokens of one document, PAD…]`` (documents shorter than ``min_tokens``
    skipped) until ``budget`` document tokens are collected or the texts run out. One document per row: no
    document boundary inside a row, and rows are independent samples for the standard errors."""
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    rows, total = [], 0
    for text in texts:
        chunk = tokenizer(text, add_special_tokens=False)["input_ids"][:ctx - 1]
        if len(chunk) < min_tokens:
            continue
        rows.append([bos, *chunk] + [pad] * (ctx - 1 - len(chunk)))
        total += len(chunk)
        if total >= budget:
            break
    if not rows:
        raise EvalError(f"{what}: no document with at least min_doc_tokens tokens")
    return torch.tensor(rows, dtype=torch.long)


def _hook_layer(sae) -> tuple[str, int]:
    """(hook name, first block to run after it) — ``start_at_layer`` for the rest of the model."""
    hook = getattr(sae.cfg, "hook_name", None) or sae.cfg.metadata.hook_name
    parts = hook.split(".")
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit():
        if parts[2] == "hook_resid_post":
            return hook, int(parts[1]) + 1
        if parts[2] == "hook_resid_pre":
            return hook, int(parts[1])
    raise EvalError(f"sae hook: expected blocks.<L>.hook_resid_post or hook_resid_pre, got {hook!r}")


def _valid_mask(tokens: torch.Tensor, tokenizer) -> torch.Tensor:
    from sae_bench.sae_bench_utils.activation_collection import get_bos_pad_eos_mask

    return get_bos_pad_eos_mask(tokens, tokenizer)


@torch.no_grad()
def _hook_resid(model, tokens: torch.Tensor, hook: str, start: int, batch: int, desc: str) -> torch.Tensor:
    out = []
    for i in tqdm(range(0, len(tokens), batch), desc=desc, leave=False):
        _, cache = model.run_with_cache(tokens[i:i + batch], stop_at_layer=start, names_filter=hook)
        out.append(cache[hook].float().cpu())
    return torch.cat(out)


@torch.no_grad()
def tail_token_losses(model, resid: torch.Tensor, tokens: torch.Tensor, start: int,
                      loss_mask: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Next-token losses at the positions of ``loss_mask`` (B, S-1) from the hook-layer residual: blocks from
    ``start`` on, final norm, unembedding (and soft-cap) only at the requested positions. Equals TransformerLens's
    ``loss_per_token`` of a full forward there (checked when the LM side is computed)."""
    from transformer_lens.utilities.activation_functions import apply_softcap

    h = model(resid.to(model.cfg.device), start_at_layer=start, stop_at_layer=model.cfg.n_layers)
    if model.cfg.normalization_type is not None:
        h = model.ln_final(h)
    h_sel = h[:, :-1][loss_mask.to(h.device)]
    targets = tokens[:, 1:][loss_mask].to(h.device)
    out = []
    for i in range(0, len(h_sel), chunk):
        logits = apply_softcap(model.unembed(h_sel[None, i:i + chunk])[0], model.cfg.output_logits_soft_cap)
        logp = torch.log_softmax(logits.float(), dim=-1)
        out.append(-logp.gather(-1, targets[i:i + chunk, None])[:, 0])
    return torch.cat(out).cpu() if out else torch.zeros(0)


def _loss_mask(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B, S-1): position p predicts a real (non-pad) token p+1."""
    return tokens[:, 1:] != pad_id


@torch.no_grad()
def _score_side(model, tokens: torch.Tensor, hook: str, start: int, batch: int, desc: str) -> dict:
    resid = _hook_resid(model, tokens, hook, start, batch, f"{desc}: hook residuals")
    mask = _loss_mask(tokens, model.tokenizer.pad_token_id)
    base = torch.zeros(mask.shape)
    for i in tqdm(range(0, len(tokens), batch), desc=f"{desc}: baseline loss", leave=False):
        m = mask[i:i + batch]
        base[i:i + batch][m] = tail_token_losses(model, resid[i:i + batch], tokens[i:i + batch], start, m)
    return {"tokens": tokens, "resid": resid, "base_loss": base, "loss_mask": mask}


@torch.no_grad()
def _shortcut_check(model, side: dict, start: int, n_rows: int = 2) -> float:
    """Max |loss(full forward) − loss(stored hook residual → rest of the model)| on a few rows."""
    tokens, mask = side["tokens"][:n_rows], side["loss_mask"][:n_rows]
    full = model(tokens.to(model.cfg.device), return_type="loss", loss_per_token=True).cpu()
    return float((full[mask] - side["base_loss"][:n_rows][mask]).abs().max())


def lm_side(model, settings, hook: str, start: int, artifacts_dir: Path) -> dict:
    """Everything that depends only on the LM and the data, computed once and stored under ``artifacts_dir``."""
    from saelib.activations import exclusive_lock
    from saelib.corpus import CORPUS_VERSION

    tok = model.tokenizer
    key = {"what": PROXY_DATA_VERSION, "corpus": CORPUS_VERSION, "model": model.cfg.model_name,
           "d_model": model.cfg.d_model, "n_layers": model.cfg.n_layers, "vocab": model.cfg.d_vocab,
           "tokenizer": getattr(tok, "name_or_path", None), "hook": hook,
           "forget_set": settings.forget_set, "retain_exclude": sorted(settings.retain_exclude),
           "context_size": settings.context_size, "select_tokens": settings.select_tokens,
           "score_tokens": settings.score_tokens, "min_doc_tokens": settings.min_doc_tokens, "seed": settings.seed,
           "dtype": str(model.cfg.dtype)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(artifacts_dir) / f"unlearning_proxy-{digest}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(path.with_suffix(".lock")):
        if path.exists():
            return torch.load(path, weights_only=True)
        start_time, cpu0 = time.time(), time.process_time()
        texts = proxy_texts(settings)
        ctx, mn, batch = settings.context_size, settings.min_doc_tokens, settings.lm_batch_size
        data: dict[str, Any] = {"key": json.dumps(key, sort_keys=True)}
        for side in ("forget", "retain"):
            rows = _packed_rows(tok, texts[f"{side}_select"], ctx, settings.select_tokens)
            resid = _hook_resid(model, rows, hook, start, batch, f"{side} selection")
            data[f"{side}_select"] = resid[_valid_mask(rows, tok)].contiguous()  # BOS/PAD/EOS out, as sae_bench
        for side in ("forget", "retain"):
            rows = _rows(tok, texts[f"{side}_score"], ctx, mn, settings.score_tokens, f"{side} scoring")
            data[f"{side}_score"] = _score_side(model, rows, hook, start, batch, f"{side} scoring")
        data["shortcut_max_abs_diff"] = _shortcut_check(model, data["forget_score"], start)
        if not data["shortcut_max_abs_diff"] < 1e-3:
            raise RuntimeError(f"unlearning proxy: start_at_layer={start} shortcut differs from a full forward by "
                               f"{data['shortcut_max_abs_diff']:.3g} nats")
        data["n_docs"] = {k: len(v) for k, v in texts.items()}
        data["lm_side_seconds"] = time.time() - start_time
        data["lm_side_cpu_seconds"] = time.process_time() - cpu0
        run_files.atomic_write(path, lambda tmp: torch.save(data, tmp))
    return data


# ----------------------------------------------------------------------------------------------------------------
# proxy: per SAE
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def activation_frequency(sae, resid_ND: torch.Tensor, batch: int = 4096) -> np.ndarray:
    """Fraction of (special-token-free) rows on which each latent fires: sae_bench's
    ``get_feature_activation_sparsity`` on stored residuals."""
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    for i in range(0, len(resid_ND), batch):
        fired += (sae.encode(resid_ND[i:i + batch].to(sae.device, sae.dtype)) > 0).double().sum(0).cpu()
    return (fired / max(1, len(resid_ND))).float().numpy()


@torch.no_grad()
def _clamped_rise(model, sae, side: dict, acts: torch.Tensor, features: np.ndarray, multiplier: int, start: int,
                  batch: int) -> dict:
    """Loss rise of one side under sae_bench's clamp of ``features`` to ``-multiplier``: (total rise over scored
    targets, per-row rises, rows run)."""
    from sae_bench.evals.unlearning.utils.intervention import anthropic_clamp_resid_SAE_features

    tokens, resid, mask, base = side["tokens"], side["resid"], side["loss_mask"], side["base_loss"]
    row_rise = torch.zeros(len(tokens), dtype=torch.float64)
    if len(features) == 0:
        return {"row_rise": row_rise, "rows_run": 0}
    fires = (acts[:, :, torch.as_tensor(features)] > 0).any(-1)
    fires[:, 0] = False  # sae_bench's hook zeroes position 0 (BOS) for every SAE
    fires &= tokens != model.tokenizer.pad_token_id
    touched = torch.nonzero(fires.any(1))[:, 0]
    for i in range(0, len(touched), batch):
        idx = touched[i:i + batch]
        r = resid[idx].to(sae.device, sae.dtype)
        new = anthropic_clamp_resid_SAE_features(r, None, sae, features, multiplier=multiplier)
        # where the hook clamped: the same encode of the same batch it did (not the full-tensor encode above,
        # which may round differently), at real (non-pad) positions after BOS
        f = (sae.encode(r)[:, :, torch.as_tensor(features)] > 0).any(-1)
        f[:, 0] = False
        f &= (tokens[idx] != model.tokenizer.pad_token_id).to(r.device)
        if not f.any():
            continue
        new = torch.where(f[..., None], new, r)  # untouched positions stay bit-identical
        first = f.float().argmax(1)  # first changed position per row
        pos = torch.arange(mask.shape[1])
        m = mask[idx] & (pos[None, :] >= first[:, None].cpu()) & f.any(1)[:, None].cpu()
        new_loss = tail_token_losses(model, new.to(resid.dtype), tokens[idx], start, m)
        diff = torch.zeros(m.shape, dtype=torch.float64)
        diff[m] = new_loss.double() - base[idx][m].double()
        row_rise[idx] = diff.sum(1)
    return {"row_rise": row_rise, "rows_run": len(touched)}


def _ratio_and_se(row_rise: torch.Tensor, row_n: torch.Tensor) -> tuple[float, float]:
    """Mean rise per target token and its standard error (rows as clusters: ratio estimator)."""
    n_total = float(row_n.sum())
    mean = float(row_rise.sum()) / n_total
    k = len(row_rise)
    resid = row_rise - mean * row_n
    se = math.sqrt(k / max(1, k - 1) * float((resid ** 2).sum())) / n_total
    return mean, se


def run_proxy(sae, model, settings, artifacts_dir: Path) -> dict:
    from sae_bench.evals.unlearning.eval_output import (
        UnlearningEvalOutput, UnlearningMetricCategories, UnlearningMetrics,
    )
    from sae_bench.sae_bench_utils.general_utils import load_and_format_sae

    if getattr(model, "tokenizer", None) is None:
        raise EvalError("model: expected a HookedTransformer with a tokenizer (the proxy reads text), got none")
    if sae.cfg.d_in != model.cfg.d_model:
        raise EvalError(f"sae: expected d_in = model d_model {model.cfg.d_model}, got {sae.cfg.d_in}")
    _, sae, _ = load_and_format_sae("saelib", sae, str(sae.device))
    hook, start = _hook_layer(sae)
    if start > model.cfg.n_layers:
        raise EvalError(f"sae hook: {hook!r} is beyond the model's {model.cfg.n_layers} layers")
    torch.manual_seed(settings.seed)
    lm = lm_side(model, settings, hook, start, artifacts_dir)
    t0, cpu0 = time.time(), time.process_time()
    with torch.no_grad():
        forget_freq = activation_frequency(sae, lm["forget_select"])
        retain_freq = activation_frequency(sae, lm["retain_select"])
        acts = {side: sae.encode(lm[f"{side}_score"]["resid"].to(sae.device, sae.dtype)).cpu()
                for side in ("forget", "retain")}
    row_n = {side: lm[f"{side}_score"]["loss_mask"].sum(1).double() for side in ("forget", "retain")}
    base = {side: float(lm[f"{side}_score"]["base_loss"][lm[f"{side}_score"]["loss_mask"]].double().mean())
            for side in ("forget", "retain")}
    tolerance = settings.retain_tolerance * base["retain"]

    table, n_distinct = _settings_table(model, sae, lm, acts, row_n, forget_freq, retain_freq, tolerance, start,
                                        settings)
    admissible = [row for row in table if row["admissible"]]
    best = max(admissible, key=lambda row: row["score"]) if admissible else None
    headline = max(0.0, best["score"]) if best else 0.0
    per_sae_s, per_sae_cpu = time.time() - t0, time.process_time() - cpu0

    fired = acts["forget"][:, 1:][acts["forget"][:, 1:] > 0]  # typical clamp scale: active values off BOS
    config = _eval_config(settings, model)
    unstructured = {
        "proxy": True,
        "description": "Offline proxy of SAEBench unlearning: SAEBench's latent selection (get_top_features) and "
                       "clamp (anthropic_clamp_resid_SAE_features); score = rise of next-token loss on held-out "
                       "forget-topic text minus rise on held-out retain text (nats); admissible if the retain "
                       "loss rises by at most retain_tolerance x baseline; unlearning_score = max(0, best "
                       "admissible score), 0 if none is admissible. Not comparable with SAEBench's MCQ score.",
        "saelib_settings": asdict(settings),
        "hook_name": hook, "start_at_layer": start,
        "baseline_loss": base, "retain_tolerance_nats": tolerance,
        "best_setting": best, "best_score_raw": best["score"] if best else None,
        "n_admissible": len(admissible), "n_settings": len(table), "n_distinct_interventions": n_distinct,
        "tokens": {"forget_select": int(len(lm["forget_select"])), "retain_select": int(len(lm["retain_select"])),
                   "forget_score": int(row_n["forget"].sum()), "retain_score": int(row_n["retain"].sum()),
                   "forget_score_rows": int(len(row_n["forget"])), "retain_score_rows": int(len(row_n["retain"]))},
        "documents_available": lm["n_docs"],
        "latent_activation_quantiles_on_forget": {
            q: float(torch.quantile(fired[:100_000], q / 100)) if len(fired) else 0.0 for q in (50, 90, 99)},
        "shortcut_max_abs_diff_nats": lm["shortcut_max_abs_diff"],
        "settings_table": table,
        "lm_side_seconds_when_computed": lm["lm_side_seconds"],
        "lm_side_cpu_seconds_when_computed": lm.get("lm_side_cpu_seconds"),
        "wall_time_s": per_sae_s,
        "cpu_time_s": per_sae_cpu,
    }
    out = UnlearningEvalOutput(
        eval_type_id=PROXY_EVAL_TYPE_ID, eval_config=config, eval_id=str(uuid.uuid4()),
        datetime_epoch_millis=int(time.time() * 1000),
        eval_result_metrics=UnlearningMetricCategories(unlearning=UnlearningMetrics(unlearning_score=headline)),
        eval_result_details=[], eval_result_unstructured=unstructured, **provenance(sae),
    )
    return validated_output(out)


def validated_output(out) -> dict:
    """The output as a JSON dict, checked against sae_bench's ``UnlearningEvalOutput``."""
    from pydantic import TypeAdapter
    from sae_bench.evals.unlearning.eval_output import UnlearningEvalOutput

    result = json.loads(out.to_json())
    TypeAdapter(UnlearningEvalOutput).validate_python(result)
    return result


def _settings_table(model, sae, lm, acts, row_n, forget_freq, retain_freq, tolerance, start, settings):
    """Every (retain threshold, n features, multiplier) of the grid: SAEBench's latent selection, the clamp's loss rise
    on forget and retain text (each distinct intervention run once), its score and admissibility. Returns the rows
    and the number of distinct interventions."""
    from sae_bench.evals.unlearning.utils.feature_activation import get_top_features

    grid = [(t, n, m) for t in settings.retain_thresholds for n in settings.n_features_list
            for m in settings.multipliers]
    memo: dict[tuple, dict] = {}
    table = []
    for thr, n, mult in tqdm(grid, desc="unlearning proxy settings"):
        features = np.array(get_top_features(forget_freq, retain_freq, retain_threshold=thr)[:n], dtype=np.int64)
        key = (tuple(features.tolist()), mult)
        if key not in memo:
            res = {}
            for side in ("forget", "retain"):
                r = _clamped_rise(model, sae, lm[f"{side}_score"], acts[side], features, mult, start,
                                  settings.lm_batch_size)
                res[side], res[f"{side}_se"] = _ratio_and_se(r["row_rise"], row_n[side])
                res[f"{side}_rows_run"] = r["rows_run"]
            memo[key] = res
        res = memo[key]
        score = res["forget"] - res["retain"]
        table.append({
            "retain_threshold": thr, "n_features": n, "multiplier": mult, "n_features_selected": len(features),
            "features": features.tolist(), "forget_loss_rise": res["forget"], "forget_loss_rise_se": res["forget_se"],
            "retain_loss_rise": res["retain"], "retain_loss_rise_se": res["retain_se"], "score": score,
            "score_se": math.hypot(res["forget_se"], res["retain_se"]),
            "admissible": bool(res["retain"] <= tolerance),
            "forget_rows_run": res["forget_rows_run"], "retain_rows_run": res["retain_rows_run"],
        })
    return table, len(memo)


def _eval_config(settings, model):
    """SAEBench's ``UnlearningEvalConfig``, filled with what the proxy did."""
    from sae_bench.evals.unlearning.eval_config import UnlearningEvalConfig

    return UnlearningEvalConfig(
        random_seed=settings.seed,
        dataset_names=[f"proxy-forget:sae_probes/{settings.forget_set} (held-out eval split)",
                       "proxy-retain:saelib-offline corpus (held-out eval split, other sources)"],
        intervention_method="clamp_feature_activation", retain_thresholds=list(settings.retain_thresholds),
        n_features_list=list(settings.n_features_list), multipliers=list(settings.multipliers),
        dataset_size=math.ceil(settings.select_tokens / (settings.context_size - 1)), seq_len=settings.context_size,
        n_batch_loss_added=0, target_metric="proxy:next_token_loss_rise", save_metrics=False,
        model_name=model.cfg.model_name, llm_batch_size=settings.lm_batch_size,
        llm_dtype=str(model.cfg.dtype).removeprefix("torch."),
    )
