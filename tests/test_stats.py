"""Intervals and paired verdicts against direct computations on known numbers."""

import math

import pandas as pd
import pytest

from saelib.stats import NO_SPREAD, mean_ci, paired_vs_baseline, summarise


def test_mean_ci_matches_a_direct_t_interval():
    ci = mean_ci([1.0, 2.0, 3.0])
    # mean 2, sd 1, n 3: half-width = t_{0.975, 2} · 1/√3 = 4.302653 / 1.732051 = 2.484138
    assert ci.mean == 2.0 and ci.n == 3
    assert ci.high - 2.0 == pytest.approx(2.484138, rel=1e-6) and ci.low == pytest.approx(2.0 - 2.484138, rel=1e-6)
    assert str(ci) == "2 ± 2.5"
    one = mean_ci([0.5, math.nan])
    assert one.n == 1 and math.isnan(one.low) and str(one) == "0.5 (n=1)"
    with pytest.raises(ValueError, match="confidence: expected"):
        mean_ci([1, 2], confidence=95)


def tidy(rows):
    return pd.DataFrame([{"config": c, "seed": s, "eval": "e", "metric": m, "value": v} for c, s, m, v in rows])


def test_paired_verdicts_use_per_seed_differences():
    rows = [("topk", s, "ev", v) for s, v in enumerate([0.90, 0.80, 0.70])]
    rows += [("sgo", s, "ev", v) for s, v in enumerate([0.91, 0.812, 0.709])]  # +.01 +.012 +.009: paired → better
    rows += [("same", s, "ev", v) for s, v in enumerate([0.91, 0.81, 0.71])]  # +0.01 exactly on every seed: no spread
    rows += [("twin", s, "ev", v) for s, v in enumerate([0.90, 0.80, 0.70])]  # identical to the baseline
    rows += [("sgo", s, "abs", v) for s, v in enumerate([0.2, 0.3, 0.1])]
    rows += [("topk", s, "abs", v) for s, v in enumerate([0.1, 0.4, 0.2])]  # differences +.1 −.1 −.1: no difference
    rows += [("gram", s, "ev", v) for s, v in enumerate([0.85, 0.75, 0.66])]
    table = paired_vs_baseline(tidy(rows), {"e/ev": ("EV", +1), "e/abs": ("absorption", -1)}).set_index(
        ["config", "metric"])
    assert table.loc[("sgo", "EV"), "verdict"] == "better"
    assert table.loc[("sgo", "EV"), "difference"] == pytest.approx(0.031 / 3)
    assert table.loc[("same", "EV"), "verdict"] == NO_SPREAD  # a zero-width interval is no evidence of a difference
    assert table.loc[("twin", "EV"), "verdict"] == "no detectable difference"
    # measured: two seeds of a probing accuracy, the same difference up to float rounding
    real = tidy([("base", 0, "acc", 0.62569444444444444), ("base", 1, "acc", 0.63732638888888893),
                 ("run", 0, "acc", 0.63229166666666670), ("run", 1, "acc", 0.64392361111111107)])
    assert paired_vs_baseline(real, {"e/acc": ("top-1", 1)}, baseline="base")["verdict"].item() == NO_SPREAD
    assert table.loc[("sgo", "absorption"), "verdict"] == "no detectable difference"
    assert table.loc[("gram", "EV"), "verdict"] == "worse"
    assert ("gram", "absorption") not in table.index or table.loc[("gram", "absorption"), "seeds"] == 0
    summary = summarise(tidy(rows), {"e/ev": "EV"}).set_index("config")
    assert summary.loc["topk", "mean"] == pytest.approx(0.8) and summary.loc["topk", "n"] == 3
    with pytest.raises(ValueError, match="baseline: expected one of"):
        paired_vs_baseline(tidy(rows), {"e/ev": ("EV", 1)}, baseline="standard")
