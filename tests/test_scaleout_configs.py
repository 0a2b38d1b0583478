"""Scale-out configs compose (no model is loaded): the paper setups (conf/experiment/paper_*.yaml) with trainer=fsdp,
the paper sweeps running every arm on them, and the SLURM launcher sized from the trainer."""
from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, compose
from seqrl.cli import conf_dir

EXPERIMENTS = {  # name: (checkpoint, data, suite, stated keys: values ../shared/DESIGN.md gives for the setup)
    "paper_luspo_dense": ("Qwen/Qwen2.5-7B", "dapo_math_17k", "math", set()),
    "paper_luspo_moe": ("Qwen/Qwen3-30B-A3B", "dapo_math_17k", "math", set()),
    "paper_luspo_vl": ("Qwen/Qwen2.5-VL-7B-Instruct", "virl39k", "vision", set()),
    "paper_dapo": ("Qwen/Qwen2.5-32B", "dapo_math_17k", "math",
                   {"algorithm.overlong_max_len", "algorithm.overlong_cache", "rollout.max_new_tokens",
                    "eval.n_samples"}),
}
SWEEPS = {"paper_dense_math": "paper_luspo_dense", "paper_moe_math": "paper_luspo_moe", "paper_vl": "paper_luspo_vl"}
SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def _values(path) -> dict[str, str]:
    """Dotted key -> the rest of its line, for every scalar a YAML file sets outside its defaults list."""
    out, stack = {}, []
    for line in path.read_text().splitlines():
        m = re.match(r"^( *)([\w+]+):(.*)$", line)
        if not m or line.lstrip().startswith("#"):
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        stack = [(i, k) for i, k in stack if i < indent] + [(indent, key)]
        dotted = ".".join(k for _, k in stack)
        if rest.split("#")[0].strip() and not dotted.startswith("defaults"):
            out[dotted] = rest
    return out


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_paper_experiment_composes_on_fsdp_with_every_unstated_value_marked(name):
    from seqrl.config import validate

    checkpoint, data, suite, stated = EXPERIMENTS[name]
    cfg = compose("train", [f"experiment={name}", "paths.output_dir=/tmp/unused"])
    c = validate(cfg)
    assert (c.model.name_or_path, c.data.name, c.eval.name) == (checkpoint, data, suite)
    assert cfg.trainer.strategy._target_ == "seqrl.distributed.FSDP2Strategy" and c.trainer.accelerator == "gpu"
    assert c.model.dtype == "bfloat16" and c.trainer.precision == "bf16-mixed"
    assert c.prompts_per_step % c.trainer.world_size == 0
    values = _values(conf_dir() / "experiment" / f"{name}.yaml")
    unmarked = [k for k, rest in values.items() if "our choice" not in rest and k not in stated | {"tags"}]
    assert not unmarked, f"values DESIGN.md does not state, without '# our choice': {unmarked}"
    assert stated <= set(values)


def test_dapo_setup_holds_the_stated_lengths_and_clip():
    c = compose("train", ["experiment=paper_dapo", "paths.output_dir=/tmp/unused"])
    assert (c.algorithm.name, c.algorithm.clip_low, c.algorithm.clip_high) == ("dapo", 0.2, 0.28)
    assert c.algorithm.overlong_max_len - c.algorithm.overlong_cache == 16384 and c.algorithm.overlong_cache == 4096
    assert c.rollout.max_new_tokens == c.algorithm.overlong_max_len and c.eval.n_samples == 32


def test_luspo_setups_leave_the_algorithm_to_the_caller():
    """The experiments are shared by every arm of a table: luspo (the paper's clip range) is picked on top."""
    c = compose("train", ["experiment=paper_luspo_dense", "algorithm=luspo", "paths.output_dir=/tmp/unused"])
    assert (c.algorithm.name, c.algorithm.clip_low, c.algorithm.clip_high) == ("luspo", 2.0e-3, 2.5e-3)


def _sweep(name: str, overrides: list[str], hydra: bool = False):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from seqrl.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "sweeps"), version_base="1.3"):
        return hydra_compose(name, [*overrides, f"hydra.searchpath=[file://{conf_dir()}]"],
                             return_hydra_config=hydra)


@pytest.mark.parametrize("sweep", list(SWEEPS))
def test_paper_sweeps_run_every_arm_on_their_experiment(sweep):
    from seqrl.config import validate
    from seqrl.train import run_name

    params = OmegaConf.load(ROOT / "sweeps" / f"{sweep}.yaml").hydra.sweeper.params
    arms = [a.strip() for a in params["+arm"].split(",")]
    assert len(arms) == 8 and "luspo" in arms and "gspo_eqlen" in arms
    base = compose("train", [f"experiment={SWEEPS[sweep]}", "paths.output_dir=/tmp/unused"])
    for arm in ("luspo", "gspo_eqlen"):
        cfg = _sweep(sweep, [f"+arm={arm}", "seed=0"])
        validate(cfg)
        assert run_name(cfg) == {"luspo": "luspo", "gspo_eqlen": "gspo+eqlen"}[arm]  # the arm picks the algorithm
        assert cfg.model == base.model and cfg.data == base.data and cfg.trainer == base.trainer
        assert cfg.rollout.group_size == base.rollout.group_size == 16


def test_slurm_launcher_yaml_sizes_jobs_from_the_trainer():
    """The file itself (checked without the plugin): submitit's SLURM launcher, one task and GPU per device."""
    raw = OmegaConf.load(conf_dir() / "hydra" / "launcher" / "slurm.yaml")
    assert list(raw.defaults) == ["submitit_slurm"]
    assert raw._get_node("tasks_per_node")._value() == "${trainer.devices}"
    assert raw._get_node("gpus_per_node")._value() == "${trainer.devices}"
    assert raw._get_node("nodes")._value() == "${trainer.num_nodes}"
    assert OmegaConf.is_missing(raw, "partition") and raw.timeout_min >= 60 and raw.max_num_timeout == 0


@pytest.mark.parametrize("overrides,devices,nodes", [([], 8, 4), (["trainer.devices=4", "trainer.num_nodes=2"], 4, 2)])
def test_slurm_launcher_composes_with_tasks_per_node_equal_to_devices(overrides, devices, nodes):
    """Needs hydra-submitit-launcher (the [slurm] extra): Hydra resolves the launcher and builds it."""
    from hydra.utils import instantiate

    cfg = _sweep("paper_dense_math", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", *overrides], hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == SLURM
    assert launcher.tasks_per_node == launcher.gpus_per_node == cfg.trainer.devices == devices
    assert launcher.nodes == cfg.trainer.num_nodes == nodes and launcher.partition == "gpu"
    built = instantiate(launcher)
    assert type(built).__name__ == "SlurmLauncher" and built.params["tasks_per_node"] == devices
