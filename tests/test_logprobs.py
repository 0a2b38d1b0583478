"""`response_logprobs`: the language-model head only on response positions, logsumexp + gather, padding cut
(left prompt columns, right response columns), length buckets and prompts encoded once per group give the values
and gradients of a naive full-width log_softmax, on the three tiny families and on EqLen segment rows."""
from __future__ import annotations

import pytest
import torch

from conftest import make_policy, samples_for
from seqrl.algorithms import scoring
from seqrl.algorithms.rollout import ROLLOUTS, hf_generate, response_logprobs, trim_padding
from seqrl.config import RolloutConfig

STOPS = [2] + list(range(40, 50))  # rows end after ~10 tokens: lengths vary, padding to cut


def naive(policy, batch, temperature: float) -> torch.Tensor:
    """log_softmax over the full-width logits of every position: the reference (N, T)."""
    logits = policy.forward(batch.input_ids, batch.attention_mask, **batch.mm).logits  # (N, P+T, V)
    logits = logits[:, batch.prompt_len - 1:-1].float() / temperature  # (N, T, V)
    return logits.log_softmax(-1).gather(-1, batch.responses.unsqueeze(-1)).squeeze(-1)


def grads(policy, logp, mask) -> list[torch.Tensor]:
    policy.model.zero_grad(set_to_none=True)
    weights = torch.linspace(0.5, 1.5, mask.numel()).view_as(mask)  # a loss that weighs every token differently
    (logp * mask * weights).sum().backward()
    return [p.grad.clone() for p in policy.model.parameters() if p.grad is not None]


@pytest.mark.parametrize("family", ["dense", "moe", "vl"])
@pytest.mark.parametrize("buckets", [1, 3])
@pytest.mark.parametrize("packed", [True, False])
def test_values_and_gradients_equal_the_naive_full_width_log_softmax(family, buckets, packed, monkeypatch):
    """Responses after a shared prompt: as one flat list of real tokens (seqrl.algorithms.packed) or through the
    transformers forward with their padding."""
    shared = []  # which path scored each bucket: the prompt encoded once per group (dense, vl) or full width (moe)
    original = scoring._shared_prompts
    monkeypatch.setattr(scoring, "_shared_prompts", lambda *a: shared.append(original(*a)) or shared[-1])
    flat, real_packed = [], scoring.packed_responses
    monkeypatch.setattr(scoring, "packed_responses", lambda *a: flat.append(real_packed(*a) if packed else None)
                        or flat[-1])
    policy = make_policy(family, STOPS)
    torch.manual_seed(0)
    batch = hf_generate(policy, samples_for(family, 3), RolloutConfig(max_new_tokens=24), n=2)
    assert len(set(batch.lengths.tolist())) > 1  # varied lengths: the buckets differ in width
    mask = batch.response_mask
    logp, ent, router = response_logprobs(policy, batch, 0.7, entropy=True, buckets=buckets)
    assert len(shared) == buckets  # length buckets may split a group (then that bucket has nothing to share)
    assert all(r is None for r in shared) if family == "moe" else buckets > 1 or shared[0] is not None
    assert len(flat) == sum(r is not None for r in shared) and all((f is not None) == packed for f in flat)
    ref = naive(policy, batch, 0.7)
    assert torch.allclose(logp * mask, ref * mask, atol=1e-5)
    for ours, theirs in zip(grads(policy, logp, mask), grads(policy, naive(policy, batch, 0.7), mask)):
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)
    logits = policy.forward(batch.input_ids, batch.attention_mask, **batch.mm).logits  # (N, P+T, V)
    probs = (logits[:, batch.prompt_len - 1:-1] / 0.7).float().softmax(-1)  # the tempered distribution
    want = -(probs * probs.clamp_min(1e-30).log()).sum(-1)  # (N, T)
    assert torch.allclose(ent * mask, want * mask, atol=1e-4)
    assert (family == "moe") == bool(router) and all(v == v for v in router.values())


def test_trim_padding_cuts_only_columns_padded_in_every_row():
    policy = make_policy("dense", STOPS)
    torch.manual_seed(0)
    batch = hf_generate(policy, samples_for("dense", 3), RolloutConfig(max_new_tokens=24), n=2)
    longest = int(batch.lengths.max())
    sub = batch.select(batch.lengths.argsort()[:2])  # the two shortest rows
    cut, t = trim_padding(sub)
    assert t == int(sub.lengths.max()) < longest and cut.response_mask.shape[1] == t
    assert bool(cut.attention_mask[:, 0].any()) and cut.attention_mask.sum() == sub.attention_mask.sum()
    assert cut.input_ids.shape[1] == cut.prompt_len + t


def test_eqlen_segment_rows_keep_their_prefix_and_equal_the_naive_values():
    """EqLen rows train a segment [start, end) after an attended prefix: the cut keeps the prefix."""
    policy = make_policy("dense", STOPS)
    torch.manual_seed(2)
    batch = ROLLOUTS["eqlen"](policy, samples_for("dense", 2), RolloutConfig(name="eqlen", max_new_tokens=20,
                                                                               group_size=4), n=4)
    starts = (batch.response_mask.cumsum(1) == 0).sum(1)  # (N,) tokens before each row's segment
    assert bool((starts > 0).any())  # some rows are forks' segments
    logp = response_logprobs(policy, batch, 1.0, buckets=2)[0]
    mask = batch.response_mask
    assert torch.allclose(logp * mask, naive(policy, batch, 1.0) * mask, atol=1e-5)
