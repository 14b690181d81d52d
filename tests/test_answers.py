"""The study's written answers: numbers taken from the results, verdicts chosen by the intervals, README block."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from saelib import answers
from saelib.evals.results import COLUMNS
from saelib.stats import mean_ci, paired_vs_baseline

FIXTURE = Path(__file__).parent / "fixtures" / "study"


def _rows(config, arch, tau, lam, values_by_seed, key):
    ev, metric = key.split("/", 1)
    return [{"run": f"{config}_s{s}", "config": config, "architecture": arch, "tau": tau, "lambda": lam, "seed": s,
             "eval": ev, "metric": metric, "value": v} for s, v in values_by_seed.items()]


def _synthetic(sgo_shift: float, zero_shift: float = 0.0) -> pd.DataFrame:
    """TopK, an SGO run shifted by ``sgo_shift`` on absorption (lower is better) and the λ = 0 control."""
    key = "absorption/mean.mean_absorption_fraction_score"
    base = {0: 0.10, 1: 0.12, 2: 0.11}
    rows = _rows("topk", "topk", np.nan, np.nan, base, key)
    rows += _rows("sgo_t0.02_l10", "sgo_topk", 0.02, 10.0, {s: v + sgo_shift + 0.001 * s for s, v in base.items()}, key)
    rows += _rows("sgo_t0.02_l0", "sgo_topk", 0.02, 0.0, {s: v + zero_shift for s, v in base.items()}, key)
    return pd.DataFrame(rows, columns=COLUMNS)


def test_fixture_answers_quote_the_measured_numbers(tmp_path):
    out = answers.write_answers("fx", FIXTURE, tmp_path, readme=None)
    text = out.read_text()
    for question in ("Does the penalty reach the weights?", "beat TopK", "feature-competition patterns",
                     "competition threshold τ"):
        assert question in text
    # TopK's held-out weighted cos² at τ = 0.02, straight from the two runs' JSON
    values = [json.loads((FIXTURE / r / "evals" / "competition.json").read_text())["eval_result_metrics"]
              ["tau_0.02"]["competing_weighted_cos2"] for r in ("topk_s0", "topk_s1")]
    ci = mean_ci(values)
    assert f"TopK at τ = 0.02: {ci.mean:.3g} [{ci.low:.3g}, {ci.high:.3g}]" in text
    assert "![paired differences from TopK](headline.png)" in text
    png = tmp_path / "fx" / "headline.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_absorbing_pairs_match_a_direct_count():
    table = answers.absorbing_pairs(FIXTURE)
    assert not table.empty
    result = json.loads((FIXTURE / "topk_s0" / "evals" / "competition.json").read_text())
    pairs = pd.DataFrame(result["eval_result_unstructured"]["absorption_vs_competition"])
    distinct = pairs.drop_duplicates(["main_latent", "absorbing_latent"])
    row = table[(table["run"] == "topk_s0") & (table["tau"] == 0.02)].iloc[0]
    assert row["pairs"] == len(distinct)
    cofiring = distinct[distinct["score"] > 0]  # the base rate is over co-firing pairs, so is the flagged fraction
    assert row["cofiring"] == len(cofiring)
    assert row["flagged"] == pytest.approx((cofiring["score"] > 0.02).mean())
    t = result["eval_result_metrics"]["tau_0.02"]
    assert row["base_rate"] == pytest.approx(t["n_competing_pairs"] / t["n_cofiring_pairs"])


def test_verdicts_follow_the_intervals():
    key = "absorption/mean.mean_absorption_fraction_score"
    metrics = {key: ("absorption (mean fraction)", -1)}
    better = answers._quality_paragraph(_synthetic(-0.05), paired_vs_baseline(_synthetic(-0.05), metrics))
    assert "1 better than TopK, 0 worse" in better and "largest gain SGO (τ 0.02, λ 10)" in better
    worse = answers._quality_paragraph(_synthetic(+0.05), paired_vs_baseline(_synthetic(+0.05), metrics))
    assert "0 better than TopK, 1 worse" in worse
    null = answers._quality_paragraph(_synthetic(0.0), paired_vs_baseline(_synthetic(0.0), metrics))
    assert "1 no detectable difference" in null  # the λ = 0 control is identical; sgo differs by 0.001·seed only


def test_the_lambda_zero_control_is_checked_exactly():
    ok = _synthetic(-0.05)
    assert "identical, as it must be" in answers._penalty_paragraph(ok)
    broken = _synthetic(-0.05, zero_shift=1e-6)
    assert "NOT identical" in answers._penalty_paragraph(broken)


def test_one_seed_is_never_called_a_difference():
    key = "absorption/mean.mean_absorption_fraction_score"
    one = _synthetic(-0.05)
    one = one[one["seed"] == 0]
    paired = paired_vs_baseline(one, {key: ("absorption (mean fraction)", -1)})
    text = answers._quality_paragraph(one, paired)
    assert "0 better than TopK, 0 worse, 0 no detectable difference, 1 without an interval" in text
    sweep = answers._threshold_paragraph(one, paired)
    assert "(0 of 1 detectably different from TopK, 1 without an interval)" in sweep


def test_the_penalty_is_judged_at_each_configurations_own_tau():
    rows = []
    for tau, topk, sgo in ((0.02, 0.030, 0.025), (0.2, 0.050, 0.051)):
        key = f"competition/tau_{tau:g}.competing_weighted_cos2"
        rows += _rows("topk", "topk", np.nan, np.nan, {s: topk + 0.001 * s for s in range(3)}, key)
        for config, value in (("sgo_t0.02_l10", sgo if tau == 0.02 else topk),
                              ("sgo_t0.2_l10", sgo if tau == 0.2 else topk)):
            rows += _rows(config, "sgo_topk", 0.0, 10.0, {s: value + 0.001 * s + 1e-4 * (s == 1) for s in range(3)},
                          key)
    text = answers._penalty_paragraph(pd.DataFrame(rows, columns=COLUMNS))
    assert "lower in 1 (SGO (τ 0.02, λ 10)" in text and "higher in 1 (SGO (τ 0.2, λ 10)" in text


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


def test_a_study_without_topk_or_results_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="study_dir"):
        answers.study_answers("empty", tmp_path)
    only = tmp_path / "study"
    for run in ("sgo_t0.02_l0.02_s0",):
        (only / run).parent.mkdir(parents=True, exist_ok=True)
        import shutil
        shutil.copytree(FIXTURE / run, only / run)
    with pytest.raises(ValueError, match="no `topk` runs"):
        answers.study_answers("only", only)


def test_a_one_seed_study_says_so_once_instead_of_after_every_number(tmp_path):
    import shutil

    for run in ("topk_s0", "sgo_t0.02_l0.02_s0"):
        shutil.copytree(FIXTURE / run, tmp_path / "one" / run)
    text = answers.study_answers("one", tmp_path / "one", reports_dir=None).markdown
    assert text.count("One seed: every number below is a single measurement") == 1
    assert answers.ONE_SEED not in text and "(one seed" not in text
    assert "without an interval (one shared seed)" in text  # the counts still say why nothing is called
    two = answers.study_answers("fx", FIXTURE, reports_dir=None).markdown
    assert "One seed: every number" not in two


def test_a_study_part_way_says_how_many_seeds_each_configuration_has(tmp_path):
    import shutil

    for run in ("topk_s0", "topk_s1", "sgo_t0.02_l0.02_s0"):
        shutil.copytree(FIXTURE / run, tmp_path / "part" / run)
    text = answers.study_answers("part", tmp_path / "part", reports_dir=None).markdown
    assert "a study part-way): 1 configuration with 2 seeds, 1 configuration with 1 seed." in text
    assert "part-way" not in answers.study_answers("fx", FIXTURE, reports_dir=None).markdown
