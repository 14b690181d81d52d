"""Model loading by short name: tiny model, unknown names, and the hub path failing fast offline."""

import time

import pytest

from saelib.models import MODELS, get_spec, load_model, tiny_random_model


def test_tiny_model_is_deterministic():
    a, b = tiny_random_model(seed=0), tiny_random_model(seed=0)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert (pa == pb).all(), name


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"^model_name: unknown model 'gpt-9'"):
        get_spec("gpt-9")


def test_hub_model_fails_fast_offline_and_names_the_default(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    with pytest.raises(RuntimeError, match="not reachable.*offline default model_name='gemma-3-270m'"):
        load_model("gemma-2-2b")
    assert time.time() - start < 10


def test_hub_model_fails_fast_when_the_hub_does_not_answer(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.time()
    with pytest.raises(RuntimeError, match="not reachable"):
        load_model("gemma-2-2b")
    assert time.time() - start < 10


def test_one_hub_check_says_why_the_hub_cannot_be_used(monkeypatch):
    from saelib.models import hub_problem

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "true")
    assert hub_problem() == "HF_DATASETS_OFFLINE=true is set"
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert hub_problem(timeout=2).startswith("http://127.0.0.1:9 is unreachable")


def test_gemma_2_2b_profile_shapes_without_weights():
    """The GPU profile's hook and width exist in TL's hard-coded config (meta device: no memory, no hub)."""
    import torch
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    cfg = get_pretrained_model_config("google/gemma-2-2b")
    cfg.tokenizer_name = None
    cfg.device = "meta"
    assert (cfg.n_layers, cfg.d_model) == (MODELS["gemma-2-2b"].n_layers, MODELS["gemma-2-2b"].d_model)
    with torch.device("meta"):
        model = HookedTransformer(cfg)
        _, cache = model.run_with_cache(torch.zeros(1, 4, dtype=torch.long), stop_at_layer=13,
                                        names_filter=["blocks.12.hook_resid_post"])
    assert cache["blocks.12.hook_resid_post"].shape == (1, 4, 2304)


@pytest.mark.real_model
def test_embedded_gemma_is_real(real_model):
    """Next-token loss on ordinary English is far below a random model's (≈ 12.5 nats)."""
    text = ("The committee met on Tuesday to discuss the budget for the coming year. After a long debate, "
            "the members agreed to increase spending on schools and roads.")
    loss = real_model(real_model.to_tokens(text), return_type="loss").item()
    assert loss < 4.0
    assert real_model.cfg.n_layers == 18 and real_model.cfg.d_model == 640


def test_model_loading_ignores_the_datasets_only_offline_variable(monkeypatch):
    from saelib.models import hub_problem

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert hub_problem(timeout=2, variables=("HF_HUB_OFFLINE",)).startswith("http://127.0.0.1:9 is unreachable")


LAYOUT_CASES = {  # one layer at real sizes: the bf16 kernels differ by operand layout at these, not at toy sizes
    "plain MLP, 4 heads": dict(d_model=768, d_head=64, n_heads=12, d_mlp=3072, normalization_type="LN"),
    "gated MLP, GQA with 2 key/value heads": dict(d_model=640, d_head=128, n_heads=4, n_key_value_heads=2,
                                                 d_mlp=2048, gated_mlp=True, normalization_type="RMS"),
    "Gemma 3 270M's layer: gated MLP, 1 key/value head": dict(d_model=640, d_head=256, n_heads=4,
                                                               n_key_value_heads=1, d_mlp=2048, gated_mlp=True,
                                                               normalization_type="RMS"),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_weights_laid_out_for_linear_give_the_same_outputs_bit_for_bit_without_copies(case, dtype):
    """``lay_out_for_linear`` stores the weights as TransformerLens's forward hands them to ``F.linear``: same
    values and shapes; every hook's activation and the logits equal the row-major model's bit for bit, in fp32
    and bf16; what the forward took a copy of is now a view, and what it did not copy is left as it was."""
    import copy

    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from saelib.models import lay_out_for_linear

    extra = LAYOUT_CASES[case]
    cfg = HookedTransformerConfig(n_layers=1, d_vocab=1000, n_ctx=32, act_fn="gelu", seed=0,
                                  dtype=getattr(torch, dtype), **extra)
    stock = HookedTransformer(cfg).eval()
    ours = lay_out_for_linear(copy.deepcopy(stock))
    assert all(p.is_contiguous() for p in stock.parameters())
    for (name, a), (_, b) in zip(stock.named_parameters(), ours.named_parameters()):
        assert a.shape == b.shape and torch.equal(a, b), name
    block = ours.blocks[0]
    assert ours.unembed.W_U.T.is_contiguous() and block.attn.W_O.permute(2, 0, 1).is_contiguous()
    assert block.attn.W_Q.transpose(1, 2).is_contiguous()
    if extra.get("gated_mlp"):
        assert all(p.T.is_contiguous() for p in (block.mlp.W_in, block.mlp.W_gate, block.mlp.W_out))
        kv_heads = extra["n_key_value_heads"]
        assert block.attn._W_K.is_contiguous() == (kv_heads == 1)  # one head: its rearrange is a view already
    else:
        assert block.mlp.W_in.is_contiguous() and block.mlp.W_out.is_contiguous()  # addmm takes them as they are
    tokens = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits_a, cache_a = stock.run_with_cache(tokens)
        logits_b, cache_b = ours.run_with_cache(tokens)
    assert torch.equal(logits_a, logits_b)
    assert cache_a.keys() == cache_b.keys()
    for name in cache_a.keys():
        assert torch.equal(cache_a[name], cache_b[name]), name


def test_load_model_lays_out_its_weights_for_linear():
    model = load_model("tiny-random", precision="float32")
    assert model.unembed.W_U.T.is_contiguous() and model.blocks[0].attn.W_O.permute(2, 0, 1).is_contiguous()
