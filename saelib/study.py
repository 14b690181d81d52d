"""Execute a notebook for a params file with papermill and render its HTML report (no input cells).

``python -m saelib.study notebooks/train.ipynb params/default/topk_s0.yaml`` → ``runs/default/topk_s0/train.ipynb`` and
``reports/default/topk_s0.html``. The config is validated before anything is written. This module does not train.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from saelib.config import ConfigError, build_config

log = logging.getLogger(__name__)
REPORTS_DIR = Path("reports")


def run_notebook(notebook: str | Path, params_file: str | Path, reports_dir: Path = REPORTS_DIR,
                 parameters: dict | None = None) -> Path:
    """Run ``notebook`` with ``params_file`` (and any further papermill ``parameters``); return the HTML report
    path: ``reports/<study>/<run>.html`` for train.ipynb, ``<run>.<notebook>.html`` for the others. Raises if the
    notebook fails (its executed copy, with the error, stays in the run folder)."""
    import papermill

    notebook, params_file = Path(notebook), Path(params_file)
    cfg = build_config(params_file=params_file)  # validate before writing anything
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    executed = cfg.run_dir / notebook.name
    start = time.time()
    try:
        papermill.execute_notebook(str(notebook), str(executed), parameters={"params_file": str(params_file), **(parameters or {})},
                                   cwd=str(Path.cwd()), progress_bar=True)
    finally:
        log.info("%s finished in %.0f s", executed, time.time() - start)
    stem = "" if notebook.stem == "train" else f".{notebook.stem}"
    return render_report(executed, reports_dir / cfg.study / f"{cfg.run_name}{stem}.html")


def render_report(executed: Path, html_path: Path) -> Path:
    """nbconvert an executed notebook to HTML without its input cells."""
    from nbconvert import HTMLExporter

    import nbformat

    nb = nbformat.read(str(executed), as_version=4)
    for cell in nb.cells:  # progress bars and library warnings stay in the executed notebook, not the report
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nb)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(body)
    return html_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook")
    parser.add_argument("params_files", nargs="+")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a further notebook parameter (VALUE read as YAML), as with papermill -p")
    args = parser.parse_args(argv)
    import yaml

    parameters = {name: yaml.safe_load(value) for name, value in args.parameter}
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    failed = 0
    runs = [p for p in args.params_files if not Path(p).name.startswith("_")]  # _study.yaml: shared profile
    for params_file in runs:
        try:
            log.info("report: %s", run_notebook(args.notebook, params_file, parameters=parameters))
        except ConfigError as err:
            log.error("%s: %s", params_file, err)
            failed += 1
        except Exception as err:  # papermill's PapermillExecutionError and friends: keep going
            reason = f"{getattr(err, 'ename', type(err).__name__)}: {getattr(err, 'evalue', err)}"
            log.error("%s failed: %s", params_file, reason[:500])
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())


def cell_durations(executed: Path) -> list[tuple[str, float]]:
    """(first source line, seconds) of every code cell papermill timed: the stage timings of a run."""
    import nbformat

    nb = nbformat.read(str(executed), as_version=4)
    out = []
    for cell in nb.cells:
        seconds = cell.get("metadata", {}).get("papermill", {}).get("duration")
        if cell.cell_type == "code" and seconds is not None:
            out.append((cell.source.splitlines()[0] if cell.source else "", float(seconds)))
    return out
