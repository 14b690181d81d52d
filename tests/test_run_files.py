"""run_files.atomic_write: the one write-then-rename every file writer uses."""

import numpy as np
import pytest

from saelib import run_files


def test_atomic_write_keeps_the_suffix_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "rows.npy"
    run_files.atomic_write(path, lambda tmp: np.save(tmp, np.arange(3)), keep_suffix=True)  # np.save adds .npy otherwise
    assert np.load(path).tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["rows.npy"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "answers.md"
    run_files.write_text_atomic(path, "old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        run_files.atomic_write(path, fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["answers.md"]


def test_the_temporary_never_matches_the_files_readers_glob_for(tmp_path):
    seen = []
    run_files.atomic_write(tmp_path / "core.json", lambda tmp: (seen.extend(tmp_path.glob("*.json")),
                                                                tmp.write_text("{}")))
    assert seen == [] and (tmp_path / "core.json").read_text() == "{}"
