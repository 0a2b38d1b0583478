"""Policy losses: values by hand, the identities of DESIGN.md section 2, padding, metrics, FSPO's length fairness."""
import math

import pytest
import torch

from seqrl.algorithms import POLICY_LOSSES, agg_loss, available_algorithms, compute_policy_loss, kl_penalty, \
    load_algorithm

# hand example: |y_0| = 3 with ratios 1.5, 1, 0.75 (A = +1); |y_1| = 2 with ratios 0.5, 1.1 (A = -1)
LOG_RATIO = torch.tensor([[math.log(1.5), 0.0, math.log(0.75)], [math.log(0.5), math.log(1.1), 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
ADV = torch.tensor([1.0, -1.0])
LOGP = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]])
CLIP = {"clip_low": 0.2, "clip_high": 0.2}


def hand(name, **overrides):
    logp = LOGP.clone().requires_grad_()
    old = (LOGP - LOG_RATIO).masked_fill(MASK == 0, math.nan)  # garbage under padding
    loss, metrics = compute_policy_loss(name, logp, old, ADV, MASK, **overrides)
    loss.backward()
    return loss.item(), metrics, logp.grad


def test_token_clip_by_hand():
    # l = max(-A r, -A clip(r, .8, 1.2)): seq 0: -1.2 (clipped), -1.0, -0.75; seq 1: 0.8 (clipped), 1.1
    loss, m, grad = hand("dapo", **CLIP)
    assert loss == pytest.approx((-1.2 - 1.0 - 0.75 + 0.8 + 1.1) / 5)
    assert torch.allclose(grad, torch.tensor([[0.0, -1.0 / 5, -0.75 / 5], [0.0, 1.1 / 5, 0.0]]))
    assert m["train/pg_clipfrac"] == pytest.approx(2 / 5) and m["train/grad_token_frac"] == pytest.approx(3 / 5)
    assert (m["train/ratio/min"], m["train/ratio/max"]) == (pytest.approx(0.5), pytest.approx(1.5))
    assert m["train/ratio/mean"] == pytest.approx((1.5 + 1 + 0.75 + 0.5 + 1.1) / 5)
    assert m["train/ppo_kl"] == pytest.approx(-float(LOG_RATIO[MASK > 0].sum()) / 5)
    assert m["train/pg_loss"] == pytest.approx(loss)


def test_dual_clip_caps_negative_advantages():
    logp = torch.zeros(1, 2, requires_grad=True)
    old = torch.tensor([[-math.log(5.0), -math.log(2.0)]])  # r = 5 and 2, A = -1: -A r = 5 > c = 3 > 2
    loss, m = compute_policy_loss("dapo", logp, old, torch.tensor([-1.0]), torch.ones(1, 2), dual_clip_c=3.0)
    loss.backward()
    assert loss.item() == pytest.approx((3.0 + 2.0) / 2)
    assert torch.allclose(logp.grad, torch.tensor([[0.0, 2.0 / 2]])) and m["train/pg_clipfrac"] == 0.5


def test_gspo_and_gspo_token_by_hand():
    s0 = 1.125 ** (1 / 3)  # geometric mean of (1.5, 1, .75), inside [.8, 1.2]; s_1 = sqrt(.55) < .8: clipped
    for name in ("gspo", "gspo_token"):
        loss, m, grad = hand(name, **CLIP)
        assert loss == pytest.approx((-s0 + 0.8) / 2)
        assert torch.allclose(grad, torch.tensor([[-s0 / 3 / 2] * 3, [0.0, 0.0, 0.0]]))
        assert m["train/pg_clipfrac"] == pytest.approx(2 / 5)
        assert m["train/ratio/max"] == pytest.approx(s0) and m["train/ratio/min"] == pytest.approx(0.55 ** 0.5)


def test_luspo_by_hand():
    s0 = 1.125 ** (1 / 3)
    loss, _, grad = hand("luspo", **CLIP)
    assert loss == pytest.approx((3 * -s0 + 2 * 0.8) / 2)
    assert torch.allclose(grad, torch.tensor([[-s0 / 2] * 3, [0.0, 0.0, 0.0]]))


def test_rloo_seq_by_hand():
    # R_0 = 1.125 (unclipped), R_1 = .55 -> clip .8 (A = -1: the clipped term wins)
    loss, m, grad = hand("rloo")
    assert loss == pytest.approx((-1.125 + 0.8) / 2)
    assert torch.allclose(grad, torch.tensor([[-1.125 / 2] * 3, [0.0, 0.0, 0.0]]))
    assert m["train/pg_clipfrac"] == pytest.approx(2 / 5)


def test_fspo_by_hand_with_fixed_and_batch_drift():
    s0, s1 = math.log(1.125), math.log(0.55)
    loss, m, grad = hand("fspo", fspo_mu=0.0, fspo_c_low=0.1, fspo_c_high=0.1)
    # band_0 = +-0.1 sqrt3 holds S_0; S_1 < -0.1 sqrt2 -> e^{-0.1 sqrt2}, chosen since A_1 < 0
    assert loss == pytest.approx((-1.125 + math.exp(-0.1 * math.sqrt(2))) / 2)
    assert torch.allclose(grad, torch.tensor([[-1.125 / 2] * 3, [0.0, 0.0, 0.0]]))
    assert m["train/fspo/band_low"] == pytest.approx(-0.1 * (math.sqrt(3) + math.sqrt(2)) / 2)
    mu = (s0 + s1) / 5  # batch mean per-token log-ratio
    loss, m, grad = hand("fspo", fspo_c_low=0.1, fspo_c_high=0.1)
    high0, low1 = 3 * mu + 0.1 * math.sqrt(3), 2 * mu - 0.1 * math.sqrt(2)  # S_0 > high0, S_1 < low1: both clip
    assert loss == pytest.approx((-math.exp(high0) + math.exp(low1)) / 2)
    assert torch.equal(grad, torch.zeros(2, 3)) and m["train/pg_clipfrac"] == 1.0
    assert m["train/fspo/mu"] == pytest.approx(mu) and m["train/grad_token_frac"] == 0.0


def test_kl_estimators_and_grpo_total_loss():
    d = torch.tensor([[0.5, -0.2]])
    assert torch.allclose(kl_penalty(d, torch.zeros(1, 2), "k1"), d)
    assert torch.allclose(kl_penalty(d, torch.zeros(1, 2), "k2"), d**2 / 2)
    assert torch.allclose(kl_penalty(d, torch.zeros(1, 2), "k3"), torch.exp(-d) + d - 1)
    ref = LOGP - torch.tensor([[0.1, -0.2, 0.3], [0.0, 0.4, 9.0]])
    loss, m = compute_policy_loss("grpo", LOGP, LOGP - LOG_RATIO, ADV, MASK, ref_logp=ref)
    k3 = torch.exp(ref - LOGP) - (ref - LOGP) - 1  # (B, T)
    kl = (k3[0].sum() / 3 + k3[1, :2].sum() / 2) / 2
    assert m["train/kl_loss"] == pytest.approx(kl.item())
    assert loss.item() == pytest.approx(m["train/pg_loss"] + 0.04 * kl.item())
    with pytest.raises(ValueError, match=r"^algorithm.kl_coef=0.04: needs ref_logp; pass it or set kl_coef=0$"):
        compute_policy_loss("grpo", LOGP, LOGP, ADV, MASK)


def random_batch(seed=0, B=6, T=8, drift=0.3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([8, 3, 5, 1, 7, 2])[:B]
    mask = (torch.arange(T) < lengths[:, None]).long()  # (B, T)
    logp = -torch.rand(B, T, generator=g) * 3
    old = logp + drift * torch.randn(B, T, generator=g)
    ref = logp + drift * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    return logp, old, ref, adv, mask


def grad_of(name, logp, old, adv, mask, ref=None, **overrides):
    leaf = logp.clone().requires_grad_()
    loss, metrics = compute_policy_loss(name, leaf, old, adv, mask, ref_logp=ref, **overrides)
    return loss, torch.autograd.grad(loss, leaf)[0], metrics


REINFORCE_AGG = {"grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm", "dapo": "token-mean",
                 "rloo": "seq-mean-token-sum", "gspo": "seq-mean-token-mean", "gspo_token": "seq-mean-token-mean",
                 "luspo": "seq-mean-token-sum", "fspo": "seq-mean-token-sum"}


@pytest.mark.parametrize("name", sorted(REINFORCE_AGG))
def test_on_policy_gradient_is_reinforce(name):
    logp, _, _, adv, mask = random_batch()
    _, grad, m = grad_of(name, logp, logp.detach(), adv, mask, kl_coef=0.0)
    leaf = logp.clone().requires_grad_()
    reinforce = agg_loss(-adv[:, None] * leaf, mask, REINFORCE_AGG[name])  # -A_i log pi(y_it), aggregated
    assert torch.allclose(grad, torch.autograd.grad(reinforce, leaf)[0], atol=1e-6)
    assert m["train/pg_clipfrac"] == 0.0 and m["train/ratio/max"] == pytest.approx(1.0)


def test_gspo_equals_grpo_seq_mean_token_mean_on_policy():
    logp, _, _, adv, mask = random_batch(seed=1)
    _, g_gspo, _ = grad_of("gspo", logp, logp, adv, mask)
    _, g_grpo, _ = grad_of("grpo", logp, logp, adv, mask, kl_coef=0.0)
    assert torch.allclose(g_gspo, g_grpo, atol=1e-7)


def test_gspo_token_equals_gspo_off_policy_in_value_and_gradient():
    logp, old, _, adv, mask = random_batch(seed=2, drift=0.002)
    l_seq, g_seq, m_seq = grad_of("gspo", logp, old, adv, mask)
    l_tok, g_tok, m_tok = grad_of("gspo_token", logp, old, adv, mask)
    assert 0 < m_seq["train/pg_clipfrac"] < 1  # some sequences clipped, some not
    assert l_seq.item() == pytest.approx(l_tok.item()) and torch.allclose(g_seq, g_tok, atol=1e-7)
    assert m_seq == pytest.approx(m_tok)


def test_luspo_gradient_is_length_times_gspo_per_sequence():
    logp, old, _, adv, mask = random_batch(seed=4, drift=0.004)
    clip = {"clip_low": 2e-3, "clip_high": 2.5e-3}
    _, g_gspo, m = grad_of("gspo", logp, old, adv, mask, **clip)
    _, g_luspo, _ = grad_of("luspo", logp, old, adv, mask)
    assert 0 < m["train/pg_clipfrac"] < 1
    assert torch.allclose(g_luspo, mask.sum(-1, keepdim=True) * g_gspo, atol=1e-7)


@pytest.mark.parametrize("name", sorted(REINFORCE_AGG))
def test_padding_never_changes_a_loss(name):
    logp, old, ref, adv, mask = random_batch(seed=4)
    loss, grad, metrics = grad_of(name, logp, old, adv, mask, ref)
    junk = torch.tensor([[math.nan, math.inf, -1e6]]).expand(len(adv), 3)
    pad = lambda t: torch.cat([t, junk], 1)  # noqa: E731
    mask_p = torch.cat([mask, torch.zeros(len(adv), 3, dtype=mask.dtype)], 1)
    loss_p, grad_p, metrics_p = grad_of(name, pad(logp), pad(old), adv, mask_p, pad(ref))
    assert loss_p.item() == pytest.approx(loss.item())
    assert torch.allclose(grad_p[:, :8], grad) and torch.equal(grad_p[:, 8:], torch.zeros(len(adv), 3))
    assert metrics_p == pytest.approx(metrics)


def test_clip_fraction_by_length_quartile():
    mask = (torch.arange(4) < torch.tensor([3, 1, 4, 2])[:, None]).long()  # lengths 3, 1, 4, 2
    old = torch.zeros(4, 4)
    old[2] = -math.log(2.0)  # only the longest response has ratio 2 (clipped for A > 0)
    _, m = compute_policy_loss("dapo", torch.zeros(4, 4), old, torch.ones(4), mask)
    quartiles = [m[f"train/pg_clipfrac/len_q{q}"] for q in (1, 2, 3, 4)]
    assert quartiles == [0.0, 0.0, 0.0, 1.0] and m["train/pg_clipfrac"] == pytest.approx(4 / 10)
    _, m = compute_policy_loss("dapo", torch.zeros(2, 4), old[1:3], torch.ones(2), mask[1:3])
    assert {k for k in m if "len_q" in k} == {"train/pg_clipfrac/len_q1", "train/pg_clipfrac/len_q3"}


def test_bf16_log_probs_are_aggregated_in_fp32():
    logp, old, ref, adv, mask = random_batch(seed=6)
    logp, old = logp.bfloat16(), old.bfloat16()
    loss16, grad16, _ = grad_of("dapo", logp, old, adv, mask)
    loss32, grad32, _ = grad_of("dapo", logp.float(), old.float(), adv, mask)
    assert loss16.dtype == torch.float32 and loss16.item() == pytest.approx(loss32.item(), abs=1e-7)
    assert grad16.dtype == torch.bfloat16 and torch.allclose(grad16.float(), grad32, rtol=1e-2)


def test_bad_shapes_are_one_clear_line():
    with pytest.raises(ValueError, match=r"^old_logp: shape \(2, 2\) != logp shape \(2, 3\)$"):
        compute_policy_loss("dapo", LOGP, LOGP[:, :2], ADV, MASK)
    with pytest.raises(ValueError, match=r"^advantages: expected shape \(2,\), got \(2, 1\)$"):
        compute_policy_loss("dapo", LOGP, LOGP, ADV[:, None], MASK)


# ---------------------------------------------------------------- FSPO's length fairness
def test_fspo_band_half_width_grows_as_sqrt_length():
    lengths = torch.tensor([1, 4, 16, 64])
    mask = (torch.arange(64) < lengths[:, None]).float()
    out = POLICY_LOSSES["fspo"](torch.zeros(4, 64), torch.ones(4), mask, load_algorithm("fspo", fspo_mu=0.0))
    assert torch.allclose(out.seq_stats["fspo/band_high"], 0.03 * lengths.float().sqrt())
    assert torch.allclose(out.seq_stats["fspo/band_low"], -0.03 * lengths.float().sqrt())


def clip_rates_by_length(name, drift=0.0, sigma=0.01, n=1000, **overrides):
    """Random-walk log-ratio model: log r_it ~ N(drift, sigma^2) iid; lengths 8/32/128/512, one per quartile."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([8, 32, 128, 512]).repeat_interleave(n)
    mask = (torch.arange(512) < lengths[:, None]).float()  # (4n, 512)
    logp = drift + sigma * torch.randn(4 * n, 512, generator=g)
    adv = torch.randint(0, 2, (4 * n,), generator=g).float() * 2 - 1
    _, m = compute_policy_loss(name, logp, torch.zeros_like(logp), adv, mask, **overrides)
    return [m[f"train/pg_clipfrac/len_q{q}"] for q in (1, 2, 3, 4)]


def test_fspo_clip_rate_is_flat_across_lengths_while_gspo_is_not():
    # c / sigma = 1.5: each sequence is clipped with probability P(Z > 1.5) ~ 0.067 whatever its length
    fspo = clip_rates_by_length("fspo", fspo_c_low=0.015, fspo_c_high=0.015)
    assert max(fspo) - min(fspo) < 0.035 and all(0.035 < r < 0.1 for r in fspo), fspo
    gspo = clip_rates_by_length("gspo")  # fixed band on the mean log-ratio: short responses clip far more
    assert gspo == sorted(gspo, reverse=True) and gspo[0] - gspo[3] > 0.15, gspo


def test_fspo_batch_drift_keeps_it_flat_and_mu_zero_does_not():
    rates = clip_rates_by_length("fspo", drift=0.005, fspo_c_low=0.015, fspo_c_high=0.015)
    assert max(rates) - min(rates) < 0.035, rates
    fixed = clip_rates_by_length("fspo", drift=0.005, fspo_mu=0.0, fspo_c_low=0.015, fspo_c_high=0.015)
    assert fixed[3] - fixed[0] > 0.2 and fixed[3] == pytest.approx(0.5, abs=0.05), fixed


def test_every_algorithm_runs_with_its_defaults():
    logp, old, ref, adv, mask = random_batch(seed=5)
    for name in available_algorithms():
        loss, grad, m = grad_of(name, logp, old, adv, mask, ref)
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
        assert set(m) >= {"train/pg_loss", "train/pg_clipfrac", "train/ratio/mean", "train/ppo_kl",
                          "train/kl_loss", "train/grad_token_frac", "train/pg_clipfrac/len_q4"}, name
