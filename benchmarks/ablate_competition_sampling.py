"""What SGO loses when its statistics and its penalty look at samples, on a trained TopK SAE's own masks.

    .venv/bin/python benchmarks/ablate_competition_sampling.py runs/single/topk_s0 [--steps 200] [--batch 4096]

The SGO step has two sampled parts (``saelib.saes``): the co-firing statistics may read only
``competition_stat_tokens`` evenly spaced tokens of each batch, and the penalty is estimated from
``competition_sample_pairs`` pairs drawn ∝ competition score. This script streams ``--steps`` training batches of the
run's activation cache through its finished SAE (frozen, so every variant sees the same masks) and measures, against
statistics over every token:

* the cost per step of the statistics (listing pairs + folding windows), per variant;
* the competing set at τ 0.02 and 0.05: its size, Jaccard overlap with the full set, and the share of the full
  set's score weight that the sampled set also penalises (weighted recall);
* the penalty's decoder gradient: cosine between the exact gradient over the full competing set and the gradient
  estimated from a sampled set with M pairs, for one draw (a step's noise) and for the mean of 10 draws (what Adam's
  momentum roughly averages).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saelib import run_files
from saelib.activations import cache_for_config, iter_training_batches
from saelib.competition import CompetitionStats
from saelib.config import build_config, field_names
from saelib.evals.common import load_run_sae
from saelib.models import load_model
from saelib.saes import competition_rows, sampled_pair_cos2, weighted_pair_cos2
from saelib.sparse_step import keep_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished TopK run folder (its cfg.json names the cache)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--tokens", default="0,2048,1024,512", help="competition_stat_tokens variants (0 = all)")
    parser.add_argument("--pairs", default="16384,8192,4096", help="competition_sample_pairs variants")
    args = parser.parse_args()
    keep_freed_memory()
    recorded = run_files.read_json(args.run_dir / run_files.RUN_CFG_FILE)
    cfg = build_config({k: v for k, v in recorded.items() if k in field_names()})
    sae = load_run_sae(args.run_dir)
    model = load_model(cfg.model_name, precision=cfg.lm_precision)
    cache = cache_for_config(cfg, model, "train")
    del model
    F, k = sae.cfg.d_sae, sae.cfg.k
    variants = [int(t) for t in args.tokens.split(",")]
    stats = {t: CompetitionStats(F, cfg.competition_decay, cfg.competition_max_pairs, cfg.competition_window)
             for t in variants}
    seconds = dict.fromkeys(variants, 0.0)
    batches = iter_training_batches(cache, args.batch, seed=12_345)
    with torch.no_grad():
        for _ in tqdm(range(args.steps), desc="batches"):
            acts = sae.encode(next(batches))
            vals, idx = acts.topk(k, dim=-1)
            idx, order = idx.sort(dim=-1)
            fired = vals.gather(-1, order) > 0
            for t, st in stats.items():
                start = time.perf_counter()
                rows = competition_rows(len(idx), t)
                st.update_fired(idx[rows], fired[rows])
                seconds[t] += time.perf_counter() - start
    for st in stats.values():
        st.flush()
    W = sae.W_dec.detach().clone()
    out: dict[str, dict] = {}
    print(f"\nTopK SAE {args.run_dir} (d_sae {F}, k {k}); {args.steps} batches of {args.batch} tokens, "
          f"decay {cfg.competition_decay}, window {cfg.competition_window}, max pairs {cfg.competition_max_pairs:,}")
    print(f"{'stat tokens':>11} {'ms/step':>8} {'τ':>5} {'|C|':>9} {'Jaccard':>8} {'w-recall':>9}   "
          + "   ".join(f"cos M={m} (1 / mean of 10)" for m in args.pairs.split(",")))
    for tau in (0.02, 0.05):
        i_full, j_full, s_full = stats[0].competing(tau) if 0 in stats else stats[variants[0]].competing(tau)
        Wg = W.clone().requires_grad_(True)
        (exact,) = torch.autograd.grad(weighted_pair_cos2(Wg, i_full, j_full, s_full), Wg)
        full_keys = set((i_full * F + j_full).tolist())
        full_weight = dict(zip((i_full * F + j_full).tolist(), s_full.tolist()))
        for t in variants:
            i_C, j_C, s_C = stats[t].competing(tau)
            keys = set((i_C * F + j_C).tolist())
            jaccard = len(keys & full_keys) / max(1, len(keys | full_keys))
            recall = sum(full_weight[x] for x in keys & full_keys) / max(1e-12, float(s_full.sum()))
            cosines = []
            for m in (int(x) for x in args.pairs.split(",")):
                grads = []
                for draw in range(10):
                    Wg = W.clone().requires_grad_(True)
                    loss = sampled_pair_cos2(Wg, i_C, j_C, s_C, m, torch.Generator().manual_seed(draw))
                    grads.append(torch.autograd.grad(loss, Wg)[0])
                one = torch.nn.functional.cosine_similarity(grads[0].flatten(), exact.flatten(), dim=0).item()
                mean = torch.nn.functional.cosine_similarity(torch.stack(grads).mean(0).flatten(), exact.flatten(),
                                                             dim=0).item()
                cosines.append((m, one, mean))
            ms = 1000 * seconds[t] / args.steps
            print(f"{t or 'all':>11} {ms:8.1f} {tau:5.2f} {len(i_C):9,} {jaccard:8.3f} {recall:9.3f}   "
                  + "   ".join(f"{one:.3f} / {mean:.3f}{'':>16}" for _, one, mean in cosines))
            out[f"tokens{t}_tau{tau}"] = {"ms_per_step": ms, "n_competing": len(i_C), "jaccard": jaccard,
                                          "weighted_recall": recall,
                                          "grad_cos": {str(m): [one, mean] for m, one, mean in cosines}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
