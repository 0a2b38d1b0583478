"""Child process of bench/rl_step.py: seqrl's RL steps, run as seqrl-train runs them.

The config is composed from conf/ with rl_step.seqrl_overrides and validated; the Trainer is the `trainer` config group
instantiated with train.py's own arguments (manual optimisation inside RLModule.training_step: rollout, grading,
advantages, reference log-probs, one PPO update), logging through the CSV logger every step. Left out, as in TRL's run:
the checkpoint callback and the evaluation. Argument: the job as JSON; the result goes to job['out'] as JSON.
"""
from __future__ import annotations

import json
import sys
import tempfile
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate

from rl_step import BACKWARD, OPTIMIZER, StepMarks, compose_train, load_prompts, seqrl_overrides, write_result
from seqrl.loggers import build_loggers
from seqrl.models import build_policy
from seqrl.module import RLModule
from seqrl.train import _KNOWN_NOISE, run_name


PHASES = [  # see rl_step.breakdown
    ("generation (rollout engine)", [("_seqrl_side.py", "counted_rollout", None)], True),
    ("grading + reward shaping", [("seqrl/module.py", "_grade", None)], True),
    ("reference/old log-probs (no grad)", [("scoring.py", "response_logprobs", "training_step")], True),
    ("training forward + entropy + loss", [("scoring.py", "response_logprobs", "_score"),
                                           ("losses.py", "compute_policy_loss", None)], True),
    ("backward", BACKWARD, True),
    ("optimizer step + grad clip", OPTIMIZER, True),
    ("rollout metrics + logging", [("seqrl/module.py", "_rollout_metrics", None),
                                   ("seqrl/module.py", "_log_to_loggers", None),
                                   ("lightning/pytorch/core/module.py", "log_dict", None)], True),
]
STEP_FN = ("seqrl/module.py", "training_step")


class Marks(L.Callback):
    """Lightning adapter of rl_step.StepMarks: training start, end of every training step (= RL step)."""

    def __init__(self, marks: StepMarks):
        self.marks = marks

    def on_train_start(self, trainer, pl_module) -> None:
        self.marks.begin()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.marks.step_end()


def count_tokens(module: RLModule) -> dict[str, list[int]]:
    """Wrap the module's rollout and update (instance attributes only) to count, per RL step, the response tokens
    sampled (response_mask: up to and including the stop token) and those under the loss mask."""
    counts: dict[str, list[int]] = {"gen": [], "trained": []}
    rollout, update = module.rollout_fn, module._update

    def counted_rollout(*args, **kwargs):
        batch = rollout(*args, **kwargs)
        counts["gen"].append(int(batch.response_mask.sum()))
        return batch

    def counted_update(roll, adv, mask, *args):
        counts["trained"].append(int(mask.sum()))
        return update(roll, adv, mask, *args)

    module.rollout_fn, module._update = counted_rollout, counted_update
    return counts


def run(job: dict) -> dict:
    """Warm-up + timed RL steps of one seqrl run; step seconds and token counts of the timed steps."""
    for noise in _KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=noise)
    cfg, c = compose_train(seqrl_overrides(job))
    torch.set_num_threads(c.threads)
    policy = build_policy(c.model)
    L.seed_everything(c.seed, workers=True, verbose=False)
    module = RLModule(c, policy, load_prompts(c), [])
    counts = count_tokens(module)
    marks = StepMarks(job, PHASES, STEP_FN)
    with tempfile.TemporaryDirectory(prefix="seqrl-bench.") as out:
        trainer = instantiate(  # train.py's arguments, without the checkpoint callback and its IO plugin
            cfg.trainer, max_steps=c.trainer.max_steps, max_epochs=1, default_root_dir=out,
            logger=build_loggers(cfg, Path(out), run_name(c)), check_val_every_n_epoch=None,
            use_distributed_sampler=False, val_check_interval=c.trainer.max_steps * 1000, callbacks=[Marks(marks)],
            enable_checkpointing=False,
        )
        trainer.fit(module)
    timed = slice(job["warmup"], job["warmup"] + job["steps"])
    return {**marks.timed(), "gen_tokens": counts["gen"][timed], "trained_tokens": counts["trained"][timed],
            "reward_mean": module.last_train_metrics["train/reward/mean"]}


if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    write_result(job, run(job))
