"""Every algorithm end to end: `seqrl.train.train` runs 2 RL steps of each in-process, DAPO's dynamic sampling drops
constant groups and refills the batch, and one Hydra multirun trains every algorithm through the real CLI.

Tiny settings (conftest.tiny_overrides: tiny_dense, 4 prompts x G=4, a 40-step warm-up cached under $SEQRL_CACHE_DIR
and shared with every run of the session, test_train_e2e.py's included) with 16 new tokens, CSV logging and no
evaluation: test_train_e2e.py covers W&B and the evaluation harness. Slow (about 2-3 minutes on 2 shared cores,
warm-up included), still run in CI.
"""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import compose, tiny_overrides

ALGORITHMS = ["dapo", "dr_grpo", "fspo", "grpo", "gspo", "gspo_token", "luspo", "rloo"]
FAST = ["rollout.max_new_tokens=16", "logger=csv", "eval.heldout=false"]  # + no eval benchmark (see overrides)
COMMON_KEYS = {
    "train/loss", "train/pg_loss", "train/pg_clipfrac", "train/ratio/mean", "train/ratio/min", "train/ratio/max",
    "train/ppo_kl", "train/grad_token_frac", "train/entropy", "train/grad_norm", "train/lr", "train/reward/mean",
    "train/reward/std", "train/accuracy", "train/response_length/mean", "train/response_length/clip_ratio",
    "train/frac_reward_zero_std", "train/sampling_rounds", "train/kept_frac", "perf/tokens_per_s",
}
EXTRA_KEYS = {"grpo": {"train/kl_loss"}, "fspo": {"train/fspo/band_low", "train/fspo/band_high", "train/fspo/mu"}}


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One intra-op thread, here and in the CLI subprocess: on 2 cores shared with other processes, two OpenMP
    threads made the tiny model's matmuls 15-40x slower (spinning at barriers); results do not depend on it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


def overrides(out: Path, *extra: str) -> list[str]:
    """tiny_overrides + FAST + extra (a later `key=value` replaces an earlier one), minus every eval benchmark."""
    merged: dict[str, str] = {}
    for item in [*tiny_overrides(out), *FAST, *extra]:
        merged[item.split("=", 1)[0]] = item
    suite = compose("train", list(merged.values())).eval.benchmarks
    return [*merged.values(), *(f"~eval.benchmarks.{name}" for name in suite)]


def train(out: Path, *extra: str) -> dict:
    from seqrl.train import train as run

    return run(compose("train", overrides(out, *extra)))


def logged_steps(out: Path) -> list[dict]:
    """The CSV logger's rows that hold the per-RL-step training metrics."""
    rows = list(csv.DictReader(next(out.joinpath("csv").rglob("metrics.csv")).open()))
    return [r for r in rows if r.get("train/reward/mean")]


def test_every_algorithm_file_is_covered():
    from seqrl.algorithms import available_algorithms

    assert available_algorithms() == ALGORITHMS  # a new conf/algorithm file must be added here


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_two_rl_steps_log_finite_metrics(algorithm, tmp_path):
    results = train(tmp_path, f"algorithm={algorithm}")
    assert results["rl_steps"] == 2 and results["run_name"] == algorithm
    assert results["config"]["algorithm"]["name"] == algorithm
    metrics = results["train"]
    missing = COMMON_KEYS | EXTRA_KEYS.get(algorithm, set())
    assert not missing - set(metrics), sorted(missing - set(metrics))
    assert not {k: v for k, v in metrics.items() if not math.isfinite(v)}
    assert 0 < metrics["train/response_length/mean"] <= 16 and 0 <= metrics["train/pg_clipfrac"] <= 1
    steps = logged_steps(tmp_path)
    assert len(steps) == 2 and all(float(r["train/sampling_rounds"]) >= 1 for r in steps)
    assert json.loads((tmp_path / "results.json").read_text())["train"] == pytest.approx(metrics)


@pytest.mark.slow
def test_dapo_dynamic_sampling_drops_constant_groups_and_refills(tmp_path, monkeypatch):
    """First round of each step: group 0 all correct (constant, dropped), groups 1-3 one correct in four; the refill
    round draws one prompt whose group is again one in four. Soft overlong punishment is off so rewards are +-1."""
    import seqrl.module as module

    graded, keeps = [], []
    real_keep = module.dynamic_sampling_keep

    def grade(texts, golds, kinds, **kw):
        graded.append(len(texts))
        first = [True] * 4 if len(texts) == 16 else [True, False, False, False]
        return first + [True, False, False, False] * (len(texts) // 4 - 1)

    def keep(rewards, group_ids):
        keeps.append(real_keep(rewards, group_ids).tolist())
        return real_keep(rewards, group_ids)

    monkeypatch.setattr(module, "grade_many", grade)
    monkeypatch.setattr(module, "dynamic_sampling_keep", keep)
    results = train(tmp_path, "algorithm=dapo", "algorithm.soft_overlong=false")
    assert graded == [16, 4, 16, 4]  # per step: 4 prompts x G=4, then a refill of the one dropped prompt
    assert keeps == [[False] * 4 + [True] * 12, [True] * 4] * 2
    steps = logged_steps(tmp_path)
    assert len(steps) == 2
    for step in steps:
        assert float(step["train/sampling_rounds"]) == 2.0
        assert float(step["train/frac_reward_zero_std"]) == 0.0  # the constant group never reaches the loss
        assert float(step["train/reward/mean"]) == pytest.approx(-0.5)  # every kept group is (1, -1, -1, -1)
    assert results["rl_steps"] == 2 and results["train"]["train/sampling_rounds"] == 2.0


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["gspo", "fspo"])
def test_rows_with_zero_advantage_left_unscored_give_the_same_run(algorithm, tmp_path, monkeypatch):
    """One on-policy update without KL: the rows of a constant group (A_i = 0) are not scored
    (RLModule._rows_with_gradient), and the run logs the same metrics (entropy included, from the rollout) and ends
    with the same weights as one that scores every row."""
    import torch

    import seqrl.module as module

    def grade(texts, golds, kinds, **kw):  # group 0 all correct (constant), the others one correct in four
        return [True] * 4 + [True, False, False, False] * (len(texts) // 4 - 1)

    monkeypatch.setattr(module, "grade_many", grade)
    scored, weights = [], []
    real_score, real_end = module.RLModule._score, module.RLModule.on_train_end
    monkeypatch.setattr(module.RLModule, "_score", lambda self, mb, live, parts=(): scored.append(
        len(mb) if live is None else len(live)) or real_score(self, mb, live, parts))
    monkeypatch.setattr(module.RLModule, "on_train_end", lambda self: weights.append(
        [p.detach().clone() for p in self.model.parameters()]) or real_end(self))
    one_update = [f"algorithm={algorithm}", "algorithm.ppo_epochs=1", "algorithm.ppo_minibatches=1"]
    skipped = train(tmp_path / "skip", *one_update)
    assert scored == [12, 12]  # per step: 16 rows, the constant group's 4 left out
    monkeypatch.setattr(module.RLModule, "_rows_with_gradient", lambda *a: None)
    full = train(tmp_path / "full", *one_update)
    assert scored[2:] == [16, 16]
    timing = [k for k in full["train"] if k.startswith("perf/")]
    assert {k: v for k, v in skipped["train"].items() if k not in timing} == pytest.approx(
        {k: v for k, v in full["train"].items() if k not in timing}, rel=1e-4, abs=1e-6)
    lr = float(compose("train", overrides(tmp_path, *one_update)).optim.lr)
    for a, b in zip(*weights):  # AdamW may turn float noise on a zero gradient into +-lr: at most 2 steps of it
        torch.testing.assert_close(a, b, rtol=0, atol=2 * lr + 1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm,extra", [
    ("grpo", []),  # token clip, seq-mean-token-mean, a KL term: every row back-propagated
    ("fspo", ["algorithm.ppo_epochs=2", "algorithm.ppo_minibatches=2"]),  # off-policy: FSPO's batch mean mu != 0
    ("dapo", []),  # token-mean over the minibatch's tokens
    ("gspo", ["model=tiny_moe"]),  # router metrics token-weighted over the parts
])
def test_micro_batches_give_the_same_run(algorithm, extra, tmp_path, monkeypatch):
    """micro_batch_size=3 (parts of 3, 3, 2 ... rows): the backward forwards see at most 3 rows, and the run logs
    the same metrics (moe router statistics: per part, token-weighted) and ends with the same weights as one forward
    per minibatch."""
    import torch

    import seqrl.module as module

    sizes, weights = [], []
    real_logprobs, real_end = module.response_logprobs, module.RLModule.on_train_end
    monkeypatch.setattr(module, "response_logprobs", lambda policy, batch, *a, **k: (
        sizes.append(len(batch)) if torch.is_grad_enabled() else None) or real_logprobs(policy, batch, *a, **k))
    monkeypatch.setattr(module.RLModule, "on_train_end", lambda self: weights.append(
        [p.detach().clone() for p in self.model.parameters()]) or real_end(self))
    setup = [f"algorithm={algorithm}", *extra]
    parts = train(tmp_path / "parts", *setup, "micro_batch_size=3")
    assert sizes and max(sizes) <= 3 and sum(sizes) >= 16  # rows back-propagated in parts of at most 3
    sizes.clear()
    whole = train(tmp_path / "whole", *setup)
    algo = compose("train", overrides(tmp_path, *setup)).algorithm
    assert len(sizes) == 2 * algo.ppo_epochs * algo.ppo_minibatches  # 2 steps, one forward per minibatch
    # router statistics (load cv, max/mean, aux loss) are per forward, token-weighted over parts (as over buckets)
    apart = [k for k in whole["train"] if k.startswith(("perf/", "moe/"))]
    assert {k: v for k, v in parts["train"].items() if k not in apart} == pytest.approx(
        {k: v for k, v in whole["train"].items() if k not in apart}, rel=1e-4, abs=1e-6)
    assert {k for k in parts["train"] if k.startswith("moe/")} == {k for k in apart if k.startswith("moe/")}
    lr = float(compose("train", overrides(tmp_path, *setup)).optim.lr)
    for a, b in zip(*weights):  # AdamW may turn float noise on a zero gradient into +-lr per optimizer step
        torch.testing.assert_close(a, b, rtol=0, atol=4 * lr + 1e-6)


def test_rollout_threads_hold_while_decoding_only(tmp_path, monkeypatch):
    """rollout.threads=1 on a 2-thread run: the rollout decodes on one intra-op thread, the rest keeps two."""
    import torch

    from seqrl.algorithms import rollout

    seen, real = [], rollout.ROLLOUTS["standard"]
    monkeypatch.setitem(rollout.ROLLOUTS, "standard", lambda *a, **k: seen.append(torch.get_num_threads()) or real(
        *a, **k))
    torch.set_num_threads(2)  # the one_thread fixture restores the count after the test
    train(tmp_path, "rollout.threads=1", "trainer.max_steps=1", "threads=2")
    assert seen == [1] and torch.get_num_threads() == 2


@pytest.mark.slow
def test_multirun_over_every_algorithm_through_the_cli(tmp_path):
    sweep = tmp_path / "sweep"
    args = [a for a in overrides(tmp_path, "trainer.max_steps=1") if not a.startswith("paths.output_dir=")]
    cmd = [str(Path(sys.executable).parent / "seqrl-train"), "-m", *args, f"algorithm={','.join(ALGORITHMS)}",
           f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra:job.num}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for num, algorithm in enumerate(ALGORITHMS):
        results = json.loads((sweep / str(num) / "results.json").read_text())
        assert results["run_name"] == algorithm and results["rl_steps"] == 1, (num, results["run_name"])
        assert results["train"] and all(math.isfinite(v) for v in results["train"].values()), algorithm
