"""AlgorithmConfig: the schema of conf/algorithm/*.yaml, and load_algorithm to read one of those files.

An algorithm is an advantage estimator x a policy loss x an aggregation plus its hyper-parameters, all flat
fields so Hydra overrides read `algorithm.clip_high=0.28`. A YAML file sets only what differs from the defaults
below; under Hydra this dataclass is the schema of the `algorithm` group (seqrl.config.TrainConfig), so every
field exists and can be overridden without a `+`. Outside Hydra, load_algorithm applies the same defaults.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import yaml

from seqrl.cli import conf_dir, group_options

KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclass
class AlgorithmConfig:
    name: str = "grpo"  # grpo | dr_grpo | dapo | rloo | gspo | gspo_token | luspo | fspo (free-form label)
    advantage: str = "grpo"  # advantages.ADVANTAGES key: grpo | dr_grpo | rloo | batch_norm
    policy_loss: str = "token_clip"  # losses.POLICY_LOSSES key: token_clip | rloo_seq | gspo | gspo_token | luspo | fspo
    agg: str = "seq-mean-token-mean"  # aggregation.AGGREGATIONS key
    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.2
    dual_clip_c: Optional[float] = None  # dual clip for A < 0 (> 1), off when null
    kl_coef: float = 0.0  # beta: weight of KL(pi || pi_ref) in the loss
    kl_estimator: str = "k3"  # k1 | k2 | k3
    adv_eps: float = 1e-6  # z-score denominator std + eps
    norm_const: Optional[float] = None  # C of seq-mean-token-sum-norm; null: longest response in the batch
    fspo_mu: Optional[float] = None  # FSPO band drift per token: null = the batch mean log-ratio (detached)
    fspo_c_low: float = 0.03  # FSPO band half-widths per sqrt(token)
    fspo_c_high: float = 0.03
    ppo_epochs: int = 1  # optimisation passes over each rollout batch
    ppo_minibatches: int = 1  # optimizer steps per pass
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, resample
    max_sampling_rounds: int = 1  # dynamic sampling: refill rounds allowed after the first generation round
    overlong_filter: bool = False  # DAPO: truncated responses get no loss (keep=False)
    soft_overlong: bool = False  # DAPO soft overlong punishment (linear ramp over the last L_cache tokens)
    overlong_max_len: Optional[int] = None  # L_max; null: the rollout's max new tokens
    overlong_cache: Optional[int] = None  # L_cache; null: L_max // 5 (DAPO's 4096 of 20480)
    format_weight: float = 0.0  # reward += format_weight * format_ok (LUSPO: 0.5)
    wrong_reward: float = 0.0  # reward of an incorrect answer (DAPO: -1)

    def __post_init__(self):
        from . import advantages, aggregation, losses  # registries; imported here to avoid an import cycle

        _choice(self, "advantage", advantages.ADVANTAGES)
        _choice(self, "policy_loss", losses.POLICY_LOSSES)
        _choice(self, "agg", aggregation.AGGREGATIONS)
        _choice(self, "kl_estimator", KL_ESTIMATORS)
        if not isinstance(self.name, str) or not self.name:
            _fail(self, "name", "must be a non-empty string")
        _number(self, "clip_low", 0, 1, "must be in [0, 1)", hi_open=True)
        _number(self, "clip_high", 0, math.inf, "must be >= 0")
        _number(self, "kl_coef", 0, math.inf, "must be >= 0")
        _number(self, "adv_eps", 0, math.inf, "must be >= 0")
        _number(self, "fspo_c_low", 0, math.inf, "must be > 0", lo_open=True)
        _number(self, "fspo_c_high", 0, math.inf, "must be > 0", lo_open=True)
        _number(self, "format_weight", -math.inf, math.inf, "must be a finite number")
        _number(self, "wrong_reward", -math.inf, math.inf, "must be a finite number")
        if self.dual_clip_c is not None:
            _number(self, "dual_clip_c", 1, math.inf, "must be > 1 or null", lo_open=True)
        if self.norm_const is not None:
            _number(self, "norm_const", 0, math.inf, "must be > 0 or null", lo_open=True)
        if self.fspo_mu is not None:
            _number(self, "fspo_mu", -math.inf, math.inf, "must be null (batch drift) or a finite float")
        for key in ("ppo_epochs", "ppo_minibatches", "max_sampling_rounds"):
            _integer(self, key, "must be an integer >= 1")
        for key in ("overlong_max_len", "overlong_cache"):
            if getattr(self, key) is not None:
                _integer(self, key, "must be an integer >= 1 or null")
        if self.overlong_max_len is not None and self.overlong_cache is not None \
                and self.overlong_cache >= self.overlong_max_len:
            _fail(self, "overlong_cache", f"must be < overlong_max_len={self.overlong_max_len}")
        for key in ("dynamic_sampling", "overlong_filter", "soft_overlong"):
            if not isinstance(getattr(self, key), bool):
                _fail(self, key, "must be true or false")

    @property
    def group_relative(self) -> bool:
        """True when the advantage compares responses within a group (needs G >= 2)."""
        from .advantages import ADVANTAGES

        return ADVANTAGES[self.advantage].group_relative


def _fail(cfg, key, why):
    raise ValueError(f"algorithm.{key}={getattr(cfg, key)!r}: {why}")


def _choice(cfg, key, allowed):
    if getattr(cfg, key) not in allowed:
        _fail(cfg, key, f"must be one of {', '.join(sorted(allowed))}")


def _number(cfg, key, lo, hi, why, lo_open=False, hi_open=False):
    v = getattr(cfg, key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        _fail(cfg, key, why)
    if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
        _fail(cfg, key, why)
    setattr(cfg, key, float(v))


def _integer(cfg, key, why):
    v = getattr(cfg, key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        _fail(cfg, key, why)


def available_algorithms() -> list[str]:
    """Names of the algorithm files in <conf>/algorithm."""
    return group_options("algorithm")


def _read_yaml(name: str) -> dict:
    """One algorithm file merged over its `defaults` list (Hydra order; `_self_` last unless placed)."""
    own = yaml.safe_load((conf_dir() / "algorithm" / f"{name}.yaml").read_text()) or {}
    entries = list(own.pop("defaults", []))
    merged: dict = {}
    for entry in entries if "_self_" in entries else entries + ["_self_"]:
        if not isinstance(entry, str):
            raise ValueError(f"conf/algorithm/{name}.yaml: defaults entry {entry!r}: only plain names are supported")
        merged.update(own if entry == "_self_" else _read_yaml(entry))
    return merged


def build_config(fields: Mapping) -> AlgorithmConfig:
    """AlgorithmConfig from a mapping, with one clear line for unknown keys."""
    known = {f.name for f in dataclasses.fields(AlgorithmConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"algorithm.{unknown[0]}: unknown field; allowed: {', '.join(sorted(known))}")
    return AlgorithmConfig(**fields)


def load_algorithm(name: str, **overrides) -> AlgorithmConfig:
    """Read conf/algorithm/{name}.yaml over the dataclass defaults and apply field overrides."""
    allowed = available_algorithms()
    if name not in allowed:
        raise ValueError(f"algorithm={name!r}: unknown; allowed: {', '.join(allowed)} (in {conf_dir() / 'algorithm'})")
    return build_config(_read_yaml(name) | overrides)


def resolve_config(cfg_or_name, **overrides) -> AlgorithmConfig:
    """An AlgorithmConfig from a config, a mapping of its fields (dict, OmegaConf DictConfig) or a name."""
    if isinstance(cfg_or_name, AlgorithmConfig):
        return build_config(dataclasses.asdict(cfg_or_name) | overrides) if overrides else cfg_or_name
    if isinstance(cfg_or_name, str):
        return load_algorithm(cfg_or_name, **overrides)
    if isinstance(cfg_or_name, Mapping):
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg_or_name, DictConfig):
                cfg_or_name = OmegaConf.to_container(cfg_or_name, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf is a dependency
            pass
        return build_config({k: v for k, v in cfg_or_name.items() if k != "defaults"} | overrides)
    raise ValueError(f"algorithm config: expected AlgorithmConfig, mapping or name, got {type(cfg_or_name).__name__}")
