"""Reward shaping and batch filtering around the verifier's verdicts.

- Accuracy: 1 for a correct answer, `wrong_reward` otherwise (0; DAPO, arXiv 2503.14476, uses -1).
- Format (LUSPO): + format_weight * format_ok, i.e. format in {0, 0.5} with the paper's weight 0.5.
- DAPO soft overlong punishment (arXiv 2503.14476, eq. 13), with L_max the length budget and L_cache the
  punishment interval:  0 if |y| <= L_max - L_cache;  ((L_max - L_cache) - |y|) / L_cache if
  L_max - L_cache < |y| <= L_max;  -1 beyond. Paper: L_max - L_cache = 16384, L_cache = 4096. Our default
  L_max is the rollout's budget and L_cache = L_max // 5 (the paper's ratio), both configurable.
  LUSPO's "linear overlong penalty past a buffer length" is reconstructed as this same ramp (its exact
  constants are not verified).
- DAPO overlong filtering: truncated responses (no EOS within the budget) get keep = False, so the trainer
  masks them out of the loss.
- DAPO dynamic sampling: `dynamic_sampling_keep` marks groups whose rewards are all equal (zero advantage,
  no gradient) for dropping; the rollout resamples up to `max_sampling_rounds` times to refill the batch.
"""
from __future__ import annotations

import numbers

import torch

from .config import resolve_config


def soft_overlong_penalty(lengths: torch.Tensor, max_len: int, cache: int) -> torch.Tensor:
    """DAPO's piecewise-linear length penalty in [-1, 0] for response lengths (B,) -> (B,)."""
    if not 0 < cache < max_len:
        raise ValueError(f"overlong_cache={cache}: must be in [1, L_max={max_len})")
    start = max_len - cache  # L_max - L_cache
    ramp = (start - lengths.float()) / cache  # (B,)
    return torch.where(lengths <= start, torch.zeros_like(ramp), ramp.clamp(min=-1.0))


def overlong_limits(cfg, max_len: int) -> tuple[int, int]:
    """(L_max, L_cache) from the config, falling back to the rollout budget `max_len` and L_max // 5."""
    l_max = cfg.overlong_max_len if cfg.overlong_max_len is not None else int(max_len)
    cache = cfg.overlong_cache if cfg.overlong_cache is not None else max(l_max // 5, 1)
    return l_max, cache


def shape_rewards(cfg, correct, lengths, max_len: int, truncated, format_ok=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalar rewards (B,) float and the loss keep-mask (B,) bool.

    cfg: AlgorithmConfig, mapping or algorithm name. correct: (B,) bool (or accuracy in [0, 1]); lengths:
    (B,) response lengths in tokens; max_len: the rollout's max new tokens; truncated: (B,) bool, True when
    the response hit the budget without EOS; format_ok: (B,) bool or None (treated as all False).
    """
    cfg = resolve_config(cfg)
    if isinstance(max_len, bool) or not isinstance(max_len, numbers.Integral) or max_len < 1:
        raise ValueError(f"max_len={max_len!r}: must be an integer >= 1 (the rollout's max new tokens)")
    acc = torch.as_tensor(correct).float()  # (B,)
    lengths, truncated = torch.as_tensor(lengths, device=acc.device), torch.as_tensor(truncated, device=acc.device)
    if lengths.shape != acc.shape or truncated.shape != acc.shape:
        raise ValueError(f"correct, lengths, truncated: expected equal shapes (B,), got {tuple(acc.shape)}, "
                         f"{tuple(lengths.shape)}, {tuple(truncated.shape)}")
    rewards = acc + (1.0 - acc) * cfg.wrong_reward  # (B,)
    if format_ok is not None:
        rewards = rewards + cfg.format_weight * torch.as_tensor(format_ok, device=acc.device).float()
    if cfg.soft_overlong:
        rewards = rewards + soft_overlong_penalty(lengths, *overlong_limits(cfg, max_len))
    keep = ~truncated.bool() if cfg.overlong_filter else torch.ones_like(truncated, dtype=torch.bool)
    return rewards, keep


def dynamic_sampling_keep(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """(B,) bool: False for every response of a group whose rewards are all equal (DAPO dynamic sampling)."""
    rewards, group_ids = torch.as_tensor(rewards).float(), torch.as_tensor(group_ids)
    if group_ids.shape != rewards.shape:
        raise ValueError(f"group_ids shape {tuple(group_ids.shape)} != rewards shape {tuple(rewards.shape)}")
    index = torch.unique(group_ids, return_inverse=True)[1]  # (B,) in [0, K)
    n_groups = int(index.max()) + 1 if index.numel() else 0
    lo = rewards.new_full((n_groups,), float("inf")).scatter_reduce(0, index, rewards, "amin")  # (K,)
    hi = rewards.new_full((n_groups,), float("-inf")).scatter_reduce(0, index, rewards, "amax")  # (K,)
    return (hi > lo)[index]
