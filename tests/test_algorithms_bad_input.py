"""Bad input to the algorithm core: one clear ValueError line naming the value and what is allowed, or, for a batch
with no valid token, a defined zero loss with a warning. Never NaN."""
import math
import warnings

import pytest
import torch

from seqrl.algorithms import agg_loss, available_algorithms, compute_advantages, compute_policy_loss, kl_penalty, \
    load_algorithm, shape_rewards

LOGP = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
ADV = torch.tensor([1.0, -1.0])
ALGORITHMS = "dapo, dr_grpo, fspo, grpo, gspo, gspo_token, luspo, rloo"


def one_line_error(call, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        call()
    assert "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("call, pattern", [
    (lambda: compute_policy_loss("ppo", LOGP, LOGP, ADV, MASK), rf"^algorithm='ppo': unknown; allowed: {ALGORITHMS} "),
    (lambda: compute_policy_loss("dapo", LOGP, LOGP, ADV, MASK, policy_loss="ppo_clip"),
     r"^algorithm.policy_loss='ppo_clip': must be one of fspo, gspo, gspo_token, luspo, rloo_seq, token_clip$"),
    (lambda: compute_policy_loss("dapo", LOGP, LOGP, ADV, MASK, agg="sum"),
     r"^algorithm.agg='sum': must be one of seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm, "
     r"token-mean$"),
    (lambda: compute_advantages("dapo", ADV, group_size=2, advantage="zscore"),
     r"^algorithm.advantage='zscore': must be one of batch_norm, dr_grpo, grpo, rloo$"),
    (lambda: kl_penalty(LOGP, LOGP, "k4"), r"^kl_estimator='k4': allowed: k1, k2, k3$"),
    (lambda: shape_rewards("ppo", [True], [1], 8, [False]), rf"^algorithm='ppo': unknown; allowed: {ALGORITHMS} "),
])
def test_unknown_names_list_the_valid_ones(call, pattern):
    one_line_error(call, pattern)


@pytest.mark.parametrize("overrides, pattern", [
    ({"clip_low": 1.0}, r"^algorithm.clip_low=1.0: must be in \[0, 1\)$"),
    ({"clip_low": math.nan}, r"^algorithm.clip_low=nan: must be in \[0, 1\)$"),
    ({"clip_high": -0.01}, r"^algorithm.clip_high=-0.01: must be >= 0$"),
    ({"clip_high": math.inf}, r"^algorithm.clip_high=inf: must be >= 0$"),
    ({"fspo_c_low": 0.0}, r"^algorithm.fspo_c_low=0.0: must be > 0$"),
    ({"fspo_c_high": -1.0}, r"^algorithm.fspo_c_high=-1.0: must be > 0$"),
    ({"dual_clip_c": 0.5}, r"^algorithm.dual_clip_c=0.5: must be > 1 or null$"),
    ({"norm_const": 0}, r"^algorithm.norm_const=0: must be > 0 or null$"),
    ({"kl_coef": -0.04}, r"^algorithm.kl_coef=-0.04: must be >= 0$"),
    ({"max_sampling_rounds": 0}, r"^algorithm.max_sampling_rounds=0: must be an integer >= 1$"),
])
def test_invalid_clip_and_scale_values(overrides, pattern):
    one_line_error(lambda: compute_policy_loss("fspo", LOGP, LOGP, ADV, MASK, **overrides), pattern)


def test_agg_loss_rejects_a_non_positive_constant():
    one_line_error(lambda: agg_loss(LOGP, MASK, "seq-mean-token-sum-norm", norm_const=0.0),
                   r"^norm_const=0.0: must be > 0 or None \(the longest response\)$")


@pytest.mark.parametrize("name", ["dapo", "gspo", "fspo"])
def test_a_zero_width_clip_band_is_valid_and_on_policy_it_is_reinforce(name):
    logp = LOGP.clone().requires_grad_()
    loss, m = compute_policy_loss(name, logp, LOGP, ADV, MASK, clip_low=0.0, clip_high=0.0, fspo_c_low=1e-9,
                                  fspo_c_high=1e-9, fspo_mu=0.0)
    loss.backward()
    assert math.isfinite(loss.item()) and m["train/pg_clipfrac"] == 0.0  # r = 1 sits on the band: nothing blocked
    assert logp.grad.abs().sum() > 0


@pytest.mark.parametrize("call, pattern", [
    (lambda: compute_policy_loss("dapo", LOGP, LOGP, ADV, MASK[:, :2]),
     r"^mask: shape \(2, 2\) != logp shape \(2, 3\)$"),
    (lambda: compute_policy_loss("dapo", LOGP, LOGP, ADV, MASK.T), r"^mask: shape \(3, 2\) != logp shape \(2, 3\)$"),
    (lambda: compute_policy_loss("grpo", LOGP, LOGP, ADV, MASK, ref_logp=LOGP[:1]),
     r"^ref_logp: shape \(1, 3\) != logp shape \(2, 3\)$"),
    (lambda: compute_policy_loss("dapo", LOGP, LOGP, ADV[:1], MASK),
     r"^advantages: expected shape \(2,\), got \(1,\)$"),
    (lambda: compute_policy_loss("dapo", LOGP[0], LOGP[0], ADV, MASK[0]),
     r"^logp: expected shape \(B, T\), got \(3,\)$"),
    (lambda: compute_advantages("grpo", ADV, torch.tensor([0, 0, 0])),
     r"^group_ids: expected an integer tensor of shape \(2,\), got torch.int64 \(3,\)$"),
    (lambda: compute_advantages("grpo", LOGP, group_size=3), r"^rewards: expected shape \(B,\), got \(2, 3\)$"),
])
def test_mismatched_shapes(call, pattern):
    one_line_error(call, pattern)


def test_non_finite_inputs_are_rejected_where_they_would_matter():
    nan_adv = torch.tensor([1.0, math.nan])
    one_line_error(lambda: compute_policy_loss("dapo", LOGP, LOGP, nan_adv, MASK),
                   r"^advantages: 1 non-finite value\(s\) \(NaN or inf\); allowed: finite numbers$")
    bad = LOGP.clone()
    bad[0, 1], bad[1, 0] = -math.inf, math.nan  # both under mask = 1
    one_line_error(lambda: compute_policy_loss("dapo", bad, LOGP, ADV, MASK),
                   r"^logp: 2 non-finite value\(s\) \(NaN or inf\) where mask = 1; allowed: finite numbers$")
    one_line_error(lambda: compute_policy_loss("dapo", LOGP, bad, ADV, MASK), r"^old_logp: 2 non-finite")
    one_line_error(lambda: compute_policy_loss("grpo", LOGP, LOGP, ADV, MASK, ref_logp=bad), r"^ref_logp: 2 non-finite")
    padded = LOGP.clone()
    padded[1, 2] = math.nan  # under mask = 0: ignored
    loss, _ = compute_policy_loss("grpo", padded, padded, ADV, MASK, ref_logp=padded)
    assert math.isfinite(loss.item())


@pytest.mark.parametrize("name", available_algorithms())
def test_an_all_zero_mask_gives_zero_loss_zero_gradient_and_one_warning(name):
    logp = LOGP.clone().requires_grad_()
    with pytest.warns(RuntimeWarning, match=r"^compute_policy_loss: the loss mask has no valid token") as record:
        loss, metrics = compute_policy_loss(name, logp, LOGP - 0.1, ADV, torch.zeros(2, 3), ref_logp=LOGP + 0.2)
    assert len(record) == 1
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros(2, 3))
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["train/pg_clipfrac"] == 0.0 and metrics["train/ratio/mean"] == 1.0


def test_agg_loss_warns_on_an_all_zero_mask_and_only_then():
    with pytest.warns(RuntimeWarning, match=r"^agg_loss: the loss mask has no valid token on any rank"):
        assert agg_loss(LOGP, torch.zeros(2, 3), "token-mean").item() == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a partly masked batch (one empty row) is normal: no warning
        agg_loss(LOGP, torch.tensor([[1, 1, 0], [0, 0, 0]]), "token-mean")
        compute_policy_loss("dapo", LOGP, LOGP, ADV, torch.tensor([[1, 1, 0], [0, 0, 0]]))


def test_empty_batch_is_defined():
    adv = compute_advantages("grpo", torch.zeros(0), group_size=4)
    assert adv.shape == (0,)
    with pytest.warns(RuntimeWarning):
        loss, metrics = compute_policy_loss("gspo", torch.zeros(0, 5), torch.zeros(0, 5), adv, torch.zeros(0, 5))
    assert loss.item() == 0.0 and all(math.isfinite(v) for v in metrics.values())


def test_shape_rewards_rejects_a_non_positive_budget():
    one_line_error(lambda: shape_rewards(load_algorithm("dapo"), [True], [3], 0, [False]),
                   r"^max_len=0: must be an integer >= 1 \(the rollout's max new tokens\)$")
