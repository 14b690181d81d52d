"""Before/after of the default profile's preprocessing choices, side by side in one run, on the shared cache.

    .venv/bin/python benchmarks/ablate_preprocessing.py [--training-tokens 307200]

Trains the default-profile TopK SAE (d_sae 4,096, k 32, batch 1,024, lr 1e-3, layer 8; special tokens already
excluded by the cache) with each variant for the same token budget and seed, and prints held-out explained
variance, L0 and dead/dense fractions (saelib.evals.reconstruction_metrics on the held-out cache).
"""

from __future__ import annotations

import argparse
import tempfile

from saelib.activations import cache_for_config
from saelib.config import build_config
from saelib.evals import reconstruction_metrics
from saelib.models import load_model
from saelib.train import train_sae

VARIANTS = {
    "raw, no normalisation": {"centre_activations": False, "normalize_activations": "none"},
    "raw, scaled": {"centre_activations": False},
    "centred, scaled (default)": {},
    "centred, scaled, lr 4e-4": {"lr": 4e-4},
    "centred, scaled, dead window 1000": {"dead_feature_window": 1000},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--training-tokens", type=int, default=307_200)
    args = parser.parse_args()
    base = build_config(params_file="params/default/topk_s0.yaml")
    model = load_model(base.model_name)
    train_cache, eval_cache = cache_for_config(base, model, "train"), cache_for_config(base, model, "eval")
    print(f"{'variant':36s} {'EV':>7s} {'L0':>6s} {'dead':>6s} {'dense':>6s}   ({args.training_tokens:,} tokens)")
    with tempfile.TemporaryDirectory() as runs:
        for name, overrides in VARIANTS.items():
            cfg = build_config({**overrides, "training_tokens": args.training_tokens, "runs_dir": runs,
                                "n_checkpoints": 0}, params_file="params/default/topk_s0.yaml")
            m = reconstruction_metrics(train_sae(cfg, train_cache, cfg.run_dir / name.replace(" ", "_")), eval_cache)
            print(f"{name:36s} {m['explained_variance']:7.4f} {m['l0']:6.1f} {m['frac_dead']:6.3f} "
                  f"{m['frac_dense']:6.3f}", flush=True)


if __name__ == "__main__":
    main()
