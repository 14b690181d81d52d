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
# # Feature competition patterns
# Which latents compete (co-fire often relative to the rarer one: s_ij = c_ij / min(p_i, p_j) > τ), how many pairs
# each τ penalises, how their decoder directions overlap compared with co-firing pairs below τ, what the
# co-activation graph looks like, whether absorbing latents were competing with the latent they absorbed from, and
# where the strongest pairs fire. Everything is measured on held-out text with exact rates by the `competition`
# eval (`<run>/evals/competition.json`), so TopK and the orthogonal SAEs are measured alike.
# Defaults read a small pre-built study (`tests/fixtures/study`).

# %% tags=["parameters"]
study_dir = "tests/fixtures/study"
contrast = []  # configurations side by side (seed 0 in details); empty: TopK and each orthogonal architecture's strongest λ

# %%
import pandas as pd
from IPython.display import display

from saelib import plots, run_files
from saelib.evals.competition import absorbing_pair_flags
from saelib.evals.results import study_results
from saelib.evals.suite import run_results
from saelib.settings import ORTHOGONAL
from saelib.stats import summarise

plots.use_report_renderer()
study = run_files.repo_path(study_dir)
results = study_results(study)
competition = results[results["eval"] == "competition"]
if competition.empty:
    raise ValueError(f"study_dir: {study_dir} has no competition results; run the competition eval (evaluate.ipynb)")
runs = {p.name: run_results(p) for p in sorted(study.iterdir()) if (p / "evals" / "competition.json").exists()}
configs = results.drop_duplicates("run").set_index("run")["config"]
if not contrast:
    firsts = results.drop_duplicates("config")
    contrast = ["topk"] + [group.sort_values(["lambda", "config"])["config"].iloc[-1]
                           for arch, group in firsts.groupby("architecture") if arch in ORTHOGONAL]
shown = {c: next((r for r in sorted(runs) if configs.get(r) == c), None) for c in contrast}
shown = {c: r for c, r in shown.items() if r is not None}
print(f"{len(runs)} runs with competition results; details for {shown}")

# %% [markdown]
# ## How many pairs each τ penalises, and their decoder overlap (mean ± 95 % CI over seeds)

# %%
per_tau = competition[competition["metric"].str.startswith("tau_")].copy()
per_tau[["tau_ref", "quantity"]] = per_tau["metric"].str.extract(r"tau_([0-9.e-]+)\.(.*)")
per_tau["tau_ref"] = per_tau["tau_ref"].astype(float)
table = summarise(per_tau.assign(eval="c", metric=per_tau["quantity"], group=per_tau["config"] + "|" +
                                 per_tau["tau_ref"].astype(str)),
                  {"c/n_competing_pairs": "competing pairs", "c/competing_mean_cos2": "competing cos²",
                   "c/noncompeting_mean_cos2": "non-competing cos²",
                   "c/competing_weighted_cos2": "competing cos² (score-weighted)"}, by="group")
table[["config", "tau"]] = table["group"].str.split("|", expand=True)
table["tau"] = table["tau"].astype(float)
view = table[table["config"].isin(contrast) | (table["config"] == "topk")].rename(columns={"config": "series"})
plots.metric_vs_parameter(view, "tau", "competition on held-out text vs τ").show()
display(table.pivot_table(index=["config", "tau"], columns="metric", values="mean").round(5))

# %% [markdown]
# ## Distribution of competition scores (all co-firing pairs)

# %%
scores = {f"{config} ({run})": runs[run]["competition"]["eval_result_unstructured"]["score_histogram"]
          for config, run in shown.items()}
plots.log_log_lines({name: (h["bin_edges"][1:], h["counts"]) for name, h in scores.items()},
                    "co-firing pairs per competition-score bin", "score s_ij (upper bin edge)", "pairs").show()

# %% [markdown]
# ## The co-activation graph at the reference τ

# %%
graph_rows, degrees = [], {}
for config, run in shown.items():
    res = runs[run]["competition"]
    graph = {k: v for k, v in res["eval_result_metrics"]["graph"].items() if not isinstance(v, (dict, list))}
    graph_rows.append({"config": config, "run": run, "tau": res["eval_config"]["reference_tau"], **graph})
    deg = res["eval_result_unstructured"]["degree_histogram"]
    degrees[config] = (deg["degree"], deg["latents"])
display(pd.DataFrame(graph_rows).set_index("config").T)  # one column per configuration: fits the page
plots.log_log_lines(degrees, "degree distribution of the competition graph", "competitors of a latent", "latents",
                    mode="markers").show()
for config, run in shown.items():
    clusters = runs[run]["competition"]["eval_result_unstructured"]["largest_clusters"]
    display(pd.DataFrame(clusters).head(5).assign(config=config))

# %% [markdown]
# ## Absorbing latents: were they competing with the latent they absorbed from?
# From the absorption eval's absorbing pairs; the score is the largest τ at which the pair would be penalised.

# %%
for config, run in shown.items():
    pairs = runs[run]["competition"]["eval_result_unstructured"].get("absorption_vs_competition") or []
    if not pairs:
        print(f"{config}: no absorbing pairs recorded (absorption eval not run, or nothing absorbed)")
        continue
    frame = pd.DataFrame(pairs)
    for tau in runs[run]["competition"]["eval_config"]["taus"]:
        frame[f"flagged at τ={tau:g}"] = frame["score"] > tau
    display(frame.head(20))
flagged = absorbing_pair_flags(study)
if not flagged.empty:
    print("Distinct (absorbed, absorbing) latent pairs flagged as competing, vs the base rate over all co-firing "
          "pairs (mean ± 95 % CI over seeds):")
    table = summarise(pd.concat([flagged.assign(eval="a", metric=m, value=100 * flagged[m],
                                                group=flagged["config"] + "|" + flagged["tau"].astype(str))
                                 for m in ("flagged", "base_rate")]),
                      {"a/flagged": "% flagged", "a/base_rate": "% of all co-firing pairs"}, by="group")
    table[["config", "tau"]] = table["group"].str.split("|", expand=True)
    display(table.pivot_table(index=["config", "tau"], columns="metric", values="text", aggfunc="first"))

# %% [markdown]
# ## The strongest competing pairs and where both fire

# %%
for config, run in shown.items():
    top = runs[run]["competition"]["eval_result_unstructured"]["top_pairs"]
    display(pd.DataFrame(top).drop(columns="contexts", errors="ignore").head(10).assign(config=config).round(4))
    for pair in top:
        for ctx in pair.get("contexts", []):
            print(f"{config} latents {pair['latent_i']}&{pair['latent_j']} (s={pair['score']:.2f}, "
                  f"cos²={pair['cos2']:.3f}): …{ctx['text']!r} → [{ctx['token']!r}]")
