import json

import pandas as pd
import pytest
from sae_lens import SAE

from saelib import resample, run_files
from saelib.train import train_sae
from tests.test_train import tiny_cfg


@pytest.fixture
def runs(tmp_path, tiny_cache):
    dirs = []
    for seed in (0, 1, 2):
        cfg = tiny_cfg(tmp_path, seed=seed, n_checkpoints=0, training_tokens=512)
        train_sae(cfg, tiny_cache)
        dirs.append(cfg.run_dir)
    return dirs


def test_every_run_is_scored_under_every_eval_seed_in_its_own_folder(runs, monkeypatch):
    calls = []

    def fake_evaluate_run(run_dir, model, evals, settings, smoke=False):
        (name,) = evals
        seed = settings[name][resample.SEED_FIELD[name]]
        train_seed = run_files.read_json(run_dir / run_files.RUN_CFG_FILE)["seed"]
        calls.append((run_dir, name, seed))
        assert SAE.load_from_disk(run_dir / run_files.SAE_DIR).cfg.d_sae == 96  # the run's own SAE, linked
        (run_dir / "evals").mkdir(exist_ok=True)
        (run_dir / "evals" / f"{name}.json").write_text(json.dumps({"eval_result_metrics": {
            "sae": {"sae_top_1_test_accuracy": 0.6 + 0.01 * train_seed + 0.001 * seed}}}))
        return pd.DataFrame([{"eval": name, "status": "done", "message": ""}])

    monkeypatch.setattr("saelib.evals.evaluate_run", fake_evaluate_run)
    values = resample.resample(runs, None, ["sparse_probing"], [42, 1])
    assert len(calls) == 6 and {c[0].parent.parent for c in calls} == set(runs)
    assert (runs[0] / "resample" / "sparse_probing_seed1" / "sae").is_symlink()
    assert set(values["metric"]) == {"sparse probing top-1"} and len(values) == 6
    table = resample.noise_table(values).set_index("metric")
    # eval seeds 42 and 1 differ by 0.041 on every SAE; SAEs differ by 0.01 a seed
    assert table.loc["sparse probing top-1", "eval_sd"] == pytest.approx(0.041 / 2 ** 0.5)
    assert table.loc["sparse probing top-1", "n_train_seeds"] == 3
    # a second call keeps the folder it made
    folder = runs[0] / "resample" / "sparse_probing_seed1"
    before = (folder / run_files.RUN_CFG_FILE).stat().st_mtime_ns
    assert resample.resampled_run(runs[0], "sparse_probing", 1) == folder
    assert (folder / run_files.RUN_CFG_FILE).stat().st_mtime_ns == before


def test_bad_inputs_name_the_parameter(runs, tmp_path):
    with pytest.raises(ValueError, match="evals: expected evals with a sampling seed"):
        resample.resample(runs, None, ["core"], [1, 2])
    with pytest.raises(ValueError, match="seeds: expected at least two distinct eval seeds"):
        resample.resample(runs, None, ["absorption"], [3, 3, 4])
    with pytest.raises(ValueError, match="run_dirs: expected runs of one configuration under distinct seeds"):
        resample.resample([runs[0], runs[0]], None, ["absorption"], [1, 2])
    other = tmp_path / "other_s5"  # another configuration (k differs)
    other.mkdir()
    cfg = run_files.read_json(runs[1] / run_files.RUN_CFG_FILE)
    run_files.write_json_atomic(other / run_files.RUN_CFG_FILE, {**cfg, "k": 7, "seed": 5})
    with pytest.raises(ValueError, match="run_dirs: expected runs of one configuration"):
        resample.resample([runs[0], other], None, ["absorption"], [1, 2])
    with pytest.raises(FileNotFoundError, match="run_dir: expected a finished run"):
        resample.resampled_run(tmp_path / "nope", "absorption", 1)


def test_command_line_bad_input_is_one_line_naming_the_parameter(runs, tmp_path, capsys):
    with pytest.raises(SystemExit):
        resample.main([str(tmp_path / "nope")])
    assert "run_dirs: expected run folders holding cfg.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        resample.main([str(runs[0]), "--evals", "core"])
    assert "evals: expected evals with a sampling seed" in capsys.readouterr().err
    assert not (runs[0] / "resample").exists()  # nothing written
