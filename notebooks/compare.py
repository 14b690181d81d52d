# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Compare every run of a study
# All runs side by side: SAEBench metrics as mean ± 95 % CI over seeds, sparsity/fidelity Pareto plots, metrics
# against λ and τ, and a seed-paired comparison of every configuration against TopK with its verdict. The numbers
# come from the runs' `evals/*.json` (see `notebooks/evaluate.ipynb`); nothing is recomputed here.
# Defaults read a small pre-built study (`tests/fixtures/study`) so the notebook runs in seconds.

# %% tags=["parameters"]
study_dir = "tests/fixtures/study"
baseline = "topk"

# %%
import pandas as pd
from IPython.display import Markdown, display

from saelib import plots, run_files
from saelib.answers import config_order, study_answers, table_markdown
from saelib.evals.results import HEADLINE, matched_baselines, study_results, wide
from saelib.stats import paired_vs_baseline, summarise

plots.use_report_renderer()
results = study_results(run_files.repo_path(study_dir))
if results.empty:
    raise ValueError(f"study_dir: {study_dir} holds no eval results; run the study first (make study)")
names = {key: name for key, (name, _) in HEADLINE.items()}
runs = wide(results, names)
print(f"study {run_files.repo_path(study_dir).name}: {runs['run'].nunique()} runs, {runs['config'].nunique()} configurations, "
      f"seeds {sorted(runs['seed'].unique())}")

# %% [markdown]
# ## All configurations: mean ± 95 % CI over seeds

# %%
summary = summarise(results, names)
table = summary.pivot(index="config", columns="metric", values="text")
table = table[[n for n in names.values() if n in table.columns]]
display(table)

# %% [markdown]
# ## Sparsity and fidelity (one point per run)

# %%
for y in ("explained variance", "CE-loss recovered"):
    if {"L0", y} <= set(runs.columns):
        plots.pareto(runs, "L0", y, f"L0 vs {y}").show()

# %% [markdown]
# ## Against λ (orth_pen) and τ (competition threshold), sparsity-guided runs

# %%
sgo = results[results["architecture"] == "sgo_topk"]
shown = ["absorption (mean fraction)", "sparse probing top-1", "unlearning proxy score", "explained variance"]
focus = {k: v for k, v in names.items() if v in shown}
if not sgo.empty:
    by_lambda = summarise(sgo.assign(group=sgo["tau"].astype(str) + "|" + sgo["lambda"].astype(str)), focus,
                          by="group")
    by_lambda[["tau", "lambda"]] = by_lambda["group"].str.split("|", expand=True).astype(float)
    for parameter, series in (("lambda", "tau"), ("tau", "lambda")):
        view = by_lambda.assign(series=f"{series} = " + by_lambda[series].astype(str))
        counts = view.groupby("series")[parameter].nunique()
        view = view[view["series"].isin(counts[counts > 1].index)]  # a curve needs two points
        if not view.empty:
            plots.metric_vs_parameter(view, parameter, f"metrics vs {parameter} (mean ± 95 % CI)").show()

# %% [markdown]
# ## Every configuration against the baseline, paired by seed
# Difference = configuration − baseline on the same seed, with its 95 % t-interval over seeds; against `topk`, each
# configuration meets the TopK configuration trained like it (column `against`). "better"/"worse"
# only when the interval excludes zero; otherwise n.d., no detectable difference. The numbers behind the figure:
# one row per configuration, one column per metric.

# %%
baselines = matched_baselines(run_files.repo_path(study_dir), runs, baseline) if baseline == "topk" else None
paired = paired_vs_baseline(results, {k: v for k, v in HEADLINE.items() if v[1] != 0}, baseline=baseline,
                            baselines=baselines)
if paired.empty:
    print(f"No configuration shares seeds with {baseline}.")
else:
    plots.paired_differences(paired, f"paired difference vs {baseline} (95 % CI)").show()
    against = paired.drop_duplicates("config")[["config", "baseline"]].rename(columns={"baseline": "against"})
    display(Markdown(table_markdown(paired, config_order(results.drop_duplicates("run")), against)))

# %% [markdown]
# ## The mission's questions, answered from these results
# The tables a study writes to `reports/<study>/answers.md` (`saelib.answers`; the README shows a brief): every verdict is
# decided by the paired 95 % interval, none is written by hand. (Needs TopK runs: it is the baseline of every answer.)

# %%
if "topk" in set(results["config"]):
    display(Markdown(study_answers(run_files.repo_path(study_dir).name, run_files.repo_path(study_dir), reports_dir=None).markdown))
