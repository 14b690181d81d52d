"""Plotly figures shared by the notebooks. Functions take DataFrames and return figures; nothing is shown or saved.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

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
    """Figures carry plotly's own mimetype (JupyterLab renders it offline) plus HTML that loads plotly.js from
    its CDN, so HTML reports stay ≈ 0.5 MB instead of embedding the 4.6 MB library in every report."""
    import plotly.io as pio

    pio.renderers.default = "plotly_mimetype+notebook_connected"


def metrics_table(metrics: dict[str, float]) -> pd.DataFrame:
    """Headline metrics as a one-column table, rounded for reading."""
    return pd.DataFrame({"value": metrics}).round(4)
