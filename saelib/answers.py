"""The study's answers to the mission's questions, written from its measured results.

``write_answers(study, study_dir)`` turns a study's eval results into ``reports/<study>/answers.md`` — one paragraph
per question, every number with its 95 % interval over seeds — and ``reports/<study>/headline.png`` (paired
differences from TopK, the figure the README shows). When the README holds the markers
``<!-- answers:<study>:begin -->`` … ``<!-- answers:<study>:end -->``, the text between them is replaced, so the
README's answers are always the last measured ones. The study runner calls this after its notebooks.

Nothing is recomputed from activations: numbers come from ``saelib.evals.results.study_results`` and the
competition eval's stored absorbing pairs; intervals and verdicts from ``saelib.stats``. Statements are chosen by
the numbers (better / worse / no detectable difference, with the interval that decided it), never written by hand.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from saelib import io
from saelib.evals.results import HEADLINE, study_results
from saelib.stats import Interval, mean_ci, paired_vs_baseline, summarise

REFERENCE_TAU = 0.02
"""The τ at which runs are compared on held-out competition (the competition eval's ``reference_tau``)."""
PENALTY_METRIC = f"competition/tau_{REFERENCE_TAU:g}.competing_weighted_cos2"
QUALITY = {k: v for k, v in HEADLINE.items() if v[1] != 0}
"""Metrics with a direction (higher or lower is better)."""
FIGURE_METRICS = ["absorption/mean.mean_absorption_fraction_score", "sparse_probing/sae.sae_top_1_test_accuracy",
                  "unlearning_proxy/unlearning.unlearning_score", "core/model_performance_preservation.ce_loss_score",
                  PENALTY_METRIC]
BASELINES = ("standard", "batchtopk", "matryoshka", "ortsae", "gram")
FIGURE_LINK = "![paired differences from TopK]({figure})"
BEGIN, END = "<!-- answers:{study}:begin -->", "<!-- answers:{study}:end -->"


@dataclass
class Answers:
    markdown: str
    figure: Path | None


def _num(x: float, digits: int = 3) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}g}"


def _ci(ci: Interval, digits: int = 3) -> str:
    if ci.n == 0:
        return "n/a"
    if ci.n < 2:
        return f"{_num(ci.mean, digits)} (one seed, no interval)"
    return f"{_num(ci.mean, digits)} [{_num(ci.low, digits)}, {_num(ci.high, digits)}]"


def _diff(row) -> str:
    if row.seeds < 2:
        return f"{row.difference:+.3g} (one seed)"
    return f"{row.difference:+.3g} [{row.low:+.3g}, {row.high:+.3g}]"


def _is_sgo(config: str) -> bool:
    return config.startswith("sgo_")


def _is_control(config: str) -> bool:
    return re.match(r"sgo_t[0-9.]+_l0$", config) is not None


def _sgo_label(config: str) -> str:
    m = re.match(r"sgo_t([0-9.]+)_l([0-9.]+)$", config)
    return f"SGO (τ {m.group(1)}, λ {m.group(2)})" if m else config


def absorbing_pairs(study_dir: Path) -> pd.DataFrame:
    """Per run and τ: how many distinct (absorbed, absorbing) latent pairs the absorption eval found, the fraction
    of them the competition score flags at τ, and the base rate (fraction of all co-firing pairs flagged)."""
    rows = []
    for run_dir in sorted(p for p in Path(study_dir).iterdir() if (p / "evals" / "competition.json").exists()):
        result = io.read_json(run_dir / "evals" / "competition.json")
        pairs = result.get("eval_result_unstructured", {}).get("absorption_vs_competition") or []
        if not pairs:
            continue
        distinct = pd.DataFrame(pairs).drop_duplicates(["main_latent", "absorbing_latent"])
        metrics = result["eval_result_metrics"]
        for tau in result["eval_config"]["taus"]:
            per_tau = metrics.get(f"tau_{tau:g}") or metrics.get(f"tau_{tau}")
            if not per_tau or not per_tau.get("n_cofiring_pairs"):
                continue
            rows.append({"run": run_dir.name, "config": re.sub(r"_s\d+$", "", run_dir.name), "tau": float(tau),
                         "pairs": len(distinct), "flagged": float((distinct["score"] > tau).mean()),
                         "base_rate": per_tau["n_competing_pairs"] / per_tau["n_cofiring_pairs"]})
    return pd.DataFrame(rows, columns=["run", "config", "tau", "pairs", "flagged", "base_rate"])


def _values(results: pd.DataFrame, config: str, key: str) -> pd.Series:
    ev, metric = key.split("/", 1)
    part = results[(results["config"] == config) & (results["eval"] == ev) & (results["metric"] == metric)]
    return part.set_index("seed")["value"]


def _profile_line(study_dir: Path, results: pd.DataFrame) -> str:
    cfg = io.read_json(Path(study_dir) / results["run"].iloc[0] / io.RUN_CFG_FILE)
    seeds = sorted(int(s) for s in results["seed"].dropna().unique())
    return (f"{results['run'].nunique()} runs ({results['config'].nunique()} configurations × seeds {seeds}) on "
            f"{cfg['model_name']} layer {cfg['hook_layer']} resid_post, d_sae {cfg['d_sae']:,}, k {cfg['k']}, "
            f"{cfg['training_tokens']:,} training tokens. Brackets: 95 % t-interval over seeds (paired by seed for "
            f"differences); a difference is called better/worse only when its interval excludes 0.")


def _penalty_paragraph(results: pd.DataFrame, paired_all: pd.DataFrame) -> str:
    lines = []
    zero = [c for c in sorted(results["config"].unique()) if _is_control(c)]
    for config in zero:
        diffs = []
        for key in QUALITY:
            a, b = _values(results, config, key), _values(results, "topk", key)
            common = a.index.intersection(b.index)
            diffs += list((a[common] - b[common]).abs())
        if diffs:
            exact = max(diffs) == 0
            lines.append(f"`{config}` (λ = 0) against TopK on the same seeds: largest absolute difference over "
                         f"{len(diffs)} metric values = {max(diffs):.3g}"
                         + (" — identical, as it must be (the control)." if exact
                            else " — NOT identical: the λ = 0 control is broken."))
    name = HEADLINE[PENALTY_METRIC][0]
    rows = paired_all[(paired_all["metric"] == name) & paired_all["config"].map(_is_sgo)]
    if rows.empty:
        lines.append("No held-out competition results for the SGO runs.")
        return " ".join(lines)
    base = mean_ci(_values(results, "topk", PENALTY_METRIC).values)
    lower = rows[rows["verdict"] == "lower"]
    unchanged = rows[rows["verdict"] == "no detectable difference"]
    lines.append(f"Held-out score-weighted decoder cos² of the pairs competing at τ = {REFERENCE_TAU:g}: TopK "
                 f"{_ci(base)}. The penalty lowers it detectably in {len(lower)} of {len(rows)} SGO configurations"
                 + (": " + "; ".join(f"{_sgo_label(r.config)} {_diff(r)}" for r in
                                     lower.sort_values("difference").itertuples()) if len(lower) else "")
                 + "." + (f" No detectable change in {len(unchanged)}: " + "; ".join(
                     f"{_sgo_label(r.config)} {_diff(r)}" for r in unchanged.itertuples()) + "." if len(unchanged)
                          else ""))
    return " ".join(lines)


def _quality_paragraph(paired: pd.DataFrame) -> str:
    if paired.empty:
        return "No configuration shares seeds with TopK yet."
    lines = []
    sgo = paired[paired["config"].map(_is_sgo) & ~paired["config"].map(_is_control)]  # λ = 0: the control
    for metric in dict.fromkeys(paired["metric"]):
        part = sgo[sgo["metric"] == metric]
        if part.empty:
            continue
        counts = part["verdict"].value_counts()
        better, worse = part[part["verdict"] == "better"], part[part["verdict"] == "worse"]
        text = (f"**{metric}**: of {len(part)} SGO configurations with λ > 0, {counts.get('better', 0)} better than TopK, "
                f"{counts.get('worse', 0)} worse, {counts.get('no detectable difference', 0)} no detectable "
                f"difference")
        if len(better):
            best = better.sort_values("difference", key=lambda d: -d.abs()).iloc[0]
            text += f" (largest gain {_sgo_label(best.config)} {_diff(best)})"
        if len(worse):
            worst = worse.sort_values("difference", key=lambda d: -d.abs()).iloc[0]
            text += f" (largest loss {_sgo_label(worst.config)} {_diff(worst)})"
        lines.append(text + ".")
    others = paired[paired["config"].isin(BASELINES)]
    for config, part in others.groupby("config"):
        detected = part[part["verdict"].isin(("better", "worse"))]
        lines.append(f"`{config}` vs TopK: " + ("; ".join(f"{r.metric} {r.verdict} {_diff(r)}" for r in
                                                         detected.itertuples()) if len(detected)
                                                 else "no detectable difference on any metric") + ".")
    return " ".join(lines)


def _competition_paragraph(results: pd.DataFrame, absorbing: pd.DataFrame) -> str:
    def ci(key: str, config: str = "topk") -> Interval:
        return mean_ci(_values(results, config, key).values)

    t = f"tau_{REFERENCE_TAU:g}"
    cofiring, competing = ci(f"competition/{t}.n_cofiring_pairs"), ci(f"competition/{t}.n_competing_pairs")
    if cofiring.n == 0:
        return "No competition results for TopK."
    text = (f"In TopK, {_ci(cofiring, 4)} latent pairs co-fire on held-out text; {_ci(competing, 4)} of them compete "
            f"at τ = {REFERENCE_TAU:g}. Competing pairs' decoders overlap more than non-competing ones: mean cos² "
            f"{_ci(ci(f'competition/{t}.competing_mean_cos2'))} vs {_ci(ci(f'competition/{t}.noncompeting_mean_cos2'))}. "
            f"The competition graph at this τ: {_ci(ci('competition/graph.n_latents_competing'), 4)} latents, mean "
            f"degree {_ci(ci('competition/graph.mean_degree'))}, largest cluster "
            f"{_ci(ci('competition/graph.largest_cluster'), 4)} latents ({_ci(ci('competition/graph.n_clusters'))} "
            f"clusters), {_ci(ci('competition/graph.dense_latents'))} dense latents set apart.")
    part = absorbing[(absorbing["config"] == "topk") & (absorbing["tau"] == REFERENCE_TAU)]
    if not part.empty:
        text += (f" Absorption ↔ competition: of the distinct (absorbed, absorbing) latent pairs the absorption eval "
                 f"found ({_ci(mean_ci(part['pairs'].values), 3)} per TopK run), "
                 f"{_ci(mean_ci(100 * part['flagged'].values), 3)} % are flagged as competing at τ = "
                 f"{REFERENCE_TAU:g}, against a base rate of {_ci(mean_ci(100 * part['base_rate'].values), 3)} % of all "
                 f"co-firing pairs.")
    return text


def _threshold_paragraph(results: pd.DataFrame, paired: pd.DataFrame) -> str:
    sweep = sorted({c for c in results["config"].unique() if re.match(r"sgo_t[0-9.]+_l10$", c)},
                   key=lambda c: float(re.match(r"sgo_t([0-9.]+)_", c).group(1)))
    counts = []
    for tau in sorted({float(m) for m in results["metric"].str.extract(r"^tau_([0-9.]+)\.")[0].dropna()}):
        ci = mean_ci(_values(results, "topk", f"competition/tau_{tau:g}.n_competing_pairs").values)
        if ci.n:
            counts.append(f"τ {tau:g}: {ci.mean:,.0f}")
    text = ("Pairs each τ would penalise (held-out, TopK, mean over seeds): " + "; ".join(counts) + "."
            if counts else "")
    if not sweep:
        return text + " No τ sweep in this study."
    lines = []
    for metric in dict.fromkeys(paired["metric"]):
        part = paired[(paired["metric"] == metric) & paired["config"].isin(sweep)]
        if part.empty:
            continue
        part = part.set_index("config").reindex(sweep).dropna(subset=["difference"])
        detected = part[part["verdict"] != "no detectable difference"]
        lines.append(f"{metric}: " + ", ".join(f"τ {re.match(r'sgo_t([0-9.]+)_', c).group(1)} {_diff(r)}"
                                                for c, r in zip(part.index, part.itertuples()))
                     + (f" ({len(detected)} of {len(part)} detectably different from TopK)" if len(part) else ""))
    return (text + f" Threshold sweep at λ = 10, difference from TopK per τ — " + "; ".join(lines) + ".")


def headline_figure(paired: pd.DataFrame, path: Path) -> Path | None:
    """Paired difference from TopK with its 95 % interval, one panel per metric (matplotlib PNG for the README)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [HEADLINE[k][0] for k in FIGURE_METRICS]
    names = [n for n in names if n in set(paired["metric"])]
    if not names:
        return None
    configs = sorted(paired["config"].unique(), key=lambda c: (_is_sgo(c), c))
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 0.32 * len(configs) + 1.4), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, names):
        part = paired[paired["metric"] == name].set_index("config").reindex(configs)
        y = np.arange(len(configs))
        colour = ["tab:green" if v == "better" else "tab:red" if v == "worse" else
                  "tab:blue" if v in ("lower", "higher") else "0.4" for v in part["verdict"].fillna("")]
        for yi, row, c in zip(y, part.itertuples(), colour):
            if not np.isnan(row.low):
                ax.plot([row.low, row.high], [yi, yi], color=c, lw=1.2)
            ax.plot([row.difference], [yi], "o", color=c, ms=3.5)
        ax.axvline(0, color="0.2", lw=0.8, ls=":")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_yticks(y, configs)
    axes[0].invert_yaxis()
    fig.suptitle("difference from TopK, paired by seed (95 % CI; green better, red worse, blue changed)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    tmp.replace(path)
    return path


def study_answers(study: str, study_dir: Path, reports_dir: Path | None = Path("reports")) -> Answers:
    """The answers' markdown; the headline figure is written to ``reports_dir/<study>/headline.png`` (not at all
    when ``reports_dir`` is None, e.g. from a notebook)."""
    results = study_results(study_dir)
    if results.empty:
        raise ValueError(f"study_dir: {study_dir} holds no eval results; run the study first")
    if "topk" not in set(results["config"]):
        raise ValueError(f"study_dir: {study_dir} has no `topk` runs, the baseline every answer is measured against")
    metrics = {**QUALITY, PENALTY_METRIC: (HEADLINE[PENALTY_METRIC][0], 0)}
    paired_all = paired_vs_baseline(results, metrics, baseline="topk")
    paired = paired_all[paired_all["metric"].isin([v[0] for v in QUALITY.values()])]
    figure = None if reports_dir is None else headline_figure(
        paired_all[paired_all["metric"].isin([HEADLINE[k][0] for k in FIGURE_METRICS])],
        Path(reports_dir) / study / "headline.png")
    table = summarise(results, {k: v[0] for k, v in HEADLINE.items()}).pivot(
        index="config", columns="metric", values="text")
    order = [v[0] for v in QUALITY.values()] + [HEADLINE[PENALTY_METRIC][0]]
    table = table[[c for c in order if c in table.columns]]
    parts = [
        f"_Study `{study}`: " + _profile_line(study_dir, results) + "_",
        "**Does the penalty reach the weights?** " + _penalty_paragraph(results, paired_all),
        "**Does sparsity-guided orthogonality beat TopK, standard and other orthogonal SAEs?** "
        + _quality_paragraph(paired),
        "**Which feature-competition patterns exist?** " + _competition_paragraph(results, absorbing_pairs(study_dir)),
        "**How does the competition threshold τ matter?** " + _threshold_paragraph(results, paired),
    ]
    if figure is not None:
        parts.append(FIGURE_LINK)
    parts.append("Mean ± 95 % CI half-width over seeds, per configuration:\n\n" + table.to_markdown())
    return Answers("\n\n".join(parts) + "\n", figure)


def write_answers(study: str, study_dir: Path, reports_dir: Path = Path("reports"),
                  readme: Path | None = Path("README.md")) -> Path:
    """``reports/<study>/answers.md`` (+ headline.png); the README block between the study's markers, if any."""
    answers = study_answers(study, study_dir, reports_dir)
    out = Path(reports_dir) / study / "answers.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name("answers.md.tmp")
    tmp.write_text(answers.markdown.replace(FIGURE_LINK, FIGURE_LINK.format(figure="headline.png")))
    tmp.replace(out)
    if readme is not None and Path(readme).exists():
        link = FIGURE_LINK.format(figure=f"{Path(reports_dir).as_posix()}/{study}/headline.png")
        replace_block(Path(readme), study, answers.markdown.replace(FIGURE_LINK, link))
    return out


def replace_block(readme: Path, study: str, text: str) -> bool:
    """Replace the text between the study's markers in ``readme``; False (file untouched) when they are absent."""
    begin, end = BEGIN.format(study=study), END.format(study=study)
    source = readme.read_text()
    if begin not in source or end not in source or source.index(begin) > source.index(end):
        return False
    head, rest = source.split(begin, 1)
    _, tail = rest.split(end, 1)
    tmp = readme.with_name(readme.name + ".tmp")
    tmp.write_text(f"{head}{begin}\n{text}{end}{tail}")
    tmp.replace(readme)
    return True
