"""evaluate_run's bookkeeping, with stand-in evals registered next to the real ones: reuse of current results,
re-runs when settings change, isolation of a failing eval, and the bad-input errors."""

import json
from dataclasses import dataclass

import pytest

from saelib.evals import EvalError, evaluate_run, run_results
from saelib.evals import suite
from tests.test_evals import tiny_sae

CALLS = []


@dataclass(frozen=True)
class FakeSettings:
    value: int = 1


SMOKE = FakeSettings(value=0)


def run_fake(sae, model, settings, artifacts_dir):
    CALLS.append(("fake", settings.value))
    return {"eval_type_id": "fake", "eval_result_metrics": {"m": {"value": settings.value, "d_sae": sae.cfg.d_sae}}}


def run_broken(sae, model, settings, artifacts_dir):
    raise RuntimeError("boom")


@pytest.fixture
def fake_evals(monkeypatch):
    CALLS.clear()
    monkeypatch.setitem(suite.EVALS, "fake", suite.EvalSpec("tests.test_eval_suite", "FakeSettings", "run_fake"))
    monkeypatch.setitem(suite.EVALS, "broken", suite.EvalSpec("tests.test_eval_suite", "FakeSettings", "run_broken"))


def make_run(tmp_path, seed=0, **kwargs):
    run = tmp_path / f"run{seed}"
    tiny_sae(seed=seed, **kwargs).save_model(run / "sae")
    return run


def test_results_are_written_reused_and_redone_when_settings_change(fake_evals, tiny_model, tmp_path):
    run = make_run(tmp_path)
    status = evaluate_run(run, tiny_model, ["fake"])
    assert status.loc[0, "status"] == "done" and CALLS == [("fake", 1)]
    stored = json.loads((run / "evals" / "fake.json").read_text())
    assert stored["eval_result_metrics"]["m"]["value"] == 1
    assert stored["eval_result_unstructured"]["saelib"]["settings"] == {"value": 1}
    assert evaluate_run(run, tiny_model, ["fake"]).loc[0, "status"] == "reused" and len(CALLS) == 1
    assert evaluate_run(run, tiny_model, ["fake"], settings={"fake": {"value": 2}}).loc[0, "status"] == "done"
    assert CALLS[-1] == ("fake", 2)
    assert evaluate_run(run, tiny_model, ["fake"], smoke=True).loc[0, "status"] == "done" and CALLS[-1] == ("fake", 0)
    assert set(run_results(run)) == {"fake"}


def test_a_result_from_an_older_version_of_the_eval_is_redone(fake_evals, tiny_model, tmp_path, monkeypatch):
    run = make_run(tmp_path)
    assert evaluate_run(run, tiny_model, ["fake"]).loc[0, "status"] == "done"
    monkeypatch.setitem(suite.EVALS, "fake", suite.EvalSpec("tests.test_eval_suite", "FakeSettings", "run_fake",
                                                            version=2))
    assert evaluate_run(run, tiny_model, ["fake"]).loc[0, "status"] == "done" and len(CALLS) == 2
    assert evaluate_run(run, tiny_model, ["fake"]).loc[0, "status"] == "reused"


def test_a_failing_eval_does_not_lose_the_others(fake_evals, tiny_model, tmp_path):
    run = make_run(tmp_path)
    status = evaluate_run(run, tiny_model, ["broken", "fake"]).set_index("eval")
    assert status.loc["broken", "status"] == "failed" and "boom" in status.loc["broken", "message"]
    assert status.loc["fake", "status"] == "done"
    assert (run / "evals" / "fake.json").exists() and not (run / "evals" / "broken.json").exists()


def test_a_results_file_from_another_sae_is_an_error(fake_evals, tiny_model, tmp_path):
    run, other = make_run(tmp_path, seed=0), make_run(tmp_path, seed=1)
    evaluate_run(other, tiny_model, ["fake"])
    (run / "evals").mkdir()
    (run / "evals" / "fake.json").write_text((other / "evals" / "fake.json").read_text())
    with pytest.raises(EvalError, match="another SAE"):
        evaluate_run(run, tiny_model, ["fake"])
    assert evaluate_run(run, tiny_model, ["fake"], force=True).loc[0, "status"] == "done"


def test_bad_input_is_a_clear_error(fake_evals, tiny_model, tmp_path):
    run = make_run(tmp_path)
    with pytest.raises(EvalError, match="evals: expected names from"):
        evaluate_run(run, tiny_model, ["fake", "nonsense"])
    with pytest.raises(EvalError, match="run_dir: expected a trained SAE"):
        evaluate_run(tmp_path, tiny_model, ["fake"])
    with pytest.raises(EvalError, match="run_dir: expected an existing run folder"):
        evaluate_run(tmp_path / "missing", tiny_model, ["fake"])
    with pytest.raises(EvalError, match=r"settings\['fake'\]: expected fields"):
        evaluate_run(run, tiny_model, ["fake"], settings={"fake": {"nope": 1}})
    with pytest.raises(EvalError, match="model: expected d_model 32"):
        evaluate_run(make_run(tmp_path, seed=2, d_in=32), tiny_model, ["fake"])
    assert not (run / "evals").exists() and CALLS == []


def test_a_model_without_the_sae_hook_is_an_error(fake_evals, tiny_model, tmp_path):
    run = tmp_path / "run"
    sae = tiny_sae()
    sae.cfg.metadata.hook_name = "blocks.7.hook_resid_post"
    sae.save_model(run / "sae")
    with pytest.raises(EvalError, match="model: expected a model with hook blocks.7.hook_resid_post"):
        evaluate_run(run, tiny_model, ["fake"])


def test_a_result_that_reads_another_is_redone_when_that_one_changes(fake_evals, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(suite.DEPENDS_ON, "fake", "upstream")
    monkeypatch.setitem(suite.EVALS, "upstream", suite.EvalSpec("tests.test_eval_suite", "FakeSettings", "run_fake"))
    run = make_run(tmp_path)
    evaluate_run(run, tiny_model, ["fake"])
    assert evaluate_run(run, tiny_model, ["fake"]).loc[0, "status"] == "reused"
    status = evaluate_run(run, tiny_model, ["upstream", "fake"]).set_index("eval")["status"]
    assert status["upstream"] == "done" and status["fake"] == "done"  # upstream appeared within the same call
    assert evaluate_run(run, tiny_model, ["upstream", "fake"])["status"].tolist() == ["reused", "reused"]


def test_evals_that_read_the_run_folder_say_so_in_the_registry():
    import inspect

    from saelib.evals.suite import EVALS

    for name, spec in EVALS.items():
        _, _, run = spec.load()
        assert ("run_dir" in inspect.signature(run).parameters) == spec.takes_run_dir, name


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="no CUDA device on this machine"))])
def test_the_sae_side_of_the_evals_runs_on_the_lms_device(fake_evals, tmp_path, device, monkeypatch):
    import torch

    from saelib.models import tiny_random_model

    load, asked, seen = suite.common.load_run_sae, [], []

    def load_run_sae(run_dir, device=None):  # records what evaluate_run asks for (None: it did not say)
        asked.append(device)
        return load(run_dir, device=device or "cpu")

    monkeypatch.setattr(suite.common, "load_run_sae", load_run_sae)
    monkeypatch.setattr(suite.common, "check_model_matches", lambda sae, model: seen.append(sae.W_dec.device.type))
    model = tiny_random_model(device=device)
    assert evaluate_run(make_run(tmp_path), model, ["fake"]).loc[0, "status"] == "done"
    assert asked == [str(model.cfg.device)] and seen == [torch.device(device).type]


def test_the_evaluate_notebook_loads_the_lm_on_the_runs_device(tmp_path):
    from saelib.config import run_device

    (tmp_path / "cfg.json").write_text(json.dumps({"device": "cuda"}))
    assert run_device(tmp_path) == "cuda" and run_device(tmp_path / "missing") == "cpu"


def test_the_eval_modules_import_each_other_without_a_circle():
    """Every ``saelib.evals`` import between the eval modules, lazy ones inside functions included, points one way."""
    import ast
    from pathlib import Path

    import saelib.evals

    folder = Path(saelib.evals.__file__).parent
    edges = {}
    for path in folder.glob("*.py"):
        if path.stem == "__init__":
            continue
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("saelib.evals."):
                found.add(node.module.split(".")[2])
            elif isinstance(node, ast.ImportFrom) and node.module == "saelib.evals":
                found.update(a.name for a in node.names if (folder / f"{a.name}.py").exists())
        edges[path.stem] = found - {path.stem}

    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, (*seen, n))) for n in edges.get(start, ()))

    assert not [m for m in edges if reaches(m, m)], edges


def test_an_evals_follow_up_is_declared_in_the_registry_not_special_cased():
    from saelib.evals.suite import EVALS

    assert EVALS["core"].after == "write_headline"  # metrics.json's headline comes from core's result
    for spec in EVALS.values():
        module, _, _ = spec.load()
        assert not spec.after or callable(getattr(module, spec.after)), spec
