"""The train notebook as papermill runs it: ``-p`` values always win, an unnamed run is named for its configuration,
a finished run is never replaced, and a bad ``-p`` fails in one line before anything is written."""

import json
from pathlib import Path

import nbformat
import pytest
from papermill.exceptions import PapermillExecutionError

from saelib.config import PROFILE_ENV, RunConfig
from saelib.notebook import execute

TRAIN = Path(__file__).resolve().parents[1] / "notebooks" / "train.ipynb"


@pytest.fixture(autouse=True)
def no_profile_env(monkeypatch):
    monkeypatch.delenv(PROFILE_ENV, raising=False)


def _head(tmp_path: Path, notebook: Path, marker: str, show: str) -> Path:
    """``notebook`` up to its cell that calls ``marker``, then a cell printing ``show`` as JSON: papermill's real
    injection into the real cells, without training."""
    nb = nbformat.read(notebook, as_version=4)
    last = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and marker in c.source)
    nb.cells = nb.cells[: last + 1] + [nbformat.v4.new_code_cell(f"import json\nprint(json.dumps({show}))")]
    path = tmp_path / f"head_{notebook.name}"
    nbformat.write(nb, path)
    return path


def run_config(tmp_path: Path, **parameters) -> dict:
    out = tmp_path / "out.ipynb"
    head = _head(tmp_path, TRAIN, "config_from_notebook(", "{**cfg.to_dict(), 'run_dir': str(cfg.run_dir)}")
    execute(head, out, {"runs_dir": str(tmp_path / "runs"), **parameters})
    return json.loads(nbformat.read(out, as_version=4).cells[-1].outputs[0]["text"])


def test_evaluate_finds_the_run_the_same_p_values_trained(tmp_path, monkeypatch):
    out = tmp_path / "out.ipynb"
    head = _head(tmp_path, TRAIN.with_name("evaluate.ipynb"), "evaluation_target(", "[str(run_dir), eval_profile]")
    read = lambda: json.loads(nbformat.read(out, as_version=4).cells[-1].outputs[0]["text"])  # noqa: E731
    execute(head, out, {"orth_pen": 0.02})
    assert read() == ["runs/single/sgo_t0.05_l0.02_s0", "default"]
    monkeypatch.setenv(PROFILE_ENV, "smoke")
    execute(head, out, {})
    assert read() == ["runs/smoke/topk_s0", "smoke"]
    with pytest.raises(PapermillExecutionError, match="orth_pn: not a parameter of this notebook"):
        execute(head, out, {"orth_pn": 0.02})


def test_p_value_equal_to_the_cell_default_still_beats_the_params_file(tmp_path):
    # params/quick/topk_s0.yaml (through the quick study's _study.yaml) says d_sae 2048; -p gives the cell's default
    default = RunConfig.__dataclass_fields__["d_sae"].default
    assert default != 2048
    cfg = run_config(tmp_path, params_file="params/quick/topk_s0.yaml", d_sae=default)
    assert cfg["d_sae"] == default and cfg["run_dir"].endswith("quick/topk_s0")
    assert run_config(tmp_path, params_file="params/quick/topk_s0.yaml")["d_sae"] == 2048


def test_unnamed_runs_are_named_for_their_configuration(tmp_path, monkeypatch):
    card = run_config(tmp_path, orth_pen=0.02)  # the design card's command
    assert (card["architecture"], card["run_name"], card["study"]) == ("sgo_topk", "sgo_t0.05_l0.02_s0", "single")
    assert run_config(tmp_path, architecture="ortsae_topk", orth_pen=1.0, seed=2)["run_name"] == "ortsae_l1_s2"
    default = run_config(tmp_path)
    assert (default["run_name"], default["d_sae"], default["training_tokens"]) == ("topk_s0", 4096, 1_228_800)
    monkeypatch.setenv(PROFILE_ENV, "smoke")  # what CI's nbval sets
    smoke = run_config(tmp_path)
    assert (smoke["study"], smoke["d_sae"], smoke["training_tokens"]) == ("smoke", 1024, 32_768)
    assert run_config(tmp_path, d_sae=4096)["d_sae"] == 4096  # -p beats the profile too


@pytest.mark.parametrize("parameters, message", [
    ({"orth_pn": 0.02}, "orth_pn: not a parameter of this notebook; did you mean orth_pen?"),
    ({"d_sae": "big"}, "d_sae: expected a value of type int, got 'big'"),
    ({"profile": "huge"}, "profile: expected one of ['default', 'smoke'], got 'huge'"),
    ({"run_name": "../../etc"}, "run_name: expected a folder name"),
])
def test_bad_p_value_fails_in_one_line_and_writes_nothing(tmp_path, parameters, message):
    with pytest.raises(PapermillExecutionError) as caught:
        run_config(tmp_path, **parameters)
    assert caught.value.ename == "ConfigError" and caught.value.evalue.startswith(message)
    assert "\n" not in caught.value.evalue
    assert not (tmp_path / "runs").exists()


# A real, tiny training run through the whole notebook (embedded model, smoke profile shrunk further).
TINY = {"profile": "smoke", "competition_analysis": False, "cache_tokens": 1024, "training_tokens": 1024,
        "batch_size": 512, "d_sae": 256, "eval_tokens": 512, "eval_ce_tokens": 128, "n_checkpoints": 0,
        "competition_warmup_steps": 0}


def _train(tmp_path: Path, **parameters) -> None:
    execute(TRAIN, tmp_path / "out.ipynb", {"runs_dir": str(tmp_path / "runs"), **TINY, **parameters})


@pytest.mark.real_model
def test_two_lambdas_leave_two_saes_and_a_finished_run_is_never_replaced(tmp_path):
    _train(tmp_path, orth_pen=0.02)
    _train(tmp_path, orth_pen=0.01)
    smoke = tmp_path / "runs" / "smoke"
    assert sorted(p.name for p in smoke.iterdir()) == ["sgo_t0.05_l0.01_s0", "sgo_t0.05_l0.02_s0"]
    for name, lam in (("sgo_t0.05_l0.01_s0", 0.01), ("sgo_t0.05_l0.02_s0", 0.02)):
        assert json.loads((smoke / name / "cfg.json").read_text())["orth_pen"] == lam
        assert (smoke / name / "sae" / "cfg.json").is_file()
    first = smoke / "sgo_t0.05_l0.02_s0"
    weights = next((first / "sae").glob("*.safetensors"))
    stamp = weights.stat().st_mtime_ns

    with pytest.raises(PapermillExecutionError) as caught:  # same folder, another λ: refused, nothing touched
        _train(tmp_path, orth_pen=0.01, run_name="sgo_t0.05_l0.02_s0")
    assert caught.value.ename == "ConfigError"
    assert "holds a finished SAE of another configuration (orth_pen 0.02 → 0.01" in caught.value.evalue
    assert json.loads((first / "cfg.json").read_text())["orth_pen"] == 0.02

    _train(tmp_path, orth_pen=0.02)  # the same configuration again: the finished run is reused, not retrained
    assert weights.stat().st_mtime_ns == stamp
