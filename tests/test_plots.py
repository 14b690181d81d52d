"""Plot helpers whose choices change what a reader sees."""

import pandas as pd

from saelib import plots


def _summary(values):
    return pd.DataFrame({"lambda": values, "metric": "m", "mean": range(len(values)), "low": 0.0, "high": 9.0,
                         "series": "tau = 0.02"})


def test_metric_vs_parameter_spaces_zero_and_decades_apart_values_evenly():
    fig = plots.metric_vs_parameter(_summary([10, 0, 0.02, 0.01]), "lambda", "t")
    assert fig.layout.xaxis.type == "category"
    assert list(fig.layout.xaxis.categoryarray) == ["0", "0.01", "0.02", "10"]  # numeric order, not text order
    assert list(fig.data[0].x) == ["0", "0.01", "0.02", "10"]
    assert plots.metric_vs_parameter(_summary([0.005, 0.02, 0.2]), "lambda", "t").layout.xaxis.type == "log"
    assert plots.metric_vs_parameter(_summary([0, 0.01, 0.025]), "lambda", "t").layout.xaxis.type == "linear"
