"""Reference parity: our policy losses against TRL's on identical tensors (value, gradient, clip fraction) to 1e-6.

TRL (a dev dependency, pinned in pyproject's `dev` extra to the version verified here, 1.16.0) computes its loss inside
GRPOTrainer._compute_loss / RLOOTrainer._compute_loss, from a model forward. We call those methods on a trainer built
without __init__ (no model, data set or accelerate state): the attributes __init__ derives from a real GRPOConfig /
RLOOConfig are set the way __init__ sets them, a one-process stand-in answers the accelerator calls, and the forward
(`_get_per_token_logps_and_entropies`) returns our log-prob tensor, so gradients flow into the same leaf on both sides.
If TRL is missing this module fails at import: it never skips.

Mapping (ours -> TRL) and the intentional differences:
- grpo -> loss_type="grpo", beta=0.04. TRL >= 1.x defaults to `use_bias_correction_kl=True` (the k3 KL term times
  the token ratio); ours is DeepSeekMath's plain k3 term, so parity uses False, and a test pins the difference:
  on-policy equal values, gradients apart by exactly beta * k3_it (aggregated); off-policy different values.
  TRL adds beta*KL per token before aggregating; we aggregate the KL term with the same aggregation and add it:
  identical because aggregation is linear.
- dapo -> loss_type="bnpo" (batch token mean) and "dapo" (token sum / num_items_in_batch, the global token count):
  both are our token-mean in one process.
- dr_grpo -> loss_type="dr_grpo" (sum / (B * max_completion_length)) with our norm_const = max_completion_length.
- gspo, gspo_token -> TRL names GSPO loss_type="grpo" with importance_sampling_level="sequence" (the geometric
  mean sequence ratio, a (B, 1) loss); both our forms match it in value and gradient.
- luspo -> loss_type="luspo" with importance_sampling_level="sequence": (1/B) sum_i |y_i| l_i.
- rloo -> RLOOTrainer: whole-sequence ratio exp(sum_t log r_it), clipped, sequence mean. (TRL's RLOO puts its
  KL into the reward, not the loss; parity runs with beta=0.)
- Rows masked out entirely: TRL's grpo/dr_grpo/luspo/rloo divide by every row B, we by the rows with a valid token
  (so DAPO's overlong filter does not dilute the loss); a test pins the ratio B / (B - 1) with one empty row. TRL's
  RLOO also keeps such a row's value -A_i (its ratio is exp(0) = 1), without gradient.
- Ours caps log-ratios at +-20 before exp (as verl); never binding on these tensors.
- Advantages are not compared with TRL: TRL computes them inline inside generation (_generate_and_score_completions),
  with no function to call on tensors; TRL's z-score adds 1e-4 to the std (ours adv_eps, default 1e-6).

verl (core_algos: agg_loss, gspo and vanilla policy losses, grpo and rloo outcome advantages) is not a dev dependency:
verl 0.9.1 requires transformers < 5.11 (pip would downgrade our transformers 5.23) plus ray[default], tensordict
and peft, and older releases require numpy < 2. Installed on the side (`--no-deps`, plus ray, tensordict and their
small deps) it imports on CPU and matched ours on the same kind of tensors to 5e-10 (advantages, the four
aggregations, gspo and vanilla = our gspo/gspo_token and dapo); its intentional differences: vanilla always applies
a dual clip (clip_ratio_c = 3) where we make it opt-in (`dual_clip_c`), and seq-mean-token-sum-norm defaults its
constant (loss_scale_factor) to the padded width T where we default to the longest response (padding-invariant).
"""
from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from seqrl.algorithms import compute_policy_loss

pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")  # raised by GRPOConfig
ATOL = 1e-6
MAX_COMPLETION = 16  # TRL's max_completion_length = our norm_const for dr_grpo


class OneProcess:
    """The accelerate.Accelerator calls _compute_loss makes, for a single process."""

    num_processes, sync_gradients = 1, True

    @staticmethod
    def reduce(t, reduction="sum"):
        return t

    @staticmethod
    def gather(t):
        return t

    gather_for_metrics = gather


def bare_trainer(cls, args, logp: torch.Tensor):
    """A TRL trainer holding exactly the attributes its _compute_loss reads, set as its __init__ sets them."""
    trainer = object.__new__(cls)
    high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    attrs = dict(args=args, model=torch.nn.Module(), accelerator=OneProcess(), aux_loss_enabled=False,
                 _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, epsilon_low=args.epsilon,
                 epsilon_high=high)
    if cls is GRPOTrainer:
        attrs.update(beta=args.beta, loss_type=args.loss_type, importance_sampling_level=args.importance_sampling_level,
                     max_completion_length=args.max_completion_length, top_entropy_quantile=args.top_entropy_quantile,
                     off_policy_mask_threshold=args.off_policy_mask_threshold, use_vllm=args.use_vllm,
                     vllm_importance_sampling_correction=args.vllm_importance_sampling_correction,
                     current_gradient_accumulation_steps=args.gradient_accumulation_steps,
                     entropy_coef=args.entropy_coef, use_adaptive_entropy=args.use_adaptive_entropy,
                     _entropy_bonus_enabled=args.entropy_coef != 0.0 or args.use_adaptive_entropy)
    trainer.__dict__.update(attrs)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
    return trainer


def trl_loss(kind: str, logp, old, adv, mask, ref=None, **config):
    """TRL's loss, d loss / d logp and its metrics; kind = "grpo" (GRPOTrainer) or "rloo" (RLOOTrainer)."""
    leaf = logp.clone().requires_grad_()
    B, T = mask.shape
    common = dict(output_dir="unused", use_cpu=True, bf16=False, report_to=[])
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask, "advantages": adv}
    if kind == "rloo":
        trainer = bare_trainer(RLOOTrainer, RLOOConfig(**common, beta=0.0, **config), leaf)
        inputs["old_logps"] = (old * mask).sum(-1)  # (B,) TRL's RLOO keeps sequence log-probs
    else:
        args = GRPOConfig(**common, max_completion_length=MAX_COMPLETION, **config)
        trainer = bare_trainer(GRPOTrainer, args, leaf)
        inputs.update(old_per_token_logps=old, ref_per_token_logps=ref, num_items_in_batch=mask.sum())
    loss = trainer._compute_loss(trainer.model, inputs)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def ours(name, logp, old, adv, mask, ref=None, **overrides):
    leaf = logp.clone().requires_grad_()
    loss, metrics = compute_policy_loss(name, leaf, old, adv, mask, ref_logp=ref, **overrides)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad, metrics


def batch(sigma: float, seed: int = 0, lengths=(9, 3, 5, 1, 7, 2, 8, 4)):
    """float64 (B, T) log-probs with finite garbage under padding; old = logp + N(0, sigma^2) per token."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    B, T = len(lengths), int(lengths.max())
    mask = (torch.arange(T) < lengths[:, None]).long()  # (B, T)
    logp = -3 * torch.rand(B, T, generator=g, dtype=torch.float64)
    old = logp + sigma * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return logp, old, ref, adv, mask


# name: (our algorithm, our overrides, TRL trainer, TRL config, per-token noise sigma, with a reference model)
CASES = {
    "grpo": ("grpo", {}, "grpo", dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=False), 0.3, True),
    "dapo-vs-bnpo": ("dapo", {}, "grpo", dict(loss_type="bnpo", beta=0.0, epsilon_high=0.28), 0.3, False),
    "dapo": ("dapo", {}, "grpo", dict(loss_type="dapo", beta=0.0, epsilon_high=0.28), 0.3, False),
    "dr_grpo": ("dr_grpo", {"norm_const": MAX_COMPLETION}, "grpo", dict(loss_type="dr_grpo", beta=0.0), 0.3, False),
    "gspo": ("gspo", {}, "grpo", dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.0,
                                      epsilon=3e-4, epsilon_high=4e-4), 1e-3, False),
    "gspo_token": ("gspo_token", {}, "grpo", dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.0,
                                                  epsilon=3e-4, epsilon_high=4e-4), 1e-3, False),
    "luspo": ("luspo", {}, "grpo", dict(loss_type="luspo", importance_sampling_level="sequence", beta=0.0,
                                        epsilon=2e-3, epsilon_high=2.5e-3), 5e-3, False),
    "rloo": ("rloo", {}, "rloo", dict(epsilon=0.2), 0.15, False),
}
TOKEN_LEVEL = {"grpo", "dapo-vs-bnpo", "dapo", "dr_grpo"}  # TRL's clip_ratio/region_mean is a token share there


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_and_gradient_match_trl(case):
    name, overrides, kind, config, sigma, with_ref = CASES[case]
    logp, old, ref, adv, mask = batch(sigma)
    ref = ref if with_ref else None
    loss, grad, metrics = ours(name, logp, old, adv, mask, ref, **overrides)
    trl_value, trl_grad, trl_metrics = trl_loss(kind, logp, old, adv, mask, ref, **config)
    assert 0 < metrics["train/pg_clipfrac"] < 1, metrics  # both the clipped and the unclipped branch are exercised
    assert loss.item() == pytest.approx(trl_value.item(), abs=ATOL, rel=0)
    assert torch.allclose(grad, trl_grad, atol=ATOL, rtol=0), (grad, trl_grad)
    assert grad.abs().sum() > 0
    if case in TOKEN_LEVEL:
        assert metrics["train/pg_clipfrac"] == pytest.approx(trl_metrics["clip_ratio/region_mean"], abs=ATOL)


def test_trl_bias_corrected_kl_differs_by_the_ratio_gradient():
    """TRL's default KL term is k3_it * r_it: on-policy its value is ours, its gradient adds k3_it d r_it / d logp."""
    logp, old, ref, adv, mask = batch(0.3, seed=1)
    cfg = dict(loss_type="grpo", beta=0.04)  # TRL's default use_bias_correction_kl=True
    loss, grad, _ = ours("grpo", logp, logp, adv, mask, ref)
    trl_value, trl_grad, _ = trl_loss("grpo", logp, logp, adv, mask, ref, **cfg)
    assert loss.item() == pytest.approx(trl_value.item(), abs=ATOL, rel=0)
    k3 = (torch.exp(ref - logp) - (ref - logp) - 1) * mask  # (B, T); d r_it / d logp_it = r_it = 1 on-policy
    extra = 0.04 * k3 / mask.sum(-1, keepdim=True) / len(mask)  # through seq-mean-token-mean
    assert torch.allclose(trl_grad - grad, extra, atol=ATOL, rtol=0) and extra.abs().max() > 1e-4
    off_policy, trl_off = ours("grpo", logp, old, adv, mask, ref), trl_loss("grpo", logp, old, adv, mask, ref, **cfg)
    assert abs(off_policy[0].item() - trl_off[0].item()) > 1e-4  # off-policy the values differ too


@pytest.mark.parametrize("case", ["grpo", "dr_grpo", "luspo", "rloo"])
def test_fully_masked_rows_do_not_dilute_our_mean(case):
    name, overrides, kind, config, sigma, with_ref = CASES[case]
    logp, old, ref, adv, mask = batch(sigma, seed=2)
    mask[3] = 0  # one of B = 8 rows filtered out entirely
    ref = ref if with_ref else None
    loss, grad, _ = ours(name, logp, old, adv, mask, ref, **overrides)
    trl_value, trl_grad, _ = trl_loss(kind, logp, old, adv, mask, ref, **config)
    empty_row = -adv[3].item() if case == "rloo" else 0.0  # TRL's RLOO: ratio exp(0) = 1, value -A_3, no gradient
    assert loss.item() == pytest.approx((trl_value.item() * 8 - empty_row) / 7, abs=ATOL, rel=0)
    assert torch.allclose(grad, trl_grad * 8 / 7, atol=ATOL, rtol=0)


def test_on_policy_every_loss_type_gives_the_same_reinforce_gradient_as_trl():
    """On-policy nothing clips: a second, clip-free comparison point (log-ratios exactly 0)."""
    logp, _, _, adv, mask = batch(0.0, seed=3)
    for case in sorted(CASES):
        name, overrides, kind, config, _, _ = CASES[case]
        config = config | ({"beta": 0.0} if kind == "grpo" else {})
        loss, grad, metrics = ours(name, logp, logp, adv, mask, None, **(overrides | {"kl_coef": 0.0}))
        trl_value, trl_grad, _ = trl_loss(kind, logp, logp, adv, mask, None, **config)
        assert metrics["train/pg_clipfrac"] == 0.0 and math.isfinite(loss.item())
        assert loss.item() == pytest.approx(trl_value.item(), abs=ATOL, rel=0), case
        assert torch.allclose(grad, trl_grad, atol=ATOL, rtol=0), case
