"""Co-activation statistics against a dense reference; memory bound; checkpoint round trip."""

import pytest
import torch

from saelib.competition import CompetitionStats, fired_pairs


def random_topk_acts(B=64, F=40, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(B, F, generator=g)
    vals, idx = pre.topk(k, dim=-1)
    acts = torch.zeros(B, F).scatter_(1, idx, vals.relu())
    return acts


def dense_cofire(acts_BF):
    mask = (acts_BF > 0).float()
    return mask.sum(0), torch.triu(mask.T @ mask, diagonal=1)


def test_fired_pairs_match_the_dense_product():
    acts = random_topk_acts()
    counts, keys = fired_pairs(acts, k=5)
    dense_counts, dense_pairs = dense_cofire(acts)
    torch.testing.assert_close(counts, dense_counts)
    sparse = torch.zeros(40 * 40)
    sparse.index_add_(0, keys, torch.ones(len(keys)))
    torch.testing.assert_close(sparse.view(40, 40), dense_pairs)


def test_ema_rates_and_scores_match_a_dense_reference():
    stats = CompetitionStats(40, decay=0.9, window=1)
    ref_p, ref_c = torch.zeros(40), torch.zeros(40, 40)
    for seed in range(5):
        acts = random_topk_acts(seed=seed)
        stats.update(acts, k=5)
        counts, pairs = dense_cofire(acts)
        ref_p = 0.9 * ref_p + 0.1 * counts / 64
        ref_c = 0.9 * ref_c + 0.1 * pairs / 64
    i, j = stats.pairs()
    torch.testing.assert_close(stats.pair_rates, ref_c[i, j])
    assert int((ref_c > 0).sum()) == len(i)
    expected = ref_c[i, j] / torch.minimum(ref_p[i], ref_p[j])
    torch.testing.assert_close(stats.scores(), expected.clamp(max=1.0))
    assert stats.scores().max() <= 1.0


def test_pair_that_always_fires_together_scores_one():
    acts = torch.zeros(10, 8)
    acts[:, 2] = 1.0
    acts[:, 5] = 2.0
    acts[:3, 7] = 1.0  # 7 fires on 3 of the 10 tokens, always with 2 and 5
    stats = CompetitionStats(8, decay=0.5, window=1)
    stats.update(acts, k=3)
    i, j, s = stats.competing(0.99)
    assert sorted(zip(i.tolist(), j.tolist())) == [(2, 5), (2, 7), (5, 7)]
    torch.testing.assert_close(s, torch.ones(3))


def test_table_is_capped_keeping_the_best_supported_pairs():
    stats = CompetitionStats(40, decay=0.9, max_pairs=10, window=1)
    for seed in range(3):
        stats.update(random_topk_acts(seed=seed), k=5)
    assert len(stats.pair_keys) == 10
    assert (stats.pair_keys[1:] > stats.pair_keys[:-1]).all()  # sorted, unique


def test_state_round_trip_keeps_the_pending_window():
    stats = CompetitionStats(40, window=3)
    for seed in range(4):  # one fold, one batch pending
        stats.update(random_topk_acts(seed=seed), k=5)
    other = CompetitionStats(40, window=3)
    other.load_state_dict(stats.state_dict())
    assert other.n_updates == 4
    for s in (stats, other):
        s.update(random_topk_acts(seed=9), k=5)
        s.flush()
    torch.testing.assert_close(other.scores(), stats.scores())
    torch.testing.assert_close(other.pair_keys, stats.pair_keys)
    with pytest.raises(ValueError, match="competition state: expected d_sae=41"):
        CompetitionStats(41).load_state_dict(stats.state_dict())


@pytest.mark.parametrize("kwargs, name", [({"decay": 1.0}, "competition_decay"),
                                          ({"max_pairs": 0}, "competition_max_pairs"),
                                          ({"window": 0}, "competition_window")])
def test_bad_statistics_settings(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}: "):
        CompetitionStats(8, **kwargs)


def test_memory_scales_with_pairs_not_d_sae_squared():
    stats = CompetitionStats(65_536, max_pairs=200_000, window=3)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        idx = torch.randint(0, 65_536, (512, 32), generator=g)
        acts = torch.zeros(512, 65_536).scatter_(1, idx, 1.0)
        stats.update(acts, k=32)
    assert len(stats.pair_keys) == 200_000
    assert stats.nbytes() < 4 * 1024 * 1024  # dense d_sae² float32 would be 16 GiB


def test_a_window_pools_its_batches_and_decays_by_the_window():
    stats = CompetitionStats(40, decay=0.9, window=2)
    ref_p, ref_c = torch.zeros(40), torch.zeros(40, 40)
    for w in range(3):
        pooled = torch.cat([random_topk_acts(seed=2 * w), random_topk_acts(seed=2 * w + 1)])
        for half in pooled.split(64):
            stats.update(half, k=5)
        counts, pairs = dense_cofire(pooled)
        ref_p = 0.81 * ref_p + 0.19 * counts / 128
        ref_c = 0.81 * ref_c + 0.19 * pairs / 128
    i, j = stats.pairs()
    torch.testing.assert_close(stats.freq_F, ref_p)
    torch.testing.assert_close(stats.pair_rates, ref_c[i, j])


def test_competing_set_only_changes_when_a_window_is_folded():
    stats = CompetitionStats(40, window=2)
    stats.update(random_topk_acts(seed=0), k=5)
    assert len(stats.competing(0.0)[0]) == 0  # nothing folded yet
    stats.update(random_topk_acts(seed=1), k=5)
    first = stats.competing(0.0)
    stats.update(random_topk_acts(seed=2), k=5)
    assert stats.competing(0.0) is first


def _unique_fold(table_keys, table_rates, raw_keys, tokens, weight):
    """The fold by definition: count the window's keys, then sum them into the table over the union of keys."""
    new_keys, counts = torch.unique(raw_keys, return_counts=True)
    keys = torch.cat([table_keys, new_keys.to(torch.int64)])
    rates = torch.cat([table_rates, counts.float() / tokens * weight])
    uniq, inverse = torch.unique(keys, return_inverse=True)
    return uniq, torch.zeros(len(uniq)).index_add_(0, inverse, rates)


# int32 tagged keys; int64 once 2·key + 1 overflows int32; int64 raw keys once d_sae² does (as fired_pairs gives them)
@pytest.mark.parametrize("d_sae", [500, 40_000, 50_000])
def test_the_fold_equals_a_unique_over_table_and_window(d_sae):
    from saelib.competition import _fold

    g = torch.Generator().manual_seed(0)
    top = d_sae * d_sae
    table = torch.unique(torch.randint(0, top, (300,), generator=g))
    rates = torch.rand(len(table), generator=g)
    raw = torch.cat([table[torch.randint(0, len(table), (200,), generator=g)],
                     torch.randint(0, top, (400,), generator=g)]).to(torch.int32 if top < 2**31 else torch.int64)
    keys, merged = _fold(table, rates, raw, 37, 0.1)
    ref_keys, ref_rates = _unique_fold(table, rates, raw, 37, 0.1)
    assert keys.dtype == torch.int64 and torch.equal(keys, ref_keys)
    assert torch.equal(merged, ref_rates)  # bit for bit
    counts = {int(k): 0 for k in keys}
    for k in raw.tolist():
        counts[k] += 1
    expected = dict(zip(table.tolist(), rates.tolist()))
    for k, r in zip(keys.tolist(), merged.tolist()):
        assert r == pytest.approx(expected.get(k, 0.0) + counts[k] / 37 * 0.1, rel=1e-6)
    empty_k, empty_r = torch.zeros(0, dtype=torch.int64), torch.zeros(0)
    assert torch.equal(_fold(empty_k, empty_r, raw, 37, 0.1)[0], torch.unique(raw).to(torch.int64))
    assert torch.equal(_fold(table, rates, raw[:0], 37, 0.1)[1], rates)
    assert len(_fold(empty_k, empty_r, raw[:0], 37, 0.1)[0]) == 0
    one = _fold(empty_k, empty_r, raw[:1], 37, 0.1)  # a single key: one run
    assert one[0].tolist() == [int(raw[0])] and one[1].tolist() == [pytest.approx(0.1 / 37)]


@pytest.mark.parametrize("sorter", ["numpy", "torch"])
def test_the_fold_keeps_a_window_at_the_scale_of_a_16k_sae(sorter, monkeypatch):
    """Millions of keys near 2^28 (16,384² pairs) with heavy repeats, as the 16k study folds them, by either CPU
    sort: same keys and rates bit for bit as the definition (a radix sort's many passes, not only a small case)."""
    from saelib import competition
    from saelib.competition import _fold

    monkeypatch.setitem(competition._CPU_SORTER, (torch.get_num_threads(), "torch.int32"), sorter)

    g = torch.Generator().manual_seed(1)
    F = 16_384
    hot = torch.randint(0, F * F, (50_000,), generator=g)
    raw = torch.cat([hot[torch.randint(0, len(hot), (1_500_000,), generator=g)],
                     torch.randint(0, F * F, (500_000,), generator=g)]).to(torch.int32)
    table = torch.unique(torch.cat([hot[:20_000], torch.randint(0, F * F, (200_000,), generator=g)]))
    rates = torch.rand(len(table), generator=g) * 1e-3
    keys, merged = _fold(table, rates, raw, 10_240, 0.0956)
    ref_keys, ref_rates = _unique_fold(table, rates, raw, 10_240, 0.0956)
    assert torch.equal(keys, ref_keys) and torch.equal(merged, ref_rates)


@pytest.mark.parametrize("faster", ["numpy", "torch"])
def test_the_first_large_sort_chooses_the_faster_cpu_sorter_once(faster, monkeypatch):
    """The probe times each sorter twice and keeps the one with the lower time (the clock scripted here: the other
    sorter takes 10× as long), per thread count and dtype; it never times again, and either way the keys come out
    sorted."""
    from saelib import competition

    monkeypatch.setattr(competition, "_CPU_SORTER", {})
    monkeypatch.setattr(competition, "SORT_PROBE_KEYS", 1000)
    keys = torch.randint(0, 2**29, (999,), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(competition._sort_keys(keys), keys.sort().values)
    assert competition._CPU_SORTER == {}  # too few keys to time
    clock = iter([0.0, 1.0, 1.0, 11.0, 11.0, 12.0, 12.0, 22.0] if faster == "torch" else
                 [0.0, 10.0, 10.0, 11.0, 11.0, 21.0, 21.0, 22.0])  # torch, numpy, torch, numpy: start and end each
    monkeypatch.setattr(competition.time, "perf_counter", lambda: next(clock))
    more = torch.cat([keys, keys[:1]])
    assert torch.equal(competition._sort_keys(more), more.sort().values)
    assert competition._CPU_SORTER == {(torch.get_num_threads(), "torch.int32"): faster}
    assert torch.equal(competition._sort_keys(more), more.sort().values)  # the clock is spent: timing again raises
    wide = more.to(torch.int64)  # another dtype is timed on its own
    monkeypatch.setattr(competition.time, "perf_counter", lambda: 0.0)
    assert torch.equal(competition._sort_keys(wide), wide.sort().values)
    assert len(competition._CPU_SORTER) == 2


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device on this machine"))]


def _fed_stats(device, max_pairs=100_000):
    stats = CompetitionStats(40, decay=0.9, max_pairs=max_pairs, window=3, device=device)
    for seed in range(7):
        stats.update(random_topk_acts(seed=seed).to(device), k=5)
    stats.flush()
    return stats


@pytest.mark.parametrize("device", DEVICES)
def test_competition_statistics_stay_on_the_sae_device(device):
    stats = _fed_stats(device)
    i_C, j_C, s_C = stats.competing(0.1)
    tensors = [stats.freq_F, stats.pair_keys, stats.pair_rates, stats._pending_counts_F, i_C, j_C, s_C,
               stats.scores(), *stats.state_dict().values()]
    assert {t.device.type for t in tensors} == {torch.device(device).type}
    reference = _fed_stats("cpu")
    assert torch.equal(stats.pair_keys.cpu(), reference.pair_keys)
    torch.testing.assert_close(stats.pair_rates.cpu(), reference.pair_rates)


def test_the_device_path_never_copies_to_the_host(monkeypatch):
    """The branch every non-CPU device takes (the fold and the cap's topk where the tensors live), run here on the
    CPU with numpy forbidden: it gives the numpy path's table (and caps it: which of tied pairs survive may differ)."""
    import saelib.competition as competition

    monkeypatch.setattr(competition, "_host_numpy", lambda t: False)

    def host_copy(self, *args, **kwargs):
        raise AssertionError("Tensor.numpy() on the device path: a host round trip on a GPU")

    monkeypatch.setattr(torch.Tensor, "numpy", host_copy)
    stats = _fed_stats("cpu", max_pairs=60)
    assert len(stats.pair_keys) == 60 and bool((stats.pair_keys.diff() > 0).all())
    uncapped = _fed_stats("cpu")
    monkeypatch.undo()
    full = _fed_stats("cpu")
    assert torch.equal(uncapped.pair_keys, full.pair_keys)
    torch.testing.assert_close(uncapped.pair_rates, full.pair_rates)


@pytest.mark.parametrize("device", DEVICES)
def test_a_checkpoint_loaded_on_the_cpu_resumes_on_the_sae_device(device):
    stats = _fed_stats(device)
    state = {k: v.cpu() for k, v in stats.state_dict().items()}  # as safetensors loads a checkpoint
    resumed = CompetitionStats(40, decay=0.9, max_pairs=100_000, window=3, device=device)
    resumed.load_state_dict(state)
    resumed.update(random_topk_acts(seed=9).to(device), k=5)
    stats.update(random_topk_acts(seed=9).to(device), k=5)
    resumed.flush(), stats.flush()
    assert {t.device.type for t in (resumed.freq_F, resumed.pair_keys, resumed.pair_rates)} == {
        torch.device(device).type}
    assert torch.equal(resumed.pair_keys, stats.pair_keys)
    torch.testing.assert_close(resumed.pair_rates, stats.pair_rates)


@pytest.mark.parametrize("device", DEVICES)
def test_heldout_competition_counts_on_the_sae_device(device, tiny_cache):
    from saelib.evals.competition import heldout_competition
    from tests.test_evals import tiny_sae

    sae = tiny_sae(d_in=tiny_cache.d_in).to(device)
    stats = heldout_competition(sae, tiny_cache, batch_size=256)
    assert stats.pair_keys.device.type == torch.device(device).type and len(stats.pair_keys) > 0
