"""The study's machine-readable summary (``reports/<study>/summary.json``) and its positive controls: architectures
whose papers report an effect against TopK, checked in the direction claimed before any null about SGO counts."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from saelib import run_files
from saelib.config import precisions_used
from saelib.plots import FRONTIER_PANELS
from saelib.stats import NO_INTERVAL, mean_ci, paired_vs_baseline

#: architecture → (what its paper claims, {metric: direction claimed against TopK: -1 lower, +1 higher})
CONTROLS = {
    "matryoshka_batchtopk": ("Bussmann et al. 2025 (arXiv 2503.17547), SAEBench 2025: less absorption, better probing",
                             {"absorption (mean fraction)": -1, "full absorption": -1,
                              "main latents silent (firing-based absorption)": -1, "sparse probing top-1": +1}),
    "ortsae_topk": ("Korznikov et al. 2025 (arXiv 2509.22033): absorption −65 %, probing on par",
                    {"absorption (mean fraction)": -1, "full absorption": -1,
                     "main latents silent (firing-based absorption)": -1}),
}
#: architecture → {metric: the size its paper reports, relative to TopK's mean} where it reports one: OrtSAE's
#: "−65 % absorption" (as issue 14 cites it), measured on SAEBench's mean absorption fraction.
CLAIMED_SIZE = {"ortsae_topk": {"absorption (mean fraction)": -0.65}}
FRONTIER = {"explained variance": "ev", "absorption (mean fraction)": "absorption",
            "main latents silent (firing-based absorption)": "firing_absorption", "sparse probing top-1": "probing"}
FRONTIER_ARCHS = ("topk", "sgo_topk", "ortsae_topk")


SILENT = "absorption/firing.mean_main_silent_rate"
UNCOUNTED = "absorption/firing.mean_silent_uncounted_rate"
COUNTED = "absorption/firing.mean_silent_counted_rate"
#: SAEBench's absorption beside the firing-based check and its two parts (issue 14 item 5): "eval/metric" → (name,
#: direction). The words whose main latents are silent are those SAEBench counts as absorbed plus those it does not
#: (no firing latent passes its decoder-cosine filter, or they carry too little of the probe's projection).
ABSORPTION_CHECK = {"absorption/mean.mean_absorption_fraction_score": ("absorption (mean fraction)", -1),
                    SILENT: ("main latents silent (firing-based absorption)", -1),
                    COUNTED: ("silent, counted by SAEBench", 0),
                    UNCOUNTED: ("silent, not counted by SAEBench (decoder-cosine filter)", 0)}


def absorption_check(results: pd.DataFrame, baselines: dict[str, str] | None = None,
                     baseline: str = "topk") -> tuple[pd.DataFrame, dict]:
    """Does a configuration's change in SAEBench's absorption survive the firing-based check? The paired differences
    from TopK of ``ABSORPTION_CHECK``'s metrics (the counted part = silent − not counted, per run) and, per
    configuration, ``{"saebench": verdict, "firing": verdict, "confirmed": bool | None}``: ``confirmed`` is None where
    SAEBench's absorption shows no difference (or has one seed), else whether the main latents' silence moved the
    same way with an interval that excludes 0. A penalty that only turns absorbers' decoders away from the probe
    moves words from counted to not counted and leaves the silence as it was: not confirmed."""
    keyed = results.assign(key=results["eval"] + "/" + results["metric"])
    if baseline not in set(keyed.loc[keyed["key"] == SILENT, "config"]):  # runs from before the firing-based check
        return pd.DataFrame(columns=["config", "metric", "seeds", "difference", "low", "high", "verdict",
                                     "baseline"]), {}
    parts = keyed[keyed["key"].isin([SILENT, UNCOUNTED])].pivot_table(index="run", columns="key", values="value",
                                                                       aggfunc="first")
    counted = (parts[SILENT] - parts[UNCOUNTED]).dropna() if {SILENT, UNCOUNTED} <= set(parts.columns) else \
        pd.Series(dtype=float)
    counted_rows = results.drop_duplicates("run").set_index("run").loc[counted.index].rename_axis("run") \
        .reset_index().assign(eval="absorption", metric=COUNTED.split("/", 1)[1], value=counted.values)[results.columns]
    long = paired_vs_baseline(pd.concat([results, counted_rows], ignore_index=True), ABSORPTION_CHECK,
                              baseline=baseline, baselines=baselines)
    names = {key: name for key, (name, _) in ABSORPTION_CHECK.items()}
    verdicts = {}
    for config, rows in long.groupby("config", sort=False):
        by = rows.set_index("metric")["verdict"]
        saebench, firing = by.get(names["absorption/mean.mean_absorption_fraction_score"]), by.get(names[SILENT])
        acts = saebench in ("better", "worse")
        verdicts[config] = {"saebench": saebench, "firing": firing,
                            "confirmed": (firing == saebench) if acts and firing not in (None, NO_INTERVAL) else None}
    return long, verdicts


def positive_controls(quality: pd.DataFrame, runs: pd.DataFrame, results: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per control configuration and claimed metric: the paired difference from its TopK baseline (column
    ``against``) [95 %], the direction claimed, and whether it reproduces (the interval excludes 0 on the claimed
    side; needs ≥ 2 seeds). Where the paper reports a size (``CLAIMED_SIZE``) and ``results`` are given:
    ``claimed_difference`` (that fraction of the baseline's mean) and ``claim_excluded``, whether the interval rules
    it out — a control that does not reproduce may still be unable to tell (False) or rule the claim out (True)."""
    arch = runs.drop_duplicates("config").set_index("config")["architecture"]
    names = {name: key for key, (name, _) in _headline().items()}
    rows = []
    for row in quality.itertuples():
        source, claims = CONTROLS.get(arch.get(row.config), ("", {}))
        if row.metric in claims:
            direction = claims[row.metric]
            seen = row.seeds >= 2 and (row.high < 0 if direction < 0 else row.low > 0)
            against = getattr(row, "baseline", "topk")
            size = CLAIMED_SIZE.get(arch.get(row.config), {}).get(row.metric)
            claimed = math.nan
            if size is not None and results is not None:
                eval_name, _, key = names[row.metric].partition("/")
                base = results[(results["config"] == against) & (results["eval"] == eval_name)
                               & (results["metric"] == key)]["value"]
                claimed = size * float(base.mean()) if len(base) else math.nan
            excluded = bool(not row.low <= claimed <= row.high) if claimed == claimed and row.seeds >= 2 else None
            rows.append({"config": row.config, "against": against, "metric": row.metric,
                         "claimed": "lower" if direction < 0 else "higher",
                         "seeds": row.seeds, "difference": row.difference, "ci_low": row.low, "ci_high": row.high,
                         "reproduces": bool(seen), "claimed_difference": claimed, "claim_excluded": excluded,
                         "source": source})
    return pd.DataFrame(rows, columns=["config", "against", "metric", "claimed", "seeds", "difference", "ci_low", "ci_high",
                                       "reproduces", "claimed_difference", "claim_excluded", "source"])


def _headline() -> dict:
    from saelib.evals.results import HEADLINE  # here, not at the top: saelib.evals imports this module's callers

    return HEADLINE


def frontier(results: pd.DataFrame, runs: pd.DataFrame, quality: pd.DataFrame) -> list[dict]:
    """Per TopK / SGO / OrtSAE configuration: λ, τ, each frontier metric's mean [95 %] over seeds and its paired
    difference from TopK [95 %]."""
    key_of = {name: key for key, (name, _) in _headline().items()}
    out = []
    for c in runs[runs["architecture"].isin(FRONTIER_ARCHS)].drop_duplicates("config").to_dict("records"):
        entry = {"config": c["config"], "architecture": c["architecture"], "lambda": _finite(c["lambda"]),
                 "tau": _finite(c["tau"]), "seeds": int((runs["config"] == c["config"]).sum())}
        for metric, short in FRONTIER.items():
            eval_name, _, metric_key = key_of[metric].partition("/")
            values = results[(results["config"] == c["config"]) & (results["eval"] == eval_name)
                             & (results["metric"] == metric_key)]["value"]
            ci = mean_ci(np.asarray(values, dtype=float)) if len(values) else None
            entry.update({short: _finite(ci.mean) if ci else None, f"{short}_ci_low": _finite(ci.low) if ci else None,
                          f"{short}_ci_high": _finite(ci.high) if ci else None})
            diff = quality[(quality["config"] == c["config"]) & (quality["metric"] == metric)]
            if len(diff):
                d = diff.iloc[0]
                entry.update({f"{short}_vs_topk": _finite(d.difference), f"{short}_vs_topk_ci_low": _finite(d.low),
                              f"{short}_vs_topk_ci_high": _finite(d.high)})
        out.append(entry)
    return out


def study_summary(study_dir: Path, results: pd.DataFrame, runs: pd.DataFrame, quality: pd.DataFrame,
                  power: pd.DataFrame, controls: pd.DataFrame, planned: list[str] | None = None,
                  absorption: tuple[pd.DataFrame, dict] | None = None) -> dict:
    """``reports/<study>/summary.json``. ``absorption``: :func:`absorption_check`'s table and verdicts."""
    check, verdicts = absorption if absorption is not None else (pd.DataFrame(columns=["config", "metric"]), {})
    cfgs = [run_files.read_json(Path(study_dir) / run / run_files.RUN_CFG_FILE) for run in runs["run"]]
    cfg = cfgs[0]
    return {
        "model": cfg["model_name"], "hook_layer": cfg["hook_layer"], "d_sae": cfg["d_sae"], "k": cfg["k"],
        "training_tokens": cfg["training_tokens"], "seeds": sorted(int(s) for s in runs["seed"].unique()),
        "runs": int(len(runs)), "planned_runs": len(set(planned or []) | set(runs["run"])),
        "pending_runs": sorted(set(planned or []) - set(runs["run"])), "precisions": precisions_used(cfgs), "compute": compute_on_record(study_dir, runs["run"]),
        "mde": {r.metric: _finite(r.mde) for r in power.itertuples()},
        "mde_relative_to_topk": {r.metric: _finite(r.mde_relative) for r in power.itertuples()},
        "mde_targets": {r.metric: {"target": _finite(r.target), "mde": _finite(r.mde), "meets": r.meets_target,
                                   "seeds_for_target": None if r.seeds_for_target != r.seeds_for_target
                                   else int(r.seeds_for_target)}
                        for r in power.itertuples() if r.target == r.target},
        "positive_controls": {f"{r.config}/{r.metric}": {
            "metric": r.metric, "claimed": r.claimed, "seeds": int(r.seeds), "difference": _finite(r.difference),
            "ci_low": _finite(r.ci_low), "ci_high": _finite(r.ci_high), "reproduces": bool(r.reproduces),
            "claimed_difference": _finite(r.claimed_difference),
            "claim_excluded": None if r.claim_excluded is None or r.claim_excluded != r.claim_excluded
            else bool(r.claim_excluded)}
            for r in controls.itertuples()},
        "sgo_frontier": frontier(results, runs, quality),
        "absorption_check": {config: {**v, "differences": {
            r.metric: {"difference": _finite(r.difference), "ci_low": _finite(r.low), "ci_high": _finite(r.high),
                       "seeds": int(r.seeds)} for r in check[check["config"] == config].itertuples()}}
            for config, v in verdicts.items()},
    }


def compute_on_record(study_dir: Path, runs) -> dict:
    """The notebook time on record for ``runs`` (``<run>/.runner/<notebook>.time.json``, written by the study runner
    as each notebook finishes, kept in the archive): hours in all, per notebook and per machine (a study finished over
    several machines states its cost on each), and the thread counts. Hours to 2 decimals."""
    rows = [{"notebook": path.name.removesuffix(".time.json"), **run_files.read_json(path)}
            for run in runs for path in sorted((Path(study_dir) / run / run_files.RUNNER_DIR).glob("*.time.json"))]
    times = pd.DataFrame(rows, columns=["notebook", "seconds", "threads", "machine"]).fillna(
        {"machine": "not recorded"})
    hours = times["seconds"] / 3600
    return {"notebook_hours": round(float(hours.sum()), 2),
            "by_notebook": {k: round(float(v), 2) for k, v in hours.groupby(times["notebook"]).sum().items()},
            "by_machine": {k: round(float(v), 2) for k, v in hours.groupby(times["machine"]).sum().items()},
            "threads": sorted(int(t) for t in times["threads"].dropna().unique())}


def _finite(x) -> float | None:
    """JSON has no NaN: None instead."""
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


def frontier_table(entries: list[dict]) -> pd.DataFrame:
    """``summary.frontier`` as the answers show it: per configuration λ, τ, seeds and each metric's mean [95 %]."""
    def value(e, key):
        mean, lo, hi = e.get(key), e.get(f"{key}_ci_low"), e.get(f"{key}_ci_high")
        return "" if mean is None else f"{mean:.4g}" + (f" [{lo:.4g}, {hi:.4g}]" if lo is not None else "")
    columns = {"ev": "explained variance", **FRONTIER_PANELS}
    def number(x):
        return "" if x is None else f"{x:g}"
    return pd.DataFrame([{"config": e["config"], "λ": number(e["lambda"]), "τ": number(e["tau"]), "seeds": e["seeds"],
                          **{title: value(e, key) for key, title in columns.items()}} for e in entries])
