"""seqrl.capacity: exact parameter counts (tiny models built for real, paper models on the meta device), the KV-cache
formula, every component of a hand-computed tiny FSDP config, and the GPU-count search."""
from __future__ import annotations

import pytest
import torch

from conftest import compose
from seqrl import capacity
from seqrl.capacity import ARCHS, GIB, Arch, arch_of, estimate, gpus_needed, kv_cache_bytes, param_counts, peaks

TINY = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
        "prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=6", "paths.output_dir=/tmp/unused"]


@pytest.mark.parametrize("model", ["tiny_dense", "tiny_moe", "tiny_vl"])
def test_parameter_count_equals_the_built_models_numel(model):
    from seqrl.models import build_policy

    c = compose("train", [f"model={model}", "paths.output_dir=/tmp/unused"]
                + (["data=image_count"] if model == "tiny_vl" else []))
    policy = build_policy(c.model)
    counts = param_counts(arch_of(c.model))
    assert counts["total"] == sum(p.numel() for p in policy.model.parameters())
    layers = [m for m in policy.model.modules() if type(m).__name__ in policy.model._no_split_modules]
    assert counts["layer"] == max(sum(p.numel() for p in m.parameters()) for m in layers
                                  if "Vision" not in type(m).__name__)


def _meta_model(name: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, Qwen2_5_VLConfig

    kw = dict(ARCHS[name])
    model_type = kw.pop("model_type")
    vl = model_type == "qwen2_5_vl"
    config = Qwen2_5_VLConfig(**kw) if vl else AutoConfig.for_model(model_type, **kw)
    with torch.device("meta"):
        return config, (AutoModelForImageTextToText if vl else AutoModelForCausalLM).from_config(config)


PUBLISHED = {  # billions of parameters (total, active) on the model cards, to the digits they give
    "Qwen/Qwen2.5-7B": (7.61, None), "Qwen/Qwen3-30B-A3B": (30.5, 3.3), "Qwen/Qwen2.5-VL-7B-Instruct": (8.3, None),
    "Qwen/Qwen3-0.6B": (0.6, None), "allenai/OLMoE-1B-7B-0924": (6.9, 1.3), "Qwen/Qwen2.5-VL-3B-Instruct": (3.8, None),
    "Qwen/Qwen2.5-32B": (32.8, None),  # from config.json (the card rounds to 32.5)
}


@pytest.mark.parametrize("name", list(ARCHS))
def test_published_architectures_count_exactly_and_match_their_cards(name):
    config, model = _meta_model(name)
    counts = param_counts(Arch.from_hf(config))
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    decoder = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    assert counts["layer"] == sum(p.numel() for p in decoder[0].parameters())
    total, active = PUBLISHED[name]
    last_digit = 10.0 ** -len(str(total).split(".")[1])  # cards round or truncate to their last digit
    assert abs(counts["total"] / 1e9 - total) < last_digit
    assert active is None or abs(counts["active"] / 1e9 - active) < 0.1


def test_every_real_model_config_has_its_architecture():
    from seqrl.cli import group_options

    for option in group_options("model"):
        cfg = compose("train", [f"model={option}", "paths.output_dir=/tmp/unused"]
                      + (["data=image_count"] if "vl" in option else []))
        if option != "oracle":
            assert param_counts(arch_of(cfg.model))["total"] > 0, option
    bad = compose("train", ["model=qwen3_0_6b", "model.name_or_path=org/unknown", "paths.output_dir=/tmp/unused"])
    with pytest.raises(ValueError, match="model.name_or_path='org/unknown': no published architecture"):
        arch_of(bad.model)


def test_kv_cache_bytes_formula():
    tiny = arch_of(compose("train", ["paths.output_dir=/tmp/unused"]).model)  # 2 layers, 2 kv heads of 32
    assert kv_cache_bytes(tiny, tokens=10, dtype_bytes=2) == 2 * 2 * 2 * 32 * 10 * 2 == 5120
    config, _ = _meta_model("Qwen/Qwen2.5-7B")  # 28 layers x K,V x 4 kv heads x 128 x bf16 = 56 KiB per token
    assert kv_cache_bytes(Arch.from_hf(config), tokens=1, dtype_bytes=2) == 57344


def test_every_component_of_a_tiny_fsdp_run_by_hand():
    """tiny_dense (308,992 params, layer 147,776, hidden 128, 2 layers, kv 2 x 32, MLP 256, vocab 104) under
    trainer=fsdp on 2 ranks, 32-true, grpo (KL on: a reference model, one PPO minibatch), 4 prompts x G=4,
    prompt 10 + 6 new tokens: 8 rows of 16 tokens per rank."""
    cfg = compose("train", TINY)
    a = arch_of(cfg.model)
    assert (param_counts(a)["total"], param_counts(a)["layer"], a.vocab) == (308992, 147776, 104)
    got = estimate(cfg, prompt_len=10)
    per_layer = 4 * (6 * 128 + 2 * 2 * 32 + 4 * 256)  # working set per token and layer, fp32
    assert got == {
        "weights": 308992 * 4 / 2 + 2 * 147776 * 4,  # fp32 shard + two gathered layers
        "gradients": 308992 * 4 / 2,
        "optimizer": 2 * 308992 * 4 / 2,
        "reference": 308992 * 4 / 2,
        "rollout weights": 308992 * 4,  # gathered whole for generation
        "KV cache": 2 * 2 * 2 * 32 * (8 * 16) * 4,
        "activations": 8 * 16 * (2 * 128 * 4 + 2 * per_layer),  # checkpointed layer inputs + one layer, fwd + bwd
        "logits": 8 * 16 * 104 * 4 + 8 * 6 * 104 * 8,
    }
    states = got["weights"] + 308992 * (2 + 4 + 2)  # + gradients, optimizer, reference (bytes per parameter)
    assert peaks(got) == {"rollout": states + got["rollout weights"] + got["KV cache"],
                          "update": states + got["activations"] + got["logits"]}


def test_ddp_replicates_what_fsdp_shards():
    ddp = estimate(compose("train", [*TINY, "trainer=ddp"]), prompt_len=10)
    assert ddp["weights"] == ddp["gradients"] == 308992 * 4 and ddp["rollout weights"] == 0
    assert ddp["KV cache"] == estimate(compose("train", TINY), prompt_len=10)["KV cache"]


@pytest.mark.parametrize("experiment", ["paper_luspo_dense", "paper_luspo_moe", "paper_luspo_vl"])
def test_gpus_needed_is_the_fewest_that_fit(experiment):
    for algorithm, micro in (("luspo", None), ("luspo", 1), ("grpo", 1)):
        cfg = compose("train", [f"experiment={experiment}", f"algorithm={algorithm}", "paths.output_dir=/tmp/unused"])
        need = gpus_needed(cfg, 80.0, micro_rows=micro)
        assert need is not None and max(peaks(estimate(cfg, need, micro_rows=micro)).values()) <= 80 * GIB
        assert max(peaks(estimate(cfg, need // 2, micro_rows=micro)).values()) > 80 * GIB
        if micro is None:  # the experiment provisions what it needs with its own micro_batch_size
            assert cfg.micro_batch_size is not None and cfg.trainer.devices * cfg.trainer.num_nodes >= need
    grpo = compose("train", [f"experiment={experiment}", "algorithm=grpo", "paths.output_dir=/tmp/unused"])
    assert estimate(grpo, 8) == estimate(grpo, 8, micro_rows=grpo.micro_batch_size)  # the config's parts by default
    whole = compose("train", [f"experiment={experiment}", "algorithm=grpo", "paths.output_dir=/tmp/unused",
                              "micro_batch_size=null"])
    assert gpus_needed(whole, 80.0) is None  # one forward of 2048 rows per update: the logits alone overflow


def test_cli_prints_the_table(capsys):
    capacity.main(["experiment=paper_luspo_dense", "--micro-batch", "1"])
    out = capsys.readouterr().out
    assert "Qwen/Qwen2.5-7B: 7.62B parameters" in out and "| KV cache |" in out and "GPUs needed: 32" in out
