"""Confidence intervals over seeds and paired comparisons against a baseline, for the study notebooks.

Seeds are the unit of replication: a configuration's metric is summarised by its mean over seeds with a Student-t
95 % interval; a configuration is compared with the baseline by the per-seed differences (same seed = same data
order and initialisation), again with a t interval. With fewer than two seeds there is no interval and the verdict
says so. Nothing here reads files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
                       by: str = "config") -> pd.DataFrame:
    """Every group against ``baseline`` per metric, paired by seed.

    ``metrics`` maps "eval/metric" → (display name, direction): +1 when higher is better, −1 when lower is better,
    0 when neither (descriptive: the verdict then says "higher"/"lower"). The verdict is "better"/"worse" when the
    95 % interval of the mean paired difference excludes 0, else "no detectable difference"; NO_INTERVAL with one
    shared seed, NO_SPREAD when every seed gave the same non-zero difference (a zero-width interval)."""
    keyed = results.assign(key=results["eval"] + "/" + results["metric"])
    keyed = keyed[keyed["key"].isin(metrics)]
    if baseline not in set(keyed[by]):
        raise ValueError(f"baseline: expected one of the study's {by}s {sorted(set(keyed[by]))}, got {baseline!r}")
    table = keyed.pivot_table(index=[by, "seed"], columns="key", values="value", aggfunc="first")
    base = table.xs(baseline, level=by)
    rows = []
    for group in sorted(set(keyed[by]) - {baseline}):
        own = table.xs(group, level=by)
        for key, (name, direction) in metrics.items():
            if key not in table.columns:
                continue
            diff = (own[key] - base[key].reindex(own.index)).dropna()
            ci = mean_ci(diff.values)
            rows.append({by: group, "metric": name, "seeds": ci.n, "difference": ci.mean, "low": ci.low,
                         "high": ci.high, "verdict": verdict(ci, direction)})
    return pd.DataFrame(rows, columns=[by, "metric", "seeds", "difference", "low", "high", "verdict"])


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
