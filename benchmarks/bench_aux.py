"""The TopK auxiliary loss on the sparse step: sparse gathers vs dense products over the dead columns.

At 16,384 latents, batch 4,096, d_in 640 (k_aux = 320 entries a row), for a range of dead-latent counts, times the
aux loss's forward + backward (the rest of the step excluded) both ways, interleaved, in fp32 and — where the CPU has
native bf16 — bf16, and prints the dense/sparse time ratio: where it crosses 1 sets
``SparseTopKTrainingSAE.aux_dense_max_ratio`` (dense while ``n_dead ≤ ratio · k_aux``).

    .venv/bin/python benchmarks/bench_aux.py [--rounds 3] [--d-sae 16384] [--batch 4096]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from saelib.sparse_step import (SparseTopKTrainingSAE, SparseTopKTrainingSAEConfig, bf16_native,
                                keep_freed_memory)


def aux_seconds(sae: SparseTopKTrainingSAE, x: torch.Tensor, dead: torch.Tensor, dense: bool, rounds: int) -> float:
    """Median seconds of the aux loss's forward + backward after one forward of the step (not timed)."""
    sae.aux_dense_max_ratio = {sae.precision: float("inf") if dense else 0.0}
    times = []
    for _ in range(rounds + 1):
        sae.zero_grad(set_to_none=True)
        with torch.no_grad():
            state = sae._sparse_encode(x)
        sae.step_state = state
        sae_out = (sae._sparse_decode(state.idx, state.acts, state.W_dec_norm_F) + sae.b_dec).detach()
        t = time.perf_counter()
        loss = sae.calculate_topk_aux_loss(x, sae_out, state.hidden_pre_BF, dead)
        loss.backward()
        times.append(time.perf_counter() - t)
    return sorted(times[1:])[len(times[1:]) // 2]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d-in", type=int, default=640)
    args = parser.parse_args(argv)
    keep_freed_memory()
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in) * 3
    k_aux = args.d_in // 2
    precisions = ["float32"] + (["bfloat16"] if bf16_native("cpu") else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, d_in {args.d_in}, "
          f"d_sae {args.d_sae}, k_aux {k_aux}; aux loss forward + backward, median of {args.rounds}")
    print(f"{'precision':>9}  {'n_dead':>6}  {'n_dead/k_aux':>12}  {'sparse s':>8}  {'dense s':>8}  dense/sparse")
    result = {}
    for precision in precisions:
        sae = SparseTopKTrainingSAE(SparseTopKTrainingSAEConfig(d_in=args.d_in, d_sae=args.d_sae, k=32,
                                                                 sae_precision=precision))
        for ratio in (2, 4, 6, 8, 12, 16):
            n_dead = min(ratio * k_aux, args.d_sae)
            dead = torch.zeros(args.d_sae, dtype=torch.bool)
            dead[torch.randperm(args.d_sae, generator=torch.Generator().manual_seed(1))[:n_dead]] = True
            sparse = aux_seconds(sae, x, dead, False, args.rounds)
            dense = aux_seconds(sae, x, dead, True, args.rounds)
            result[f"{precision}_{ratio}"] = round(dense / sparse, 3)
            print(f"{precision:>9}  {n_dead:>6}  {ratio:>12}  {sparse:8.3f}  {dense:8.3f}  {dense / sparse:.2f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
