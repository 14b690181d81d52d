"""Training-step time of sgo_topk (and gram_topk, ortsae_topk) relative to plain topk, measured side by side in one
run, and the memory of the competition statistics at large d_sae.

    .venv/bin/python benchmarks/bench_sgo.py            # d_sae 4,096 and 16,384, k 32, batch 4,096, d_in 640
    .venv/bin/python benchmarks/bench_sgo.py --quick    # smaller, for a first look

Steps run through sae_lens's SAETrainer on synthetic activations with a low-rank structure (so latents
specialise and co-fire unevenly, as on real data). The SGO statistics are pre-filled with one window, so every
timed SGO step computes its penalty, and 10 steps (one ``competition_window``) are timed per architecture,
interleaved so machine noise hits all alike; the ratio is of mean step times (the fold is amortised). Memory is the peak RSS growth of a fresh process while the
statistics absorb batches (everything else allocated before the measurement starts).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def synthetic_batches(d_in: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(256, d_in, generator=g)
    while True:
        codes = torch.randn(batch, 256, generator=g).relu() * (torch.rand(batch, 256, generator=g) < 0.05)
        yield codes @ basis + 0.1 * torch.randn(batch, d_in, generator=g)


def make_trainer(arch: str, d_sae: int, d_in: int, k: int, batch: int, steps: int):
    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig
    from sae_lens.registry import get_sae_training_class

    import saelib.saes  # noqa: F401

    extra = {"topk": {}, "sgo_topk": {"orth_pen": 0.02, "competition_threshold": 0.05,
                                      "competition_warmup_steps": 0},
             "ortsae_topk": {"orth_pen": 0.02}, "gram_topk": {"orth_pen": 0.02}}[arch]
    sae_cls, cfg_cls = get_sae_training_class(arch)
    torch.manual_seed(0)
    sae = sae_cls(cfg_cls(d_in=d_in, d_sae=d_sae, k=k, **extra))
    cfg = SAETrainerConfig(total_training_samples=batch * steps, train_batch_size_samples=batch, lr=1e-3,
                           lr_end=1e-4, dead_feature_window=1000)
    return SAETrainer(cfg, sae, data_provider=synthetic_batches(d_in, batch))


def prefill_competition(trainer, d_in: int, k: int, batch: int) -> None:
    """Fill the SGO statistics with one full window (untimed), so timed steps compute the penalty on a realistic
    competing set and include exactly one fold per ``competition_window`` steps."""
    stats = trainer.sae.competition
    data = synthetic_batches(d_in, batch, seed=2)
    with torch.no_grad():
        for _ in range(stats.window):
            stats.update(trainer.sae.encode(next(data)), k)
    stats.flush()


def time_steps(archs, d_sae, d_in, k, batch, reps, warmup=1):
    trainers = {a: make_trainer(a, d_sae, d_in, k, batch, steps=reps + warmup + 1) for a in archs}
    if "sgo_topk" in trainers:
        prefill_competition(trainers["sgo_topk"], d_in, k, batch)
    data = synthetic_batches(d_in, batch, seed=1)
    times = {a: [] for a in archs}
    for rep in range(warmup + reps):
        x = next(data)
        for arch, trainer in trainers.items():  # interleaved: noise hits every architecture alike
            if hasattr(trainer.sae, "metrics_due"):  # as saelib.train does with log_every = 10
                trainer.sae.metrics_due = trainer.n_training_steps % 10 == 0
            start = time.perf_counter()
            trainer.step(x)
            trainer.n_training_steps += 1
            if rep >= warmup:
                times[arch].append(time.perf_counter() - start)
    return {a: statistics.mean(t) for a, t in times.items()}


def _proc_status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def stats_memory_child(d_sae: int, k: int, batch: int, updates: int) -> None:
    """Peak RSS growth while CompetitionStats absorbs ``updates`` batches of TopK-like activations.

    The activation batch is allocated first; the kernel's peak-RSS mark is then reset (clear_refs 5), so the
    reported growth is what the statistics and their transient sort/merge buffers add on top.
    """
    from saelib.competition import CompetitionStats

    g = torch.Generator().manual_seed(0)
    acts = torch.zeros(batch, d_sae)
    topics = torch.stack([torch.randperm(d_sae, generator=g)[:k] for _ in range(64)])
    rows = [torch.where(torch.rand(batch, k, generator=g) < 0.5, topics[torch.randint(0, 64, (batch,), generator=g)],
                        torch.randint(0, d_sae, (batch, k), generator=g)) for _ in range(4)]
    stats = CompetitionStats(d_sae)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _proc_status_kib("VmRSS")
    for u in range(updates):
        acts.zero_().scatter_(1, rows[u % 4], 1.0)
        stats.update(acts, k)
    peak = _proc_status_kib("VmHWM")
    print(json.dumps({"d_sae": d_sae, "pairs": len(stats.pair_keys), "state_mib": stats.nbytes() / 2**20,
                      "peak_growth_mib": (peak - base) / 1024}))


def stats_memory(d_sae, k, batch, updates):
    out = subprocess.run([sys.executable, __file__, "--memory-child", str(d_sae), str(k), str(batch), str(updates)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-child", nargs=4, type=int)
    args = parser.parse_args()
    if args.memory_child:
        return stats_memory_child(*args.memory_child)
    d_in, k = 640, 32
    batch, reps = (1024, 10) if args.quick else (4096, 10)  # 10 = competition_window: one fold per timed run
    print(f"torch threads {torch.get_num_threads()}, batch {batch}, k {k}, d_in {d_in}, {reps} timed steps each")
    print(f"{'d_sae':>7} {'topk s/step':>12} {'sgo/topk':>9} {'ortsae/topk':>12} {'gram/topk':>10}")
    for d_sae in (4096, 16384):
        t = time_steps(["topk", "sgo_topk", "ortsae_topk", "gram_topk"], d_sae, d_in, k, batch, reps)
        print(f"{d_sae:>7} {t['topk']:>12.3f} {t['sgo_topk'] / t['topk']:>9.3f} "
              f"{t['ortsae_topk'] / t['topk']:>12.3f} {t['gram_topk'] / t['topk']:>10.3f}", flush=True)
    print("competition statistics memory (default cap 1M pairs):")
    for d_sae in (16384, 65536):
        m = stats_memory(d_sae, k, batch, updates=20)
        print(f"  d_sae {m['d_sae']:>6}: {m['pairs']:>9,} pairs kept, state {m['state_mib']:.1f} MiB, "
              f"peak RSS growth during updates {m['peak_growth_mib']:.1f} MiB", flush=True)


if __name__ == "__main__":
    main()
