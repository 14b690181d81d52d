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
# # Evaluate one SAE with SAEBench
# SAEBench's core, absorption, sparse-probing and unlearning evals, run through `sae_bench` itself with the
# loaded model object, on a trained run folder. Results land in `<run>/evals/<eval>.json` (SAEBench format); an
# eval whose result is already there for the same SAE and settings is reused. Offline, sparse probing uses eight
# stand-in tasks built from shipped text and unlearning runs as an **offline proxy** (SAEBench's own unlearning eval
# needs the hub, gemma-2-2b-it and the gated WMDP corpus; the notebook shows why it is skipped).
# At its defaults it evaluates the run `notebooks/train.ipynb` makes at its defaults, with the same profile
# (`profile`, or `SAELIB_PROFILE=smoke` for the smoke run and the evals' smoke settings); train that first.

# %% tags=["parameters"]
params_file = ""  # params/<study>/<run>.yaml: evaluates that run's folder (overrides run_dir)
run_dir = ""  # empty: the folder the train notebook writes with the same -p values (any RunConfig field) and profile
profile = ""  # empty: $SAELIB_PROFILE or "default"; "smoke": the smoke run, evaluated at the smoke settings
evals = ["core", "absorption", "sparse_probing", "unlearning_proxy", "unlearning", "competition"]
eval_profile = ""  # "smoke" (fast, for CI) or "default" (the measured profile); empty: follows profile
force = False  # re-run evals even when a current result exists
device = ""  # empty: the device the run trained on (its cfg.json); "cpu" evaluates a GPU run on a CPU machine

# %%
from saelib.config import evaluation_target, run_device

run_dir, eval_profile = evaluation_target(globals(), params_file, run_dir, profile, eval_profile)

# %%
import logging

import pandas as pd
from IPython.display import display

from saelib import plots
from saelib.evals import evaluate_run, headline_metrics, run_results
from saelib.evals.common import load_run_sae
from saelib.models import load_model

logging.basicConfig(level=logging.INFO, format="%(message)s")
plots.use_report_renderer()
sae_cfg = load_run_sae(run_dir).cfg
print(f"{run_dir}: {sae_cfg.architecture()} d_sae={sae_cfg.d_sae} on {sae_cfg.metadata.model_name} "
      f"{sae_cfg.metadata.hook_name}; evals {evals} at the {eval_profile} profile")

# %%
# on the run's device (a GPU run is evaluated on the GPU), the LM in float32 (bf16 losses sit on a 1/32-nat grid)
model = load_model(sae_cfg.metadata.model_name, device=device or run_device(run_dir))

# %% [markdown]
# ## Run the evals
# One row per eval: `done` (ran now), `reused` (a current result was there), `unavailable` (cannot run on this
# machine — the message says what it needs) or `failed` (the error; the other evals still ran).

# %%
status = evaluate_run(run_dir, model, evals, smoke=eval_profile == "smoke", force=force)
display(plots.eval_status_table(status))
results = run_results(run_dir)

# %% [markdown]
# ## Core: reconstruction, model behaviour preserved, sparsity (held-out text)

# %%
if "core" in results:
    display(plots.metrics_table(headline_metrics(results["core"])))

# %% [markdown]
# ## Absorption (first letter)
# Letters whose first-letter probe passed SAEBench's F1 gate; per letter, the mean fraction of the probe's
# projection absorbed by latents other than the letter's main latents, and the rate of full absorption.

# %%
if "absorption" in results:
    display(plots.metrics_table(results["absorption"]["eval_result_metrics"]["mean"]))
    plots.absorption_per_letter(results["absorption"]).show()

# %% [markdown]
# ## Sparse probing
# Test accuracy of logistic probes on the top-k latents (SAE) or top-k dimensions (LLM), chosen by the class-mean
# difference as in SAEBench, for k = 1 … 50 and on everything ("full").

# %%
if "sparse_probing" in results:
    display(plots.probing_table(results["sparse_probing"]).round(3))
    plots.probing_vs_k(results["sparse_probing"]).show()

# %% [markdown]
# ## Unlearning — offline proxy (not SAEBench's WMDP score)
# Latents chosen as SAEBench does (fire often on the forget topic — held-in medical abstracts — and rarely on
# general text), clamped to −multiplier when active; score = rise of next-token loss on held-out medical abstracts
# minus the rise on held-out general text (nats), over SAEBench's grid, admissible only when the general-text loss
# rises by at most 1 %. SAEBench's own eval (`unlearning`, WMDP-bio on gemma-2-2b-it) is listed in the status table
# above with the reason it cannot run here.

# %%
if "unlearning_proxy" in results:
    display(plots.metrics_table(plots.unlearning_headline(results["unlearning_proxy"])))
    plots.unlearning_curve(results["unlearning_proxy"]).show()

# %% [markdown]
# ## Feature competition on held-out text
# Pairs per competition threshold τ and their decoder cos² against co-firing pairs below τ; the strongest pairs
# and where they fire are in `notebooks/competition.ipynb` across a study.

# %%
if "competition" in results:
    per_tau = {k: v for k, v in results["competition"]["eval_result_metrics"].items() if k.startswith("tau_")}
    display(pd.DataFrame(per_tau).T.round(5))
