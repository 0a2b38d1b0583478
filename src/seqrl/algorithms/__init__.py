"""The algorithm core: advantages, policy losses, aggregations, reward shaping and their configs.

Trainer-independent; the RLModule calls only the names exported here. Formulas: DESIGN.md section 2 and the
docstrings of each registered function.
"""
from .advantages import ADVANTAGES, compute_advantages, register_advantage
from .aggregation import AGGREGATIONS, agg_loss, register_aggregation
from .config import AlgorithmConfig, available_algorithms, load_algorithm, resolve_config
from .losses import POLICY_LOSSES, compute_policy_loss, kl_penalty, register_policy_loss
from .rewards import dynamic_sampling_keep, shape_rewards, soft_overlong_penalty
from . import eqlen as _eqlen  # noqa: E402,F401,I001 - registers the "eqlen" rollout

__all__ = [
    "ADVANTAGES", "AGGREGATIONS", "POLICY_LOSSES", "AlgorithmConfig", "agg_loss", "available_algorithms",
    "compute_advantages", "compute_policy_loss", "dynamic_sampling_keep", "kl_penalty", "load_algorithm",
    "register_advantage", "register_aggregation", "register_policy_loss", "resolve_config", "shape_rewards",
    "soft_overlong_penalty",
]
