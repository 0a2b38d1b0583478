"""trainer=fsdp on one CUDA GPU (marker `gpu`; run with `pytest -m gpu tests/gpu/test_fsdp_gpu.py`).

10 GRPO steps of seqrl-train on tiny_dense with the paper trainer as configured (FSDP2, bf16-mixed, activation
checkpointing, gathered generation, sharded checkpoints) on devices=1: the run ends, the sharded checkpoint holds
fp32 master weights beside the bf16 reference model, and the HF export reloads and generates.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, compose, tiny_overrides

pytestmark = pytest.mark.gpu


def test_ten_grpo_steps_under_fsdp_on_one_gpu(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    from seqrl.algorithms.rollout import hf_generate
    from seqrl.config import RolloutConfig
    from seqrl.data import load_samples
    from seqrl.models import build_policy

    assert torch.cuda.is_available(), "the gpu marker needs a CUDA device"
    exe = Path(sys.executable).with_name("seqrl-train")
    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith(("paths.output_dir", "trainer.max_steps"))]
    cmd = [str(exe), *overrides, "trainer=fsdp", "trainer.devices=1", "trainer.num_nodes=1", "trainer.max_steps=10",
           "algorithm=grpo", "model.dtype=bfloat16", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1200, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["rl_steps"] == 10 and res["world_size"] == 1
    assert 0.0 <= res["train"]["train/reward/mean"] <= 1.0 and res["train"]["perf/tokens_per_s"] > 0

    meta = FileSystemReader(str(tmp_path / "checkpoints" / "last.ckpt")).read_metadata().state_dict_metadata
    dtypes = {k: v.properties.dtype for k, v in meta.items()
              if k.startswith("state_dict.") and hasattr(v, "properties")}
    assert {d for k, d in dtypes.items() if k.startswith("state_dict.model.")} == {torch.float32}  # fp32 master
    assert {d for k, d in dtypes.items() if k.startswith("state_dict.ref.")} == {torch.bfloat16}  # frozen, as loaded

    export = build_policy({"family": "dense", "local_dir": str(tmp_path / "hf"), "tokenizer": "auto",
                           "dtype": "bfloat16"})
    c = compose("train", [f"paths.output_dir={tmp_path}"])
    samples = load_samples(c.data, "eval", c.paths.data_dir)[:3]
    roll = hf_generate(export, samples, RolloutConfig(max_new_tokens=8), n=2, greedy=True)
    assert roll.input_ids.shape[0] == 6 and roll.response_mask.sum() > 0
