"""Every config composes and validates (lightning-hydra-template style), and bad input fails in one clear line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from conftest import ROOT, compose
from seqrl.cli import conf_dir, group_options

TRAIN_GROUPS = ["algorithm", "rollout", "model", "data", "eval", "trainer", "logger", "experiment"]


def _train_cases():
    for group in TRAIN_GROUPS:
        for opt in group_options(group):
            yield f"{group}={opt}"


@pytest.mark.parametrize("override", list(_train_cases()))
def test_every_train_option_composes_and_validates(override):
    from seqrl.config import validate

    extra = ["model=tiny_vl"] if any(k in override for k in ("image", "virl", "vision")) else []
    cfg = compose("train", [override, *extra])
    if override == "model=oracle":  # an evaluation-only model: training it is refused at validation
        with pytest.raises(ValueError, match="oracle"):
            validate(cfg)
        return
    assert validate(cfg) is not None
    group, opt = override.split("=")
    own = OmegaConf.load(conf_dir() / group / f"{opt}.yaml")
    own.pop("defaults", None)
    node = cfg if group == "experiment" else cfg[group]  # experiments are `@package _global_`
    for key in own:  # what the file sets is what the composed config holds
        if not isinstance(own[key], (dict, DictConfig)) and key not in ("benchmarks",):
            assert node[key] == own[key], (group, opt, key)


@pytest.mark.parametrize("name", ["eval", "report"])
def test_root_configs_compose(name):
    cfg = compose(name)
    assert cfg is not None


def test_every_yaml_in_conf_is_reachable():
    """No orphan config: every YAML under conf/ is a root config or an option of a group the apps compose."""
    groups = set(TRAIN_GROUPS) | {"benchmark", "hydra"}  # hydra/launcher/slurm.yaml
    for path in conf_dir().rglob("*.yaml"):
        rel = path.relative_to(conf_dir())
        assert len(rel.parts) == 1 or rel.parts[0] in groups, f"orphan config {rel}"


BAD = [
    (["algorithm=nope"], "algorithm=nope", "allowed"),
    (["optim.lr=-0.1"], "optim.lr", "must be > 0"),
    (["rollout.group_size=1"], "rollout.group_size", ">= 2"),
    (["data=gsm8k", "data.path=missing/nothing.jsonl"], "nothing.jsonl", ""),
    (["trainer.max_stepz=3"], "max_stepz", ""),
    (["rollout.temperature=abc"], "rollout.temperature", ""),
    (["model=tiny_dense", "data=image_count"], "model.family", "vl"),
]


@pytest.mark.parametrize("overrides,key,allowed", BAD)
def test_bad_input_is_one_line_before_any_model(overrides, key, allowed, capsys, monkeypatch):
    import seqrl.models
    from seqrl.cli import precheck

    monkeypatch.setattr(seqrl.models, "build_policy", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(SystemExit) as exc:
        precheck("train", overrides)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert key in err and allowed in err, err


def test_cli_bad_option_exits_nonzero_with_one_line():
    exe = Path(sys.executable).with_name("seqrl-train")
    proc = subprocess.run([str(exe), "algorithm=nope"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "algorithm=nope" in lines[0] and "grpo" in lines[0], proc.stderr


def test_cfg_job_prints_composed_config():
    exe = Path(sys.executable).with_name("seqrl-train")
    proc = subprocess.run([str(exe), "--cfg", "job", "algorithm=gspo"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "name: gspo" in proc.stdout and "family: dense" in proc.stdout


def _sweep_cases():
    for path in sorted((ROOT / "sweeps").glob("*.yaml")):
        sweep = OmegaConf.load(path).hydra.sweeper.params
        for key, values in sweep.items():
            for value in str(values).split(","):
                yield path.stem, f"{key}={value.strip()}", [f"{k}={str(v).split(',')[0].strip()}"
                                                            for k, v in sweep.items() if k != key]


@pytest.mark.parametrize("sweep,override,others", list(_sweep_cases()))
def test_every_sweep_value_composes_and_validates(sweep, override, others):
    """Each value of each sweep parameter composes (with the other parameters at their first value)."""
    from seqrl.config import validate

    cfg = compose(sweep, [*others, override, f"hydra.searchpath=[file://{conf_dir()}]"], config_dir=ROOT / "sweeps")
    validate(cfg)
    key, value = override.split("=")
    if "/" not in key and key in ("algorithm",):
        assert cfg.algorithm.name == value
