"""Plotly figures shared by the notebooks (functions take DataFrames and return figures), and the files the HTML
reports share instead of inlining them: one local copy of plotly.js and one notebook stylesheet (``offline_report``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from saelib.run_files import atomic_write

#: history column -> panel title, in display order; architecture-specific losses are added after these.
CURVES = {
    "losses/overall_loss": "total loss",
    "losses/mse_loss": "MSE loss",
    "metrics/l0": "L0",
    "metrics/explained_variance": "explained variance (train batch)",
    "sparsity/dead_features": "dead latents",
}

#: architecture-specific metrics logged by saelib.saes
ORTH_METRICS = ("metrics/n_competing_pairs", "metrics/competing_mean_cos2", "metrics/chunk_mean_max_cos2",
                "metrics/gram_mean_cos2")


def training_curves(history: pd.DataFrame, title: str = "training") -> go.Figure:
    """One panel per logged quantity against training tokens."""
    if history.empty:
        raise ValueError("history: no rows logged; was the run trained with log_every > its step count?")
    extra = [c for c in history.columns if c not in CURVES and (c.startswith("losses/") or c in ORTH_METRICS)]
    columns = [c for c in [*CURVES, *extra] if c in history.columns]
    names = [CURVES.get(c, c.split("/", 1)[1]) for c in columns]
    n_cols = 3
    n_rows = -(-len(columns) // n_cols)
    fig = make_subplots(rows=n_rows, cols=n_cols, subplot_titles=names)
    x = history["details/n_training_samples"]
    for i, column in enumerate(columns):
        fig.add_trace(go.Scatter(x=x, y=history[column], mode="lines", name=names[i], showlegend=False),
                      row=i // n_cols + 1, col=i % n_cols + 1)
    fig.update_xaxes(title_text="training tokens")
    fig.update_layout(title=title, height=300 * n_rows, template="plotly_white")
    return fig


def use_report_renderer() -> None:
    """Figures carry plotly's own mimetype (JupyterLab renders it offline) plus HTML that loads plotly.js (from the
    CDN in the notebook; :func:`offline_report` points reports at the local copy), so reports do not embed the
    4.6 MB library each. Tables show every row and column: a report has no "…" to click open."""
    import plotly.io as pio

    pio.renderers.default = "plotly_mimetype+notebook_connected"
    pd.set_option("display.max_rows", None)
    pd.set_option("display.max_columns", None)


PLOTLY_JS = "plotly.min.js"
_CDN_PLOTLY_TAG = re.compile(r'<script[^>]*\bsrc="https://cdn\.plot\.ly/plotly-[^"]*"[^>]*>')
#: plotly's notebook_connected renderer also emits, once per notebook, a module that imports plotly.js from its CDN.
_CDN_PLOTLY_IMPORT = re.compile(r'<script type="module">\s*import "https://cdn\.plot\.ly/[^"]*"\s*</script>\n?')
_STYLE = re.compile(r"<style(?P<attrs>[^>]*)>(?P<css>.*?)</style>\s*", re.S)


def _shared_file(name: str, content: bytes, html_path: Path) -> str:
    """Write ``content`` once to ``reports/<name>`` (``<html_path>/../../<name>``, shared by every study's reports);
    its path relative to ``html_path``'s folder."""
    shared = Path(html_path).parent.parent / name
    if not shared.exists() or shared.stat().st_size != len(content):
        shared.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(shared, lambda tmp: tmp.write_bytes(content))  # the runner renders several reports at once
    return os.path.relpath(shared, Path(html_path).parent)


def offline_plotlyjs(page: str, html_path: Path) -> str:
    """``page`` with its plotly.js script tags pointing at one local copy shared by the reports of every study
    (``reports/plotly.min.js``, copied from the installed plotly), so figures draw with no network. The CDN tag's
    integrity and crossorigin attributes go too: a ``file://`` page cannot load a script marked crossorigin; the
    renderer's CDN module import is dropped (the local tags already define ``Plotly``)."""
    import plotly

    source = Path(plotly.__file__).parent / "package_data" / PLOTLY_JS
    rel = _shared_file(PLOTLY_JS, source.read_bytes(), html_path)
    return _CDN_PLOTLY_TAG.sub(f'<script charset="utf-8" src="{rel}">', _CDN_PLOTLY_IMPORT.sub("", page))


def shared_css(page: str, html_path: Path) -> str:
    """``page`` with the ``<style>`` blocks of its ``<head>`` (nbconvert's ≈ 260 KB of JupyterLab CSS, the same in
    every report) moved into one stylesheet shared by the reports, ``reports/notebook-<sha256 prefix>.css``, linked
    relatively where the first block was. The name follows the content, so a page keeps the CSS it was made with.
    Scoped blocks (pandas tables) and blocks marked ``data-inline`` (a page's own few rules) stay; a page without
    head styles comes back unchanged."""
    import hashlib

    head, sep, body = page.partition("</head>")
    kept = {"scoped", "data-inline"}
    blocks = [m for m in _STYLE.finditer(head) if not kept & {a.split("=")[0] for a in m.group("attrs").split()}]
    if not sep or not blocks:
        return page
    css = "\n".join(m.group("css").strip("\n") for m in blocks).encode()
    rel = _shared_file(f"notebook-{hashlib.sha256(css).hexdigest()[:12]}.css", css, html_path)
    out, last = [], 0
    for i, m in enumerate(blocks):
        out.append(head[last:m.start()])
        if i == 0:
            out.append(f'<link href="{rel}" rel="stylesheet" type="text/css"/>\n')
        last = m.end()
    return "".join(out) + head[last:] + sep + body


#: nbconvert's template loads require.js and MathJax from cdnjs; the reports use neither (no LaTeX; plotly.js is local).
_REMOTE_SCRIPT = re.compile(r'<script[^>]*\bsrc="https?://[^"]*"[^>]*>\s*</script>\n?')


def offline_report(page: str, html_path: Path) -> str:
    """A report page as committed: plotly.js and the notebook CSS from the shared copies in ``reports/``, and no
    script fetched from the network."""
    return _REMOTE_SCRIPT.sub("", shared_css(offline_plotlyjs(page, html_path), html_path))


def metrics_table(metrics: dict[str, float]) -> pd.DataFrame:
    """Headline metrics as a one-column table, rounded for reading."""
    return pd.DataFrame({"value": metrics}).round(4)


def absorption_per_letter(result: dict) -> go.Figure:
    """SAEBench absorption per first letter: mean absorption fraction and full-absorption rate (bars), with the
    number of split features and probe true positives on hover."""
    details = pd.DataFrame(result["eval_result_details"])
    if details.empty:
        raise ValueError("absorption result: no letters passed the probe-F1 gate, nothing to plot")
    details = details.sort_values("first_letter")
    hover = [f"split features {s}<br>probe true positives {t}"
             for s, t in zip(details["num_split_features"], details["num_probe_true_positives"])]
    fig = go.Figure([
        go.Bar(x=details["first_letter"], y=details["mean_absorption_fraction"], name="mean absorption fraction",
               hovertext=hover),
        go.Bar(x=details["first_letter"], y=details["full_absorption_rate"], name="full-absorption rate",
               hovertext=hover),
    ])
    fig.update_layout(barmode="group", title="absorption per first letter (letters that passed the probe gate)",
                      xaxis_title="first letter", yaxis_title="fraction", template="plotly_white")
    return fig


PROBING_KS = (1, 2, 5, 10, 20, 50)


def probing_table(result: dict) -> pd.DataFrame:
    """Sparse-probing accuracy per task (rows) for LLM and SAE at each k and with everything ('full')."""
    rows = []
    for d in result["eval_result_details"]:
        for who in ("llm", "sae"):
            row = {"task": d["dataset_name"].removesuffix("_results"), "source": who,
                   "full": d.get(f"{who}_test_accuracy")}
            row.update({k: d.get(f"{who}_top_{k}_test_accuracy") for k in PROBING_KS})
            rows.append(row)
    table = pd.DataFrame(rows)
    mean = table.groupby("source", as_index=False).mean(numeric_only=True).assign(task="mean")
    return pd.concat([table, mean], ignore_index=True)


def probing_vs_k(result: dict) -> go.Figure:
    """Test accuracy of top-k probes against k, one line per task, LLM (dashed) and SAE (solid); the mean bold."""
    table = probing_table(result)
    fig = go.Figure()
    for _, row in table.iterrows():
        is_mean = row["task"] == "mean"
        fig.add_trace(go.Scatter(
            x=[str(k) for k in PROBING_KS] + ["full"], y=[row[k] for k in PROBING_KS] + [row["full"]],
            mode="lines+markers", name=f"{row['source'].upper()} {row['task']}",
            line={"dash": "dash" if row["source"] == "llm" else "solid", "width": 4 if is_mean else 1.5},
            opacity=1.0 if is_mean else 0.6))
    fig.update_layout(title="sparse probing: test accuracy vs k", xaxis_title="k (latents or LLM dimensions)",
                      yaxis_title="test accuracy", template="plotly_white", height=500)
    return fig


def eval_status_table(status: pd.DataFrame) -> pd.DataFrame:
    """The status rows of ``evaluate_run``, messages kept whole."""
    return status[["eval", "status", "wall_time_s", "message"]].style.set_properties(
        subset=["message"], **{"white-space": "pre-wrap", "text-align": "left"})


def pareto(wide_runs: pd.DataFrame, x: str, y: str, title: str) -> go.Figure:
    """One point per run (``wide`` table), coloured by architecture; hover names the run."""
    fig = go.Figure()
    for arch, part in wide_runs.groupby("architecture"):
        fig.add_trace(go.Scatter(x=part[x], y=part[y], mode="markers", name=arch, text=part["run"],
                                 marker={"size": 9}, hovertemplate="%{text}<br>%{x:.4g}, %{y:.4g}"))
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, template="plotly_white")
    return fig


def _grid(n: int) -> tuple[int, int]:
    """(rows, columns) for ``n`` panels in a report page's width: at most 4 side by side, 4 as 2 × 2."""
    cols = 2 if n == 4 else min(n, 4)
    return -(-n // cols), cols


def metric_vs_parameter(summary: pd.DataFrame, parameter: str, title: str) -> go.Figure:
    """Mean ± 95 % CI of each metric against ``parameter`` (tau or lambda), one panel per metric; ``summary`` has
    columns parameter, metric, mean, low, high, and optionally ``series`` (one line per series value, in one colour
    in every panel). The x axis ticks at the measured values."""
    from plotly.colors import qualitative

    metrics = list(dict.fromkeys(summary["metric"]))
    rows, cols = _grid(len(metrics))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=metrics, horizontal_spacing=0.08,
                        vertical_spacing=0.3 / rows)
    series = summary["series"] if "series" in summary else pd.Series("", index=summary.index)
    palette = {name: qualitative.Plotly[i % len(qualitative.Plotly)] for i, name in enumerate(dict.fromkeys(series))}
    values = summary[parameter].astype(float)
    positive = values[values > 0]
    # 0 next to values decades apart (λ = 0, 0.01 … 10): evenly spaced categories; all positive: log axis
    categorical = (values <= 0).any() and len(positive) > 0 and positive.max() / positive.min() > 100
    axis_type = "category" if categorical else "log" if (values > 0).all() else "linear"
    measured = sorted(values.unique())
    order = [f"{v:g}" for v in measured]
    ticks = {"categoryorder": "array", "categoryarray": order} if categorical else {
        "tickmode": "array", "tickvals": measured, "ticktext": order}
    for i, metric in enumerate(metrics):
        row, col = i // cols + 1, i % cols + 1
        for name, colour in palette.items():
            part = summary[(summary["metric"] == metric) & (series == name)].sort_values(parameter)
            x = part[parameter].map(lambda v: f"{v:g}") if categorical else part[parameter]
            fig.add_trace(go.Scatter(
                x=x, y=part["mean"], mode="lines+markers", name=str(name), legendgroup=str(name),
                showlegend=i == 0 and bool(name), line={"color": colour}, marker={"color": colour},
                error_y={"type": "data", "symmetric": False, "array": (part["high"] - part["mean"]).fillna(0),
                         "arrayminus": (part["mean"] - part["low"]).fillna(0), "color": colour}), row=row, col=col)
        fig.update_xaxes(type=axis_type, row=row, col=col, **ticks)
    fig.update_xaxes(title_text=parameter, row=rows)  # the bottom row names the shared parameter
    fig.update_layout(title=title, template="plotly_white", height=120 + 300 * rows)
    return fig


VERDICT_COLOURS = {"better": "#2ca02c", "worse": "#d62728", "higher": "#1f77b4", "lower": "#1f77b4"}
"""Verdict → colour in figures and tables; anything else (no detectable difference, no interval) is grey."""


def paired_differences(paired: pd.DataFrame, title: str) -> go.Figure:
    """Paired difference (configuration − baseline) with its 95 % CI, one panel per metric; configurations are named
    once per row of panels, points coloured by verdict (green better, red worse, blue changed, grey neither)."""
    metrics = list(dict.fromkeys(paired["metric"]))
    configs = sorted(paired["config"].unique())
    rows, cols = _grid(len(metrics))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=metrics, shared_yaxes=True, horizontal_spacing=0.03,
                        vertical_spacing=0.25 / rows)
    for i, metric in enumerate(metrics):
        part = paired[paired["metric"] == metric]
        fig.add_trace(go.Scatter(
            x=part["difference"], y=part["config"], mode="markers", showlegend=False, text=part["verdict"],
            marker={"color": [VERDICT_COLOURS.get(v, "#7f7f7f") for v in part["verdict"]], "size": 8},
            hovertemplate="%{y}: %{x:+.4g} (%{text})<extra></extra>",
            error_x={"type": "data", "symmetric": False, "array": (part["high"] - part["difference"]).fillna(0),
                     "arrayminus": (part["difference"] - part["low"]).fillna(0), "color": "#7f7f7f"}),
            row=i // cols + 1, col=i % cols + 1)
        fig.add_vline(x=0, line_dash="dot", row=i // cols + 1, col=i % cols + 1)
    fig.update_yaxes(categoryorder="array", categoryarray=configs[::-1], automargin=True)
    fig.update_xaxes(tickfont={"size": 10}, nticks=5)
    fig.update_layout(title=title, template="plotly_white", height=120 + rows * max(220, 22 * len(configs)))
    return fig


def headline_png(paired: pd.DataFrame, metrics: list[str], order: list[str], path: Path) -> Path | None:
    """``paired`` (as from ``stats.paired_vs_baseline``) as a matplotlib PNG for the README: difference from TopK
    with its 95 % interval, one panel per metric in ``metrics``, configurations in ``order`` named once per row,
    ≤ 3 panels a row, 10 inches wide (fits a page); green better, red worse, blue changed, hollow one seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in metrics if n in set(paired["metric"])]
    if not names:
        return None
    configs = [c for c in order if c in set(paired["config"])]
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(10, rows * (0.22 * len(configs) + 1.0) + 0.5), sharey=True,
                             squeeze=False)
    y = list(range(len(configs)))
    for ax, name in zip(axes.flat, names):
        part = paired[paired["metric"] == name].set_index("config").reindex(configs)
        for yi, row in zip(y, part.itertuples()):
            colour = VERDICT_COLOURS.get(row.verdict, "#7f7f7f") if isinstance(row.verdict, str) else "#7f7f7f"
            if row.low == row.low:  # not NaN
                ax.plot([row.low, row.high], [yi, yi], color=colour, lw=1.2)
            ax.plot([row.difference], [yi], "o", color=colour, ms=3.5, mfc=colour if row.seeds >= 2 else "none")
        ax.axvline(0, color="0.2", lw=0.8, ls=":")
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(plt.MaxNLocator(4))
        ax.set_yticks(y, configs)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    axes[0, 0].invert_yaxis()
    fig.suptitle("difference from TopK, paired by seed (95 % CI; green better, red worse, blue changed, hollow one "
                 "seed)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110), keep_suffix=True)
    plt.close(fig)
    return path


#: frontier panels: y key of ``summary.frontier`` → axis title (x is always held-out explained variance)
FRONTIER_PANELS = {"absorption": "absorption (mean fraction)", "firing_absorption": "main latents silent (firing)",
                   "probing": "sparse probing top-1"}
FRONTIER_COLOURS = {"topk": "#000000", "sgo_topk": "#1f77b4", "ortsae_topk": "#ff7f0e"}


def frontier_png(entries: list[dict], path: Path) -> Path | None:
    """The orthogonality frontier for the README and answers: per configuration of ``summary.frontier`` (TopK, SGO,
    OrtSAE) its seed mean with 95 % intervals on both axes, absorption / firing-based absorption / probing against
    held-out EV, one colour per architecture, penalised points labelled with λ (and τ for SGO). None when fewer than
    two configurations have both values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def usable(e, key):
        return e.get("ev") is not None and e.get(key) is not None

    panels = [k for k in FRONTIER_PANELS if sum(usable(e, k) for e in entries) >= 2]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels) + 0.4, 3.2), squeeze=False, sharex=True)
    taus = {e.get("tau") for e in entries if e["architecture"] == "sgo_topk"}
    for ax, key in zip(axes[0], panels):
        for arch, colour in FRONTIER_COLOURS.items():
            points = [e for e in entries if e["architecture"] == arch and usable(e, key)]
            for e in points:
                def span(name):  # an interval as error-bar lengths; a single seed has none
                    lo, hi = e.get(f"{name}_ci_low"), e.get(f"{name}_ci_high")
                    return [[e[name] - lo], [hi - e[name]]] if lo is not None and hi is not None else None
                ax.errorbar(e["ev"], e[key], xerr=span("ev"), yerr=span(key), fmt="o", ms=4, color=colour, lw=0.9,
                            capsize=2, mfc=colour if e.get("seeds", 1) >= 2 else "none")
                if arch != "topk" and e.get("lambda") is not None:
                    label = f"λ{e['lambda']:g}" + (f" τ{e['tau']:g}" if arch == "sgo_topk" and len(taus) > 1 else "")
                    ax.annotate(label, (e["ev"], e[key]), fontsize=6, xytext=(3, 3), textcoords="offset points")
            if points and key == panels[0]:
                ax.plot([], [], "o", color=colour, label={"topk": "TopK", "sgo_topk": "SGO",
                                                          "ortsae_topk": "OrtSAE"}[arch])
        ax.set_ylabel(FRONTIER_PANELS[key], fontsize=8)
        ax.set_xlabel("explained variance (held out)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(plt.MaxNLocator(4))
    axes[0, 0].legend(fontsize=7, frameon=False)
    fig.suptitle("orthogonality frontier: seed means with 95 % intervals (hollow: one seed)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110), keep_suffix=True)
    plt.close(fig)
    return path


def log_log_lines(series: dict[str, tuple], title: str, x_title: str, y_title: str,
                  mode: str = "lines+markers") -> go.Figure:
    """One trace per ``series`` entry (name → (x, y)) on log–log axes labelled at whole decades only (plotly's
    default labels every 2 and 5 in between: "2 5 0.01 2 5")."""
    fig = go.Figure([go.Scatter(x=list(x), y=list(y), mode=mode, name=name) for name, (x, y) in series.items()])
    fig.update_xaxes(type="log", dtick=1, title_text=x_title)
    fig.update_yaxes(type="log", dtick=1, title_text=y_title)
    fig.update_layout(title=title, template="plotly_white")
    return fig


def unlearning_headline(result: dict) -> dict[str, float]:
    """The proxy's headline: score, its best setting and the loss rises behind it (nats)."""
    raw = result["eval_result_unstructured"]
    best = raw.get("best_setting") or {}
    return {
        "unlearning_proxy_score (nats)": result["eval_result_metrics"]["unlearning"]["unlearning_score"],
        "best: retain_threshold": best.get("retain_threshold"), "best: n_features": best.get("n_features"),
        "best: multiplier": best.get("multiplier"), "best: forget loss rise": best.get("forget_loss_rise"),
        "best: retain loss rise": best.get("retain_loss_rise"),
        "retain tolerance (nats)": raw.get("retain_tolerance_nats"),
        "admissible settings": raw.get("n_admissible"), "settings": raw.get("n_settings"),
    }


def unlearning_curve(result: dict) -> go.Figure:
    """Proxy score (forget rise − retain rise, ± 1 SE) against the clamp multiplier, one line per
    (retain threshold, latents); hollow markers are settings whose retain damage exceeds the tolerance."""
    table = pd.DataFrame(result["eval_result_unstructured"]["settings_table"])
    fig = go.Figure()
    for (thr, n), part in table.groupby(["retain_threshold", "n_features"]):
        part = part.sort_values("multiplier")
        fig.add_trace(go.Scatter(
            x=part["multiplier"], y=part["score"], error_y={"type": "data", "array": part["score_se"]},
            mode="lines+markers", name=f"retain thr {thr:g}, {n} latents",
            marker={"symbol": ["circle" if a else "circle-open" for a in part["admissible"]], "size": 9}))
    fig.update_layout(title="unlearning proxy: forget − retain loss rise vs clamp multiplier (hollow: retain "
                            "damage above tolerance)", xaxis_title="multiplier (clamp to −multiplier)",
                      yaxis_title="score (nats)", xaxis_type="log", template="plotly_white")
    return fig
