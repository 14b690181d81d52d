"""One entry point for every eval of a run folder: ``evaluate_run(run_dir, model, evals=[...])``.

Each eval writes ``<run>/evals/<eval>.json`` (SAEBench format) as soon as it finishes, so a failure in one eval
never loses another's result; a result already there for the same SAE and settings is reused. LLM-only work
(probes, the LLM's own activations, baseline losses) is kept under one artifacts folder per model and hook, shared
by every SAE of a study.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from saelib import run_files
from saelib.evals import common
from saelib.evals.common import EvalError, EvalUnavailable
from saelib.sparse_step import keep_freed_memory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSpec:
    module: str
    settings_class: str
    function: str
    fixed: tuple[tuple[str, Any], ...] = ()  # settings this eval name pins (e.g. the unlearning mode)
    takes_run_dir: bool = False  # the function also reads the run folder (``run_dir=``)
    after: str = ""  # a function of the module called as ``after(run_dir, result)`` once the result is stored
    version: int = 1  # raised when saelib's result gains or changes a number: older stored results are redone

    def load(self):
        mod = importlib.import_module(self.module if "." in self.module else f"saelib.evals.{self.module}")
        return mod, getattr(mod, self.settings_class), getattr(mod, self.function)


#: Every eval saelib runs, by the name used in notebooks, params and result files.
EVALS: dict[str, EvalSpec] = {
    "core": EvalSpec("core", "CoreSettings", "run_core_eval", after="write_headline"),  # metrics.json
    "absorption": EvalSpec("absorption", "AbsorptionSettings", "run_absorption", version=2),  # 2: firing-based
    "sparse_probing": EvalSpec("sparse_probing", "SparseProbingSettings", "run_sparse_probing"),
    "competition": EvalSpec("competition", "CompetitionSettings", "run_competition", takes_run_dir=True),
    "unlearning_proxy": EvalSpec("unlearning", "UnlearningSettings", "run_unlearning", (("mode", "proxy"),)),
    "unlearning": EvalSpec("unlearning", "UnlearningSettings", "run_unlearning", (("mode", "sae_bench"),)),
}


def check_eval_names(evals) -> list[str]:
    names = [evals] if isinstance(evals, str) else list(evals)
    unknown = [n for n in names if n not in EVALS]
    if unknown or not names:
        raise EvalError(f"evals: expected names from {sorted(EVALS)}, got {unknown or names!r}")
    return names


def artifacts_dir_for(model_name: str, hook_name: str, root: Path | None = None) -> Path:
    """Where LLM-only eval artifacts of one model and hook live (shared by every SAE evaluated there)."""
    from saelib.models import cache_root

    return Path(root or cache_root() / "evals") / model_name.replace("/", "--") / hook_name


def default_settings(name: str, smoke: bool = False):
    spec = EVALS[name]
    mod, settings_cls, _ = spec.load()
    base = getattr(mod, "SMOKE") if smoke else settings_cls()
    return dataclasses.replace(base, **dict(spec.fixed)) if spec.fixed else base


def evaluate_run(run_dir: Path, model, evals=tuple(EVALS), settings: dict[str, Any] | None = None,
                 artifacts_root: Path | None = None, force: bool = False, smoke: bool = False) -> pd.DataFrame:
    """Run the named evals on a run folder's SAE; returns one row per eval (status, wall time, message).

    ``settings`` maps an eval name to its settings object (or a dict of overrides of its defaults);
    ``smoke`` starts from each eval's fast ``SMOKE`` settings instead of its defaults. Status is ``done``,
    ``reused`` (a current result was there), ``unavailable`` (cannot run on this machine; the message says why) or
    ``failed`` (the error; the other evals still run)."""
    names = check_eval_names(evals)
    settings = dict(settings or {})
    unexpected = set(settings) - set(names)
    if unexpected:
        raise EvalError(f"settings: expected keys among the evals being run {names}, got {sorted(unexpected)}")
    run_dir = Path(run_dir)
    keep_freed_memory()
    sae = common.load_run_sae(run_dir, device=str(model.cfg.device))  # the SAE side runs where the LM runs
    common.check_model_matches(sae, model)
    fingerprint = common.sae_fingerprint(sae)
    _fold_decoder_norms(sae)
    artifacts = artifacts_dir_for(sae.cfg.metadata.model_name, common.hook_name_of(sae), artifacts_root)
    plan = {}  # every setting and stored file is checked before the first eval runs
    for name in names:
        resolved = _resolve_settings(name, settings.get(name), smoke)
        if hasattr(resolved, "resolved"):  # settings that default to the run's own held-out split
            resolved = resolved.resolved(run_dir)
        path = common.result_path(run_dir, name)
        if not force:  # another SAE's file is an error before anything runs
            common.stored_result(path, fingerprint, _inputs(name, resolved, run_dir))
        plan[name] = (resolved, path)
    rows = []
    for name, (resolved, path) in plan.items():
        settings_json = _inputs(name, resolved, run_dir)  # read now: an earlier eval of this call may change it
        current = None if force else common.stored_result(path, fingerprint, settings_json)
        if current is not None:
            rows.append({"eval": name, "status": "reused", "wall_time_s": 0.0,
                         "message": "a result for this SAE and settings exists", "path": str(path)})
            continue
        rows.append(_run_one(name, run_dir, sae, model, fingerprint, resolved, settings_json, path, artifacts))
    return pd.DataFrame(rows)


#: evals whose result also depends on another eval's result in the same run folder
DEPENDS_ON = {"competition": "absorption"}


def _inputs(name: str, settings, run_dir: Path) -> dict[str, Any]:
    """What a stored result must match to be reused: the settings, plus the id of any result it reads."""
    inputs = common.settings_dict(settings)
    if EVALS[name].version > 1:
        inputs["saelib_result_version"] = EVALS[name].version
    upstream = DEPENDS_ON.get(name)
    if upstream and common.result_path(run_dir, upstream).exists():
        inputs[f"{upstream}_eval_id"] = run_files.read_json(common.result_path(run_dir, upstream)).get("eval_id")
    return inputs


def _fold_decoder_norms(sae) -> None:
    """sae_bench expects unit-norm decoder rows; folding leaves the SAE's outputs unchanged (sae_lens refuses, and
    saelib skips, the one case where it would not: TopK without decoder-norm rescaling)."""
    try:
        sae.fold_W_dec_norm()
    except NotImplementedError as exc:
        log.warning("decoder norms not folded: %s", exc)


def _resolve_settings(name: str, given, smoke: bool):
    base = default_settings(name, smoke)
    if given is None:
        return base
    if isinstance(given, dict):
        fields = {f.name for f in dataclasses.fields(base)}
        bad = set(given) - fields
        if bad:
            raise EvalError(f"settings[{name!r}]: expected fields among {sorted(fields)}, got {sorted(bad)}")
        pinned = {k: v for k, v in EVALS[name].fixed if k in given and given[k] != v}
        if pinned:
            raise EvalError(f"settings[{name!r}]: {sorted(pinned)} are fixed by the eval name {name!r}")
        return dataclasses.replace(base, **given)
    return given


def _run_one(name, run_dir, sae, model, fingerprint, settings, settings_json, path, artifacts) -> dict[str, Any]:
    row = {"eval": name, "status": "", "wall_time_s": 0.0, "message": "", "path": ""}
    start = time.time()
    try:
        spec = EVALS[name]
        module, _, run = spec.load()
        kwargs = {"run_dir": run_dir} if spec.takes_run_dir else {}
        result = run(sae, model, settings, artifacts / name, **kwargs)
        common.write_result(path, result, fingerprint, settings_json, time.time() - start)
        if spec.after:
            getattr(module, spec.after)(run_dir, result)
        row.update(status="done", path=str(path))
    except EvalUnavailable as exc:
        row.update(status="unavailable", message=str(exc))
        log.warning("%s: unavailable: %s", name, exc)
    except Exception as exc:  # one eval failing must not lose the others
        log.exception("%s failed", name)
        row.update(status="failed", message=f"{type(exc).__name__}: {exc}")
    row["wall_time_s"] = round(time.time() - start, 1)
    return row


def run_results(run_dir: Path) -> dict[str, dict]:
    """Every stored eval result of a run folder, by eval name."""
    folder = Path(run_dir) / common.EVALS_DIR
    return {p.stem: run_files.read_json(p) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def core_for_run(cfg, model) -> dict[str, float]:
    """Core eval of a run's SAE (as saved in its folder) on the held-out split; writes evals/core.json and the
    headline into metrics.json. A current result (same SAE, same settings) is reused."""
    from saelib.evals.core import headline_metrics

    status = evaluate_run(cfg.run_dir, model, ["core"])
    if status.loc[0, "status"] not in ("done", "reused"):
        raise RuntimeError(f"core eval {status.loc[0, 'status']}: {status.loc[0, 'message']}")
    return headline_metrics(run_files.read_json(Path(cfg.run_dir) / common.EVALS_DIR / "core.json"))
