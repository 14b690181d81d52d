"""How much of a metric's spread is the eval's own sampling, and how much is training? One command for a set of runs.

    .venv/bin/python -m saelib.resample runs/<study>/topk_s0 runs/<study>/topk_s1 runs/<study>/topk_s2 \\
        --evals absorption sparse_probing --eval-seeds 42 1 2

Each run's SAE is scored under every eval seed (absorption: its vocabulary sample and probe split; sparse probing:
its train/test split; the unlearning proxy: its scored tokens). Every (run, eval, seed) is a derived run folder
``<run>/resample/<eval>_seed<seed>`` (the run's cfg.json and a link to its SAE), so results are stored and reused
like any run's. The table (``noise.csv`` beside the first run) gives per headline metric the training and eval
standard deviations (``saelib.stats.noise_components``): enlarge whichever dominates before adding seeds.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from saelib import run_files
from saelib.evals.results import HEADLINE, run_rows

RESAMPLE_DIR = "resample"
#: The settings field that seeds each eval's sampling.
SEED_FIELD = {"absorption": "seed", "sparse_probing": "random_seed", "unlearning_proxy": "seed"}

log = logging.getLogger(__name__)


def resampled_run(run_dir: Path, eval_name: str, seed: int) -> Path:
    """The derived run folder scoring ``run_dir``'s SAE under eval seed ``seed`` (created on first use)."""
    run_dir = Path(run_dir)
    if not (run_dir / run_files.SAE_DIR / "cfg.json").exists():
        raise FileNotFoundError(f"run_dir: expected a finished run (an SAE in {run_dir / run_files.SAE_DIR})")
    folder = run_dir / RESAMPLE_DIR / f"{eval_name}_seed{seed}"
    return run_files.write_derived_run(
        folder, run_files.read_json(run_dir / run_files.RUN_CFG_FILE),
        lambda sae_dir: os.symlink(os.path.relpath(run_dir / run_files.SAE_DIR, sae_dir.parent), sae_dir))


def resample(run_dirs: list[Path], model, evals: list[str], seeds: list[int], smoke: bool = False) -> pd.DataFrame:
    """Score every run under every eval seed (stored results reused); the headline values as a table with columns
    ``run``, ``eval``, ``metric``, ``train_seed``, ``eval_seed``, ``value``."""
    from saelib.evals import evaluate_run

    check_request(evals, seeds)
    check_runs(run_dirs)
    rows = []
    jobs = [(Path(r), e, s) for r in run_dirs for e in evals for s in seeds]
    for run_dir, eval_name, seed in tqdm(jobs, desc="resampled evals", unit="eval"):
        folder = resampled_run(run_dir, eval_name, seed)
        status = evaluate_run(folder, model, [eval_name], {eval_name: {SEED_FIELD[eval_name]: seed}}, smoke=smoke)
        if (status["status"] == "failed").any():
            raise RuntimeError(f"{folder}: {eval_name} failed: {status['message'].iloc[0]}")
        train_seed = run_files.read_json(run_dir / run_files.RUN_CFG_FILE)["seed"]
        for row in run_rows(folder):
            key = f"{row['eval']}/{row['metric']}"
            if key in HEADLINE and row["eval"] == eval_name:
                rows.append({"run": run_dir.name, "eval": eval_name, "metric": HEADLINE[key][0],
                             "train_seed": train_seed, "eval_seed": seed, "value": row["value"]})
    return pd.DataFrame(rows, columns=["run", "eval", "metric", "train_seed", "eval_seed", "value"])


def check_request(evals: list[str], seeds: list[int]) -> None:
    bad = [e for e in evals if e not in SEED_FIELD]
    if bad:
        raise ValueError(f"evals: expected evals with a sampling seed {sorted(SEED_FIELD)}, got {bad}")
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: expected at least two distinct eval seeds, got {seeds}")


def check_runs(run_dirs: list[Path]) -> None:
    """The runs must be one configuration trained under distinct seeds (the spread between them is training's)."""
    cfgs = [run_files.read_json(Path(r) / run_files.RUN_CFG_FILE) for r in run_dirs]
    seeds = [c.get("seed") for c in cfgs]
    same = [{k: v for k, v in c.items() if k not in ("seed", "run_name")} for c in cfgs]
    if len(set(seeds)) != len(seeds) or any(c != same[0] for c in same):
        raise ValueError(f"run_dirs: expected runs of one configuration under distinct seeds, got seeds {seeds} "
                         f"from {[str(r) for r in run_dirs]}")


def noise_table(values: pd.DataFrame) -> pd.DataFrame:
    """Per metric: training and eval standard deviations and the eval's share of the variance."""
    from saelib.stats import noise_components

    rows = [{"metric": metric, **noise_components(part)} for metric, part in values.groupby("metric", sort=False)]
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    from saelib.config import config_of_run
    from saelib.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", type=Path, nargs="+", help="finished runs of one configuration, other seeds")
    parser.add_argument("--evals", nargs="+", default=["absorption", "sparse_probing"],
                        help=f"evals to resample, among {sorted(SEED_FIELD)} (default: absorption sparse_probing)")
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[42, 1, 2],
                        help="eval seeds (default 42 1 2; 42 is every eval's default seed)")
    parser.add_argument("--smoke", action="store_true", help="the evals' fast smoke settings (for tests)")
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.run_dirs if not (r / run_files.RUN_CFG_FILE).exists()]
    if missing:
        parser.error(f"run_dirs: expected run folders holding {run_files.RUN_CFG_FILE}, got {missing}")
    try:
        check_request(args.evals, args.eval_seeds)
        check_runs(args.run_dirs)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = config_of_run(args.run_dirs[0])
    values = resample(args.run_dirs, load_model(cfg.model_name, device=cfg.device), args.evals, args.eval_seeds,
                      smoke=args.smoke)
    table = noise_table(values)
    run_files.write_text_atomic(args.run_dirs[0].parent / "noise.csv", table.to_csv(index=False))
    with pd.option_context("display.width", 250, "display.max_columns", 50):
        print(table.round(5).to_string(index=False))
    return table


if __name__ == "__main__":
    main()
