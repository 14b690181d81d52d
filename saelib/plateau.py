"""The headline metrics against training tokens, from the checkpoints of one run: where do they stop moving?

    .venv/bin/python -m saelib.plateau runs/plateau/topk16k_s0 --evals core absorption sparse_probing

Each checkpoint of the run (``<run>/checkpoints/<tokens>``) becomes a point folder ``<run>/plateau/t<tokens>`` (tokens
zero-padded to 10 digits, so folders sort by tokens) holding
the run's ``cfg.json`` and the SAE as it stood then, finished as training finishes (``saelib.train.checkpoint_sae``),
so the evals treat it like any run folder; the run's own final SAE is the last point. The learning rate is constant
after warm-up (no decay), so a checkpoint at T tokens is the run that would have stopped at T. Points already
exported and results already stored are reused: an interrupted call resumes. The table is written to
``<run>/plateau/plateau.csv``, with each metric's change from each point to the last.
"""
from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from saelib import run_files
from saelib.evals.results import HEADLINE, run_rows

PLATEAU_DIR = "plateau"
POINT_PREFIX = "t"
METRICS = [
    "core/reconstruction_quality.explained_variance",
    "core/model_performance_preservation.ce_loss_score",
    "core/sparsity.l0",
    "absorption/mean.mean_absorption_fraction_score",
    "absorption/mean.mean_full_absorption_score",
    "absorption/firing.mean_main_silent_rate",
    "sparse_probing/sae.sae_top_1_test_accuracy",
]

log = logging.getLogger(__name__)


def point_dir(run_dir: Path, tokens: int) -> Path:
    return Path(run_dir) / PLATEAU_DIR / f"{POINT_PREFIX}{tokens:010d}"


def nearest_checkpoints(found: list[tuple[int, Path]], tokens: list[int]) -> list[tuple[int, Path]]:
    """For each asked token count, the checkpoint nearest to it (each at most once, by tokens)."""
    if not tokens:
        return found
    return sorted({min(found, key=lambda c: abs(c[0] - t)) for t in tokens}) if found else []


def export_points(run_dir: Path, cache, tokens: list[int] | None = None) -> list[Path]:
    """One point folder per checkpoint (or per checkpoint nearest to each of ``tokens``), plus the finished SAE
    (already exported points are kept)."""
    from saelib.config import config_of_run
    from saelib.train import checkpoint_sae

    run_dir = Path(run_dir)
    run_cfg = run_files.read_json(run_dir / run_files.RUN_CFG_FILE)
    if not (run_dir / run_files.SAE_DIR / "cfg.json").exists():
        raise FileNotFoundError(f"run_dir: expected a finished run (an SAE in {run_dir / run_files.SAE_DIR})")
    cfg = config_of_run(run_dir)
    points = []
    for seen, ckpt in tqdm(nearest_checkpoints(run_files.checkpoints(run_dir), tokens or []), desc="export checkpoints",
                           unit="ckpt"):
        points.append(run_files.write_derived_run(
            point_dir(run_dir, seen), {**run_cfg, "training_tokens": seen, "n_checkpoints": 0},
            lambda sae_dir, ckpt=ckpt: checkpoint_sae(cfg, cache, ckpt, sae_dir)))
    points.append(run_files.write_derived_run(point_dir(run_dir, run_cfg["training_tokens"]), run_cfg,
                                              lambda sae_dir: shutil.copytree(run_dir / run_files.SAE_DIR, sae_dir)))
    return points


def evaluate_points(points: list[Path], model, evals, smoke: bool = False) -> pd.DataFrame:
    """``evaluate_run`` on every point (stored results reused); the status rows, with the point's tokens."""
    from saelib.evals import evaluate_run

    frames = []
    for point in tqdm(points, desc="evaluate checkpoints", unit="point"):
        status = evaluate_run(point, model, evals, smoke=smoke)
        frames.append(status.assign(tokens=tokens_of(point)))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def tokens_of(point: Path) -> int:
    return int(Path(point).name.removeprefix(POINT_PREFIX))


def plateau_table(run_dir: Path, metrics: list[str] = METRICS) -> pd.DataFrame:
    """One row per point (by training tokens), one column per headline metric that some point has, then one
    ``Δ to last`` column per metric: the last point's value minus this point's."""
    folder = Path(run_dir) / PLATEAU_DIR
    points = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(POINT_PREFIX)
                    and not p.name.endswith(".partial")) if folder.is_dir() else []
    records = []
    for point in points:
        values = {f"{r['eval']}/{r['metric']}": r["value"] for r in run_rows(point)}
        records.append({"tokens": tokens_of(point), **{m: values.get(m) for m in metrics}})
    table = pd.DataFrame(records, columns=["tokens", *metrics]).dropna(axis=1, how="all")
    present = [m for m in metrics if m in table]
    table = table.rename(columns={m: HEADLINE[m][0] for m in present})
    for m in present:
        name = HEADLINE[m][0]
        table[f"Δ to last: {name}"] = table[name].iloc[-1] - table[name] if len(table) else []
    return table


def main(argv: list[str] | None = None) -> pd.DataFrame:
    from saelib.activations import training_activations
    from saelib.config import config_of_run
    from saelib.evals.common import EvalError
    from saelib.evals.suite import check_eval_names
    from saelib.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished run folder with checkpoints (runs/<study>/<run>)")
    parser.add_argument("--evals", nargs="+", default=["core", "absorption", "sparse_probing"],
                        help="evals run at every point (default: core absorption sparse_probing)")
    parser.add_argument("--tokens", type=int, nargs="+", default=None,
                        help="evaluate only the checkpoints nearest to these token counts (default: every one)")
    parser.add_argument("--smoke", action="store_true", help="the evals' fast smoke settings (for tests)")
    args = parser.parse_args(argv)
    try:
        evals = check_eval_names(args.evals)
    except EvalError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_cfg = run_files.read_json(args.run_dir / run_files.RUN_CFG_FILE) \
        if (args.run_dir / run_files.RUN_CFG_FILE).exists() else None
    if run_cfg is None:
        parser.error(f"run_dir: expected a run folder holding {run_files.RUN_CFG_FILE}, got {args.run_dir}")
    cfg = config_of_run(args.run_dir)
    lm = load_model(cfg.model_name, device=cfg.device, precision=run_cfg.get("lm_precision_used", "float32"))
    # the run's own source (its cache, or its stream) gives the centring mean training folded
    points = export_points(args.run_dir, training_activations(cfg, lm), args.tokens)
    model = lm if str(lm.cfg.dtype) == "torch.float32" else load_model(cfg.model_name, device=cfg.device)
    del lm
    status = evaluate_points(points, model, evals, smoke=args.smoke)
    failed = status[status["status"] == "failed"]
    if len(failed):
        print(failed.to_string(index=False))
    table = plateau_table(args.run_dir)
    run_files.write_text_atomic(args.run_dir / PLATEAU_DIR / "plateau.csv", table.to_csv(index=False))
    with pd.option_context("display.width", 250, "display.max_columns", 50):
        print(table.round(4).to_string(index=False))
    return table


if __name__ == "__main__":
    main()
