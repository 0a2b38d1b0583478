"""Model families behind one `Policy` wrapper: dense (Qwen3), moe (Qwen3-MoE) and vl (Qwen2.5-VL).

A model config (conf/model/*.yaml, schema `seqrl.config.ModelConfig`) names a family from the registry below and
either a checkpoint (`name_or_path` / `local_dir`, loaded with the Auto classes) or nothing, in which case the
model is random-initialised from `arch` (kwargs of the transformers config class) with the vocabulary and the
pad/eos/bos ids taken from the tokenizer. The caller seeds torch first: same seed, same weights.

`Policy.forward` scores left-padded-prompt + right-padded-response batches as `generate()` saw them: dense and moe
get position_ids = cumsum(mask) - 1, generate()'s own rule (RoPE is shift-invariant, so this only aligns rounding);
vl lets the model compute its 3-D mrope positions, which needs `mm_token_type_ids` over the whole sequence: rebuilt
here from the image-token id (without it transformers silently falls back to 1-D positions).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from omegaconf import OmegaConf
from PIL import Image
from transformers import (AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageTextToText,
                          AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin,
                          Qwen2_5_VLConfig, Qwen2_5_VLProcessor)
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from seqrl.tokenizer import CHAT_TEMPLATE, build_char_tokenizer

# Field defaults of seqrl.config.ModelConfig (the schema the YAML files are validated against).
MODEL_CONFIG_DEFAULTS: dict[str, Any] = {
    "family": "dense", "name_or_path": None, "local_dir": None, "tokenizer": "char", "arch": {}, "dtype": "float32",
    "trust_remote_code": False, "gradient_checkpointing": False, "attn_implementation": "sdpa",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZERS = ("char", "auto")
# Random-init vl models resize every image to between 56x56 and 112x112 pixels: at most 16 image tokens.
TINY_IMAGE_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}
VISION_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                 "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a padded batch as `generate()` computes them: cumsum(mask) - 1, pads clamped to 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Vocabulary size and special ids for a random-init config; bos falls back to pad (Qwen has no bos)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    return {"vocab_size": len(tokenizer), "pad_token_id": pad, "eos_token_id": eos, "bos_token_id": bos}


class Qwen2_5_VLImageTextProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor without the video processor (transformers' video processors need torchvision);
    ProcessorMixin reads its sub-processors off this signature, so it checks only image processor and tokenizer."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


# ----------------------------------------------------------------------------------------------------- registry
FAMILIES: dict[str, "Family"] = {}


def register_family(name: str) -> Callable[[type], type]:
    """Class decorator: register a `Family` subclass (instantiated once) under `name`."""

    def register(cls: type) -> type:
        FAMILIES[name] = cls()
        return cls

    return register


def get_family(name: str) -> "Family":
    """The registered family `name`, or a ValueError listing the registered ones."""
    if name not in FAMILIES:
        raise ValueError(f"model family {name!r} is not registered; use one of {sorted(FAMILIES)}")
    return FAMILIES[name]


class Family:
    """How a family is built, how its prompts are encoded and which extra kwargs its forward pass takes."""

    model_type = ""
    auto_model: Any = AutoModelForCausalLM
    routed = False  # forward returns router logits (moe): router metrics cover the tokens of each forward

    def random_config(self, arch: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
        """The transformers config for a random-init model: `arch` plus the tokenizer's vocabulary and ids."""
        return AutoConfig.for_model(self.model_type, **{**arch, **_special_ids(tokenizer)})

    def build_processor(self, tokenizer, source: str | None, trust_remote_code: bool) -> ProcessorMixin | None:
        """The multimodal processor (None for text-only families)."""
        return None

    def suppressed_token_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        """Token ids generate() must never sample (set as generation_config.suppress_tokens)."""
        return []

    def encode(self, policy: "Policy", prompts: list[str], images) -> dict[str, torch.Tensor]:
        """Chat-format each prompt as one user turn and tokenize the batch, left-padded."""
        if images is not None and any(len(per_prompt) for per_prompt in images):
            raise ValueError(f"family {policy.family!r} takes no images; got images for a text-only model")
        texts = [policy.render_chat([{"role": "user", "content": prompt}]) for prompt in prompts]
        batch = policy.tokenizer(
            texts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt"
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def forward_kwargs(self, model, input_ids, attention_mask, mm: dict[str, Any]) -> dict[str, Any]:
        """Extra kwargs for `model(...)`: positions that match generate() for left-padded prompts."""
        if mm:
            raise ValueError(f"a text-only family takes no multimodal inputs; got {sorted(mm)}")
        return {"position_ids": positions_from_mask(attention_mask)}


@register_family("dense")
class DenseFamily(Family):
    """Qwen3 decoder (random init) or any causal LM checkpoint (Qwen2.5-7B, Qwen3-0.6B, ...)."""

    model_type = "qwen3"


@register_family("moe")
class MoeFamily(Family):
    """Qwen3-MoE decoder (random init) or a MoE causal LM checkpoint; forward returns router logits + aux loss."""

    model_type = "qwen3_moe"
    routed = True

    def forward_kwargs(self, model, input_ids, attention_mask, mm: dict[str, Any]) -> dict[str, Any]:
        return {**super().forward_kwargs(model, input_ids, attention_mask, mm), "output_router_logits": True}


@register_family("vl")
class VisionLanguageFamily(Family):
    """Qwen2.5-VL: a ViT (window attention, 2x2 patch merger) feeding a Qwen2 decoder with 3-D mrope."""

    model_type = "qwen2_5_vl"
    auto_model = AutoModelForImageTextToText
    mm_keys = ("pixel_values", "image_grid_thw")

    def random_config(self, arch: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
        arch = copy.deepcopy(arch)
        text = {**arch.pop("text_config", {}), **_special_ids(tokenizer)}
        vision = arch.pop("vision_config", {})
        vision.setdefault("out_hidden_size", text.get("hidden_size"))  # the merger feeds the decoder
        vision_ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in VISION_TOKENS.items()}
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **vision_ids, **arch)

    def build_processor(self, tokenizer, source: str | None, trust_remote_code: bool) -> ProcessorMixin:
        if source is None:
            image_processor = Qwen2VLImageProcessorPil(**TINY_IMAGE_PIXELS)
        else:  # the PIL image processor when torchvision is missing, the fast one otherwise
            image_processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
        return Qwen2_5_VLImageTextProcessor(image_processor, tokenizer, chat_template=tokenizer.chat_template)

    def suppressed_token_ids(self, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        # A sampled <|image_pad|> in a response would have no image features behind it and break the forward pass.
        return sorted({tokenizer.convert_tokens_to_ids(token) for token in VISION_TOKENS.values()})

    def encode(self, policy: "Policy", prompts: list[str], images) -> dict[str, torch.Tensor]:
        images = images if images is not None else [[] for _ in prompts]
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} image lists for {len(prompts)} prompts; pass one list per prompt")
        texts = []
        for prompt, per_prompt in zip(prompts, images):
            content = [{"type": "image"} for _ in per_prompt] + [{"type": "text", "text": prompt}]
            texts.append(policy.render_chat([{"role": "user", "content": content}]))
        flat = [image.convert("RGB") for per_prompt in images for image in per_prompt]
        batch = policy.processor(
            text=texts, images=flat or None, padding=True, padding_side="left", return_tensors="pt"
        )
        # mm_token_type_ids must reach generate(): without it transformers falls back to 1-D positions.
        return {key: batch[key] for key in ("input_ids", "attention_mask", "mm_token_type_ids", *self.mm_keys)
                if key in batch}

    def forward_kwargs(self, model, input_ids, attention_mask, mm: dict[str, Any]) -> dict[str, Any]:
        mm = {key: value for key, value in mm.items() if key != "mm_token_type_ids"}  # prompt-length; rebuilt below
        unknown = set(mm) - set(self.mm_keys)
        if unknown:
            raise ValueError(f"unexpected multimodal inputs {sorted(unknown)}; the vl family takes {self.mm_keys}")
        if mm.get("image_grid_thw") is None:  # text only: 1-D positions, as generate() uses
            return {"position_ids": positions_from_mask(attention_mask)}
        image_tokens = (input_ids == model.config.image_token_id).long()  # (B, T): 1 = image token, 0 = text
        return {**mm, "mm_token_type_ids": image_tokens}


# ------------------------------------------------------------------------------------------------------- policy
@dataclass
class Policy:
    """A model with its tokenizer (and processor): prompt encoding, scoring forward pass, HF-format export."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    processor: ProcessorMixin | None
    family: str

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def stop_token_ids(self) -> list[int]:
        """The tokenizer's eos plus the checkpoint's generation eos ids (e.g. <|im_end|> and <|endoftext|>)."""
        generation_eos = self.model.generation_config.eos_token_id
        extra = generation_eos if isinstance(generation_eos, list) else [generation_eos]
        return sorted({self.eos_token_id, *(token for token in extra if token is not None)})

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        """The chat-template text of `messages`, ending with the opened assistant turn."""
        template = getattr(self.processor, "chat_template", None) or self.tokenizer.chat_template
        return self.tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )

    def encode_prompts(
        self, prompts: list[str], images: list[list[Image.Image]] | None = None
    ) -> dict[str, torch.Tensor]:
        """Left-padded batch of chat-formatted prompts: input_ids, attention_mask (B, P); for vl also
        mm_token_type_ids (B, P), pixel_values (patches, C*14*14*2) and image_grid_thw (images, 3) when there
        are images (image parts come before the text). Pass the whole dict to `model.generate`."""
        return get_family(self.family).encode(self, prompts, images)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int = 0,
                **mm: Any) -> CausalLMOutputWithPast:
        """Logits (B, T, V) of left-padded prompt + right-padded response sequences, as generate() saw them (only
        the last `logits_to_keep` positions when > 0: the language-model head skips the prompt).

        `mm` holds the vl inputs from `encode_prompts` (pixel_values, image_grid_thw; mm_token_type_ids is rebuilt
        for the full length). moe outputs also carry router_logits and aux_loss.
        """
        mm = {key: value for key, value in mm.items() if value is not None}
        kwargs = get_family(self.family).forward_kwargs(self.model, input_ids, attention_mask, mm)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                          logits_to_keep=logits_to_keep, **kwargs)

    def router_metrics(self, outputs, attention_mask: torch.Tensor) -> dict[str, float]:
        """`router_metrics` with this model's top-k ({} without router logits: dense, vl)."""
        if getattr(outputs, "router_logits", None) is None:
            return {}
        config = getattr(self.model, "module", self.model).config  # under a DDP / FSDP wrapper: the wrapped model
        return router_metrics(outputs, attention_mask, getattr(config, "num_experts_per_tok", 2))

    def save(self, path: str) -> None:
        """HF-format export: model, tokenizer (+ chat template) and, for vl, the image processor — the layout of
        the Hub's Qwen2.5-VL checkpoints, with no custom processor class. Reload with
        build_policy({"family": ..., "local_dir": path, "tokenizer": "auto"})."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        if self.processor is not None:
            self.processor.image_processor.save_pretrained(path)


def router_metrics(outputs, attention_mask: torch.Tensor, top_k: int = 2) -> dict[str, float]:
    """Expert-load statistics over real tokens; {} when `outputs` has no router logits (dense, vl).

    Per layer, load_e = (top-k assignments of real tokens to expert e) / (real tokens * top_k); the metrics are
    max_e load_e / mean_e load_e and std_e / mean_e (coefficient of variation), averaged over layers, plus the
    model's own load-balancing aux loss (Switch Transformer, arXiv 2101.03961) when present.
    """
    layers = getattr(outputs, "router_logits", None)
    real = attention_mask.reshape(-1).bool()  # (B*T,)
    if not layers or not bool(real.any()):
        return {}
    max_over_mean, cv = [], []
    for logits in layers:  # (B*T, E)
        chosen = logits[real.to(logits.device)].topk(top_k, dim=-1).indices  # (N, k)
        load = torch.bincount(chosen.reshape(-1), minlength=logits.shape[-1]).float() / chosen.numel()  # (E,)
        max_over_mean.append(float(load.max() / load.mean()))
        cv.append(float(load.std(unbiased=False) / load.mean()))
    metrics = {"moe/load_max_over_mean": sum(max_over_mean) / len(layers), "moe/load_cv": sum(cv) / len(layers)}
    if getattr(outputs, "aux_loss", None) is not None:
        metrics["moe/aux_loss"] = float(outputs.aux_loss.detach())
    return metrics


# -------------------------------------------------------------------------------------------------------- build
def _read_config(cfg) -> dict[str, Any]:
    """A ModelConfig, DictConfig or dict as a plain dict with defaults filled in; unknown keys are errors."""
    if dataclasses.is_dataclass(cfg):
        cfg = dataclasses.asdict(cfg)
    data = OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)
    unknown = set(data) - set(MODEL_CONFIG_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown model config keys {sorted(unknown)}; allowed: {sorted(MODEL_CONFIG_DEFAULTS)}")
    data = {**copy.deepcopy(MODEL_CONFIG_DEFAULTS), **data}
    for key, allowed in (("dtype", tuple(DTYPES)), ("tokenizer", TOKENIZERS)):
        if data[key] not in allowed:
            raise ValueError(f"model {key}={data[key]!r} is not allowed; use one of {allowed}")
    return data


def _build_tokenizer(kind: str, source: str | None, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    """The char tokenizer, or the checkpoint's own one (pad falls back to eos, a missing template to ChatML)."""
    if kind == "char":
        return build_char_tokenizer(padding_side="left")
    if source is None:
        raise ValueError("tokenizer='auto' needs name_or_path or local_dir; random-init models use tokenizer='char'")
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:  # base checkpoints without a template (e.g. OLMoE): use ChatML
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


class _IdsOnly:
    """Stands in for the tokenizer when only a random-init config's validity is checked (`check_arch`)."""

    bos_token_id, pad_token_id, eos_token_id = 1, 0, 2

    def __len__(self) -> int:
        return 256

    def convert_tokens_to_ids(self, token: str) -> int:
        return 3


def check_arch(cfg) -> None:
    """ValueError in one line (`model.arch.<key>=<value>: <why>`) when the transformers config class rejects a
    random-init model's `arch` (a wrong type, inconsistent sizes); builds the config only: no tokenizer, no weights.
    Nothing to check when a checkpoint is loaded (name_or_path or local_dir)."""
    cfg = _read_config(cfg)
    if cfg["local_dir"] or cfg["name_or_path"]:
        return
    try:
        get_family(cfg["family"]).random_config(cfg["arch"], _IdsOnly())
    except Exception as exc:  # noqa: BLE001 - transformers raises TypeError, ValueError or its validation errors
        why = str(exc.__cause__ or exc).splitlines()[-1].strip()
        field = re.search(r"field '(\w+)'", str(exc))
        arch = cfg["arch"]
        key = field.group(1) if field and field.group(1) in arch else None
        where = f"model.arch.{key}={arch[key]!r}" if key else "model.arch"
        raise ValueError(f"{where}: {why} (transformers' {cfg['family']} config class)") from None


def build_policy(cfg) -> Policy:
    """Build the policy described by `cfg` (ModelConfig, DictConfig or dict with its fields).

    Random init from `arch` when neither name_or_path nor local_dir is set (seed torch before calling);
    otherwise the checkpoint at local_dir (preferred) or name_or_path, via the family's Auto class.
    """
    cfg = _read_config(cfg)
    family = get_family(cfg["family"])
    source = cfg["local_dir"] or cfg["name_or_path"]
    tokenizer = _build_tokenizer(cfg["tokenizer"], source, cfg["trust_remote_code"])
    load_kwargs = {"dtype": DTYPES[cfg["dtype"]], "attn_implementation": cfg["attn_implementation"],
                   "trust_remote_code": cfg["trust_remote_code"]}
    if source is None:
        model = family.auto_model.from_config(family.random_config(cfg["arch"], tokenizer), **load_kwargs)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = _special_ids(tokenizer)["bos_token_id"]
    else:
        model = family.auto_model.from_pretrained(source, **load_kwargs)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if family.suppressed_token_ids(tokenizer):
        model.generation_config.suppress_tokens = family.suppressed_token_ids(tokenizer)
    if cfg["gradient_checkpointing"]:  # renamed activation checkpointing in transformers 5
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    processor = family.build_processor(tokenizer, source, cfg["trust_remote_code"])
    return Policy(model=model, tokenizer=tokenizer, processor=processor, family=cfg["family"])


from seqrl.eval import oracle as _oracle  # noqa: E402,F401 - registers the "oracle" family (seqrl-eval only)
