"""Forwards of a llama-style decoder over the real tokens only: prompts (`prefill`) and responses after them
(`packed_responses`), without computing on padding or going through the transformers forward's per-call work.

The tokens run through the decoder layers as one flat list of their R real tokens, not as an (N, T) batch padded
to the longest: the norms, projections, rotary embedding and MLP see R rows. Only the attention needs rows:
queries, keys and values are scattered into (N, T) (zeros under padding), attend with SDPA, and the output is
gathered back to the R tokens.

- `prefill`: left-padded prompts, causal attention over each prompt's real tokens. Returns the last position's
  next-token logits and the KV cache (a transformers DynamicCache; zeros at padded positions, which every later
  attention masks) for the decoding loop and for scoring's shared prompt forward. Models this file does not
  implement (MoE blocks, images, other layouts) take the transformers forward.
- `packed_responses`: after the shared prompt (`scoring._shared_prompts`: each distinct prompt once, its cache
  repeated to its rows), the responses attend over [prompt | response] (prompt padding masked, causal over the
  response); the language-model head then runs on the R - N tokens that predict a next response token. With
  20-40% of response slots padding in a typical RL batch this cuts that share of the token-wise work.

The layer arithmetic is `seqrl.algorithms.layers` (the model's weights and rotary cos/sin; fused q|k|v and
gate|up GEMMs, joint q/k norm and rotary embedding, residuals inside the GEMMs), on the layouts of
`seqrl.algorithms.fastdecode.supported`. Values and gradients equal the transformers forward's up to float
rounding (tests/test_logprobs.py, tests/test_decode.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from seqrl.algorithms.fastdecode import supported
from seqrl.algorithms.layers import FusedLayer, add_linear, is_dense_mlp, rms_norm, signed_sin


def prefill(model, ids: torch.Tensor, mask: torch.Tensor, kw: dict, packed: bool = True) -> tuple[torch.Tensor, object]:
    """Next-token logits (B, V) at the last position of left-padded prompts ids/mask (B, P) and their KV cache.
    kw: the prompt forward's kwargs (`decode.prompt_inputs`); with only positions in it, a supported decoder of
    dense MLPs and `packed`, the packed layers run, else the transformers forward."""
    decoder = model.get_decoder()
    if packed and set(kw) == {"position_ids"} and supported(model, decoder) and all(
            is_dense_mlp(layer.mlp) for layer in decoder.layers):
        live = mask.bool()
        rows, cols = live.nonzero(as_tuple=True)  # (R,) row-major
        P = ids.shape[1]
        diagonal = torch.eye(P, dtype=torch.bool, device=ids.device)  # a padded query attends to itself: no empty row
        attend = torch.ones_like(diagonal).tril() & (live[:, None, :] | diagonal)  # (B, P, P)
        hidden, kv = _layers(decoder, ids[rows, cols], rows, cols, ids.shape, kw["position_ids"], attend[:, None])
        cache = DynamicCache()
        for i, (k, v) in enumerate(kv):
            cache.update(k, v, i)
        return model.lm_head(hidden[live.sum(1).cumsum(0) - 1]), cache  # each prompt's last real token
    out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **kw)
    return out.logits[:, -1], out.past_key_values


def packed_responses(model, cache, responses: torch.Tensor, live: torch.Tensor, prompt_mask: torch.Tensor,
                     positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Hidden states of the real response tokens after the final norm, and their (row, column) index.

    cache: the prompt forward's cache, repeated to the N rows (keys/values (N, kv_heads, P, head_dim) per layer);
    responses (N, T) token ids; live (N, T) bool, the attended response tokens (a prefix of each row);
    prompt_mask (N, P) the prompts' attention mask; positions (N, T) or (3, N, T) (mrope) of the response tokens.
    Returns (hidden (R, d), rows (R,), cols (R,)) or None when the model's layout is not a supported one.
    """
    decoder = model.get_decoder()
    if not supported(model, decoder) or len(cache.layers) != len(decoder.layers):
        return None
    rows, cols = live.nonzero(as_tuple=True)  # (R,) row-major: each row's tokens in order
    N, T = responses.shape
    P = prompt_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=responses.device).tril()
    attend = torch.cat([prompt_mask.bool()[:, None, None, :].expand(N, 1, T, P), causal.expand(N, 1, T, T)], -1)
    prefix = [(layer.keys, layer.values) for layer in cache.layers]
    hidden, _ = _layers(decoder, responses[rows, cols], rows, cols, (N, T), positions, attend, prefix)
    return hidden, rows, cols


def _layers(decoder, tokens, rows, cols, shape, positions, attend, prefix=None):
    """The real tokens (R,) at (rows, cols) of an (N, T) layout through the decoder layers.

    positions (N, T) or (3, N, T); attend (N, 1, T, S) bool, S = T (+ the prefix's length); prefix: per layer
    (keys, values) (N, kv_heads, P, head_dim) attended before the tokens. Returns (hidden after the final norm
    (R, d), per layer (keys, values) (N, kv_heads, T, head_dim) of the tokens, zeros under padding).
    """
    N, T = shape
    flat = rows * T + cols  # (R,) index into (N * T)
    h = decoder.embed_tokens(tokens)  # (R, d)
    cos, sin = decoder.rotary_emb(h, positions[..., rows, cols].unsqueeze(-2))  # (1, R, head_dim)
    cos, sin = cos[0].unsqueeze(1), signed_sin(sin[0]).unsqueeze(1)  # (R, 1, head_dim): broadcast over heads
    kv = []
    for i, (layer, fused) in enumerate(zip(decoder.layers, FusedLayer.of(decoder))):
        q, k, v = (_pad(z, rows, cols, N, T) for z in fused.attention_inputs(h, cos, sin))  # (N, heads, T, dim)
        kv.append((k, v))
        keys, values = (k, v) if prefix is None else (torch.cat([prefix[i][0], k], 2),
                                                       torch.cat([prefix[i][1], v], 2))
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attend, scale=layer.self_attn.scaling,
                                             enable_gqa=q.shape[1] != keys.shape[1])  # (N, heads, T, head_dim)
        h = add_linear(h, out.transpose(1, 2).reshape(N * T, -1).index_select(0, flat), layer.self_attn.o_proj)
        h = fused.mlp_residual(h)
    return rms_norm(decoder.norm, h), kv


def _pad(flat: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, N: int, T: int) -> torch.Tensor:
    """(R, heads, head_dim) tokens -> (N, heads, T, head_dim), zeros where no token is."""
    out = flat.new_zeros(N, T, *flat.shape[1:])
    return out.index_put((rows, cols), flat).transpose(1, 2)
