"""Configs under attack: bad command-line overrides for `seqrl-train` / `seqrl-eval` exit with status 2 and ONE line
on stderr naming the key, the value and what is allowed, before any model is built.

The table runs the in-process pre-check (`seqrl.cli.precheck`, what both console scripts call first) with
`seqrl.models.build_policy` made to fail if called; three cases run the real console scripts. Each bad case has a
valid neighbour that must pass, so the checks are not broader than their rule.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

# (app, overrides, what the line must contain: the key (=value), what is allowed)
BAD = [
    # unknown options of a config group
    ("train", ["algorithm=nope"], "algorithm=nope: unknown option", "allowed: dapo, dr_grpo, fspo, grpo"),
    ("train", ["model=gpt5"], "model=gpt5: unknown option", "tiny_dense"),
    ("train", ["data=mnist"], "data=mnist: unknown option", "arith, dapo_math_17k, gsm8k"),
    ("train", ["rollout=beam"], "rollout=beam: unknown option", "allowed: eqlen, standard"),
    ("train", ["eval=imagenet"], "eval=imagenet: unknown option", "allowed: math, smoke, vision"),
    ("train", ["trainer=tpu"], "trainer=tpu: unknown option", "allowed: cpu, ddp, fsdp, gpu"),
    ("train", ["rollout.name=beam"], "rollout.name='beam'", "allowed: eqlen, standard"),
    # unknown keys: the closest known key is suggested, the known keys listed
    ("train", ["trainer.max_stepz=3"], "trainer.max_stepz: unknown key (did you mean max_steps?)", "max_steps"),
    ("train", ["algorithm.clip_hgih=0.3"], "algorithm.clip_hgih: unknown key (did you mean clip_high?)", "clip_low"),
    ("train", ["optimm.lr=0.1"], "optimm: unknown key (did you mean optim?)", "allowed: algorithm"),
    ("train", ["+foo=1"], "foo: unknown key", "allowed: algorithm"),  # `+` adds keys the schema would not refuse
    ("train", ["+algorithm.kl_coeff=0.1"], "algorithm.kl_coeff: unknown key (did you mean kl_coef?)", "clip_low"),
    ("train", ["trainer=null"], "trainer=null: a config group takes one of its options", "allowed: cpu, ddp"),
    # wrong types
    ("train", ["rollout.temperature=abc"], "rollout.temperature='abc'", "must be a number"),
    ("train", ["prompts_per_step=1.5"], "prompts_per_step=1.5", "must be an integer"),
    ("train", ["warmup.enabled=maybe"], "warmup.enabled='maybe'", "must be true or false"),
    ("train", ["trainer.max_steps=1e3"], "trainer.max_steps=1000.0", "must be an integer"),
    ("train", ["rollout.group_size=[4,8]"], "rollout.group_size=[4, 8]", "must be an integer"),
    # out of range
    ("train", ["optim.lr=-1"], "optim.lr=-1.0", "must be > 0"),
    ("train", ["optim.lr=inf"], "optim.lr=inf", "must be a finite number > 0"),
    ("train", ["optim.betas=[0.9,1.5]"], "optim.betas=[0.9, 1.5]", "two numbers in [0, 1)"),
    ("train", ["rollout.top_p=1.5"], "rollout.top_p=1.5", "must be in (0, 1]"),
    ("train", ["rollout.temperature=0"], "rollout.temperature=0.0", "must be > 0"),
    ("train", ["algorithm.clip_low=1.2"], "algorithm.clip_low=1.2", "must be in [0, 1)"),
    ("train", ["rollout.group_size=0"], "rollout.group_size=0", "must be >= 1"),
    ("train", ["eval.n_samples=0"], "eval.n_samples=0", "must be >= 1"),
    ("train", ["trainer.max_steps=0"], "trainer.max_steps=0", "must be >= 1"),
    ("train", ["trainer.devices=0"], "trainer.devices=0", "an integer >= 1, -1 (all), auto"),
    ("train", ["algorithm.ppo_minibatches=0"], "algorithm.ppo_minibatches=0", "must be an integer >= 1"),
    ("train", ["warmup.worked_frac=2"], "warmup.worked_frac=2.0", "must be in [0, 1]"),
    ("train", ["threads=0"], "threads=0", "must be >= 1 or null"),
    # incompatible combinations
    ("train", ["rollout=eqlen", "rollout.group_size=3"], "rollout.group_size=3", "an even number >= 2"),
    ("train", ["eval=vision", "model=tiny_dense"], "mathvista.modality='image'", "model.family=vl"),
    ("train", ["data=image_count", "model=tiny_dense"], "image_count.modality='image'", "model.family=vl"),
    ("train", ["model=oracle"], "model.family='oracle'", "train dense, moe or vl"),
    ("train", ["rollout.group_size=1"], "rollout.group_size=1", "group-relative advantage (grpo); allowed: >= 2"),
    ("train", ["algorithm=rloo", "rollout.group_size=1"], "rollout.group_size=1", "(rloo); allowed: >= 2"),
    ("train", ["trainer=ddp", "prompts_per_step=3"], "prompts_per_step=3", "allowed: a multiple of 2"),
    ("train", ["algorithm.ppo_minibatches=32", "prompts_per_step=4", "rollout.group_size=4"],
     "algorithm.ppo_minibatches=32", "16 rollout rows; allowed: 1..16"),
    ("train", ["warmup.enabled=true", "data=gsm8k"], "warmup.enabled=True", "needs a generated task"),
    ("train", ["rollout=eqlen", "rollout.engine=hf_generate"], "rollout.engine='hf_generate'",
     "rollout=eqlen decodes with its own loop on the HF model; allowed: hf"),
    ("train", ["rollout.engine=vllm"], "rollout.engine=vllm needs a CUDA device but trainer.accelerator='cpu'",
     "allowed: trainer.accelerator in"),
    ("train", ["rollout.engine=tgi"], "rollout.engine='tgi'", "allowed: hf, hf_generate, vllm"),
    ("train", ["rollout.threads=0"], "rollout.threads=0", "must be >= 1 or null"),
    ("train", ["length_buckets=0"], "length_buckets=0", "must be >= 1"),
    ("train", ["micro_batch_size=0"], "micro_batch_size=0", "must be >= 1 or null"),
    # a random-init model's arch, checked by its transformers config class (no weights built)
    ("train", ["model.arch.hidden_size=abc"], "model.arch.hidden_size='abc'", "expected int, got str"),
    ("train", ["model.arch.num_hidden_layers=-1"], "model.arch: `num_hidden_layers` (-1)", "layer_types"),
    ("train", ["model=tiny_vl", "model.arch.text_config.hidden_size=abc"], "model.arch:", "expected int, got str"),
    ("eval", ["model.arch.num_attention_heads=x"], "model.arch.num_attention_heads='x'", "expected int"),
    # missing data
    ("train", ["data=gsm8k", "data.path=nope.jsonl"], "data.path=nope.jsonl: file not found", "set data.path"),
    # seqrl-eval
    ("eval", ["checkpoint=nope/last.ckpt"], "checkpoint='nope/last.ckpt': no such file or directory",
     "allowed: an HF export dir, a Lightning .ckpt file"),
    ("eval", ["eval=imagenet"], "eval=imagenet: unknown option", "allowed: math, smoke, vision"),
    ("eval", ["eval=vision", "model=tiny_dense"], "mathvista.modality='image'", "model.family=vl"),
    ("eval", ["eval.n_samples=0"], "eval.n_samples=0", "must be >= 1"),
    ("eval", ["eval.top_p=abc"], "eval.top_p='abc'", "must be a number"),
    ("eval", ["eval.bogus=1"], "eval.bogus: unknown key", "allowed: batch_size, benchmarks"),
]

# A valid neighbour of each kind of bad case: the same keys, an allowed value.
GOOD = [
    ("train", ["algorithm=rloo", "rollout=eqlen", "rollout.group_size=4", "trainer.max_steps=3"]),
    ("train", ["prompts_per_step=2", "warmup.enabled=false", "optim.lr=0.5", "optim.betas=[0.9,0.95]"]),
    ("train", ["rollout.top_p=1", "algorithm.clip_low=0.99", "warmup.worked_frac=1", "threads=1"]),
    ("train", ["algorithm.advantage=batch_norm", "rollout.group_size=1"]),  # not group-relative: G = 1 is fine
    ("train", ["trainer=ddp", "prompts_per_step=4", "trainer.devices=auto"]),
    ("train", ["algorithm.ppo_minibatches=16", "prompts_per_step=4", "rollout.group_size=4"]),
    ("train", ["data=image_count", "model=tiny_vl"]),
    ("train", ["data=gsm8k", "data.path=gsm8k/test.jsonl"]),
    ("train", ["model.arch.hidden_size=64", "model.arch.num_hidden_layers=1", "micro_batch_size=1"]),
    ("eval", ["model=oracle", "eval=math", "eval.n_samples=1"]),
    ("eval", ["eval=vision", "model=tiny_vl", "checkpoint=null"]),
]


@pytest.fixture
def no_model(monkeypatch):
    """Any model construction fails the test: validation must stop bad input first."""
    import seqrl.models

    monkeypatch.setattr(seqrl.models, "build_policy", lambda *a, **k: pytest.fail("a model was built"))


@pytest.mark.parametrize("app,overrides,key,allowed", BAD, ids=[" ".join(case[1]) for case in BAD])
def test_bad_override_is_one_line_before_any_model(app, overrides, key, allowed, capsys, no_model):
    from seqrl.cli import precheck

    with pytest.raises(SystemExit) as exc:
        precheck(app, overrides)
    out = capsys.readouterr()
    assert exc.value.code == 2 and out.out == ""
    lines = out.err.strip().splitlines()
    assert len(lines) == 1, out.err
    assert lines[0].startswith(f"seqrl-{app}: error: ") and key in lines[0] and allowed in lines[0], lines[0]


@pytest.mark.parametrize("app,overrides", GOOD, ids=[" ".join(case[1]) for case in GOOD])
def test_valid_neighbours_pass(app, overrides, capsys, no_model):
    from seqrl.cli import precheck

    precheck(app, overrides)  # returns: no SystemExit
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("script,overrides,expected", [
    ("seqrl-train", ["trainer.max_stepz=3"], "trainer.max_stepz: unknown key (did you mean max_steps?)"),
    ("seqrl-train", ["rollout=eqlen", "rollout.group_size=3"], "rollout.group_size=3: rollout=eqlen decodes"),
    ("seqrl-eval", ["checkpoint=nope/last.ckpt"], "checkpoint='nope/last.ckpt': no such file or directory"),
])
def test_console_script_exits_2_with_one_line(script, overrides, expected, tmp_path):
    exe = Path(sys.executable).with_name(script)
    proc = subprocess.run([str(exe), *overrides, f"hydra.run.dir={tmp_path}"], capture_output=True, text=True,
                          cwd=ROOT, timeout=180)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{script}: error: ") and expected in lines[0], lines[0]
    assert not any(tmp_path.iterdir())  # nothing ran: no Hydra output directory was written
