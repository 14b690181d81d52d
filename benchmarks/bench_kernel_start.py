"""Notebooks started side by side: papermill's default TCP kernels next to saelib's Unix-socket (ipc) kernels.

    .venv/bin/python benchmarks/bench_kernel_start.py [--runs 120] [--at-once 6]

The study runner executes notebooks two (or more) at a time. Over TCP, jupyter_client picks free ports by binding and
releasing them and the kernel binds them seconds later; a kernel or client socket started in between can take one,
and papermill fails with "Kernel died before replying to kernel_info" (CI lost a run of the tiny study to it).
``saelib.notebook.execute`` runs kernels over the ``ipc`` transport instead. This script executes a two-cell notebook
``--runs`` times per transport, ``--at-once`` processes at a time, the two transports interleaved in one pool so that
machine load hits both alike, and prints for each: notebooks failed, kernels that printed a traceback (a socket that
could not bind, another kernel's messages received) though papermill finished, and seconds per notebook.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_notebook


def one(job: tuple[str, int, str]) -> tuple[str, float, str, bool]:
    """(transport, seconds, papermill's error or "", whether the kernel printed a traceback on its stderr)."""
    transport, i, folder = job
    import papermill

    from saelib.notebook import ipc_kernel_manager

    extra = {"kernel_manager_class": ipc_kernel_manager()} if transport == "ipc" else {}
    err_path = f"{folder}/{transport}{i}.stderr"
    saved = os.dup(2)  # the kernel inherits this worker's stderr: give it a file of its own
    with open(err_path, "w") as err_file:
        os.dup2(err_file.fileno(), 2)
        start = time.perf_counter()
        try:
            papermill.execute_notebook(f"{folder}/in.ipynb", f"{folder}/{transport}{i}.ipynb", parameters={"x": i},
                                       progress_bar=False, log_output=False, **extra)
            error = ""
        except Exception as err:  # noqa: BLE001 — counted, not raised
            error = f"{type(err).__name__}: {err}"[:120]
        finally:
            took = time.perf_counter() - start
            os.dup2(saved, 2)
            os.close(saved)
    # e.g. "Address already in use" on a port, or "DELIM not in msg_list" from another kernel's messages
    return transport, took, error, "Traceback" in Path(err_path).read_text()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=120, help="notebooks per transport")
    parser.add_argument("--at-once", type=int, default=6, help="processes at a time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        nb = new_notebook(cells=[new_code_cell("x = 0", metadata={"tags": ["parameters"]}),
                                 new_code_cell("import json\nfrom ipykernel import get_connection_info\n"
                                               "print(x, json.loads(get_connection_info())['transport'])")],
                          metadata={"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}})
        nbformat.write(nb, f"{folder}/in.ipynb")
        jobs = [(t, i, folder) for i in range(args.runs) for t in ("tcp", "ipc")]
        with ProcessPoolExecutor(args.at_once) as pool:
            results = list(pool.map(one, jobs))
        left = sorted(p.name for p in Path(tempfile.gettempdir()).glob("saelib-kernel-*"))
    failures, seconds, errors, tracebacks = Counter(), Counter(), {}, Counter()
    for transport, took, error, traceback in results:
        seconds[transport] += took
        tracebacks[transport] += traceback
        if error:
            failures[transport] += 1
            errors.setdefault(transport, error)
    print(f"{args.runs} notebooks per transport, {args.at_once} at a time, interleaved")
    for transport in ("tcp", "ipc"):
        print(f"  {transport}: {failures[transport]:>3} failed ({100 * failures[transport] / args.runs:.1f} %), "
              f"{tracebacks[transport]:>3} kernels with a traceback on stderr, "
              f"{seconds[transport] / args.runs:.2f} s per notebook" + (f" — first: {errors[transport]}" if transport in errors else ""))
    print(f"  ratio of seconds per notebook ipc/tcp: {seconds['ipc'] / max(seconds['tcp'], 1e-9):.2f}; "
          f"socket folders left behind: {len(left)}")


if __name__ == "__main__":
    main()
