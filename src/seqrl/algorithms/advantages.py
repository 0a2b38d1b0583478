"""Advantage estimators: one scalar A_i per response, shared by all its tokens.

Notation: a group is the G responses sampled for one prompt; r_i the reward of response i; mean and std are
taken within its group. Groups may have unequal sizes (e.g. after filtering); each needs at least 2 members.

- `grpo`       (DeepSeekMath, arXiv 2402.03300): A_i = (r_i - mean) / (std + eps), std with Bessel's
               correction (as TRL and verl). A constant group gets A = 0 (never NaN, even with eps = 0).
- `dr_grpo`    (Dr. GRPO, arXiv 2503.20783): A_i = r_i - mean (no std division: removes the difficulty bias).
- `rloo`       (RLOO, arXiv 2402.14740): A_i = r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean).
- `batch_norm` (REINFORCE++-style, arXiv 2501.03262): A_i = (r_i - mean_batch) / (std_batch + eps) over the
               whole batch (all data-parallel ranks); ignores groups.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .aggregation import dp_sum
from .config import resolve_config


@dataclass(frozen=True)
class AdvantageSpec:
    fn: Callable[..., torch.Tensor]
    group_relative: bool  # True: needs group ids and groups of >= 2 responses


ADVANTAGES: dict[str, AdvantageSpec] = {}


def register_advantage(name: str, group_relative: bool = True):
    """Decorator: register `fn(rewards (B,), index (B,) in [0, K), n_groups K, eps) -> (B,)` under `name`."""

    def wrap(fn):
        ADVANTAGES[name] = AdvantageSpec(fn, group_relative)
        return fn

    return wrap


def _group_stats(rewards: torch.Tensor, index: torch.Tensor, n_groups: int):
    """Per-response group mean, unbiased std and size, each (B,)."""
    count = rewards.new_zeros(n_groups).index_add_(0, index, torch.ones_like(rewards))  # (K,)
    mean = rewards.new_zeros(n_groups).index_add_(0, index, rewards) / count  # (K,)
    dev2 = (rewards - mean[index]) ** 2  # (B,)
    var = rewards.new_zeros(n_groups).index_add_(0, index, dev2) / (count - 1)  # (K,)
    return mean[index], var.sqrt()[index], count[index]


@register_advantage("grpo")
def grpo_advantage(rewards, index, n_groups, eps):
    """(r_i - mean_g) / (std_g + eps); exactly 0 for a constant group."""
    mean, std, _ = _group_stats(rewards, index, n_groups)
    centred = rewards - mean  # (B,)
    return torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))


@register_advantage("dr_grpo")
def dr_grpo_advantage(rewards, index, n_groups, eps):
    """r_i - mean_g."""
    mean, _, _ = _group_stats(rewards, index, n_groups)
    return rewards - mean


@register_advantage("rloo")
def rloo_advantage(rewards, index, n_groups, eps):
    """r_i - mean of the other G-1 rewards = G/(G-1) (r_i - mean_g)."""
    mean, _, count = _group_stats(rewards, index, n_groups)
    return count / (count - 1) * (rewards - mean)


@register_advantage("batch_norm", group_relative=False)
def batch_norm_advantage(rewards, index, n_groups, eps):
    """(r_i - mean_batch) / (std_batch + eps), statistics over every rank's rewards."""
    stats = dp_sum(torch.stack([rewards.new_tensor(float(rewards.numel())), rewards.sum(), (rewards**2).sum()]))
    n, mean = stats[0], stats[1] / stats[0].clamp(min=1)
    var = ((stats[2] - n * mean**2) / (n - 1).clamp(min=1)).clamp(min=0)
    std = var.sqrt()
    centred = rewards - mean  # (B,)
    return torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))


def _group_index(rewards: torch.Tensor, group_ids, group_size) -> torch.Tensor:
    if group_ids is not None and group_size is not None:
        raise ValueError("pass either group_ids or group_size, not both")
    if group_size is not None:
        if int(group_size) < 1 or rewards.numel() % int(group_size):
            raise ValueError(f"group_size={group_size}: must be >= 1 and divide the batch size {rewards.numel()}")
        return torch.arange(rewards.numel(), device=rewards.device) // int(group_size)
    group_ids = torch.as_tensor(group_ids)
    if group_ids.shape != rewards.shape or group_ids.is_floating_point():
        raise ValueError(f"group_ids: expected an integer tensor of shape {tuple(rewards.shape)}, "
                         f"got {group_ids.dtype} {tuple(group_ids.shape)}")
    return torch.unique(group_ids.to(rewards.device), return_inverse=True)[1]


def group_advantages(name: str, rewards: torch.Tensor, group_ids=None, *, group_size=None,
                     eps: float = 1e-6) -> torch.Tensor:
    """Advantages (B,) from rewards (B,) with the estimator registered as `name` (see module docstring)."""
    if name not in ADVANTAGES:
        raise ValueError(f"advantage={name!r}: unknown estimator; allowed: {', '.join(sorted(ADVANTAGES))}")
    spec = ADVANTAGES[name]
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards: expected shape (B,), got {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError(f"rewards: must be finite, got {rewards.tolist()}")
    values = rewards.detach().double()  # (B,) statistics in float64
    if group_ids is None and group_size is None:
        if spec.group_relative:
            raise ValueError(f"advantage={name!r} is group-relative: pass group_ids or group_size")
        index = torch.zeros(values.numel(), dtype=torch.long, device=values.device)
    else:
        index = _group_index(values, group_ids, group_size)
    n_groups = int(index.max()) + 1 if index.numel() else 0
    if spec.group_relative and index.numel():
        sizes = torch.bincount(index, minlength=n_groups)
        if int(sizes.min()) < 2:
            raise ValueError(f"advantage={name!r} needs >= 2 responses per group; "
                             f"got group sizes {sorted(set(sizes.tolist()))}")
    adv = spec.fn(values, index, n_groups, float(eps))  # (B,)
    return adv.to(device=rewards.device, dtype=rewards.dtype if rewards.is_floating_point() else torch.float32)


def compute_advantages(cfg_or_name, rewards: torch.Tensor, group_ids=None, *, group_size=None, **kw) -> torch.Tensor:
    """Advantages (B,) for rewards (B,), grouped by group_ids (B,) long or by contiguous groups of group_size.

    cfg_or_name: an AlgorithmConfig (or mapping of its fields), an advantage key (grpo | dr_grpo | rloo |
    batch_norm) or an algorithm name; kw override config fields (e.g. adv_eps=0.0). With a bare advantage key
    the only accepted keyword is adv_eps.
    """
    if isinstance(cfg_or_name, str) and cfg_or_name in ADVANTAGES:
        unknown = sorted(set(kw) - {"adv_eps"})
        if unknown:
            raise ValueError(f"compute_advantages({cfg_or_name!r}): unknown keyword {unknown[0]!r}; allowed: adv_eps")
        name, eps = cfg_or_name, kw.get("adv_eps", 1e-6)
    else:
        cfg = resolve_config(cfg_or_name, **kw)
        name, eps = cfg.advantage, cfg.adv_eps
    return group_advantages(name, rewards, group_ids, group_size=group_size, eps=eps)
