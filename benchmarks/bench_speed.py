"""Speed of one SAE training step (forward + backward + Adam) and of the LM pass, side by side in one run.

    .venv/bin/python benchmarks/bench_speed.py            # d_sae 4,096 and 16,384; batch 4,096, d_in 640, k 32
    .venv/bin/python benchmarks/bench_speed.py --quick    # d_sae 16,384 only, fewer rounds: ≈ 4 minutes (6–7 on a slow CPU)
    .venv/bin/python benchmarks/bench_speed.py --layout-ab  # W_enc latent-major vs row-major only, 8 rounds: ≈ 3 minutes
    .venv/bin/python benchmarks/bench_speed.py --sgo-ab     # saelib vs sgo_topk only, 10 rounds, then SGO's parts: ≈ 2 minutes
    .venv/bin/python benchmarks/bench_speed.py --lm         # the LM pass only, fp32/bf16, laid out for F.linear or not, and a whole fp32 forward: ≈ 2 minutes

Contenders, each in fp32 and (where this machine has native bf16) bf16, measured in interleaved rounds so that
machine noise hits all alike; a row's time is the median over rounds of the mean step time within a round:

* ``stock``: sae_lens's ``TopKTrainingSAE`` stepped by sae_lens's ``SAETrainer`` (its bf16 is the trainer's own
  ``autocast=True``);
* ``sparsify``: EleutherAI's ``SparseCoder`` (PyPI ``eai-sparsify``, ``pip install -e '.[bench]'``) stepped as its
  trainer does (FVU + AuxK, parallel-gradient removal, torch Adam, decoder renormalised); its bf16 is CPU autocast,
  which its own trainer enables on CUDA only. Skipped, and said so, where it is not installed;
* ``saelib``: saelib's sparse step (``saelib_topk``) stepped by saelib's ``HistoryTrainer`` (sae_lens's trainer
  with a fused Adam), as ``saelib.train`` runs it;
* ``stock batchtopk`` / ``stock matryoshka_batchtopk`` (sae_lens's, fp32) against ``saelib batchtopk`` /
  ``saelib matryoshka_batchtopk`` (the same SAEs on saelib's sparse step, at its best precision; widths
  d_sae/16, /4, d_sae as saelib trains them);
* ``sgo`` / ``ortsae`` / ``gram``: the orthogonal SAEs on saelib's step at its best precision (λ 0.02; SGO at
  τ 0.02 with its statistics already filled, and whole 10-batch windows timed so the fold is included; Gram only at
  4,096: it is quadratic in d_sae). SGO runs its defaults (statistics from 1,024 tokens a batch, 16,384 sampled
  penalty pairs); ``sgo/M8192`` halves the sampled pairs, which costs gradient fidelity
  (``benchmarks/ablate_competition_sampling.py``). Their table rows run minutes after the saelib row they are
  compared with, so the JSON's ``sgo_overhead_16k`` is measured again after the table, paired (``sgo_paired``: the
  two steps alternating in blocks of 10 steps, 4 rounds quick, 6 otherwise); the table's figures are kept as
  ``sgo_overhead_<size>_table`` and ``sgo_m8192_overhead_<size>_table``;
* ``saelib/dead10``: saelib's step with 10 % of the latents dead, so sae_lens's aux-k loss runs (k_aux = d_in / 2 =
  320 entries a row, 10× the main decode), as it does in real training once latents die (12–22 % at 16k here);
  the other rows have no dead latent;
* ``saelib/row-major W_enc``: saelib's step with ``W_enc`` stored row-major (plain fused Adam), as it was before
  the step kept it latent-major: the cost of autograd transposing its gradient and of the slower matmul layout.

Batches are synthetic activations with a low-rank structure (latents specialise and co-fire unevenly, as on real
data), generated before timing. The LM rows run the embedded Gemma 3 270M up to block 8 (batch 16 × 128) with fp32
and bf16 weights. The last line printed is one JSON object with the headline ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sgo import synthetic_batches  # noqa: E402

D_IN, BATCH, K = 640, 4096, 32


# ---------------------------------------------------------------------------------------------- contenders
def sae_lens_stepper(arch: str, d_sae: int, precision: str, steps: int, device: str = "cpu", dead: float = 0.0,
                     row_major: bool = False, **extra):
    """A function running one training step through sae_lens's trainer (saelib's for saelib architectures).
    ``dead``: that fraction of the latents counts as dead at every step, so TopK's aux-k loss runs as in training.
    ``row_major``: saelib's step with ``W_enc`` stored row-major, as before it was kept latent-major."""
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.registry import get_sae_training_class

    import saelib.saes  # noqa: F401
    from saelib.train import HistoryTrainer

    trainer_cfg = SAETrainerConfig(total_training_samples=BATCH * steps, train_batch_size_samples=BATCH, lr=4e-4,
                                   lr_end=4e-4, device=device, dead_feature_window=10_000, n_checkpoints=0,
                                   checkpoint_path=None, save_final_checkpoint=False,
                                   autocast=(arch == "stock" and precision == "bfloat16"))
    torch.manual_seed(0)
    if arch == "stock":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=d_sae, k=K, device=device))
        trainer = SAETrainer(trainer_cfg, sae, data_provider=iter(()))
    elif arch.startswith("stock_"):  # sae_lens's own BatchTopK / Matryoshka BatchTopK
        cls, cfg_cls = get_sae_training_class(arch.removeprefix("stock_"))
        sae = cls(cfg_cls(d_in=D_IN, d_sae=d_sae, k=K, device=device, **extra))
        trainer = SAETrainer(trainer_cfg, sae, data_provider=iter(()))
    else:
        cls, cfg_cls = get_sae_training_class(arch)
        sae = cls(cfg_cls(d_in=D_IN, d_sae=d_sae, k=K, sae_precision=precision, device=device, **extra))
        history = Path(tempfile.mkdtemp()) / "history.jsonl"
        trainer = HistoryTrainer(trainer_cfg, sae, data_provider=iter(()), log_every=10**9, history_path=history)
        if row_major:
            sae.W_enc = torch.nn.Parameter(sae.W_enc.data.contiguous())
            trainer._use_fused_adam()  # over the new parameter (all contiguous: plain fused Adam)

    n_dead = int(dead * d_sae)

    def step(batch):
        if n_dead:
            trainer.n_forward_passes_since_fired[:n_dead] = 10**9
        trainer.step(batch)
        trainer.n_training_steps += 1

    return step


def sparsify_stepper(d_sae: int, precision: str):
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    coder = SparseCoder(D_IN, SparseCoderConfig(num_latents=d_sae, k=K), device="cpu")
    opt = torch.optim.Adam(coder.parameters(), lr=4e-4)  # as sparsify's trainer builds it
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16")

    def step(batch):
        with autocast:
            out = coder(batch, dead_mask=None)
        (out.fvu + out.auxk_loss / 32).backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        coder.set_decoder_norm_to_unit_norm()

    return step


def sparsify_available() -> bool:
    try:
        import sparsify  # noqa: F401
    except ImportError:
        return False
    return True


def layout_ab(precisions: list[str], rounds: int) -> None:
    """saelib's step at 16k with ``W_enc`` latent-major (as trained) against row-major, interleaved, per precision."""
    batches = [b for b, _ in zip(synthetic_batches(D_IN, BATCH, seed=16_384), range(6))]
    ratios = {}
    for p in precisions:
        steppers = {"row-major": sae_lens_stepper("saelib_topk", 16_384, p, 10**6, row_major=True),
                    "latent-major": sae_lens_stepper("saelib_topk", 16_384, p, 10**6)}
        t = time_interleaved(steppers, dict.fromkeys(steppers, 5), batches, rounds, dict.fromkeys(steppers, 3))
        ratios[f"row_major_over_latent_major_{p}"] = t["row-major"] / t["latent-major"]
        print(f"{p}: row-major {t['row-major']:.4f} s/step, latent-major {t['latent-major']:.4f} s/step")
    print(json.dumps({k: round(v, 4) for k, v in ratios.items()}))


SGO_PARTS = [  # (label, module, owner attribute path, function name): what sgo_ab times in place
    ("statistics: a batch's update, fold included", "saelib.competition", "CompetitionStats", "update_fired"),
    ("statistics: fold of a window (amortised)", "saelib.competition", "CompetitionStats", "flush"),
    ("  of which its sort (amortised)", "saelib.competition", None, "_sort_keys"),
    ("competing set (amortised)", "saelib.competition", "CompetitionStats", "competing"),
    ("draw table (amortised)", "saelib.saes", None, "multinomial_table"),
    ("pair draw", "saelib.saes", None, "draw_pairs"),
    ("penalty forward", "saelib.saes", "_PairCos2", "forward"),
    ("penalty backward", "saelib.saes", "_PairCos2", "backward"),
]


def sgo_paired(best: str, rounds: int) -> tuple[dict[str, float], dict, list]:
    """saelib's step against ``sgo_topk`` at 16k in its precision, alternating in blocks of 10 steps over ``rounds``
    (the main table's rows are minutes apart within a round; these are seconds apart): the SGO overhead as a paired
    measure, ``(times, steppers, batches)``."""
    batches = [b for b, _ in zip(synthetic_batches(D_IN, BATCH, seed=16_384), range(6))]
    sgo = dict(orth_pen=0.02, competition_threshold=0.02, competition_warmup_steps=0, competition_window=10)
    steppers = {"saelib": sae_lens_stepper("saelib_topk", 16_384, best, 10**6),
                "sgo": sae_lens_stepper("sgo_topk", 16_384, best, 10**6, **sgo)}
    t = time_interleaved(steppers, {"saelib": 10, "sgo": 10}, batches, rounds, {"saelib": 2, "sgo": 10})
    print(f"{best}, {rounds} interleaved rounds of 10 steps: saelib {t['saelib']:.4f} s/step, sgo {t['sgo']:.4f} "
          f"s/step, overhead {t['sgo'] / t['saelib'] - 1:+.1%} ({(t['sgo'] - t['saelib']) * 1e3:.1f} ms a step)")
    return t, steppers, batches


def sgo_ab(best: str, rounds: int) -> dict[str, float]:
    """``sgo_paired`` (with more rounds than the main run gives it), then the SGO step's parts timed in place over 30
    steps: each part's wall time per step, the fold and the competing set amortised over their windows. The update
    row includes the fold (it runs inside the update that fills a window)."""
    import contextlib
    import importlib

    t, steppers, batches = sgo_paired(best, rounds)
    spent: dict[str, float] = dict.fromkeys([label for label, *_ in SGO_PARTS], 0.0)
    with contextlib.ExitStack() as undo:
        for label, module, owner, name in SGO_PARTS:
            target = importlib.import_module(module)
            target = getattr(target, owner) if owner else target
            inner = getattr(target, name)

            def timed(*args, _inner=inner, _label=label, **kwargs):
                start = time.perf_counter()
                try:
                    return _inner(*args, **kwargs)
                finally:
                    spent[_label] += time.perf_counter() - start

            setattr(target, name, timed)
            undo.callback(setattr, target, name, inner)
        steps = 30
        for i in range(steps):
            steppers["sgo"](batches[i % len(batches)])
    print(f"SGO's parts, in place, over {steps} steps (ms a step):")
    for label, sec in spent.items():
        print(f"  {label:<44} {sec / steps * 1e3:7.2f}")
    from saelib.competition import _CPU_SORTER

    sorters = {f"{dtype.removeprefix('torch.')}, {threads} threads": name
               for (threads, dtype), name in _CPU_SORTER.items()}
    print(f"the fold's keys sorted by (saelib.competition._sort_keys): {sorters or '(not chosen)'}")
    result = {"sgo_overhead_16k": t["sgo"] / t["saelib"] - 1, "sgo_extra_ms_16k": (t["sgo"] - t["saelib"]) * 1e3}
    print(json.dumps({k: round(v, 4) for k, v in result.items()} | {"fold_sorter": sorters}))
    return result


# ---------------------------------------------------------------------------------------------- timing
def time_interleaved(steppers: dict, steps: dict, batches: list, rounds: int, warmup: dict,
                     sync=lambda: None) -> dict[str, float]:
    """Median over ``rounds`` of the mean seconds per step; each round runs every contender in turn. ``sync`` waits
    for queued device work (``torch.cuda.synchronize`` on a GPU) before each clock read."""
    for name, step in steppers.items():
        for i in range(warmup[name]):
            step(batches[i % len(batches)])
    per_round: dict[str, list[float]] = {name: [] for name in steppers}
    for r in range(rounds):
        for name, step in steppers.items():
            sync()
            start = time.perf_counter()
            for i in range(steps[name]):
                step(batches[(r + i) % len(batches)])
            sync()
            per_round[name].append((time.perf_counter() - start) / steps[name])
    return {name: statistics.median(ts) for name, ts in per_round.items()}


def row_major_copy(model):
    """A copy of ``model`` with every weight row-major, as TransformerLens leaves them
    (``saelib.models.lay_out_for_linear`` undone)."""
    import copy

    stock = copy.deepcopy(model)
    for param in stock.parameters():
        param.data = param.data.contiguous()
    return stock


def lm_pass(rounds: int, device: str = "cpu", batch: int = 16, sync=lambda: None,
            check=lambda what, tensors: None, row_major: bool = False) -> dict[str, float]:
    """The embedded model to block 8 on ``batch`` × 128 tokens, fp32 and (where native) bf16 weights: tokens/s
    (median over ``rounds`` after a warm-up round) and the bf16 residual's relative error. ``check(what, tensors)``
    sees the weights and activations (gpu_check: that they are on the GPU). ``row_major``: also each model with
    its weights row-major, as TransformerLens leaves them (``saelib.models.lay_out_for_linear`` undone), in the
    same interleaved rounds: what that layout costs (``lm_layout_speedup_<precision>``)."""
    from saelib.models import load_model
    from saelib.sparse_step import bf16_native

    hook, layer = "blocks.8.hook_resid_post", 8
    tokens = torch.randint(3, 50_000, (batch, 128), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 2
    tokens = tokens.to(device)
    models = {p: load_model("gemma-3-270m", device=device, precision=p)
              for p in (["float32", "bfloat16"] if bf16_native(device) else ["float32"])}
    if row_major:
        for p in list(models):
            models[f"{p}/row-major"] = row_major_copy(models[p])
    for name, model in models.items():
        check(f"the LM's weights ({name})", model.parameters())
    out, acts = {}, {}
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for r in range(rounds + 1):
            for name, model in models.items():
                sync()
                start = time.perf_counter()
                _, cache = model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=layer + 1)
                sync()
                if r > 0:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
                acts[name] = cache[hook][:, 1:].float()
    check("the LM's activations", acts.values())
    for name in models:
        out[f"lm_{name.replace('/', '_').replace('-', '_')}_tokens_per_s"] = \
            tokens.numel() / statistics.median(times[name])
    for name in [n for n in models if n.endswith("/row-major")]:
        p = name.split("/")[0]
        out[f"lm_layout_speedup_{p}"] = statistics.median(times[name]) / statistics.median(times[p])
        assert torch.equal(acts[name], acts[p]), f"{name}: the layout changed the activations"
    if "bfloat16" in acts:
        a, b = acts["float32"], acts["bfloat16"]
        out["lm_bf16_residual_rel_error"] = float((a - b).norm() / a.norm())
    return out


def lm_full_forward(rounds: int, batch: int = 4) -> dict[str, float]:
    """The embedded model's whole forward pass to the logits (what the evals' CE-loss and KL runs, unembedding
    included) on ``batch`` × 128 tokens in fp32, its weights laid out for ``F.linear`` against row-major, interleaved:
    tokens/s (median over ``rounds`` after a warm-up round); the logits must be equal."""
    from saelib.models import load_model

    tokens = torch.randint(3, 50_000, (batch, 128), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 2
    models = {"laid out": load_model("gemma-3-270m", precision="float32")}
    models["row-major"] = row_major_copy(models["laid out"])
    times: dict[str, list[float]] = {name: [] for name in models}
    logits = {}
    with torch.no_grad():
        for r in range(rounds + 1):
            for name, model in models.items():
                start = time.perf_counter()
                logits[name] = model(tokens)
                if r > 0:
                    times[name].append(time.perf_counter() - start)
    assert torch.equal(logits["laid out"], logits["row-major"]), "the layout changed the logits"
    out = {f"lm_full_forward_{name.replace(' ', '_').replace('-', '_')}_tokens_per_s":
           tokens.numel() / statistics.median(ts) for name, ts in times.items()}
    out["lm_full_forward_layout_speedup"] = statistics.median(times["row-major"]) / statistics.median(times["laid out"])
    return out


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    from saelib.sparse_step import bf16_native, bf16_speedup, keep_freed_memory, resolve_precision
    from saelib.settings import matryoshka_widths

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="d_sae 16,384 only and fewer rounds (≈ 4 minutes; 6–7 on a slow CPU)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds per size (default 2 quick, 4; the paired SGO figure after the table "
                             "always takes 4 quick, 6 otherwise)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc as it is (saelib's training and evals call keep_freed_memory; "
                             "by default this benchmark does too, for every contender alike)")
    parser.add_argument("--lm", action="store_true",
                        help="only the LM pass: fp32 and bf16, each also with TransformerLens's row-major weights")
    parser.add_argument("--sgo-ab", action="store_true",
                        help="only saelib's step against sgo_topk at 16k (its overhead, 10 rounds), then SGO's parts")
    parser.add_argument("--layout-ab", action="store_true",
                        help="only saelib's step with W_enc latent-major against row-major, each precision, 16k")
    args = parser.parse_args()
    kept = False if args.default_malloc else keep_freed_memory()
    rounds = args.rounds or (2 if args.quick else 4)
    sizes = [16_384] if args.quick else [4_096, 16_384]
    native = bf16_native("cpu")
    precisions = ["float32", "bfloat16"] if native else ["float32"]
    if args.layout_ab:
        return layout_ab(precisions, args.rounds or 8)
    best = resolve_precision("auto", "cpu")  # what saelib trains in here: bf16 only where native and faster
    if args.sgo_ab:
        sgo_ab(best, args.rounds or 10)
        return
    if args.lm:
        lm = lm_pass(rounds=args.rounds or 3, row_major=True)
        lm.update(lm_full_forward(rounds=args.rounds or 3))
        lm["lm_pass_speedup"] = lm.get("lm_bfloat16_tokens_per_s", lm["lm_float32_tokens_per_s"]) \
            / lm["lm_float32_tokens_per_s"]
        print(json.dumps({k: round(v, 4) for k, v in lm.items()}))
        return
    have_sparsify = sparsify_available()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {native} (its matmul "
          f"{bf16_speedup('cpu'):.2f}× fp32's speed, so saelib's 'auto' trains in {best}); "
          f"batch {BATCH}, d_in {D_IN}, k {K}; {rounds} interleaved rounds; freed memory kept for reuse: {kept}"
          + ("" if have_sparsify else "; sparsify not installed (pip install -e '.[bench]'): its rows skipped"))
    results: dict[str, float] = {}
    rows = []
    for d_sae in sizes:
        steppers, steps, warmup = {}, {}, {}
        for p in precisions:
            steppers[f"stock/{p}"], steps[f"stock/{p}"], warmup[f"stock/{p}"] = \
                sae_lens_stepper("stock", d_sae, p, 10**6), 2 if args.quick else 3, 1
            if have_sparsify:
                steppers[f"sparsify/{p}"], steps[f"sparsify/{p}"], warmup[f"sparsify/{p}"] = \
                    sparsify_stepper(d_sae, p), 5, 2
            steppers[f"saelib/{p}"], steps[f"saelib/{p}"], warmup[f"saelib/{p}"] = \
                sae_lens_stepper("saelib_topk", d_sae, p, 10**6), 10, 2
        steppers["saelib/dead10"], steps["saelib/dead10"], warmup["saelib/dead10"] = \
            sae_lens_stepper("saelib_topk", d_sae, best, 10**6, dead=0.1), 10, 2
        steppers["saelib/row-major W_enc"], steps["saelib/row-major W_enc"], warmup["saelib/row-major W_enc"] = \
            sae_lens_stepper("saelib_topk", d_sae, best, 10**6, row_major=True), 10, 2
        sgo = dict(orth_pen=0.02, competition_threshold=0.02, competition_warmup_steps=0, competition_window=10)
        steppers["sgo"], steps["sgo"], warmup["sgo"] = sae_lens_stepper("sgo_topk", d_sae, best, 10**6, **sgo), 10, 10
        steppers["sgo/M8192"], steps["sgo/M8192"], warmup["sgo/M8192"] = sae_lens_stepper(
            "sgo_topk", d_sae, best, 10**6, **sgo, competition_sample_pairs=8192), 10, 10
        widths = {"matryoshka_widths": matryoshka_widths(d_sae)}
        for family, extra in (("batchtopk", {}), ("matryoshka_batchtopk", widths)):
            steppers[f"stock {family}"], steps[f"stock {family}"], warmup[f"stock {family}"] = \
                sae_lens_stepper(f"stock_{family}", d_sae, "float32", 10**6, **extra), 2, 1
            steppers[f"saelib {family}"], steps[f"saelib {family}"], warmup[f"saelib {family}"] = \
                sae_lens_stepper(f"saelib_{family}", d_sae, best, 10**6, **extra), 10, 2
        steppers["ortsae"], steps["ortsae"], warmup["ortsae"] = \
            sae_lens_stepper("ortsae_topk", d_sae, best, 10**6, orth_pen=0.02), 10, 2
        if d_sae <= 4_096:
            steppers["gram"], steps["gram"], warmup["gram"] = \
                sae_lens_stepper("gram_topk", d_sae, best, 10**6, orth_pen=0.02), 5, 1
        batches = [b for b, _ in zip(synthetic_batches(D_IN, BATCH, seed=d_sae), range(6))]
        t = time_interleaved(steppers, steps, batches, rounds, warmup)
        stock32 = t["stock/float32"]
        for name, sec in t.items():
            orth = name.split("/")[0] in ("sgo", "ortsae", "gram") or name in ("saelib/dead10", "saelib/row-major W_enc")
            ref = t[f"saelib/{best}"] if orth else stock32
            unpaired = " (unpaired)" if name.startswith("sgo") else ""
            note = (f"overhead {sec / ref - 1:+.1%} vs saelib/{best}{unpaired}" if orth
                    else f"{t[name.replace('saelib', 'stock')] / sec:.2f}× its stock fp32 ({best})"
                    if name.startswith("saelib ") else f"{stock32 / sec:.2f}× stock fp32")
            rows.append((d_sae, name, sec, BATCH / sec, note))
        tag = "16k" if d_sae == 16_384 else "4k"
        results[f"sae_step_speedup_{tag}"] = stock32 / t[f"saelib/{best}"]
        results[f"sae_step_speedup_{tag}_fp32"] = stock32 / t["saelib/float32"]
        if have_sparsify:
            sp_best = min(t[f"sparsify/{p}"] for p in precisions)
            results[f"vs_sparsify_{tag}"] = sp_best / t[f"saelib/{best}"]
            results[f"vs_sparsify_{tag}_fp32"] = t["sparsify/float32"] / t["saelib/float32"]
        results[f"sgo_overhead_{tag}_table"] = t["sgo"] / t[f"saelib/{best}"] - 1  # unpaired (sgo_paired below)
        results[f"sgo_m8192_overhead_{tag}_table"] = t["sgo/M8192"] / t[f"saelib/{best}"] - 1
        for family in ("batchtopk", "matryoshka_batchtopk"):
            results[f"{family}_speedup_{tag}"] = t[f"stock {family}"] / t[f"saelib {family}"]
        results[f"ortsae_overhead_{tag}"] = t["ortsae"] / t[f"saelib/{best}"] - 1
        results[f"aux_dead10_overhead_{tag}"] = t["saelib/dead10"] / t[f"saelib/{best}"] - 1
        results[f"row_major_W_enc_overhead_{tag}"] = t["saelib/row-major W_enc"] / t[f"saelib/{best}"] - 1
        del steppers
    print(f"\n{'d_sae':>6}  {'step':<30} {'s/step':>8} {'tokens/s':>9}  note")
    for d_sae, name, sec, tps, note in rows:
        print(f"{d_sae:>6}  {name:<30} {sec:8.3f} {tps:9.0f}  {note}")
    print("\nSGO's overhead paired (the table's sgo rows compare steps minutes apart; this, seconds apart): ", end="")
    paired, *_ = sgo_paired(best, 4 if args.quick else 6)
    results["sgo_overhead_16k"] = paired["sgo"] / paired["saelib"] - 1
    lm = lm_pass(rounds=2 if args.quick else 3, row_major=True)
    print(f"\nLM pass, Gemma 3 270M to block 8, batch 16×128: fp32 {lm['lm_float32_tokens_per_s']:.0f} tokens/s"
          + (f", bf16 {lm['lm_bfloat16_tokens_per_s']:.0f} tokens/s "
             f"(residual rel. error {lm['lm_bf16_residual_rel_error']:.2%})" if native else " (no native bf16)"))
    print("  weights row-major, as TransformerLens leaves them: " + ", ".join(
        f"{p} {lm[f'lm_{p}_row_major_tokens_per_s']:.0f} tokens/s (laid out for F.linear: "
        f"{lm[f'lm_layout_speedup_{p}']:.2f}×, same activations)" for p in precisions))
    results["lm_pass_speedup"] = lm.get("lm_bfloat16_tokens_per_s", lm["lm_float32_tokens_per_s"]) \
        / lm["lm_float32_tokens_per_s"]
    results.update(lm)
    results["bf16_native"] = native
    results["bf16_matmul_speedup"] = bf16_speedup("cpu")  # the timing 'auto' decides by
    results["auto_precision"] = best
    results["freed_memory_kept"] = kept
    results["sparsify_measured"] = have_sparsify
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
