"""Model families, the char tokenizer and the Policy wrapper, on the tiny random-init configs (CPU, offline)."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from transformers import AutoTokenizer

from conftest import DATA_DIR
from seqrl.models import FAMILIES, MODEL_CONFIG_DEFAULTS, build_policy, router_metrics
from seqrl.tokenizer import build_char_tokenizer

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "conf" / "model"
LOGICVISTA_IMAGES = DATA_DIR / "logicvista" / "images"
TINY = {"dense": "tiny_dense", "moe": "tiny_moe", "vl": "tiny_vl"}
PROMPTS = ["What is 2+2?", "A much longer prompt, so that the first one gets left padding."]
RESPONSES = ["The answer is 4.<|im_end|>", "x"]


def tiny_cfg(family: str, **overrides):
    return OmegaConf.merge(OmegaConf.load(MODEL_DIR / f"{TINY[family]}.yaml"), overrides)


def build(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_policy(tiny_cfg(family, **overrides))


@pytest.fixture(scope="module")
def policies():
    return {family: build(family) for family in TINY}


@pytest.fixture(scope="module")
def images():
    """A real LogicVista PNG resized to 112x112 and a generated gradient image of the same size."""
    real = Image.open(LOGICVISTA_IMAGES / "v1_0.png").convert("RGB").resize((112, 112))
    ramp = torch.arange(112, dtype=torch.uint8).repeat(112, 1)  # (H, W)
    generated = Image.fromarray(torch.stack([ramp, ramp.T, 255 - ramp], -1).numpy(), "RGB")
    return real, generated


def prompt_images(family, images, n):
    """One image per prompt for vl (generated first, then the real one), None otherwise."""
    return [[images[1]], [images[0]]][:n] if family == "vl" else None


def mm_inputs(batch):
    return {key: value for key, value in batch.items() if key not in ("input_ids", "attention_mask")}


def response_logprobs(policy, batch, responses):
    """Log-probs (B, R) of right-padded `responses` (B, R) after the left-padded prompts in `batch`."""
    prompt_len = batch["input_ids"].shape[1]
    input_ids = torch.cat([batch["input_ids"], responses], 1)  # (B, P+R)
    mask = torch.cat([batch["attention_mask"], (responses != policy.pad_token_id).long()], 1)  # (B, P+R)
    logits = policy.forward(input_ids, mask, **mm_inputs(batch)).logits[:, prompt_len - 1 : -1]  # (B, R, V)
    return torch.log_softmax(logits.float(), -1).gather(-1, responses[..., None])[..., 0]


# ------------------------------------------------------------------------------------------------- tokenizer
def test_char_tokenizer_ids_round_trip_and_unknowns():
    tok = build_char_tokenizer()
    assert len(tok) == 104 and tok.pad_token_id == 0 and tok.eos_token_id == 2 and tok.unk_token_id == 7
    assert tok("a\n~<|im_end|>", add_special_tokens=False)["input_ids"] == [74, 8, 103, 2]  # 'a' = 9 + 97 - 32
    text = "".join(chr(c) for c in range(32, 127)) + "\nline two\n\n<|im_start|>user<|image_pad|><|endoftext|>"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok("é€", add_special_tokens=False)["input_ids"] == [7, 7]
    assert build_char_tokenizer().get_vocab() == tok.get_vocab()


def test_char_tokenizer_padding_side_and_bad_value():
    right = build_char_tokenizer(padding_side="right")(["a", "abc"], padding=True)["input_ids"]
    left = build_char_tokenizer(padding_side="left")(["a", "abc"], padding=True)["input_ids"]
    assert right[0] == [74, 0, 0] and left[0] == [0, 0, 74]
    with pytest.raises(ValueError, match="padding_side='middle'"):
        build_char_tokenizer(padding_side="middle")


def test_chat_template_renders_chatml_with_image_parts():
    tok = build_char_tokenizer()
    parts = [{"type": "image"}, {"type": "text", "text": "Which?"}]
    text = tok.apply_chat_template([{"role": "user", "content": parts}], tokenize=False, add_generation_prompt=True)
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    assert text == f"<|im_start|>user\n{image}Which?<|im_end|>\n<|im_start|>assistant\n"
    plain = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert plain == "<|im_start|>user\nHi<|im_end|>\n"


def test_char_tokenizer_saves_and_reloads_identically(tmp_path):
    tok = build_char_tokenizer(padding_side="right")
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "x = 1\n<|im_start|>assistant\n"
    assert again(text)["input_ids"] == tok(text)["input_ids"] and again.get_vocab() == tok.get_vocab()
    assert again.chat_template == tok.chat_template and again.padding_side == "right"
    assert (again.pad_token, again.eos_token, again.unk_token) == ("<|endoftext|>", "<|im_end|>", "<|unk|>")


# ---------------------------------------------------------------------------------------------------- build
@pytest.mark.parametrize(
    "family, low, high, model_class",
    [("dense", 250_000, 350_000, "Qwen3ForCausalLM"), ("moe", 450_000, 550_000, "Qwen3MoeForCausalLM"),
     ("vl", 500_000, 650_000, "Qwen2_5_VLForConditionalGeneration")],
)
def test_tiny_families_build_with_expected_sizes(policies, family, low, high, model_class):
    policy = policies[family]
    n_params = sum(p.numel() for p in policy.model.parameters())
    assert low <= n_params <= high and type(policy.model).__name__ == model_class
    assert policy.model.get_input_embeddings().num_embeddings == len(policy.tokenizer) == 104
    assert (policy.model.generation_config.pad_token_id, policy.model.generation_config.eos_token_id) == (0, 2)
    assert (policy.pad_token_id, policy.eos_token_id, policy.stop_token_ids) == (0, 2, [2])
    assert (policy.processor is not None) == (family == "vl")
    assert policy.model.generation_config.suppress_tokens == ([3, 4, 5, 6] if family == "vl" else None)


def test_moe_and_vl_architecture_details(policies):
    moe = policies["moe"].model.config
    assert moe.num_experts == 8 and moe.num_experts_per_tok == 2
    vl = policies["vl"].model.config
    vocab = policies["vl"].tokenizer.get_vocab()
    assert (vl.image_token_id, vl.vision_start_token_id, vl.vision_end_token_id) == (5, 3, 4) == (
        vocab["<|image_pad|>"], vocab["<|vision_start|>"], vocab["<|vision_end|>"])
    assert vl.vision_config.depth == 2 and vl.vision_config.out_hidden_size == vl.text_config.hidden_size == 128
    assert sum(p.numel() for p in policies["vl"].model.model.visual.parameters()) == 257_344


@pytest.mark.parametrize("family", list(TINY))
def test_same_seed_same_weights(policies, family):
    same, other = build(family, seed=0).model.state_dict(), build(family, seed=1).model.state_dict()
    reference = policies[family].model.state_dict()
    assert all(torch.equal(reference[name], same[name]) for name in reference)
    assert not all(torch.equal(reference[name], other[name]) for name in reference)


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="'mamba'"):
        build_policy({"family": "mamba"})
    with pytest.raises(ValueError, match="dtype='fp8'"):
        build_policy({"dtype": "fp8"})
    with pytest.raises(ValueError, match="tokenizer='auto' needs"):
        build_policy({"tokenizer": "auto"})
    with pytest.raises(ValueError, match="layers"):
        build_policy({"layers": 2})
    assert sorted(FAMILIES) == ["dense", "moe", "oracle", "vl"]


def test_text_family_rejects_images(policies, images):
    with pytest.raises(ValueError, match="takes no images"):
        policies["dense"].encode_prompts(["hi"], images=[[images[0]]])


def test_gradient_checkpointing_gives_the_same_gradients(policies):
    checkpointed = build("dense", gradient_checkpointing=True)
    assert any(getattr(module, "gradient_checkpointing", False) for module in checkpointed.model.modules())
    grads = []
    for policy in (policies["dense"], checkpointed):
        policy.model.train()
        policy.model.zero_grad(set_to_none=True)
        policy.forward(**policy.encode_prompts(PROMPTS)).logits.logsumexp(-1).mean().backward()
        grads.append(policy.model.model.layers[0].mlp.up_proj.weight.grad.clone())
        policy.model.zero_grad(set_to_none=True)
    torch.testing.assert_close(grads[0], grads[1])


# ------------------------------------------------------------------------------------------ scoring identities
@pytest.mark.parametrize("family", list(TINY))
def test_left_padding_does_not_change_response_logprobs(policies, images, family):
    policy = policies[family]
    responses = policy.tokenizer(RESPONSES, padding=True, padding_side="right", return_tensors="pt")["input_ids"]
    alone = policy.encode_prompts(PROMPTS[:1], images=prompt_images(family, images, 1))
    batched = policy.encode_prompts(PROMPTS, images=prompt_images(family, images, 2))
    assert batched["attention_mask"][0, 0] == 0 and alone["attention_mask"].all()  # row 0 really is left-padded
    with torch.no_grad():
        lp_alone = response_logprobs(policy, alone, responses[:1])  # (1, R)
        lp_batched = response_logprobs(policy, batched, responses)  # (2, R)
    assert torch.isfinite(lp_batched).all()
    torch.testing.assert_close(lp_batched[0], lp_alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "family, do_sample, with_images",
    [("dense", False, False), ("dense", True, False), ("vl", False, True), ("vl", True, True), ("vl", True, False)],
)
def test_forward_logits_match_generate_scores(policies, images, family, do_sample, with_images):
    policy = policies[family]
    batch = policy.encode_prompts(PROMPTS, images=prompt_images(family, images, 2) if with_images else None)
    torch.manual_seed(3)
    with torch.no_grad():
        out = policy.model.generate(**batch, max_new_tokens=12, do_sample=do_sample, output_scores=True,
                                    output_logits=True, return_dict_in_generate=True)
        prompt_len = batch["input_ids"].shape[1]
        generated = out.sequences[:, prompt_len:]  # (B, N)
        is_eos = (generated == policy.eos_token_id).long()
        real = (is_eos.cumsum(1) - is_eos) == 0  # (B, N): up to and including the first eos
        mask = torch.cat([batch["attention_mask"], real.long()], 1)
        logits = policy.forward(out.sequences, mask, **mm_inputs(batch)).logits[:, prompt_len - 1 : -1]  # (B, N, V)
    seen = torch.stack(out.scores if not do_sample else out.logits, 1)  # (B, N, V): greedy scores = raw logits
    allowed = torch.ones(seen.shape[-1], dtype=torch.bool)  # vl suppresses its vision tokens (-inf scores)
    allowed[policy.model.generation_config.suppress_tokens or []] = False
    logits, seen = logits[..., allowed], seen[..., allowed]
    torch.testing.assert_close(logits[real], seen[real], atol=1e-4, rtol=0)
    if not do_sample:
        assert torch.equal(allowed.nonzero()[logits.argmax(-1)][..., 0][real], generated[real])
    if with_images:  # quirk: without mm_token_type_ids transformers uses 1-D positions, unlike generate()
        vision = {key: batch[key] for key in ("pixel_values", "image_grid_thw")}
        plain = policy.model(input_ids=out.sequences, attention_mask=mask, **vision).logits[..., allowed]
        assert (plain[:, prompt_len - 1 : -1][real] - seen[real]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ vision path
def test_vl_takes_real_images_generates_and_trains_vision(policies, images):
    policy = policies["vl"]
    real, generated = images
    batch = policy.encode_prompts(["Which shape?", "No image.", "Compare."], images=[[real], [], [generated, real]])
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]] * 3  # 112x112 / patch 14 = 8x8 patches per image
    assert batch["pixel_values"].shape == (3 * 64, 3 * 2 * 14 * 14)  # patches x (C * temporal * 14 * 14)
    assert (batch["input_ids"] == 5).sum(1).tolist() == [16, 0, 32]  # 64 patches / (2x2 merge) = 16 tokens each
    assert (batch["mm_token_type_ids"] == (batch["input_ids"] == 5)).all()
    with torch.no_grad():
        sequences = policy.model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert sequences.shape == (3, batch["input_ids"].shape[1] + 5)
    policy.model.zero_grad(set_to_none=True)
    logits = policy.forward(sequences, torch.ones_like(sequences), **mm_inputs(batch)).logits  # (B, T, V)
    torch.log_softmax(logits, -1).mean().backward()
    visual = dict(policy.model.model.visual.named_parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in visual.values())
    assert visual["patch_embed.proj.weight"].grad.abs().sum() > 0 and visual["merger.mlp.2.weight"].grad.abs().sum() > 0
    policy.model.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------------------- routers
def test_router_metrics_hand_computed():
    # layer 1: real tokens pick {0,1}, {0,1}, {0,2} -> loads (3, 2, 1, 0) / 6; the 4th token is padding
    layer1 = torch.tensor([[5.0, 4, 0, 0], [5, 4, 0, 0], [5, 0, 4, 0], [0, 0, 4, 5]])  # (B*T, E)
    layer2 = torch.tensor([[5.0, 4, 0, 0], [0, 0, 5, 4], [4, 0, 0, 5], [0, 0, 4, 5]])  # loads (2, 1, 1, 2) / 6
    outputs = SimpleNamespace(router_logits=(layer1, layer2), aux_loss=torch.tensor(1.25))
    metrics = router_metrics(outputs, torch.tensor([[1, 1], [1, 0]]), top_k=2)
    mean = 0.25
    cv1 = torch.tensor([3.0, 2, 1, 0]).div(6).std(unbiased=False).item() / mean
    cv2 = torch.tensor([2.0, 1, 1, 2]).div(6).std(unbiased=False).item() / mean
    assert metrics["moe/load_max_over_mean"] == pytest.approx(((3 / 6) / mean + (2 / 6) / mean) / 2)
    assert metrics["moe/load_cv"] == pytest.approx((cv1 + cv2) / 2)
    assert metrics["moe/aux_loss"] == 1.25


def test_router_metrics_on_tiny_moe_and_other_families(policies):
    batch = policies["moe"].encode_prompts(PROMPTS)
    with torch.no_grad():
        outputs = policies["moe"].forward(**batch)
        dense_outputs = policies["dense"].forward(**policies["dense"].encode_prompts(PROMPTS))
    metrics = policies["moe"].router_metrics(outputs, batch["attention_mask"])
    assert set(metrics) == {"moe/load_max_over_mean", "moe/load_cv", "moe/aux_loss"}
    assert all(torch.isfinite(torch.tensor(value)) for value in metrics.values())
    assert 1.0 <= metrics["moe/load_max_over_mean"] <= 8.0 and metrics["moe/aux_loss"] > 0
    assert router_metrics(dense_outputs, batch["attention_mask"]) == {}


# ------------------------------------------------------------------------------------------------ save/load
@pytest.mark.parametrize("family", ["dense", "vl"])
def test_save_and_reload_gives_identical_logits(policies, images, tmp_path, family):
    policy = policies[family]
    policy.save(str(tmp_path))
    again = build_policy({"family": family, "local_dir": str(tmp_path), "tokenizer": "auto"})
    batch = policy.encode_prompts(PROMPTS, images=prompt_images(family, images, 2))
    batch_again = again.encode_prompts(PROMPTS, images=prompt_images(family, images, 2))
    assert batch.keys() == batch_again.keys() and all(torch.equal(batch[k], batch_again[k]) for k in batch)
    with torch.no_grad():
        logits, logits_again = policy.forward(**batch).logits, again.forward(**batch_again).logits
    assert torch.equal(logits, logits_again)
    assert (again.pad_token_id, again.eos_token_id) == (0, 2)


# --------------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("path", sorted(MODEL_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_model_yamls_match_schema(path):
    first_line = path.read_text().splitlines()[0]
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    assert first_line.startswith("# ") and len(first_line) > 10
    assert set(cfg) == set(MODEL_CONFIG_DEFAULTS) and cfg["family"] in FAMILIES
    if cfg["name_or_path"] is not None:  # real checkpoints: never loaded in tests
        settings = (cfg["tokenizer"], cfg["dtype"], cfg["gradient_checkpointing"], cfg["arch"])
        assert settings == ("auto", "bfloat16", True, {})
    else:
        assert cfg["tokenizer"] == "char" and cfg["arch"]
