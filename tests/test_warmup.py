"""The supervised warm-up of the smoke experiment: non-trivial accuracy, length matters, cached on disk."""
from __future__ import annotations

import pytest
import torch

from conftest import compose


@pytest.fixture(scope="module")
def warmed(tmp_path_factory):
    from seqrl.config import validate
    from seqrl.models import build_policy
    from seqrl.warmup import warmup

    c = validate(compose("train", ["experiment=smoke", f"paths.output_dir={tmp_path_factory.mktemp('run')}"]))
    torch.manual_seed(c.seed)
    policy = build_policy(c.model)
    info = warmup(policy, c)
    return c, policy, info


def test_warmup_is_cached_and_reloads_identically(warmed):
    from seqrl.models import build_policy
    from seqrl.warmup import warmup

    c, policy, info = warmed
    again = build_policy(c.model)
    info2 = warmup(again, c)
    assert info2["cached"] and info2["path"] == info["path"]
    for a, b in zip(policy.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)


def test_warmed_policy_is_nontrivial_and_worked_answers_beat_direct_ones(warmed):
    """Issue acceptance: starting accuracy in [10%, 70%]; worked (longer) answers more accurate than direct ones."""
    from seqrl.algorithms.rollout import hf_generate
    from seqrl.data import load_samples
    from seqrl.eval.grading import grade_many
    from seqrl.tasks import response_style

    c, policy, _ = warmed
    torch.manual_seed(0)
    samples = load_samples(c.data, "eval", c.paths.data_dir)
    roll = hf_generate(policy, samples, c.rollout, n=4)
    correct = torch.tensor(grade_many(roll.texts, [s.answer for s in roll.samples], "int"), dtype=torch.float)
    worked = torch.tensor([response_style(t) == "worked" for t in roll.texts])
    acc = correct.mean().item()
    acc_worked, acc_direct = correct[worked].mean().item(), correct[~worked].mean().item()
    print(f"accuracy {acc:.3f}; worked {acc_worked:.3f} ({worked.float().mean():.2f} of samples); direct {acc_direct:.3f}")
    assert 0.10 <= acc <= 0.70
    assert 0.1 <= worked.float().mean() <= 0.9  # the policy samples both styles: RL can move the length
    assert acc_worked > acc_direct + 0.1
    assert roll.lengths[worked].float().mean() > 2 * roll.lengths[~worked].float().mean()
