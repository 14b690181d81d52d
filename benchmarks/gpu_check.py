"""A GPU check of saelib, ready for the day a CUDA machine is at hand: ≤ 5 minutes with the embedded model, one JSON line.

    .venv/bin/python benchmarks/gpu_check.py                        # on a CUDA machine (after `make model`)
    .venv/bin/python benchmarks/gpu_check.py --device cpu --smoke   # the script's own check, tiny sizes (CI)

What it measures, all on ``--device``:

* one SAE training step at d_sae 16,384 (batch 4,096, d_in 640, k 32), interleaved rounds: stock sae_lens
  ``TopKTrainingSAE`` with its trainer's bf16 autocast against saelib's sparse step at its best precision (bf16 where
  the device has it); tokens/s of each;
* SGO's overhead on that step (τ 0.02, λ 0.02, statistics filled, whole 10-batch windows so the fold is timed);
* the LM pass (Gemma 3 270M to block 8) in fp32 and at its best precision, tokens/s;
* a 2,000-step training of the default profile's TopK at 16,384 latents on the real activations (cache built on
  the device), and its held-out explained variance;
* peak device memory.

It fails loudly (non-zero exit, one line naming the tensor) if anything ran on the CPU when a GPU was asked for:
the LM's weights and activations and the trained SAE's parameters are checked, and the device's allocator must
have seen the work (sae_lens's trainer moves each training batch to the SAE's device itself).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sgo import synthetic_batches  # noqa: E402
from bench_speed import D_IN, lm_pass, sae_lens_stepper, time_interleaved  # noqa: E402


class FellBackToCPU(RuntimeError):
    pass


def on_device(what: str, tensors, device: torch.device) -> None:
    for t in tensors:
        if t.device.type != device.type:
            raise FellBackToCPU(f"{what} is on {t.device}, not on {device}: something fell back")


def sync_for(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def sae_steps(device: torch.device, d_sae: int, batch: int, rounds: int) -> dict[str, float]:
    """Seconds per step of stock sae_lens TopK (bf16 autocast where native) and saelib's step, and SGO's overhead."""
    from saelib.sparse_step import resolve_precision

    best = resolve_precision("auto", device)
    sgo = dict(orth_pen=0.02, competition_threshold=0.02, competition_warmup_steps=0, competition_window=10)
    steppers = {"stock": sae_lens_stepper("stock", d_sae, best, 10**6, device=str(device)),
                "saelib": sae_lens_stepper("saelib_topk", d_sae, best, 10**6, device=str(device)),
                "sgo": sae_lens_stepper("sgo_topk", d_sae, best, 10**6, device=str(device), **sgo)}
    batches = [b.to(device) for b, _ in zip(synthetic_batches(D_IN, batch, seed=d_sae), range(4))]
    t = time_interleaved(steppers, {"stock": 3, "saelib": 10, "sgo": 10}, batches, rounds,
                         {"stock": 1, "saelib": 2, "sgo": 10}, sync=sync_for(device))
    return {"sae_precision": best, "stock_topk_tokens_per_s": batch / t["stock"],
            "saelib_topk_tokens_per_s": batch / t["saelib"], "speedup_vs_stock": t["stock"] / t["saelib"],
            "sgo_overhead": t["sgo"] / t["saelib"] - 1}


def train_and_score(device: torch.device, d_sae: int, steps: int, smoke: bool) -> dict[str, float]:
    """``steps`` steps of the default profile's TopK at ``d_sae`` on real activations; held-out EV."""
    from saelib.activations import cache_for_config
    from saelib.config import build_config
    from saelib.evals.core import reconstruction_metrics
    from saelib.models import load_model
    from saelib.train import train_sae

    with tempfile.TemporaryDirectory() as runs:
        base = {"runs_dir": runs, "study": "gpu_check", "device": str(device), "d_sae": d_sae, "n_checkpoints": 0,
                "log_every": max(1, steps // 20)}
        if smoke:
            base.update(cache_tokens=16_384, eval_tokens=4_096, eval_ce_tokens=512, batch_size=256, k=16)
        cfg = build_config({**base, "training_tokens": steps * (256 if smoke else 1024)}, profile="default")
        lm = load_model(cfg.model_name, device=cfg.device, precision=cfg.lm_precision)
        start = time.perf_counter()
        train_cache, eval_cache = cache_for_config(cfg, lm, "train"), cache_for_config(cfg, lm, "eval")
        cache_s = time.perf_counter() - start
        del lm
        start = time.perf_counter()
        sae = train_sae(cfg, train_cache)
        sync_for(device)()
        train_s = time.perf_counter() - start
        on_device("the trained SAE's parameters", sae.parameters(), device)
        metrics = reconstruction_metrics(sae, eval_cache)
    return {"train_steps": steps, "train_d_sae": d_sae, "train_seconds": train_s, "cache_seconds": cache_s,
            "train_tokens_per_s": cfg.training_tokens / train_s, "heldout_explained_variance":
            metrics["explained_variance"], "heldout_l0": metrics["l0"], "heldout_frac_dead": metrics["frac_dead"]}


def main(argv: list[str] | None = None) -> int:
    from saelib.sparse_step import require_device

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:<index>; cpu only with --smoke")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: the script's own check (seconds on a CPU)")
    args = parser.parse_args(argv)
    try:
        device = require_device(args.device)
    except ValueError as err:
        parser.exit(2, f"gpu_check: {err}\n")
    if device.type == "cpu" and not args.smoke:
        parser.exit(2, "gpu_check: --device cpu is for --smoke only (benchmarks/bench_speed.py measures a CPU)\n")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    d_sae, batch = (512, 256) if args.smoke else (16_384, 4_096)
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__}
    try:
        result.update(sae_steps(device, d_sae, batch, rounds=1 if args.smoke else 3))
        result.update(lm_pass(1 if args.smoke else 3, device=str(device), batch=2 if args.smoke else 64,
                              sync=sync_for(device), check=lambda what, tensors: on_device(what, tensors, device)))
        result.update(train_and_score(device, d_sae, steps=20 if args.smoke else 2_000, smoke=args.smoke))
    except FellBackToCPU as err:
        parser.exit(1, f"gpu_check: FAILED: {err}\n")
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if result["peak_memory_gib"] < 0.1:
            parser.exit(1, "gpu_check: FAILED: the GPU allocator saw almost nothing: the work ran elsewhere\n")
    result["wall_seconds"] = time.perf_counter() - start
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
