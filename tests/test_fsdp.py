"""FSDP2 (trainer=fsdp) on CPU: the strategy composes, 2 gloo processes shard the tiny models exactly, generate
with different step counts per rank, and a 2-process seqrl-train run ends with the same weights as DDP."""
from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

from conftest import ROOT, compose, run_ranks, tiny_overrides

TEXTS = ["1+2=3\n\\boxed{3}", "\\boxed{7}", "4+4=8\n8-1=7\n\\boxed{7}", "x"]  # unequal lengths: padding differs
LAYERS = {"tiny_dense": {"Qwen3DecoderLayer"}, "tiny_moe": {"Qwen3MoeDecoderLayer"},
          "tiny_vl": {"Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"}}


def _policy(model: str = "tiny_dense", *extra: str):
    from seqrl.models import build_policy

    data = ["data=image_count"] if model == "tiny_vl" else []
    c = compose("train", [f"model={model}", *data, "paths.output_dir=/tmp/unused", *extra])
    torch.manual_seed(0)
    return build_policy(c.model), c


@pytest.mark.parametrize("model", list(LAYERS))
def test_fsdp_units_are_each_familys_decoder_layers(model):
    from seqrl.distributed import layer_classes

    policy, _ = _policy(model)
    assert layer_classes(policy.model) == LAYERS[model]
    first = sorted(LAYERS[model])[0]
    assert layer_classes(policy.model, [first]) == {first}  # named explicitly: exactly those


def test_qwen2_5_checkpoints_shard_qwen2_decoder_layers():
    """Qwen2.5-7B loads as Qwen2ForCausalLM: its unit is Qwen2DecoderLayer (a tiny config of the same class)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from seqrl.distributed import layer_classes

    cfg = AutoConfig.for_model("qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert layer_classes(model) == {"Qwen2DecoderLayer"}


def test_a_layer_class_the_model_lacks_is_a_one_line_error():
    from seqrl.distributed import layer_classes

    policy, _ = _policy()
    with pytest.raises(ValueError, match=r"layer_classes=\['LlamaDecoderLayer'\].*Qwen3ForCausalLM"):
        layer_classes(policy.model, ["LlamaDecoderLayer"])
    with pytest.raises(ValueError, match="Qwen3DecoderLayer', 'Typo"):  # one typo in a list is not ignored
        layer_classes(policy.model, ["Qwen3DecoderLayer", "Typo"])


def test_trainer_fsdp_composes_into_the_fsdp2_strategy():
    from hydra.utils import instantiate

    from seqrl.config import validate
    from seqrl.distributed import FSDP2Strategy

    cfg = compose("train", ["trainer=fsdp", "paths.output_dir=/tmp/unused"])
    c = validate(cfg)
    assert (c.trainer.accelerator, c.trainer.precision, c.trainer.devices, c.trainer.world_size) == \
        ("gpu", "bf16-mixed", 8, 8)
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDP2Strategy)
    assert strategy.activation_checkpointing and strategy.gather_for_generation and strategy.layer_classes is None
    assert strategy._save_distributed_checkpoint and strategy.reduce_dtype == torch.float32
    with pytest.raises(ValueError, match="reduce_dtype='fp8'"):
        FSDP2Strategy(reduce_dtype="fp8")


# ------------------------------------------------------------------------------------- two gloo processes
def _half_loss(policy, rows: torch.Tensor) -> torch.Tensor:
    return policy.model(input_ids=rows, use_cache=False).logits.float().logsumexp(-1).mean()


def _response_loss(policy, samples: list, rows: list[int]) -> torch.Tensor:
    """Summed response log-probs of `rows` (the training path: chat prompts, images for vl, Policy.forward)."""
    from seqrl.algorithms.rollout import response_logprobs, rollout_from_texts

    batch = rollout_from_texts(policy, [samples[i] for i in rows], [TEXTS[i] for i in rows])
    return (response_logprobs(policy, batch, 1.0)[0] * batch.response_mask).sum()


def _check_sharded_training(model_name: str, rank: int, mesh) -> None:
    """FSDP gradients = the 1-process gradient of the mean loss over both ranks' rows; shards hold the rest."""
    from torch.distributed.tensor import DTensor

    from seqrl.data import load_samples
    from seqrl.distributed import shard_model

    reference, c = _policy(model_name)
    policy, _ = _policy(model_name)
    assert shard_model(policy.model, mesh) == len([m for m in reference.model.modules()
                                                  if type(m).__name__ in LAYERS[model_name]]) + 1
    samples = load_samples(c.data, "eval", c.paths.data_dir)[:4]  # vl: image_count items, with images
    sum(_response_loss(reference, samples, [r, r + 2]) / 2 for r in range(2)).backward()
    _response_loss(policy, samples, [rank, rank + 2]).backward()
    for (name, p), ref in zip(policy.model.named_parameters(), reference.model.parameters()):
        assert isinstance(p, DTensor) and p.to_local().shape[0] <= (ref.shape[0] + 1) // 2, name
        assert torch.allclose(p.grad.full_tensor(), ref.grad, atol=1e-6, rtol=1e-5), (model_name, name)


def _check_strategy(rank: int, mesh) -> None:
    """FSDP2Strategy.shard_module: units, activation checkpointing, gathered rollout, reshard, export, checksum."""
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision
    from torch.distributed.tensor import DTensor

    from seqrl.algorithms.rollout import standard_rollout
    from seqrl.config import RolloutConfig
    from seqrl.data import load_samples
    from seqrl.distributed import FSDP2Strategy, export_policy, full_params, gather_objects, params_checksum

    reference, c = _policy()
    policy, _ = _policy()
    holder = torch.nn.Module()
    holder.model, holder.ref = policy.model, copy.deepcopy(policy.model).requires_grad_(False)
    strategy = FSDP2Strategy()
    strategy._device_mesh, strategy.precision_plugin = mesh, Precision()
    strategy.connect(holder)
    strategy.shard_module(holder)
    assert holder.model.is_gradient_checkpointing and not holder.ref.is_gradient_checkpointing
    embed = lambda m: m.model.embed_tokens.weight  # noqa: E731
    strategy._gather()  # as at the start of a training step
    assert not isinstance(embed(holder.model), DTensor) and isinstance(embed(holder.ref), DTensor)
    samples = load_samples(c.data, "eval", c.paths.data_dir)[rank * 2:rank * 2 + 2]
    cfg = RolloutConfig(max_new_tokens=3 + 9 * rank)  # rank 1 decodes more steps: no collective may run
    torch.manual_seed(5)
    sharded = standard_rollout(policy, samples, cfg, n=2)
    torch.manual_seed(5)
    assert torch.equal(sharded.input_ids, standard_rollout(reference, samples, cfg, n=2).input_ids)
    _half_loss(policy, sharded.input_ids).backward()  # the first gradient-enabled forward reshards
    assert not strategy._gathered and isinstance(embed(holder.model), DTensor)
    with full_params(holder.ref) as ref:  # any sharded model, e.g. for a weight push to an inference engine
        assert not isinstance(embed(ref), DTensor)
    assert isinstance(embed(holder.ref), DTensor)
    export = export_policy(policy, torch.float32)
    if rank == 0:
        full = export.model.state_dict()
        assert all(torch.equal(full[k], v) for k, v in reference.model.state_dict().items())
    assert export is None if rank else export is not None
    checksums = gather_objects(params_checksum(policy.model.parameters()))
    assert checksums[0] == checksums[1] == pytest.approx(params_checksum(reference.model.parameters()), rel=1e-9)

    mixed, _ = _policy("tiny_dense", "model.dtype=bfloat16")  # a bf16 checkpoint under bf16-mixed
    holder = torch.nn.Module()
    holder.model, holder.ref = mixed.model, copy.deepcopy(mixed.model).requires_grad_(False)
    strategy = FSDP2Strategy(gather_for_generation=False)
    strategy._device_mesh, strategy.precision_plugin = mesh, MixedPrecision("bf16-mixed", "cpu")
    strategy.connect(holder)
    strategy.shard_module(holder)
    assert {p.dtype for p in holder.model.parameters()} == {torch.float32}  # fp32 master shards
    assert {p.dtype for p in holder.ref.parameters()} == {torch.bfloat16}
    assert holder.model(input_ids=torch.tensor([[5, 6, 7]])).logits.dtype == torch.bfloat16  # bf16 compute


def _worker(rank: int, init: str, out) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",))
        for model_name in LAYERS:
            _check_sharded_training(model_name, rank, mesh)
        _check_strategy(rank, mesh)
        out.put((rank, "ok"))
    except BaseException:  # noqa: BLE001 - the parent reports the rank's traceback
        out.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_shard_generate_and_export_exactly(tmp_path):
    results = run_ranks(_worker, lambda r, init, out: (r, init, out), tmp_path)
    assert results == {0: "ok", 1: "ok"}, "\n".join(results.values())


# ---------------------------------------------------------------------------------------------- end to end
def _train(out: Path, trainer: str, *extra: str) -> dict:
    """seqrl-train with the `replay` rollout (tests/fixtures/replay_train.py): fixed responses with rewards that
    vary in every group, so both steps update and both runs train on the same tokens, whatever the float noise
    between their weights would make a sampler draw."""
    script = ROOT / "tests" / "fixtures" / "replay_train.py"
    overrides = [o for o in tiny_overrides(out) if not o.startswith("paths.output_dir")]
    cmd = [sys.executable, str(script), *overrides, f"trainer={trainer}", "trainer.accelerator=cpu",
           "trainer.devices=2", "trainer.precision=32-true", "rollout.name=replay", f"hydra.run.dir={out}",
           "algorithm=grpo", *extra]  # grpo: KL to a sharded reference
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ})
    first = proc.stderr.find("Traceback")  # the rank that failed first, then how the run ended
    assert proc.returncode == 0, proc.stderr[first:first + 3000] + "\n...\n" + proc.stderr[-1500:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_seqrl_train_fsdp_two_processes_ends_where_ddp_does(tmp_path):
    from safetensors.torch import load_file

    fsdp = _train(tmp_path / "fsdp", "fsdp", "micro_batch_size=3")  # and its update in parts of <= 3 rows
    ddp = _train(tmp_path / "ddp", "ddp")
    assert fsdp["world_size"] == 2 and fsdp["rl_steps"] == 2
    rows = list(csv.DictReader(next((tmp_path / "fsdp" / "csv").rglob("metrics.csv")).open()))
    assert any(float(r["train/grad_norm"] or 0) > 0 for r in rows)  # the weights did move
    assert fsdp["train"] == pytest.approx({**ddp["train"], **{k: fsdp["train"][k] for k in fsdp["train"]
                                                              if k.startswith("perf/")}}, rel=1e-5)
    assert fsdp["eval"] == ddp["eval"]
    a, b = (load_file(tmp_path / run / "hf" / "model.safetensors") for run in ("fsdp", "ddp"))
    # FSDP checkpoints activations, so it scores on the full-width path while DDP encodes each prompt once: the
    # log-probs agree to float rounding, and AdamW's ~lr * sign(g) steps can flip only where a gradient is ~0
    lr, steps = 2.0e-4, 2
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k] - b[k]).abs()
        assert float(diff.max()) <= 2 * lr * steps and float((diff > 1e-6).float().mean()) < 1e-3, k
    last = tmp_path / "fsdp" / "checkpoints" / "last.ckpt"  # a sharded checkpoint: one file per rank
    assert last.is_dir() and sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
