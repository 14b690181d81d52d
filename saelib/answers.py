"""The study's answers: per mission question a verdict table (rows configurations, told apart by each run's cfg.json;
columns metrics; cells the paired difference from TopK [95 % interval] and its ``saelib.stats`` verdict) and a sentence
or two, in ``reports/<study>/answers.md``, ``answers_<question>.csv`` and the README's ``<!-- answers:<study>:… -->``
block, with ``headline.png``. Nothing is recomputed from activations."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from saelib import run_files
from saelib.evals.competition import competition_patterns
from saelib.evals.results import HEADLINE, against_column, matched_baselines, study_results
from saelib.plots import frontier_png, headline_png
from saelib.stats import mde_table, paired_vs_baseline
from saelib.summary import absorption_check, frontier_table, positive_controls, study_summary

BASELINE = "topk"
QUALITY = {k: v for k, v in HEADLINE.items() if v[1] != 0}
"""Metrics with a direction (higher or lower is better): the quality question's columns."""
MDE_TARGETS = {"absorption/mean.mean_absorption_fraction_score": (0.25, True),
               "sparse_probing/sae.sae_top_1_test_accuracy": (0.02, False),
               "core/model_performance_preservation.ce_loss_score": (0.005, False)}
"""The powered study's MDE targets (issue 14): metric → (MDE wanted, whether relative to TopK's mean): absorption
≤ 25 % of TopK's mean fraction, probing top-1 ≤ 0.02, CE-loss recovered ≤ 0.005."""
OWN_TAU = "penalised pairs' weighted cos² (own τ)"
FIGURE_METRICS = ["absorption (mean fraction)", "sparse probing top-1", "unlearning proxy score",
                  "CE-loss recovered", OWN_TAU]
QUESTIONS = {"controls": "Do the positive controls reproduce (Matryoshka, OrtSAE against TopK, as their papers claim)?",
             "penalty": "Does the penalty reach the weights?",
             "quality": "Does sparsity-guided orthogonality beat TopK, standard and other orthogonal SAEs?",
             "absorption": "Is a change in absorption a change in what fires (the firing-based check)?",
             "competition": "Which feature-competition patterns exist?",
             "frontier": "Where do the orthogonality penalties sit between absorption and reconstruction?",
             "threshold": "How does the competition threshold τ matter?",
             "power": "What could this study detect?"}
FIGURE_LINK = "![paired differences from TopK]({figure})"
FRONTIER_LINK = "![orthogonality frontier]({figure})"
BEGIN, END = "<!-- answers:{study}:begin -->", "<!-- answers:{study}:end -->"


@dataclass
class Answers:
    """The markdown, the README's brief (each question's sentences and the quality table), the headline figure, and
    per question its table as numbers (long form, written as CSV)."""
    markdown: str
    brief: str
    figure: Path | None
    tables: dict[str, pd.DataFrame]
    summary: dict


def _num(x: float, sign: str = "") -> str:
    return "n/a" if math.isnan(x) else f"{x:{sign},.0f}" if abs(x) >= 1000 else f"{x:{sign}.3g}"


def cell(row) -> str:
    """"**better** +0.012 [+0.004, +0.02]" (n.d.: no detectable difference); one seed: "+0.012 (1 seed)"; a level
    (no verdict, column ``mean``): "0.52 [0.5, 0.54]"."""
    sign = "+" if isinstance(row.verdict, str) else ""
    value = row.difference if sign else row.mean
    if row.seeds < 2:
        return f"{_num(value, sign)} ({row.seeds} seed{'s' * (row.seeds != 1)})"
    word = {"no detectable difference": "n.d. ", "": ""}.get(row.verdict if sign else "", f"**{row.verdict}** ")
    return f"{word}{_num(value, sign)} [{_num(row.low, sign)}, {_num(row.high, sign)}]"


def table_markdown(long: pd.DataFrame, order: list[str], extra: pd.DataFrame | None = None) -> str:
    """Rows: configurations in ``order``; columns: ``extra``'s, then the metrics; cells: :func:`cell`."""
    long = long.reindex(columns=[*long.columns, *({"mean", "difference", "verdict"} - set(long.columns))])
    wide = long.assign(text=[cell(r) for r in long.itertuples()]).pivot(index="config", columns="metric",
                                                                       values="text")
    wide = wide.reindex(index=[c for c in order if c in wide.index],
                        columns=list(dict.fromkeys(long["metric"]))).fillna("")
    return (wide if extra is None else extra.set_index("config").reindex(wide.index).join(wide)).to_markdown()


def config_order(runs: pd.DataFrame) -> list[str]:
    """TopK, the other baselines (by architecture), then SGO by τ and λ."""
    first = runs.drop_duplicates("config").assign(sgo=lambda d: d["architecture"] == "sgo_topk",
                                                  base=lambda d: d["config"] != BASELINE)
    return list(first.sort_values(["base", "sgo", "architecture", "tau", "lambda", "config"])["config"])


def own_tau(results: pd.DataFrame, runs: pd.DataFrame, baselines: dict[str, str] | None = None) -> pd.DataFrame:
    """Each SGO configuration against its TopK baseline (``baselines``, default TopK) on the held-out score-weighted
    decoder cos² of the pairs competing at the configuration's own τ (those its penalty acts on); descriptive, so the
    verdict says higher/lower."""
    rows = []
    for config, tau in runs[runs["architecture"] == "sgo_topk"].drop_duplicates("config")[["config", "tau"]].values:
        key, base = f"tau_{tau:g}.competing_weighted_cos2", (baselines or {}).get(config, BASELINE)
        part = results[results["config"].isin([config, base]) & (results["metric"] == key)]
        if part["config"].nunique() == 2:
            rows.append(paired_vs_baseline(part, {f"competition/{key}": (OWN_TAU, 0)}, baseline=base))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["config", "metric", "seeds"])


def weights_check(study_dir: Path, runs: pd.DataFrame, baselines: dict[str, str] | None = None) -> pd.DataFrame:
    """Per SGO configuration, against its TopK baseline's saved SAE (``baselines``, default TopK) on the same seeds:
    how many were compared, how many are equal tensor for tensor, and the largest absolute difference of any
    element. A run read from its archive copy has no weights, only their digest: equal digests are a difference of
    0, unequal ones an unknown (NaN) one."""
    from safetensors.torch import load_file

    def tensors(run: str) -> dict | None:
        return next((load_file(f) for f in sorted((Path(study_dir) / run / run_files.SAE_DIR).glob("*.safetensors"))), None)

    def delta(run: str, base: str) -> float | None:
        a, b = tensors(run), tensors(base)
        if a is not None and b is not None:
            same = a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
            return max(float((a[k] - b[k]).abs().max()) for k in a) if same else math.inf
        da, db = run_files.sae_digest(Path(study_dir) / run), run_files.sae_digest(Path(study_dir) / base)
        return None if da is None or db is None else (0.0 if da == db else math.nan)

    rows = []
    for config, part in runs[runs["architecture"] == "sgo_topk"].groupby("config"):
        base = runs[runs["config"] == (baselines or {}).get(config, BASELINE)].set_index("seed")["run"]
        part = part[part["seed"].isin(base.index)]
        if part.empty:
            continue
        deltas = [d for d in (delta(run, base[seed]) for run, seed in part[["run", "seed"]].values) if d is not None]
        rows.append({"config": config, "tau": part["tau"].iloc[0], "lambda": part["lambda"].iloc[0],
                     "SAEs compared": len(deltas), "SAEs equal to TopK": sum(d == 0 for d in deltas),
                     DELTA: max((d for d in deltas if not math.isnan(d)), default=math.nan),
                     PENALTY_SHARE: penalty_share([Path(study_dir) / run for run in part["run"]])})
    return pd.DataFrame(rows, columns=["config", "tau", "lambda", "SAEs compared", "SAEs equal to TopK", DELTA,
                                       PENALTY_SHARE])


DELTA = "largest Δ element (abs.)"


def delta_words(weights: pd.DataFrame) -> list[str]:
    """:func:`weights_check`'s largest difference for a reader: a number where the weights were here, else what is
    known without them — the digests differ (a run or its TopK read from the archive), or nothing was compared."""
    return ["—" if n == 0 else "differs (by digest; weights not on this machine)" if math.isnan(d) else f"{d:.4g}"
            for d, n in zip(weights[DELTA], weights["SAEs compared"])]


PENALTY_SHARE = "penalty / loss (last 10 % of steps)"


def penalty_share(run_dirs: list[Path]) -> float:
    """The penalty term's share of the training loss, ``orth_loss / overall_loss`` averaged over the last tenth of
    the logged steps of each run (after warm-up, where the penalty is on), then over the runs; NaN without
    histories. How large a force the penalty was where the SAE settled."""
    shares = []
    for run_dir in run_dirs:
        history = run_files.read_history(run_dir)  # empty without a history file
        if "losses/orth_loss" not in history or history.empty:
            continue
        tail = history.iloc[-max(1, len(history) // 10):]
        shares.append(float((tail["losses/orth_loss"] / tail["losses/overall_loss"]).mean()))
    return sum(shares) / len(shares) if shares else math.nan


def _weights_sentences(weights: pd.DataFrame) -> str:
    if weights.empty:
        return "No SGO runs beside TopK in this study."
    compared = weights[weights["SAEs compared"] > 0]
    if compared.empty:
        return "No saved SAEs to compare with TopK's (the quality table compares their evals)."
    control = (compared["SAEs equal to TopK"] == compared["SAEs compared"])[compared["lambda"] == 0]
    moved = (compared["SAEs equal to TopK"] == 0)[compared["lambda"] > 0]  # differs on every seed
    acting = compared[(compared["lambda"] > 0) & compared[PENALTY_SHARE].notna()].sort_values(PENALTY_SHARE)
    share = ([f"At the end of training the penalty was {_share(acting.iloc[0])} of the loss in {acting.iloc[0]['config']}"
              + (f" and {_share(acting.iloc[-1])} in {acting.iloc[-1]['config']}." if len(acting) > 1 else ".")]
             if len(acting) else [])
    return " ".join(([f"The λ = 0 control {'equals' if control.all() else 'does NOT equal'} TopK's saved SAE on every "
                      "seed."] if len(control) else []) + ([f"With λ > 0 the saved SAE differs from TopK's in "
                                                             f"{moved.sum()} of {len(moved)} configurations."]
                                                           if len(moved) else []) + share)


def _share(row) -> str:
    return f"{row[PENALTY_SHARE]:.2g}" if row[PENALTY_SHARE] < 0.001 else f"{100 * row[PENALTY_SHARE]:.2g} %"


def _counts(long: pd.DataFrame) -> str:
    tested = long[long["seeds"] >= 2]
    if tested.empty:
        return "With one shared seed there is no interval, so no difference is called."
    n = tested["verdict"].value_counts()
    return (f"{n.get('better', 0)} better, {n.get('worse', 0)} worse, {n.get('no detectable difference', 0)} "
            f"no detectable difference of {len(tested)} comparisons (≈ {0.05 * len(tested):.1f} expected by chance).")


def precision_words(precisions: dict[str, list[str]]) -> str:
    """``summary.precisions`` in words; a mix (a study finished on machines with and without native bf16) is said
    loudly, since its runs are not comparable as they stand."""
    def side(name: str, values: list[str]) -> str:
        if len(values) > 1:
            return f"**{name} precision mixed ({', '.join(values)}): runs not comparable as they stand**"
        return f"{name} in {values[0]}"
    return ", ".join(side(name, precisions[key]) for name, key in (("LM", "lm"), ("SAE", "sae")) if precisions[key]) \
        or "precision not recorded"


def compute_words(compute: dict) -> str:
    """``summary.compute`` in words: the notebook time on record, per notebook and per machine."""
    if not compute["notebook_hours"]:
        return "no notebook times on record"
    notebooks = ", ".join(f"{k} {v:.1f} h" for k, v in compute["by_notebook"].items())
    machines = "; ".join(f"{k}: {v:.1f} h" for k, v in compute["by_machine"].items())
    threads = f"{'/'.join(map(str, compute['threads']))} threads; " if compute["threads"] else ""
    return f"{compute['notebook_hours']:.1f} h of notebook time on record ({notebooks}; {threads}{machines})"


def study_answers(study: str, study_dir: Path, reports_dir: Path | None = Path("reports"),
                  planned: list[str] | None = None) -> Answers:
    """The answers' markdown and tables; the headline figure goes to ``reports_dir/<study>/headline.png`` (not at all
    when ``reports_dir`` is None, e.g. from a notebook). ``planned``: every run the study declares (the runner's
    list); when some have no results yet, the caption and summary.json say the study is part-way and which."""
    results = study_results(study_dir)
    if results.empty:
        raise ValueError(f"study_dir: {study_dir} holds no eval results; run the study first")
    if BASELINE not in set(results["config"]):
        raise ValueError(f"study_dir: {study_dir} has no `topk` runs, the baseline every answer is measured against")
    runs = results.drop_duplicates("run")[["run", "config", "architecture", "tau", "lambda", "seed"]]
    order = config_order(runs)
    baselines = matched_baselines(study_dir, runs, BASELINE)
    quality = paired_vs_baseline(results, QUALITY, baseline=BASELINE, baselines=baselines)
    penalty, weights = own_tau(results, runs, baselines), weights_check(study_dir, runs, baselines)
    against = against_column(runs, baselines, order, BASELINE)
    sgo = runs[(runs["architecture"] == "sgo_topk") & (runs["lambda"] > 0)].drop_duplicates("config")
    sweep_lambda = sgo.groupby("lambda")["tau"].nunique().idxmax() if len(sgo) else math.nan
    sweep = pd.concat([quality, penalty])[lambda d: d["config"].isin(sgo.loc[sgo["lambda"] == sweep_lambda, "config"])]
    patterns = competition_patterns(study_dir, results)
    gap = patterns[(patterns["config"] == BASELINE) & (patterns["metric"] == "competing − non-competing cos²")]
    overlap = {"higher": "more than", "lower": "less than", "no detectable difference": "no detectably differently "
               "from"}.get(next(iter(gap["verdict"]), ""))
    text = {"penalty": _weights_sentences(weights), "quality": _counts(quality),
            "competition": f"In TopK, competing pairs' decoders overlap {overlap} non-competing pairs'." if overlap
            else "TopK's competing vs non-competing decoder overlap: see the table (no interval)." if len(gap)
            else "No competition results for TopK.",
            "threshold": f"τ sweep at λ = {sweep_lambda:g}. {_counts(sweep)}" if sweep["config"].nunique() > 1 else
            "No τ sweep (SGO at one λ over several τ) in this study."}
    power = mde_table(results, QUALITY, baseline=BASELINE, baselines=baselines, targets=MDE_TARGETS)
    controls = positive_controls(quality, runs, results)
    check, check_verdicts = absorption_check(results, baselines, BASELINE)
    text["absorption"] = _absorption_sentences(check, check_verdicts)
    summary = study_summary(study_dir, results, runs, quality, power, controls, planned, (check, check_verdicts))
    pending = summary["pending_runs"]
    front = frontier_table(summary["sgo_frontier"])
    frontier_figure = None if reports_dir is None else frontier_png(
        summary["sgo_frontier"], Path(reports_dir) / study / "frontier.png")
    text["frontier"] = ("Seed means [95 % interval] of each TopK, SGO and OrtSAE configuration; a penalty acts where "
                        "its points leave TopK's." + ("\n\n" + FRONTIER_LINK if frontier_figure else "")
                        if len(front) > 1 else "No SGO or OrtSAE runs beside TopK in this study.")
    claimed_side = (controls["difference"] < 0) == (controls["claimed"] == "lower") if len(controls) else []
    text["controls"] = ("No Matryoshka or OrtSAE runs in this study." if not len(controls) else
                        f"One seed: no interval, so no verdict; {int(sum(claimed_side))} of {len(controls)} "
                        "differences point the claimed way." if controls["seeds"].max() < 2 else
                        f"{int(controls['reproduces'].sum())} of {len(controls)} claimed effects reproduce (the 95 % "
                        "interval of the paired difference excludes 0 on the claimed side)." + _claims_sentence(controls))
    text["power"] = ("Minimum detectable paired difference from TopK (95 %, 80 % power) with the seeds each comparison "
                     "has, from the per-seed differences pooled over every configuration; a null is a null only "
                     f"below it. {_targets_sentence(power)}" if power["seeds"].ge(2).any() else
                     "One seed: no paired spread, so no MDE.")
    tables = {"controls": controls, "penalty": weights.merge(penalty, on="config", how="left"), "quality": quality,
              "frontier": pd.DataFrame(summary["sgo_frontier"]), "competition": patterns, "absorption": check,
              "threshold": sweep, "power": power}
    if against is not None:  # the penalty table names its baseline too
        weights = against.merge(weights, on="config")
    weights = weights.assign(**{DELTA: delta_words(weights)}) if len(weights) else weights  # markdown only
    md = {"controls": controls.assign(reproduces=controls["reproduces"].where(controls["seeds"] >= 2, "— (1 seed)"),
                                      difference=[cell(r) for r in controls.rename(columns={
              "ci_low": "low", "ci_high": "high"}).assign(verdict="").itertuples()],
                                      claimed_difference=[f"{x:+.3g}" if x == x else "" for x in
                                                          controls["claimed_difference"]],
                                      claim_excluded=[{True: "yes", False: "no"}.get(x, "") for x in
                                                      controls["claim_excluded"]]).rename(columns={
              "claimed_difference": "size claimed", "claim_excluded": "claim ruled out"}).drop(
              columns=["ci_low", "ci_high", "seeds", "source", *(["against"] if against is None else [])]
          ).to_markdown(index=False) if len(controls) else "",
          "penalty": table_markdown(penalty, order, weights) if len(penalty) else
          weights.to_markdown(index=False) if len(weights) else "",
          "quality": table_markdown(quality, order, against),
          "absorption": table_markdown(check, order) if len(check) else "",
          "frontier": front.to_markdown(index=False) if len(front) > 1 else "",
          "competition": table_markdown(patterns, order),
          "threshold": table_markdown(sweep, order, runs.drop_duplicates("config")[["config", "tau"]])
          if sweep["config"].nunique() > 1 else "",
          "power": power_markdown(power) if power["seeds"].ge(2).any() else ""}
    figure = None if reports_dir is None else headline_png(
        pd.concat([quality, penalty]), FIGURE_METRICS, order, Path(reports_dir) / study / "headline.png")
    caption = (f"_Study `{study}`: {len(runs)} runs"
               + (f" of {summary['planned_runs']} planned (**part-way**: {len(pending)} still to run)" if pending else "")
               + f", {len(order)} configurations, seeds "
               f"{sorted(runs['seed'].unique())}; {summary['model']} layer {summary['hook_layer']}, d_sae "
               f"{summary['d_sae']:,}, k {summary['k']}, {summary['training_tokens']:,} training tokens. Cells: "
               "difference from TopK"
               f"{' (column against: the TopK configuration trained like it)' if against is not None else ''} paired "
               f"by seed [95 % interval] and verdict (n.d.: no detectable difference)")
    provenance = f"_{precision_words(summary['precisions'])}; {compute_words(summary['compute'])}._"
    parts = [f"{caption}; competition levels: mean [95 % interval]. The same numbers: `answers_<question>.csv`._",
             provenance]
    brief = [f"{caption}. Every table, and the same numbers as CSV: `reports/{study}/`._", provenance,
             *(f"**{q}** {text[key].replace(FRONTIER_LINK, '').strip()}" + (f"\n\n{md[key]}" if key == "quality"
                                                                           else "") for key, q in QUESTIONS.items()),
             *([FIGURE_LINK] if figure else [])]
    parts += [f"### {q}\n\n{text[key]}\n\n{md[key]}".rstrip() for key, q in QUESTIONS.items()]
    markdown, brief = ("\n\n".join(p) + "\n" for p in (parts + ([FIGURE_LINK] if figure else []), brief))
    if runs["seed"].nunique() == 1:  # said once instead of in every cell
        markdown, brief = (m.replace(" (1 seed)", "").replace("._\n", ". One seed: single measurements, no "
                                                              "intervals, no verdicts._\n", 1) for m in (markdown, brief))
    return Answers(markdown, brief, figure, tables, summary)


def _claims_sentence(controls: pd.DataFrame) -> str:
    """The controls whose paper reports a size: is that size inside the interval (the study cannot tell) or not?"""
    sized = controls[controls["claim_excluded"].notna()]
    if not len(sized):
        return ""
    words = [f"{r.config} {r.metric}: claimed {r.claimed_difference:+.3g}, "
             + ("ruled out" if r.claim_excluded else "inside the interval") for r in sized.itertuples()]
    return " Sizes the papers report, as a difference from TopK here: " + "; ".join(words) + "."


def _absorption_sentences(check: pd.DataFrame, verdicts: dict) -> str:
    """Per configuration whose SAEBench absorption differs from TopK's: whether the firing-based check confirms it,
    with the two parts of the main latents' silence (counted by SAEBench, not counted)."""
    if check.empty:
        return "No firing-based absorption results in this study."
    cells = {(r.config, r.metric): cell(r) for r in check.itertuples()}
    names = list(dict.fromkeys(check["metric"]))
    acting = [c for c, v in verdicts.items() if v["confirmed"] is not None]
    if not acting:
        return ("No configuration's SAEBench absorption differs detectably from TopK's: nothing for the firing-based "
                "check to confirm." if check["seeds"].ge(2).any() else
                "One seed: no intervals, so nothing to confirm.")
    out = []
    for c in acting:
        saebench, silent, *parts = (cells.get((c, name), "n/a") for name in names)
        word = "confirmed" if verdicts[c]["confirmed"] else "**not confirmed**"
        out.append(f"{c}: SAEBench's absorption {saebench}; {word} by the firing-based check (main latents silent "
                   f"{silent}" + (f"; of these words, counted by SAEBench {parts[0]}, not counted {parts[1]}"
                                  if len(parts) == 2 else "") + ").")
    return " ".join(out) + (" A penalty that only turns firing absorbers' decoders away from the probe moves words "
                            "from counted to not counted and leaves the silence as it was.")


def _targets_sentence(power: pd.DataFrame) -> str:
    """How many MDE targets the study meets, and the seeds each missed one would need at the measured spread."""
    aimed = power[power["target"].notna()]
    if not len(aimed):
        return ""
    missed = [f"{r.metric} {_seeds_needed(r.seeds_for_target)}" for r in aimed.itertuples()
              if r.meets_target is not None and not r.meets_target]
    return (f"{sum(bool(m) for m in aimed['meets_target'] if m is not None)} of {len(aimed)} MDE targets met"
            + (f"; seeds each missed target needs at this spread: {', '.join(missed)}." if missed else "."))


def _seeds_needed(n) -> str:
    return "more than 64" if n != n else f"{int(n)}"


def power_markdown(power: pd.DataFrame) -> str:
    """The MDE table, target columns blank where a metric has no target."""
    table = power.set_index("metric").round(4).astype(object)
    aimed = power.set_index("metric")["target"].notna()
    table["target"] = [f"{t:.4g}" if a else "" for t, a in zip(power["target"], aimed)]
    table["meets_target"] = [("yes" if m else "no") if a and m is not None else "" for m, a in
                             zip(power["meets_target"], aimed)]
    table["seeds_for_target"] = [_seeds_needed(n) if a and sd == sd else "" for n, a, sd in
                                 zip(power["seeds_for_target"], aimed, power["sd_of_difference"])]
    return table.to_markdown()


def write_answers(study: str, study_dir: Path, reports_dir: Path = Path("reports"),
                  readme: Path | None = Path("README.md"), planned: list[str] | None = None) -> Path:
    """``reports/<study>/answers.md``, ``answers_<question>.csv`` and ``headline.png``; the README block (the brief),
    if any."""
    answers = study_answers(study, study_dir, reports_dir, planned)
    folder = Path(reports_dir) / study
    folder.mkdir(parents=True, exist_ok=True)
    for key, table in answers.tables.items():
        table.to_csv(folder / f"answers_{key}.csv", index=False)
    run_files.write_json_atomic(folder / "summary.json", answers.summary)
    out = folder / "answers.md"
    run_files.write_text_atomic(out, answers.markdown.replace(FIGURE_LINK, FIGURE_LINK.format(figure="headline.png"))
                                .replace(FRONTIER_LINK, FRONTIER_LINK.format(figure="frontier.png")))
    if readme is not None and Path(readme).exists():
        link = FIGURE_LINK.format(figure=f"{Path(reports_dir).as_posix()}/{study}/headline.png")
        replace_block(Path(readme), study, answers.brief.replace(FIGURE_LINK, link))
    return out


def replace_block(readme: Path, study: str, text: str) -> bool:
    """Replace the text between the study's markers in ``readme``; False (file untouched) when they are absent."""
    begin, end = BEGIN.format(study=study), END.format(study=study)
    source = readme.read_text(encoding="utf-8")
    if begin not in source or end not in source or source.index(begin) > source.index(end):
        return False
    head, rest = source.split(begin, 1)
    _, tail = rest.split(end, 1)
    run_files.write_text_atomic(readme, f"{head}{begin}\n{text}{end}{tail}")
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
        return 0
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
