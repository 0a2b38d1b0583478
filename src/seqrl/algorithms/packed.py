"""Scoring the responses of a llama-style decoder without computing on their padding.

After the shared prompt forward (`scoring._shared_prompts`: each distinct prompt once, its KV cache repeated to its
rows), the responses run through the decoder layers as one flat list of their R real tokens, not as an (N, T)
batch padded to the longest: the norms, projections, rotary embedding and MLP see R rows. Only the attention needs
rows: queries, keys and values are scattered into (N, T) (zeros under padding), attend over [prompt | response]
with SDPA (prompt padding masked, causal over the response), and the output is gathered back to the R tokens. The
language-model head runs on the R - N tokens that predict a next response token. With 20-40% of response slots
padding in a typical RL batch (responses end at different lengths) this cuts that share of the token-wise work.

The layer arithmetic is `seqrl.algorithms.layers` (the model's weights and rotary cos/sin; fused q|k|v and
gate|up GEMMs, joint q/k norm and rotary embedding, residuals inside the GEMMs), on the layouts of
`seqrl.algorithms.fastdecode.supported`. Values and gradients equal the transformers forward's up to float
rounding (tests/test_logprobs.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from seqrl.algorithms.fastdecode import supported
from seqrl.algorithms.layers import FusedLayer, add_linear, rms_norm, signed_sin


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
    flat = rows * live.shape[1] + cols  # (R,) index into (N * T)
    N, T = responses.shape
    P = prompt_mask.shape[1]
    h = decoder.embed_tokens(responses[rows, cols])  # (R, d)
    cos, sin = decoder.rotary_emb(h, positions[..., rows, cols].unsqueeze(-2))  # (1, R, head_dim)
    cos, sin = cos[0].unsqueeze(1), signed_sin(sin[0]).unsqueeze(1)  # (R, 1, head_dim): broadcast over heads
    causal = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
    mask = torch.cat([prompt_mask.bool()[:, None, None, :].expand(N, 1, T, P), causal.expand(N, 1, T, T)], -1)
    for layer, fused, kv in zip(decoder.layers, FusedLayer.of(decoder), cache.layers):
        q, k, v = (_pad(z, rows, cols, N, T) for z in fused.attention_inputs(h, cos, sin))  # (N, heads, T, dim)
        keys, values = torch.cat([kv.keys, k], 2), torch.cat([kv.values, v], 2)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=layer.self_attn.scaling,
                                             enable_gqa=q.shape[1] != keys.shape[1])  # (N, heads, T, head_dim)
        h = add_linear(h, out.transpose(1, 2).reshape(N * T, -1).index_select(0, flat), layer.self_attn.o_proj)
        h = fused.mlp_residual(h)
    return rms_norm(decoder.norm, h), rows, cols


def _pad(flat: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, N: int, T: int) -> torch.Tensor:
    """(R, heads, head_dim) tokens -> (N, heads, T, head_dim), zeros where no token is."""
    out = flat.new_zeros(N, T, *flat.shape[1:])
    return out.index_put((rows, cols), flat).transpose(1, 2)
