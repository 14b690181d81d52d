"""The study runner with a stand-in notebook (real papermill, real subprocesses): a study completes in parallel,
a second call does nothing, a killed run resumes where it stopped, a failing run is reported while others finish."""

import json
import logging
import os
import shutil
from pathlib import Path

import nbformat
import pytest

from saelib.config import ConfigError, build_config
from saelib.study import (RunnerSettings, check_precision, load_runner_settings, machine, main, precision_clash,
                          run_study, study_runs, study_timings)

STUB = '''
import json, os
from pathlib import Path
from saelib.config import build_config
cfg = build_config(params_file=params_file)
run = Path(cfg.run_dir); run.mkdir(parents=True, exist_ok=True)
steps = run / "steps.jsonl"
done = [json.loads(l) for l in steps.read_text().splitlines()] if steps.exists() else []
if cfg.seed == 13:
    raise ValueError("this run is meant to fail")
for step in range(len(done) + 1, 4):  # resumes after the last step written, like training from a checkpoint
    with open(steps, "a") as f:
        f.write(json.dumps(step) + "\\n")
    if step == 1 and (run / "kill-me").exists():
        (run / "kill-me").unlink()
        os._exit(1)  # the kernel dies mid-run
(run / "sae").mkdir(exist_ok=True)
(run / "marker.json").write_text(json.dumps({"eval_profile": eval_profile}))
(run / "held.json").write_text(json.dumps({"env": os.environ.get("SAELIB_AUTO_PRECISION"),  # what 'auto' was held at
                                           "used": cfg.resolved_precisions()}))
'''


def stub_notebook(path, parameters: str, *cells: str) -> None:
    """A python3 notebook: a ``parameters`` cell, then ``cells``."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]}),
                *map(nbformat.v4.new_code_cell, cells)]
    nbformat.write(nb, path)


@pytest.fixture
def study(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notebooks").mkdir()
    stub_notebook(tmp_path / "notebooks" / "evaluate.ipynb", 'params_file = ""\neval_profile = "smoke"', STUB)
    params = tmp_path / "params" / "mini"
    params.mkdir(parents=True)
    (params / "_study.yaml").write_text(f"runs_dir: {tmp_path / 'runs'}\nmodel_name: tiny-random\nhook_layer: 0\n")
    for seed in range(3):
        (params / f"topk_s{seed}.yaml").write_text(f"seed: {seed}\n")
    return params


def settings(**kw):
    return RunnerSettings(**{"jobs": 2, "eval_profile": "smoke", "notebooks": ["notebooks/evaluate.ipynb"],
                             "threads": 1, **kw})


def steps(study_params, run):
    path = study_params.parent.parent / "runs" / "mini" / run / "steps.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_study_runs_in_parallel_then_does_nothing(study, caplog):
    caplog.set_level(logging.INFO)
    summary = run_study(study, settings()).set_index("run")
    assert list(summary["status"]) == ["done"] * 3
    assert steps(study, "topk_s2") == [1, 2, 3]
    runs = study.parent.parent / "runs" / "mini"
    assert json.loads((runs / "topk_s0" / "marker.json").read_text()) == {"eval_profile": "smoke"}
    assert (runs / "topk_s0" / "evaluate.ipynb").exists()  # the executed notebook
    assert (study.parent.parent / "reports" / "mini" / "topk_s0.evaluate.html").exists()
    stray = study.parent.parent / "runs" / "mini" / "old_s0"
    stray.mkdir()
    (stray / "cfg.json").write_text(json.dumps(build_config({"run_name": "old_s0"}).to_dict()))
    run_study(study, settings())
    assert "runs with no params file" in caplog.text and "old_s0" in caplog.text
    timings = study_timings(study_runs(study), settings())
    assert sorted(timings["run"]) == ["topk_s0", "topk_s1", "topk_s2"] and (timings["seconds"] > 0).all()
    timing = json.loads((runs / "topk_s0" / ".runner" / "evaluate.time.json").read_text())
    recorded = timing["commit"]
    assert recorded is None or len(recorded.removesuffix("+dirty")) == 40  # the code's commit, in a checkout
    assert timing["machine"] == machine() and f", {os.cpu_count()} cores" in timing["machine"]  # and the machine's
    again = run_study(study, settings())
    assert list(again["status"]) == ["current"] * 3
    assert "nothing to do" in caplog.text
    assert steps(study, "topk_s2") == [1, 2, 3]  # not executed again
    assert list(run_study(study, settings(eval_profile="default"))["status"]) == ["done"] * 3  # parameters changed
    assert study_timings(study_runs(study), settings()).empty  # those times belong to the old parameters
    fixed = settings(eval_profile="default", parameters={"evaluate": {"extra": 1}, "train": {"x": 2}})
    assert list(run_study(study, fixed)["status"]) == ["done"] * 3  # a fixed parameter is part of the stamp
    assert json.loads((runs / "topk_s0" / ".runner" / "evaluate.json").read_text())["parameters"] == {
        "eval_profile": "default", "extra": 1}
    # a stamp written before a config field existed is still current (the field had its default then)
    stamp_file = runs / "topk_s0" / ".runner" / "evaluate.json"
    old = json.loads(stamp_file.read_text())
    del old["config"]["competition_normalisation"]
    stamp_file.write_text(json.dumps(old))
    assert list(run_study(study, fixed).set_index("run")["status"]) == ["current"] * 3


def test_a_killed_run_resumes_and_a_failing_run_does_not_stop_the_others(study):
    (study / "bad.yaml").write_text("seed: 13\n")
    run = study.parent.parent / "runs" / "mini" / "topk_s1"
    run.mkdir(parents=True)
    (run / "kill-me").write_text("")
    summary = run_study(study, settings()).set_index("run")
    assert summary.loc["bad", "status"] == "failed in evaluate"
    assert summary.loc["topk_s1", "status"] == "failed in evaluate"  # killed
    assert summary.loc["topk_s0", "status"] == summary.loc["topk_s2", "status"] == "done"
    executed = nbformat.read(study.parent.parent / "runs" / "mini" / "bad" / "evaluate.ipynb", as_version=4)
    assert "this run is meant to fail" in json.dumps(executed.cells[-1].outputs)  # the error stays in the notebook
    assert steps(study, "topk_s1") == [1]
    second = run_study(study, settings()).set_index("run")
    assert second.loc["topk_s1", "status"] == "done" and second.loc["topk_s0", "status"] == "current"
    assert steps(study, "topk_s1") == [1, 2, 3]  # resumed after step 1, not restarted
    assert second.loc["bad", "status"] == "failed in evaluate"


def test_bad_runner_input_is_a_clear_error(study, tmp_path):
    with pytest.raises(ConfigError, match="jobs: expected a positive integer"):
        load_runner_settings(study, {"jobs": 0, "notebooks": ["notebooks/evaluate.ipynb"]})
    with pytest.raises(ConfigError, match="parameters: expected"):
        load_runner_settings(study, {"parameters": {"train": 1}, "notebooks": ["notebooks/evaluate.ipynb"]})
    with pytest.raises(ConfigError, match="are runner settings"):
        load_runner_settings(study, {"parameters": {"evaluate": {"eval_profile": "smoke"}},
                                     "notebooks": ["notebooks/evaluate.ipynb"]})
    (study / "_runner.yaml").write_text("jobz: 2\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        load_runner_settings(study, {})
    (study / "_runner.yaml").unlink()
    with pytest.raises(ConfigError, match="notebooks: expected existing notebook files"):
        load_runner_settings(study, {"notebooks": ["notebooks/nope.ipynb"]})
    with pytest.raises(ConfigError, match="evals: expected names from"):
        load_runner_settings(study, {"evals": ["nope"], "notebooks": ["notebooks/evaluate.ipynb"]})
    assert main([str(tmp_path / "params" / "missing")]) == 2
    (study / "broken.yaml").write_text("k: -3\n")
    with pytest.raises(ConfigError, match="k: expected"):
        run_study(study, settings())
    assert not (tmp_path / "runs").exists()  # nothing ran: every config is checked first


def test_runs_go_seed_by_seed_with_the_baseline_first(study):
    for name, seed in (("gram_s0", 0), ("batchtopk_s1", 1), ("gram_s1", 1)):
        (study / f"{name}.yaml").write_text(f"seed: {seed}\n")
    assert [r.name for r in study_runs(study)] == [
        "topk_s0", "gram_s0", "topk_s1", "batchtopk_s1", "gram_s1", "topk_s2"]


def test_only_runs_the_selected_runs_and_a_pattern_matching_none_is_an_error(study, monkeypatch):
    (study / "sgo_t0.02_l0_s0.yaml").write_text("seed: 0\n")
    summary = run_study(study, settings(), only=["topk_s1", "sgo_*"]).set_index("run")
    assert summary.loc["topk_s1", "status"] == summary.loc["sgo_t0.02_l0_s0", "status"] == "done"
    assert summary.loc["topk_s0", "status"] == summary.loc["topk_s2", "status"] == "pending (not selected)"
    assert not (study.parent.parent / "runs" / "mini" / "topk_s0").exists()
    with pytest.raises(ConfigError, match="only: 'topk_s9' matches no run of this study; its runs are topk_s0, "):
        run_study(study, settings(), only=["topk_s9"])
    assert main([str(study), "--only", "topk_s0", "--notebooks", "notebooks/evaluate.ipynb"]) == 0
    assert (study.parent.parent / "runs" / "mini" / "topk_s0" / "marker.json").exists()
    import saelib.answers  # the answers hear of every run the study declares, so a study part-way says so

    planned = []
    monkeypatch.setattr(saelib.answers, "write_answers", lambda *a, planned_=planned, **kw: planned_.extend(
        kw["planned"]) or Path(a[2]) / "answers.md")
    run_study(study, settings(), only=["topk_s0"], reports_only=True)
    assert sorted(planned) == ["sgo_t0.02_l0_s0", "topk_s0", "topk_s1", "topk_s2"]
    assert not (study.parent.parent / "runs" / "mini" / "topk_s2").exists()


def test_reports_only_runs_nothing_and_renders_the_index_from_the_finished_runs(study, caplog):
    caplog.set_level(logging.INFO)
    (study / "topk_s2.yaml").unlink()
    run_study(study, settings())  # two runs finished
    (study / "topk_s2.yaml").write_text("seed: 2\n")
    index = study.parent.parent / "reports" / "mini" / "index.html"
    index.unlink()
    summary = run_study(study, settings(), reports_only=True).set_index("run")
    assert list(summary["status"]) == ["current", "current", "pending"]
    assert not (study.parent.parent / "runs" / "mini" / "topk_s2").exists()  # not run
    assert index.exists() and "2 of 3 runs finished and current, 1 pending" in caplog.text
    assert main([str(study), "--reports-only", "--notebooks", "notebooks/evaluate.ipynb"]) == 0


def test_a_study_finished_on_several_machines_reads_the_archived_runs(study, caplog):
    """Each finished run's results (no weights) are archived beside the reports; on a machine without those runs,
    ``archived=True`` counts a current archive copy as finished and reports from it; a stale one is run again."""
    caplog.set_level(logging.INFO)
    root = study.parent.parent
    stub_notebook(root / "notebooks" / "compare.ipynb", 'study_dir = ""',
                  "import json\nfrom pathlib import Path\n"
                  "print(json.dumps(sorted(p.name for p in Path(study_dir).iterdir() if p.is_dir())))")
    with_compare = settings(study_notebooks=["notebooks/compare.ipynb"])
    (study / "topk_s2.yaml").unlink()
    run_study(study, with_compare, only=["topk_s0"])  # machine 1: one run
    archive = root / "reports" / "mini" / "runs"
    assert sorted(p.name for p in archive.iterdir()) == ["topk_s0"]
    assert (archive / "topk_s0" / ".runner" / "evaluate.json").exists()
    assert not (archive / "topk_s0" / "steps.jsonl").exists()  # results only
    shutil.rmtree(root / "runs")  # machine 2: a fresh clone with the committed archive
    (study / "topk_s2.yaml").write_text("seed: 2\n")
    summary = run_study(study, with_compare, archived=True).set_index("run")
    assert dict(summary["status"]) == {"topk_s0": "archived", "topk_s1": "done", "topk_s2": "done"}
    assert not (root / "runs" / "mini" / "topk_s0").exists()  # not run again
    assert "1 run(s) finished on another machine" in caplog.text
    executed = nbformat.read(root / "runs" / "mini" / "compare.ipynb", as_version=4)
    assert json.loads(executed.cells[-1].outputs[0]["text"]) == ["topk_s0", "topk_s1", "topk_s2"]
    timings = study_timings(study_runs(study), settings(), {"topk_s0": archive / "topk_s0"})
    assert sorted(timings["run"]) == ["topk_s0", "topk_s1", "topk_s2"]
    assert sorted(p.name for p in archive.iterdir()) == ["topk_s0", "topk_s1", "topk_s2"]
    assert list(run_study(study, with_compare, archived=True)["status"]) == ["archived", "current", "current"]
    (study / "topk_s0.yaml").write_text("seed: 0\nk: 8\n")  # the archived copy is of another configuration
    assert run_study(study, with_compare, archived=True).set_index("run").loc["topk_s0", "status"] == "done"
    assert main([str(study), "--reports-only", "--archived", "--notebooks", "notebooks/evaluate.ipynb"]) == 0


def test_a_machine_whose_auto_precision_differs_from_the_finished_runs_holds_it_or_refuses(study, monkeypatch,
                                                                                            caplog):
    """A study finished over several machines must not mix precisions silently: where ``auto`` resolves otherwise
    than the finished ``auto`` runs were measured in, the runner holds ``auto`` at theirs where this machine has it
    (bf16 native but slower), and where it has not (no native bf16) refuses in one line naming the field, before
    anything runs, unless told ``--mixed-precision``. A half-trained run folder is not a finished run, and runs with an
    explicit precision are not compared; a device this machine lacks is refused whatever the flag."""
    import saelib.sparse_step
    import saelib.study

    root = study.parent.parent
    run_study(study, settings(), only=["topk_s0"])
    finished = root / "runs" / "mini" / "topk_s0" / "cfg.json"
    finished.write_text(json.dumps({"architecture": "topk", "lm_precision_used": "bfloat16",
                                    "sae_precision_used": "bfloat16"}))
    (root / "runs" / "mini" / "topk_s2").mkdir()  # started on this machine, never finished: not a finished run
    (root / "runs" / "mini" / "topk_s2" / "cfg.json").write_text(json.dumps(
        {"architecture": "topk", "lm_precision_used": "float32", "sae_precision_used": "float32"}))
    for module in (saelib.sparse_step, saelib.study):
        monkeypatch.setattr(module, "bf16_native", lambda device="cpu": False)
    with pytest.raises(ConfigError, match=r"^lm_precision: the study's finished runs at 'auto' were measured in "
                                          r"bfloat16, but 'auto' resolves to float32 on this machine \(native bf16: "
                                          r"False\)"):
        run_study(study, settings(), only=["topk_s1"])
    assert not (root / "runs" / "mini" / "topk_s1").exists()  # refused before anything ran
    assert main([str(study), "--only", "topk_s1", "--notebooks", "notebooks/evaluate.ipynb", "--eval-profile",
                 "smoke"]) == 2
    assert run_study(study, settings(), reports_only=True).set_index("run").loc["topk_s1", "status"] == "pending"
    finished.write_text(json.dumps({"architecture": "topk", "lm_precision": "bfloat16", "lm_precision_used": "bfloat16",
                                    "sae_precision": "bfloat16", "sae_precision_used": "bfloat16"}))
    assert precision_clash(study_runs(study), study_runs(study)[1:2], {}, settings()) is None  # set, not 'auto'
    finished.write_text(json.dumps({"architecture": "topk", "lm_precision_used": "bfloat16",
                                    "sae_precision_used": "bfloat16"}))
    summary = run_study(study, settings(), only=["topk_s1"], mixed_precision=True).set_index("run")
    assert summary.loc["topk_s1", "status"] == "done"
    for module in (saelib.sparse_step, saelib.study):  # a machine where 'auto' means what it meant: no clash
        monkeypatch.setattr(module, "bf16_native", lambda device="cpu": True)
    monkeypatch.setattr(saelib.sparse_step, "cpu_bf16_speedup", lambda: 3.7)
    shutil.rmtree(root / "runs" / "mini" / "topk_s1")
    assert run_study(study, settings(), only=["topk_s1"]).set_index("run").loc["topk_s1", "status"] == "done"
    assert json.loads((root / "runs" / "mini" / "topk_s1" / "held.json").read_text())["env"] is None
    # bf16 native but slower here: alone, 'auto' would pick fp32; the study holds it at the finished runs' bf16
    monkeypatch.setattr(saelib.sparse_step, "cpu_bf16_speedup", lambda: 0.55)
    runs, todo = study_runs(study), study_runs(study)[1:2]
    assert "resolves to float32 on this machine (native bf16: True, its matmul 0.55× fp32's speed)" in \
        precision_clash(runs, todo, {}, settings())
    with caplog.at_level(logging.WARNING, logger="saelib.study"):
        assert check_precision(runs, todo, {}, settings(), mixed_precision=False) == "bfloat16"
    assert "'auto' held at bfloat16, the precision the study's finished runs used; alone, this machine would pick " \
           "the other (native bf16: True, its matmul 0.55× fp32's speed)" in caplog.text
    assert check_precision(runs, todo, {}, settings(), mixed_precision=True) is None  # told to mix: no hold
    # the reverse, run through to the kernels (fp32 runs on any CPU): finished in fp32, bf16 faster here
    finished.write_text(json.dumps({"architecture": "topk", "lm_precision_used": "float32",
                                    "sae_precision_used": "float32"}))
    monkeypatch.setattr(saelib.sparse_step, "cpu_bf16_speedup", lambda: 3.7)
    shutil.rmtree(root / "runs" / "mini" / "topk_s1")
    assert run_study(study, settings(), only=["topk_s1"]).set_index("run").loc["topk_s1", "status"] == "done"
    assert json.loads((root / "runs" / "mini" / "topk_s1" / "held.json").read_text()) == {
        "env": "float32", "used": {"sae_precision_used": "float32", "lm_precision_used": "float32"}}
    assert "SAELIB_AUTO_PRECISION" not in os.environ  # the hold ends with the call
    monkeypatch.setattr(saelib.study.RunConfig, "resolved_precisions", lambda self: (_ for _ in ()).throw(
        ValueError("device: 'cuda' was asked for, but this machine has no CUDA device")))
    with pytest.raises(ConfigError, match="^device: 'cuda' was asked for"):  # not a clash to wave through
        run_study(study, settings(), mixed_precision=True)


def test_notebooks_run_on_unix_sockets_and_leave_no_socket_folder(tmp_path):
    """Side-by-side notebooks must not race for TCP ports (CI lost a tiny-study run to "Kernel died before replying
    to kernel_info"): saelib.notebook.execute starts kernels on the ipc transport and removes their socket folder."""
    from saelib.notebook import execute

    stub_notebook(tmp_path / "in.ipynb", "x = 0", "import json\nfrom ipykernel import get_connection_info\n"
                  "info = json.loads(get_connection_info())\n"
                  "print(json.dumps({'x': x, 'transport': info['transport'], 'ip': info['ip']}))")
    execute(tmp_path / "in.ipynb", tmp_path / "out.ipynb", {"x": 7})
    printed = json.loads(nbformat.read(tmp_path / "out.ipynb", as_version=4).cells[-1].outputs[0]["text"])
    assert printed["x"] == 7 and printed["transport"] == "ipc"
    assert Path(printed["ip"]).is_absolute() and not Path(printed["ip"]).parent.exists()


def test_study_reports_leave_out_unfinished_runs(study, caplog):
    """A run that failed or was killed part-way holds some results; the study notebooks must not count it."""
    caplog.set_level(logging.INFO)
    stub_notebook(study.parent.parent / "notebooks" / "compare.ipynb", 'study_dir = ""',
                  "import json\nfrom pathlib import Path\n"
                  "print(json.dumps(sorted(p.name for p in Path(study_dir).iterdir())))")
    (study / "bad.yaml").write_text("seed: 13\n")
    runs = study.parent.parent / "runs" / "mini"
    (runs / "topk_s1").mkdir(parents=True)
    (runs / "topk_s1" / "kill-me").write_text("")
    with_compare = settings(study_notebooks=["notebooks/compare.ipynb"])

    def seen() -> list[str]:
        executed = nbformat.read(runs / "compare.ipynb", as_version=4)  # kept in the study folder
        return [name for name in json.loads(executed.cells[-1].outputs[0]["text"]) if not name.endswith(".ipynb")]

    summary = run_study(study, with_compare).set_index("run")
    assert summary.loc["topk_s1", "status"] == summary.loc["bad", "status"] == "failed in evaluate"
    assert (runs / "topk_s1" / "steps.jsonl").exists()  # partial results on disk ...
    assert seen() == ["topk_s0", "topk_s2"]  # ... but not in the study's reports
    assert "leave out 2 unfinished run(s) that already hold files: bad, topk_s1" in caplog.text
    assert not list(runs.parent.glob(".finished-runs*")) and (runs / "topk_s0" / "steps.jsonl").exists()
    assert (study.parent.parent / "reports" / "mini" / "compare.html").exists()
    run_study(study, with_compare, reports_only=True)
    assert seen() == ["topk_s0", "topk_s2"]
    run_study(study, with_compare)  # topk_s1 resumes and finishes; bad fails again
    assert seen() == ["topk_s0", "topk_s1", "topk_s2"]
    (runs / "topk_s0" / ".runner" / "evaluate.json").write_text("{}")  # stale (config changed): finished once
    caplog.clear()
    run_study(study, with_compare, reports_only=True)
    assert seen() == ["topk_s0", "topk_s1", "topk_s2"] and "2 of 4 runs finished and current, 2 pending" in caplog.text


def test_a_failing_study_notebook_is_reported_and_leaves_no_old_report(study, caplog):
    caplog.set_level(logging.INFO)
    stub_notebook(study.parent.parent / "notebooks" / "compare.ipynb", 'study_dir = ""',
                  "raise ValueError('no eval results')")
    old = study.parent.parent / "reports" / "mini" / "compare.html"
    old.parent.mkdir(parents=True)
    old.write_text("older results")
    summary = run_study(study, settings(study_notebooks=["notebooks/compare.ipynb"]))
    assert list(summary["status"]) == ["done"] * 3 and not old.exists()
    assert "report compare: none (ValueError: no eval results" in caplog.text
    assert (study.parent.parent / "reports" / "mini" / "index.html").exists()


@pytest.mark.parametrize("folder", sorted(p for p in (Path(__file__).parents[1] / "params").iterdir() if p.is_dir()),
                         ids=lambda p: p.name)
def test_every_committed_study_folder_loads(folder):
    """Each params/<study> expands into validated runs and valid runner settings (a bad key, eval name or grid entry
    in a committed study would otherwise show only when someone runs it)."""
    assert study_runs(folder)
    settings = load_runner_settings(folder, {})
    assert settings.evals is None or set(settings.evals) <= {"core", "absorption", "sparse_probing", "unlearning",
                                                             "unlearning_proxy", "competition"}


def test_each_run_is_archived_as_it_finishes_not_at_the_end_of_the_call(study):
    """One run at a time: when topk_s1 starts, topk_s0's results are already in the archive, so a study killed
    part-way (its machine lost) keeps every finished run's results."""
    root = study.parent.parent
    archive = root / "reports" / "mini" / "runs"
    stub_notebook(root / "notebooks" / "evaluate.ipynb", 'params_file = ""\neval_profile = "smoke"',
                  STUB + f"\nif cfg.seed == 1:\n    assert (Path({str(archive)!r}) / 'topk_s0' / '.runner' / "
                         "'evaluate.json').exists(), 'topk_s0 not archived yet'\n")
    (study / "topk_s2.yaml").unlink()
    summary = run_study(study, settings(jobs=1)).set_index("run")
    assert dict(summary["status"]) == {"topk_s0": "done", "topk_s1": "done"}
    assert sorted(p.name for p in archive.iterdir()) == ["topk_s0", "topk_s1"]
