"""A decoding step for llama-style decoders without the transformers forward's per-call machinery.

One token per row through a pre-norm decoder (RMSNorm -> q/k/v projections (+ optional per-head q/k norms) ->
rotary embedding -> grouped-query attention -> o_proj -> residual -> RMSNorm -> MLP or MoE block -> residual), as
Llama, Mistral (no sliding window), Qwen2, Qwen3, Qwen3-MoE and Qwen2.5-VL's text decoder define it. Every
sub-module is the model's own (norms, projections, rotary embedding, `apply_rotary_pos_emb` of the model's
modelling file, MLP/MoE block, LM head); only the attention and the cache are ours:

- keys/values live in a pre-allocated slab (rows, kv_heads, capacity, head_dim) per layer: a step writes one
  position in place (transformers' DynamicCache concatenates the whole cache every step);
- attention of the single query is two batched matmuls over the filled part, with the query heads of one
  key/value head side by side (no repeated keys), an additive bias for the prompts' left padding, softmax in
  float32 as the eager attention does.

`supported`, `rope_of` and `rms_norm` are shared with `seqrl.algorithms.packed` (scoring). The logits equal the
transformers forward's up to float rounding (tests/test_decode.py: 1e-5 on dense, moe and
vl). Any other model (sliding windows, soft-capping, other layer layouts, flash/flex attention) keeps the
transformers forward: `FastDecoder.build` returns None.
"""
from __future__ import annotations

import sys

import torch
from torch.distributed.fsdp import FSDPModule

SUPPORTED = {"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "qwen2_5_vl", "qwen2_5_vl_text"}
STATIC_ROPE = {"default", "linear", "llama3", "yarn"}  # cos/sin of a position do not depend on the sequence length


class _RMSNorm(torch.autograd.Function):
    """y = w * (x * rsqrt(mean(x^2) + eps)) as the Llama/Qwen RMSNorm modules compute it (in float32, the
    normalised value cast back to x's dtype before the weight), with a hand-written backward from the saved
    normalised input and scale: about 8 kernels instead of autograd's chain through pow/mean/rsqrt/mul (3.6x faster
    forward + backward on a (2441, 128) float32 input on CPU). Used by this step and by `seqrl.algorithms.packed`."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xn, r = _normalised(x, eps)
        ctx.save_for_backward(xn, r, weight)
        ctx.dtype = x.dtype
        return weight * xn.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        xn, r, weight = ctx.saved_tensors
        g = (dy * weight).float()
        dx = r * (g - xn * (g * xn).mean(-1, keepdim=True))
        dw = (dy * xn.to(ctx.dtype)).reshape(-1, xn.shape[-1]).sum(0).to(weight.dtype)
        return dx.to(ctx.dtype), dw, None


def _normalised(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
    return xf * r, r


def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` for a Llama/Qwen RMSNorm module `norm` (weight over the last dim, `variance_epsilon`); without
    autograd (decoding, reference log-probs) torch's fused rms_norm kernel for the normalised float32 value (2.9x
    faster than the module's pow/mean/rsqrt/mul chain on a (2441, 128) input), then the module's cast and weight."""
    if torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad):
        return _RMSNorm.apply(x, norm.weight, norm.variance_epsilon)
    xn = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), None, norm.variance_epsilon)  # one fused kernel
    return norm.weight * xn.to(x.dtype)


def rope_of(decoder):
    """`apply_rotary_pos_emb` of the decoder's own modelling file."""
    return sys.modules[type(decoder.layers[0].self_attn).__module__].apply_rotary_pos_emb


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
    return _is_rms_norm(decoder.norm)


def _is_rms_norm(module) -> bool:
    """A Llama/Qwen-style RMSNorm: `weight * normalised x`, eps in `variance_epsilon` (not Gemma's 1 + weight)."""
    name = type(module).__name__
    return name.endswith("RMSNorm") and "Gemma" not in name and hasattr(module, "variance_epsilon")


class FastDecoder:
    """Decoding state of a supported model: the slab KV cache, the padding bias, and the step."""

    def __init__(self, model, decoder, cache, mask: torch.Tensor, room: int, repeat: int):
        self.model, self.decoder = model, decoder
        self.rope = rope_of(decoder)
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
        self.bias = torch.zeros(mask.shape[0], capacity, device=mask.device)  # (rows, capacity) additive
        self.bias[:, :self.filled].masked_fill_(mask == 0, -float("inf"))
        self.rope_table = None  # (cos, sin) (L, head_dim) of positions 0..L-1, built at the first step

    @classmethod
    def build(cls, model, cache, mask: torch.Tensor, room: int, repeat: int = 1) -> "FastDecoder | None":
        """From the prefill's cache, each prompt's row to be repeated `repeat` times, and the rows' mask
        (prompts * repeat, P); None if the model is not supported."""
        decoder = model.get_decoder()
        if not supported(model, decoder) or len(cache.layers) != len(decoder.layers):
            return None
        return cls(model, decoder, cache, mask, room, repeat)

    def select(self, idx: torch.Tensor) -> None:
        """Keep (and duplicate) rows `idx`."""
        idx = idx.to(self.bias.device)
        self.kv = [[b.index_select(0, idx) for b in bufs] for bufs in self.kv]
        self.bias = self.bias.index_select(0, idx)

    def copy_rows(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Row dst becomes a copy of row src (an EqLen fork)."""
        dst, src = dst.to(self.bias.device), src.to(self.bias.device)
        for bufs in self.kv:
            for b in bufs:
                b[dst] = b[src]
        self.bias[dst] = self.bias[src]

    def _grow(self) -> None:
        self.kv = [[torch.cat([b, torch.empty_like(b)], 2) for b in bufs] for bufs in self.kv]
        self.bias = torch.cat([self.bias, torch.zeros_like(self.bias)], 1)
        self.rope_table = None  # positions may now pass the table's end

    def _rotary(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (rows, 1, head_dim) at `positions`: 1-D positions with a static rope read a table the model's
        rotary embedding filled once (the same values: cos/sin of position * inv_freq), mrope calls it each step."""
        rotary = self.decoder.rotary_emb
        if positions.dim() != 1 or getattr(rotary, "rope_type", None) not in STATIC_ROPE:
            return rotary(h, positions[..., None])
        if self.rope_table is None:  # every position until the slab is full: each step adds 1
            length = int(positions.max()) + self.bias.shape[1] - self.filled + 1
            cos, sin = rotary(h[:1], torch.arange(length, device=h.device)[None])  # (1, L, head_dim)
            self.rope_table = cos[0], sin[0]
        return tuple(t[positions].unsqueeze(1) for t in self.rope_table)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits (rows, V) after feeding `tokens` (rows,) at `positions` ((rows,) or (3, rows) for mrope)."""
        if self.filled == self.bias.shape[1]:
            self._grow()
        n = self.filled + 1
        h = self.decoder.embed_tokens(tokens[:, None])  # (rows, 1, d)
        cos, sin = self._rotary(h, positions)
        bias = self.bias[:, None, None, :n]  # (rows, 1, 1, n)
        rows = h.shape[0]
        for layer, (kb, vb) in zip(self.decoder.layers, self.kv):
            attn = layer.self_attn
            x = rms_norm(layer.input_layernorm, h)
            shape = (rows, 1, -1, attn.head_dim)
            q, k, v = attn.q_proj(x).view(shape), attn.k_proj(x).view(shape), attn.v_proj(x).view(shape)
            if hasattr(attn, "q_norm"):
                q, k = rms_norm(attn.q_norm, q), rms_norm(attn.k_norm, k)
            q, k = self.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # (rows, heads, 1, head_dim)
            kb[:, :, self.filled] = k[:, :, 0]
            vb[:, :, self.filled] = v[:, 0]
            keys, values = kb[:, :, :n], vb[:, :, :n]  # (rows, kv_heads, n, head_dim)
            q = q.reshape(rows, keys.shape[1], -1, attn.head_dim)  # (rows, kv_heads, group, head_dim)
            scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(attn.scaling).add_(bias)
            probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(probs, values).reshape(rows, 1, -1)  # heads in order: kv head j serves j*group + i
            h = h + attn.o_proj(out)
            h = h + layer.mlp(rms_norm(layer.post_attention_layernorm, h))
        self.filled = n
        return self.model.lm_head(rms_norm(self.decoder.norm, h))[:, 0]
