"""`seqrl.algorithms.layers`: the layer arithmetic shared by the decoding step and the packed scoring forward equals
the modelling files' (rotary embedding to the bit, RMSNorm and its hand-written backward, the fused projections
with and without weight copies, the residual inside the GEMM)."""
from __future__ import annotations

import importlib

import pytest
import torch

from conftest import make_policy
from seqrl.algorithms import layers
from seqrl.algorithms.fastdecode import SUPPORTED


@pytest.mark.parametrize("model_type", sorted(SUPPORTED - {"qwen2_5_vl_text"}))  # its file: qwen2_5_vl
def test_rope_is_each_supported_modelling_files_apply_rotary_pos_emb_to_the_bit(model_type):
    modelling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 4, 5, 16, generator=gen), torch.randn(3, 2, 5, 16, generator=gen)  # (B, heads, T, dim)
    cos, sin = torch.randn(3, 5, 16, generator=gen), torch.randn(3, 5, 16, generator=gen)
    want_q, want_k = modelling.apply_rotary_pos_emb(q, k, cos, sin)
    c, s = cos.unsqueeze(1), layers.signed_sin(sin).unsqueeze(1)
    assert torch.equal(layers.rope(q, c, s), want_q) and torch.equal(layers.rope(k, c, s), want_k)


@pytest.mark.parametrize("weight_shape", [(8,), (3, 8)])  # one weight per feature; one row per head (q|k norms)
def test_rms_norm_values_and_hand_written_backward_equal_autograd_through_the_module_formula(weight_shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 8, generator=gen, requires_grad=True)
    w = torch.randn(*weight_shape, generator=gen, requires_grad=True)
    dy = torch.randn(5, 3, 8, generator=gen)
    formula = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))  # Llama/Qwen RMSNorm in float32
    ours = layers.norm(x, w, 1e-6)
    assert ours.grad_fn is not None and type(ours.grad_fn).__name__ == "_RMSNormBackward"
    torch.testing.assert_close(ours, formula)
    for a, b in zip(torch.autograd.grad(ours, (x, w), dy), torch.autograd.grad(formula, (x, w), dy)):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            got = layers.norm(x.to(dtype), w.to(dtype), 1e-6)
            want = w.to(dtype) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)  # the cast
            assert got.dtype == dtype
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize("family", ["dense", "vl"])  # q/k norms, no biases (Qwen3); q/k/v biases (Qwen2.5-VL)
def test_fused_layer_equals_the_modules_with_and_without_weight_copies(family, copy, monkeypatch):
    monkeypatch.setattr(layers, "FUSE_MAX_BYTES", layers.FUSE_MAX_BYTES if copy else 0)
    decoder = make_policy(family).model.get_decoder()
    layer, fused = decoder.layers[0], layers.FusedLayer.of(decoder)[0]
    attn, dim = layer.self_attn, layer.self_attn.head_dim
    assert fused.copied == copy
    h = torch.randn(2, 7, decoder.config.hidden_size)
    cos, sin = decoder.rotary_emb(h, torch.arange(7)[None].expand(2, 7))  # (2, 7, dim)
    q, k, v = fused.attention_inputs(h, cos.unsqueeze(2), layers.signed_sin(sin).unsqueeze(2))  # (2, 7, heads, dim)
    x = layer.input_layernorm(h)
    want = [attn.q_proj(x).unflatten(-1, (-1, dim)), attn.k_proj(x).unflatten(-1, (-1, dim))]
    if hasattr(attn, "q_norm"):
        want = [attn.q_norm(want[0]), attn.k_norm(want[1])]
    rope = importlib.import_module(type(attn).__module__).apply_rotary_pos_emb
    want = [z.transpose(1, 2) for z in rope(want[0].transpose(1, 2), want[1].transpose(1, 2), cos, sin)]
    for got, ref in zip((q, k, v), (*want, attn.v_proj(x).unflatten(-1, (-1, dim)))):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.mlp_residual(h), h + layer.mlp(layer.post_attention_layernorm(h)),
                               rtol=1e-5, atol=1e-6)


def test_add_linear_puts_the_residual_in_the_gemm_or_adds_it_after_a_bias():
    gen = torch.Generator().manual_seed(0)
    h, x = torch.randn(4, 1, 6, generator=gen), torch.randn(4, 1, 5, generator=gen)
    for bias in (False, True):
        linear = torch.nn.Linear(5, 6, bias=bias)
        torch.testing.assert_close(layers.add_linear(h, x, linear), h + linear(x))


@pytest.mark.parametrize("family", ["dense", "moe"])
def test_prefill_runs_the_packed_layers_on_dense_decoders_with_the_transformers_values(family, monkeypatch):
    """Left-padded prompts: the last position's logits and the cache at real positions equal the transformers
    forward's (padded positions hold zeros, masked by every later attention); an MoE decoder takes the forward."""
    from seqrl.algorithms.decode import prompt_inputs
    from seqrl.algorithms.packed import prefill

    model = make_policy(family).model
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (torch.arange(5) >= torch.tensor([[2], [0]])).long()  # row 0 left-padded by 2
    kw = prompt_inputs(model, family, {"input_ids": ids, "attention_mask": mask})
    kw.pop("output_router_logits", None)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, use_cache=True, **kw)
        calls = []
        monkeypatch.setattr(type(model), "forward", lambda *a, **k: calls.append(1) or want)  # counts forwards
        logits, cache = prefill(model, ids, mask, kw)
    assert len(calls) == (family == "moe")
    torch.testing.assert_close(logits, want.logits[:, -1], rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(cache.layers, want.past_key_values.layers):
        for a, b in ((ours.keys, theirs.keys), (ours.values, theirs.values)):
            real = mask.bool()[:, None, :, None].expand_as(b)
            torch.testing.assert_close(a[real], b[real], rtol=1e-5, atol=1e-5)
            assert family == "moe" or bool((a[~real] == 0).all())
