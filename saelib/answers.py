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
from saelib.stats import NO_INTERVAL, NO_SPREAD, Interval, mean_ci, paired_vs_baseline, summarise, verdict

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


ONE_SEED = " (one seed, no interval)"  # after a number measured on one seed only; said once when all are


def _num(x: float, digits: int = 3) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}g}"


def _ci(ci: Interval, digits: int = 3, count: bool = False) -> str:
    """"mean [low, high]"; ``count`` rounds to whole numbers and clips the interval at 0."""
    if ci.n == 0:
        return "n/a"
    fmt = (lambda x: f"{max(0.0, x):,.0f}") if count else (lambda x: _num(x, digits))
    if ci.n < 2:
        return f"{fmt(ci.mean)}{ONE_SEED}"
    return f"{fmt(ci.mean)} [{fmt(ci.low)}, {fmt(ci.high)}]"


def _diff(row) -> str:
    if row.seeds < 2:
        return f"{row.difference:+.3g}{ONE_SEED}"
    return f"{row.difference:+.3g} [{row.low:+.3g}, {row.high:+.3g}]"


def _diff_ci(ci: Interval) -> str:
    if ci.n < 2:
        return f"{ci.mean:+.3g}{ONE_SEED}" if ci.n else "n/a"
    return f"{ci.mean:+.3g} [{ci.low:+.3g}, {ci.high:+.3g}]"


def _is_sgo(config: str) -> bool:
    return config.startswith("sgo_")


def _is_control(config: str) -> bool:
    return re.match(r"sgo_t[0-9.]+_l0$", config) is not None


def _tau_of(config: str) -> float | None:
    m = re.match(r"sgo_t([0-9.]+)_l", config)
    return float(m.group(1)) if m else None


def _sgo_label(config: str) -> str:
    m = re.match(r"sgo_t([0-9.]+)_l([0-9.]+)$", config)
    return f"SGO (τ {m.group(1)}, λ {m.group(2)})" if m else config


DETECTED = ("better", "worse", "higher", "lower")
UNTESTED = (NO_INTERVAL, NO_SPREAD)


def absorbing_pairs(study_dir: Path) -> pd.DataFrame:
    """Per run and τ: the distinct (absorbed, absorbing) latent pairs the absorption eval found, how many of them
    co-fire on held-out text (score > 0), the fraction of the co-firing ones flagged as competing at τ, and the base
    rate (fraction of all co-firing pairs flagged) — both fractions over co-firing pairs, so they compare."""
    rows = []
    for run_dir in sorted(p for p in Path(study_dir).iterdir() if (p / "evals" / "competition.json").exists()):
        result = io.read_json(run_dir / "evals" / "competition.json")
        pairs = result.get("eval_result_unstructured", {}).get("absorption_vs_competition") or []
        if not pairs:
            continue
        distinct = pd.DataFrame(pairs).drop_duplicates(["main_latent", "absorbing_latent"])
        cofiring = distinct[distinct["score"] > 0]
        metrics = result["eval_result_metrics"]
        for tau in result["eval_config"]["taus"]:
            per_tau = metrics.get(f"tau_{tau:g}") or metrics.get(f"tau_{tau}")
            if not per_tau or not per_tau.get("n_cofiring_pairs"):
                continue
            rows.append({"run": run_dir.name, "config": re.sub(r"_s\d+$", "", run_dir.name), "tau": float(tau),
                         "pairs": len(distinct), "cofiring": len(cofiring),
                         "flagged": float((cofiring["score"] > tau).mean()) if len(cofiring) else math.nan,
                         "base_rate": per_tau["n_competing_pairs"] / per_tau["n_cofiring_pairs"]})
    return pd.DataFrame(rows, columns=["run", "config", "tau", "pairs", "cofiring", "flagged", "base_rate"])


def _values(results: pd.DataFrame, config: str, key: str) -> pd.Series:
    ev, metric = key.split("/", 1)
    part = results[(results["config"] == config) & (results["eval"] == ev) & (results["metric"] == metric)]
    return part.drop_duplicates("seed").set_index("seed")["value"]


def _paired(results: pd.DataFrame, config: str, key: str, baseline: str = "topk",
            baseline_key: str | None = None) -> Interval:
    """Mean and 95 % interval of (config − baseline) over the seeds both have."""
    a, b = _values(results, config, key), _values(results, baseline, baseline_key or key)
    common = a.index.intersection(b.index)
    return mean_ci((a[common] - b[common]).values)


def _profile_line(study_dir: Path, results: pd.DataFrame) -> str:
    cfg = io.read_json(Path(study_dir) / results["run"].iloc[0] / io.RUN_CFG_FILE)
    seeds = sorted(int(s) for s in results["seed"].dropna().unique())
    return (f"{results['run'].nunique()} runs ({results['config'].nunique()} configurations × seeds {seeds}) on "
            f"{cfg['model_name']} layer {cfg['hook_layer']} resid_post, d_sae {cfg['d_sae']:,}, k {cfg['k']}, "
            f"{cfg['training_tokens']:,} training tokens. Brackets: 95 % t-interval over seeds (paired by seed for "
            f"differences); a difference is called better/worse (or higher/lower) only when its interval excludes 0."
            + (" One seed: every number below is a single measurement without an interval, and no difference is "
               "called." if len(seeds) == 1 else "") + _unequal_seeds(results))


def _unequal_seeds(results: pd.DataFrame) -> str:
    """A study part-way has configurations with fewer seeds than others: say how many, so no reader assumes all."""
    per_config = results.groupby("config")["seed"].nunique()
    if per_config.nunique() < 2:
        return ""
    counts = per_config.value_counts().sort_index(ascending=False)
    return (" Not every configuration has every seed yet (a study part-way): " + ", ".join(
        f"{n} configuration{'s' * (n > 1)} with {k} seed{'s' * (k > 1)}" for k, n in counts.items()) + ".")


def _weights_loader(study_dir: Path):
    """run name → its saved SAE's tensors (None when missing), each file read once per call of the answers."""
    from functools import cache

    from safetensors.torch import load_file

    @cache
    def load(run: str) -> dict | None:
        files = sorted((Path(study_dir) / run / io.SAE_DIR).glob("*.safetensors"))
        return load_file(files[0]) if files else None

    return load


def _control_sentences(results: pd.DataFrame, load) -> list[str]:
    """The λ = 0 control against TopK on the same seeds: saved tensors and every eval metric."""
    lines = []
    for config in (c for c in sorted(results["config"].unique()) if _is_control(c)):
        diffs = []
        for key in QUALITY:
            a, b = _values(results, config, key), _values(results, "topk", key)
            common = a.index.intersection(b.index)
            diffs += list((a[common] - b[common]).abs())
        if not diffs:
            continue
        seeds = sorted(set(_values(results, config, next(iter(QUALITY))).index)
                       & set(_values(results, "topk", next(iter(QUALITY))).index))
        pairs = [(load(f"{config}_s{s}"), load(f"topk_s{s}")) for s in seeds] if load else []
        same = [None if a is None or b is None else a.keys() == b.keys() and all(
            a[k].shape == b[k].shape and bool((a[k] == b[k]).all()) for k in a) for a, b in pairs]
        weights = ("" if not same or None in same else
                   f"its saved SAE {'equals' if all(same) else 'DIFFERS from'} TopK's tensor for tensor on "
                   f"{sum(same)} of {len(same)} seeds; ")
        largest = max(diffs)
        lines.append(f"The control `{config}` (λ = 0) against TopK on the same seeds: {weights}largest absolute "
                     f"difference over {len(diffs)} eval metric values {largest:.3g}"
                     + (" — identical, as it must be." if largest == 0 and (not same or all(same)) else
                        " — evals run with other thread counts may differ in the last digits; the weights decide."
                        if same and all(same) else " — NOT identical: the λ = 0 control is broken."))
    return lines


def _weights_sentence(results: pd.DataFrame, load) -> list[str]:
    """The published failure was λ > 0 runs identical to λ = 0: does each SGO run's decoder differ from TopK's?"""
    moved, checked, largest = 0, 0, 0.0
    for config in (c for c in sorted(results["config"].unique()) if _is_sgo(c) and not _is_control(c)):
        for seed in sorted(set(results.loc[results["config"] == config, "seed"])):
            a, b = load(f"{config}_s{seed}"), load(f"topk_s{seed}")
            if a is None or b is None:
                continue
            delta = (float((a["W_dec"] - b["W_dec"]).abs().max()) if a["W_dec"].shape == b["W_dec"].shape
                     else math.inf)
            checked += 1
            moved += delta > 0
            largest = max(largest, delta)
    if not checked:
        return []
    return [f"Every SGO run with λ > 0 against TopK on the same seed: the decoder differs in {moved} of {checked} "
            f"runs (largest |ΔW_dec| element {largest:.3g}), so the penalty reaches the weights"
            + ("." if moved == checked else f" — except in {checked - moved} runs, where it did NOT.")]


def _own_tau_sentence(results: pd.DataFrame) -> list[str]:
    """Each SGO configuration's held-out score-weighted cos² at its own τ, against TopK's at the same τ."""
    base_tau = mean_ci(_values(results, "topk", PENALTY_METRIC).values)
    if base_tau.n == 0:
        return ["No held-out competition results for TopK, so the penalty's effect is not measured."]
    groups: dict[str, list[str]] = {}
    for config in sorted(c for c in results["config"].unique() if _is_sgo(c) and not _is_control(c)):
        ci = _paired(results, config, f"competition/tau_{_tau_of(config):g}.competing_weighted_cos2")
        if ci.n:
            groups.setdefault(verdict(ci, 0), []).append(f"{_sgo_label(config)} {_diff_ci(ci)}")
    total = sum(len(v) for v in groups.values())
    if total == 0:
        return [f"TopK's held-out score-weighted decoder cos² of pairs competing at τ = {REFERENCE_TAU:g}: "
                f"{_ci(base_tau)}; no SGO configuration with λ > 0 has competition results yet."]
    return [f"Held-out score-weighted decoder cos² of the pairs each SGO configuration penalises (competing at its "
            f"own τ), against TopK's at the same τ (TopK at τ = {REFERENCE_TAU:g}: {_ci(base_tau)}): of {total} "
            f"configurations with λ > 0, " + "; ".join(f"{v} in {len(items)} ({', '.join(items)})"
                                                      for v, items in sorted(groups.items())) + "."]


def _penalty_paragraph(results: pd.DataFrame, study_dir: Path | None = None) -> str:
    load = _weights_loader(study_dir) if study_dir is not None else None
    lines = _control_sentences(results, load)
    if load is not None:
        lines += _weights_sentence(results, load)
    return " ".join(lines + _own_tau_sentence(results))


def _quality_paragraph(results: pd.DataFrame, paired: pd.DataFrame) -> str:
    if paired.empty:
        return "No configuration shares seeds with TopK yet."
    lines = []
    sgo = paired[paired["config"].map(_is_sgo) & ~paired["config"].map(_is_control)]  # λ = 0: the control
    tested = paired[paired["seeds"] >= 2]
    if len(tested):
        lines.append(f"Against TopK, {len(tested)} comparisons have an interval; at 95 % about "
                     f"{0.05 * len(tested):.1f} of them would be called better/worse by chance alone, so single calls "
                     f"are weak evidence — look for consistent ones.")
    for metric in dict.fromkeys(paired["metric"]):
        part = sgo[sgo["metric"] == metric]
        if part.empty:
            continue
        counts = part["verdict"].value_counts()
        untested = int(part["verdict"].isin(UNTESTED).sum())
        better, worse = part[part["verdict"] == "better"], part[part["verdict"] == "worse"]
        text = (f"**{metric}**: of {len(part)} SGO configurations with λ > 0, {counts.get('better', 0)} better "
                f"than TopK, {counts.get('worse', 0)} worse, {counts.get('no detectable difference', 0)} no "
                f"detectable difference" + (f", {untested} without an interval (one shared seed"
                                            + (", or the same difference on every seed)" if counts.get(NO_SPREAD, 0)
                                               else ")") if untested else ""))
        if len(better):
            best = better.sort_values("difference", key=lambda d: -d.abs()).iloc[0]
            text += f" (largest gain {_sgo_label(best.config)} {_diff(best)})"
        if len(worse):
            worst = worse.sort_values("difference", key=lambda d: -d.abs()).iloc[0]
            text += f" (largest loss {_sgo_label(worst.config)} {_diff(worst)})"
        lines.append(text + ".")
    reference = f"sgo_t{REFERENCE_TAU:g}_l10"
    present = set(results["config"])
    for baseline in ("topk", *BASELINES):
        if baseline not in present:
            continue
        # each baseline against TopK, and the penalised SGO reference against the baseline: SGO vs every other SAE
        pairs = [(baseline, "topk")] if baseline != "topk" else []
        if reference in present:
            pairs.append((reference, baseline))
        for config, base in pairs:
            rows = paired_vs_baseline(results[results["config"].isin([config, base])], QUALITY, baseline=base)
            rows = rows[rows["config"] == config]
            if rows.empty or (rows["seeds"] < 2).all():
                lines.append(f"`{config}` vs `{base}`: not comparable yet (fewer than two shared seeds).")
                continue
            detected = rows[rows["verdict"].isin(DETECTED)]
            untested = int(rows["verdict"].isin(UNTESTED).sum())
            lines.append(f"`{config}` vs `{base}`: " + ("; ".join(f"{r.metric} {r.verdict} {_diff(r)}"
                                                                  for r in detected.itertuples())
                                                        if len(detected) else
                                                        f"no detectable difference on any of {len(rows) - untested} "
                                                        f"metrics with an interval")
                         + (f" ({untested} without an interval)" if untested else "") + ".")
    return " ".join(lines)


def _competition_paragraph(results: pd.DataFrame, absorbing: pd.DataFrame, reference_tau: float) -> str:
    def ci(key: str, config: str = "topk") -> Interval:
        return mean_ci(_values(results, config, key).values)

    t = f"tau_{reference_tau:g}"
    cofiring, competing = ci(f"competition/{t}.n_cofiring_pairs"), ci(f"competition/{t}.n_competing_pairs")
    if cofiring.n == 0:
        return "No competition results for TopK."
    gap = _paired(results, "topk", f"competition/{t}.competing_mean_cos2", "topk",
                  f"competition/{t}.noncompeting_mean_cos2")
    overlap = ("overlap more than" if gap.n >= 2 and gap.low > 0 else "overlap less than" if gap.n >= 2 and
               gap.high < 0 else "overlap no detectably differently from" if gap.n >= 2 else
               f"{ONE_SEED.strip()} compared with")
    text = (f"In TopK, {_ci(cofiring, count=True)} latent pairs co-fire on held-out text; "
            f"{_ci(competing, count=True)} of them compete at τ = {reference_tau:g}. Competing pairs' decoders "
            f"{overlap} non-competing ones: mean cos² {_ci(ci(f'competition/{t}.competing_mean_cos2'))} vs "
            f"{_ci(ci(f'competition/{t}.noncompeting_mean_cos2'))} (difference {_diff_ci(gap)}). The competition "
            f"graph at this τ (dense latents set apart: {_ci(ci('competition/graph.dense_latents'), count=True)}): "
            f"{_ci(ci('competition/graph.n_latents_competing'), count=True)} latents, mean degree "
            f"{_ci(ci('competition/graph.mean_degree'))}, largest cluster "
            f"{_ci(ci('competition/graph.largest_cluster'), count=True)} latents in "
            f"{_ci(ci('competition/graph.n_clusters'), count=True)} cluster(s).")
    part = absorbing[(absorbing["config"] == "topk") & (absorbing["tau"] == reference_tau)]
    if not part.empty:
        gap = mean_ci((100 * (part["flagged"] - part["base_rate"])).values)
        text += (f" Absorption ↔ competition: the absorption eval found {_ci(mean_ci(part['pairs'].values), count=True)}"
                 f" distinct (absorbed, absorbing) latent pairs per TopK run, {_ci(mean_ci(part['cofiring'].values), count=True)}"
                 f" of which co-fire on held-out text; of those, {_ci(mean_ci(100 * part['flagged'].values))} % are "
                 f"flagged as competing at τ = {reference_tau:g}, against {_ci(mean_ci(100 * part['base_rate'].values))} % "
                 f"of all co-firing pairs (difference {_diff_ci(gap)} points).")
    return text


def _threshold_paragraph(results: pd.DataFrame, paired: pd.DataFrame) -> str:
    sweep = sorted({c for c in results["config"].unique() if re.match(r"sgo_t[0-9.]+_l10$", c)}, key=_tau_of)
    counts = []
    for tau in sorted({float(m) for m in results["metric"].str.extract(r"^tau_([0-9.]+)\.")[0].dropna()}):
        ci = mean_ci(_values(results, "topk", f"competition/tau_{tau:g}.n_competing_pairs").values)
        if ci.n:
            counts.append(f"τ {tau:g}: {ci.mean:,.0f}")
    text = ("Pairs each τ would penalise (held-out, TopK, mean over seeds): " + "; ".join(counts) + "."
            if counts else "")
    if not sweep:
        return text + " No τ sweep (sgo_t*_l10 configurations) in this study."
    lines = []
    for metric in dict.fromkeys(paired["metric"]):
        part = paired[(paired["metric"] == metric) & paired["config"].isin(sweep)]
        part = part.set_index("config").reindex(sweep).dropna(subset=["difference"])
        if part.empty:
            continue
        detected = part[part["verdict"].isin(DETECTED)]
        untested = part[part["verdict"].isin(UNTESTED)]
        lines.append(f"{metric}: " + ", ".join(f"τ {_tau_of(c):g} {_diff(r)}" for c, r in zip(part.index,
                                                                                            part.itertuples()))
                     + f" ({len(detected)} of {len(part)} detectably different from TopK"
                     + (f", {len(untested)} without an interval" if len(untested) else "") + ")")
    if not lines:
        return text + " No τ-sweep run shares a seed with TopK yet."
    return text + " Threshold sweep at λ = 10, difference from TopK per τ — " + "; ".join(lines) + "."


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
            ax.plot([row.difference], [yi], "o", color=c, ms=3.5,
                    mfc=c if row.seeds >= 2 else "none")  # hollow: one seed, no interval
        ax.axvline(0, color="0.2", lw=0.8, ls=":")
        # the axis spans the differences (and 0), not the intervals: a two-seed interval (t = 12.7) would squash
        # every other row; intervals beyond the edge are clipped there
        points = np.append(part["difference"].dropna().to_numpy(), 0.0)
        pad = 0.08 * (points.max() - points.min()) or 1e-6
        ax.set_xlim(points.min() - pad, points.max() + pad)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(plt.MaxNLocator(5))  # small differences: long tick labels would overlap
        ax.set_yticks(y, configs)
    axes[0].invert_yaxis()
    fig.suptitle("difference from TopK, paired by seed (95 % CI; green better, red worse, blue changed; "
                 "hollow: one seed; intervals clipped at the panel edge)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=130)
    plt.close(fig)
    tmp.replace(path)
    return path


def _reference_tau(study_dir: Path) -> float:
    """The τ the competition eval built its graph at (its ``reference_tau``; REFERENCE_TAU if no result says)."""
    for path in sorted(Path(study_dir).glob("topk_s*/evals/competition.json")):
        return float(io.read_json(path)["eval_config"].get("reference_tau", REFERENCE_TAU))
    return REFERENCE_TAU


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
        "**Does the penalty reach the weights?** " + _penalty_paragraph(results, Path(study_dir)),
        "**Does sparsity-guided orthogonality beat TopK, standard and other orthogonal SAEs?** "
        + _quality_paragraph(results, paired),
        "**Which feature-competition patterns exist?** "
        + _competition_paragraph(results, absorbing_pairs(study_dir), _reference_tau(study_dir)),
        "**How does the competition threshold τ matter?** " + _threshold_paragraph(results, paired),
    ]
    if figure is not None:
        parts.append(FIGURE_LINK)
    parts.append("Mean ± 95 % CI half-width over seeds, per configuration:\n\n" + table.to_markdown())
    markdown = "\n\n".join(parts) + "\n"
    if results["seed"].nunique() == 1:  # say it once instead of after every number
        markdown = markdown.replace(f"{ONE_SEED.strip()} compared with", "compared with").replace(ONE_SEED, "")
    return Answers(markdown, figure)


def write_answers(study: str, study_dir: Path, reports_dir: Path = Path("reports"),
                  readme: Path | None = Path("README.md")) -> Path:
    """``reports/<study>/answers.md`` (+ headline.png); the README block between the study's markers, if any."""
    answers = study_answers(study, study_dir, reports_dir)
    out = Path(reports_dir) / study / "answers.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name("answers.md.tmp")
    tmp.write_text(answers.markdown.replace(FIGURE_LINK, FIGURE_LINK.format(figure="headline.png")), encoding="utf-8")
    tmp.replace(out)
    if readme is not None and Path(readme).exists():
        link = FIGURE_LINK.format(figure=f"{Path(reports_dir).as_posix()}/{study}/headline.png")
        replace_block(Path(readme), study, answers.markdown.replace(FIGURE_LINK, link))
    return out


def replace_block(readme: Path, study: str, text: str) -> bool:
    """Replace the text between the study's markers in ``readme``; False (file untouched) when they are absent."""
    begin, end = BEGIN.format(study=study), END.format(study=study)
    source = readme.read_text(encoding="utf-8")
    if begin not in source or end not in source or source.index(begin) > source.index(end):
        return False
    head, rest = source.split(begin, 1)
    _, tail = rest.split(end, 1)
    tmp = readme.with_name(readme.name + ".tmp")
    tmp.write_text(f"{head}{begin}\n{text}{end}{tail}", encoding="utf-8")
    tmp.replace(readme)
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m saelib.answers <study> [runs_dir]``: rewrite a study's answers (and the README block) now."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("study")
    parser.add_argument("runs_dir", nargs="?", default="runs")
    args = parser.parse_args(argv)
    try:
        print(write_answers(args.study, Path(args.runs_dir) / args.study))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
