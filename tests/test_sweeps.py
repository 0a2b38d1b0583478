"""Sweep files (sweeps/*.yaml) and study arms (sweeps/arm/*.yaml) compose into the runs they promise.

tests/test_configs.py composes every value of every sweep parameter; these tests check what the composed configs
hold: each arm's algorithm and rollout, the length-bias study's 48 jobs, the paper sweeps' models, and that a
multirun in which one job fails keeps the other jobs' results (joblib launcher) and reports the failure.
"""
from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, compose
from seqrl.cli import conf_dir, group_options
from seqrl.train import run_name

SWEEPS = ROOT / "sweeps"
ARMS = {"grpo": ("grpo", "standard"), "dr_grpo": ("dr_grpo", "standard"), "dapo": ("dapo", "standard"),
        "rloo": ("rloo", "standard"), "gspo": ("gspo", "standard"), "luspo": ("luspo", "standard"),
        "fspo": ("fspo", "standard"), "gspo_eqlen": ("gspo", "eqlen")}


def _params(sweep: str) -> dict[str, list[str]]:
    params = OmegaConf.load(SWEEPS / f"{sweep}.yaml").hydra.sweeper.params
    return {k: [v.strip() for v in str(vals).split(",")] for k, vals in params.items()}


def _compose(sweep: str, overrides: list[str]):
    from seqrl.config import validate

    cfg = compose(sweep, [*overrides, f"hydra.searchpath=[file://{conf_dir()}]"], config_dir=SWEEPS)
    validate(cfg)
    return cfg


def test_every_arm_file_is_listed_and_selects_its_algorithm_and_rollout():
    assert sorted(p.stem for p in (SWEEPS / "arm").glob("*.yaml")) == sorted(ARMS)
    for arm, (algorithm, rollout) in ARMS.items():
        cfg = _compose("smoke", [f"+arm={arm}"])
        assert (cfg.algorithm.name, cfg.rollout.name) == (algorithm, rollout), arm
    assert run_name(_compose("smoke", ["+arm=gspo_eqlen"])) == "gspo+eqlen"


def test_length_bias_study_is_48_runs_of_8_arms_2_models_3_seeds():
    params = _params("length_bias")
    assert params["+arm"] == list(ARMS) and params["model"] == ["tiny_dense", "tiny_moe"]
    assert params["seed"] == ["0", "1", "2"] and params["experiment"] == ["length_bias"]
    assert len(list(itertools.product(*params.values()))) == 48
    names = set()
    for arm, model in itertools.product(params["+arm"], params["model"]):
        cfg = _compose("length_bias", ["experiment=length_bias", f"+arm={arm}", f"model={model}", "seed=2"])
        names.add((run_name(cfg), cfg.model.family))
        assert cfg.seed == 2 and cfg.warmup.enabled and cfg.warmup.seed == 0  # one warm-up shared by all seeds
        assert cfg.trainer.max_steps == 40 and cfg.eval.every_n_steps == 10 and "arith_long" in cfg.eval.benchmarks
        assert (cfg.prompts_per_step, cfg.rollout.group_size, cfg.rollout.max_new_tokens) == (8, 8, 64)
    assert len(names) == 16 and ("gspo+eqlen", "moe") in names


def test_smoke_sweep_covers_every_algorithm_and_rollout():
    params = _params("smoke")
    assert sorted(params["algorithm"]) == group_options("algorithm")
    assert sorted(params["rollout"]) == group_options("rollout") == ["eqlen", "standard"]
    assert params["model"] == ["tiny_dense"] and params["trainer.max_steps"] == ["1"]


@pytest.mark.parametrize("sweep,hf_id,data,suite", [
    ("paper_dense_math", "Qwen/Qwen2.5-7B", "dapo_math_17k", "math"),
    ("paper_moe_math", "Qwen/Qwen3-30B-A3B", "dapo_math_17k", "math"),
    ("paper_vl", "Qwen/Qwen2.5-VL-7B-Instruct", "virl39k", "vision"),
])
def test_paper_sweeps_name_the_papers_models_on_fsdp(sweep, hf_id, data, suite):
    params = _params(sweep)
    assert params["+arm"] == list(ARMS)
    cfg = _compose(sweep, ["+arm=luspo", "seed=0"])
    assert (cfg.model.name_or_path, cfg.data.name, cfg.eval.name) == (hf_id, data, suite)
    assert cfg.trainer.accelerator == "gpu" and cfg.algorithm.name == "luspo"
    assert cfg.trainer.strategy._target_ == "seqrl.distributed.FSDP2Strategy"
    assert "our choice" in (SWEEPS / f"{sweep}.yaml").read_text()


@pytest.mark.slow
def test_a_failing_job_does_not_lose_the_others(tmp_path, monkeypatch):
    """A two-job multirun through the joblib launcher where job 1 fails validation: job 0 still trains and writes
    results.json, the sweep exits non-zero, and the report lists one finished and one failed run."""
    monkeypatch.setenv("SEQRL_CACHE_DIR", str(tmp_path / "cache"))
    exe = Path(sys.executable).with_name("seqrl-train")
    tiny = ["trainer.max_steps=2", "prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=16",
            "warmup.steps=20", "warmup.batch_size=8", "eval.n_samples=1", "eval.limit=4", "eval.max_new_tokens=16",
            "eval.every_n_steps=0", "logger=csv"]
    proc = subprocess.run([str(exe), "-m", "--config-dir", str(SWEEPS), "--config-name", "length_bias",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}", "model=tiny_dense", "+arm=gspo", "seed=0",
                           "optim.lr=2e-4,-1", *tiny], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode != 0 and "optim.lr=-1.0: must be > 0" in proc.stderr, proc.stderr[-2000:]
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert jobs == ["0_dense_gspo_standard_seed0", "1_dense_gspo_standard_seed0"]
    assert (tmp_path / "sweep" / jobs[0] / "results.json").exists()
    assert (tmp_path / "sweep" / jobs[0] / "csv" / "version_0" / "metrics.csv").exists()
    from seqrl.report import build_tables
    from seqrl.runs import NO_RESULTS, load_local

    row = build_tables(load_local([str(tmp_path / "sweep")]), ["avg@*"], [])["dense"]["gspo"]
    assert len(row.runs) == 1 and len(row.failed) == 1 and row.failed[0].rel == jobs[1]
    assert row.failed[0].error in (NO_RESULTS, "ValueError: optim.lr=-1.0: must be > 0")  # the latter: error.json
