"""The typed run configuration: one flat dataclass built from notebook parameters and ``params/*.yaml`` overrides.

Every value is validated once, here, and a bad value raises ``ConfigError`` naming the field and what was
expected. This module does not load models or touch the disk beyond reading a params file.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from saelib.models import MODELS
from saelib.settings import (ARCHITECTURES, SETTINGS_GROUPS, ConfigError, L1Settings,
                             MatryoshkaSettings, OrthSettings, OrtSAESettings, PrecisionSettings, SGOSettings,
                             arch_fields, check as _check, taken_by)
from saelib.sparse_step import PRECISIONS, device_here, resolve_precision

#: Architectures, the SAE settings each takes and their one declaration: ``saelib.settings``.
#: The offline corpus built by ``saelib.data``; any other value is treated as a hub dataset id ("org/name").
OFFLINE_DATASET = "saelib-offline"
NORMALIZATIONS = ("none", "expected_average_only_in")
#: Overrides shared by every run of a study folder (``params/<study>/_study.yaml``), applied before the run's own.
STUDY_DEFAULTS_FILE = "_study.yaml"
#: A study's runs as configurations × seeds (see ``grid_runs``); params files beside it stay for one-off runs.
GRID_FILE = "_grid.yaml"


#: Values of ``device`` and ``dtype`` that torch and sae_lens take.
_DEVICE = re.compile(r"cpu|cuda(:\d+)?|mps")
DTYPES = ("float32", "float64", "bfloat16", "float16")
_FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
SEED_NAME = re.compile(r"_s\d+$")
"""Runs that differ only by seed are named ``<config>_s<seed>`` (grids name them so)."""
#: Named profiles a notebook run can start from (``profile`` parameter or ``$SAELIB_PROFILE``): ``default`` is
#: ``RunConfig``'s own defaults; ``smoke`` (a one-minute pipeline check for tests and CI) is ``params/smoke/_study.yaml``.
PROFILES = ("default", "smoke")
ACTIVATION_SOURCES = ("cache", "stream")
PROFILE_ENV = "SAELIB_PROFILE"


@dataclass
class RunConfig(PrecisionSettings, OrthSettings, SGOSettings, OrtSAESettings, L1Settings, MatryoshkaSettings):
    """Everything that determines one SAE run. Defaults are the single-run default profile: a healthy TopK SAE on the
    embedded model (d_sae 4,096, k 32, 1.23M tokens = 2 epochs of a 614,400-token cache). ``params/smoke/_study.yaml``
    holds the smoke profile the tests select."""

    # --- where the run lives
    study: str = "single"
    """Study folder name under ``runs/`` (a params file gives its folder's name; the smoke profile ``smoke``)."""
    run_name: str = ""
    """Run folder name (``runs/<study>/<run_name>/``): a params file's stem, else derived from the configuration
    (``sgo_t0.05_l0.02_s0``; see :meth:`RunConfig.label`)."""
    runs_dir: str = "runs"
    """Root of all run folders."""

    # --- model and activations
    model_name: str = "gemma-3-270m"
    """Short model name, one of ``saelib.models.MODELS``."""
    hook_layer: int = 8
    """Block whose ``hook_resid_post`` is read (``blocks.{hook_layer}.hook_resid_post``)."""
    dataset: str = OFFLINE_DATASET
    """``saelib-offline`` (text shipped in installed packages) or a hub dataset id for users with the hub."""
    context_size: int = 128
    """Tokens per sequence, BOS included."""
    cache_tokens: int = 614_400
    """Activations cached for training (special-token positions excluded); one epoch of the stream."""
    activations: str = "cache"
    """Where training reads activations: ``cache``, one LM pass written to disk and reused by every run (on a CPU the
    LM pass is the bottleneck); ``stream``, produced as they are consumed through an in-memory mixing buffer of
    ``stream_buffer_tokens`` rows, nothing on disk (hub-scale runs on a GPU)."""
    stream_buffer_tokens: int = 262_144
    """Rows in the stream's mixing buffer (``activations: stream``), on the LM's device."""
    eval_tokens: int = 32_768
    """Held-out tokens for reconstruction metrics (explained variance, MSE, L0, dead latents)."""
    eval_ce_tokens: int = 4_096
    """Held-out tokens for the full-model metrics (CE-loss recovered, KL); these need all logits, so keep small."""
    centre_activations: bool = True
    """Subtract the training mean before the SAE sees activations; folded into ``b_dec`` after training."""
    normalize_activations: str = "expected_average_only_in"
    """sae_lens activation normalisation (folded into the weights after training)."""

    # --- SAE
    architecture: str = "topk"
    """One of ``ARCHITECTURES``."""
    d_sae: int = 4_096
    """Number of latents."""
    k: int = 32
    """Active latents per token (TopK family)."""
    # the architecture's own settings (λ, τ, …) come from the settings groups among RunConfig's bases

    # --- training
    training_tokens: int = 1_228_800
    """Training samples seen; above ``cache_tokens`` the cache is re-served in new shuffled epochs."""
    batch_size: int = 1_024
    """Activations per optimiser step."""
    lr: float = 1e-3
    """Adam learning rate (constant after warm-up)."""
    lr_warm_up_steps: int = 0
    dead_feature_window: int = 200
    """Steps without firing after which a latent counts as dead (drives TopK's aux-k loss)."""
    n_checkpoints: int = 4
    """Intermediate checkpoints saved during training (resume points)."""
    log_every: int = 10
    """Steps between rows of the training history (loss, L0, explained variance)."""
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    lm_precision: str = "auto"
    """The language model's weights for activations and evals: ``auto`` (bf16 where native and measured faster than
    fp32), ``float32`` or ``bfloat16``. Activations are cached as fp32 either way; the cache is keyed by this
    choice."""

    def __post_init__(self) -> None:
        self._validate()

    # ---- validation -------------------------------------------------------------------------------
    def _validate(self) -> None:
        _check(self.model_name in MODELS, "model_name", f"one of {sorted(MODELS)}, got {self.model_name!r}")
        n_layers = MODELS[self.model_name].n_layers
        _check(0 <= self.hook_layer < n_layers, "hook_layer",
               f"a block index in [0, {n_layers - 1}] for {self.model_name}, got {self.hook_layer}")
        _check(self.architecture in ARCHITECTURES, "architecture",
               f"one of {list(ARCHITECTURES)}, got {self.architecture!r}")
        _check(self.dataset == OFFLINE_DATASET or _looks_like_hub_id(self.dataset), "dataset",
               f"{OFFLINE_DATASET!r} or a hub dataset id 'org/name', got {self.dataset!r}")
        _check(self.context_size > 1, "context_size", f"an integer > 1, got {self.context_size}")
        _check(self.d_sae > 0, "d_sae", f"a positive integer, got {self.d_sae}")
        if self.architecture != "standard":
            _check(0 < self.k <= self.d_sae, "k", f"an integer in [1, d_sae={self.d_sae}], got {self.k}")
        _check(math.isfinite(self.lr) and self.lr > 0, "lr", f"a positive finite number, got {self.lr}")
        _check(self.batch_size > 0, "batch_size", f"a positive integer, got {self.batch_size}")
        _check(self.training_tokens >= self.batch_size, "training_tokens",
               f"at least one batch (batch_size={self.batch_size}), got {self.training_tokens}")
        _check(self.cache_tokens >= self.batch_size, "cache_tokens",
               f"at least one batch (batch_size={self.batch_size}), got {self.cache_tokens}")
        _check(self.activations in ACTIVATION_SOURCES, "activations",
               f"one of {list(ACTIVATION_SOURCES)}, got {self.activations!r}")
        _check(self.activations != "stream" or self.stream_buffer_tokens >= self.batch_size, "stream_buffer_tokens",
               f"a mixing buffer of at least one batch (batch_size={self.batch_size}), got {self.stream_buffer_tokens}")
        _check(self.eval_tokens > 0 and self.eval_ce_tokens > 0, "eval_tokens",
               f"positive eval_tokens and eval_ce_tokens, got {self.eval_tokens}, {self.eval_ce_tokens}")
        _check(self.normalize_activations in NORMALIZATIONS, "normalize_activations",
               f"one of {list(NORMALIZATIONS)}, got {self.normalize_activations!r}")
        for name in ("dead_feature_window", "log_every"):
            _check(getattr(self, name) > 0, name, f"a positive integer, got {getattr(self, name)}")
        _check(self.n_checkpoints >= 0, "n_checkpoints", f"an integer >= 0, got {self.n_checkpoints}")
        _check(_DEVICE.fullmatch(self.device) is not None, "device",
               f"'cpu', 'cuda', 'cuda:<index>' or 'mps', got {self.device!r}")
        _check(self.dtype in DTYPES, "dtype", f"one of {list(DTYPES)}, got {self.dtype!r}")
        if not self.run_name:
            self.run_name = self.label()
        for name in ("study", "run_name"):  # one folder name each: nothing may land outside runs_dir
            _check(_FOLDER_NAME.fullmatch(getattr(self, name)) is not None, name,
                   f"a folder name of letters, digits and _ . + - (not starting with '.'), got {getattr(self, name)!r}")
        _check(self.lr_warm_up_steps >= 0, "lr_warm_up_steps", f">= 0, got {self.lr_warm_up_steps}")
        here = device_here(self.device)  # a GPU profile stays declarable on a CPU machine; running it is checked
        try:
            if here:
                resolve_precision(self.lm_precision, self.device, "lm_precision")
            else:
                _check(self.lm_precision in PRECISIONS, "lm_precision",
                       f"one of {list(PRECISIONS)}, got {self.lm_precision!r}")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self._validate_arch_params()

    def _validate_arch_params(self) -> None:
        self.check_settings()  # every settings group validates its own fields (saelib.settings)
        if self.architecture == "standard":
            _check(self.l1_coefficient > 0, "l1_coefficient", "> 0 for architecture 'standard'")
        n_steps = self.training_tokens // self.batch_size
        _check(self.n_checkpoints < n_steps, "n_checkpoints",
               f"fewer checkpoints than training steps ({n_steps}), got {self.n_checkpoints}")
        _check(self.architecture != "sgo_topk" or self.competition_warmup_steps < n_steps, "competition_warmup_steps",
               f"an integer in [0, {n_steps}) (training has {n_steps} steps), got {self.competition_warmup_steps}")
        defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
        for group in SETTINGS_GROUPS:
            for name in group.own_fields():
                if getattr(self, name) != defaults[name] and name not in arch_fields(self.architecture):
                    raise ConfigError(
                        f"{name}: architecture {self.architecture!r} takes no {name}; it is a parameter of "
                        f"{' / '.join(taken_by(name))} (set architecture accordingly)")

    # ---- derived names ----------------------------------------------------------------------------
    def label(self) -> str:
        """The run's name when none is given: the architecture, its own parameters and the seed, e.g. ``topk_s0``,
        ``sgo_t0.05_l0.02_s0`` (``sgo_t0.05_l1_perlatent_s0`` with per-latent normalisation), ``ortsae_l1_s0``,
        ``standard_l1_3_s0`` (the grids' convention)."""
        name = {
            "sgo_topk": f"sgo_t{self.competition_threshold:g}_l{self.orth_pen:g}"
                        + ("_perlatent" if self.competition_normalisation == "latents" else ""),
            "ortsae_topk": f"ortsae_l{self.orth_pen:g}",
            "gram_topk": f"gram_l{self.orth_pen:g}",
            "standard": f"standard_l1_{self.l1_coefficient:g}",
            "matryoshka_batchtopk": "matryoshka"
                                    + ("" if self.matryoshka_widths == "quarters" else f"_{self.matryoshka_widths}"),
        }.get(self.architecture, self.architecture)
        return f"{name}_s{self.seed}"

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.hook_layer}.hook_resid_post"

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.study / self.run_name

    def resolved_precisions(self) -> dict[str, str]:
        """What ``auto`` means on this machine: ``{"sae_precision_used": ..., "lm_precision_used": ...}``.
        The SAE side is fp32 for architectures outside the sparse TopK step."""
        sae = resolve_precision(self.sae_precision, self.device) if "sae_precision" in arch_fields(self.architecture) \
            else "float32"
        return {"sae_precision_used": sae,
                "lm_precision_used": resolve_precision(self.lm_precision, self.device, "lm_precision")}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def training_key(self) -> dict[str, Any]:
        """The fields that determine the trained weights, with the precisions actually used: a run resumed on a
        machine that resolves ``auto`` otherwise starts fresh. Run folder names and places are left out, and so are
        settings the architecture does not take (``saelib.settings``): a TopK run is the same run whatever τ says."""
        key = {k: v for k, v in self.to_dict().items() if k not in ("study", "run_name", "runs_dir")
               and (k in arch_fields(self.architecture) or k not in _SETTINGS_FIELDS)
               and not (k == "stream_buffer_tokens" and self.activations == "cache")}  # a setting it did not use
        return {**key, **self.resolved_precisions()}


_SETTINGS_FIELDS = {name for group in SETTINGS_GROUPS for name in group.own_fields()}


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(RunConfig)]


def config_of_run(run_dir: str | Path) -> RunConfig:
    """The config a run folder's cfg.json records (the resolved precisions it also records are left out)."""
    from saelib import run_files

    recorded = run_files.read_json(Path(run_dir) / run_files.RUN_CFG_FILE)
    return build_config({k: v for k, v in recorded.items() if not k.endswith("_used")})


def run_device(run_dir: str | Path) -> str:
    """The device a run folder was trained on (its cfg.json), ``cpu`` for a folder without one."""
    from saelib import run_files

    path = Path(run_dir) / run_files.RUN_CFG_FILE
    return run_files.read_json(path).get("device", "cpu") if path.exists() else "cpu"


def with_defaults(recorded: dict[str, Any]) -> dict[str, Any]:
    """A recorded cfg.json's fields, each field it predates filled with its default: a run recorded before a field
    existed was trained as that field's default says."""
    return {**{f.name: f.default for f in dataclasses.fields(RunConfig)}, **recorded}


def load_params_file(path: str | Path) -> dict[str, Any]:
    """Read a ``params/<study>/<run>.yaml`` of overrides, or the run of that name in ``params/<study>/_grid.yaml``;
    unknown keys are an error, and so is a run defined both ways."""
    path = Path(path)
    grid = grid_runs(path.parent) if path.parent.is_dir() and not path.name.startswith("_") else {}
    if not path.is_file():
        if path.suffix == ".yaml" and path.stem in grid:
            return grid[path.stem]
        raise ConfigError(f"params_file: no such file {str(path)!r}, nor a run {path.stem!r} of "
                          f"{path.parent / GRID_FILE}")
    if path.stem in grid:
        raise ConfigError(f"params_file: run {path.stem!r} is defined twice, by {path} and by "
                          f"{path.parent / GRID_FILE}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"params_file: {path} must hold a mapping of parameter: value")
    unknown = sorted(set(data) - set(field_names()))
    if unknown:
        raise ConfigError(f"params_file: {path} has unknown key(s) {unknown}; known keys: {field_names()}")
    return data


def grid_runs(study_params: str | Path) -> dict[str, dict[str, Any]]:
    """``{run name: overrides}`` declared by ``<study_params>/_grid.yaml`` ({} without one)::

        seeds: [0, 1, 2]                   # every configuration's seeds (default [0])
        configs:                           # configuration name: overrides of the study profile (_study.yaml)
          topk: {architecture: topk}
          sgo_t0.02_l0.01: {architecture: sgo_topk, competition_threshold: 0.02, orth_pen: 0.01}
          standard: {architecture: standard, l1_coefficient: 3, seeds: [0]}   # its own seeds
        from: ../default                   # optional: another study's configurations and seeds, under this profile

    Run ``<config>_s<seed>`` gets the configuration's overrides and ``seed``; τ, λ and the seed are fields of its
    config (and of its cfg.json), never read back from its name."""
    folder = Path(study_params)
    path = folder / GRID_FILE
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    where = f"{GRID_FILE} ({path})"
    if not isinstance(data, dict) or set(data) - {"seeds", "configs", "from"}:
        raise ConfigError(f"{where}: expected a mapping with keys among seeds, configs, from; got "
                          f"{sorted(data) if isinstance(data, dict) else type(data).__name__}")
    base: dict[str, Any] = {}
    if "from" in data:
        source = (folder / str(data["from"])).resolve()
        if not (source / GRID_FILE).is_file() or source == folder.resolve():
            raise ConfigError(f"{where}: from: expected another study's params folder with a {GRID_FILE}, "
                              f"got {data['from']!r}")
        base = yaml.safe_load((source / GRID_FILE).read_text()) or {}
        if "from" in base:
            raise ConfigError(f"{where}: from: {data['from']!r} takes its own grid from elsewhere; point at that")
    seeds = data.get("seeds", base.get("seeds", [0]))
    _check_seeds(seeds, f"{where}: seeds")
    configs: dict[str, Any] = {}
    for part in (base.get("configs"), data.get("configs")):
        if part is not None and not isinstance(part, dict):
            raise ConfigError(f"{where}: configs: expected a mapping of configuration name: overrides, got {part!r}")
        configs.update(part or {})
    if not configs:
        raise ConfigError(f"{where}: configs: expected a mapping of configuration name: overrides, got none")
    runs: dict[str, dict[str, Any]] = {}
    for name, overrides in configs.items():
        if overrides is not None and not isinstance(overrides, dict):
            raise ConfigError(f"{where}: configs.{name}: expected a mapping of parameter: value, got {overrides!r}")
        overrides = dict(overrides or {})
        own_seeds = overrides.pop("seeds", seeds)
        _check_seeds(own_seeds, f"{where}: configs.{name}.seeds")
        if not _FOLDER_NAME.fullmatch(str(name)) or SEED_NAME.search(str(name)):
            raise ConfigError(f"{where}: configs: expected names of letters, digits and _ . + - not ending in _s<n>, "
                              f"got {name!r}")
        bad = sorted(set(overrides) - set(field_names())) + sorted({"seed", "study", "run_name"} & set(overrides))
        if bad:
            raise ConfigError(f"{where}: configs.{name}: unknown or grid-set key(s) {bad}; the grid sets seed, "
                              f"study and run_name")
        for seed in own_seeds:
            runs[f"{name}_s{seed}"] = {**overrides, "seed": seed}
    return runs


def _check_seeds(seeds: Any, where: str) -> None:
    if not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds) \
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds):
        raise ConfigError(f"{where}: expected a non-empty list of distinct integers >= 0, got {seeds!r}")


def build_config(params: dict[str, Any] | None = None, params_file: str | Path | None = None,
                 profile: str = "") -> RunConfig:
    """Config from (in increasing priority) defaults, a profile or a params file, and explicit parameters.

    A params file also names the run: ``params/<study>/<run>.yaml`` gives ``study`` and ``run_name`` unless set;
    ``params/<study>/_study.yaml``, if present, is applied before it (the study's shared profile). Without a params
    file, ``profile`` (or ``$SAELIB_PROFILE``) picks one of ``PROFILES`` as the base. Unknown keys raise
    ``ConfigError``; nothing is written for a rejected config.
    """
    merged: dict[str, Any] = {}
    if params_file:
        if profile:
            raise ConfigError(f"profile: a params_file brings its study's own profile; give one or the other, "
                              f"got profile {profile!r} with {str(params_file)!r}")
        path = Path(params_file)
        merged.update({"study": path.parent.name, "run_name": path.stem})
        study_defaults = path.parent / STUDY_DEFAULTS_FILE
        if study_defaults.is_file() and study_defaults != path:
            merged.update(load_params_file(study_defaults))
        merged.update(load_params_file(path))
    else:
        merged.update(profile_values(profile))
    params = dict(params or {})
    unknown = sorted(set(params) - set(field_names()))
    if unknown:
        raise ConfigError(f"parameters: unknown name(s) {unknown}; known: {field_names()}")
    merged.update(params)
    _infer_architecture(merged)
    return RunConfig(**_coerce_types(merged))


def active_profile(profile: str = "") -> str:
    """``profile`` if given, else ``$SAELIB_PROFILE``, else ``default``; checked against ``PROFILES``."""
    name = profile or os.environ.get(PROFILE_ENV, "") or "default"
    if name not in PROFILES:
        source = "profile" if profile else PROFILE_ENV
        raise ConfigError(f"{source}: expected one of {list(PROFILES)}, got {name!r}")
    return name


def profile_values(profile: str = "") -> dict[str, Any]:
    """The overrides of a named profile (empty for ``default``), with ``study`` set to its name."""
    from saelib.run_files import repo_path

    name = active_profile(profile)
    if name == "default":
        return {}
    return {"study": name, **load_params_file(repo_path(f"params/{name}/{STUDY_DEFAULTS_FILE}"))}


def _infer_architecture(values: dict[str, Any]) -> None:
    """``-p orth_pen 0.02`` (or τ) without an architecture means the method itself: ``sgo_topk``."""
    if "architecture" not in values and any(name in values for group in (OrthSettings, SGOSettings)
                                            for name in group.own_fields()):
        values["architecture"] = "sgo_topk"


def _coerce_types(values: dict[str, Any]) -> dict[str, Any]:
    """papermill/YAML may give ``4096.0`` or ``"1e-3"``; cast to each field's declared type or fail by name."""
    types = {f.name: f.type for f in dataclasses.fields(RunConfig)}
    out = {}
    for name, value in values.items():
        kind = types[name]
        try:
            if kind == "int":
                if isinstance(value, bool) or float(value) != int(float(value)):
                    raise ValueError
                out[name] = int(float(value))
            elif kind == "float":
                out[name] = float(value)
            elif kind == "bool":
                if not isinstance(value, bool):
                    raise ValueError
                out[name] = value
            else:
                out[name] = str(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a value of type {kind}, got {value!r}") from None
    return out


def config_from_notebook(namespace: dict[str, Any], params_file: str | Path | None = None,
                         profile: str = "") -> RunConfig:
    """Config for a notebook whose ``parameters`` cell mirrors ``RunConfig``'s defaults.

    Priority, lowest first: the profile (or the params file), then values edited in the parameters cell (those that
    differ from the defaults), then every value papermill injected (``-p``), even one equal to a default. A run
    folder that already holds a finished SAE of another configuration is refused before anything is written.
    """
    injected = injected_parameters(namespace)
    defaults = RunConfig.__dataclass_fields__
    edited = {name: namespace[name] for name in field_names()
              if name in namespace and namespace[name] != defaults[name].default}
    params = {**edited, **{name: value for name, value in injected.items() if name in defaults}}
    cfg = build_config(params, params_file=params_file or None, profile=profile)
    conflict = finished_run_conflict(cfg)
    if conflict:
        raise ConfigError(conflict)
    return cfg


EVAL_PROFILES = ("smoke", "default")


def evaluation_target(namespace: dict[str, Any], params_file: str = "", run_dir: str = "", profile: str = "",
                      eval_profile: str = "") -> tuple[Path, str]:
    """The evaluate notebook's run folder and eval profile: a params file's run, else ``run_dir``, else the folder
    the train notebook writes under ``profile`` with the same ``-p`` values (any ``RunConfig`` field is accepted);
    ``eval_profile`` "" follows the profile. Unknown papermill parameters and bad values raise ``ConfigError``."""
    given = {k: v for k, v in injected_parameters(namespace, also=field_names()).items() if k in field_names()}
    if params_file:
        folder = build_config(given, params_file=params_file, profile=profile).run_dir
    else:
        folder = Path(run_dir) if run_dir else build_config(given, profile=profile).run_dir
    eval_profile = eval_profile or ("smoke" if active_profile(profile) == "smoke" else "default")
    _check(eval_profile in EVAL_PROFILES, "eval_profile", f"one of {list(EVAL_PROFILES)}, got {eval_profile!r}")
    return folder, eval_profile


#: The first line papermill writes into the cell it injects after the ``parameters`` cell.
PAPERMILL_HEADER = "# Parameters\n"


def injected_parameters(namespace: dict[str, Any], also: list[str] = ()) -> dict[str, Any]:
    """The values papermill injected (``-p``/``-y``/``-f``), read from the kernel's input history ``In``: its cell
    starts with ``# Parameters`` and follows the ``parameters`` cell. A name that the parameters cell does not
    declare (nor ``also`` lists) raises ``ConfigError`` naming it and the close matches. Empty outside papermill."""
    history = list(namespace.get("In", []))
    found = [i for i, source in enumerate(history) if source.startswith(PAPERMILL_HEADER)]
    if not found:
        return {}
    names = _assigned_names(history[found[-1]])
    declared = {*_assigned_names(history[found[-1] - 1]), *also}
    for name in names:
        if name not in declared:
            close = difflib.get_close_matches(name, sorted(declared), n=3)
            raise ConfigError(f"{name}: not a parameter of this notebook"
                              + (f"; did you mean {' or '.join(close)}?" if close else f"; known: {sorted(declared)}"))
    return {name: namespace[name] for name in names}


def _assigned_names(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    return [target.id for node in tree.body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)]


def finished_run_conflict(cfg: RunConfig) -> str | None:
    """Why ``cfg`` may not use its run folder, or None: the folder holds a finished SAE trained with another
    configuration (it is never replaced; an unfinished one is restarted)."""
    from saelib import run_files

    differ = run_files.changed_fields(cfg.run_dir, cfg.training_key())
    if not differ or not (cfg.run_dir / run_files.SAE_DIR).is_dir():
        return None
    shown = ", ".join(f"{k} {a!r} → {b!r}" for k, (a, b) in list(differ.items())[:6])
    return (f"run_name: {cfg.run_dir} holds a finished SAE of another configuration ({shown}); give another "
            f"run_name (or study), or delete that folder")


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


def precisions_used(cfgs: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The precisions runs were measured in, from their ``cfg.json``: ``{"lm": [...], "sae": [...]}``, each distinct
    and sorted. The SAE side counts only architectures with an ``sae_precision`` setting (the others always train in
    float32); runs written before these fields existed are skipped. More than one value on a side means the runs
    are not comparable as they stand (a study finished over machines with and without native bf16)."""
    lm = {c["lm_precision_used"] for c in cfgs if "lm_precision_used" in c}
    sae = {c["sae_precision_used"] for c in cfgs if "sae_precision_used" in c
           and c.get("architecture") in ARCHITECTURES and "sae_precision" in arch_fields(c["architecture"])}
    return {"lm": sorted(lm), "sae": sorted(sae)}


__all__ = ["RunConfig", "ConfigError", "build_config", "config_from_notebook", "load_params_file", "save_config",
           "ARCHITECTURES", "OFFLINE_DATASET", "PROFILES", "precisions_used"]
