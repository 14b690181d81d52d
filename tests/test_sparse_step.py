"""The sparse TopK step against sae_lens's own dense TopK step, on small sizes."""

import json
import os
import platform
from pathlib import Path

import pytest
import torch
from sae_lens import (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, MatryoshkaBatchTopKTrainingSAE,
                      MatryoshkaBatchTopKTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig)
from sae_lens.saes.sae import TrainStepInput

from saelib.sparse_step import (SparseBatchTopKTrainingSAE, SparseBatchTopKTrainingSAEConfig,
                                SparseMatryoshkaBatchTopKTrainingSAE, SparseMatryoshkaBatchTopKTrainingSAEConfig,
                                SparseTopKTrainingSAE, SparseTopKTrainingSAEConfig, bf16_native, keep_freed_memory,
                                resolve_precision, sparse_feature_acts)

D, F_, K, B = 24, 96, 6, 64


def pair(precision="float32", seed=0, **kw):
    """A stock sae_lens TopK training SAE and a sparse one with identical weights."""
    common = dict(d_in=D, d_sae=F_, k=K, **kw)
    torch.manual_seed(seed)
    stock = TopKTrainingSAE(TopKTrainingSAEConfig(**common))
    sparse = SparseTopKTrainingSAE(SparseTopKTrainingSAEConfig(sae_precision=precision, **common))
    sparse.load_state_dict(stock.state_dict())
    with torch.no_grad():  # non-trivial biases and decoder norms, so every gradient path is exercised
        for sae in (stock, sparse):
            torch.manual_seed(seed + 1)
            sae.b_dec.copy_(torch.randn(D) * 0.1)
            sae.b_enc.copy_(torch.randn(F_) * 0.1)
            sae.W_dec.mul_(torch.rand(F_, 1) + 0.5)
    return stock, sparse


def step_input(seed=2, dead=None):
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5
    return TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0,
                          is_logging_step=False)


def loss_and_grads(sae, inp):
    sae.zero_grad()
    out = sae.training_forward_pass(inp)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in sae.named_parameters()}


@pytest.mark.parametrize("kw", [{}, {"rescale_acts_by_decoder_norm": False}, {"apply_b_dec_to_input": False}])
@pytest.mark.parametrize("with_dead", [False, True])
def test_fp32_sparse_step_matches_sae_lens_dense_step(kw, with_dead):
    stock, sparse = pair(**kw)
    dead = (torch.arange(F_) % 3 == 0) if with_dead else None  # 32 dead latents: k_aux = min(D/2, 32) = 12
    ref, ref_grads = loss_and_grads(stock, step_input(dead=dead))
    out, grads = loss_and_grads(sparse, step_input(dead=dead))
    assert set(out.losses) == set(ref.losses)
    for name in ref.losses:
        torch.testing.assert_close(out.losses[name], ref.losses[name], rtol=1e-5, atol=1e-6)
    if with_dead:
        assert ref.losses["auxiliary_reconstruction_loss"] > 0
    torch.testing.assert_close(out.sae_out, ref.sae_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.feature_acts.to_dense(), ref.feature_acts, rtol=1e-5, atol=1e-5)
    assert set(grads) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")


def test_one_adam_update_matches():
    stock, sparse = pair()
    for sae in (stock, sparse):
        opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
        loss_and_grads(sae, step_input())
        opt.step()
    for name, p in stock.named_parameters():
        torch.testing.assert_close(dict(sparse.named_parameters())[name], p, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not bf16_native("cpu"), reason="this CPU has no native bf16")
def test_bf16_step_loss_is_within_a_percent_of_fp32():
    _, fp32 = pair("float32")
    _, bf16 = pair("bfloat16")
    assert bf16.precision == "bfloat16"
    a = fp32.training_forward_pass(step_input()).losses["mse_loss"].detach()
    b = bf16.training_forward_pass(step_input()).losses["mse_loss"].detach()
    # bf16 keeps 8 mantissa bits: pre-activations within ~0.4 %, and the TopK choice may differ at near ties
    assert abs(float(b) / float(a) - 1) < 0.01


def test_trainer_statistics_accept_the_sparse_feature_acts():
    idx = torch.tensor([[0, 3], [1, 3]])
    acts = torch.tensor([[1.0, 0.0], [2.0, 0.5]])  # a TopK value of 0 did not fire
    fa = sparse_feature_acts(idx, acts, 5)
    firing = fa.bool().float()
    assert firing.sum(0).to_dense().tolist() == [1, 1, 0, 1, 0]
    assert firing.sum(-1).to_dense().tolist() == [1, 2]


def test_precision_is_resolved_and_validated(monkeypatch):
    import saelib.sparse_step as s

    monkeypatch.setattr(s, "bf16_native", lambda device="cpu": False)
    assert resolve_precision("auto", "cpu") == "float32"
    with pytest.raises(ValueError, match="^sae_precision: 'bfloat16' was asked for, but cpu has no native bf16"):
        SparseTopKTrainingSAEConfig(d_in=D, d_sae=F_, k=K, sae_precision="bfloat16")
    with pytest.raises(ValueError, match=r"^sae_precision: expected one of \['auto', 'float32', 'bfloat16'\]"):
        resolve_precision("float16", "cpu")
    monkeypatch.setattr(s, "bf16_native", lambda device="cpu": True)
    monkeypatch.setattr(s, "cpu_bf16_speedup", lambda: 3.7)  # Zen 5
    assert resolve_precision("auto", "cpu") == "bfloat16"
    assert resolve_precision("float32", "cpu") == "float32"
    monkeypatch.setattr(s, "cpu_bf16_speedup", lambda: 0.55)  # native, but slower: an Intel Xeon (6/207)
    assert resolve_precision("auto", "cpu") == "float32"
    assert resolve_precision("bfloat16", "cpu") == "bfloat16"  # asked for: granted where native


@pytest.fixture
def fresh_speed_record():
    """The in-process record of the bf16 timing, empty before the test and after it (pass or fail): a fake timing
    must not decide 'auto' for the tests that follow."""
    import saelib.sparse_step as s

    s.cpu_bf16_speedup.cache_clear()
    yield s.cpu_bf16_speedup.cache_clear
    s.cpu_bf16_speedup.cache_clear()


def test_auto_is_timed_once_per_machine_and_every_process_reads_the_same_answer(monkeypatch, tmp_path,
                                                                                fresh_speed_record):
    """bf16 native but slower than fp32 (a CPU that reports avx512_bf16 and runs it at half fp32's speed) makes
    'auto' pick fp32; the timing is kept in the cache, so a second process neither times again nor decides otherwise."""
    import saelib.sparse_step as s

    timed = []

    def timing(fp32, bf16):
        return lambda: timed.append(1) or {"float32": fp32, "bfloat16": bf16}

    monkeypatch.setattr(s, "bf16_native", lambda device="cpu": True)
    monkeypatch.setattr(s, "time_matmuls", timing(0.034, 0.066))
    assert resolve_precision("auto", "cpu") == "float32" and len(timed) == 1
    record = json.loads((tmp_path / "saelib-cache" / s.SPEED_FILE).read_text())
    assert list(record.values()) == [{"float32_s": 0.034, "bfloat16_s": 0.066, "speedup": 0.515}]
    assert list(record) == [f"{s.cpu_id()} | torch {torch.__version__}"]
    assert not list((tmp_path / "saelib-cache").glob("*partial*"))
    fresh_speed_record()  # a new process: reads the record, whatever its thread count
    monkeypatch.setattr(s, "time_matmuls", timing(0.034, 0.009))
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // 2))
    try:
        assert resolve_precision("auto", "cpu") == "float32" and len(timed) == 1
    finally:
        torch.set_num_threads(threads)
    (tmp_path / "saelib-cache" / s.SPEED_FILE).write_text("{not json")  # a damaged record is timed anew
    fresh_speed_record()
    assert resolve_precision("auto", "cpu") == "bfloat16" and len(timed) == 2
    fresh_speed_record()
    assert s.bf16_speedup("cpu") == pytest.approx(3.778) and len(timed) == 2
    monkeypatch.setattr(s, "bf16_native", lambda device="cpu": False)
    assert s.bf16_speedup("cpu") == 0.0 and len(timed) == 2  # not native: nothing to time


def test_the_matmul_timing_times_each_precision_on_one_thread_and_leaves_the_thread_count():
    import saelib.sparse_step as s

    threads = torch.get_num_threads()
    seen = []
    real = torch.Tensor.__matmul__

    def spy(x, y):
        seen.append((x.dtype, torch.get_num_threads()))
        return real(x, y)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "__matmul__", spy)
        seconds = s.time_matmuls(8, 8, 8, repeats=2)
    assert set(seconds) == {"float32", "bfloat16"} and all(0 < t < 1 for t in seconds.values())
    assert seen == [(torch.float32, 1), (torch.bfloat16, 1)] * 3 and torch.get_num_threads() == threads
    state = torch.get_rng_state()
    s.time_matmuls(8, 8, 8, repeats=1)
    assert torch.equal(torch.get_rng_state(), state)  # the timing never draws from the global RNG (a seeded init)


def test_a_held_auto_overrides_the_timing_and_a_bad_hold_is_a_clear_error(monkeypatch):
    import saelib.sparse_step as s

    monkeypatch.setattr(s, "bf16_native", lambda device="cpu": True)
    monkeypatch.setattr(s, "cpu_bf16_speedup", lambda: 0.55)
    with s.auto_held("bfloat16"):
        assert resolve_precision("auto", "cpu") == "bfloat16" and os.environ[s.AUTO_ENV] == "bfloat16"
        with s.auto_held(None):  # no hold: the outer one stands
            assert resolve_precision("auto", "cpu", "lm_precision") == "bfloat16"
        assert resolve_precision("float32", "cpu") == "float32"  # a set precision is not 'auto'
    assert s.AUTO_ENV not in os.environ and resolve_precision("auto", "cpu") == "float32"
    with pytest.raises(RuntimeError), s.auto_held("bfloat16"):
        raise RuntimeError("a study stopped part-way")
    assert s.AUTO_ENV not in os.environ  # the hold ends however its block ends
    monkeypatch.setenv(s.AUTO_ENV, "auto")  # empty or 'auto': no hold
    assert resolve_precision("auto", "cpu") == "float32"
    monkeypatch.setenv(s.AUTO_ENV, "float16")
    with pytest.raises(ValueError, match=r"^lm_precision: 'auto' is held by \$SAELIB_AUTO_PRECISION, which must be "
                                         r"'float32' or 'bfloat16' \(or unset\), got 'float16'$"):
        resolve_precision("auto", "cpu", "lm_precision")
    monkeypatch.setenv(s.AUTO_ENV, "bfloat16")
    monkeypatch.setattr(s, "bf16_native", lambda device="cpu": False)
    with pytest.raises(ValueError, match=r"^sae_precision: 'auto' is held at 'bfloat16' by \$SAELIB_AUTO_PRECISION, "
                                         r"but cpu has no native bf16; unset SAELIB_AUTO_PRECISION or set "
                                         r"sae_precision: float32$"):
        resolve_precision("auto", "cpu")
    with s.auto_held("float32"):
        assert resolve_precision("auto", "cpu") == "float32"
    assert os.environ[s.AUTO_ENV] == "bfloat16"  # what was there before is put back


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_keeps_a_large_freed_block_for_reuse():
    def resident_bytes():
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    assert keep_freed_memory() and keep_freed_memory()  # takes effect, and a second call is harmless
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB: over glibc's default 32 MiB mmap ceiling
    with_block = resident_bytes()
    del block
    assert resident_bytes() > with_block - 32 * 2**20  # by default it would be unmapped: resident size −64 MiB


BATCH_FAMILY = {
    "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, SparseBatchTopKTrainingSAE,
                  SparseBatchTopKTrainingSAEConfig, {}),
    "matryoshka": (MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig,
                   SparseMatryoshkaBatchTopKTrainingSAE, SparseMatryoshkaBatchTopKTrainingSAEConfig,
                   {"matryoshka_widths": [12, 40, F_]}),
}


@pytest.mark.parametrize("family", BATCH_FAMILY)
@pytest.mark.parametrize("kw", [{}, {"rescale_acts_by_decoder_norm": False}])
@pytest.mark.parametrize("with_dead", [False, True])
def test_fp32_sparse_batchtopk_steps_match_sae_lens(family, kw, with_dead):
    stock_cls, stock_cfg, sparse_cls, sparse_cfg, extra = BATCH_FAMILY[family]
    common = dict(d_in=D, d_sae=F_, k=float(K), **extra, **kw)
    torch.manual_seed(0)
    stock = stock_cls(stock_cfg(**common))
    sparse = sparse_cls(sparse_cfg(sae_precision="float32", **common))
    sparse.load_state_dict(stock.state_dict())
    with torch.no_grad():
        for sae in (stock, sparse):
            torch.manual_seed(1)
            sae.b_dec.copy_(torch.randn(D) * 0.1)
            sae.b_enc.copy_(torch.randn(F_) * 0.1)
            sae.W_dec.mul_(torch.rand(F_, 1) + 0.5)
    dead = (torch.arange(F_) % 3 == 0) if with_dead else None
    ref, ref_grads = loss_and_grads(stock, step_input(dead=dead))
    out, grads = loss_and_grads(sparse, step_input(dead=dead))
    rows_fired = (out.feature_acts.to_dense() > 0).sum(-1)
    assert rows_fired.min() < rows_fired.max()  # a varying number per row: BatchTopK, not TopK
    assert set(out.losses) == set(ref.losses)
    if family == "matryoshka":
        assert {"inner_mse_loss_12", "inner_mse_loss_40"} <= set(out.losses)
    for name in ref.losses:
        torch.testing.assert_close(out.losses[name], ref.losses[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(out.sae_out, ref.sae_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.feature_acts.to_dense(), ref.feature_acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse.topk_threshold, stock.topk_threshold)
    assert float(sparse.topk_threshold) > 0
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")


@pytest.mark.parametrize("row_scale", ["even", "uneven"], ids=["no row saturates", "some rows hold > 4k"])
def test_batchtopk_two_stage_selection_is_the_flat_topk(row_scale):
    g = torch.Generator().manual_seed(0)
    scale = torch.ones(B, 1) if row_scale == "even" else torch.rand(B, 1, generator=g) ** 4 * 10
    hidden = torch.randn(B, F_, generator=g) * scale
    sae = SparseBatchTopKTrainingSAE(SparseBatchTopKTrainingSAEConfig(d_in=D, d_sae=F_, k=float(K)))
    values, cols, rows = sae._select(hidden)
    expected = hidden.flatten().topk(K * B).indices.sort().values
    torch.testing.assert_close(rows * F_ + cols, expected, rtol=0, atol=0)
    torch.testing.assert_close(values, hidden.flatten()[expected])
    per_row = torch.bincount(rows, minlength=B)
    assert (per_row.max() > sae.CANDIDATES_PER_K * K) == (row_scale == "uneven")  # the fallback was needed


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_gpu_is_one_clear_error_before_anything_is_written(tmp_path):
    """A GPU profile is a valid declaration here (its params files are checked in CI), but running it stops at once,
    naming the field and the CPU default, before a run folder exists."""
    from saelib.config import build_config
    from saelib.models import load_model
    from saelib.sparse_step import require_device
    from saelib.train import train_sae

    with pytest.raises(ValueError, match=r"^device: 'cuda' was asked for, .* the CPU default is device: cpu$"):
        require_device("cuda")
    cfg = build_config({"device": "cuda", "runs_dir": str(tmp_path), "d_sae": 64, "k": 4}, profile="smoke")
    with pytest.raises(ValueError, match=r"^device: 'cuda'"):
        cfg.resolved_precisions()
    with pytest.raises(ValueError, match=r"^device: 'cuda:1'"):
        load_model("tiny-random", device="cuda:1")
    with pytest.raises(ValueError, match=r"^device: 'cuda'"):
        train_sae(cfg, cache=None)
    assert not any(tmp_path.iterdir())
    assert require_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("aux_dense", [False, True])
def test_the_step_is_bit_for_bit_repeatable_on_two_threads(aux_dense):
    """The same step twice gives the same gradients with 2 threads, at a size where the aux loss gathers 327,680
    decoder-norm entries (every row's 320 dead candidates): autograd's backward of ``norm_F[idx]`` (index_put with
    accumulate) sums in a thread-dependent order there, which made λ = 0 differ from TopK in a 16k training run.
    Both ways of computing the aux loss (sparse gathers, dense products over the dead columns)."""
    d_in, d_sae, batch = 640, 4096, 1024
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        sae = SparseTopKTrainingSAE(SparseTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=32,
                                                                 sae_precision="float32"))
        sae.aux_dense_max_ratio = {"float32": float("inf") if aux_dense else 0.0}
        with torch.no_grad():
            sae.W_dec.mul_(torch.rand(d_sae, 1) + 0.5)
        x = torch.randn(batch, d_in, generator=torch.Generator().manual_seed(1)) * 3
        dead = torch.zeros(d_sae, dtype=torch.bool)
        dead[:1000] = True

        def grads():
            sae.zero_grad()
            out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                           n_training_steps=5, is_logging_step=False))
            out.loss.backward()
            return {n: p.grad.clone() for n, p in sae.named_parameters()}

        first = grads()
        for _ in range(4):
            again = grads()
            assert all(torch.equal(first[n], again[n]) for n in first), \
                {n: float((first[n] - again[n]).abs().max()) for n in first}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kw", [{}, {"rescale_acts_by_decoder_norm": False}, {"apply_b_dec_to_input": False}])
def test_dense_aux_loss_matches_the_sparse_one_and_sae_lens(kw):
    """The aux loss over the dead columns as dense products (``aux_dense_max_ratio``) gives sae_lens's loss and the
    same gradients of all four parameters as the sparse gathers."""
    stock, sparse = pair(**kw)
    dead = (torch.arange(F_) % 3 == 0)  # 32 dead latents, k_aux 12
    ref, ref_grads = loss_and_grads(stock, step_input(dead=dead))
    sparse.aux_dense_max_ratio = {"float32": 0.0}  # always sparse
    _, sparse_grads = loss_and_grads(sparse, step_input(dead=dead))
    sparse.aux_dense_max_ratio = {"float32": 8.0}
    out, grads = loss_and_grads(sparse, step_input(dead=dead))
    torch.testing.assert_close(out.losses["auxiliary_reconstruction_loss"],
                               ref.losses["auxiliary_reconstruction_loss"], rtol=1e-5, atol=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")
        torch.testing.assert_close(grads[name], sparse_grads[name], rtol=1e-5, atol=1e-6, msg=f"{name} vs sparse")
    sparse.aux_dense_max_ratio = {"float32": 2.0}  # 32 dead > 2 · 12: the sparse path again
    _, again = loss_and_grads(sparse, step_input(dead=dead))
    assert all(torch.equal(again[n], sparse_grads[n]) for n in again)


@pytest.mark.skipif(not bf16_native("cpu"), reason="this CPU has no native bf16")
def test_bf16_dense_aux_loss_and_gradients_are_within_a_percent_of_the_sparse_path():
    """In bf16 the dense aux products round their inputs to 8 mantissa bits: loss and the dead latents' gradients
    stay within ~1 % of the sparse path (which decodes in fp32)."""
    _, sae = pair("bfloat16")
    dead = (torch.arange(F_) % 3 == 0)
    results = {}
    for ratio in (0.0, 16.0):
        sae.aux_dense_max_ratio = {"bfloat16": ratio}
        sae.zero_grad()
        out = sae.training_forward_pass(step_input(dead=dead))
        out.losses["auxiliary_reconstruction_loss"].backward()
        results[ratio] = (out.losses["auxiliary_reconstruction_loss"].detach(),
                          {n: p.grad.clone() for n, p in sae.named_parameters()})
    (loss_s, grads_s), (loss_d, grads_d) = results[0.0], results[16.0]
    assert abs(float(loss_d) / float(loss_s) - 1) < 0.01
    for name in ("W_enc", "W_dec"):
        rel = float((grads_d[name] - grads_s[name]).norm() / grads_s[name].norm())
        assert 0 < rel < 0.02, (name, rel)  # not the same code path (> 0), and close


def test_W_enc_is_kept_latent_major_and_saved_row_major(tmp_path):
    from safetensors import safe_open
    from sae_lens import SAE

    from saelib.sparse_step import _dense_preacts

    _, sparse = pair()
    assert sparse.W_enc.stride() == (1, D)
    _, grads = loss_and_grads(sparse, step_input())
    assert sparse.W_enc.grad.stride() == sparse.W_enc.stride()  # no per-step transpose into another layout
    path = tmp_path / "sae"
    sparse.save_inference_model(path)
    with safe_open(str(path / "sae_weights.safetensors"), "pt") as fh:
        assert fh.get_tensor("W_enc").is_contiguous()
    loaded = SAE.load_from_disk(path)
    x = step_input().sae_in
    torch.testing.assert_close(loaded.encode(x), sparse.encode(x), rtol=1e-5, atol=1e-6)
    # the encoder's matmul gives the same bits from either layout
    x_in = torch.randn(B, D)
    for dtype in (torch.float32,) + ((torch.bfloat16,) if bf16_native("cpu") else ()):
        for scale in (None, torch.rand(F_) + 0.5):
            a = _dense_preacts(x_in, sparse.W_enc.detach(), sparse.b_enc.detach(), dtype, scale)
            b = _dense_preacts(x_in, sparse.W_enc.detach().contiguous(), sparse.b_enc.detach(), dtype, scale)
            assert torch.equal(a, b), (dtype, scale is None)
