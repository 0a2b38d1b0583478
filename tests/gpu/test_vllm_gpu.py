"""rollout.engine=vllm with real vLLM on a CUDA GPU (marker `gpu`; run with `pytest -m gpu tests/gpu`).

- a seqrl HF export of tiny_dense, loaded by vLLM, decodes greedily the same tokens as the HF engine, before and
  after the policy's weights change (the in-memory weight push reaches vLLM's model);
- a 10-step GRPO run of seqrl-train with rollout.engine=vllm completes;
- rollout tokens/s of vLLM vs HF on the same model (printed; bench/vllm_rollout.py is the full benchmark).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from vllm_rollout import load_prompts, rollout, tokens_per_s  # noqa: E402

from seqrl.algorithms.vllm_engine import ENGINE_ATTR, release_engine  # noqa: E402
from seqrl.config import RolloutConfig  # noqa: E402
from seqrl.models import build_policy  # noqa: E402

pytestmark = pytest.mark.gpu
CFG = RolloutConfig(max_new_tokens=48, temperature=1.0)


@pytest.fixture(scope="module")
def policy():
    """tiny_dense on the GPU in float32, init range 0.2 (greedy decoding varies instead of repeating one token);
    one colocated vLLM engine for the whole module."""
    cfg = OmegaConf.load(ROOT / "conf" / "model" / "tiny_dense.yaml")
    cfg.arch.initializer_range = 0.2
    torch.manual_seed(0)
    built = build_policy(cfg)
    built.model.cuda()
    yield built
    release_engine(built)


def assert_same_tokens(a, b):
    assert a.prompt_len == b.prompt_len
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.response_mask, b.response_mask)
    assert a.texts == b.texts


def test_vllm_loads_the_export_and_decodes_greedily_as_hf(policy):
    samples = load_prompts("arith", 8)
    ours = rollout("vllm", policy, samples, CFG, n=2, greedy=True)
    hf = rollout("hf", policy, samples, CFG, n=2, greedy=True)
    import vllm

    engine = getattr(policy, ENGINE_ATTR)
    assert isinstance(engine.llm, vllm.LLM) and (Path(engine.export_dir) / "model.safetensors").exists()
    assert len(set(ours.texts)) > 1  # not one repeated token: the comparison has teeth
    assert_same_tokens(ours, hf)


def test_weight_push_reaches_vllm(policy):
    samples = load_prompts("arith", 8)
    before = rollout("vllm", policy, samples, CFG, n=1, greedy=True)
    with torch.no_grad():
        for param in policy.model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    after = rollout("vllm", policy, samples, CFG, n=1, greedy=True)
    assert not torch.equal(before.input_ids, after.input_ids)
    assert_same_tokens(after, rollout("hf", policy, samples, CFG, n=1, greedy=True))
    assert getattr(policy, ENGINE_ATTR).syncs >= 2


def test_rollout_tokens_per_s_vllm_vs_hf(policy):
    samples = load_prompts("arith", 32)
    rates = {}
    for engine in ("hf", "vllm"):
        tokens_per_s(engine, policy, samples, CFG, 8, seed=1)  # warm-up
        rates[engine] = tokens_per_s(engine, policy, samples, CFG, 8, seed=2)[0]
    print(f"\nrollout tokens/s on {torch.cuda.get_device_name()}, tiny_dense, 32 prompts x 8, budget "
          f"{CFG.max_new_tokens}: hf {rates['hf']:.0f}, vllm {rates['vllm']:.0f}, "
          f"vllm/hf {rates['vllm'] / rates['hf']:.2f}")
    assert rates["hf"] > 0 and rates["vllm"] > 0


def test_grpo_10_steps_with_the_vllm_engine(tmp_path):
    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "seqrl-train"), "experiment=smoke", "trainer=gpu", "rollout.engine=vllm",
           "trainer.max_steps=10", "logger=csv", "eval.limit=8", f"hydra.run.dir={out}"]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["rl_steps"] == 10
    assert results["train"]["perf/weight_sync_s"] >= 0 and results["train"]["perf/gen_tokens_per_s"] > 0
