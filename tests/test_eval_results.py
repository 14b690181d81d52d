"""The tidy results table read from a study folder."""

import json
import math

import pytest

from saelib.evals.results import COLUMNS, flatten_metrics, study_results, wide


def write_run(study, name, arch, tau=0.05, lam=0.0, seed=0, ev=0.9, extra_metrics=None):
    run = study / name
    (run / "evals").mkdir(parents=True)
    (run / "cfg.json").write_text(json.dumps({"architecture": arch, "competition_threshold": tau,
                                              "orth_pen": lam, "seed": seed}))
    (run / "evals" / "core.json").write_text(json.dumps({
        "eval_type_id": "core",
        "eval_result_metrics": {"reconstruction_quality": {"explained_variance": ev, "cossim": None},
                                "sparsity": {"l0": 32, "flag": True}}}))
    (run / "metrics.json").write_text(json.dumps({"explained_variance": ev, "competition_n_competing_pairs": 7,
                                                  **(extra_metrics or {})}))


def test_study_results_is_tidy_and_identifies_runs(tmp_path):
    write_run(tmp_path, "topk_s0", "topk", ev=0.9)
    write_run(tmp_path, "topk_s1", "topk", seed=1, ev=0.8)
    write_run(tmp_path, "sgo_t0.02_l0.01_s0", "sgo_topk", tau=0.02, lam=0.01, ev=0.85)
    (tmp_path / "unfinished").mkdir()  # no cfg.json: no rows
    table = study_results(tmp_path)
    assert list(table.columns) == COLUMNS
    assert set(table["run"]) == {"topk_s0", "topk_s1", "sgo_t0.02_l0.01_s0"}
    assert set(table["config"]) == {"topk", "sgo_t0.02_l0.01"}
    sgo = table[table["run"] == "sgo_t0.02_l0.01_s0"]
    assert (sgo["tau"] == 0.02).all() and (sgo["lambda"] == 0.01).all()
    assert table[table["architecture"] == "topk"]["tau"].isna().all()  # τ means nothing for TopK
    core = table[table["eval"] == "core"]
    assert set(core["metric"]) == {"reconstruction_quality.explained_variance", "sparsity.l0"}  # None/bool dropped
    assert set(table[table["eval"] == "competition"]["metric"]) == {"competition_n_competing_pairs"}
    w = wide(table, {"core/reconstruction_quality.explained_variance": "ev"}).set_index("run")
    assert w.loc["topk_s1", "ev"] == 0.8 and w.loc["sgo_t0.02_l0.01_s0", "ev"] == 0.85 and len(w) == 3


def test_flatten_and_missing_study(tmp_path):
    assert dict(flatten_metrics({"a": {"b": 1, "c": math.nan, "d": "x"}, "e": 2.5})) == {"a.b": 1.0, "e": 2.5}
    with pytest.raises(FileNotFoundError, match="study_dir: expected a study folder"):
        study_results(tmp_path / "nope")


def test_saelib_additions_to_an_eval_are_rows_of_that_eval(tmp_path):
    write_run(tmp_path, "topk_s0", "topk")
    (tmp_path / "topk_s0" / "evals" / "absorption.json").write_text(json.dumps({
        "eval_result_metrics": {"mean": {"mean_absorption_fraction_score": 0.2}},
        "eval_result_unstructured": {"saelib_metrics": {"firing": {"mean_main_silent_rate": 0.3}},
                                     "firing_per_letter": {"a": {"main_silent_rate": 0.5}}}}))
    rows = study_results(tmp_path)
    absorption = rows[rows["eval"] == "absorption"].set_index("metric")["value"]
    assert absorption.to_dict() == {"mean.mean_absorption_fraction_score": 0.2, "firing.mean_main_silent_rate": 0.3}
