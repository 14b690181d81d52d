"""`make lab` starts JupyterLab; it opens notebooks/*.py as notebooks (jupytext) and has plotly's extension."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JUPYTER = Path(sys.executable).with_name("jupyter")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, token: str) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1, never through a proxy
    with opener.open(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def lab_server(tmp_path):
    port, token = _free_port(), "saelib-test-token"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg")}
    server = subprocess.Popen(  # the Makefile's own target, in its own process group (make → jupyter)
        ["make", "-s", "lab", f"LAB_PORT={port}", f"LAB_ARGS=--IdentityProvider.token={token}"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                _get(f"{base}/api/status", token)
                break
            except OSError:
                if server.poll() is not None:
                    pytest.fail(f"jupyter lab exited: {server.stderr.read()[-2000:]}")
                time.sleep(0.5)
        else:
            pytest.fail("jupyter lab did not answer within 60 s")
        yield base, token
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:  # it had already exited
            pass


def test_lab_opens_the_jupytext_source_as_a_notebook_with_plotly(lab_server):
    base, token = lab_server
    model = _get(f"{base}/api/contents/notebooks/train.py?content=1", token)
    assert model["type"] == "notebook", "jupytext's contents manager should serve notebooks/*.py as notebooks"
    cells = model["content"]["cells"]
    tagged = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1 and "orth_pen = " in tagged[0]["source"]
    extensions = subprocess.run([str(JUPYTER), "labextension", "list"], capture_output=True, text=True)
    listed = extensions.stdout + extensions.stderr
    assert "jupyterlab-plotly" in listed and "jupyterlab-jupytext" in listed
