"""A decoding step for llama-style decoders without the transformers forward's per-call machinery.

One token per row through a pre-norm decoder (RMSNorm -> q/k/v projections (+ optional per-head q/k norms) ->
rotary embedding -> grouped-query attention -> o_proj -> residual -> RMSNorm -> MLP or MoE block -> residual), as
Llama, Mistral (no sliding window), Qwen2, Qwen3, Qwen3-MoE and Qwen2.5-VL's text decoder define it, with the
layer arithmetic of `seqrl.algorithms.layers` (fused q|k|v and gate|up GEMMs, joint q/k norm and rotary
embedding, residuals inside the GEMMs; the model's weights, rotary cos/sin, MoE blocks and LM head). Ours:

- keys/values live in a pre-allocated slab (rows, kv_heads, capacity, head_dim) per layer: a step writes one
  position in place (transformers' DynamicCache concatenates the whole cache every step);
- attention of the single query is two batched matmuls over the filled part, with the query heads of one
  key/value head side by side (no repeated keys), the scale and an additive bias for the prompts' left padding
  inside the first (`baddbmm`), softmax in float32 as the eager attention does.

The logits equal the transformers forward's up to float rounding (tests/test_decode.py: 1e-5 on dense, moe and
vl). Any other model (sliding windows, soft-capping, other layer layouts, flash/flex attention) keeps the
transformers forward: `FastDecoder.build` returns None. `supported` is shared with `seqrl.algorithms.packed`.
"""
from __future__ import annotations

import torch
from torch.distributed.fsdp import FSDPModule

from seqrl.algorithms.layers import FusedLayer, add_linear, rms_norm, signed_sin

SUPPORTED = {"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "qwen2_5_vl", "qwen2_5_vl_text"}
STATIC_ROPE = {"default", "linear", "llama3", "yarn"}  # cos/sin of a position do not depend on the sequence length


def supported(model, decoder) -> bool:
    """Whether `decoder` (model.get_decoder()) has the layout implemented here."""
    config = decoder.config
    if getattr(model.config, "model_type", None) not in SUPPORTED or not hasattr(decoder, "rotary_emb"):
        return False
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        return False
    if config._attn_implementation not in ("sdpa", "eager") or getattr(config, "pretraining_tp", 1) != 1:
        return False
    if getattr(config, "attention_dropout", 0.0):  # training-mode dropout is the transformers forward's to apply
        return False
    for layer in decoder.layers:
        if isinstance(layer, FSDPModule):  # its parameters are gathered by its own forward, which is not called here
            return False
        attn = layer.self_attn
        if getattr(attn, "sliding_window", None) is not None or not all(
                hasattr(attn, k) for k in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")):
            return False
        if not all(hasattr(layer, k) for k in ("input_layernorm", "post_attention_layernorm", "mlp")):
            return False
        norms = [layer.input_layernorm, layer.post_attention_layernorm, *(getattr(attn, k, None) for k in (
            "q_norm", "k_norm"))]
        if not all(_is_rms_norm(n) for n in norms if n is not None):
            return False
        if hasattr(attn, "q_norm") and attn.q_norm.variance_epsilon != attn.k_norm.variance_epsilon:
            return False  # the step normalises queries and keys in one call
    return _is_rms_norm(decoder.norm)


def _is_rms_norm(module) -> bool:
    """A Llama/Qwen-style RMSNorm: `weight * normalised x`, eps in `variance_epsilon` (not Gemma's 1 + weight)."""
    name = type(module).__name__
    return name.endswith("RMSNorm") and "Gemma" not in name and hasattr(module, "variance_epsilon")


class FastDecoder:
    """Decoding state of a supported model: the slab KV cache, the padding bias, and the step."""

    def __init__(self, model, decoder, cache, mask: torch.Tensor, room: int, repeat: int):
        self.model, self.decoder = model, decoder
        self.filled = mask.shape[1]
        capacity = self.filled + room
        self.kv = []
        for layer in cache.layers:  # (prompts, kv_heads, P, head_dim) each
            bufs = []
            for x in (layer.keys, layer.values):
                buf = x.new_empty(x.shape[0] * repeat, x.shape[1], capacity, x.shape[-1])
                buf.view(x.shape[0], repeat, *buf.shape[1:])[:, :, :, :self.filled] = x.unsqueeze(1)  # one copy
                bufs.append(buf)
            self.kv.append(bufs)
        self.kv_heads = self.kv[0][0].shape[1]
        bias = torch.zeros(mask.shape[0], capacity, device=mask.device, dtype=self.kv[0][0].dtype)  # additive
        bias[:, :self.filled].masked_fill_(mask == 0, -float("inf"))
        self.bias = bias.repeat_interleave(self.kv_heads, 0)[:, None]  # (rows * kv_heads, 1, capacity): per bmm
        self.rope_table = None  # (cos, signed sin) (L, head_dim) of positions 0..L-1, built at the first step
        self.fused = FusedLayer.of(decoder)

    @classmethod
    def build(cls, model, cache, mask: torch.Tensor, room: int, repeat: int = 1) -> "FastDecoder | None":
        """From the prefill's cache, each prompt's row to be repeated `repeat` times, and the rows' mask
        (prompts * repeat, P); None if the model is not supported."""
        decoder = model.get_decoder()
        if not supported(model, decoder) or len(cache.layers) != len(decoder.layers):
            return None
        return cls(model, decoder, cache, mask, room, repeat)

    def _bias_rows(self) -> torch.Tensor:
        """The padding bias per row: (rows, kv_heads, capacity), a view."""
        return self.bias.view(-1, self.kv_heads, self.bias.shape[-1])

    def select(self, idx: torch.Tensor) -> None:
        """Keep (and duplicate) rows `idx`."""
        idx = idx.to(self.bias.device)
        self.kv = [[b.index_select(0, idx) for b in bufs] for bufs in self.kv]
        self.bias = self._bias_rows().index_select(0, idx).flatten(0, 1)[:, None]

    def copy_rows(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Row dst becomes a copy of row src (an EqLen fork)."""
        dst, src = dst.to(self.bias.device), src.to(self.bias.device)
        for bufs in self.kv:
            for b in bufs:
                b[dst] = b[src]
        rows = self._bias_rows()
        rows[dst] = rows[src]

    def _grow(self) -> None:
        self.kv = [[torch.cat([b, torch.empty_like(b)], 2) for b in bufs] for bufs in self.kv]
        self.bias = torch.cat([self.bias, torch.zeros_like(self.bias)], 2)
        self.rope_table = None  # positions may now pass the table's end

    def _rotary(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin with its first half negated, (rows, 1, head_dim) at `positions`: 1-D positions with a static
        rope read a table the model's rotary embedding filled once (the same values: cos/sin of position *
        inv_freq), mrope calls it each step."""
        rotary = self.decoder.rotary_emb
        if positions.dim() != 1 or getattr(rotary, "rope_type", None) not in STATIC_ROPE:
            cos, sin = rotary(h, positions[..., None])
            return cos, signed_sin(sin)
        if self.rope_table is None:  # every position until the slab is full: each step adds 1
            length = int(positions.max()) + self.bias.shape[-1] - self.filled + 1
            cos, sin = rotary(h[:1], torch.arange(length, device=h.device)[None])  # (1, L, head_dim)
            self.rope_table = cos[0], signed_sin(sin[0])
        return tuple(t[positions].unsqueeze(1) for t in self.rope_table)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits (rows, V) after feeding `tokens` (rows,) at `positions` ((rows,) or (3, rows) for mrope)."""
        if self.filled == self.bias.shape[-1]:
            self._grow()
        n = self.filled + 1
        h = self.decoder.embed_tokens(tokens[:, None])  # (rows, 1, d)
        cos, sin = self._rotary(h, positions)
        bias = self.bias[..., :n]  # (rows * kv_heads, 1, n)
        rows = h.shape[0]
        for layer, fused, (kb, vb) in zip(self.decoder.layers, self.fused, self.kv):
            q, k, v = fused.attention_inputs(h[:, 0], cos, sin)  # (rows, heads | kv_heads, dim)
            kv_heads, dim = k.shape[1], k.shape[2]
            kb[:, :, self.filled] = k
            vb[:, :, self.filled] = v
            q = q.reshape(rows * kv_heads, -1, dim)  # (rows * kv, group, dim): kv head j's queries side by side
            keys, values = (b.view(rows * kv_heads, -1, dim)[:, :n] for b in (kb, vb))  # (rows * kv, n, dim)
            scores = torch.baddbmm(bias, q, keys.transpose(1, 2), alpha=layer.self_attn.scaling)  # (rows*kv, g, n)
            probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
            h = add_linear(h, torch.bmm(probs, values).view(rows, 1, -1), layer.self_attn.o_proj)  # heads in order
            h = fused.mlp_residual(h)
        self.filled = n
        return self.model.lm_head(rms_norm(self.decoder.norm, h))[:, 0]

