"""`seqrl-train`: warm up, RL-train and evaluate one algorithm on one model and data set (a Hydra app).

    seqrl-train experiment=smoke                          # the CPU demo (< 5 min on 2 cores)
    seqrl-train experiment=smoke algorithm=gspo model=tiny_moe
    seqrl-train --cfg job                                 # print the composed config
    seqrl-train -m algorithm=grpo,gspo,luspo seed=0,1,2   # a multirun sweep

Writes into the Hydra run directory: checkpoints/ (Lightning, last.ckpt), hf/ (HF-format export of the final
policy with its tokenizer/processor), samples/<benchmark>.jsonl, wandb/ (offline unless configured), csv/ and
results.json (config, seed, git commit, versions, final train and eval metrics).
"""
from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("seqrl")
_KNOWN_NOISE = (  # Lightning warnings that do not apply to this module (frozen reference in eval mode; manual optim)
    r"Found \d+ module\(s\) in eval mode", r"Using ModelCheckpoint with manual optimization",
    r".*treespec, LeafSpec.*",
)


def run_name(cfg) -> str:
    """W&B / table row name: the algorithm, with `+<rollout>` for non-standard rollouts (e.g. gspo+eqlen)."""
    suffix = "" if cfg.rollout.name == "standard" else f"+{cfg.rollout.name}"
    return f"{cfg.algorithm.name}{suffix}"


def train(cfg: DictConfig) -> dict:
    """Run one training job from a composed config; returns the results dict written to results.json."""
    import lightning as L
    import torch
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint

    from seqrl.checkpointing import AtomicCheckpointIO, resolve_ckpt
    from seqrl.config import validate
    from seqrl.data import load_samples
    from seqrl.distributed import DTYPES, FSDP2Strategy, export_policy
    from seqrl.eval.harness import build_eval_sets, results_table, write_samples
    from seqrl.loggers import build_loggers, wandb_logger
    from seqrl.models import build_policy
    from seqrl.module import RLModule
    from seqrl.results import export_dir_atomic, provenance, write_json_atomic, write_text_atomic
    from seqrl.warmup import init_seed, warmup

    for noise in _KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=noise)
    out = Path(cfg.paths.output_dir)
    c = validate(cfg)
    data_dir = str(Path(c.paths.data_dir).expanduser())
    if c.threads:
        torch.set_num_threads(c.threads)
    L.seed_everything(init_seed(c), workers=True, verbose=False)  # model init + warm-up (shareable across seeds)
    policy = build_policy(c.model)
    warm = warmup(policy, c, log=log.info) if c.warmup.enabled else None
    L.seed_everything(c.seed, workers=True, verbose=False)  # RL: sampling, minibatch order, data order
    train_samples = load_samples(c.data, "train", data_dir)
    eval_sets = build_eval_sets(c.eval, c.data, data_dir)
    module = RLModule(c, policy, train_samples, eval_sets)
    name = run_name(c)
    updates = c.algorithm.ppo_epochs * c.algorithm.ppo_minibatches
    every = c.eval.every_n_steps
    strategy = instantiate(cfg.trainer.strategy) if OmegaConf.is_dict(cfg.trainer.strategy) else c.trainer.strategy
    trainer = instantiate(
        cfg.trainer, strategy=strategy, inference_mode=not isinstance(strategy, FSDP2Strategy),  # FSDP: no_grad
        max_steps=c.trainer.max_steps * updates, max_epochs=1, default_root_dir=str(out),
        logger=build_loggers(cfg, out, name), check_val_every_n_epoch=None, use_distributed_sampler=False,
        val_check_interval=every if every > 0 else c.trainer.max_steps * 1000,
        callbacks=[ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, every_n_train_steps=updates)],
        plugins=[AtomicCheckpointIO()],
    )
    ckpt = resolve_ckpt(c.ckpt_path, out)
    if eval_sets and ckpt is None:  # a resumed run restores its "before RL" scores from the checkpoint
        trainer.validate(module, verbose=False)
        module.eval_before = {k: v["metrics"] for k, v in module.eval_results.items()}
    trainer.fit(module, ckpt_path=ckpt, weights_only=True)
    before = module.eval_before
    if eval_sets:
        trainer.validate(module, verbose=False)
    export = export_policy(policy, DTYPES[c.model.dtype])  # a sharded policy is gathered (every rank calls it)
    if trainer.is_global_zero:
        export_dir_atomic(out / "hf", export.save)
    results = {
        "run_name": name, **provenance(OmegaConf.to_container(cfg, resolve=True), c.seed),
        "warmup": warm, "train": module.last_train_metrics, "eval_before": before,
        "eval": {k: v["metrics"] for k, v in module.eval_results.items()},
        "rl_steps": module.rl_step, "world_size": trainer.world_size,
        "ddp_params_in_sync": getattr(module, "ddp_params_in_sync", None),
    }
    if trainer.is_global_zero:
        write_samples(module.eval_results, out)
        write_json_atomic(out / "results.json", results)
        table = results_table(module.eval_results, title=f"{name} on {c.model.family} ({c.data.name}), seed {c.seed}")
        if before:
            table += "\n\n" + results_table({k: {"metrics": v} for k, v in before.items()}, title="before RL")
        write_text_atomic(out / "results.md", table + "\n")
        print("\n" + table + "\n", flush=True)
        print(f"[seqrl] results: {out / 'results.json'}", flush=True)
    wb = wandb_logger(trainer.loggers)
    if wb is not None:
        wb.experiment.finish()  # flush the offline run (summary + history) now, not at interpreter exit
    return results


def _write_error(cfg: DictConfig, exc: BaseException) -> None:
    """Record a failed sweep job in its run directory (error.json: run name, error, traceback, config), so that
    `seqrl-report` lists it with its error; Hydra re-raises the error once every job of the sweep has run."""
    import traceback

    from seqrl.results import write_json_atomic

    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - a config that cannot resolve is recorded as written
        config = OmegaConf.to_container(cfg, resolve=False)
    write_json_atomic(Path(cfg.paths.output_dir) / "error.json", {
        "run_name": run_name(cfg), "error": f"{type(exc).__name__}: {exc}",
        "traceback": "".join(traceback.format_exception(exc)), "config": config,
    })


def _task(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from seqrl.checkpointing import resolve_ckpt
    from seqrl.config import validate

    cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    multirun = HydraConfig.get().mode.name == "MULTIRUN"
    try:
        validate(cfg)
        resolve_ckpt(cfg.ckpt_path, Path(cfg.paths.output_dir))  # a corrupt checkpoint fails here, in one line
    except ValueError as exc:  # config, data and checkpoint errors: one line, non-zero exit
        if multirun:
            _write_error(cfg, exc)
            raise
        print(f"seqrl-train: error: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        results = train(cfg)
    except Exception as exc:  # a sweep's failed job is recorded; the other jobs run on (Hydra raises at the end)
        if multirun:
            _write_error(cfg, exc)
        raise
    first = next(iter(results["eval"].values()), {})  # the sweeper's objective: avg@k of the first eval set
    return first.get(f"avg@{cfg.eval.n_samples}")


def main() -> None:
    from seqrl.cli import run_entry

    run_entry("train", _task)


if __name__ == "__main__":
    main()
