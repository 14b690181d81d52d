"""The study runner on a real local Ray head (127.0.0.1, 2 CPUs): the same outcomes as the local pool — runs done, a
failing run reported while the others finish, a second call that does nothing — and clear errors for an unreachable
address or a cluster without the GPUs a run asks for. No mock of Ray."""

import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from saelib.config import ConfigError
from saelib.study import main, run_study
from tests.test_study import settings, steps, study  # noqa: F401 (the stand-in study fixture)

RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """``ray start --head --num-cpus 2`` on 127.0.0.1 (its own temp dir, short enough for Unix socket paths), stopped
    at the end."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    subprocess.run([RAY, "start", "--head", "--num-cpus", "2", "--num-gpus", "0", "--port", str(port),
                    "--node-ip-address", "127.0.0.1", "--include-dashboard", "false", "--disable-usage-stats",
                    "--temp-dir", temp], check=True, capture_output=True, timeout=120)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_study_runs_on_ray_like_it_runs_locally(study, ray_head, caplog):  # noqa: F811
    caplog.set_level(logging.INFO)
    (study / "bad.yaml").write_text("seed: 13\n")  # fails in its notebook
    on_ray = settings(ray=ray_head, num_cpus=1)
    summary = run_study(study, on_ray).set_index("run")
    assert summary.loc["bad", "status"] == "failed in evaluate"
    assert "this run is meant to fail" in (study.parent.parent / "runs" / "mini" / "bad" / "evaluate.log").read_text()
    assert [summary.loc[f"topk_s{s}", "status"] for s in range(3)] == ["done"] * 3
    assert steps(study, "topk_s2") == [1, 2, 3]
    assert "as tasks on the Ray cluster at" in caplog.text
    (study / "bad.yaml").unlink()
    again = run_study(study, on_ray)
    assert list(again["status"]) == ["current"] * 3 and "nothing to do" in caplog.text
    assert steps(study, "topk_s2") == [1, 2, 3]  # not executed again
    local = run_study(study, settings())  # the local pool reads the same stamps
    assert list(local["status"]) == ["current"] * 3


def test_a_cluster_without_the_gpus_a_run_asks_for_is_refused_before_anything_runs(study, ray_head):  # noqa: F811
    with pytest.raises(ConfigError, match=r"^num_gpus: run topk_s0 asks for 1 GPU\(s\), the largest node of the Ray "
                                          r"cluster at .* has 0$"):
        run_study(study, settings(ray=ray_head, num_gpus=1))
    with pytest.raises(ConfigError, match=r"^num_cpus: run topk_s0 asks for 3 CPU\(s\), the largest node .* has 2$"):
        run_study(study, settings(ray=ray_head, num_cpus=3))  # the cluster's one node has 2
    assert not (study.parent.parent / "runs").exists()


def test_an_unreachable_address_is_one_line_within_seconds(study, caplog):  # noqa: F811
    start = time.time()
    code = main([str(study), "--notebooks", "notebooks/evaluate.ipynb", "--ray", f"127.0.0.1:{_free_port()}"])
    assert code == 2 and time.time() - start < 15
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("ray: no Ray cluster answers at '127.0.0.1:"), errors
    assert not (study.parent.parent / "runs").exists()


@pytest.mark.parametrize("field, value", [("num_gpus", -1), ("num_cpus", "two"), ("num_gpus", True), ("ray", "")])
def test_bad_ray_settings_name_the_field(field, value):
    from saelib.study import RunnerSettings

    with pytest.raises(ConfigError, match=f"^{field}: expected"):
        RunnerSettings(**{field: value}).validate()


def test_a_task_that_raised_is_reported_by_its_cause():
    from ray.exceptions import RayTaskError, WorkerCrashedError

    from saelib.ray_runner import failure_message

    err = RayTaskError("saelib:topk_s0", "Traceback ...", ValueError("cache_tokens: too few rows"))
    assert failure_message(err) == "ValueError: cache_tokens: too few rows"
    assert failure_message(WorkerCrashedError()).startswith("The worker died")
