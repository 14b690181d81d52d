"""benchmarks/gpu_check.py: its own smoke run (tiny sizes, on the CPU), its fallback detector and its bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))


def test_a_tensor_left_on_the_cpu_fails_loudly():
    from gpu_check import FellBackToCPU, on_device

    on_device("x", [torch.zeros(2)], torch.device("cpu"))
    with pytest.raises(FellBackToCPU, match="^the LM's weights is on cpu, not on cuda"):
        on_device("the LM's weights", [torch.zeros(2)], torch.device("cuda"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("args, message", [([], "device: 'cuda' was asked for"),
                                           (["--device", "cpu"], "--device cpu is for --smoke only")])
def test_bad_device_is_one_line(args, message):
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and message in proc.stderr


@pytest.mark.real_model
def test_smoke_run_prints_one_json_line_with_every_figure():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--smoke"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("stock_topk_tokens_per_s", "saelib_topk_tokens_per_s", "speedup_vs_stock", "sgo_overhead",
                "lm_float32_tokens_per_s", "heldout_explained_variance", "train_steps", "wall_seconds"):
        assert key in result, key
    assert result["train_steps"] == 20 and 0 < result["saelib_topk_tokens_per_s"]
    assert -1 < result["heldout_explained_variance"] <= 1
