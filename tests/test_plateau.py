import json

import pytest
import torch
from sae_lens import SAE

from saelib import plateau, run_files
from saelib.train import checkpoint_sae, train_sae
from tests.test_train import tiny_cfg


def _state(path):
    return SAE.load_from_disk(path).state_dict()


def test_a_checkpoint_exports_as_the_run_that_stopped_there(tmp_path, tiny_cache):
    long_cfg = tiny_cfg(tmp_path, run_name="long", n_checkpoints=1)
    train_sae(long_cfg, tiny_cache)
    [(tokens, ckpt)] = run_files.checkpoints(long_cfg.run_dir)
    assert 0 < tokens < long_cfg.training_tokens
    short_cfg = tiny_cfg(tmp_path, run_name="short", training_tokens=tokens, n_checkpoints=0)
    train_sae(short_cfg, tiny_cache)
    checkpoint_sae(long_cfg, tiny_cache, ckpt, tmp_path / "exported")
    exported, short = _state(tmp_path / "exported"), _state(short_cfg.run_dir / run_files.SAE_DIR)
    assert exported.keys() == short.keys()
    for name in short:  # scale and centring mean folded in as at the end of training: the same SAE, bit for bit
        assert torch.equal(exported[name], short[name]), name
    # and it is not simply the finished SAE
    finished = _state(long_cfg.run_dir / run_files.SAE_DIR)
    assert not torch.equal(exported["W_dec"], finished["W_dec"])


def test_points_table_and_resume(tmp_path, tiny_cache):
    cfg = tiny_cfg(tmp_path, n_checkpoints=2)
    train_sae(cfg, tiny_cache)
    points = plateau.export_points(cfg.run_dir, tiny_cache)
    tokens = [plateau.tokens_of(p) for p in points]
    assert tokens == sorted(tokens) and tokens[-1] == cfg.training_tokens and len(points) == 3
    assert run_files.read_json(points[0] / run_files.RUN_CFG_FILE)["training_tokens"] == tokens[0]
    assert run_files.read_json(points[0] / run_files.RUN_CFG_FILE)["n_checkpoints"] == 0  # a run that stopped there
    before = (points[0] / run_files.SAE_DIR / "sae_weights.safetensors").stat().st_mtime_ns
    assert plateau.export_points(cfg.run_dir, tiny_cache) == points  # exported points are kept, not redone
    assert (points[0] / run_files.SAE_DIR / "sae_weights.safetensors").stat().st_mtime_ns == before
    for i, point in enumerate(points):  # stored results as the evals write them
        (point / "evals").mkdir()
        (point / "evals" / "core.json").write_text(json.dumps({"eval_result_metrics": {
            "reconstruction_quality": {"explained_variance": 0.5 + 0.1 * i}, "sparsity": {"l0": 6.0}}}))
    table = plateau.plateau_table(cfg.run_dir)
    assert list(table["tokens"]) == tokens
    assert list(table["explained variance"]) == pytest.approx([0.5, 0.6, 0.7])
    assert list(table["Δ to last: explained variance"]) == pytest.approx([0.2, 0.1, 0.0])
    assert "absorption (mean fraction)" not in table  # no point has it


def test_points_nearest_to_asked_tokens(tmp_path):
    found = [(t, tmp_path / str(t)) for t in (512, 1024, 1536, 2048)]
    assert plateau.nearest_checkpoints(found, [500, 1000, 2100, 1100]) == [found[0], found[1], found[3]]
    assert plateau.nearest_checkpoints(found, []) == found


def test_a_half_written_point_is_redone(tmp_path, tiny_cache):
    cfg = tiny_cfg(tmp_path, n_checkpoints=1)
    train_sae(cfg, tiny_cache)
    (tokens, _), = run_files.checkpoints(cfg.run_dir)
    partial = plateau.point_dir(cfg.run_dir, tokens).with_name(plateau.point_dir(cfg.run_dir, tokens).name + ".partial")
    partial.mkdir(parents=True)  # left by a killed export
    points = plateau.export_points(cfg.run_dir, tiny_cache)
    assert not partial.exists() and (points[0] / run_files.SAE_DIR / "cfg.json").exists()
    assert list(plateau.plateau_table(cfg.run_dir)["tokens"]) == [tokens, cfg.training_tokens]


def test_bad_run_dir_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        plateau.main([str(tmp_path / "nope")])
    assert "run_dir: expected a run folder holding cfg.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plateau.main([str(tmp_path), "--evals", "corr"])
    assert "evals: expected names from" in capsys.readouterr().err
