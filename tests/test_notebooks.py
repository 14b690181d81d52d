"""Notebook hygiene: every notebook is a jupytext pair in sync, has one parameters cell, carries no outputs, and is
in the Makefile's nbval list (in the order their inputs are produced)."""

import re
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
