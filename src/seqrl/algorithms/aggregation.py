"""Loss aggregation (verl's `agg_loss` names) and the data-parallel reductions that keep it exact.

A policy loss produces a per-token matrix l_it (B, T) with a validity mask m_it. An aggregation turns it into
the scalar whose gradient the optimiser follows (|y_i| = sum_t m_it):

- `token-mean`:              sum_it l_it / sum_i |y_i|
- `seq-mean-token-mean`:     (1/B) sum_i (1/|y_i|) sum_t l_it
- `seq-mean-token-sum`:      (1/B) sum_i sum_t l_it
- `seq-mean-token-sum-norm`: (1/B) sum_i sum_t l_it / C   (Dr. GRPO, arXiv 2503.20783; C a constant)

B counts the sequences with at least one valid token, so rows masked out entirely (e.g. DAPO's overlong
filter) neither contribute nor dilute. A sequence-level loss l_i is represented by broadcasting it over the
tokens of y_i; `seq-mean-token-mean` then gives the plain sequence mean (1/B) sum_i l_i.

Data parallelism: when torch.distributed is initialised, the denominator (token or sequence count) is summed
over ranks and the local loss is returned as local_sum / global_count * world_size. DDP averages gradients
over ranks, so the averaged gradient equals the single-process gradient of the whole batch. Every rank must
call these functions (they are collectives). The value of the whole-batch loss is `dp_mean(local_loss)`.

A batch with no valid token at all (on every rank) has a defined loss of 0 with zero gradient, never NaN, and
`agg_loss` warns once (EMPTY_MASK_WARNING), since it usually means every response was filtered out.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist

AggFn = Callable[[torch.Tensor, torch.Tensor, Optional[float]], Tuple[torch.Tensor, torch.Tensor]]
AGGREGATIONS: dict[str, AggFn] = {}
EMPTY_MASK_WARNING = ("the loss mask has no valid token on any rank (e.g. every response overlong-filtered): "
                      "loss 0, no gradient")


def register_aggregation(name: str) -> Callable[[AggFn], AggFn]:
    """Decorator: register `fn(loss_mat, mask, norm_const) -> (local_sum, local_count)` under `name`."""

    def wrap(fn: AggFn) -> AggFn:
        AGGREGATIONS[name] = fn
        return fn

    return wrap


# ---------------------------------------------------------------- data-parallel helpers
def dp_active() -> bool:
    """True when torch.distributed is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def dp_world_size() -> int:
    return dist.get_world_size() if dp_active() else 1


def _reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    out = t.detach().clone()
    if dp_active():
        dist.all_reduce(out, op=getattr(dist.ReduceOp, op))
    return out


def dp_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of a (detached) tensor over data-parallel ranks; identity in a single process."""
    return _reduce(t, "SUM")


def dp_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise max of a (detached) tensor over data-parallel ranks."""
    return _reduce(t, "MAX")


def dp_mean(local_loss: torch.Tensor) -> torch.Tensor:
    """Whole-batch value of a loss returned by `agg_loss`: sum over ranks / world size."""
    return dp_sum(local_loss) / dp_world_size()


# ---------------------------------------------------------------- the aggregations
def _seq_count(mask: torch.Tensor) -> torch.Tensor:
    return (mask.sum(-1) > 0).sum().to(mask.dtype)  # sequences with >= 1 valid token


@register_aggregation("token-mean")
def token_mean(loss_mat: torch.Tensor, mask: torch.Tensor, norm_const: float) -> tuple:
    """sum_it l_it / sum_i |y_i|: every valid token weighs the same (DAPO)."""
    return (loss_mat * mask).sum(), mask.sum()


@register_aggregation("seq-mean-token-mean")
def seq_mean_token_mean(loss_mat: torch.Tensor, mask: torch.Tensor, norm_const: float) -> tuple:
    """(1/B) sum_i (1/|y_i|) sum_t l_it: every sequence weighs the same (GRPO)."""
    lengths = mask.sum(-1)  # (B,)
    per_seq = (loss_mat * mask).sum(-1) / lengths.clamp(min=1)  # (B,)
    return per_seq.sum(), _seq_count(mask)


@register_aggregation("seq-mean-token-sum")
def seq_mean_token_sum(loss_mat: torch.Tensor, mask: torch.Tensor, norm_const: float) -> tuple:
    """(1/B) sum_i sum_t l_it: a sequence weighs its length (LUSPO's normaliser, see losses.luspo)."""
    return (loss_mat * mask).sum(), _seq_count(mask)


@register_aggregation("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(loss_mat: torch.Tensor, mask: torch.Tensor, norm_const: float) -> tuple:
    """(1/B) sum_i sum_t l_it / C with a constant C (Dr. GRPO: the maximum generation length)."""
    return (loss_mat * mask).sum() / norm_const, _seq_count(mask)


def default_norm_const(mask: torch.Tensor) -> float:
    """C when none is configured: the longest response of the whole (all-rank) batch, at least 1.

    Dr. GRPO uses the generation budget; pass `norm_const=max_new_tokens` to get exactly that. The batch
    maximum is the fallback because it is padding-invariant and identical on every rank.
    """
    longest = mask.sum(-1).max() if mask.numel() else mask.new_zeros(())
    return max(float(dp_max(longest)), 1.0)


def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, agg: str,
              norm_const: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """agg_loss without the empty-mask warning: (local loss to back-propagate, global count of its denominator)."""
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg={agg!r}: unknown aggregation; allowed: {', '.join(sorted(AGGREGATIONS))}")
    if loss_mat.shape != mask.shape:
        raise ValueError(f"loss shape {tuple(loss_mat.shape)} != mask shape {tuple(mask.shape)}")
    if norm_const is not None and not norm_const > 0:
        raise ValueError(f"norm_const={norm_const!r}: must be > 0 or None (the longest response)")
    mask = mask.to(loss_mat.dtype)
    loss_mat = torch.where(mask > 0, loss_mat, torch.zeros_like(loss_mat))  # garbage under padding stays out
    if agg == "seq-mean-token-sum-norm" and norm_const is None:
        norm_const = default_norm_const(mask)
    local_sum, local_count = AGGREGATIONS[agg](loss_mat, mask, norm_const)
    global_count = dp_sum(local_count)
    return local_sum / global_count.clamp(min=1) * dp_world_size(), global_count


def agg_loss(loss_mat: torch.Tensor, mask: torch.Tensor, agg: str, norm_const: float | None = None) -> torch.Tensor:
    """Aggregate a per-token loss (B, T) under `mask` (B, T) with the named aggregation.

    Returns the local loss to back-propagate: local_sum / global_count * world_size (exactly the plain
    aggregation in a single process). With zero valid tokens everywhere the loss is 0 (no NaN) and a
    warning says so.
    """
    loss, global_count = aggregate(loss_mat, mask, agg, norm_const)
    if float(global_count) == 0:
        warnings.warn(f"agg_loss: {EMPTY_MASK_WARNING}", RuntimeWarning, stacklevel=2)
    return loss
