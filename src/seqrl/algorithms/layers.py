"""The layer arithmetic of llama-style decoders (Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE, Qwen2.5-VL's text
decoder), shared by the decoding step (`seqrl.algorithms.fastdecode`) and the packed scoring forward
(`seqrl.algorithms.packed`), in fewer and larger kernels than the modelling files' (on small models both are
bound by per-op dispatch, and in backward by the adds that join the gradients of parallel projections):

- q|k|v and a dense MLP's gate|up run as one GEMM each on weights concatenated per forward (`FusedLayer`;
  differentiable: the copy's gradient is split back to the parameters), when the decoder's projections total
  at most FUSE_MAX_BYTES (a bigger model's copy would cost memory for no gain: its GEMMs are large), else each
  module runs and the outputs are concatenated;
- the per-head q/k RMSNorms (Qwen3) run once over queries and keys side by side, each with its own weight, and
  so does the rotary embedding: x * cos + roll(x, half) * sin', sin' = sin with its first half negated, which is
  x * cos + rotate_half(x) * sin to the bit (`apply_rotary_pos_emb` of every supported modelling file;
  tests/test_decode.py checks each);
- o_proj and down_proj add the residual inside their GEMM (`addmm`) when they have no bias;
- RMSNorm: a hand-written backward under autograd (`_RMSNorm`), torch's rms_norm kernel without.

Weights, epsilons, rotary cos/sin, activations and MoE blocks are the model's own; results equal the
transformers forward's up to float rounding (tests/test_decode.py, tests/test_logprobs.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FUSE_MAX_BYTES = 64 << 20  # concatenated projection copies are made when the decoder's total at most this


class _RMSNorm(torch.autograd.Function):
    """y = w * (x * rsqrt(mean(x^2) + eps)) as the Llama/Qwen RMSNorm modules compute it (in float32, the
    normalised value cast back to x's dtype before the weight), with a hand-written backward from the saved
    normalised input and scale: about 8 kernels instead of autograd's chain through pow/mean/rsqrt/mul (3.6x faster
    forward + backward on a (2441, 128) float32 input on CPU). The weight has the trailing shape of x (one per
    feature, or one row per head for the joint q/k norm)."""

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
        dw = (dy * xn.to(ctx.dtype)).reshape(-1, *weight.shape).sum(0).to(weight.dtype)
        return dx.to(ctx.dtype), dw, None


def _normalised(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
    return xf * r, r


def norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x over its last dim with `weight` (x's trailing shape): `_RMSNorm` under autograd; without,
    torch's rms_norm kernel for the normalised value, then the module's cast and weight (in float32 the weight
    inside the kernel)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, eps)
    if x.dtype == weight.dtype == torch.float32 and weight.dim() == 1:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def rms_norm(module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` for a Llama/Qwen RMSNorm module (weight over the last dim, `variance_epsilon`)."""
    return norm(x, module.weight, module.variance_epsilon)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: x * cos + roll(x, half) * signed_sin(sin) = x * cos + rotate_half(x) * sin."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], -1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (..., heads, head_dim); cos and `signed_sin` broadcast to it (..., 1, head_dim)."""
    return torch.roll(x, x.shape[-1] // 2, -1).mul_(sin_signed).add_(x * cos)


def add_linear(h: torch.Tensor, x: torch.Tensor, linear) -> torch.Tensor:
    """h + linear(x), the sum inside the GEMM (`addmm`) for a bias-free nn.Linear."""
    if type(linear) is not torch.nn.Linear or linear.bias is not None:
        return h + linear(x)
    return torch.addmm(h.reshape(-1, h.shape[-1]), x.reshape(-1, x.shape[-1]), linear.weight.t()).view(h.shape)


def is_dense_mlp(mlp) -> bool:
    """A Llama/Qwen MLP: down_proj(act_fn(gate_proj(x)) * up_proj(x)) (not an MoE block)."""
    return type(mlp).__name__.endswith("MLP") and all(hasattr(mlp, k) for k in (
        "gate_proj", "up_proj", "down_proj", "act_fn"))


def _concat(linears, copy: bool):
    """x -> cat([linear(x) for linear in linears], -1): one F.linear on concatenated weights (and biases) when
    `copy`, else the modules' own calls."""
    if not copy:
        return lambda x: torch.cat([m(x) for m in linears], -1)
    weight = torch.cat([m.weight for m in linears])
    bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
    return lambda x: F.linear(x, weight, bias)


class FusedLayer:
    """One decoder layer's projections as single GEMMs (q|k|v; gate|up of a dense MLP) and its per-head q/k norm
    weights side by side (heads, then kv heads). Build with `FusedLayer.of(decoder)` inside the forward that uses
    it: the concatenated weights are taken from the parameters at that moment (and carry their gradient)."""

    def __init__(self, layer, copy: bool):
        attn, mlp = layer.self_attn, layer.mlp
        self.layer, self.dim, self.copied = layer, attn.head_dim, copy
        self.kv_heads = attn.k_proj.out_features // attn.head_dim
        self.qkv = _concat((attn.q_proj, attn.k_proj, attn.v_proj), copy)
        self.qk_norm = self.eps = None
        if hasattr(attn, "q_norm"):
            heads = attn.q_proj.out_features // attn.head_dim
            self.qk_norm = torch.cat([attn.q_norm.weight.expand(heads, -1),
                                      attn.k_norm.weight.expand(self.kv_heads, -1)])
            self.eps = attn.q_norm.variance_epsilon  # = k_norm's (`fastdecode.supported`)
        self.gate_up = _concat((mlp.gate_proj, mlp.up_proj), copy) if is_dense_mlp(mlp) else None

    @classmethod
    def of(cls, decoder) -> list["FusedLayer"]:
        linears = [m for layer in decoder.layers for m in (
            layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
            *((layer.mlp.gate_proj, layer.mlp.up_proj) if is_dense_mlp(layer.mlp) else ()))]
        size = sum(p.numel() * p.element_size() for m in linears for p in m.parameters())
        copy = size <= FUSE_MAX_BYTES and all(type(m) is torch.nn.Linear for m in linears)
        return [cls(layer, copy) for layer in decoder.layers]

    def attention_inputs(self, h: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor):
        """Queries (..., heads, dim), keys and values (..., kv_heads, dim) of residual stream h (..., d): input norm,
        q|k|v, q/k norms, rotary embedding (cos/sin (..., 1, dim))."""
        qkv = self.qkv(rms_norm(self.layer.input_layernorm, h)).unflatten(-1, (-1, self.dim))  # (..., H + 2KV, dim)
        qk, v = qkv[..., :-self.kv_heads, :], qkv[..., -self.kv_heads:, :]
        if self.qk_norm is not None:
            qk = norm(qk, self.qk_norm, self.eps)
        qk = rope(qk, cos, sin_signed)
        return qk[..., :-self.kv_heads, :], qk[..., -self.kv_heads:, :], v

    def mlp_residual(self, h: torch.Tensor) -> torch.Tensor:
        """h + mlp(post_attention_layernorm(h)); a dense MLP as act(gate) * up on the fused GEMM, then down_proj
        with the residual inside its GEMM."""
        layer = self.layer
        x = rms_norm(layer.post_attention_layernorm, h)
        if self.gate_up is None:  # an MoE block
            return h + layer.mlp(x)
        gate, up = self.gate_up(x).chunk(2, -1)
        return add_linear(h, layer.mlp.act_fn(gate) * up, layer.mlp.down_proj)
