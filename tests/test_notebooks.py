"""Notebook hygiene: every notebook is a jupytext pair in sync, has one parameters cell, carries no outputs, and is
in the Makefile's nbval list (in the order their inputs are produced); and nbval, as `make test` runs it, keeps a
cell's whole output."""

import os
import re
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = sorted(Path("notebooks").glob("*.py"))


@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: p.stem)
def test_pair_is_in_sync_and_clean(source):
    paired = source.with_suffix(".ipynb")
    assert paired.exists(), f"{paired} missing: run `make sync`"
    ipynb = nbformat.read(paired, as_version=4)
    py = jupytext.read(source)
    code = lambda nb: [c.source for c in nb.cells if c.cell_type == "code"]  # noqa: E731
    assert code(ipynb) == code(py), f"{paired} differs from {source}: run `make sync`"
    assert all(not c.get("outputs") for c in ipynb.cells if c.cell_type == "code"), f"{paired} has outputs"
    tagged = [c for c in py.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1


def test_makefile_runs_every_notebook_under_nbval():
    listed = re.search(r"^NOTEBOOKS := (.*)$", Path("Makefile").read_text(), re.M).group(1).split()
    assert sorted(listed) == sorted(str(p.with_suffix(".ipynb")) for p in NOTEBOOKS)
    assert listed.index("notebooks/train.ipynb") < listed.index("notebooks/evaluate.ipynb")


def test_repo_path_finds_repository_files_from_another_folder(tmp_path, monkeypatch):
    from saelib.run_files import repo_path

    monkeypatch.chdir(tmp_path)
    assert repo_path("tests/fixtures/study").is_dir()
    assert repo_path("nowhere/at/all") == Path("nowhere/at/all")


def _nbval(notebook: Path, *plugin: str) -> str:
    """What ``pytest --nbval-lax notebook`` prints, run in the notebook's folder with ``plugin`` options."""
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plugin, "--nbval-lax",
                           "--rootdir", str(notebook.parent), str(notebook)], cwd=notebook.parent, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(repo)})
    return proc.stdout + proc.stderr


def test_nbval_keeps_every_output_of_a_cell_that_prints_past_zeromqs_buffers(tmp_path):
    """nbval reads a cell's output only after the cell ends, and ZeroMQ drops what its buffers cannot hold: the
    closing message among them, so nbval fails a cell that ran to the end (tests/nbval_iopub.py). With the plugin
    `make test` loads, the same notebook passes, its output checked line for line."""
    nb = nbformat.v4.new_notebook()
    lines = "".join(f"{i:05d}{'x' * 4000}\n" for i in range(5000))
    flood = nbformat.v4.new_code_cell("# NBVAL_CHECK_OUTPUT\nfor i in range(5000):\n    print(f'{i:05d}' + 'x' * 4000, "
                                      "flush=True)", outputs=[nbformat.v4.new_output("stream", name="stdout", text=lines)])
    flood.execution_count = 1  # a reference nbval compares with: the output of a run
    nb.cells = [flood, nbformat.v4.new_code_cell("print('after')")]
    path = tmp_path / "flood.ipynb"
    nbformat.write(nb, path)
    stock = _nbval(path)
    assert "Timeout of 5 seconds exceeded waiting for output" in stock, stock[-2000:]  # nbval alone (0.11) loses it
    assert "2 passed" in _nbval(path, "-p", "tests.nbval_iopub")
    make_test = re.search(r"^test:.*?(?=^\S)", Path("Makefile").read_text(), re.M | re.S).group(0)
    assert "--nbval-lax" in make_test and "-p tests.nbval_iopub" in make_test
