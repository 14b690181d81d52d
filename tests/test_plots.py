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


def _two_series_two_metrics():
    rows = [{"tau": t, "metric": m, "mean": i + j, "low": i + j - 0.1, "high": i + j + 0.1, "series": s}
            for i, m in enumerate(["m1", "m2"]) for j, s in enumerate(["lambda = 0.02", "lambda = 10"])
            for t in (0.005, 0.02, 0.2)]
    return pd.DataFrame(rows)


def test_a_series_keeps_one_colour_across_panels_matching_its_legend():
    fig = plots.metric_vs_parameter(_two_series_two_metrics(), "tau", "t")
    colours = {}
    for trace in fig.data:
        colours.setdefault(trace.name, set()).add((trace.line.color, trace.marker.color, trace.error_y.color))
    assert all(len(c) == 1 and None not in next(iter(c)) for c in colours.values()), colours
    assert len({next(iter(c)) for c in colours.values()}) == 2  # two series, two colours
    assert sorted(t.name for t in fig.data if t.showlegend) == ["lambda = 0.02", "lambda = 10"]  # one entry each


def test_parameter_axes_tick_at_the_measured_values():
    fig = plots.metric_vs_parameter(_two_series_two_metrics(), "tau", "t")
    for axis in (fig.layout.xaxis, fig.layout.xaxis2):
        assert axis.type == "log"
        assert list(axis.tickvals) == [0.005, 0.02, 0.2] and list(axis.ticktext) == ["0.005", "0.02", "0.2"]


def _paired(configs=("a_long_configuration_name", "b"), metrics=("m1", "m2", "m3", "m4", "m5")):
    return pd.DataFrame([{"config": c, "metric": m, "seeds": 3, "difference": 0.1, "low": 0.05, "high": 0.15,
                          "verdict": "better"} for m in metrics for c in configs])


def test_paired_differences_label_the_configurations_once_per_row_and_fit_the_page():
    fig = plots.paired_differences(_paired(), "t")
    axes = [fig.layout[name] for name in fig.layout if name.startswith("yaxis")]
    labelled = [a for a in axes if a.showticklabels is not False]
    columns = len({a.domain for a in (fig.layout[n] for n in fig.layout if n.startswith("xaxis"))})
    assert columns <= 4 and len(labelled) == -(-5 // columns)  # names once, on the first panel of each row
    assert fig.layout.width is None or fig.layout.width <= 1000  # no fixed width wider than a report page


def test_report_tables_show_every_row():
    import plotly.io as pio

    saved = {o: pd.get_option(o) for o in ("display.max_rows", "display.max_columns")}
    renderer = pio.renderers.default
    try:
        plots.use_report_renderer()
        table = pd.DataFrame({"config": [f"c{i}" for i in range(136)], "value": range(136)})
        html = table._repr_html_()
        assert all(f"<td>c{i}</td>" in html for i in range(136)) and "..." not in html  # no pandas "…" row
        assert "..." not in pd.DataFrame([range(40)])._repr_html_()  # nor a "…" column
    finally:
        for option, value in saved.items():
            pd.set_option(option, value)
        pio.renderers.default = renderer


def test_log_log_axes_are_labelled_at_whole_decades_only():
    fig = plots.log_log_lines({"a": ([0.001, 0.01, 0.1, 1], [5, 50, 500, 5000])}, "t", "x", "y")
    assert (fig.layout.xaxis.type, fig.layout.xaxis.dtick, fig.layout.yaxis.dtick) == ("log", 1, 1)
