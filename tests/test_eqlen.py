"""EqLen rollout (arXiv 2604.17328, seqrl's reconstruction): unit invariants, exact coverage, fork caches, reduction
to the base algorithm when lengths are equal, and short end-to-end training runs on the three tiny families."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import compose, make_policy, samples_for, tiny_overrides
from seqrl.algorithms import compute_advantages, compute_policy_loss
from seqrl.algorithms.eqlen import build_batch, decode_samples, eqlen_rollout
from seqrl.algorithms.decode import warp_logits
from seqrl.algorithms.eqlen_decode import Trace, Track, Unit, _Pairing
from seqrl.algorithms.rollout import ROLLOUTS, cat_rollouts, hf_decode, hf_generate, response_logprobs
from seqrl.config import RolloutConfig, validate

STOPS = [2] + list(range(40, 50))  # eos plus ten characters: tracks end after ~10 tokens, so forks happen


@pytest.fixture(scope="module")
def forky():
    """A dense policy with frequent stop tokens, 3 prompts x 4 tracks, 20-token budget: one decoded trace."""
    policy = make_policy("dense", STOPS)
    samples = samples_for("dense", 3)
    cfg = RolloutConfig(name="eqlen", max_new_tokens=20, group_size=4)
    torch.manual_seed(1)
    forks: dict[int, torch.Tensor] = {}
    enc, trace = decode_samples(policy, samples, cfg, n=4, on_fork=lambda c, lg: forks.__setitem__(c, lg))
    return policy, samples, enc, trace, build_batch(policy, samples, enc, trace), forks


def coverage(batch, trace: Trace) -> torch.Tensor:
    """(n_tracks, T) how many rows train each token position of each track (rows: two per unit, in unit order)."""
    cov = torch.zeros(len(trace.tracks), trace.tokens.shape[1])
    for r, tid in enumerate(t for u in trace.units for t in (u.a, u.b)):
        cov[tid, : batch.response_mask.shape[1]] += batch.response_mask[r]
    return cov


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 1.0, 5), (0.9, 0.8, 20)])
def test_logit_warping_matches_hf_generate(temperature, top_p, top_k):
    from transformers import (LogitsProcessorList, SuppressTokensLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3  # (B, V)
    procs = [SuppressTokensLogitsProcessor([3, 7]), TemperatureLogitsWarper(temperature)]
    procs += [TopKLogitsWarper(top_k)] if top_k else []
    procs += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    expected = LogitsProcessorList(procs)(torch.zeros(6, 1, dtype=torch.long), logits.clone())
    suppress = torch.zeros(50, dtype=torch.bool)
    suppress[[3, 7]] = True
    assert torch.equal(warp_logits(logits, temperature, top_p, top_k, suppress), expected)


def test_pairing_bookkeeping_by_hand():
    """Pair (0, 1): 0 stops at 3 -> unit [0,3), fork 2 of 1; 2 stops at 5 -> unit [3,5), fork 3 of 1; 1 stops at 7
    -> unit [5,7); the fork budget (2) is spent, so 3 is cut at 7 (eqlen_unpaired=stop)."""
    p = _Pairing(n_prompts=1, n=2, max_forks=2, unpaired="stop")
    assert p.end({0: True}, 3) == ({0}, [(1, 2)])
    assert p.end({2: True}, 5) == ({2}, [(1, 3)])
    assert p.end({1: True}, 7) == ({1, 3}, [])
    assert [(u.a, u.b, u.start, u.end) for u in p.units] == [(0, 1, 0, 3), (1, 2, 3, 5), (1, 3, 5, 7)]
    assert [(t.start, t.parent, t.length, t.stopped) for t in p.tracks] == [
        (0, None, 3, True), (0, None, 7, True), (3, 1, 5, True), (5, 1, 7, False)]
    q = _Pairing(n_prompts=1, n=2, max_forks=0, unpaired="untrained")
    assert q.end({1: True}, 4) == ({1}, [])  # 0 decodes on alone
    assert q.end({0: False}, 9) == ({0}, []) and q.untrained == 5
    assert [(u.a, u.b, u.start, u.end) for u in q.units] == [(0, 1, 0, 4)]


def test_build_batch_rows_by_hand(forky):
    policy, samples = forky[0], forky[1][:1]
    enc = policy.encode_prompts([samples[0].prompt])
    tokens = torch.tensor([[11, 12, 2, 0, 0], [21, 22, 23, 24, 2], [21, 22, 33, 2, 0]])
    trace = Trace(tracks=[Track(0, length=3, stopped=True), Track(0, length=5, stopped=True),
                          Track(0, start=2, parent=1, length=4, stopped=True)],
                  units=[Unit(0, 1, 0, 3), Unit(1, 2, 2, 4)], tokens=tokens, forks=[1], seconds=0.5)
    b = build_batch(policy, samples, enc, trace)
    assert b.responses.tolist() == [[11, 12, 2, 0], [21, 22, 23, 0], [21, 22, 23, 24], [21, 22, 33, 2]]
    assert b.response_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert b.attention_mask[:, b.prompt_len:].tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1] * 4, [1] * 4]
    assert b.group_ids.tolist() == [0, 0, 1, 1] and b.full_lengths.tolist() == [3, 5, 5, 4]
    assert b.texts[1] == b.texts[2] == policy.tokenizer.decode([21, 22, 23, 24])
    assert b.metrics["eqlen/units_per_prompt"] == 2 and b.metrics["eqlen/forks"] == 1
    assert b.metrics["eqlen/segment_length/mean"] == 2.5
    assert b.metrics["eqlen/masked_token_frac"] == pytest.approx(4 / 14)  # prefix tokens re-scored as context
    assert b.metrics["perf/gen_tokens_per_s"] == (3 + 5 + 2) / 0.5


def test_units_have_equal_length_segments_and_identical_prefixes(forky):
    policy, samples, enc, trace, b, _ = forky
    assert sum(trace.forks) >= 3, "the fixture must exercise prefix inheritance"
    for u, unit in enumerate(trace.units):
        ra, rb = 2 * u, 2 * u + 1
        assert b.samples[ra] is b.samples[rb] and torch.equal(b.input_ids[ra, :b.prompt_len],
                                                                b.input_ids[rb, :b.prompt_len])
        assert torch.equal(b.response_mask[ra], b.response_mask[rb])  # same positions, so the same length
        seg = b.response_mask[ra].nonzero().squeeze(1)
        assert seg.tolist() == list(range(unit.start, unit.end))
        assert torch.equal(b.responses[ra, :unit.start], b.responses[rb, :unit.start])  # identical prefix
        ta, tb = trace.tracks[unit.a], trace.tracks[unit.b]
        if unit.start > 0:  # a forked unit: the fork of the other track, starting at the fork point
            assert tb.parent == unit.a and tb.start == unit.start
        assert min(ta.length, tb.length) == unit.end  # the shorter track ended here (or both were cut)
    for tid, tr in enumerate(trace.tracks):  # a fork's prefix is exactly its parent's
        if tr.parent is not None:
            assert torch.equal(trace.tokens[tid, :tr.start], trace.tokens[tr.parent, :tr.start])


def test_every_generated_token_is_trained_in_exactly_one_unit(forky):
    _, _, _, trace, b, _ = forky
    cov = coverage(b, trace)
    for tid, tr in enumerate(trace.tracks):
        expect = torch.zeros(trace.tokens.shape[1])
        expect[tr.start:tr.length] = 1
        assert torch.equal(cov[tid], expect), tid
    assert float(b.response_mask.sum()) == trace.generated
    assert b.metrics["eqlen/untrained_token_frac"] == 0.0


@pytest.mark.parametrize("max_forks,unpaired", [(0, "stop"), (1, "stop"), (0, "untrained"), (2, "untrained")])
def test_fork_budget_and_unpaired_remainders(forky, max_forks, unpaired):
    policy, samples = forky[0], forky[1]
    cfg = RolloutConfig(name="eqlen", max_new_tokens=20, group_size=4, eqlen_max_forks=max_forks,
                        eqlen_unpaired=unpaired)
    torch.manual_seed(2)
    enc, trace = decode_samples(policy, samples, cfg, n=4)
    b = build_batch(policy, samples, enc, trace)
    assert max(trace.forks) <= max_forks and len(trace.units) == 2 * len(samples) + sum(trace.forks)
    cov = coverage(b, trace)
    assert cov.max() == 1 and float(cov.sum()) == trace.generated - trace.untrained
    if unpaired == "stop":
        assert trace.untrained == 0
    else:  # a lone remainder decodes to its own end, untrained
        assert trace.untrained > 0 and b.metrics["eqlen/untrained_token_frac"] > 0
        assert bool((b.full_lengths > b.attention_mask[:, b.prompt_len:].sum(1)).any())


@pytest.mark.parametrize("algo", ["grpo", "gspo", "rloo"])
def test_masked_tokens_get_zero_gradient(forky, algo):
    policy, _, _, _, b, _ = forky
    logp = response_logprobs(policy, b, 1.0)[0].detach().requires_grad_(True)  # (N, T)
    rewards = torch.arange(len(b), dtype=torch.float32) % 3
    adv = compute_advantages(algo, rewards, b.group_ids)
    loss, _ = compute_policy_loss(algo, logp, logp.detach() - 0.01, adv, b.response_mask,
                                  ref_logp=logp.detach() + 0.02)  # grpo's KL term too
    loss.backward()
    assert torch.all(logp.grad[b.response_mask == 0] == 0)
    assert bool((logp.grad[b.response_mask == 1] != 0).any())


@pytest.mark.parametrize("family", ["dense", "moe", "vl"])
def test_fork_starts_with_the_parents_prefix_and_cache(family):
    policy = make_policy(family, STOPS)
    samples = samples_for(family, 2)
    forks: dict[int, torch.Tensor] = {}
    torch.manual_seed(3)
    enc, trace = decode_samples(policy, samples, RolloutConfig(max_new_tokens=16), n=4,
                                on_fork=lambda c, lg: forks.__setitem__(c, lg))
    assert forks, "no fork happened"
    b = build_batch(policy, samples, enc, trace)
    assert len(b) == 2 * len(trace.units)
    for child, logits in forks.items():
        tr = trace.tracks[child]
        prefix = trace.tokens[tr.parent, :tr.start]
        assert torch.equal(trace.tokens[child, :tr.start], prefix)
        p = tr.prompt
        ids = torch.cat([enc["input_ids"][p:p + 1], prefix[None]], 1)
        mask = torch.cat([enc["attention_mask"][p:p + 1], torch.ones(1, tr.start, dtype=torch.long)], 1)
        mm = {k: enc[k] for k in ("pixel_values", "image_grid_thw") if k in enc}  # one image per prompt
        if mm:
            mm = {"pixel_values": mm["pixel_values"].view(len(samples), -1, mm["pixel_values"].shape[-1])[p],
                  "image_grid_thw": mm["image_grid_thw"][p:p + 1]}
        with torch.no_grad():
            fresh = policy.forward(ids, mask, **mm).logits[0, -1]
        torch.testing.assert_close(logits, fresh, atol=1e-5, rtol=0)
    logp = response_logprobs(policy, b, 1.0)[0]  # every trained token was sampled with positive probability
    assert torch.isfinite(logp[b.response_mask.bool()]).all()


@pytest.mark.parametrize("algo", ["grpo", "gspo", "rloo"])
def test_equal_lengths_reduce_exactly_to_the_base_algorithm_on_pairs(algo):
    policy = make_policy("dense")
    policy.model.generation_config.suppress_tokens = policy.stop_token_ids  # every response runs to the budget
    samples = samples_for("dense", 3)
    cfg = RolloutConfig(name="eqlen", max_new_tokens=12, group_size=4)
    torch.manual_seed(4)
    eq = eqlen_rollout(policy, samples, cfg, n=4)
    torch.manual_seed(4)
    std = hf_decode(policy, samples, cfg, n=4)
    assert eq.metrics["eqlen/forks"] == 0 and eq.metrics["eqlen/units_per_prompt"] == 2
    assert torch.equal(eq.input_ids, std.input_ids)  # same sampler and RNG stream as the standard rollout
    assert torch.equal(eq.response_mask, std.response_mask) and torch.equal(eq.attention_mask, std.attention_mask)
    pairs = torch.arange(len(std)) // 2
    assert torch.equal(eq.group_ids, pairs)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    losses = []
    for batch in (eq, std):
        logp = response_logprobs(policy, batch, 1.0)[0]
        old = logp.detach() + 0.05 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(0))
        losses.append(compute_policy_loss(algo, logp, old, compute_advantages(algo, rewards, pairs),
                                          batch.response_mask, ref_logp=old - 0.1)[0])
    assert torch.equal(losses[0], losses[1])


def test_metrics_survive_the_module_concatenation_and_bad_input_fails(forky):
    policy, samples = forky[0], forky[1]
    b = ROLLOUTS["eqlen"](policy, samples, RolloutConfig(name="eqlen", max_new_tokens=8, group_size=2), n=2)
    merged = cat_rollouts([b], policy.pad_token_id)
    for key in ("eqlen/units_per_prompt", "eqlen/segment_length/mean", "eqlen/segment_length/min",
                "eqlen/segment_length/max", "eqlen/forks", "eqlen/masked_token_frac", "perf/gen_tokens_per_s"):
        assert merged.metrics[key] == b.metrics[key]
    with pytest.raises(ValueError, match="n=3"):
        eqlen_rollout(policy, samples, RolloutConfig(), n=3)
    with pytest.raises(ValueError, match="rollout.group_size=5"):
        validate(compose("train", ["rollout=eqlen", "rollout.group_size=5"]))
    with pytest.raises(ValueError, match="rollout.eqlen_unpaired='drop'"):
        RolloutConfig(eqlen_unpaired="drop")
    with pytest.raises(ValueError, match="rollout.eqlen_max_forks=-1"):
        RolloutConfig(eqlen_max_forks=-1)


E2E_SLOW = [(f, a) for f in ("dense", "moe", "vl") for a in ("grpo", "gspo", "rloo") if (f, a) != ("dense", "gspo")]


def _train_two_steps(tmp_path, family, algo, *extra):
    from seqrl.train import run_name, train

    extra = ["rollout=eqlen", f"algorithm={algo}", f"model=tiny_{family}", *extra]
    extra += ["data=image_count"] if family == "vl" else []
    cfg = compose("train", tiny_overrides(tmp_path, *extra))
    results = train(cfg)
    assert results["rl_steps"] == 2 and results["run_name"] == run_name(cfg) == f"{algo}+eqlen"
    m = results["train"]
    assert m["eqlen/units_per_prompt"] >= 2 and m["eqlen/segment_length/min"] >= 1 and m["perf/gen_tokens_per_s"] > 0
    assert m["eqlen/segment_length/max"] <= 24 and torch.isfinite(torch.tensor(m["train/loss"]))


def test_train_two_steps_with_eqlen(tmp_path):
    """seqrl-train experiment=smoke rollout=eqlen algorithm=gspo, 2 steps (no warm-up: seconds, not minutes)."""
    _train_two_steps(tmp_path, "dense", "gspo", "warmup.enabled=false")


@pytest.mark.slow
@pytest.mark.parametrize("family,algo", E2E_SLOW)
def test_train_two_steps_with_eqlen_all_combinations(tmp_path, family, algo):
    """The other algorithm x family pairs, with the smoke experiment's (cached) warm-up, so tracks end and fork."""
    _train_two_steps(tmp_path, family, algo)
