"""The gemma-2-2b profile end to end without its weights: params file → RunConfig → TL's hard-coded gemma-2-2b config
on the meta device (no memory, no hub) → the profile's hook and its activation shape → an SAE of the profile's size
for every architecture of its grid → one training step on activations of that shape."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from saelib.config import build_config, grid_runs

PARAMS = Path(__file__).parents[1] / "params" / "gemma-2-2b"


@pytest.fixture(scope="module")
def gemma_2_2b_meta():
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    cfg = get_pretrained_model_config("google/gemma-2-2b")
    cfg.tokenizer_name = None  # else TL fetches the tokenizer from the hub
    cfg.device = "meta"
    with torch.device("meta"):
        return HookedTransformer(cfg)


def _one_run_per_architecture() -> list[str]:
    seen: dict[str, str] = {}
    for name, overrides in grid_runs(PARAMS).items():
        seen.setdefault(overrides.get("architecture", "topk"), name)
    return sorted(seen.values())


@pytest.mark.parametrize("run", _one_run_per_architecture())
def test_gemma_2_2b_profile_walks_end_to_end_on_meta(run, gemma_2_2b_meta):
    from saelib.train import build_training_sae

    cfg = build_config(params_file=PARAMS / f"{run}.yaml")
    assert cfg.model_name == "gemma-2-2b" and cfg.device == "cuda" and cfg.d_sae == 16_384
    model = gemma_2_2b_meta
    assert cfg.hook_name in model.hook_dict, cfg.hook_name
    with torch.device("meta"):
        _, cache = model.run_with_cache(torch.zeros(2, 8, dtype=torch.long), stop_at_layer=cfg.hook_layer + 1,
                                        names_filter=[cfg.hook_name])
    acts = cache[cfg.hook_name]
    assert acts.shape == (2, 8, model.cfg.d_model) == (2, 8, 2304)

    # the SAE of the profile's size, on the CPU (no GPU here), fed activations of the LM's shape
    assert (cfg.activations, cfg.lm_precision) == ("stream", "bfloat16")  # the profile streams, its LM in bf16
    sae = build_training_sae(dataclasses.replace(cfg, device="cpu", lm_precision="auto"), d_in=acts.shape[-1])
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.metadata.hook_name) == (2304, cfg.d_sae, cfg.hook_name)
    from sae_lens.saes.sae import TrainStepInput

    coefficients = {name: getattr(c, "value", c) for name, c in sae.get_coefficients().items()}
    x = torch.randn(acts.shape[0] * acts.shape[1], acts.shape[-1], generator=torch.Generator().manual_seed(0))
    out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coefficients, dead_neuron_mask=None,
                                                   n_training_steps=0, is_logging_step=False))
    assert out.sae_out.shape == x.shape and torch.isfinite(out.loss)
    if cfg.architecture == "gram_topk":
        return  # its exact 16k × 16k Gram penalty's backward takes a minute on 2 CPU cores (milliseconds on a GPU)
    out.loss.backward()
    assert sae.W_dec.grad is not None and sae.W_dec.grad.shape == (cfg.d_sae, 2304)
