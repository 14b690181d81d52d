"""Confidence intervals over seeds and paired comparisons against a baseline, for the study notebooks.

Seeds are the unit of replication: a configuration's metric is summarised by its mean over seeds with a Student-t
95 % interval; a configuration is compared with the baseline by the per-seed differences (same seed = same data
order and initialisation), again with a t interval. With fewer than two seeds there is no interval and the verdict
says so. Nothing here reads files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pandas as pd
from scipy import stats as _st


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:.4g} (n={self.n})"
        return f"{self.mean:.4g} ± {(self.high - self.low) / 2:.2g}"


def mean_ci(values, confidence: float = 0.95) -> Interval:
    """Mean and two-sided Student-t interval of ``values`` (NaNs dropped); NaN bounds when n < 2."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: expected a number in (0, 1), got {confidence!r}")
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    half = float(_st.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, n)


def summarise(results: pd.DataFrame, metrics: dict[str, str], by: str = "config") -> pd.DataFrame:
    """Per ``by`` group and metric ("eval/metric" → display name): mean, CI bounds, n seeds, and "mean ± half"."""
    keyed = results.assign(key=results["eval"] + "/" + results["metric"])
    rows = []
    for (group, key), part in keyed[keyed["key"].isin(metrics)].groupby([by, "key"]):
        ci = mean_ci(part["value"])
        rows.append({by: group, "metric": metrics[key], "mean": ci.mean, "low": ci.low, "high": ci.high,
                     "n": ci.n, "text": str(ci)})
    return pd.DataFrame(rows, columns=[by, "metric", "mean", "low", "high", "n", "text"])


def paired_vs_baseline(results: pd.DataFrame, metrics: dict[str, tuple[str, int]], baseline: str = "topk",
                       by: str = "config", baselines: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Every group against its baseline per metric, paired by seed: ``baselines[group]`` where given (e.g. the TopK
    configuration trained like it, ``saelib.evals.results.matched_baselines``), else ``baseline``; a group that is
    its own baseline is left out. Column ``baseline`` names it.

    ``metrics`` maps "eval/metric" → (display name, direction): +1 when higher is better, −1 when lower is better,
    0 when neither (descriptive: the verdict then says "higher"/"lower"). The verdict is "better"/"worse" when the
    95 % interval of the mean paired difference excludes 0, else "no detectable difference"; NO_INTERVAL with one
    shared seed, NO_SPREAD when every seed gave the same non-zero difference (a zero-width interval)."""
    _, diffs = _paired_differences(results, metrics, baseline, by, baselines)
    of = _baseline_of(baseline, baselines)
    rows = []
    for (group, key), diff in diffs.items():
        name, direction = metrics[key]
        ci = mean_ci(diff.values)
        rows.append({by: group, "metric": name, "seeds": ci.n, "difference": ci.mean, "low": ci.low,
                     "high": ci.high, "verdict": verdict(ci, direction), "baseline": of(group)})
    return pd.DataFrame(rows, columns=[by, "metric", "seeds", "difference", "low", "high", "verdict", "baseline"])


def _baseline_of(baseline: str, baselines: Mapping[str, str] | None):
    return lambda group: (baselines or {}).get(group, baseline)


def _paired_differences(results: pd.DataFrame, metrics: dict, baseline: str, by: str,
                        baselines: Mapping[str, str] | None = None):
    """``(the default baseline's values by seed, {(group, metric key): per-seed differences from the group's
    baseline})``, groups sorted, then metrics in ``metrics``' order; metrics the results lack are left out."""
    keyed = results.assign(key=results["eval"] + "/" + results["metric"])
    keyed = keyed[keyed["key"].isin(metrics)]
    groups = set(keyed[by])
    of = _baseline_of(baseline, baselines)
    if baseline not in groups:
        raise ValueError(f"baseline: expected one of the study's {by}s {sorted(groups)}, got {baseline!r}")
    unknown = sorted(set((baselines or {}).values()) - set(results[by]))
    if unknown:
        raise ValueError(f"baselines: expected one of the study's {by}s {sorted(set(results[by]))}, got {unknown[0]!r}")
    table = keyed.pivot_table(index=[by, "seed"], columns="key", values="value", aggfunc="first")
    diffs = {}
    # a group whose own baseline has none of these metrics yet (evaluated part-way) has nothing to be paired with
    for group in sorted(g for g in groups if of(g) != g and of(g) in groups):
        own, base = table.xs(group, level=by), table.xs(of(group), level=by)
        for key in metrics:
            if key in table.columns:
                diffs[(group, key)] = (own[key] - base[key].reindex(own.index)).dropna()
    return table.xs(baseline, level=by), diffs


NO_INTERVAL = "not enough seeds for an interval"
NO_SPREAD = "the same difference on every seed, no spread for an interval"


def verdict(ci: Interval, direction: int) -> str:
    if ci.n < 2:
        return NO_INTERVAL
    # discrete metrics (accuracies over a fixed test set) can repeat a difference on a few seeds: a zero-width t
    # interval (up to float rounding) is no evidence; identical runs (mean exactly 0) are no difference
    if ci.mean != 0 and ci.high - ci.low <= 1e-9 * abs(ci.mean):
        return NO_SPREAD
    if ci.low > 0 or ci.high < 0:
        sign = 1 if ci.low > 0 else -1
        if direction == 0:
            return "higher" if sign > 0 else "lower"
        return "better" if sign * direction > 0 else "worse"
    return "no detectable difference"


# ---------------------------------------------------------------------------------------------- power
def ci_row(values, direction: int | None) -> dict:
    """Mean and 95 % interval over seeds; with a ``direction``, as a difference with its verdict."""
    ci = mean_ci(np.asarray(values, dtype=float))
    value = {"mean": ci.mean} if direction is None else {"difference": ci.mean, "verdict": verdict(ci, direction)}
    return {"seeds": ci.n, "low": ci.low, "high": ci.high, **value}


def paired_power(effect: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test at level ``alpha`` with ``n`` seeds, when the per-seed differences have
    mean ``effect`` and standard deviation ``sd`` > 0 (exact, from the noncentral t distribution)."""
    _check_power_args(sd, n, alpha)
    if sd == 0:
        raise ValueError("sd: expected a standard deviation > 0 (with no spread the t-test is undefined)")
    df, crit = n - 1, _st.t.ppf(1 - alpha / 2, n - 1)
    nc = abs(effect) * math.sqrt(n) / sd  # the test is two-sided: the power is symmetric in the effect
    lower = _st.nct.cdf(-crit, df, nc)  # the far tail; scipy returns NaN where it underflows (few seeds, large nc)
    return float(_st.nct.sf(crit, df, nc) + (0.0 if math.isnan(lower) else lower))


def minimum_detectable_difference(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean paired difference that the two-sided paired t-test at level ``alpha`` detects with
    probability ``power``, with ``n`` seeds and per-seed differences of standard deviation ``sd``."""
    _check_power_args(sd, n, alpha)
    if not 0 < power < 1:
        raise ValueError(f"power: expected a number in (0, 1), got {power!r}")
    if sd == 0:
        return 0.0
    from scipy.optimize import brentq

    hi = sd
    while paired_power(hi, sd, n, alpha) < power:
        hi *= 2
    return float(brentq(lambda d: paired_power(d, sd, n, alpha) - power, 0.0, hi, xtol=sd * 1e-9))


def seeds_for_mde(sd: float, target: float, alpha: float = 0.05, power: float = 0.8, max_seeds: int = 64) -> int | None:
    """The fewest seeds (≥ 2) whose minimum detectable paired difference is at most ``target`` with per-seed
    differences of standard deviation ``sd``; None when even ``max_seeds`` do not reach it. The MDE falls
    monotonically with the seeds, so the first one found by bisection is the answer."""
    if not target > 0:
        raise ValueError(f"target: expected a difference > 0, got {target!r}")
    if minimum_detectable_difference(sd, max_seeds, alpha, power) > target:
        return None
    lo, hi = 1, max_seeds  # MDE(lo) > target (or lo < 2), MDE(hi) <= target
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mid >= 2 and minimum_detectable_difference(sd, mid, alpha, power) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def _check_power_args(sd: float, n: int, alpha: float) -> None:
    if not sd >= 0:
        raise ValueError(f"sd: expected a standard deviation >= 0, got {sd!r}")
    if n < 2:
        raise ValueError(f"n: expected at least 2 seeds for a paired t-test, got {n!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha: expected a number in (0, 1), got {alpha!r}")


def mde_table(results: pd.DataFrame, metrics: dict[str, tuple[str, int]], baseline: str = "topk",
              by: str = "config", power: float = 0.8, baselines: Mapping[str, str] | None = None,
              targets: Mapping[str, tuple[float, bool]] | None = None) -> pd.DataFrame:
    """Per metric, the minimum detectable paired difference against ``baseline`` (95 %, ``power``) with the seeds
    the study has. The per-seed differences' standard deviation is pooled over every group compared with the
    baseline (each group's variance weighted by its degrees of freedom); ``seeds`` is the typical (median) number
    of seeds a comparison has. Also the (default) baseline's mean and the MDE relative to it. ``baselines`` as in
    :func:`paired_vs_baseline`. ``targets``: metric key → (MDE wanted, whether relative to the baseline's mean);
    for those metrics ``target`` (absolute), ``meets_target`` and ``seeds_for_target`` (the fewest seeds that would
    reach it at the pooled spread; NaN beyond 64 or without a spread)."""
    targets = dict(targets or {})
    base, diffs = _paired_differences(results, metrics, baseline, by, baselines)
    rows = []
    for key, (name, _) in metrics.items():
        if key not in base.columns:
            continue
        ss, dof, ns = 0.0, 0, []
        for diff in (d for (_, k), d in diffs.items() if k == key):
            if len(diff) >= 2:
                ss += float(diff.var(ddof=1)) * (len(diff) - 1)
                dof += len(diff) - 1
                ns.append(len(diff))
        sd = math.sqrt(ss / dof) if dof else math.nan
        n = int(np.median(ns)) if ns else 0
        mde = minimum_detectable_difference(sd, n, power=power) if n >= 2 else math.nan
        base_mean = float(base[key].mean())
        row = {"metric": name, "seeds": n, "sd_of_difference": sd, "mde": mde, "baseline_mean": base_mean,
               "mde_relative": mde / abs(base_mean) if base_mean else math.nan,
               "target": math.nan, "meets_target": None, "seeds_for_target": math.nan}
        if key in targets:
            value, relative = targets[key]
            row["target"] = target = value * abs(base_mean) if relative else value
            if mde == mde:
                row["meets_target"] = bool(mde <= target)
            if sd == sd and target > 0:
                needed = seeds_for_mde(sd, target, power=power)
                row["seeds_for_target"] = math.nan if needed is None else needed
        rows.append(row)
    return pd.DataFrame(rows, columns=["metric", "seeds", "sd_of_difference", "mde", "baseline_mean",
                                       "mde_relative", "target", "meets_target", "seeds_for_target"])


def noise_components(values: pd.DataFrame) -> dict[str, float]:
    """Seed-to-seed (training) and eval-resampling variance of one metric, from a table with columns
    ``train_seed``, ``eval_seed``, ``value``: each trained SAE scored under several eval seeds. One-way random
    effects: the eval variance is the pooled variance within an SAE, the training variance what the spread of the
    SAEs' means holds beyond it ((MS_between − MS_within) / eval seeds, at least 0). Balanced designs only."""
    v = values.dropna(subset=["value"])
    groups = [g["value"].to_numpy(float) for _, g in v.groupby("train_seed")]
    sizes = {len(g) for g in groups}
    if len(groups) < 1 or len(sizes) != 1 or next(iter(sizes)) < 2:
        raise ValueError("values: expected every train_seed scored under the same number (>= 2) of eval seeds, "
                         f"got {sorted(len(g) for g in groups)}")
    e = next(iter(sizes))
    within = float(np.mean([g.var(ddof=1) for g in groups]))
    between = float(e * np.var([g.mean() for g in groups], ddof=1)) if len(groups) >= 2 else math.nan
    train = max(0.0, (between - within) / e) if len(groups) >= 2 else math.nan
    return {"train_var": train, "eval_var": within, "train_sd": math.sqrt(train) if train == train else math.nan,
            "eval_sd": math.sqrt(within), "eval_share": within / (within + train) if train == train else math.nan,
            "n_train_seeds": len(groups), "n_eval_seeds": e}
