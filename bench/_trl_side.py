"""Child process of bench/rl_step.py: TRL's GRPOTrainer on the seqrl weights, prompts and reward.

Every GRPOConfig value comes from rl_step.matched (derived from the composed seqrl config) and is passed in the job;
this file adds only what is TRL plumbing: a throw-away output dir, no reporting, no saving, no progress bar. The
reward is seqrl's own (grade_many + format_reward + shape_rewards of the same algorithm config), wrapped as a TRL
reward function. Argument: the job as JSON; the result goes to job['out'] as JSON.
"""
from __future__ import annotations

import json
import sys
import tempfile
import warnings

import torch
from datasets import Dataset
from transformers import AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from rl_step import BACKWARD, OPTIMIZER, StepMarks, compose_train, load_prompts, seqrl_overrides, write_result
from seqrl.algorithms import shape_rewards
from seqrl.eval.grading import format_reward, grade_many


PHASES = [  # see rl_step.breakdown; the optimizer step and logging run outside GRPOTrainer.training_step
    ("generation (HF generate + decode)", [("grpo_trainer.py", "_generate", None)], True),
    ("reward (seqrl's, wrapped)", [("grpo_trainer.py", "_calculate_rewards", None)], True),
    ("reference/old log-probs (no grad)",
     [("_trl_side.py", "_get_per_token_logps_and_entropies", "_generate_and_score_completions")], True),
    ("training forward + entropy + loss", [("grpo_trainer.py", "_compute_loss", None)], True),
    ("backward", BACKWARD, True),
    ("optimizer step + grad clip", OPTIMIZER, False),
    ("logging", [("transformers/trainer.py", "_maybe_log_save_evaluate", None)], False),
]
STEP_FN = ("grpo_trainer.py", "training_step")


def prompt_dataset(samples: list) -> Dataset:
    """Conversational prompts (one user turn: the chat template renders them as seqrl's render_chat does) plus the
    gold answer, its kind and the per-item verifier options (JSON) that seqrl's _grade passes to grade_many."""
    return Dataset.from_list([{"prompt": [{"role": "user", "content": s.prompt}], "answer": s.answer,
                               "kind": s.kind, "grade_kw": json.dumps(s.meta.get("grade_kw", {}))} for s in samples])


def seqrl_reward(algo, max_new_tokens: int, stop_ids: list[int], counts: list[int]):
    """A TRL reward function computing exactly seqrl's reward; appends each call's response tokens to `counts`."""

    def reward(prompts, completions, completion_ids, answer, kind, grade_kw, **_) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        correct = torch.tensor(grade_many(texts, answer, kind, item_kw=[json.loads(k) for k in grade_kw]),
                               dtype=torch.float32)
        fmt = torch.tensor([format_reward(t) for t in texts], dtype=torch.float32)
        lengths = torch.tensor([len(ids) for ids in completion_ids])  # (N,) up to and including the stop token
        truncated = torch.tensor([not ids or ids[-1] not in stop_ids for ids in completion_ids])
        rewards, _ = shape_rewards(algo, correct, lengths, max_new_tokens, truncated, format_ok=fmt)
        counts.append(int(lengths.sum()))
        return rewards.tolist()

    return reward


class Marks(TrainerCallback):
    """transformers adapter of rl_step.StepMarks: training start, end of every optimizer step (= RL step here)."""

    def __init__(self, marks: StepMarks):
        self.marks = marks

    def on_train_begin(self, args, state, control, **kwargs):
        self.marks.begin()

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.step_end()


class CountingGRPOTrainer(GRPOTrainer):
    """GRPOTrainer that records the response tokens under the loss mask of every micro-batch."""

    trained: list[int]

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.trained.append(int(inputs["completion_mask"].sum()))
        return super().compute_loss(model, inputs, *args, **kwargs)

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        """Pass-through, for the profile only: TRL's own method sits behind one shared timing decorator, which hides
        its callers (reference log-probs vs training forward) from cProfile; this frame keeps them."""
        return super()._get_per_token_logps_and_entropies(*args, **kwargs)


def run(job: dict) -> dict:
    """Warm-up + timed GRPOTrainer steps; step seconds and token counts of the timed steps."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(job["threads"])
    _, c = compose_train(seqrl_overrides(job))  # the prompts and the reward's algorithm config
    tokenizer = AutoTokenizer.from_pretrained(job["hf_dir"], padding_side="left")
    gen_counts: list[int] = []
    marks = StepMarks(job, PHASES, STEP_FN)
    with tempfile.TemporaryDirectory(prefix="trl-bench.") as out:
        args = GRPOConfig(output_dir=out, max_steps=job["warmup"] + job["steps"], logging_steps=1, report_to="none",
                          save_strategy="no", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
                          model_init_kwargs={"dtype": torch.float32,  # as seqrl loads it (tiny_dense: fp32, sdpa)
                                             "attn_implementation": c.model.attn_implementation},
                          **job["trl"])
        trainer = CountingGRPOTrainer(model=job["hf_dir"], processing_class=tokenizer, args=args,
                                      reward_funcs=seqrl_reward(c.algorithm, c.rollout.max_new_tokens,
                                                                [tokenizer.eos_token_id], gen_counts),
                                      train_dataset=prompt_dataset(load_prompts(c)), callbacks=[Marks(marks)])
        trainer.trained = []
        if trainer.eos_token_ids != [tokenizer.eos_token_id]:
            raise RuntimeError(f"TRL stops on {trainer.eos_token_ids}, seqrl on {[tokenizer.eos_token_id]}")
        trainer.train()
    timed = slice(job["warmup"], job["warmup"] + job["steps"])
    return {**marks.timed(), "gen_tokens": gen_counts[timed], "trained_tokens": trainer.trained[timed]}


if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    write_result(job, run(job))
