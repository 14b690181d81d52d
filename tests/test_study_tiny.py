"""The whole study pipeline on the tiny model, through the real notebooks: the runner trains and evaluates three
runs (TopK, the λ = 0 control, SGO at λ = 1) in parallel, renders the compare/competition reports, the index and the
answers — which must find the control identical to TopK — and a second call does nothing."""

import logging
from pathlib import Path

import pandas as pd
import pytest

from saelib.study import load_runner_settings, run_study, study_runs, study_timings

REPO = Path(__file__).resolve().parents[1]
PROFILE = """runs_dir: {runs}
model_name: tiny-random-text
hook_layer: 0
cache_tokens: 4096
eval_tokens: 2048
eval_ce_tokens: 256
d_sae: 128
k: 8
training_tokens: 4096
batch_size: 256
n_checkpoints: 1
"""
SGO = "architecture: sgo_topk\ncompetition_threshold: 0.02\ncompetition_warmup_steps: 2\nseed: 0\n"
RUNS = {"topk_s0": "architecture: topk\nseed: 0\n", "sgo_t0.02_l0_s0": SGO + "orth_pen: 0\n",
        "sgo_t0.02_l1_s0": SGO + "orth_pen: 1\n"}


@pytest.mark.real_model  # the tiny model reads text with the embedded Gemma tokenizer
def test_a_tiny_study_runs_end_to_end_and_the_control_matches_topk(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.chdir(tmp_path)  # reports/ lands here; the notebooks are the repository's own
    (tmp_path / "notebooks").symlink_to(REPO / "notebooks")
    study = tmp_path / "params" / "tiny"
    study.mkdir(parents=True)
    (study / "_study.yaml").write_text(PROFILE.format(runs=tmp_path / "runs"))
    for name, overrides in RUNS.items():
        (study / f"{name}.yaml").write_text(overrides)
    (study / "_runner.yaml").write_text(
        "jobs: 2\nthreads: 1\neval_profile: smoke\nevals: [core, competition]\n"
        "study_notebooks: [notebooks/compare.ipynb, notebooks/competition.ipynb]\n"
        "parameters: {train: {competition_analysis: false}}\n")
    settings = load_runner_settings(study, {})
    summary = run_study(study, settings).set_index("run")
    assert list(summary["status"]) == ["done"] * 3, summary.to_string()
    reports = tmp_path / "reports" / "tiny"
    for name in ("index.html", "compare.html", "competition.html", "answers.md", "headline.png",
                 "topk_s0.html", "sgo_t0.02_l1_s0.evaluate.html"):
        assert (reports / name).exists(), name
    penalty = pd.read_csv(reports / "answers_penalty.csv").drop_duplicates("config").set_index("lambda")
    assert penalty.loc[0.0, ["SAEs compared", "SAEs equal to TopK"]].tolist() == [1, 1]  # the control is TopK
    assert penalty.loc[1.0, "SAEs equal to TopK"] == 0 and penalty.loc[1.0, "largest Δ element (abs.)"] > 0  # λ = 1
    quality = pd.read_csv(reports / "answers_quality.csv").set_index("config")
    assert (quality.loc["sgo_t0.02_l0", "difference"] == 0).all()  # and so are its evals
    assert "Answers" in (reports / "index.html").read_text()
    assert len(study_timings(study_runs(study), settings)) == 6  # two notebooks per run, times on record

    again = run_study(study, settings)
    assert list(again["status"]) == ["current"] * 3
    assert "nothing to do" in caplog.text
