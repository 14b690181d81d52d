"""The study's answers: verdict tables whose cells come from the results and the paired intervals, CSVs beside
them, the README block. Tables are checked, not sentences."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from saelib import answers
from saelib.evals.competition import absorbing_pair_flags, competition_patterns
from saelib.evals.results import COLUMNS
from saelib.stats import NO_INTERVAL, mean_ci, paired_vs_baseline

FIXTURE = Path(__file__).parent / "fixtures" / "study"
ABSORPTION = "absorption/mean.mean_absorption_fraction_score"


def _rows(config, arch, tau, lam, values_by_seed, key):
    ev, metric = key.split("/", 1)
    return [{"run": f"run{abs(hash((config, s))) % 10**6}", "config": config, "architecture": arch, "tau": tau,
             "lambda": lam, "seed": s, "eval": ev, "metric": metric, "value": v} for s, v in values_by_seed.items()]


def _synthetic(shift: float, zero_shift: float = 0.0) -> pd.DataFrame:
    """TopK, a penalised SGO run shifted by ``shift`` on absorption (lower is better), and the λ = 0 control. The
    run names say nothing: τ, λ and seed are columns (from cfg.json), as in study_results."""
    base = {0: 0.10, 1: 0.12, 2: 0.11}
    rows = _rows("topk", "topk", np.nan, np.nan, base, ABSORPTION)
    rows += _rows("a", "sgo_topk", 0.02, 10.0, {s: v + shift + 0.001 * s for s, v in base.items()}, ABSORPTION)
    rows += _rows("b", "sgo_topk", 0.02, 0.0, {s: v + zero_shift for s, v in base.items()}, ABSORPTION)
    return pd.DataFrame(rows, columns=COLUMNS)


def _md_cell(markdown, config, metric):
    """The text of the cell (``config``, ``metric``) of the first markdown table with that column and row."""
    for table in markdown.split("\n\n"):
        lines = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in table.splitlines() if ln.startswith("|")]
        if lines and metric in lines[0]:
            row = next((r for r in lines[2:] if r[0] == config), None)
            if row is not None:
                return row[lines[0].index(metric)]
    raise AssertionError(f"no cell ({config}, {metric})")


def _cell(long, config, metric):
    row = long[(long["config"] == config) & (long["metric"] == metric)]
    assert len(row) == 1, (config, metric)
    return row.iloc[0]


def test_the_quality_table_holds_the_paired_differences_and_verdicts(tmp_path):
    out = answers.write_answers("fx", FIXTURE, tmp_path, readme=None)
    csv = pd.read_csv(tmp_path / "fx" / "answers_quality.csv")
    expected = paired_vs_baseline(answers.study_results(FIXTURE), answers.QUALITY)
    pd.testing.assert_frame_equal(csv, expected, check_dtype=False)
    # the markdown table: a row per configuration, a column per metric, the cell of the CSV row
    row = _cell(csv, "sgo_t0.02_l0.02", "sparse probing top-1")
    text = out.read_text()
    assert row.verdict == "no detectable difference"  # two seeds of a tiny run: the interval spans 0
    assert _md_cell(text, "sgo_t0.02_l0.02", "sparse probing top-1") == (
        f"n.d. {row.difference:+.3g} [{row.low:+.3g}, {row.high:+.3g}]")
    for key in answers.QUESTIONS:
        assert (tmp_path / "fx" / f"answers_{key}.csv").exists()
    assert (tmp_path / "fx" / "headline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![paired differences from TopK](headline.png)" in text
    assert max(map(len, text.splitlines())) < 1000  # tables, not paragraphs of numbers (was 3,207 characters)
    power = pd.read_csv(tmp_path / "fx" / "answers_power.csv").set_index("metric")
    from saelib.stats import mde_table

    expected = mde_table(answers.study_results(FIXTURE), answers.QUALITY,
                         targets=answers.MDE_TARGETS).set_index("metric")
    pd.testing.assert_frame_equal(power.drop(columns="meets_target"), expected.drop(columns="meets_target"),
                                  check_dtype=False)
    assert list(power["meets_target"].dropna()) == list(expected["meets_target"].dropna())
    assert (power["seeds"] == 2).all()
    for metric in ("explained variance", "sparse probing top-1"):  # the markdown table shows the CSV's numbers
        assert float(_md_cell(text, metric, "mde")) == pytest.approx(power.loc[metric, "mde"], abs=5e-5)


@pytest.mark.parametrize("shift, expected", [(-0.05, "better"), (+0.05, "worse"), (0.0, "no detectable difference")])
def test_verdicts_follow_the_intervals(shift, expected):
    long = paired_vs_baseline(_synthetic(shift), {ABSORPTION: ("absorption", -1)})
    assert _cell(long, "a", "absorption").verdict == expected
    word = {"better": "**better**", "worse": "**worse**"}.get(expected, "n.d.")
    assert _md_cell(answers.table_markdown(long, ["topk", "a", "b"]), "a", "absorption").startswith(word + " ")
    assert _cell(long, "b", "absorption").difference == 0  # the λ = 0 control: no difference at all


def test_one_seed_gets_no_verdict_and_says_so():
    one = _synthetic(-0.05)[lambda d: d["seed"] == 0]
    long = paired_vs_baseline(one, {ABSORPTION: ("absorption", -1)})
    row = _cell(long, "a", "absorption")
    assert row.verdict == NO_INTERVAL
    assert answers.cell(row) == f"{row.difference:+.3g} (1 seed)"


def test_the_penalty_is_judged_at_each_configurations_own_tau_from_cfg():
    rows = []
    for tau, topk, sgo in ((0.02, 0.030, 0.025), (0.2, 0.050, 0.051)):
        key = f"competition/tau_{tau:g}.competing_weighted_cos2"
        rows += _rows("topk", "topk", np.nan, np.nan, {s: topk + 0.001 * s for s in range(3)}, key)
        for config, own in (("x", 0.02), ("y", 0.2)):  # names carry no τ: it comes from the tau column
            value = sgo if tau == own else topk
            rows += _rows(config, "sgo_topk", own, 10.0, {s: value + 0.001 * s + 1e-4 * (s == 1) for s in range(3)},
                          key)
    results = pd.DataFrame(rows, columns=COLUMNS)
    table = answers.own_tau(results, results.drop_duplicates("run"))
    assert _cell(table, "x", answers.OWN_TAU).verdict == "lower"
    assert _cell(table, "y", answers.OWN_TAU).verdict == "higher"
    assert _cell(table, "x", answers.OWN_TAU).difference == pytest.approx(0.025 - 0.030 + 1e-4 / 3)


def test_the_lambda_zero_control_is_compared_tensor_for_tensor(tmp_path):
    from safetensors.torch import save_file
    import torch

    from saelib import run_files

    study = tmp_path / "st"
    for run in ("topk_s0", "sgo_t0.02_l0.02_s0"):
        shutil.copytree(FIXTURE / run, study / run)
    control = study / "sgo_t0.02_l0.02_s0"  # make it the λ = 0 control, with TopK's results and weights
    cfg = json.loads((control / "cfg.json").read_text())
    (control / "cfg.json").write_text(json.dumps({**cfg, "orth_pen": 0.0}))
    shutil.rmtree(control / "evals")
    shutil.copytree(study / "topk_s0" / "evals", control / "evals")
    shutil.copy(study / "topk_s0" / "metrics.json", control / "metrics.json")
    weights = {"W_dec": torch.ones(4, 3), "b_enc": torch.zeros(4)}
    for run, w in (("topk_s0", weights), ("sgo_t0.02_l0.02_s0", weights)):
        (study / run / run_files.SAE_DIR).mkdir(parents=True)
        save_file(w, str(study / run / run_files.SAE_DIR / "sae_weights.safetensors"))
    runs = answers.study_results(study).drop_duplicates("run")
    row = answers.weights_check(study, runs).iloc[0]
    assert (row["SAEs compared"], row["SAEs equal to TopK"], row["largest Δ element (abs.)"]) == (1, 1, 0.0)
    quality = answers.study_answers("st", study, reports_dir=None).tables["quality"]
    assert (quality["difference"] == 0).all() and (quality["seeds"] == 1).all()  # its evals equal TopK's too
    save_file({**weights, "W_dec": weights["W_dec"] + 0.5}, str(control / run_files.SAE_DIR / "sae_weights.safetensors"))
    row = answers.weights_check(study, runs).iloc[0]
    assert (row["SAEs equal to TopK"], row["largest Δ element (abs.)"]) == (0, 0.5)
    assert math.isnan(row[answers.PENALTY_SHARE])  # no history
    # archived on another machine: no weights, their digests; equal digests are equal SAEs, unequal ones an unknown Δ
    archive = tmp_path / "archive" / "st"
    for run in ("topk_s0", "sgo_t0.02_l0.02_s0"):
        run_files.archive_run(study / run, archive / run)
        assert not (archive / run / run_files.SAE_DIR).exists() and (archive / run / "evals" / "core.json").exists()
    row = answers.weights_check(archive, runs).iloc[0]
    assert (row["SAEs compared"], row["SAEs equal to TopK"]) == (1, 0) and math.isnan(row["largest Δ element (abs.)"])
    assert answers.delta_words(answers.weights_check(archive, runs)) == [
        "differs (by digest; weights not on this machine)"]  # what the answers print, not "nan"
    save_file(weights, str(control / run_files.SAE_DIR / "sae_weights.safetensors"))
    run_files.archive_run(control, archive / control.name)  # replaces the older copy whole
    row = answers.weights_check(archive, runs).iloc[0]
    assert (row["SAEs equal to TopK"], row["largest Δ element (abs.)"]) == (1, 0.0)
    shutil.rmtree(archive / "topk_s0")  # the baseline only here, with its weights: its digest is computed
    (archive / "topk_s0").symlink_to(study / "topk_s0", target_is_directory=True)
    assert answers.weights_check(archive, runs).iloc[0]["SAEs equal to TopK"] == 1


def test_an_sae_digest_tells_equal_weights_from_any_changed_element(tmp_path):
    from safetensors.torch import save_file
    import torch

    from saelib import run_files

    def digest(name, tensors):
        (tmp_path / name / run_files.SAE_DIR).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp_path / name / run_files.SAE_DIR / "sae_weights.safetensors"))
        return run_files.sae_digest(tmp_path / name)

    w = {"W_dec": torch.randn(5, 3), "b": torch.zeros(3, dtype=torch.bfloat16)}
    assert digest("a", w) == digest("b", {k: v.clone() for k, v in w.items()})
    changed = w["W_dec"].clone()
    changed[4, 2] = torch.nextafter(changed[4, 2], torch.tensor(1e9))  # one element, by one ulp
    first = run_files.sae_digest(tmp_path / "a")
    assert digest("c", {**w, "W_dec": changed})["W_dec"] != first["W_dec"]
    assert digest("d", {**w, "b": w["b"].float()})["b"] != first["b"]  # the dtype counts
    assert run_files.sae_digest(tmp_path / "none") is None


def test_penalty_share_is_the_last_tenth_of_the_logged_steps(tmp_path):
    """orth_loss / overall_loss over the last 10 % of logged steps, averaged per run then over runs."""
    from saelib import run_files

    runs = []
    for name, late in (("a", 0.02), ("b", 0.04)):
        run = tmp_path / name
        run.mkdir()
        rows = [{"step": s, "losses/overall_loss": 100.0, "losses/orth_loss": 50.0 if s < 90 else 100 * late}
                for s in range(100)]  # the first 90 steps' large share must not count
        (run / run_files.HISTORY_FILE).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        runs.append(run)
    assert answers.penalty_share(runs) == pytest.approx(0.03)
    assert math.isnan(answers.penalty_share([tmp_path / "missing"]))


def test_each_configuration_is_measured_against_the_topk_trained_like_it(tmp_path):
    """sgo at batch 1,024 pairs with topk at batch 1,024 (cfg.json equal but for the seed and SGO's own fields), not
    with the default topk; a configuration no TopK matches falls back to topk."""
    from saelib.evals.results import matched_baselines

    study = tmp_path / "st"
    plan = {"topk_s0": ("topk_s0", {}), "topk_s1": ("topk_s1", {}),
            "topk_b1024_s0": ("topk_s0", {"batch_size": 1024}), "topk_b1024_s1": ("topk_s1", {"batch_size": 1024}),
            "sgo_b1024_s0": ("sgo_t0.02_l0.02_s0", {"batch_size": 1024}),
            "sgo_b1024_s1": ("sgo_t0.02_l0.02_s1", {"batch_size": 1024}),
            "sgo_s0": ("sgo_t0.05_l0.02_s0", {}), "sgo_s1": ("sgo_t0.05_l0.02_s1", {}),
            "sgo_lr_s0": ("sgo_t0.02_l0.02_s0", {"lr": 1e-2}), "sgo_lr_s1": ("sgo_t0.02_l0.02_s1", {"lr": 1e-2})}
    for run, (source, changes) in plan.items():
        shutil.copytree(FIXTURE / source, study / run)
        cfg = json.loads((study / run / "cfg.json").read_text())
        (study / run / "cfg.json").write_text(json.dumps({**cfg, **changes, "run_name": run}))
    results = answers.study_results(study)
    assert matched_baselines(study, results.drop_duplicates("run")) == {"sgo_b1024": "topk_b1024", "sgo": "topk"}
    got = answers.study_answers("st", study, reports_dir=None)
    quality = got.tables["quality"]
    own = _cell(quality, "sgo_b1024", "explained variance")
    ev = results[results["metric"] == "reconstruction_quality.explained_variance"].set_index(["config", "seed"])["value"]
    assert own.baseline == "topk_b1024"
    assert own.difference == pytest.approx(np.mean([ev["sgo_b1024", s] - ev["topk_b1024", s] for s in (0, 1)]))
    assert _cell(quality, "topk_b1024", "explained variance").baseline == "topk"
    assert _md_cell(got.markdown, "sgo_b1024", "against") == "topk_b1024"
    assert _md_cell(got.markdown, "sgo", "against") == "topk"
    assert _md_cell(got.markdown, "sgo_lr", "against") == "topk (not trained alike)"  # measured against topk, and said
    assert _cell(quality, "sgo_lr", "explained variance").baseline == "topk"


def test_competition_patterns_are_the_measured_levels_and_within_run_gaps():
    table = competition_patterns(FIXTURE, answers.study_results(FIXTURE))
    values = [json.loads((FIXTURE / r / "evals" / "competition.json").read_text())["eval_result_metrics"]["tau_0.02"]
              for r in ("topk_s0", "topk_s1")]
    ci = mean_ci([v["n_competing_pairs"] for v in values])
    row = _cell(table, "topk", "competing at τ 0.02")
    assert (row["mean"], row["low"], row["high"], row["seeds"]) == pytest.approx((ci.mean, ci.low, ci.high, 2))
    gap = mean_ci([v["competing_mean_cos2"] - v["noncompeting_mean_cos2"] for v in values])
    row = _cell(table, "topk", "competing − non-competing cos²")
    assert row["difference"] == pytest.approx(gap.mean) and row["verdict"] == "higher"


def test_absorbing_pairs_match_a_direct_count():
    table = absorbing_pair_flags(FIXTURE)
    result = json.loads((FIXTURE / "topk_s0" / "evals" / "competition.json").read_text())
    distinct = pd.DataFrame(result["eval_result_unstructured"]["absorption_vs_competition"]).drop_duplicates(
        ["main_latent", "absorbing_latent"])
    row = table[(table["run"] == "topk_s0") & (table["tau"] == 0.02)].iloc[0]
    cofiring = distinct[distinct["score"] > 0]  # the base rate is over co-firing pairs, so is the flagged fraction
    assert (row["config"], row["pairs"], row["cofiring"]) == ("topk", len(distinct), len(cofiring))
    assert row["flagged"] == pytest.approx((cofiring["score"] > 0.02).mean())
    t = result["eval_result_metrics"]["tau_0.02"]
    assert row["base_rate"] == pytest.approx(t["n_competing_pairs"] / t["n_cofiring_pairs"])


def test_the_threshold_table_is_the_tau_sweep_at_one_lambda():
    md = answers.study_answers("fx", FIXTURE, reports_dir=None)
    sweep = md.tables["threshold"]
    assert sorted(sweep["config"].unique()) == ["sgo_t0.02_l0.02", "sgo_t0.05_l0.02"]  # both at λ 0.02 in cfg.json
    assert answers.OWN_TAU in set(sweep["metric"]) and "explained variance" in set(sweep["metric"])


def test_readme_block_is_replaced_between_the_markers_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- answers:fx:begin -->\nold\n<!-- answers:fx:end -->\noutro\n")
    assert answers.replace_block(readme, "fx", "new text\n")
    assert readme.read_text() == "intro\n<!-- answers:fx:begin -->\nnew text\n<!-- answers:fx:end -->\noutro\n"
    assert not answers.replace_block(readme, "other", "x")
    assert "new text" in readme.read_text()
    answers.write_answers("fx", FIXTURE, tmp_path / "reports", readme=readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "reports/fx/headline.png" in text
    block = text.split("<!-- answers:fx:begin -->")[1]
    got = answers.study_answers("fx", FIXTURE, reports_dir=None)
    assert "| sgo_t0.02_l0.02 " in block and "`reports/fx/`" in block  # the quality table, and where the rest is
    assert _md_cell(block, "sgo_t0.02_l0.02", "explained variance") == _md_cell(
        got.markdown, "sgo_t0.02_l0.02", "explained variance")
    assert "| competing at τ" not in block and "### " not in block  # the brief: the other tables stay in answers.md
    assert all(f"**{q}**" in block for q in answers.QUESTIONS.values())


def test_a_study_without_topk_or_results_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="study_dir"):
        answers.study_answers("empty", tmp_path)
    shutil.copytree(FIXTURE / "sgo_t0.02_l0.02_s0", tmp_path / "only" / "sgo_t0.02_l0.02_s0")
    with pytest.raises(ValueError, match="no `topk` runs"):
        answers.study_answers("only", tmp_path / "only")


def test_a_one_seed_study_says_so_once_instead_of_in_every_cell(tmp_path):
    for run in ("topk_s0", "sgo_t0.02_l0.02_s0"):
        shutil.copytree(FIXTURE / run, tmp_path / "one" / run)
    one = answers.study_answers("one", tmp_path / "one", reports_dir=None)
    assert "(1 seed)" not in one.markdown and one.markdown.count("One seed: single measurements") == 1
    assert (one.tables["quality"]["verdict"] == NO_INTERVAL).all()
    row = _cell(one.tables["quality"], "sgo_t0.02_l0.02", "explained variance")
    assert _md_cell(one.markdown, "sgo_t0.02_l0.02", "explained variance") == f"{row.difference:+.3g}"
    assert "One seed" not in answers.study_answers("fx", FIXTURE, reports_dir=None).markdown


@pytest.mark.parametrize("shift, excluded", [(0.0, True), (-0.075, False), (+0.02, True), (-0.2, True)])
def test_a_controls_claimed_size_is_ruled_out_only_when_it_lies_outside_the_interval(shift, excluded):
    """OrtSAE's paper reports −65 % absorption: as a difference from TopK here, −0.65 × TopK's mean (0.11). A null
    interval around 0 rules it out; one that holds −0.0715 cannot tell; one wholly below it rules it out too (an
    effect larger than claimed). One seed: no interval, so no ruling."""
    from saelib.summary import positive_controls

    base = {0: 0.10, 1: 0.12, 2: 0.11}
    rows = _rows("topk", "topk", np.nan, np.nan, base, ABSORPTION)
    rows += _rows("ort", "ortsae_topk", np.nan, 10.0, {s: v + shift + 0.002 * s for s, v in base.items()}, ABSORPTION)
    results = pd.DataFrame(rows, columns=COLUMNS)
    quality = paired_vs_baseline(results, answers.QUALITY, baseline="topk")
    row = positive_controls(quality, results.drop_duplicates("run"), results).set_index("metric").loc[
        "absorption (mean fraction)"]
    assert row["claimed_difference"] == pytest.approx(-0.65 * 0.11)
    assert row["claim_excluded"] == excluded
    assert (row["ci_low"] <= row["claimed_difference"] <= row["ci_high"]) != excluded
    one = results[results["seed"] == 0]
    single = positive_controls(paired_vs_baseline(one, answers.QUALITY, baseline="topk"), one.drop_duplicates("run"),
                               one).iloc[0]
    assert single["claimed_difference"] == pytest.approx(-0.065) and single["claim_excluded"] is None
    assert positive_controls(quality, results.drop_duplicates("run"))["claim_excluded"].isna().all()  # no results


def test_the_firing_based_check_tells_a_metric_change_from_a_feature_change():
    """Issue 14 item 5 on crafted numbers. ``filter``: SAEBench's absorption falls while the main latents' silence
    stays (the words move from counted to not counted: a decoder-cosine filter effect) → not confirmed; ``fires``:
    absorption and silence fall together → confirmed; ``none``: no SAEBench difference → nothing to confirm. The
    counted part is silent − not counted per run, paired like the rest."""
    from saelib.summary import COUNTED, SILENT, UNCOUNTED, absorption_check

    base = {0: 0.10, 1: 0.12, 2: 0.11}
    silent, uncounted = {0: 0.17, 1: 0.18, 2: 0.16}, {0: 0.07, 1: 0.08, 2: 0.075}
    plan = {"topk": (0.0, 0.0, 0.0), "filter": (-0.03, 0.0, +0.02), "fires": (-0.03, -0.03, 0.0),
            "none": (0.0, 0.0, 0.0)}
    rows = []
    for config, (d_abs, d_silent, d_uncounted) in plan.items():
        arch = "topk" if config == "topk" else "sgo_topk"
        jitter = {0: 0.0, 1: 0.001, 2: -0.0005} if config != "topk" else {0: 0.0, 1: 0.0, 2: 0.0}
        rows += _rows(config, arch, np.nan, np.nan, {s: v + d_abs + jitter[s] for s, v in base.items()}, ABSORPTION)
        rows += _rows(config, arch, np.nan, np.nan, {s: v + d_silent + jitter[s] for s, v in silent.items()}, SILENT)
        rows += _rows(config, arch, np.nan, np.nan, {s: v + d_uncounted - jitter[s] for s, v in uncounted.items()},
                      UNCOUNTED)
    long, verdicts = absorption_check(pd.DataFrame(rows, columns=COLUMNS))
    assert verdicts["filter"] == {"saebench": "better", "firing": "no detectable difference", "confirmed": False}
    assert verdicts["fires"] == {"saebench": "better", "firing": "better", "confirmed": True}
    assert verdicts["none"]["confirmed"] is None and "topk" not in verdicts
    counted = _cell(long, "filter", "silent, counted by SAEBench")
    expected = mean_ci(np.array([(silent[s] + j) - (uncounted[s] + 0.02 - j) - (silent[s] - uncounted[s])
                                 for s, j in {0: 0.0, 1: 0.001, 2: -0.0005}.items()]))
    assert counted.difference == pytest.approx(expected.mean) == pytest.approx(-0.02 + 2 * 0.0005 / 3)
    assert (counted.low, counted.high) == pytest.approx((expected.low, expected.high))
    assert COUNTED.endswith("mean_silent_counted_rate")
    text = answers._absorption_sentences(long, verdicts)
    assert "filter: SAEBench's absorption **better**" in text and "**not confirmed**" in text
    assert "fires: SAEBench's absorption **better**" in text and "none:" not in text
    # a study without the firing-based numbers (older runs) says so instead of failing
    assert absorption_check(pd.DataFrame(rows[:3], columns=COLUMNS))[0].empty


@pytest.mark.parametrize("shift, reproduces", [(-0.03, True), (+0.03, False), (-0.0005, False)])
def test_a_positive_control_reproduces_only_when_its_interval_is_on_the_claimed_side(shift, reproduces):
    from saelib.summary import positive_controls

    base = {0: 0.10, 1: 0.12, 2: 0.11}
    rows = _rows("topk", "topk", np.nan, np.nan, base, ABSORPTION)
    rows += _rows("mat", "matryoshka_batchtopk", np.nan, np.nan,
                  {s: v + shift + 0.001 * s for s, v in base.items()}, ABSORPTION)
    results = pd.DataFrame(rows, columns=COLUMNS)
    quality = paired_vs_baseline(results, answers.QUALITY, baseline="topk")
    controls = positive_controls(quality, results.drop_duplicates("run"))
    row = controls.set_index(["config", "metric"]).loc[("mat", "absorption (mean fraction)")]
    assert row["claimed"] == "lower" and row["seeds"] == 3 and row["reproduces"] == reproduces
    assert row["difference"] == pytest.approx(shift + 0.001)
    ci = mean_ci(np.array([shift + 0.001 * s for s in base]))
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((ci.low, ci.high))


def test_summary_json_holds_what_a_checker_needs(tmp_path):
    study = tmp_path / "runs" / "fixture"
    shutil.copytree(FIXTURE, study)
    answers.write_answers("fixture", study, tmp_path / "reports", readme=None)
    summary = json.loads((tmp_path / "reports" / "fixture" / "summary.json").read_text())
    cfg = json.loads((FIXTURE / "topk_s0" / "cfg.json").read_text())
    assert (summary["d_sae"], summary["training_tokens"], summary["seeds"]) == (cfg["d_sae"], cfg["training_tokens"],
                                                                                 [0, 1])
    power = pd.read_csv(tmp_path / "reports" / "fixture" / "answers_power.csv").set_index("metric")
    assert summary["mde"]["explained variance"] == pytest.approx(power.loc["explained variance", "mde"])
    targets = summary["mde_targets"]  # the three targets, each with the seeds it needs at this spread
    assert set(targets) == {"absorption (mean fraction)", "sparse probing top-1", "CE-loss recovered"}
    absorption = targets["absorption (mean fraction)"]
    assert absorption["target"] == pytest.approx(0.25 * power.loc["absorption (mean fraction)", "baseline_mean"])
    assert absorption["meets"] == (absorption["mde"] <= absorption["target"])
    assert targets["CE-loss recovered"]["target"] == 0.005
    text = (tmp_path / "reports" / "fixture" / "answers.md").read_text()
    met = sum(t["meets"] for t in targets.values())
    assert f"{met} of 3 MDE targets met" in text
    for metric, t in targets.items():
        if not t["meets"]:
            needed = t["seeds_for_target"]
            assert f"{metric} {needed if needed is not None else 'more than 64'}" in text
    assert summary["positive_controls"] == {}  # the fixture has no Matryoshka or OrtSAE runs
    frontier = {e["config"]: e for e in summary["sgo_frontier"]}
    assert set(frontier) == {"topk", "sgo_t0.02_l0.02", "sgo_t0.05_l0.02"}
    quality = pd.read_csv(tmp_path / "reports" / "fixture" / "answers_quality.csv")
    q = quality[(quality["config"] == "sgo_t0.05_l0.02") & (quality["metric"] == "absorption (mean fraction)")].iloc[0]
    assert frontier["sgo_t0.05_l0.02"]["absorption_vs_topk"] == pytest.approx(q["difference"])
    assert (frontier["sgo_t0.05_l0.02"]["lambda"], frontier["sgo_t0.05_l0.02"]["tau"]) == (0.02, 0.05)
    ev = [json.loads((FIXTURE / f"topk_s{s}" / "evals" / "core.json").read_text())["eval_result_metrics"]
          ["reconstruction_quality"]["explained_variance"] for s in (0, 1)]
    assert frontier["topk"]["ev"] == pytest.approx(np.mean(ev))


def test_the_answers_state_the_precisions_and_a_mix_loudly(tmp_path):
    """Each run's cfg.json records the LM and SAE precision ``auto`` resolved to; the answers and summary.json say
    which, and a study finished on machines with and without native bf16 is flagged as not comparable."""
    study = tmp_path / "st"
    shutil.copytree(FIXTURE, study)
    got = answers.study_answers("st", study, reports_dir=None)
    assert got.summary["precisions"] == {"lm": [], "sae": []} and "precision not recorded" in got.markdown
    for cfg_path in study.glob("*/cfg.json"):
        cfg = json.loads(cfg_path.read_text())
        cfg.update(lm_precision_used="bfloat16", sae_precision_used="bfloat16")
        cfg_path.write_text(json.dumps(cfg))
    got = answers.study_answers("st", study, reports_dir=None)
    assert got.summary["precisions"] == {"lm": ["bfloat16"], "sae": ["bfloat16"]}
    assert "LM in bfloat16, SAE in bfloat16" in got.markdown and "mixed" not in got.markdown
    cfg = json.loads((study / "topk_s1" / "cfg.json").read_text())
    (study / "topk_s1" / "cfg.json").write_text(json.dumps({**cfg, "lm_precision_used": "float32"}))
    got = answers.study_answers("st", study, reports_dir=None)
    assert got.summary["precisions"] == {"lm": ["bfloat16", "float32"], "sae": ["bfloat16"]}
    assert "**LM precision mixed (bfloat16, float32): runs not comparable as they stand**, SAE in bfloat16" in got.brief


def test_the_answers_state_the_compute_on_record_per_notebook_and_machine(tmp_path):
    """The study runner writes each notebook's time (and machine) beside its stamp; the answers add them up, per
    notebook and per machine, so a study finished over several machines states its cost on each."""
    study = tmp_path / "st"
    shutil.copytree(FIXTURE, study)
    assert answers.study_answers("st", study, reports_dir=None).summary["compute"]["notebook_hours"] == 0
    times = {("topk_s0", "train"): (1800, "CPU A, 2 cores, bf16"), ("topk_s0", "evaluate"): (720, "CPU A, 2 cores, bf16"),
             ("topk_s1", "train"): (3600, "CPU B, 2 cores"), ("sgo_t0.02_l0.02_s0", "train"): (1080, None)}
    for (run, nb), (seconds, machine) in times.items():
        (study / run / ".runner").mkdir(exist_ok=True)
        (study / run / ".runner" / f"{nb}.time.json").write_text(json.dumps(
            {"seconds": seconds, "threads": 2, **({"machine": machine} if machine else {})}))
    got = answers.study_answers("st", study, reports_dir=None)
    assert got.summary["compute"] == {"notebook_hours": 2.0, "by_notebook": {"evaluate": 0.2, "train": 1.8},
                                      "by_machine": {"CPU A, 2 cores, bf16": 0.7, "CPU B, 2 cores": 1.0,
                                                     "not recorded": 0.3}, "threads": [2]}
    assert ("2.0 h of notebook time on record (evaluate 0.2 h, train 1.8 h; 2 threads; CPU A, 2 cores, bf16: 0.7 h; "
            "CPU B, 2 cores: 1.0 h; not recorded: 0.3 h)") in got.markdown


def test_the_frontier_figure_and_table_show_each_configuration_with_its_intervals(tmp_path):
    out = answers.write_answers("fx", FIXTURE, tmp_path, readme=None)
    text = out.read_text()
    assert (tmp_path / "fx" / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![orthogonality frontier](frontier.png)" in text
    summary = json.loads((tmp_path / "fx" / "summary.json").read_text())
    entry = next(e for e in summary["sgo_frontier"] if e["config"] == "sgo_t0.05_l0.02")
    expected = f"{entry['absorption']:.4g} [{entry['absorption_ci_low']:.4g}, {entry['absorption_ci_high']:.4g}]"
    section = text[text.index("![orthogonality frontier]"):]
    row = next(ln for ln in section.splitlines() if ln.startswith("| sgo_t0.05_l0.02 "))
    assert expected in row and f"{entry['ev']:.4g} [" in row
    csv = pd.read_csv(tmp_path / "fx" / "answers_frontier.csv").set_index("config")
    assert csv.loc["sgo_t0.05_l0.02", "ev"] == pytest.approx(entry["ev"])


def test_no_frontier_figure_without_two_configurations_to_place(tmp_path):
    from saelib.plots import frontier_png

    one = [{"config": "topk", "architecture": "topk", "lambda": None, "tau": None, "seeds": 2, "ev": 0.9,
            "absorption": 0.1}]
    assert frontier_png(one, tmp_path / "f.png") is None and not (tmp_path / "f.png").exists()
    two = one + [{**one[0], "config": "ortsae_l10", "architecture": "ortsae_topk", "lambda": 10.0, "seeds": 1}]
    assert frontier_png(two, tmp_path / "f.png") == tmp_path / "f.png"  # one seed: points without intervals



def _recompute_and_compare(study: str, archive: Path, reports: Path) -> None:
    import io

    from saelib.run_files import _jsonable

    summary = json.loads((reports / "summary.json").read_text())
    pending = summary.get("pending_runs", [])  # a study part-way: the runs it still declares
    got = answers.study_answers(study, archive, reports_dir=None,
                                planned=[p.name for p in archive.iterdir() if p.is_dir()] + pending)
    for key, table in got.tables.items():
        committed = pd.read_csv(reports / f"answers_{key}.csv")
        recomputed = pd.read_csv(io.StringIO(table.to_csv(index=False)))
        if key == "penalty":
            committed, recomputed = (t.drop(columns="largest Δ element (abs.)") for t in (committed, recomputed))
        pd.testing.assert_frame_equal(recomputed, committed, obj=f"{study}/answers_{key}.csv")
    recomputed = json.loads(json.dumps(got.summary, default=_jsonable))
    assert json.dumps(recomputed, sort_keys=True) == json.dumps(summary, sort_keys=True)  # NaN compares as text


ARCHIVES = sorted(p for p in (Path(__file__).parents[1] / "reports").glob("*/runs") if (p.parent / "answers.md").exists())


@pytest.mark.parametrize("archive", ARCHIVES, ids=lambda p: p.parent.name)
def test_the_committed_answers_follow_from_the_committed_archive(archive):
    """Whoever checks a study can recompute its answers from the archived results committed beside them
    (reports/<study>/runs/, no weights): every table equals its committed CSV — the weights check by digest, so only
    its largest-Δ column (needs the weights) is left out — and summary.json its summary."""
    _recompute_and_compare(archive.parent.name, archive, archive.parent)


def test_answers_recomputed_from_an_archive_equal_those_of_the_runs(tmp_path):
    """The check above on the fixture study: answers written from the runs, recomputed from their archive copies;
    a changed archived number is caught."""
    from saelib import run_files

    study = tmp_path / "runs" / "st"
    shutil.copytree(FIXTURE, study)
    answers.write_answers("st", study, tmp_path / "reports", readme=None)
    archive = tmp_path / "reports" / "st" / "runs"
    core = study / "topk_s0" / "evals" / "core.json"
    result = json.loads(core.read_text())
    result["eval_result_details"] = [{"index": i, "feature_density": 0.0} for i in range(run_files.ARCHIVE_MAX_DETAILS + 1)]
    core.write_text(json.dumps(result))
    for run in study.iterdir():
        run_files.archive_run(run, archive / run.name)
    archived = json.loads((archive / "topk_s0" / "evals" / "core.json").read_text())
    assert archived["eval_result_details"] == [] and archived["saelib_archive"]["eval_result_details_dropped"] == 1001
    assert json.loads((archive / "topk_s0" / "evals" / "absorption.json").read_text())["eval_result_details"]  # kept
    _recompute_and_compare("st", archive, tmp_path / "reports" / "st")
    core = archive / "topk_s1" / "evals" / "core.json"
    result = json.loads(core.read_text())
    result["eval_result_metrics"]["reconstruction_quality"]["explained_variance"] += 0.01
    core.write_text(json.dumps(result))
    with pytest.raises(AssertionError):
        _recompute_and_compare("st", archive, tmp_path / "reports" / "st")


def test_a_control_with_one_seed_gets_no_verdict(tmp_path):
    """One seed has no interval: the answers say so instead of "0 of N reproduce"."""
    study = tmp_path / "st"
    for run in ("topk_s0", "topk_s1"):
        shutil.copytree(FIXTURE / run, study / run)
    shutil.copytree(FIXTURE / "sgo_t0.02_l0.02_s0", study / "ortsae_s0")
    cfg = json.loads((study / "ortsae_s0" / "cfg.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("competition_")}
    (study / "ortsae_s0" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "ortsae_topk", "orth_pen": 10.0,
                                                             "run_name": "ortsae_s0"}))
    got = answers.study_answers("st", study, reports_dir=None)
    controls = got.tables["controls"]
    assert len(controls) and (controls["seeds"] == 1).all() and not controls["reproduces"].any()
    assert "One seed: no interval, so no verdict" in got.markdown and "claimed effects reproduce" not in got.markdown
    assert "False" not in got.markdown.split("### Does the penalty")[0]  # the table says "— (1 seed)", not False
    penalty = got.markdown.split("### Does the penalty reach the weights?")[1].split("###")[0]
    assert penalty.strip() == "No SGO runs beside TopK in this study."  # no empty table under it


def test_a_study_part_way_says_so_and_which_runs_are_pending(tmp_path):
    """The runner passes every run the study declares: answers written before the last one finished say how many are
    still to run (caption, README brief) and summary.json lists them; a finished study says nothing of the kind."""
    study = tmp_path / "runs" / "fixture"
    shutil.copytree(FIXTURE, study)
    done = sorted(p.name for p in study.iterdir() if p.is_dir())
    answers.write_answers("fixture", study, tmp_path / "reports", readme=None, planned=done + ["topk_s2", "sgo_z_s0"])
    text = (tmp_path / "reports" / "fixture" / "answers.md").read_text()
    summary = json.loads((tmp_path / "reports" / "fixture" / "summary.json").read_text())
    assert f"{len(done)} runs of {len(done) + 2} planned (**part-way**: 2 still to run)" in text.splitlines()[0]
    assert (summary["planned_runs"], summary["pending_runs"]) == (len(done) + 2, ["sgo_z_s0", "topk_s2"])
    brief = answers.study_answers("fixture", study, None, planned=done + ["topk_s2"]).brief
    assert "**part-way**: 1 still to run" in brief
    answers.write_answers("fixture", study, tmp_path / "reports", readme=None, planned=done)
    summary = json.loads((tmp_path / "reports" / "fixture" / "summary.json").read_text())
    assert "part-way" not in (tmp_path / "reports" / "fixture" / "answers.md").read_text()
    assert (summary["planned_runs"], summary["pending_runs"]) == (len(done), [])
