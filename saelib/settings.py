"""The SAE settings, each declared, defaulted and validated once: one small dataclass per group of settings, which
both the registered sae_lens training config classes (``saelib.saes``, ``saelib.sparse_step``) and the flat
``RunConfig`` inherit. ``ARCH_SETTINGS`` says which groups an architecture takes; what an architecture does not
take must stay at its default (a TopK run is the same run whatever τ says).

Adding an architecture: its training config class inherits its settings group (declared here) and is registered
with sae_lens; ``ARCH_SETTINGS`` gets its line and ``RunConfig`` the group among its bases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any


class ConfigError(ValueError):
    """A run configuration value is invalid; the message names the field."""


def check(ok: bool, name: str, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: expected {expected}")


class Settings:
    """A group of settings: ``check_settings`` validates this group and, through ``super()``, every other group of
    the class it is mixed into; ``sae_kwargs`` is what the group hands to the sae_lens training config."""

    def check_settings(self) -> None:
        pass

    @classmethod
    def own_fields(cls) -> list[str]:
        base = {f.name for b in cls.__mro__[1:] if hasattr(b, "__dataclass_fields__") for f in fields(b)}
        return [f.name for f in fields(cls) if f.name not in base]

    @classmethod
    def sae_kwargs(cls, cfg: Any) -> dict[str, Any]:
        return {name: getattr(cfg, name) for name in cls.own_fields()}


@dataclass
class PrecisionSettings(Settings):
    sae_precision: str = "auto"
    """Encoder matmul of the sparse TopK step (TopK family): ``auto`` (bf16 where native on the device and its matmul
    measured faster than fp32's, else fp32), ``float32`` or ``bfloat16`` (an error where not native). Weights and
    Adam state stay fp32."""

    def check_settings(self) -> None:
        super().check_settings()
        from saelib.sparse_step import PRECISIONS, device_here, resolve_precision

        if not device_here(self.device):
            check(self.sae_precision in PRECISIONS, "sae_precision",
                  f"one of {list(PRECISIONS)}, got {self.sae_precision!r}")
            return
        try:
            resolve_precision(self.sae_precision, self.device, "sae_precision")
        except ValueError as err:
            raise ConfigError(str(err)) from None


@dataclass
class L1Settings(Settings):
    l1_coefficient: float = 0.0
    """L1 weight of the ``standard`` ReLU SAE (must be > 0 there)."""

    def check_settings(self) -> None:
        super().check_settings()
        check(math.isfinite(self.l1_coefficient) and self.l1_coefficient >= 0, "l1_coefficient",
              f"a finite number >= 0, got {self.l1_coefficient}")


#: Matryoshka's nested prefix widths as fractions of d_sae (``matryoshka_widths``). ``quarters``: d/16, d/4, d.
#: ``saebench``: the group fractions SAEBench's Matryoshka BatchTopK SAEs were trained with (dictionary_learning's
#: demo config: groups of 1/32, 1/16, 1/8, 1/4 and 17/32 of d), i.e. prefixes d/32, 3d/32, 7d/32, 15d/32, d.
MATRYOSHKA_WIDTHS = {"quarters": (1 / 16, 1 / 4, 1.0), "saebench": (1 / 32, 3 / 32, 7 / 32, 15 / 32, 1.0)}


def matryoshka_widths(d_sae: int, scheme: str = "quarters") -> list[int]:
    """The nested prefix widths of ``scheme`` (a key of ``MATRYOSHKA_WIDTHS``) at ``d_sae`` latents, ascending, the
    last one ``d_sae``: ``quarters`` gives d/16, d/4, d."""
    return sorted({max(1, int(d_sae * f)) for f in MATRYOSHKA_WIDTHS[scheme]} | {d_sae})


@dataclass
class MatryoshkaSettings(Settings):
    matryoshka_widths: str = "quarters"
    """Nested prefixes of ``matryoshka_batchtopk``, a key of ``MATRYOSHKA_WIDTHS``: ``quarters`` (d/16, d/4, d) or
    ``saebench`` (d/32, 3d/32, 7d/32, 15d/32, d, as SAEBench's Matryoshka SAEs). sae_lens gets the widths."""

    def check_settings(self) -> None:
        super().check_settings()
        check(self.matryoshka_widths in MATRYOSHKA_WIDTHS, "matryoshka_widths",
              f"one of {list(MATRYOSHKA_WIDTHS)}, got {self.matryoshka_widths!r}")

    @classmethod
    def sae_kwargs(cls, cfg: Any) -> dict[str, Any]:
        return {"matryoshka_widths": matryoshka_widths(cfg.d_sae, cfg.matryoshka_widths)}


@dataclass
class OrthSettings(Settings):
    orth_pen: float = 0.0
    """λ ≥ 0, weight of the orthogonality penalty (``sgo_topk``, ``ortsae_topk``, ``gram_topk``); 0 reproduces TopK
    exactly."""

    def check_settings(self) -> None:
        super().check_settings()
        check(math.isfinite(self.orth_pen) and self.orth_pen >= 0, "orth_pen",
              f"a finite number >= 0, got {self.orth_pen}")


#: How the SGO penalty may average over competing pairs (``competition_normalisation``).
COMPETITION_NORMALISATIONS = ["pairs", "latents"]


@dataclass
class SGOSettings(Settings):
    """Sparsity-guided orthogonality (``sgo_topk``): pairs whose competition score exceeds τ are penalised."""

    competition_threshold: float = 0.05
    """τ ∈ [0, 1]: pairs whose competition score exceeds it are penalised."""
    competition_warmup_steps: int = 20
    """Steps of co-activation statistics before the penalty starts (scores are noise before that)."""
    competition_decay: float = 0.99
    """EMA factor per batch of the co-activation statistics (0.99 ≈ a 100-batch window)."""
    competition_max_pairs: int = 1_000_000
    """Cap of the co-firing table (least-supported pairs dropped first), ≈ 12 bytes a pair."""
    competition_sample_pairs: int = 16_384
    """Competing pairs drawn per step (∝ score) to estimate the penalty; 0 = every pair."""
    competition_window: int = 10
    """Batches pooled before the co-activation statistics and the competing set are refreshed."""
    competition_stat_tokens: int = 1024
    """Tokens of each batch (evenly spaced) whose TopK masks feed the statistics; 0 = every token. 1,024 cuts the
    statistics' cost at batch 4,096 from 40 to 15 ms a step (16k latents) without changing the penalty's gradient
    beyond its own sampling noise (``benchmarks/ablate_competition_sampling.py``)."""
    competition_normalisation: str = "pairs"
    """How the penalty averages cos² over competing pairs: ``pairs``, the score-weighted mean over pairs (a latent
    with many competitors weighs in many times); ``latents``, the mean over latents of each latent's score-weighted
    mean cos² to its competitors (every competing latent weighs the same, like OrtSAE's per-latent mean)."""

    def check_settings(self) -> None:
        super().check_settings()
        check(0.0 <= self.competition_threshold <= 1.0, "competition_threshold",
              f"a number in [0, 1], got {self.competition_threshold}")
        check(0.0 <= self.competition_decay < 1.0, "competition_decay",
              f"a number in [0, 1), got {self.competition_decay}")
        check(self.competition_warmup_steps >= 0, "competition_warmup_steps",
              f"an integer >= 0, got {self.competition_warmup_steps}")
        check(self.competition_max_pairs > 0, "competition_max_pairs",
              f"a positive integer, got {self.competition_max_pairs}")
        check(self.competition_sample_pairs >= 0, "competition_sample_pairs",
              f"an integer >= 0, got {self.competition_sample_pairs}")
        check(self.competition_window > 0, "competition_window", f"a positive integer, got {self.competition_window}")
        check(self.competition_stat_tokens >= 0, "competition_stat_tokens",
              f"an integer >= 0 (0 = every token), got {self.competition_stat_tokens}")
        check(self.competition_normalisation in COMPETITION_NORMALISATIONS, "competition_normalisation",
              f"one of {COMPETITION_NORMALISATIONS}, got {self.competition_normalisation!r}")


@dataclass
class OrtSAESettings(Settings):
    orth_chunk_size: int = 1024
    """Latents per random chunk of the OrtSAE-style penalty (``ortsae_topk``); cost per step ∝ d_sae · chunk · d_in."""

    def check_settings(self) -> None:
        super().check_settings()
        check(self.orth_chunk_size >= 2, "orth_chunk_size", f"an integer >= 2, got {self.orth_chunk_size}")


#: Architectures (sae_lens's and saelib's registered ones) → the settings groups each takes, besides d_sae and k.
ARCH_SETTINGS: dict[str, tuple[type[Settings], ...]] = {
    "topk": (PrecisionSettings,),
    "batchtopk": (PrecisionSettings,),
    "matryoshka_batchtopk": (PrecisionSettings, MatryoshkaSettings),
    "standard": (L1Settings,),
    "sgo_topk": (PrecisionSettings, OrthSettings, SGOSettings),
    "ortsae_topk": (PrecisionSettings, OrthSettings, OrtSAESettings),
    "gram_topk": (PrecisionSettings, OrthSettings),
}
ARCHITECTURES = tuple(ARCH_SETTINGS)
ORTHOGONAL = tuple(a for a, groups in ARCH_SETTINGS.items() if OrthSettings in groups)
SETTINGS_GROUPS = tuple(dict.fromkeys(g for groups in ARCH_SETTINGS.values() for g in groups))


def arch_fields(architecture: str) -> set[str]:
    """The settings fields ``architecture`` takes."""
    return {name for group in ARCH_SETTINGS[architecture] for name in group.own_fields()}


def taken_by(name: str) -> tuple[str, ...]:
    """The architectures that take settings field ``name`` (every architecture for a field of no group)."""
    groups = [g for g in SETTINGS_GROUPS if name in g.own_fields()]
    return tuple(a for a, gs in ARCH_SETTINGS.items() if not groups or set(groups) & set(gs))


def sae_kwargs(cfg: Any) -> dict[str, Any]:
    """What ``cfg`` (a RunConfig) hands to its architecture's sae_lens training config: each group's fields."""
    return {k: v for group in ARCH_SETTINGS[cfg.architecture] for k, v in group.sae_kwargs(cfg).items()}
