"""GPU memory per component of a composed training config, and the GPUs it needs (an estimate, not a profile).

    python -m seqrl.capacity experiment=paper_luspo_dense
    python -m seqrl.capacity experiment=paper_luspo_moe trainer.devices=8 trainer.num_nodes=4 --gpu-gib 80

Arguments are Hydra overrides of `conf/train.yaml`. Per GPU, with N = trainer.devices x num_nodes processes and
S = N under trainer=fsdp (seqrl.distributed.FSDP2Strategy; 1 otherwise: every replica holds everything):
- weights: P x master bytes / S (fp32 master under fsdp with 32-true or bf16-mixed; else the model dtype), plus two
  gathered FSDP units in flight (the largest decoder layer, compute dtype: the running one and the prefetched one);
- gradients: P x master bytes / S (kept between steps: the module sets them to None only before each backward);
- optimizer: AdamW m and v in the master dtype, 2 x P x master bytes / S;
- reference: the frozen KL model (only when algorithm.kl_coef > 0), P x model bytes / S;
- rollout weights: the policy gathered whole for generation under fsdp, P x compute bytes;
- KV cache: rows x (prompt + max_new_tokens) x layers x 2 x kv_heads x head_dim x compute bytes, rows =
  prompts_per_step / N x group_size (seqrl's hf engine decodes all of a rank's rows at once; vLLM would page);
- activations: per forward, a PPO minibatch (prompts_per_step x G / (N x ppo_minibatches) rows) or micro_batch_size
  rows (`RLModule._backward_in_parts`), prompt + max_new_tokens tokens each: with activation checkpointing every
  layer keeps its input (hidden x compute bytes per token) and one layer is recomputed at a time, its working set
  counted twice (forward + backward); without it every layer keeps its working set. Working set per token and
  layer: compute bytes x (6 hidden + 2 kv_heads x head_dim + 4 x MLP width), MLP width = intermediate (dense) or
  top-k x expert intermediate (MoE), plus fp32 router logits;
- logits: tokens x vocab x compute bytes for the model's output, plus response tokens x vocab x 8 for the fp32
  copy `response_logprobs` makes and its gradient.
Peak = max(rollout: states + reference + rollout weights + KV cache, update: states + reference + activations +
logits), states = weights + gradients + optimizer. The vision tower's activations are left out (images are a few
hundred tokens). Parameter counts are exact for the architectures below (tests build each on the meta device).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

GIB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Published config.json values (https://huggingface.co/<id>/blob/main/config.json), the keys that size the model.
_QWEN25_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
                  "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}
ARCHS: dict[str, dict] = {
    "Qwen/Qwen2.5-7B": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
                        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                        "vocab_size": 152064, "tie_word_embeddings": False},  # 7.62B (card: 7.61B)
    "Qwen/Qwen2.5-32B": {"model_type": "qwen2", "hidden_size": 5120, "intermediate_size": 27648,
                         "num_hidden_layers": 64, "num_attention_heads": 40, "num_key_value_heads": 8,
                         "vocab_size": 152064, "tie_word_embeddings": False},  # 32.76B (card: 32.5B)
    "Qwen/Qwen3-30B-A3B": {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
                           "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
                           "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
                           "vocab_size": 151936, "tie_word_embeddings": False},  # 30.5B, 3.3B active
    "Qwen/Qwen2.5-VL-7B-Instruct": {"model_type": "qwen2_5_vl", "tie_word_embeddings": False, "text_config": {
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "vocab_size": 152064}, "vision_config": {**_QWEN25_VISION, "out_hidden_size": 3584}},
    "Qwen/Qwen2.5-VL-3B-Instruct": {"model_type": "qwen2_5_vl", "tie_word_embeddings": True, "text_config": {
        "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
        "num_key_value_heads": 2, "vocab_size": 151936}, "vision_config": {**_QWEN25_VISION, "out_hidden_size": 2048}},
    "Qwen/Qwen3-0.6B": {"model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072,
                        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                        "vocab_size": 151936, "tie_word_embeddings": True},
    "allenai/OLMoE-1B-7B-0924": {"model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024,
                                 "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
                                 "num_experts": 64, "num_experts_per_tok": 8, "vocab_size": 50304,
                                 "tie_word_embeddings": False},  # 6.9B, 1.3B active
}
# Per model type: bias on q/k/v, and the q/k RMSNorm (per head over head_dim, or over the whole projection).
STYLES = {"qwen2": (True, None), "qwen2_5_vl": (True, None), "qwen3": (False, "head"), "qwen3_moe": (False, "head"),
          "olmoe": (False, "full")}


@dataclass
class Arch:
    """What sizes a decoder (and a Qwen2.5-VL vision tower): transformers config names, shortened."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    experts: int = 0  # 0 = dense MLP
    top_k: int = 0
    expert_intermediate: int = 0  # Qwen3-MoE: moe_intermediate_size; OLMoE: intermediate_size
    vision: dict | None = None  # Qwen2.5-VL vision_config keys

    @classmethod
    def from_hf(cls, config) -> "Arch":
        """Read a transformers config (for vision-language ones, its text_config and vision_config)."""
        text = getattr(config, "text_config", None) or config
        vision = getattr(config, "vision_config", None)
        heads, experts = text.num_attention_heads, getattr(text, "num_experts", 0) or 0
        expert_width = (getattr(text, "moe_intermediate_size", None) or text.intermediate_size) if experts else 0
        return cls(config.model_type, text.hidden_size, text.num_hidden_layers, heads, text.num_key_value_heads,
                   getattr(text, "head_dim", None) or text.hidden_size // heads, text.intermediate_size,
                   text.vocab_size, bool(config.tie_word_embeddings), experts,
                   getattr(text, "num_experts_per_tok", 0) or 0, expert_width,
                   None if vision is None else {k: getattr(vision, k) for k in (*_QWEN25_VISION, "out_hidden_size")})


def arch_of(model_cfg) -> Arch:
    """The Arch of a model config: ARCHS for a checkpoint, else its random-init `arch` (char-tokenizer vocabulary)."""
    from omegaconf import OmegaConf
    from transformers import AutoConfig, Qwen2_5_VLConfig

    from seqrl.models import get_family
    from seqrl.tokenizer import build_char_tokenizer

    name = model_cfg.local_dir or model_cfg.name_or_path
    if name is None:
        arch = OmegaConf.to_container(OmegaConf.create(model_cfg.arch), resolve=True)
        return Arch.from_hf(get_family(model_cfg.family).random_config(arch, build_char_tokenizer()))
    if name not in ARCHS:
        raise ValueError(f"model.name_or_path={name!r}: no published architecture in seqrl.capacity.ARCHS; "
                         f"allowed: {', '.join(ARCHS)} (or add its config.json values there)")
    kw = dict(ARCHS[name])
    model_type = kw.pop("model_type")
    config = Qwen2_5_VLConfig(**kw) if model_type == "qwen2_5_vl" else AutoConfig.for_model(model_type, **kw)
    return Arch.from_hf(config)


def vision_params(v: dict) -> int:
    """Qwen2.5-VL ViT: conv patch embedding (no bias), blocks (2 RMSNorms, qkv + proj with bias, gated MLP with
    bias), patch merger (RMSNorm, 2-layer MLP on spatial_merge^2 concatenated patches)."""
    h, i, m = v["hidden_size"], v["intermediate_size"], v["hidden_size"] * v["spatial_merge_size"] ** 2
    patch = v["in_channels"] * v["temporal_patch_size"] * v["patch_size"] ** 2 * h
    block = 2 * h + (3 * h * h + 3 * h) + (h * h + h) + 2 * (h * i + i) + (i * h + h)
    return patch + v["depth"] * block + h + (m * m + m) + (m * v["out_hidden_size"] + v["out_hidden_size"])


def param_counts(a: Arch) -> dict[str, int]:
    """Exact parameter counts: total, per decoder layer (the largest FSDP unit), active per token (MoE), vision."""
    bias, qk_norm = STYLES.get(a.model_type, (False, None))
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    attn = a.hidden * (q + 2 * kv) + q * a.hidden + (q + 2 * kv) * bias
    attn += {"head": 2 * a.head_dim, "full": q + kv}.get(qk_norm, 0)
    expert = 3 * a.hidden * a.expert_intermediate
    mlp = a.hidden * a.experts + a.experts * expert if a.experts else 3 * a.hidden * a.intermediate
    layer = attn + mlp + 2 * a.hidden
    embed = a.vocab * a.hidden * (1 if a.tied else 2)
    vision = vision_params(a.vision) if a.vision else 0
    total = embed + a.layers * layer + a.hidden + vision
    active = total - a.layers * (a.experts - a.top_k) * expert if a.experts else total
    return {"total": total, "layer": layer, "active": active, "vision": vision}


def kv_cache_bytes(a: Arch, tokens: int, dtype_bytes: int) -> int:
    """KV cache of `tokens` token positions: layers x 2 (K and V) x kv_heads x head_dim x tokens x bytes."""
    return a.layers * 2 * a.kv_heads * a.head_dim * tokens * dtype_bytes


def activation_bytes_per_token_layer(a: Arch, dtype_bytes: int) -> int:
    """Working set of one decoder layer per token (see module docstring); fp32 router logits for MoE."""
    width = a.top_k * a.expert_intermediate if a.experts else a.intermediate
    return dtype_bytes * (6 * a.hidden + 2 * a.kv_heads * a.head_dim + 4 * width) + 4 * a.experts


def estimate(cfg, gpus: int | None = None, prompt_len: int = 512, micro_rows: int | None = None) -> dict[str, float]:
    """Bytes per GPU of each component for a composed train config on `gpus` processes (default: the config's);
    `micro_rows`: rows per forward/backward (default: the config's micro_batch_size, else a whole PPO minibatch)."""
    a = arch_of(cfg.model)
    n = param_counts(a)
    strategy = cfg.trainer.strategy
    fsdp = hasattr(strategy, "get") and str(strategy.get("_target_", "")).endswith("FSDP2Strategy")
    world = gpus or cfg.trainer.devices * cfg.trainer.num_nodes
    shards = world if fsdp else 1
    precision, model_bytes = str(cfg.trainer.precision), BYTES[cfg.model.dtype]
    compute = 4 if precision == "32-true" else 2
    master = 4 if fsdp and precision in ("32-true", "bf16-mixed") else (2 if precision == "bf16-true" else model_bytes)
    ckpt = bool(cfg.model.gradient_checkpointing or (fsdp and strategy.get("activation_checkpointing", True)))
    seq = prompt_len + cfg.rollout.max_new_tokens
    rows = cfg.prompts_per_step / world * cfg.rollout.group_size  # per rank
    mb_rows = math.ceil(rows / cfg.algorithm.get("ppo_minibatches", 1))
    micro_rows = micro_rows or cfg.get("micro_batch_size")
    mb_tokens = min(mb_rows, micro_rows or mb_rows) * seq
    per_layer = activation_bytes_per_token_layer(a, compute)
    acts = mb_tokens * (a.layers * a.hidden * compute + 2 * per_layer) if ckpt else mb_tokens * a.layers * per_layer
    unit = 2 * n["layer"] * compute if fsdp else 0
    return {
        "weights": n["total"] * master / shards + unit,
        "gradients": n["total"] * master / shards,
        "optimizer": 2 * n["total"] * master / shards,
        "reference": n["total"] * model_bytes / shards if cfg.algorithm.kl_coef > 0 else 0.0,
        "rollout weights": n["total"] * compute if fsdp and strategy.get("gather_for_generation", True) else 0.0,
        "KV cache": kv_cache_bytes(a, int(rows * seq), compute),
        "activations": acts,
        "logits": mb_tokens * a.vocab * compute + mb_tokens * cfg.rollout.max_new_tokens / seq * a.vocab * 8,
    }


def peaks(parts: dict[str, float]) -> dict[str, float]:
    """Rollout and update peaks (bytes) from `estimate`'s components."""
    states = parts["weights"] + parts["gradients"] + parts["optimizer"] + parts["reference"]
    return {"rollout": states + parts["rollout weights"] + parts["KV cache"],
            "update": states + parts["activations"] + parts["logits"]}


def gpus_needed(cfg, gpu_gib: float = 80.0, prompt_len: int = 512, micro_rows: int | None = None,
                most: int = 1024) -> int | None:
    """The fewest processes (a power of two dividing prompts_per_step, at most `most`) whose peak fits in
    `gpu_gib` GiB per GPU; None if none does."""
    for world in (2**k for k in range(int(math.log2(most)) + 1)):
        if cfg.prompts_per_step % world == 0 and max(peaks(estimate(cfg, world, prompt_len, micro_rows)).values()) \
                <= gpu_gib * GIB:
            return world
    return None


def report(cfg, gpu_gib: float = 80.0, prompt_len: int = 512, micro_rows: int | None = None) -> str:
    """A markdown table: GiB per GPU of each component, the two peaks, and the GPUs needed."""
    parts = estimate(cfg, prompt_len=prompt_len, micro_rows=micro_rows)
    world = cfg.trainer.devices * cfg.trainer.num_nodes
    n = param_counts(arch_of(cfg.model))
    need = gpus_needed(cfg, gpu_gib, prompt_len, micro_rows)
    lines = [f"{cfg.model.name_or_path or cfg.model.family}: {n['total'] / 1e9:.2f}B parameters "
             f"({n['active'] / 1e9:.2f}B active), {cfg.prompts_per_step} prompts x G={cfg.rollout.group_size}, "
             f"prompt {prompt_len} + {cfg.rollout.max_new_tokens} new tokens, {cfg.trainer.precision}, "
             f"{world} GPUs" + (f", micro-batches of {micro_rows} rows" if micro_rows else ""), "",
             "| component | GiB per GPU |", "|---|---:|"]
    lines += [f"| {name} | {value / GIB:.1f} |" for name, value in parts.items()]
    lines += [f"| **peak: {name}** | **{value / GIB:.1f}** |" for name, value in peaks(parts).items()]
    fits = "fits" if max(peaks(parts).values()) <= gpu_gib * GIB else "does not fit"
    top = ", ".join(f"{k} {v / GIB:.0f} GiB" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])[:2])
    lines += ["", f"{fits} in {gpu_gib:g} GiB per GPU at {world} GPUs (largest: {top}); GPUs needed: "
              + (f"{need}" if need else "no power of two up to 1024 that divides prompts_per_step")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m seqrl.capacity", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml, e.g. experiment=...")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory per GPU (GiB)")
    parser.add_argument("--prompt-len", type=int, default=512, help="prompt tokens per row (images included)")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="rows per forward/backward (default: the config's micro_batch_size, else a PPO "
                        "minibatch)")
    args = parser.parse_args(argv)
    from hydra import compose, initialize_config_dir

    from seqrl.cli import conf_dir
    from seqrl.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("train", args.overrides)
    print(report(cfg, args.gpu_gib, args.prompt_len, args.micro_batch))


if __name__ == "__main__":
    main()
