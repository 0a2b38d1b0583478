"""seqrl's KV-cached decoding loop (engine `hf`, the default) against transformers' own `generate()` (engine
`hf_generate`): the same tokens greedily on the three tiny families with rows ending at different steps, the same
samples for the same RNG state while no compaction happens, and the same batch layout (prompts, masks, images)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import make_policy, samples_for
from seqrl.algorithms import decode as decode_mod
from seqrl.algorithms.rollout import ENGINES, ROLLOUTS, generate, hf_decode, hf_generate
from seqrl.config import RolloutConfig

STOPS = [2] + list(range(40, 50))  # eos plus ten characters: rows end after ~10 tokens, at different steps


def assert_same_batch(a, b) -> None:
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.attention_mask, b.attention_mask) and torch.equal(a.response_mask, b.response_mask)
    assert a.prompt_len == b.prompt_len and torch.equal(a.group_ids, b.group_ids)
    assert a.texts == b.texts and torch.equal(a.truncated, b.truncated)
    assert a.mm.keys() == b.mm.keys() and all(torch.equal(a.mm[k], b.mm[k]) for k in a.mm)
    assert [s.prompt for s in a.samples] == [s.prompt for s in b.samples]


def stops_from_a_first_pass(policy, samples, cfg, n: int) -> None:
    """Make greedy rows end at different steps: perturb the weights (varied greedy text), then add the stop token
    whose first occurrence varies most across the rows of a first greedy pass."""
    torch.manual_seed(1)
    for param in policy.model.parameters():  # a random-init model repeats one token greedily: perturb it
        param.data.add_(0.2 * torch.randn_like(param))
    first = hf_generate(policy, samples, cfg, n=n, greedy=True).responses  # (N, T)

    def ends(tok: int) -> set[int]:
        hits = (first == tok).int()
        return {int(h.argmax()) if h.any() else first.shape[1] for h in hits}

    best = max(set(first[:, 1:].flatten().tolist()), key=lambda tok: len(ends(tok)))
    policy.model.generation_config.eos_token_id = [policy.eos_token_id, best]


@pytest.mark.parametrize("family", ["dense", "moe", "vl"])
def test_greedy_tokens_equal_generate_with_rows_ending_early(family):
    policy = make_policy(family)
    samples = samples_for(family, 3)
    cfg = RolloutConfig(max_new_tokens=24)
    stops_from_a_first_pass(policy, samples, cfg, n=2)
    ours = hf_decode(policy, samples, cfg, n=2, greedy=True)
    theirs = hf_generate(policy, samples, cfg, n=2, greedy=True)
    assert_same_batch(ours, theirs)
    lengths = ours.lengths.tolist()
    assert len(set(lengths)) > 1 and min(lengths) < 24, lengths  # rows really ended early, at different steps


@pytest.mark.parametrize("family", ["dense", "vl"])
def test_samples_equal_generate_for_the_same_rng_state_without_compaction(family, monkeypatch):
    """Same warping arithmetic and, with generate()'s draw swapped in, the same RNG draws (finished rows keep
    drawing until a compaction), so the same tokens."""
    monkeypatch.setattr(decode_mod, "COMPACT_FRAC", 1.0)  # never compact: the batch shape generate() samples from
    monkeypatch.setattr(decode_mod, "draw", decode_mod.multinomial_draw)
    policy = make_policy(family, STOPS)
    samples = samples_for(family, 2)
    for cfg in (RolloutConfig(max_new_tokens=20), RolloutConfig(max_new_tokens=20, temperature=0.7, top_p=0.9,
                                                                    top_k=20)):
        torch.manual_seed(3)
        ours = hf_decode(policy, samples, cfg, n=4)
        torch.manual_seed(3)
        theirs = hf_generate(policy, samples, cfg, n=4)
        assert_same_batch(ours, theirs)


def test_compaction_drops_finished_rows_and_keeps_each_rows_tokens(monkeypatch):
    """With compaction on, every row's greedy tokens are still its own (rows move inside the cache)."""
    calls = []
    original = decode_mod.DecodeRows.select
    monkeypatch.setattr(decode_mod.DecodeRows, "select", lambda self, idx: (calls.append(len(idx)),
                                                                             original(self, idx))[1])
    policy = make_policy("dense")
    samples = samples_for("dense", 4)
    cfg = RolloutConfig(max_new_tokens=32)
    stops_from_a_first_pass(policy, samples, cfg, n=4)
    ours = hf_decode(policy, samples, cfg, n=4, greedy=True)
    assert calls and min(calls) < 16  # the batch shrank at least once
    assert_same_batch(ours, hf_generate(policy, samples, cfg, n=4, greedy=True))


def test_engine_dispatch_and_training_mode_restored(monkeypatch):
    monkeypatch.setattr(decode_mod, "draw", decode_mod.multinomial_draw)
    policy = make_policy("dense")
    policy.model.train()
    samples = samples_for("dense", 1)
    torch.manual_seed(0)
    a = ROLLOUTS["standard"](policy, samples, RolloutConfig(max_new_tokens=6, engine="hf"), n=2)
    torch.manual_seed(0)
    b = generate(policy, samples, RolloutConfig(max_new_tokens=6, engine="hf_generate"), n=2)
    assert policy.model.training and torch.equal(a.input_ids, b.input_ids)
    assert set(ENGINES) == {"hf", "hf_generate", "vllm"}
    with pytest.raises(ValueError, match=r"rollout.engine.*'tgi'.*allowed: hf, hf_generate, vllm"):
        RolloutConfig(engine="tgi")


@pytest.mark.parametrize("copy", [True, False])  # q|k|v and gate|up on concatenated weight copies, or not
@pytest.mark.parametrize("family", ["dense", "moe", "vl"])
def test_fast_decoder_steps_give_the_transformers_forward_logits(family, copy, monkeypatch):
    """FastDecoder (slab cache, own attention) against the model's forward on its DynamicCache, fed the same tokens:
    left-padded prompts, images (vl), a compaction that drops and duplicates rows, an EqLen-style row copy, and
    more steps than the slab's room (it grows)."""
    from seqrl.algorithms import layers
    from seqrl.algorithms.decode import DecodeRows
    from seqrl.algorithms.rollout import _encode

    monkeypatch.setattr(layers, "FUSE_MAX_BYTES", layers.FUSE_MAX_BYTES if copy else 0)

    policy = make_policy(family)
    samples = [dataclasses.replace(s, prompt=s.prompt + " ok" * i) for i, s in enumerate(samples_for(family, 3))]
    enc = _encode(policy, samples)
    assert bool((enc["attention_mask"] == 0).any())  # prompts of different lengths: left padding to mask
    with torch.no_grad():
        fast, slow = (DecodeRows(policy.model, enc, policy.family, n=2, room=3, fast=f) for f in (True, False))
        assert fast.fast is not None and slow.fast is None and all(f.copied == copy for f in fast.fast.fused)
        gen = torch.Generator().manual_seed(0)
        for t in range(7):
            torch.testing.assert_close(fast.logits, slow.logits, rtol=1e-5, atol=1e-5)
            tok = torch.randint(3, fast.logits.shape[-1], (len(fast.track),), generator=gen)
            if t == 2:
                keep = torch.tensor([4, 0, 0, 5, 2])  # drop rows 1 and 3, duplicate row 0
                for rows in (fast, slow):
                    rows.select(keep)
                tok = tok[keep]
            if t == 4:
                for rows in (fast, slow):
                    rows.track[1] = -1
                    rows.fork([int(rows.track[3])], [99])  # the freed slot 1 becomes a copy of slot 3
            fast.step(policy.model, tok)
            slow.step(policy.model, tok)


@pytest.mark.parametrize("family", ["dense", "moe", "vl"])
def test_fast_decoder_in_bfloat16_gives_the_transformers_forward_logits_to_a_bf16_ulp(family):
    """Real checkpoints decode in bfloat16: the padding bias, fused weight copies and norms follow the model's dtype
    (a float32 bias once broke the scores' baddbmm), and the logits stay within ~2 ulps (1/64 near 1) of the
    transformers forward's, whose roundings differ."""
    from seqrl.algorithms.decode import DecodeRows
    from seqrl.algorithms.rollout import _encode

    policy = make_policy(family)
    policy.model.to(torch.bfloat16)
    enc = _encode(policy, [dataclasses.replace(s, prompt=s.prompt + " ok" * i)
                           for i, s in enumerate(samples_for(family, 2))])
    with torch.no_grad():
        fast, slow = (DecodeRows(policy.model, enc, policy.family, n=2, room=3, fast=f) for f in (True, False))
        for _ in range(5):
            assert fast.logits.dtype == torch.bfloat16
            torch.testing.assert_close(fast.logits.float(), slow.logits.float(), rtol=0, atol=1 / 64)
            tok = slow.logits.argmax(-1)
            fast.step(policy.model, tok)
            slow.step(policy.model, tok)


def test_fast_decoder_only_for_the_layouts_it_implements():
    from seqrl.algorithms.fastdecode import FastDecoder

    policy = make_policy("dense")
    out = policy.model(input_ids=torch.tensor([[5, 6]]), use_cache=True)
    mask = torch.ones(1, 2, dtype=torch.long)
    assert FastDecoder.build(policy.model, out.past_key_values, mask, 4) is not None
    policy.model.config.model_type = "gemma2"  # soft-capping, sliding windows: the transformers forward
    assert FastDecoder.build(policy.model, out.past_key_values, mask, 4) is None
    policy.model.config.model_type = "qwen3"
    policy.model.get_decoder().layers[0].self_attn.sliding_window = 16
    assert FastDecoder.build(policy.model, out.past_key_values, mask, 4) is None
    policy.model.get_decoder().layers[0].self_attn.sliding_window = None
    attn = policy.model.get_decoder().layers[0].self_attn
    attn.k_norm.variance_epsilon = attn.q_norm.variance_epsilon * 2  # the step normalises q and k in one call
    assert FastDecoder.build(policy.model, out.past_key_values, mask, 4) is None
    attn.k_norm.variance_epsilon = attn.q_norm.variance_epsilon
    policy.model.config.attention_dropout = 0.1  # the transformers forward applies it in training mode
    assert FastDecoder.build(policy.model, out.past_key_values, mask, 4) is None


@pytest.mark.parametrize("family", ["dense", "vl"])
def test_rollout_token_entropy_is_the_training_forward_entropy(family):
    """RolloutBatch.token_entropy (what the engine saw when sampling) equals the entropy the scoring forward
    computes on the same responses, at a temperature != 1; greedy decoding records none."""
    from seqrl.algorithms.rollout import response_logprobs

    policy = make_policy(family, STOPS)
    for cfg in (RolloutConfig(max_new_tokens=12, temperature=0.7),  # read off the sampling probabilities
                RolloutConfig(max_new_tokens=12, temperature=0.7, top_k=20)):  # computed apart from the warped ones
        torch.manual_seed(0)
        roll = hf_decode(policy, samples_for(family, 2), cfg, n=3)
        with torch.no_grad():
            _, ent, _ = response_logprobs(policy, roll, 0.7, entropy=True)
        mask = roll.response_mask.bool()
        torch.testing.assert_close(roll.token_entropy[mask], ent[mask], rtol=1e-4, atol=1e-5)
        assert bool((roll.token_entropy[~mask] == 0).all())
    assert hf_decode(policy, samples_for(family, 1), cfg, n=1, greedy=True).token_entropy is None


def test_inverse_cdf_draw_samples_the_distribution_and_never_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0], [0.1, 0.0, 0.0, 0.0, 0.0, 0.9]])
    torch.manual_seed(0)
    n = 40_000
    tokens = decode_mod.inverse_cdf_draw(probs.repeat(n, 1)).view(n, 2)  # (n, 2)
    for row in range(2):
        freq = torch.bincount(tokens[:, row], minlength=6).double() / n
        assert torch.all(freq[probs[row] == 0] == 0)
        sigma = (probs[row].double() * (1 - probs[row].double()) / n).sqrt()
        assert torch.all((freq - probs[row].double()).abs() <= 5 * sigma + 1e-12), (row, freq)
    torch.manual_seed(0)
    assert torch.equal(decode_mod.inverse_cdf_draw(probs.repeat(n, 1)).view(n, 2), tokens)  # seed fixes it


def test_inverse_cdf_draw_falls_back_to_the_last_positive_token_when_u_rounds_up(monkeypatch):
    probs = torch.tensor([[0.25, 0.75, 0.0], [1.0, 0.0, 0.0]])
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.ones(*shape, dtype=kw.get("dtype")))  # u = total
    assert decode_mod.inverse_cdf_draw(probs).tolist() == [1, 0]
