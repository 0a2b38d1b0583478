"""Shared fixtures: offline environment, a private warm-up cache, and config composition helpers."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# The real benchmark copies: $SEQRL_DATA_DIR (as the configs read it), else ../shared/benchmarks beside the project.
DATA_DIR = Path(os.environ.get("SEQRL_DATA_DIR") or ROOT.parent / "shared" / "benchmarks")
os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                  TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
# Tiny models: one intra-op thread is faster than two (no sync overhead) and immune to oversubscription when
# several processes (DDP tests, spawned reference runs) share the 2 cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SEQRL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "seqrl-cache"))


def compose(config_name: str, overrides: list[str] | None = None, config_dir: Path | None = None):
    """Compose a config exactly as the CLI does (schemas registered, resolvers installed)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from seqrl.cli import conf_dir
    from seqrl.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir or conf_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [], return_hydra_config=False)


def tiny_overrides(out: Path, *extra: str) -> list[str]:
    """A seconds-long training run: tiny batch, short responses, a short cached warm-up, CSV + W&B offline."""
    return [
        "experiment=smoke", "trainer.max_steps=2", "prompts_per_step=4", "rollout.group_size=4",
        "rollout.max_new_tokens=24", "warmup.steps=40", "warmup.batch_size=16", "eval.n_samples=2",
        "eval.limit=8", "eval.max_new_tokens=24", "trainer.enable_progress_bar=false",
        f"paths.output_dir={out}", *extra,
    ]


MODEL_DIR = ROOT / "conf" / "model"
FAMILY_DATA = {"dense": "arith", "moe": "arith", "vl": "image_count"}  # each tiny family's smoke data set


def make_policy(family: str, stops: list[int] | None = None):
    """tiny_<family> random-initialised with seed 0; `stops` replaces the generation eos ids (varied lengths)."""
    from omegaconf import OmegaConf

    from seqrl.models import build_policy

    torch.manual_seed(0)
    policy = build_policy(OmegaConf.load(MODEL_DIR / f"tiny_{family}.yaml"))
    if stops is not None:
        policy.model.generation_config.eos_token_id = stops
    return policy


def samples_for(family: str, k: int) -> list:
    """The first k training samples of the family's smoke data set (images for vl)."""
    from seqrl.config import validate
    from seqrl.data import load_samples

    cfg = validate(compose("train", [f"data={FAMILY_DATA[family]}", f"model=tiny_{family}"]))
    return load_samples(cfg.data, "train", cfg.paths.data_dir)[:k]


def run_ranks(target, args_of, tmp_path: Path, world: int = 2, timeout_s: float = 300) -> dict:
    """Run `target(*args_of(rank, init, queue))` in `world` spawned processes (gloo rendezvous through a file store
    in tmp_path: no port to race for); each puts (rank, result) on the queue. Returns {rank: result}, failing
    fast with the exit codes when a rank dies instead of waiting for the timeout."""
    import queue as queue_mod
    import time

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=target, args=args_of(rank, init, q)) for rank in range(world)]
    for p in procs:
        p.start()
    results, deadline = {}, time.time() + timeout_s
    while len(results) < world:
        assert time.time() < deadline, f"the {world}-rank run did not finish in {timeout_s:.0f} s"
        try:
            rank, result = q.get(timeout=10)
            results[rank] = result
        except queue_mod.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not dead, f"a rank exited with {dead}"
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results
