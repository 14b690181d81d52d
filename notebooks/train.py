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
# # Train one SAE
# Activations of the chosen hook are cached once (shared by every run of a study), an SAE of the chosen
# architecture is trained with sae_lens's trainer, and SAEBench's core eval judges it on held-out text.
# At its defaults this trains the single-run default profile: a healthy TopK SAE (d_sae 4,096, k 32, 1.23M tokens)
# on 2 CPU cores, into `runs/single/<name>` (the name says the architecture, its parameters and the seed, e.g.
# `sgo_t0.05_l0.02_s0`). `profile = "smoke"` (or `SAELIB_PROFILE=smoke`) is a one-minute pipeline check;
# `params_file` runs one run of a study (`params/<study>/<run>.yaml`). Values given with papermill's `-p` always win.

# %% tags=["parameters"]
params_file = ""  # params/<study>/<run>.yaml: overrides; names the run <study>/<run>
profile = ""  # empty: $SAELIB_PROFILE or "default"; "smoke": a one-minute pipeline check (runs/smoke/)
competition_analysis = True  # held-out competition at this run's τ (a study leaves it to the competition eval)
study = "single"
run_name = ""  # empty: derived from the configuration, e.g. topk_s0, sgo_t0.05_l0.02_s0
runs_dir = "runs"
model_name = "gemma-3-270m"
hook_layer = 8
dataset = "saelib-offline"
context_size = 128
cache_tokens = 614_400
activations = "cache"  # or "stream": produced as consumed through an in-memory mixing buffer (hub-scale runs)
stream_buffer_tokens = 262_144
eval_tokens = 32_768
eval_ce_tokens = 4_096
centre_activations = True
normalize_activations = "expected_average_only_in"
architecture = "topk"
d_sae = 4_096
k = 32
l1_coefficient = 0.0
orth_pen = 0.0  # λ; setting it (or competition_threshold) alone selects architecture sgo_topk
competition_threshold = 0.05  # τ
competition_warmup_steps = 20
competition_decay = 0.99
competition_max_pairs = 1_000_000
competition_sample_pairs = 16_384
competition_window = 10
competition_stat_tokens = 1_024
competition_normalisation = "pairs"  # or "latents": the SGO penalty as a mean over competing latents
orth_chunk_size = 1024
matryoshka_widths = "quarters"  # or "saebench": Matryoshka prefixes d/32, 3d/32, 7d/32, 15d/32, d
training_tokens = 1_228_800
batch_size = 1_024
lr = 1e-3
lr_warm_up_steps = 0
dead_feature_window = 200
n_checkpoints = 4
log_every = 10
seed = 0
device = "cpu"
dtype = "float32"
sae_precision = "auto"  # SAE encoder matmul: auto is bf16 where the CPU/GPU has it natively, else float32
lm_precision = "auto"  # language model weights for activations and evals (same rule)

# %%
from saelib.config import config_from_notebook

cfg = config_from_notebook(globals(), params_file, profile)  # checks every value before anything is written
print(f"run {cfg.run_dir}: {cfg.architecture} d_sae={cfg.d_sae} k={cfg.k} on {cfg.model_name} {cfg.hook_name}")

# %%
import logging

import torch
from IPython.display import display

from saelib import plots, run_files
from saelib.activations import cache_for_config, training_activations
from saelib.evals import competition_for_run, core_for_run
from saelib.models import load_model
from saelib.train import train_sae

logging.basicConfig(level=logging.INFO, format="%(message)s")
plots.use_report_renderer()

# %% [markdown]
# ## Activations (cached once per study) and training

# %%
lm = load_model(cfg.model_name, device=cfg.device, precision=cfg.lm_precision)  # bf16 where native: ≈ 3× faster
train_cache = training_activations(cfg, lm)  # the shared cache, or a stream (activations: stream)
eval_cache = cache_for_config(cfg, lm, "eval")

# %%
sae = train_sae(cfg, train_cache)
del train_cache  # a stream's buffer (and its LM) are not needed past training
# the evals below run the LM in float32: bf16 losses sit on a 1/32-nat grid (docs/speed.md)
model = lm if lm.cfg.dtype == torch.float32 else load_model(cfg.model_name, device=cfg.device)
del lm

# %% [markdown]
# Training curves. Orthogonal architectures add their penalty (`orth_loss`) and, for `sgo_topk`, the number of
# competing pairs and their mean decoder cos² (measured before each step).

# %%
history = run_files.read_history(cfg.run_dir)
plots.training_curves(history, title=f"{cfg.study}/{cfg.run_name}: training curves")

# %% [markdown]
# ## Core evaluation (SAEBench) on held-out text

# %%
metrics = core_for_run(cfg, model)
display(plots.metrics_table(metrics))

# %% [markdown]
# ## Feature competition on held-out text
# Pairs whose competition score s_ij = c_ij / min(p_i, p_j) exceeds τ (`competition_threshold`), from exact
# held-out firing rates, and their decoder cos² next to the co-firing pairs below τ — for every architecture,
# so TopK and SGO are measured alike.

# %%
if competition_analysis:
    competition = competition_for_run(cfg, sae, eval_cache)
    display(plots.metrics_table(competition))
else:
    print("skipped (competition_analysis=False): the evaluate notebook's competition eval measures every τ")
