"""Reward shaping: DAPO soft overlong punishment and filtering, LUSPO's format term, dynamic sampling."""
import pytest
import torch

from seqrl.algorithms import dynamic_sampling_keep, load_algorithm, shape_rewards, soft_overlong_penalty


def test_soft_overlong_penalty_at_the_boundaries():
    # L_max = 20, L_cache = 5: 0 up to 15, then (15 - |y|) / 5 down to -1 at 20, -1 beyond
    lengths = torch.tensor([0, 15, 16, 18, 20, 21, 30])
    expected = torch.tensor([0.0, 0.0, -0.2, -0.6, -1.0, -1.0, -1.0])
    assert torch.allclose(soft_overlong_penalty(lengths, 20, 5), expected)


def test_soft_overlong_penalty_with_the_papers_lengths():
    # paper: L_max - L_cache = 16384, L_cache = 4096
    penalty = soft_overlong_penalty(torch.tensor([16384, 16385, 18432, 20480, 20481]), 20480, 4096)
    assert torch.allclose(penalty, torch.tensor([0.0, -1 / 4096, -0.5, -1.0, -1.0]))


def test_dapo_rewards_and_overlong_filter():
    # budget 50 -> L_cache = 50 // 5 = 10, ramp from 40 to 50; wrong answers score -1 (paper)
    correct = torch.tensor([True, False, True, True, False])
    lengths = torch.tensor([10, 10, 45, 50, 50])
    truncated = torch.tensor([False, False, False, True, True])
    rewards, keep = shape_rewards(load_algorithm("dapo"), correct, lengths, 50, truncated)
    assert torch.allclose(rewards, torch.tensor([1.0, -1.0, 0.5, 0.0, -2.0]))
    assert keep.tolist() == [True, True, True, False, False]


def test_configured_overlong_limits_override_the_budget():
    cfg = load_algorithm("dapo", overlong_max_len=40, overlong_cache=20)  # ramp from 20 to 40
    rewards, _ = shape_rewards(cfg, torch.tensor([True, True]), torch.tensor([20, 30]), 50, torch.tensor([False, False]))
    assert torch.allclose(rewards, torch.tensor([1.0, 0.5]))


def test_grpo_is_plain_accuracy_and_keeps_everything():
    rewards, keep = shape_rewards("grpo", torch.tensor([True, False]), torch.tensor([64, 64]), 64,
                                  torch.tensor([True, True]), format_ok=torch.tensor([True, True]))
    assert rewards.tolist() == [1.0, 0.0] and keep.tolist() == [True, True]


def test_luspo_reward_is_accuracy_plus_format_plus_linear_overlong():
    correct = torch.tensor([True, True, False, False])
    format_ok = torch.tensor([True, False, True, False])
    lengths = torch.tensor([5, 90, 95, 100])  # budget 100 -> ramp from 80 to 100
    rewards, keep = shape_rewards("luspo", correct, lengths, 100, lengths == 100, format_ok)
    assert torch.allclose(rewards, torch.tensor([1.5, 1.0 - 0.5, 0.5 - 0.75, -1.0]))
    assert keep.all()


def test_dynamic_sampling_drops_constant_groups():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 0.5, -1.0, 0.0])
    groups = torch.tensor([4, 4, 9, 9, 2, 2, 0, 0])  # group 9 (all 1) and group 2 (all 0.5) are constant
    assert dynamic_sampling_keep(rewards, groups).tolist() == [True, True, False, False, False, False, True, True]


def test_bad_input_is_one_clear_line():
    with pytest.raises(ValueError, match=r"^overlong_cache=20: must be in \[1, L_max=20\)$"):
        soft_overlong_penalty(torch.tensor([1]), 20, 20)
    with pytest.raises(ValueError, match=r"^correct, lengths, truncated: expected equal shapes"):
        shape_rewards("dapo", torch.tensor([True]), torch.tensor([1, 2]), 10, torch.tensor([False]))
    with pytest.raises(ValueError, match=r"^group_ids shape \(1,\) != rewards shape \(2,\)$"):
        dynamic_sampling_keep(torch.tensor([1.0, 0.0]), torch.tensor([0]))
