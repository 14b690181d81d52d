"""The study runner: every run of a study (its grid and params files) through the train and evaluate notebooks.

``python -m saelib.study params/<study>`` (or ``make study STUDY=<study>``):

- each run executes ``notebooks/train.ipynb`` then ``notebooks/evaluate.ipynb`` with papermill in its own process
  (``python -m saelib.notebook``), its executed notebooks and a log in the run folder, its reports in
  ``reports/<study>/``; runs share the study's activation caches (filled once, under a lock);
- a notebook that finished for the same configuration, notebook source and parameters is skipped (a stamp in
  ``<run>/.runner/``), so re-running a finished study does nothing and says so; a run that died resumes — training
  restarts from its latest checkpoint, evals reuse the results already written;
- ``jobs`` runs go at once, each with ``cores // jobs`` threads (OpenMP threads of two processes contending for
  the same cores are far slower than one thread each);
- a failed run keeps its executed notebook with the error and does not stop the others; a summary closes the run
  and the exit code is 1 if anything failed.

``params/<study>/_runner.yaml`` (optional) sets ``jobs``, ``eval_profile``, ``evals`` and ``notebooks``; command-line
flags override it. After the runs, study-level notebooks (``study_notebooks``) are executed with ``study_dir`` —
holding only the runs whose last notebook finished (:func:`finished_runs_view`) — then the answers and the index.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import yaml
from tqdm.auto import tqdm

from saelib import run_files
from saelib.config import (GRID_FILE, ConfigError, RunConfig, build_config, grid_runs, precisions_used,
                            with_defaults)
from saelib.evals.results import SEED_SUFFIX
from saelib.sparse_step import auto_held, bf16_native, bf16_speedup, cpu_name

log = logging.getLogger(__name__)

RUNNER_FILE = "_runner.yaml"
STAMP_DIR = run_files.RUNNER_DIR
ARCHIVE_DIR = "runs"
"""``reports/<study>/runs/<run>/``: each finished run's results, archived beside the reports (no weights)."""
BASELINE = "topk"
"""Runs of this configuration go first within each seed (every comparison is against it)."""
DEFAULT_NOTEBOOKS = ("notebooks/train.ipynb", "notebooks/evaluate.ipynb")
#: notebook parameters the runner passes, by notebook stem (train.ipynb only takes params_file)
RUNNER_PARAMETERS = {"evaluate": ("eval_profile", "evals")}


@dataclass
class RunnerSettings:
    jobs: int = 1
    eval_profile: str = "default"
    evals: list[str] | None = None  # None: the evaluate notebook's own list
    notebooks: list[str] = field(default_factory=lambda: list(DEFAULT_NOTEBOOKS))
    study_notebooks: list[str] = field(default_factory=list)
    threads: int | None = None  # per run; None: cores // jobs
    parameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Fixed papermill parameters per notebook stem, e.g. ``{train: {competition_analysis: false}}``."""
    ray: str | None = None
    """Address of a Ray cluster (``auto``, ``host:port``, ``ray://host:port``): each run becomes a Ray task there.
    None: the local process pool (``jobs`` at once)."""
    num_cpus: float | None = None  # per run on Ray; None: ``threads``, else 1
    num_gpus: float | None = None  # per run on Ray; None: 1 for a run on cuda, else 0

    def validate(self) -> None:
        if not isinstance(self.jobs, int) or self.jobs < 1:
            raise ConfigError(f"jobs: expected a positive integer, got {self.jobs!r}")
        if self.eval_profile not in ("smoke", "default"):
            raise ConfigError(f"eval_profile: expected 'smoke' or 'default', got {self.eval_profile!r}")
        for nb in [*self.notebooks, *self.study_notebooks]:
            if not Path(nb).is_file():
                raise ConfigError(f"notebooks: expected existing notebook files, {nb!r} does not exist")
        # entries for notebooks this call does not run are kept, not an error (--notebooks may pick a subset)
        if not isinstance(self.parameters, dict) or not all(isinstance(v, dict) for v in self.parameters.values()):
            raise ConfigError(f"parameters: expected {{notebook stem: {{name: value}}}}, got {self.parameters!r}")
        owned = {name for names in RUNNER_PARAMETERS.values() for name in names}
        clash = {name for values in self.parameters.values() for name in values} & owned
        if clash:
            raise ConfigError(f"parameters: {sorted(clash)} are runner settings (set them as such, so the command "
                              f"line can override them), not fixed notebook parameters")
        for name in ("num_cpus", "num_gpus"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ConfigError(f"{name}: expected a number >= 0 (a Ray task's resources), got {value!r}")
        if self.ray is not None and (not isinstance(self.ray, str) or not self.ray):
            raise ConfigError(f"ray: expected a Ray cluster address such as 'auto' or 'host:6379', got {self.ray!r}")
        if self.evals is not None:
            from saelib.evals.suite import check_eval_names

            try:
                check_eval_names(self.evals)
            except ValueError as err:
                raise ConfigError(str(err)) from None


@dataclass
class Run:
    params_file: Path
    cfg: RunConfig

    @property
    def name(self) -> str:
        return self.cfg.run_name


def load_runner_settings(study_params: Path, overrides: dict[str, Any]) -> RunnerSettings:
    values: dict[str, Any] = {}
    path = study_params / RUNNER_FILE
    if path.exists():
        values = yaml.safe_load(path.read_text()) or {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(values) - set(RunnerSettings.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; expected {sorted(RunnerSettings.__dataclass_fields__)}")
    settings = RunnerSettings(**values)
    settings.validate()
    return settings


def study_runs(study_params: Path) -> list[Run]:
    """Every run of a study (the runs of ``params/<study>/_grid.yaml``, and ``params/<study>/*.yaml`` except
    ``_*.yaml``), configs validated before anything runs. A grid run is addressed as the params file it would be,
    ``params/<study>/<run>.yaml``."""
    study_params = Path(study_params)
    if not study_params.is_dir():
        raise ConfigError(f"study: expected a params folder such as params/default, got {str(study_params)!r}")
    files = sorted({*(p for p in study_params.glob("*.yaml") if not p.name.startswith("_")),
                    *(study_params / f"{name}.yaml" for name in grid_runs(study_params))})
    if not files:
        raise ConfigError(f"study: {study_params} holds no runs (no {GRID_FILE}, no *.yaml not starting with _)")
    runs = [Run(p, build_config(params_file=p)) for p in files]
    # seed by seed, the TopK baseline first: a study stopped part-way holds complete, comparable seeds
    return sorted(runs, key=lambda r: (r.cfg.seed, SEED_SUFFIX.sub("", r.name) != BASELINE, r.name))


def notebook_parameters(notebook: Path, settings: RunnerSettings) -> dict[str, Any]:
    names = RUNNER_PARAMETERS.get(Path(notebook).stem, ())
    params = {"eval_profile": settings.eval_profile, "evals": settings.evals}
    return {**{k: params[k] for k in names if params[k] is not None},
            **settings.parameters.get(Path(notebook).stem, {})}


def stamp(run: Run, notebook: Path, parameters: dict[str, Any]) -> dict[str, Any]:
    """What a finished notebook of a run depended on: its config, the notebook's source and its parameters."""
    source = hashlib.sha256(Path(notebook).read_bytes()).hexdigest()[:16]
    return {"config": run.cfg.to_dict(), "notebook": str(notebook), "notebook_sha256": source,
            "parameters": parameters}


def stamp_path(run: Run, notebook: Path, root: Path | None = None) -> Path:
    """The stamp of a run's notebook in its run folder, or in ``root`` (its archive copy)."""
    return Path(root or run.cfg.run_dir) / STAMP_DIR / f"{Path(notebook).stem}.json"


def is_current(run: Run, notebook: Path, parameters: dict[str, Any], root: Path | None = None) -> bool:
    """The notebook finished for this run's config, source and parameters (a config field the stamp predates counts
    as its default); in the run folder, or in ``root`` (its archive copy)."""
    path = stamp_path(run, notebook, root)
    if not path.exists():
        return False
    recorded = run_files.read_json(path)
    recorded["config"] = with_defaults(recorded.get("config", {}))
    return recorded == json.loads(json.dumps(stamp(run, notebook, parameters)))


def archive_path(run: Run) -> Path:
    """Where a finished run's results are archived: ``reports/<study>/runs/<run>/`` (see :func:`archive_runs`)."""
    from saelib.run_files import REPORTS_DIR

    return REPORTS_DIR / run.cfg.study / ARCHIVE_DIR / run.name


def all_current(run: Run, settings: RunnerSettings, root: Path | None = None) -> bool:
    return all(is_current(run, Path(nb), notebook_parameters(Path(nb), settings), root) for nb in settings.notebooks)


def archived_runs(runs: list[Run], settings: RunnerSettings) -> dict[str, Path]:
    """``{run: archive folder}`` for each run not finished and current here whose archive copy is: its results come
    from the archive (``--archived``)."""
    return {run.name: archive_path(run) for run in runs
            if not all_current(run, settings) and all_current(run, settings, archive_path(run))}


def archive_runs(runs: list[Run], settings: RunnerSettings, skip: set[str] = frozenset()) -> list[str]:
    """Archive every run finished and current here (its results, no weights: :func:`saelib.run_files.archive_run`)
    but those in ``skip`` (archived already by this call); returns their names. The archive is committed with the
    reports, so the study's numbers can be checked, and a study run over several machines reassembled
    (``--archived``)."""
    done = [run for run in runs if run.name not in skip and all_current(run, settings)]
    for run in done:
        run_files.archive_run(run.cfg.run_dir, archive_path(run))
    return [run.name for run in done]


def pending(runs: list[Run], settings: RunnerSettings, archived: dict[str, Path] | None = None
            ) -> list[tuple[Run, list[Path]]]:
    """(run, notebooks still to execute) for every run with something left to do; a run in ``archived`` has
    nothing left."""
    out = []
    for run in runs:
        if run.name in (archived or {}):
            continue
        todo = [Path(nb) for nb in settings.notebooks
                if not is_current(run, Path(nb), notebook_parameters(Path(nb), settings))]
        if todo:
            # a later notebook depends on the earlier ones: once one is redone, so are the ones after it
            first = [Path(nb) for nb in settings.notebooks].index(todo[0])
            out.append((run, [Path(nb) for nb in settings.notebooks[first:]]))
    return out


def execute_notebook(run: Run, notebook: Path, parameters: dict[str, Any], threads: int) -> tuple[bool, str]:
    """One notebook of one run in its own process; (ok, last error line). Log: ``<run>/<notebook>.log``."""
    run.cfg.run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "saelib.notebook", str(notebook), str(run.params_file)]
    for name, value in parameters.items():
        cmd += ["-p", name, json.dumps(value)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    log_path = run.cfg.run_dir / f"{Path(notebook).stem}.log"
    started = time.time()
    with open(log_path, "w") as out:
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if code == 0:
        path = stamp_path(run, notebook)
        path.parent.mkdir(parents=True, exist_ok=True)
        run_files.write_json_atomic(path, stamp(run, notebook, parameters))
        run_files.write_json_atomic(path.with_suffix(".time.json"), {
            "seconds": round(time.time() - started, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "threads": threads, "commit": code_commit(), "machine": machine(run.cfg.device)})
        return True, ""
    lines = [ln for ln in log_path.read_text().splitlines() if "failed" in ln or "Error" in ln]
    return False, (lines[-1] if lines else f"exit code {code}; see {log_path}")[:300]


def machine(device: str = "cpu") -> str:
    """The machine a notebook ran on, in words, recorded beside its time: a study finished over several machines
    states its compute per machine (their speeds differ by 2× and more). The CPU's model name and core count, bf16
    where native, and the GPU where the run used one."""
    words = f"{cpu_name()}, {os.cpu_count()} cores" + (", bf16" if bf16_native("cpu") else "")
    if str(device).startswith("cuda"):
        import torch

        try:
            words += f"; {torch.cuda.get_device_name(torch.device(device))}"
        except (RuntimeError, AssertionError, ValueError):  # no such GPU here: the CPU is still worth recording
            pass
    return words


def code_commit() -> str | None:
    """The git commit the runner's code is checked out at (``+dirty`` when saelib or the notebooks differ from it),
    recorded beside each finished notebook: a study finished over several machines must train on one commit. None
    outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "saelib", "notebooks"], cwd=root,
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def run_notebooks(run: Run, notebooks: list[Path], settings: RunnerSettings, threads: int) -> tuple[str, str, float]:
    """A run's pending notebooks in order: ``(status, last error line, minutes)``. The one piece of work a run is,
    wherever it runs (a local thread, a Ray task)."""
    start = time.time()
    status, error = "done", ""
    for nb in notebooks:  # being redone, this one and the later ones: not finished until they finish again
        stamp_path(run, nb).unlink(missing_ok=True)
    for nb in notebooks:
        ok, error = execute_notebook(run, nb, notebook_parameters(nb, settings), threads)
        if not ok:
            status = f"failed in {nb.stem}"
            break
    return status, error, (time.time() - start) / 60


def finished_cfgs(runs: list[Run], archived: dict[str, Path], settings: RunnerSettings) -> list[dict[str, Any]]:
    """The configs (``cfg.json``, with the precisions used) of the study's finished runs: current here, or
    ``archived``. A half-trained run folder is not a finished run."""
    done = []
    for run in runs:
        folder = archived.get(run.name) or (run.cfg.run_dir if all_current(run, settings) else None)
        if folder is not None and (folder / run_files.RUN_CFG_FILE).exists():
            done.append(run_files.read_json(folder / run_files.RUN_CFG_FILE))
    return done


def auto_words(device: str) -> str:
    """Why ``auto`` resolves as it does on this machine, in words (native bf16, and its measured speed)."""
    speed = bf16_speedup(device)
    return f"native bf16: {bf16_native(device)}" + (f", its matmul {speed:.2f}× fp32's speed" if 0 < speed < math.inf
                                                     else "")


def precision_clash(runs: list[Run], todo: list[Run], archived: dict[str, Path], settings: RunnerSettings
                    ) -> str | None:
    """Why the runs in ``todo`` would not be comparable with the study's finished ones (current here, or
    ``archived``): for runs left at ``auto``, this machine resolves the LM or SAE precision otherwise than the
    finished ``auto`` runs were measured in (a study finished over machines with and without native bf16, or where
    bf16 is native but slower). None when they agree, when no finished run recorded it, or when the finished runs
    already mix (the answers say so). A device this machine lacks raises a ConfigError naming ``device``."""
    done = finished_cfgs(runs, archived, settings)
    try:
        new = [{**run.cfg.to_dict(), **run.cfg.resolved_precisions()} for run in todo]
    except ValueError as err:  # a device this machine lacks, or bf16 forced (or held) where it is not native
        raise ConfigError(str(err)) from err
    for side in ("lm", "sae"):
        before, here = finished_auto(done, side), finished_auto(new, side)
        if len(before) == 1 and set(here) - set(before):
            return (f"{side}_precision: the study's finished runs at 'auto' were measured in {before[0]}, but 'auto' "
                    f"resolves to {', '.join(sorted(set(here) - set(before)))} on this machine "
                    f"({auto_words(todo[0].cfg.device)}), so runs trained here would not be comparable with them; "
                    "run the rest where the precision matches, or pass --mixed-precision to go on anyway")
    return None


def finished_auto(cfgs: list[dict[str, Any]], side: str) -> list[str]:
    """The precisions the ``cfgs`` left at ``auto`` on ``side`` (``lm``, ``sae``) resolved to."""
    return precisions_used([c for c in cfgs if c.get(f"{side}_precision", "auto") == "auto"])[side]


def check_precision(runs: list[Run], todo: list[Run], archived: dict[str, Path], settings: RunnerSettings,
                    mixed_precision: bool) -> str | None:
    """Where :func:`precision_clash` finds one, hold ``auto`` at the precision the study's finished runs used, if
    this machine has it (bf16 native but slower, or the reverse) — the precision to hold, for :func:`auto_held`;
    else refuse (ConfigError), unless ``mixed_precision`` (then a warning, and no hold). Under Ray the runs resolve
    ``auto`` on the workers, so the check is theirs."""
    if settings.ray:
        log.info("study %s: precision check left to the Ray workers' runs (each records what 'auto' resolved to)",
                 runs[0].cfg.study)
        return None
    clash = precision_clash(runs, todo, archived, settings)
    if clash is None:
        return None
    if mixed_precision:
        log.warning("study %s: --mixed-precision: %s", runs[0].cfg.study, clash.split(";")[0])
        return None
    done = finished_cfgs(runs, archived, settings)
    used = set(finished_auto(done, "lm")) | set(finished_auto(done, "sae"))
    if len(used) == 1:
        held = used.pop()
        try:
            with auto_held(held):
                again = precision_clash(runs, todo, archived, settings)
        except ConfigError:  # bf16 held where it is not native: cannot be held here
            again = clash
        if again is None:
            log.warning("study %s: 'auto' held at %s, the precision the study's finished runs used; alone, this "
                        "machine would pick the other (%s)", runs[0].cfg.study, held, auto_words(todo[0].cfg.device))
            return held
    raise ConfigError(clash)


def select_runs(runs: list[Run], only: list[str]) -> list[Run]:
    """The runs whose names match one of the shell patterns ``only`` (``topk_s0``, ``sgo_t0.02_l0*``), in study
    order; a pattern that matches no run is an error (a typo must not run nothing silently)."""
    names = [run.name for run in runs]
    for pattern in only:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ConfigError(f"only: {pattern!r} matches no run of this study; its runs are {', '.join(names)}")
    return [run for run in runs if any(fnmatch.fnmatchcase(run.name, pattern) for pattern in only)]


def warn_stray_runs(study_params: Path, study_dir: Path, runs: list[Run]) -> None:
    """Warn about run folders in ``study_dir`` that no params file declares: the study's reports would read them."""
    stray = sorted(p.name for p in study_dir.glob("*/") if (p / run_files.RUN_CFG_FILE).exists()) if study_dir.is_dir() else []
    stray = [name for name in stray if name not in {r.name for r in runs}]
    if stray:
        log.warning("study %s: %s hold(s) runs with no params file in %s; the compare/competition reports and the "
                    "answers read every run folder, so move them out of %s: %s", runs[0].cfg.study, study_dir,
                    study_params, study_dir, ", ".join(stray))


def execute_runs(study: str, todo: list[tuple[Run, list[Path]]], n_runs: int, settings: RunnerSettings,
                 rows: dict[str, dict[str, Any]]) -> set[str]:
    """Execute ``todo`` (run, notebooks) in a thread pool of ``settings.jobs`` or as Ray tasks, recording each run's
    status, minutes and error in ``rows``. A run that finishes is archived at once (:func:`archive_runs`'s copy), so a
    study stopped part-way — killed, its machine lost — keeps every finished run's results in the archive; returns
    the names of the runs archived."""
    if settings.ray:
        from saelib.ray_runner import RayPool

        pool = RayPool(settings, todo)  # connects and checks the cluster's resources before anything runs
        threads = pool.threads
    else:
        threads = settings.threads or max(1, (os.cpu_count() or 1) // settings.jobs)
        pool = ThreadPoolExecutor(max_workers=settings.jobs)
    log.info("study %s: %d of %d runs to do, %s with %d thread(s) each", study, len(todo), n_runs,
             f"as tasks on the Ray cluster at {settings.ray!r}" if settings.ray else f"{settings.jobs} at a time",
             threads)
    bar = tqdm(total=len(todo), desc=f"study {study}", unit="run")
    lock = threading.Lock()
    archived: set[str] = set()

    def finished(run: Run, status: str, error: str, minutes: float) -> None:
        with lock:
            if status == "done":
                run_files.archive_run(run.cfg.run_dir, archive_path(run))
                archived.add(run.name)
            rows[run.name].update(status=status, minutes=round(minutes, 1), error=error)
            bar.update(1)
            bar.write(f"[{bar.n:>3}/{len(todo)}] {run.name}: {status} in {minutes:.1f} min"
                      + (f" — {error}" if error else ""))

    with pool:
        if settings.ray:
            for run, (status, error, minutes) in pool.results():
                finished(run, status, error, minutes)
        else:
            list(pool.map(lambda item: finished(item[0], *run_notebooks(*item, settings, threads)), todo))
    bar.close()
    return archived


def run_study(study_params: Path, settings: RunnerSettings, reports_only: bool = False,
              only: list[str] | None = None, archived: bool = False, mixed_precision: bool = False) -> pd.DataFrame:
    """Run every pending notebook of a study; returns the summary (one row per run). ``reports_only``: run nothing,
    render the study's reports, answers and index from the runs finished so far (a look at a study part-way).
    ``only``: run just the runs matching these name patterns (the others stay as they are, and the reports still
    read every finished run). ``archived``: a run not finished here whose archive copy (``reports/<study>/runs/``,
    written by an earlier machine for the same config, notebooks and parameters) is current counts as finished, and
    the reports read it from there — a study run over several machines, one part each. A machine whose ``auto``
    precision differs from the finished runs' holds ``auto`` at theirs where it can, else refuses to run more
    (:func:`check_precision`) unless ``mixed_precision``."""
    t_start = time.time()
    runs = study_runs(study_params)
    from_archive = archived_runs(runs, settings) if archived else {}
    todo = pending(runs, settings, from_archive)
    skipped = []
    if only:
        selected = {run.name for run in select_runs(runs, only)}
        skipped = [run for run, _ in todo if run.name not in selected]
        todo = [(run, notebooks) for run, notebooks in todo if run.name in selected]
    held = None
    if todo and not reports_only:
        held = check_precision(runs, [run for run, _ in todo], from_archive, settings, mixed_precision)
    study = runs[0].cfg.study
    study_dir = runs[0].cfg.run_dir.parent
    warn_stray_runs(study_params, study_dir, runs)
    archived_now: set[str] = set()  # runs this call finished and archived
    rows = {run.name: {"run": run.name, "status": "archived" if run.name in from_archive else "current",
                       "minutes": 0.0, "error": ""} for run in runs}
    if from_archive:
        log.info("study %s: %d run(s) finished on another machine, read from %s: %s", study, len(from_archive),
                 archive_path(runs[0]).parent, ", ".join(from_archive))
    for run in skipped:
        rows[run.name]["status"] = "pending (not selected)"
    if reports_only:
        for run, _ in todo:
            rows[run.name]["status"] = "pending"
        log.info("study %s: reports only — %d of %d runs finished and current%s, %d pending (not run)",
                 study, len(runs) - len(todo), len(runs), f" ({len(from_archive)} archived)" if from_archive else "",
                 len(todo))
        todo = []
    elif not todo:
        log.info("study %s: all %d %sruns are finished and current; nothing to do", study,
                 len(runs) - len(skipped), "selected " if only else "")
    else:
        with auto_held(held):  # the notebooks' kernels inherit it
            archived_now = execute_runs(study, todo, len(runs), settings, rows)
    summary = pd.DataFrame(list(rows.values()))
    if todo:
        log.info("study %s: this call took %.1f min wall", study, (time.time() - t_start) / 60)
    archived_here = [*archived_now, *archive_runs(runs, settings, skip=archived_now)]  # the rest finished here before
    if archived_here:
        log.info("study %s: results of %d finished run(s) archived in %s", study, len(archived_here),
                 archive_path(runs[0]).parent)
    timings = study_timings(runs, settings, from_archive)
    if not timings.empty:
        log.info("study %s: %d current notebook runs on record, %.2f h of notebook time (≈ %.2f h wall at %d jobs)", study,
                 len(timings), timings["seconds"].sum() / 3600, timings["seconds"].sum() / 3600 / settings.jobs,
                 settings.jobs)
    render_study_reports(study, study_dir, runs, settings, force=bool(todo) or reports_only, archived=from_archive)
    return summary


def render_study_reports(study: str, study_dir: Path, runs: list[Run], settings: RunnerSettings, force: bool,
                         archived: dict[str, Path] | None = None) -> None:
    """The study notebooks' HTML reports, the answers and the index, from the finished runs only (and the
    ``archived`` ones, from their archive copies); ``force``: even when they exist (something ran, or a look part-way
    was asked for)."""
    from saelib.notebook import failure_reason
    from saelib.run_files import REPORTS_DIR

    last = Path(settings.notebooks[-1])
    unfinished = [run for run in runs if not stamp_path(run, last).exists()]  # finished once, current or not
    with finished_runs_view(study_dir, runs, unfinished, archived) as results_dir:
        for nb in map(Path, settings.study_notebooks):
            if force or not (REPORTS_DIR / study / f"{nb.stem}.html").exists():
                try:
                    log.info("report: %s", run_study_notebook(nb, results_dir, study, executed_dir=study_dir))
                except Exception as err:  # noqa: BLE001 — e.g. no finished run yet: the answers and index still follow
                    (REPORTS_DIR / study / f"{nb.stem}.html").unlink(missing_ok=True)  # never a report of older results
                    log.warning("report %s: none (%s; executed notebook: %s)", nb.stem, failure_reason(err)[:300],
                                study_dir / nb.name)
        if force or not (REPORTS_DIR / study / "index.html").exists():
            from saelib.answers import write_answers
            from saelib.reports import build_index

            try:
                log.info("answers: %s", write_answers(study, results_dir, REPORTS_DIR,
                                                      planned=[run.name for run in runs]))
            except Exception as err:  # noqa: BLE001 — no results yet, no TopK baseline, ...: the index is still built
                (REPORTS_DIR / study / "answers.md").unlink(missing_ok=True)  # never show answers from older results
                log.warning("answers: none (%s: %s)", type(err).__name__, err)

            log.info("index: %s", build_index(study, results_dir, REPORTS_DIR))


@contextlib.contextmanager
def finished_runs_view(study_dir: Path, runs: list[Run], unfinished: list[Run],
                       archived: dict[str, Path] | None = None) -> Iterator[Path]:
    """``study_dir`` itself, or — when some runs are unfinished (running, failed, never run to the end) but already
    hold files (train writes its metrics, evaluate each eval's results as it ends), or some come from their archive
    copies (``archived``: run name → folder) — a temporary folder of the same name linking only the finished runs
    and the archived ones, so the reports never count half-evaluated runs. Removed on exit."""
    archived = archived or {}
    started = {run.name for run in unfinished if run.cfg.run_dir.exists()}
    if not started and not archived:
        yield study_dir
        return
    import tempfile

    parent = Path(tempfile.mkdtemp(prefix=".finished-runs-", dir=study_dir.parent))  # one per call: calls may overlap
    view = parent / study_dir.name
    view.mkdir()
    try:
        for run in runs:
            if run.name in archived:
                (view / run.name).symlink_to(Path(archived[run.name]).resolve(), target_is_directory=True)
            elif run.name not in started and run.cfg.run_dir.exists():
                (view / run.name).symlink_to(run.cfg.run_dir.resolve(), target_is_directory=True)
        left_out = started - set(archived)
        if left_out:
            log.info("study %s: the reports leave out %d unfinished run(s) that already hold files: %s",
                     study_dir.name, len(left_out), ", ".join(sorted(left_out)))
        yield view
    finally:
        shutil.rmtree(parent, ignore_errors=True)  # the links only, never the runs they point to


def study_timings(runs: list[Run], settings: RunnerSettings, archived: dict[str, Path] | None = None) -> pd.DataFrame:
    """Seconds each finished, current notebook of each run took (``<run>/.runner/<notebook>.time.json``; for an
    ``archived`` run, its archive copy's), kept across calls, so a study finished over several sessions or machines
    still has its compute on record."""
    rows = []
    for run in runs:
        root = (archived or {}).get(run.name)
        for nb in map(Path, settings.notebooks):
            path = stamp_path(run, nb, root).with_suffix(".time.json")
            if path.exists() and is_current(run, nb, notebook_parameters(nb, settings), root):
                rows.append({"run": run.name, "notebook": nb.stem, **run_files.read_json(path)})
    return pd.DataFrame(rows, columns=["run", "notebook", "seconds", "finished", "threads"])


def run_study_notebook(notebook: Path, study_dir: Path, study: str, executed_dir: Path | None = None) -> Path:
    """A study-level notebook (compare, competition) over ``study_dir`` → ``reports/<study>/<notebook>.html``; the
    executed notebook is kept in ``executed_dir`` (default ``study_dir``)."""
    from saelib.notebook import execute, render_report
    from saelib.run_files import REPORTS_DIR

    executed = Path(executed_dir or study_dir) / notebook.name
    execute(notebook, executed, {"study_dir": str(study_dir)})
    return render_report(executed, REPORTS_DIR / study / f"{notebook.stem}.html")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", help="params folder of the study, e.g. params/default")
    parser.add_argument("--jobs", type=int, help="runs at once (default: _runner.yaml, else 1)")
    parser.add_argument("--eval-profile", choices=("smoke", "default"))
    parser.add_argument("--evals", nargs="+", help="evals to run (default: the evaluate notebook's list)")
    parser.add_argument("--notebooks", nargs="+", help="per-run notebooks, in order")
    parser.add_argument("--ray", metavar="ADDRESS", default=os.environ.get("RAY_ADDRESS") or None,
                        help="run each run as a task on the Ray cluster at ADDRESS ('auto', 'host:6379'; default: "
                             "$RAY_ADDRESS if set, else the local process pool); runs/ and the caches must be on a "
                             "filesystem every node shares")
    parser.add_argument("--only", nargs="+", metavar="PATTERN",
                        help="run only the runs whose names match these shell patterns, e.g. topk_s0 'sgo_t0.02_l0*' "
                             "(the reports still read every finished run)")
    parser.add_argument("--reports-only", action="store_true",
                        help="run nothing; render the reports, answers and index from the runs finished so far")
    parser.add_argument("--archived", action="store_true",
                        help="count a run not finished here as finished when its archived results (reports/<study>/"
                             "runs/<run>/, committed by another machine) are current, and report it from there")
    parser.add_argument("--mixed-precision", action="store_true",
                        help="run even where 'auto' resolves to another LM/SAE precision than the finished runs used "
                             "(refused otherwise: the runs would not be comparable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        settings = load_runner_settings(Path(args.study), {
            "jobs": args.jobs, "eval_profile": args.eval_profile, "evals": args.evals, "notebooks": args.notebooks,
            "ray": args.ray})
        summary = run_study(Path(args.study), settings, reports_only=args.reports_only, only=args.only,
                            archived=args.archived, mixed_precision=args.mixed_precision)
    except ConfigError as err:
        log.error("%s", err)
        return 2
    print(summary.to_string(index=False))
    return 1 if summary["status"].str.startswith("failed").any() else 0


if __name__ == "__main__":
    sys.exit(main())
