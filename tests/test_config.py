"""Config validation: every bad value names its field; params files hold known keys only; nothing is written."""

import dataclasses
from pathlib import Path

import jupytext
import pytest

from saelib.config import ConfigError, RunConfig, build_config, config_from_notebook

BAD_VALUES = [
    ({"k": 0}, "k"),
    ({"k": 2048, "d_sae": 1024}, "k"),
    ({"d_sae": 0}, "d_sae"),
    ({"hook_layer": 18}, "hook_layer"),
    ({"hook_layer": -1}, "hook_layer"),
    ({"model_name": "gpt-7"}, "model_name"),
    ({"architecture": "magic"}, "architecture"),
    ({"lr": 0.0}, "lr"),
    ({"lr": -1e-3}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"training_tokens": 100, "batch_size": 512}, "training_tokens"),
    ({"cache_tokens": 100, "batch_size": 512}, "cache_tokens"),
    ({"context_size": 1}, "context_size"),
    ({"dataset": "not a dataset"}, "dataset"),
    ({"architecture": "standard"}, "l1_coefficient"),
    ({"l1_coefficient": 5.0}, "l1_coefficient"),
    ({"d_sae": "many"}, "d_sae"),
    ({"d_sae": 10.5}, "d_sae"),
    ({"normalize_activations": "whiten-it"}, "normalize_activations"),
    ({"device": "tpu"}, "device"),
    ({"dtype": "float8"}, "dtype"),
    ({"run_name": "../../etc"}, "run_name"),
    ({"study": "a/b"}, "study"),
    ({"run_name": ".hidden"}, "run_name"),
    ({"n_checkpoints": -1}, "n_checkpoints"),
    ({"n_checkpoints": 1200, "training_tokens": 1_228_800}, "n_checkpoints"),
    ({"log_every": 0}, "log_every"),
    ({"architecture": "matryoshka_batchtopk", "matryoshka_widths": "halves"}, "matryoshka_widths"),
    ({"matryoshka_widths": "saebench"}, "matryoshka_widths"),  # TopK has no nested prefixes
]


@pytest.mark.parametrize("params, field", BAD_VALUES)
def test_bad_value_raises_naming_the_field(params, field):
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        build_config(params)


def test_defaults_are_valid_and_types_are_coerced():
    cfg = build_config({"d_sae": 4096.0, "lr": "1e-3"})
    assert cfg.d_sae == 4096 and isinstance(cfg.d_sae, int)
    assert cfg.lr == pytest.approx(1e-3)
    assert cfg.hook_name == "blocks.8.hook_resid_post"


def test_unknown_parameter_is_rejected():
    with pytest.raises(ConfigError, match="unknown name"):
        build_config({"d_sea": 10})


def test_params_file_unknown_key_is_rejected(tmp_path):
    bad = tmp_path / "study" / "run.yaml"
    bad.parent.mkdir()
    bad.write_text("d_sae: 2048\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"params_file: .*unknown key\(s\) \['learning_rate'\]"):
        build_config(params_file=bad)


def test_params_file_names_the_run_and_explicit_params_win(tmp_path):
    path = tmp_path / "mystudy" / "wide.yaml"
    path.parent.mkdir()
    path.write_text("d_sae: 2048\nk: 8\n")
    cfg = build_config({"k": 4}, params_file=path)
    assert (cfg.study, cfg.run_name, cfg.d_sae, cfg.k) == ("mystudy", "wide", 2048, 4)


@pytest.mark.parametrize("params, name", [
    ({}, "topk_s0"),
    ({"seed": 3}, "topk_s3"),
    ({"orth_pen": 0.02}, "sgo_t0.05_l0.02_s0"),
    ({"orth_pen": 0.0, "competition_threshold": 0.02}, "sgo_t0.02_l0_s0"),
    ({"architecture": "gram_topk", "orth_pen": 10.0}, "gram_l10_s0"),
    ({"architecture": "standard", "l1_coefficient": 3.0}, "standard_l1_3_s0"),
    ({"architecture": "matryoshka_batchtopk"}, "matryoshka_s0"),
    ({"architecture": "matryoshka_batchtopk", "matryoshka_widths": "saebench"}, "matryoshka_saebench_s0"),
    ({"run_name": "mine"}, "mine"),
])
def test_unnamed_run_is_named_for_its_configuration(params, name):
    assert build_config(params).run_name == name


def test_papermill_injected_values_win_even_when_equal_to_the_defaults(tmp_path):
    path = tmp_path / "s" / "r.yaml"
    path.parent.mkdir()
    path.write_text("d_sae: 2048\nk: 8\n")
    namespace = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    cell = "\n".join(f"{name} = {value!r}" for name, value in namespace.items())
    namespace["In"] = ["", cell, "# Parameters\nd_sae = 4096\n"]  # the kernel's history under papermill
    cfg = config_from_notebook(namespace, str(path))
    assert (cfg.d_sae, cfg.k) == (4096, 8)
    namespace["In"][-1] = "# Parameters\nd_sea = 4096\n"
    namespace["d_sea"] = 4096
    with pytest.raises(ConfigError, match=r"^d_sea: not a parameter of this notebook; did you mean d_sae\?$"):
        config_from_notebook(namespace, str(path))


def test_a_finished_run_of_another_configuration_is_refused(tmp_path):
    from saelib import run_files

    cfg = build_config({"runs_dir": str(tmp_path), "orth_pen": 0.02})
    record = lambda c: {**c.to_dict(), **c.resolved_precisions()}  # noqa: E731 (what train_sae writes)
    run_files.prepare_run_dir(cfg.run_dir, record(cfg), cfg.training_key())
    other = build_config({"runs_dir": str(tmp_path), "orth_pen": 0.01, "run_name": cfg.run_name})
    assert config_from_notebook({"runs_dir": str(tmp_path), "orth_pen": 0.01, "run_name": cfg.run_name}) == other
    run_files.prepare_run_dir(other.run_dir, record(other), other.training_key())  # unfinished: restarted
    (cfg.run_dir / run_files.SAE_DIR).mkdir()  # now it holds a finished SAE (of λ 0.01)
    namespace = {"runs_dir": str(tmp_path), "orth_pen": 0.02, "run_name": cfg.run_name}
    with pytest.raises(ConfigError, match=r"^run_name: .* holds a finished SAE of another configuration "
                                          r"\(orth_pen 0.01 → 0.02\)"):
        config_from_notebook(namespace)
    with pytest.raises(FileExistsError, match="orth_pen"):
        run_files.prepare_run_dir(cfg.run_dir, record(cfg), cfg.training_key())
    assert run_files.read_json(cfg.run_dir / run_files.RUN_CFG_FILE)["orth_pen"] == 0.01


def test_notebook_defaults_only_override_where_changed(tmp_path):
    path = tmp_path / "s" / "r.yaml"
    path.parent.mkdir()
    path.write_text("d_sae: 2048\n")
    namespace = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    namespace["k"] = 8  # as if papermill -p k 8
    cfg = config_from_notebook(namespace, str(path))
    assert cfg.d_sae == 2048 and cfg.k == 8


@pytest.mark.parametrize("notebook", sorted(Path("notebooks").glob("train.py")))
def test_notebook_parameters_cell_mirrors_config_defaults(notebook):
    nb = jupytext.read(notebook)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    namespace: dict = {}
    exec(cell.source, namespace)
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    assert {k: namespace[k] for k in defaults} == defaults


@pytest.mark.parametrize("notebook", sorted((Path(__file__).parents[1] / "notebooks").glob("*.py")), ids=lambda p: p.stem)
def test_papermill_sees_every_parameter(notebook):
    """papermill skips a parameters line holding a second "=" (a comment's "a = b") and then warns "Passed unknown
    parameter" for a -p the notebook does take: every name in the cell must be one papermill recognises."""
    import papermill

    cell = next(c for c in jupytext.read(notebook).cells if "parameters" in c.metadata.get("tags", []))
    namespace: dict = {}
    exec(cell.source, namespace)
    ipynb = Path(notebook).with_suffix(".ipynb")
    assert set(papermill.inspect_notebook(str(ipynb))) == {k for k in namespace if not k.startswith("__")}


def test_rejected_config_writes_nothing(tmp_path, monkeypatch):
    from saelib.notebook import run_notebook

    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "params" / "s" / "bad.yaml"
    bad.parent.mkdir(parents=True)
    bad.write_text("k: 0\n")
    with pytest.raises(ConfigError, match="^k: "):
        run_notebook(Path(__file__).parents[1] / "notebooks" / "train.ipynb", bad, reports_dir=tmp_path / "reports")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "reports").exists()


def test_notebook_parameters_name_and_check_the_run(tmp_path, monkeypatch):
    """-p values that are config fields count before anything is written: a bad one is refused, and run_name /
    runs_dir place the run folder and the report (not the params file's own name)."""
    import saelib.notebook as notebook_mod

    monkeypatch.chdir(tmp_path)
    good = tmp_path / "params" / "s" / "r.yaml"
    good.parent.mkdir(parents=True)
    good.write_text("k: 8\n")
    executed = []
    monkeypatch.setattr(notebook_mod, "execute", lambda nb, out, params, progress_bar=False: executed.append(out))
    monkeypatch.setattr(notebook_mod, "render_report", lambda executed_nb, html: html)
    train = Path(__file__).parents[1] / "notebooks" / "train.ipynb"
    with pytest.raises(ConfigError, match="^k: "):
        notebook_mod.run_notebook(train, good, reports_dir=tmp_path / "reports", parameters={"k": 0})
    assert not (tmp_path / "runs").exists() and not executed
    html = notebook_mod.run_notebook(train, good, reports_dir=tmp_path / "reports",
                                     parameters={"run_name": "other", "runs_dir": "elsewhere", "profile": ""})
    assert executed == [Path("elsewhere") / "s" / "other" / "train.ipynb"]
    assert html == tmp_path / "reports" / "s" / "other.html"
    assert not (tmp_path / "runs").exists()


def test_study_defaults_apply_before_the_run_file(tmp_path):
    study = tmp_path / "params" / "s"
    study.mkdir(parents=True)
    (study / "_study.yaml").write_text("d_sae: 2048\nk: 8\n")
    (study / "run.yaml").write_text("k: 4\n")
    cfg = build_config(params_file=study / "run.yaml")
    assert (cfg.d_sae, cfg.k, cfg.run_name) == (2048, 4, "run")


def _shipped_runs():
    from saelib.config import grid_runs

    files = set(Path("params").glob("*/[!_]*.yaml"))
    grids = {folder / f"{name}.yaml" for folder in Path("params").iterdir() if folder.is_dir()
             for name in grid_runs(folder)}
    return sorted(files | grids)


@pytest.mark.parametrize("path", _shipped_runs())
def test_every_shipped_run_is_valid(path):
    build_config(params_file=path)


def _grid(folder, text, study="s"):
    study_dir = folder / "params" / study
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / "_grid.yaml").write_text(text)
    return study_dir


def test_a_grid_expands_into_configurations_times_seeds(tmp_path):
    from saelib.config import grid_runs

    study = _grid(tmp_path, "seeds: [0, 1]\nconfigs:\n  topk: {architecture: topk}\n"
                            "  sgo_t0.02_l1: {orth_pen: 1, competition_threshold: 0.02, seeds: [3]}\n")
    (study / "_study.yaml").write_text("d_sae: 2048\n")
    assert grid_runs(study) == {"topk_s0": {"architecture": "topk", "seed": 0},
                                "topk_s1": {"architecture": "topk", "seed": 1},
                                "sgo_t0.02_l1_s3": {"orth_pen": 1, "competition_threshold": 0.02, "seed": 3}}
    cfg = build_config(params_file=study / "sgo_t0.02_l1_s3.yaml")  # a grid run is addressed as its params file
    assert (cfg.study, cfg.run_name, cfg.seed, cfg.orth_pen, cfg.competition_threshold, cfg.d_sae) == \
        ("s", "sgo_t0.02_l1_s3", 3, 1.0, 0.02, 2048)
    (study / "extra.yaml").write_text("k: 16\n")  # a one-off params file beside the grid still counts
    from saelib.study import study_runs

    assert [r.name for r in study_runs(study)] == ["topk_s0", "extra", "topk_s1", "sgo_t0.02_l1_s3"]
    other = _grid(tmp_path, "from: ../s\n", study="t")
    (other / "_study.yaml").write_text("d_sae: 512\n")
    assert grid_runs(other) == grid_runs(study)
    assert build_config(params_file=other / "topk_s1.yaml").d_sae == 512  # its own profile


@pytest.mark.parametrize("text, message", [
    ("configs: {topk: {sede: 1}}", r"configs.topk: unknown or grid-set key\(s\) \['sede'\]"),
    ("configs: {topk: {seed: 1}}", r"configs.topk: unknown or grid-set key\(s\) \['seed'\]"),
    ("seeds: [0, 0]\nconfigs: {topk: {}}", "seeds: expected a non-empty list of distinct integers"),
    ("seeds: 3\nconfigs: {topk: {}}", "seeds: expected a non-empty list of distinct integers"),
    ("configs: {topk_s1: {}}", "configs: expected names of letters, digits"),
    ("configs: {}", "configs: expected a mapping of configuration name"),
    ("seed: [0]\nconfigs: {topk: {}}", "expected a mapping with keys among seeds, configs, from"),
    ("from: ../nowhere", "from: expected another study's params folder"),
    ("configs: [topk]", "configs: expected a mapping of configuration name: overrides"),
    ("configs: {topk: [1]}", r"configs.topk: expected a mapping of parameter: value"),
    ("seeds: [true]\nconfigs: {topk: {}}", "seeds: expected a non-empty list of distinct integers"),
])
def test_bad_grids_name_what_is_wrong(tmp_path, text, message):
    from saelib.config import grid_runs

    with pytest.raises(ConfigError, match=message):
        grid_runs(_grid(tmp_path, text))


def test_a_run_defined_twice_or_nowhere_is_an_error(tmp_path):
    study = _grid(tmp_path, "configs: {topk: {}}\n")
    (study / "topk_s0.yaml").write_text("k: 16\n")
    with pytest.raises(ConfigError, match="params_file: run 'topk_s0' is defined twice"):
        build_config(params_file=study / "topk_s0.yaml")
    with pytest.raises(ConfigError, match="params_file: no such file .*, nor a run 'topk_s9' of"):
        build_config(params_file=study / "topk_s9.yaml")


def test_training_key_leaves_out_parameters_the_architecture_does_not_take(tmp_path):
    from saelib import run_files

    topk = build_config({"runs_dir": str(tmp_path)})
    assert not {"orth_pen", "competition_threshold", "competition_stat_tokens", "l1_coefficient"} & set(
        topk.training_key())
    # a TopK run recorded before an SGO-only field existed is still the same run
    recorded = {k: v for k, v in {**topk.to_dict(), **topk.resolved_precisions()}.items()
                if k != "competition_stat_tokens"}
    topk.run_dir.mkdir(parents=True)
    run_files.write_json_atomic(topk.run_dir / run_files.RUN_CFG_FILE, recorded)
    assert run_files.changed_fields(topk.run_dir, topk.training_key()) == {}
    # an SGO run recorded before one of its own fields existed was trained as that field's default says
    sgo_run = build_config({"runs_dir": str(tmp_path), "orth_pen": 0.02})
    sgo_run.run_dir.mkdir(parents=True)
    run_files.write_json_atomic(sgo_run.run_dir / run_files.RUN_CFG_FILE, {
        k: v for k, v in {**sgo_run.to_dict(), **sgo_run.resolved_precisions()}.items()
        if k != "competition_normalisation"})
    assert run_files.changed_fields(sgo_run.run_dir, sgo_run.training_key()) == {}
    per_latent = build_config({"runs_dir": str(tmp_path), "orth_pen": 0.02, "run_name": sgo_run.run_name,
                               "competition_normalisation": "latents"})
    assert run_files.changed_fields(sgo_run.run_dir, per_latent.training_key()) == {
        "competition_normalisation": ("pairs", "latents")}
    sgo = build_config({"orth_pen": 0.02}).training_key()
    assert {"orth_pen", "competition_threshold", "competition_stat_tokens"} <= set(sgo)
    assert sgo != build_config({"orth_pen": 0.02, "competition_stat_tokens": 512}).training_key()


def test_a_stream_setting_is_not_part_of_a_cache_runs_identity(tmp_path):
    base = {"runs_dir": str(tmp_path)}
    cache = build_config(base).training_key()
    assert build_config({**base, "stream_buffer_tokens": 4096}).training_key() == cache  # unused by a cache run
    stream = build_config({**base, "activations": "stream"}).training_key()
    assert stream != cache and stream["stream_buffer_tokens"] == 262_144
    assert build_config({**base, "activations": "stream", "stream_buffer_tokens": 4096}).training_key() != stream


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA device")
def test_a_gpu_run_on_a_cpu_machine_stops_before_the_notebook_writes_anything(tmp_path, monkeypatch):
    from saelib.notebook import run_notebook

    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params" / "s" / "r.yaml"
    params.parent.mkdir(parents=True)
    params.write_text("device: cuda\n")
    with pytest.raises(ConfigError, match=r"^device: 'cuda' was asked for, .* the CPU default is device: cpu$"):
        run_notebook(Path(__file__).parents[1] / "notebooks" / "train.ipynb", params, reports_dir=tmp_path / "reports")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "reports").exists()


def test_every_sae_setting_is_declared_once_and_shared_by_the_run_and_sae_configs():
    """RunConfig and the registered sae_lens training configs inherit each setting from its one declaration in
    saelib.settings (the same dataclass Field): a redeclared copy, with its own default, fails here."""
    from sae_lens.registry import get_sae_training_class

    import saelib.saes  # noqa: F401  (registers saelib's architectures)
    from saelib import settings
    from saelib.train import SPARSE_STEP

    for arch, groups in settings.ARCH_SETTINGS.items():
        _, cfg_cls = get_sae_training_class(SPARSE_STEP.get(arch, arch))
        for group in groups:
            for name in group.own_fields():
                declared = group.__dataclass_fields__[name]
                assert RunConfig.__dataclass_fields__[name] is declared, name
                if issubclass(cfg_cls, group):  # saelib's own classes; sae_lens's get the values handed through
                    assert cfg_cls.__dataclass_fields__[name] is declared, (arch, name)
    assert issubclass(get_sae_training_class("sgo_topk")[1], settings.SGOSettings)


def test_a_setting_of_every_topk_architecture_does_not_make_a_run_sgo():
    # sae_precision is taken by TopK and SGO alike: only λ or τ mean "the method" when no architecture is given
    assert build_config({"sae_precision": "float32"}).architecture == "topk"
    assert build_config({"competition_threshold": 0.02}).architecture == "sgo_topk"
