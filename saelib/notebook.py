"""Execute a notebook for a params file with papermill and render its HTML report (no input cells).

``python -m saelib.notebook notebooks/train.ipynb params/default/topk_s0.yaml`` → ``runs/default/topk_s0/train.ipynb`` and
``reports/default/topk_s0.html``. The config is validated before anything is written. This module does not train.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from saelib.config import ConfigError, build_config, field_names
from saelib.run_files import REPORTS_DIR
from saelib.sparse_step import require_device

log = logging.getLogger(__name__)


def run_notebook(notebook: str | Path, params_file: str | Path, reports_dir: Path = REPORTS_DIR,
                 parameters: dict | None = None) -> Path:
    """Run ``notebook`` with ``params_file`` (and any further papermill ``parameters``); return the HTML report
    path: ``reports/<study>/<run>.html`` for train.ipynb, ``<run>.<notebook>.html`` for the others. Raises if the
    notebook fails (its executed copy, with the error, stays in the run folder)."""
    notebook, params_file = Path(notebook), Path(params_file)
    # validate before writing anything; -p values that are config fields (run_name, runs_dir, ...) name the run
    cfg = build_config({k: v for k, v in (parameters or {}).items() if k in field_names()}, params_file=params_file)
    try:
        require_device(cfg.device)  # a GPU profile is a valid declaration anywhere, but runs only where a GPU is
    except ValueError as err:
        raise ConfigError(str(err)) from None
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    executed = cfg.run_dir / notebook.name
    start = time.time()
    try:
        execute(notebook, executed, {"params_file": str(params_file), **(parameters or {})}, progress_bar=True)
    finally:
        log.info("%s finished in %.0f s", executed, time.time() - start)
    stem = "" if notebook.stem == "train" else f".{notebook.stem}"
    return render_report(executed, reports_dir / cfg.study / f"{cfg.run_name}{stem}.html")


def execute(notebook: str | Path, executed: str | Path, parameters: dict, progress_bar: bool = False) -> None:
    """papermill ``notebook`` → ``executed`` with ``parameters``, in the current directory, on a kernel reached over
    Unix sockets (:func:`ipc_kernel_manager`), so that notebooks started side by side by the runner cannot collide."""
    import os

    import papermill

    extra = {} if os.name == "nt" else {"kernel_manager_class": ipc_kernel_manager()}  # no Unix sockets on Windows
    papermill.execute_notebook(str(notebook), str(executed), parameters=parameters, cwd=str(Path.cwd()),
                               progress_bar=progress_bar, **extra)


def ipc_kernel_manager() -> type:
    """jupyter_client's AsyncKernelManager on the ``ipc`` transport with its sockets in a private temporary directory.

    Over TCP the manager picks free ports by binding and releasing them, then the kernel binds them a few seconds
    later; a second kernel (or any client socket) started in that window can take one, and the kernel dies with
    "Kernel died before replying to kernel_info" (1 in 120 papermill runs at 6 at a time here). Unix socket paths
    are private to the kernel, so there is nothing to race for."""
    import shutil
    import tempfile

    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class IPCKernelManager(AsyncKernelManager):
        @default("transport")
        def _transport_default(self) -> str:
            return "ipc"

        @default("ip")
        def _ip_default(self) -> str:  # absolute and short: a Unix socket path holds at most 107 bytes
            short = None if len(tempfile.gettempdir()) < 64 else "/tmp"
            return str(Path(tempfile.mkdtemp(prefix="saelib-kernel-", dir=short)) / "ipc")

        def cleanup_ipc_files(self) -> None:
            super().cleanup_ipc_files()
            folder = Path(self.ip).parent
            if folder.name.startswith("saelib-kernel-"):
                shutil.rmtree(folder, ignore_errors=True)

    return IPCKernelManager


def failure_reason(err: Exception) -> str:
    """``Name: message`` of a failure; for papermill's PapermillExecutionError, the notebook's own exception."""
    return f"{getattr(err, 'ename', type(err).__name__)}: {getattr(err, 'evalue', err)}"


def render_report(executed: Path, html_path: Path) -> Path:
    """nbconvert an executed notebook to HTML without its input cells; plotly.js and the notebook CSS come from the
    copies shared by the reports (:func:`saelib.plots.offline_report`)."""
    from nbconvert import HTMLExporter

    import nbformat

    from saelib import plots

    nb = nbformat.read(str(executed), as_version=4)
    for cell in nb.cells:  # progress bars and library warnings stay in the executed notebook, not the report
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nb)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(plots.offline_report(body, html_path))
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
            log.error("%s failed: %s", params_file, failure_reason(err)[:500])
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
