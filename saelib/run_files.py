"""Run folders and their artifact names: ``runs/<study>/<run>/`` holds cfg.json, sae/, checkpoints/, history.jsonl,
metrics.json and the executed notebook. Readers here return plain Python / pandas objects. (Named so as not to
shadow the standard library's ``io``.)

This module trains and evaluates nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

#: Where rendered reports go: ``reports/<study>/``.
REPORTS_DIR = Path("reports")
RUN_CFG_FILE = "cfg.json"
SAE_DIR = "sae"
CHECKPOINTS_DIR = "checkpoints"
HISTORY_FILE = "history.jsonl"
METRICS_FILE = "metrics.json"
TRAINER_STATE_FILE = "trainer_state.pt"
COMPETITION_FILE = "competition.safetensors"


#: Everything a run writes; cleared when a run folder is reused for a different configuration.
RUN_ARTIFACTS = (SAE_DIR, CHECKPOINTS_DIR, HISTORY_FILE, METRICS_FILE, "evals")


def prepare_run_dir(run_dir: Path, cfg_dict: dict, training_key: dict) -> bool:
    """Create ``run_dir`` and write its cfg.json. A folder holding a finished SAE of a different training
    configuration is refused (``FileExistsError``: it is never replaced); an unfinished one's artifacts are removed
    (a resume would mix two runs). Returns True if it was reset."""
    import shutil

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    differ = changed_fields(run_dir, training_key)
    if differ and (run_dir / SAE_DIR).is_dir():
        raise FileExistsError(f"run_dir: {run_dir} holds a finished SAE of another configuration (differs in "
                              f"{', '.join(sorted(differ))}); use another run folder or delete it")
    for name in RUN_ARTIFACTS if differ else ():
        target = run_dir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    write_json_atomic(run_dir / RUN_CFG_FILE, cfg_dict)
    return bool(differ)


def changed_fields(run_dir: Path, training_key: dict) -> dict[str, tuple[Any, Any]]:
    """``{field: (recorded, new)}`` for each training field that differs from the run folder's cfg.json (empty when
    the folder records none). A field the record predates counts as its default."""
    from saelib.config import with_defaults

    cfg_path = Path(run_dir) / RUN_CFG_FILE
    old = with_defaults(read_json(cfg_path)) if cfg_path.exists() else None
    return {} if old is None else {k: (old.get(k), v) for k, v in training_key.items() if old.get(k) != v}


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``(training samples, folder)`` of every checkpoint with a complete trainer state, by samples."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    found = [(int(p.name), p) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
    return sorted((n, p) for n, p in found if (p / TRAINER_STATE_FILE).exists())


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the most training samples that has a complete trainer state, or None."""
    done = checkpoints(run_dir)
    return done[-1][1] if done else None


def read_history(run_dir: Path) -> pd.DataFrame:
    """The training history as a DataFrame, one row per logged step."""
    path = Path(run_dir) / HISTORY_FILE
    if not path.exists():
        return pd.DataFrame()
    return pd.DataFrame([json.loads(line) for line in path.read_text().splitlines() if line.strip()])


def truncate_history(path: Path, last_step: int) -> None:
    """Drop history rows after ``last_step`` (they belong to the part of a run that is being redone)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    write_text_atomic(path, "".join(line + "\n" for line in keep))


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(Path(path), json.dumps(data, indent=2, default=_jsonable) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write(path: Path, write, keep_suffix: bool = False) -> Path:
    """``write(tmp)`` to a temporary file of its own beside ``path``, then rename it over ``path``: a reader never
    sees half a file, and concurrent writers never share a temporary. The temporary is removed if ``write`` fails.
    Its name ends in ``.partial``, so globs such as ``evals/*.json`` never pick it up; ``keep_suffix`` (for writers
    that choose the format or add a suffix by the name: ``np.save``, ``np.savez``, ``savefig``) ends it in
    ``.partial<suffix>`` instead."""
    import uuid

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial" + (path.suffix if keep_suffix else ""))
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_derived_run(folder: Path, run_cfg: dict, write_sae) -> Path:
    """A run folder derived from a run (a checkpoint of it, or its SAE under other eval settings) that the evals
    treat like any run: ``run_cfg`` as its cfg.json and ``write_sae(folder / "sae")`` for its SAE. Written under a
    ``.partial`` name and renamed when complete; a complete folder is kept as it is."""
    folder = Path(folder)
    if (folder / RUN_CFG_FILE).exists():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write_sae(partial / SAE_DIR)
    write_json_atomic(partial / RUN_CFG_FILE, run_cfg)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


#: What a run's archive copy holds (no weights: those stay in ``runs/``): everything the study's reports read.
RUNNER_DIR = ".runner"
"""A run's stamps and times from the study runner (``<notebook>.json``, ``<notebook>.time.json``)."""
ARCHIVED = (RUN_CFG_FILE, METRICS_FILE, HISTORY_FILE, "evals", RUNNER_DIR)
SAE_DIGEST_FILE = "sae_digest.json"
ARCHIVE_MAX_DETAILS = 1000
"""An archived eval result keeps its ``eval_result_details`` up to this many rows (per-letter absorption, per-task
probing); longer ones are per-latent statistics no report reads, dropped from the copy (their count recorded)."""


def sae_digest(run_dir: Path) -> dict[str, str] | None:
    """``{tensor name: sha256 of its dtype, shape and bytes}`` of a run's saved SAE: from ``sae/*.safetensors`` when
    the weights are here, else from the run's archived ``sae_digest.json``; None with neither. Two SAEs are equal
    tensor for tensor exactly when their digests are equal."""
    import hashlib

    run_dir = Path(run_dir)
    files = sorted((run_dir / SAE_DIR).glob("*.safetensors"))
    if not files:
        recorded = run_dir / SAE_DIGEST_FILE
        return read_json(recorded) if recorded.exists() else None
    import torch
    from safetensors.torch import load_file

    digest = {}
    for f in files:
        for name, tensor in load_file(f).items():
            h = hashlib.sha256(f"{tensor.dtype} {tuple(tensor.shape)}".encode())
            h.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            digest[name] = h.hexdigest()
    return digest


def archive_run(run_dir: Path, dest: Path) -> Path:
    """Copy a finished run's results — :data:`ARCHIVED` (per-latent eval details dropped, see
    :data:`ARCHIVE_MAX_DETAILS`) and its SAE's digest, not its weights — to ``dest`` (e.g.
    ``reports/<study>/runs/<run>/``, committed, so a study finished over several machines can be reassembled and
    checked). Built under a ``.partial`` name and swapped in whole: ``dest`` is never half old, half new."""
    run_dir, dest = Path(run_dir), Path(dest)
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        for name in ARCHIVED:
            src = run_dir / name
            if src.is_dir():
                shutil.copytree(src, partial / name, ignore=shutil.ignore_patterns("*.partial*"))
            elif src.exists():
                shutil.copy2(src, partial / name)
        for path in sorted((partial / "evals").glob("*.json")):  # per-latent rows: 4.5 MB a core eval at 16k
            result = read_json(path)
            rows = result.get("eval_result_details") if isinstance(result, dict) else None
            if isinstance(rows, list) and len(rows) > ARCHIVE_MAX_DETAILS:
                result["eval_result_details"] = []
                result["saelib_archive"] = {"eval_result_details_dropped": len(rows), "kept_in": f"{run_dir.name}/evals"}
                write_json_atomic(path, result)
        digest = sae_digest(run_dir)
        if digest is not None:
            write_json_atomic(partial / SAE_DIGEST_FILE, digest)
        old = dest.with_name(dest.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            dest.rename(old)
        partial.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return dest


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def study_metrics(study_dir: Path) -> pd.DataFrame:
    """One row per finished run of a study: its identifying config fields and its metrics.json."""
    rows = []
    for run_dir in sorted(Path(study_dir).iterdir()):
        if not (run_dir / METRICS_FILE).exists() or not (run_dir / RUN_CFG_FILE).exists():
            continue
        cfg = read_json(run_dir / RUN_CFG_FILE)
        rows.append({"run": run_dir.name, "architecture": cfg["architecture"],
                     "tau": cfg.get("competition_threshold"), "lambda": cfg.get("orth_pen"), "seed": cfg["seed"],
                     **read_json(run_dir / METRICS_FILE)})
    return pd.DataFrame(rows)


def repo_path(path: str | Path) -> Path:
    """``path`` as given if it exists (or is absolute), else relative to the repository root when it exists there:
    notebooks run with their own folder as working directory under nbval and from the root under papermill."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    alt = Path(__file__).resolve().parents[1] / p
    return alt if alt.exists() else p
