"""What every saelib eval shares: error types, the SAE/model checks, and result files in a run folder.

A run folder's eval results live in ``<run>/evals/<eval>.json``, each in SAEBench's output format, with saelib's
bookkeeping under ``eval_result_unstructured["saelib"]``: the settings used and a fingerprint of the SAE's weights.
A stored result is reused when both match; a result whose fingerprint differs belongs to another SAE and is an error
(it is never silently overwritten or reused).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from saelib import run_files


class EvalError(ValueError):
    """Bad input to an eval (which parameter, what was expected)."""


class EvalUnavailable(RuntimeError):
    """The eval cannot run on this machine (e.g. it needs the hub or a gated dataset); the message says why."""


EVALS_DIR = "evals"


def load_run_sae(run_dir: Path, device: str = "cpu"):
    """The finished SAE of a run folder (``<run>/sae``), or an EvalError saying what is missing."""
    from sae_lens import SAE

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EvalError(f"run_dir: expected an existing run folder, got {str(run_dir)!r}")
    sae_dir = run_dir / run_files.SAE_DIR
    if not (sae_dir / "cfg.json").exists():
        raise EvalError(f"run_dir: expected a trained SAE in {sae_dir} (train the run first), found none")
    return SAE.load_from_disk(sae_dir, device=device)


def hook_name_of(sae) -> str:
    return sae.cfg.metadata.hook_name


def check_model_matches(sae, model) -> None:
    """The model must have the SAE's hook, with the SAE's width there."""
    hook = hook_name_of(sae)
    if hook not in model.hook_dict:
        raise EvalError(f"model: expected a model with hook {hook} (the SAE's), "
                        f"got {model.cfg.model_name} with {model.cfg.n_layers} layers")
    if model.cfg.d_model != sae.cfg.d_in:
        raise EvalError(f"model: expected d_model {sae.cfg.d_in} (the SAE's d_in) at {hook}, "
                        f"got {model.cfg.model_name} with d_model {model.cfg.d_model}")


def sae_fingerprint(sae) -> str:
    """sha256 over the SAE's parameters (names, shapes, bytes): identifies the SAE a result belongs to."""
    digest = hashlib.sha256()
    for name, tensor in sorted(sae.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return digest.hexdigest()[:16]


def settings_dict(settings: Any) -> dict[str, Any]:
    data = dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else dict(settings)
    return json.loads(json.dumps(data, default=str))


def result_path(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / EVALS_DIR / f"{name}.json"


def stored_result(path: Path, fingerprint: str, settings: dict[str, Any]) -> dict | None:
    """The stored result if it is current (same SAE and settings); None if missing or made with other settings.

    Raises EvalError if the file belongs to another SAE."""
    if not path.exists():
        return None
    result = run_files.read_json(path)
    meta = (result.get("eval_result_unstructured") or {}).get("saelib", {}) if isinstance(
        result.get("eval_result_unstructured"), dict) else {}
    stored_fp = meta.get("sae_fingerprint")
    if stored_fp is not None and stored_fp != fingerprint:
        raise EvalError(f"{path}: holds results of another SAE (fingerprint {stored_fp}, this SAE {fingerprint}); "
                        "move it away or pass force=True to replace it")
    if stored_fp is None or meta.get("settings") != settings:
        return None
    return result


def write_result(path: Path, result: dict, fingerprint: str, settings: dict[str, Any], wall_time_s: float) -> dict:
    """Attach saelib's bookkeeping and write the SAEBench JSON atomically."""
    unstructured = result.get("eval_result_unstructured")
    if not isinstance(unstructured, dict):
        unstructured = {} if unstructured is None else {"sae_bench": unstructured}
    unstructured["saelib"] = {"settings": settings, "sae_fingerprint": fingerprint, "wall_time_s": wall_time_s}
    result = {**result, "eval_result_unstructured": unstructured}
    path.parent.mkdir(parents=True, exist_ok=True)
    run_files.write_json_atomic(path, result)
    return result


def provenance(sae) -> dict[str, Any]:
    """The SAEBench output fields that say what produced a result (shared by every saelib eval)."""
    from importlib.metadata import version

    return {"sae_bench_commit_hash": f"sae-bench=={version('sae_bench')}", "sae_lens_id": "saelib",
            "sae_lens_release_id": "saelib", "sae_lens_version": version("sae_lens"),
            "sae_cfg_dict": json.loads(json.dumps(sae.cfg.to_dict(), default=str))}


def heldout_split(sae, model, dataset: str, context_size: int, eval_tokens: int, eval_ce_tokens: int = 0):
    """(activation cache, token sequences) of the held-out split at the SAE's hook: the study's shared eval cache."""
    from types import SimpleNamespace

    from saelib.activations import cache_for_config, split_tokens

    cfg = SimpleNamespace(model_name=sae.cfg.metadata.model_name, hook_name=sae.cfg.metadata.hook_name,
                          dataset=dataset, context_size=context_size, eval_tokens=eval_tokens,
                          eval_ce_tokens=eval_ce_tokens, cache_tokens=eval_tokens, dtype="float32")
    return cache_for_config(cfg, model, "eval"), split_tokens(cfg, model, "eval")
