"""Policy-gradient losses: one small registered function per variant, math in its docstring.

Notation: log r_it = log pi(y_it) - log pi_old(y_it) (zero under padding), |y_i| the valid length of
response i, A_i its advantage, S_i = sum_t log r_it the sequence log-ratio. Every loss returns a per-token
matrix l_it (B, T); the configured aggregation (see aggregation.py) turns it into the scalar loss. A
sequence-level loss l_i is broadcast over the tokens of y_i, so `seq-mean-token-mean` gives (1/B) sum_i l_i.

All ratio losses share PPO's pessimistic bound l = max(-A r, -A clip(r)) (arXiv 1707.06347), with optional
dual clip for A < 0: l = min(l, -A c) (arXiv 1912.09729, `dual_clip_c`). A token (or whole sequence) is
"clipped" when the clipped term wins, i.e. its gradient is blocked. Stability guard, a deviation from all
papers: log-ratios are capped at +-20 before exponentiation (as verl does); it never binds on-policy.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from .aggregation import EMPTY_MASK_WARNING, aggregate, default_norm_const, dp_max, dp_sum, dp_world_size
from .config import AlgorithmConfig, resolve_config

MAX_LOG_RATIO = 20.0


@dataclass
class LossOut:
    loss: torch.Tensor  # (B, T) per-token loss l_it
    clipped: torch.Tensor  # (B, T) bool: gradient blocked by a clip
    ratio: torch.Tensor  # (B, T) the importance ratio the loss uses (detached), for metrics
    seq_stats: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B,), logged as sequence means


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AlgorithmConfig], LossOut]
POLICY_LOSSES: dict[str, LossFn] = {}
ADVANTAGE_SCALED: set[str] = set()  # losses that vanish, with their gradient, where A_i = 0 (see below)


def register_policy_loss(name: str, advantage_scaled: bool = False) -> Callable[[LossFn], LossFn]:
    """Decorator: register `fn(log_ratio (B,T), adv (B,), mask (B,T) float, cfg) -> LossOut` under `name`.

    advantage_scaled: every row's loss is -A_i times a function of that row's own log-ratios and of detached batch
    statistics, so a row with A_i = 0 has loss 0 and zero gradient (an update may leave it unscored)."""

    def wrap(fn: LossFn) -> LossFn:
        POLICY_LOSSES[name] = fn
        if advantage_scaled:
            ADVANTAGE_SCALED.add(name)
        return fn

    return wrap


def _exp(log_ratio: torch.Tensor) -> torch.Tensor:
    return torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))


def _pessimistic(ratio, clipped_ratio, adv, dual_clip_c):
    """max(-A r, -A r_clip), then min(., -A c) where A < 0 if dual clip is on; returns (loss, blocked)."""
    unclipped, clipped = -adv * ratio, -adv * clipped_ratio
    blocked = clipped > unclipped
    loss = torch.where(blocked, clipped, unclipped)
    if dual_clip_c is not None:
        cap = -adv * dual_clip_c
        dual = (adv < 0) & (loss > cap)
        loss, blocked = torch.where(dual, cap, loss), blocked | dual
    return loss, blocked


def _per_sequence(loss_i, blocked_i, ratio_i, mask, **seq_stats) -> LossOut:
    """Broadcast sequence-level (B,) loss/clip/ratio over each sequence's tokens (B, T)."""
    shape = mask.shape
    return LossOut(loss_i[:, None].expand(shape), blocked_i[:, None].expand(shape),
                   ratio_i.detach()[:, None].expand(shape), seq_stats)


@register_policy_loss("token_clip", advantage_scaled=True)
def token_clip(log_ratio, adv, mask, cfg) -> LossOut:
    """Token-level PPO clip (GRPO arXiv 2402.03300, Dr. GRPO 2503.20783, DAPO 2503.14476).

    r_it = pi(y_it)/pi_old(y_it);  l_it = max(-A_i r_it, -A_i clip(r_it, 1 - clip_low, 1 + clip_high)).
    DAPO's clip-higher is clip_high > clip_low. On-policy the gradient is -A_i grad log pi(y_it) per token.
    """
    ratio = _exp(log_ratio)  # (B, T)
    loss, blocked = _pessimistic(ratio, ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high), adv[:, None],
                                 cfg.dual_clip_c)
    return LossOut(loss, blocked, ratio.detach())


@register_policy_loss("rloo_seq", advantage_scaled=True)
def rloo_seq(log_ratio, adv, mask, cfg) -> LossOut:
    """RLOO (arXiv 2402.14740) with a whole-sequence ratio, clipped as in TRL's RLOO trainer.

    R_i = exp(S_i);  l_i = max(-A_i R_i, -A_i clip(R_i, 1 - clip_low, 1 + clip_high)).
    On-policy (R_i = 1) the gradient is the paper's REINFORCE form -A_i sum_t grad log pi(y_it).
    """
    ratio = _exp(log_ratio.sum(-1))  # (B,)
    loss, blocked = _pessimistic(ratio, ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high), adv, cfg.dual_clip_c)
    return _per_sequence(loss, blocked, ratio, mask)


def _geometric_log_ratio(log_ratio, mask):
    return log_ratio.sum(-1) / mask.sum(-1).clamp(min=1)  # (B,) log s_i = S_i / |y_i|


@register_policy_loss("gspo", advantage_scaled=True)
def gspo(log_ratio, adv, mask, cfg) -> LossOut:
    """GSPO (arXiv 2507.18071): the geometric-mean sequence ratio, clipped per sequence.

    s_i = exp(S_i / |y_i|);  l_i = max(-A_i s_i, -A_i clip(s_i, 1 - clip_low, 1 + clip_high)); paper: clip
    3e-4 / 4e-4, no KL. Every token of y_i gets gradient weight s_i A_i / |y_i| when unclipped: the
    1/|y_i| is the length bias LUSPO removes.
    """
    ratio = _exp(_geometric_log_ratio(log_ratio, mask))  # (B,)
    loss, blocked = _pessimistic(ratio, ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high), adv, cfg.dual_clip_c)
    return _per_sequence(loss, blocked, ratio, mask)


@register_policy_loss("gspo_token", advantage_scaled=True)
def gspo_token(log_ratio, adv, mask, cfg) -> LossOut:
    """GSPO-token (arXiv 2507.18071): s_it = sg[s_i] pi(y_it) / sg[pi(y_it)], clipped per token.

    Numerically s_it = s_i, and d s_it / d log pi(y_it) = s_i, so with a per-sequence A_i and
    `seq-mean-token-mean` it has GSPO's value and gradient; it also admits per-token advantages.
    """
    log_s = _geometric_log_ratio(log_ratio, mask).detach()[:, None]  # (B, 1)
    ratio = _exp(log_s + log_ratio - log_ratio.detach())  # (B, T)
    loss, blocked = _pessimistic(ratio, ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high), adv[:, None],
                                 cfg.dual_clip_c)
    return LossOut(loss, blocked, ratio.detach())


@register_policy_loss("luspo", advantage_scaled=True)
def luspo(log_ratio, adv, mask, cfg) -> LossOut:
    """LUSPO (arXiv 2602.05261): GSPO's clipped per-sequence loss scaled by |y_i| (length-unbiased).

    Per token this is gspo_token's l_it; with `seq-mean-token-sum` the loss is (1/B) sum_i |y_i| l_i, whose
    gradient is exactly |y_i| times GSPO's, sequence by sequence. Reconstruction: the paper's batch
    normaliser is not verified; (1/B) sum_i sum_t l_it is TRL's choice (>= 0.28, PR 6654) and ours.
    Paper clip 2e-3 / 2.5e-3.
    """
    return gspo_token(log_ratio, adv, mask, cfg)


@register_policy_loss("fspo", advantage_scaled=True)
def fspo(log_ratio, adv, mask, cfg) -> LossOut:
    """FSPO (arXiv 2509.09177, "Clip Your Sequences Fairly"): clip S_i in a length-fair band, in log space.

    band_i = [mu |y_i| - c_low sqrt|y_i|, mu |y_i| + c_high sqrt|y_i|];
    l_i = -min(e^{S_i} A_i, e^{clip(S_i, band_i)} A_i).
    Verified: log-space clipping of the sequence log-ratio, a sqrt(L) band, a KL-corrected drift term, flatter
    clip rates across lengths. RECONSTRUCTED (not verified): mu = the batch's mean per-token log-ratio
    (detached, over all ranks; `fspo_mu: null`, or a fixed float such as 0) and c_low = c_high = 0.03.
    If per-token log-ratios behave like a random walk, S_i spreads as sqrt(|y_i|), so the clip rate is
    length-independent, whereas GSPO's fixed band on S_i/|y_i| clips short responses far more often.
    """
    lengths = mask.sum(-1)  # (B,)
    seq_log = log_ratio.sum(-1)  # (B,)
    if cfg.fspo_mu is None:
        totals = dp_sum(torch.stack([seq_log.detach().sum(), lengths.sum()]))
        mu = totals[0] / totals[1].clamp(min=1)
    else:
        mu = seq_log.new_tensor(float(cfg.fspo_mu))
    half = lengths.sqrt()
    low, high = mu * lengths - cfg.fspo_c_low * half, mu * lengths + cfg.fspo_c_high * half  # (B,)
    ratio = _exp(seq_log)
    clipped_ratio = _exp(torch.minimum(torch.maximum(seq_log, low), high))
    loss, blocked = _pessimistic(ratio, clipped_ratio, adv, cfg.dual_clip_c)
    return _per_sequence(loss, blocked, ratio, mask, **{"fspo/band_low": low, "fspo/band_high": high,
                                                        "fspo/mu": mu.expand_as(low)})


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate (Schulman's k1/k2/k3), with d = log pi - log pi_ref:

    k1 = d;  k2 = d^2 / 2;  k3 = e^{-d} + d - 1 (unbiased, non-negative; GRPO's choice). (B, T)
    """
    d = logp - ref_logp
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        return torch.exp((-d).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)) + d - 1
    raise ValueError(f"kl_estimator={estimator!r}: allowed: k1, k2, k3")


def _length_quartile(lengths: torch.Tensor) -> torch.Tensor:
    """Quartile (0..3) of each response by length within this rank's batch; -1 for empty rows. (B,)"""
    valid = lengths > 0
    n = int(valid.sum())
    key = torch.where(valid, lengths, torch.full_like(lengths, float("inf")))
    rank = torch.empty_like(lengths, dtype=torch.long)
    rank[torch.argsort(key, stable=True)] = torch.arange(lengths.numel(), device=lengths.device)
    return torch.where(valid, (4 * rank) // max(n, 1), torch.full_like(rank, -1))


def _metrics(out: LossOut, log_ratio, adv, mask, pg_local, kl_local) -> tuple[dict[str, float], float]:
    """Metrics as whole-batch means over all ranks' tokens (or sequences), and the all-rank token count."""
    valid = mask > 0
    has_tokens = (mask.sum(-1) > 0).to(mask.dtype)  # (B,)
    clipped = (out.clipped & valid).to(mask.dtype)  # (B, T)
    grad = (~out.clipped & valid & (adv != 0)[:, None]).to(mask.dtype)  # (B, T)
    sums = {"clipped": clipped.sum(), "tokens": mask.sum(), "ratio": (out.ratio * mask).sum(),
            "ppo_kl": (-log_ratio.detach() * mask).sum(), "grad": grad.sum(), "seqs": has_tokens.sum(),
            "pg_loss": pg_local.detach() / dp_world_size()}
    if kl_local is not None:
        sums["kl_loss"] = kl_local.detach() / dp_world_size()
    quartile = _length_quartile(mask.sum(-1))  # (B,)
    for q in range(4):
        in_q = (quartile == q).to(mask.dtype)[:, None]  # (B, 1)
        sums[f"clipped_q{q}"], sums[f"tokens_q{q}"] = (clipped * in_q).sum(), (mask * in_q).sum()
    for key, per_seq in out.seq_stats.items():
        sums[key] = (per_seq.detach() * has_tokens).sum()
    s = dict(zip(sums, dp_sum(torch.stack([v.to(mask.dtype) for v in sums.values()])).tolist()))
    floor = mask.new_full((1,), -torch.finfo(mask.dtype).max)  # the max of no valid token (also for B = 0)
    hi, neg_lo = dp_max(torch.stack([torch.cat([torch.where(valid, r, floor).flatten(), floor]).max()
                                     for r in (out.ratio, -out.ratio)])).tolist()
    tokens, seqs = max(s["tokens"], 1.0), max(s["seqs"], 1.0)
    metrics = {"train/pg_loss": s["pg_loss"], "train/pg_clipfrac": s["clipped"] / tokens,
               "train/ratio/mean": s["ratio"] / tokens if s["tokens"] else 1.0,
               "train/ratio/min": -neg_lo if s["tokens"] else 1.0, "train/ratio/max": hi if s["tokens"] else 1.0,
               "train/ppo_kl": s["ppo_kl"] / tokens, "train/grad_token_frac": s["grad"] / tokens}
    if kl_local is not None:
        metrics["train/kl_loss"] = s["kl_loss"]
    for q in range(4):
        if s[f"tokens_q{q}"]:
            metrics[f"train/pg_clipfrac/len_q{q + 1}"] = s[f"clipped_q{q}"] / s[f"tokens_q{q}"]
    metrics.update({f"train/{key}": s[key] / seqs for key in out.seq_stats})
    return metrics, s["tokens"]


def compute_policy_loss(cfg_or_name, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, ref_logp: torch.Tensor | None = None,
                        **overrides) -> tuple[torch.Tensor, dict[str, float]]:
    """Scalar policy loss (+ kl_coef * KL when ref_logp is given and kl_coef > 0) and its metrics.

    cfg_or_name: an AlgorithmConfig, a mapping of its fields (e.g. Hydra's cfg.algorithm) or an algorithm
    name; overrides replace config fields (e.g. norm_const=max_new_tokens). logp, old_logp, ref_logp, mask:
    (B, T), right padded; advantages: (B,). old_logp/ref_logp are treated as constants; values under
    mask = 0 never matter. Under torch.distributed this is a collective (see aggregation.py): the returned
    loss is rank-local and DDP's gradient average equals the whole-batch gradient.

    Metrics are floats over the whole batch (all ranks): train/pg_loss and train/kl_loss (value of the KL
    term before kl_coef, reported whenever ref_logp is given) are the global aggregated losses;
    train/pg_clipfrac is the share of valid tokens whose gradient a clip blocked (for sequence-level losses
    each token inherits its sequence's state); train/pg_clipfrac/len_q1..q4 the same within each quartile
    of response length (quartiles ranked on each rank's own batch; empty quartiles are left out);
    train/ratio/mean|min|max the ratio the loss uses (per token, or the sequence ratio on each token);
    train/ppo_kl the mean of log pi_old - log pi over tokens; train/grad_token_frac the share of valid
    tokens with non-zero gradient weight (not clipped and A != 0); fspo adds train/fspo/band_low|band_high|mu
    (means over sequences, log space).

    Bad input is one ValueError line: shapes that disagree with logp (B, T), NaN/inf advantages, NaN/inf
    log-probs where mask = 1. A mask with no valid token on any rank gives loss 0 with zero gradient (never
    NaN) and a RuntimeWarning.
    """
    cfg = resolve_config(cfg_or_name, **overrides)
    if logp.dim() != 2:
        raise ValueError(f"logp: expected shape (B, T), got {tuple(logp.shape)}")
    named = {"old_logp": old_logp, "mask": mask} | ({"ref_logp": ref_logp} if ref_logp is not None else {})
    for key, t in named.items():
        if t.shape != logp.shape:
            raise ValueError(f"{key}: shape {tuple(t.shape)} != logp shape {tuple(logp.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages: expected shape ({logp.shape[0]},), got {tuple(advantages.shape)}")
    if cfg.kl_coef > 0 and ref_logp is None:
        raise ValueError(f"algorithm.kl_coef={cfg.kl_coef}: needs ref_logp; pass it or set kl_coef=0")
    valid = mask.bool()
    _check_finite(valid, advantages, logp=logp, old_logp=old_logp, ref_logp=ref_logp)
    dtype = torch.promote_types(logp.dtype, torch.float32)  # bf16 log-probs: counts and sums in fp32
    mf = valid.to(dtype)  # (B, T)
    zero = torch.zeros_like(logp, dtype=dtype)
    logp = torch.where(valid, logp.to(dtype), zero)
    log_ratio = logp - torch.where(valid, old_logp.detach().to(dtype), zero)  # (B, T)
    adv = advantages.detach().to(dtype)  # (B,)
    out = POLICY_LOSSES[cfg.policy_loss](log_ratio, adv, mf, cfg)
    norm_const = cfg.norm_const
    if norm_const is None and cfg.agg == "seq-mean-token-sum-norm":
        norm_const = default_norm_const(mf)  # resolved once for the policy and the KL term
    loss = pg_local = aggregate(out.loss, mf, cfg.agg, norm_const)[0]
    kl_local = None
    if ref_logp is not None:
        kl = kl_penalty(logp, torch.where(valid, ref_logp.detach().to(dtype), zero), cfg.kl_estimator)  # (B, T)
        kl_local = aggregate(kl, mf, cfg.agg, norm_const)[0]
        if cfg.kl_coef > 0:
            loss = loss + cfg.kl_coef * kl_local
    metrics, n_tokens = _metrics(out, log_ratio, adv, mf, pg_local, kl_local)
    if n_tokens == 0:
        warnings.warn(f"compute_policy_loss: {EMPTY_MASK_WARNING}", RuntimeWarning, stacklevel=2)
    return loss, metrics


def _check_finite(valid: torch.Tensor, advantages: torch.Tensor, **log_probs) -> None:
    """One clear line for NaN/inf advantages, or NaN/inf log-probs where mask = 1 (padding may hold anything)."""
    named = {k: v for k, v in log_probs.items() if v is not None}
    counts = [(~torch.isfinite(advantages)).sum()] + [(~torch.isfinite(t) & valid).sum() for t in named.values()]
    for key, bad in zip(["advantages", *named], torch.stack(counts).tolist()):
        if bad:
            where = "" if key == "advantages" else " where mask = 1"
            raise ValueError(f"{key}: {bad} non-finite value(s) (NaN or inf){where}; allowed: finite numbers")
