"""Finished runs side by side on held-out activations from the fp32 LM and from the bf16 LM.

    .venv/bin/python benchmarks/heldout_both_precisions.py runs/speedcheck/topk_fast_bf16 runs/speedcheck/topk_old_path

Per run: the SAE step and LM precision it trained with (its cfg.json), explained variance recomputed on both held-out
caches of its configuration (``saelib.evals.reconstruction_metrics``), CE-loss recovered and KL from its core eval
(``metrics.json``), L0 and dead fraction. Separates what an SAE learned from what the eval data's precision adds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from saelib import run_files
from saelib.activations import cache_for_config
from saelib.config import build_config, field_names
from saelib.evals import reconstruction_metrics
from saelib.evals.common import load_run_sae
from saelib.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    caches, models = {}, {}
    print(f"{'run':32s} {'SAE step/LM':22s} {'EV fp32-LM':>10s} {'EV bf16-LM':>10s} {'CE rec':>7s} {'KL':>7s} "
          f"{'L0':>5s} {'dead':>6s}")
    for run in args.runs:
        recorded = run_files.read_json(run / run_files.RUN_CFG_FILE)
        cfg = build_config({k: v for k, v in recorded.items() if k in field_names()})
        ev, sae = {}, load_run_sae(run)
        for precision in ("float32", "bfloat16"):
            models.setdefault(precision, load_model(cfg.model_name, precision=precision))
            key = (cfg.model_name, cfg.hook_layer, cfg.eval_tokens, cfg.context_size, precision)
            caches.setdefault(key, cache_for_config(cfg, models[precision], "eval"))
            ev[precision] = reconstruction_metrics(sae, caches[key])
        metrics = run_files.read_json(run / run_files.METRICS_FILE)
        used = f"{recorded.get('sae_precision_used', 'float32 (stock)')}/{recorded.get('lm_precision_used', 'float32')}"
        print(f"{run.name:32s} {used:22s} {ev['float32']['explained_variance']:10.4f} "
              f"{ev['bfloat16']['explained_variance']:10.4f} {metrics['ce_loss_score']:7.4f} "
              f"{metrics['kl_div_score']:7.4f} {ev['float32']['l0']:5.1f} {ev['float32']['frac_dead']:6.3f}")


if __name__ == "__main__":
    main()
