"""Data parallelism on CPU (gloo): a 2-process seqrl-train run, and the update path's gradient equals 1 process's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import ROOT, compose, run_ranks, tiny_overrides


@pytest.mark.slow
def test_seqrl_train_ddp_two_processes(tmp_path):
    """`seqrl-train experiment=smoke trainer=ddp` runs end to end on 2 CPU processes and keeps them in sync."""
    exe = Path(sys.executable).with_name("seqrl-train")
    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith("paths.output_dir")]
    cmd = [str(exe), *overrides, "trainer=ddp", "algorithm=gspo", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["world_size"] == 2 and res["rl_steps"] == 2
    assert res["ddp_params_in_sync"] is True
    assert 0.0 <= res["train"]["train/reward/mean"] <= 1.0


@pytest.mark.slow
def test_first_update_of_two_processes_equals_one_process_on_the_same_global_batch(tmp_path):
    """`seqrl-train experiment=smoke trainer=ddp` (2 processes) vs trainer=cpu (1 process), same global batch of
    8 prompts x 4 (rank shares partition it) and the same responses (`replay` rollout, tests/fixtures): the first
    update's loss, reward and pre-clip gradient norm match, and so do the updated weights; also with the DDP
    backward in parts of at most 3 rows (micro_batch_size, one gradient all-reduce per part)."""
    from safetensors.torch import load_file

    script = ROOT / "tests" / "fixtures" / "replay_train.py"
    common = [o for o in tiny_overrides(tmp_path) if not o.startswith("paths.output_dir")] + [
        "trainer.max_steps=1", "prompts_per_step=8", "rollout.name=replay", "warmup.enabled=false",
        "eval.heldout=false", "algorithm=grpo", "algorithm.ppo_minibatches=1", "logger=csv"]
    runs = {}
    for name, extra in (("cpu", ["trainer=cpu"]), ("ddp", ["trainer=ddp"]),
                        ("ddp_parts", ["trainer=ddp", "micro_batch_size=3"])):  # 16 rows a rank: parts of 3 or 2
        out = tmp_path / name
        proc = subprocess.run([sys.executable, str(script), *common, *extra, f"hydra.run.dir={out}"],
                              capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ})
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = (json.loads((out / "results.json").read_text()), load_file(out / "hf" / "model.safetensors"))
    one, w1 = runs["cpu"]
    assert one["world_size"] == 1 and one["train"]["train/grad_norm"] > 0
    lr = 2.0e-4  # experiment=smoke; AdamW's first step moves each weight by ~lr * sign(gradient)
    for two, w2 in (runs["ddp"], runs["ddp_parts"]):
        assert two["world_size"] == 2 and two["ddp_params_in_sync"] is True
        for key in ("train/loss", "train/grad_norm", "train/reward/mean", "train/response_length/mean"):
            assert abs(one["train"][key] - two["train"][key]) <= 1e-5 * max(1.0, abs(one["train"][key])), key
        for name, a in w1.items():
            diff = (a - w2[name]).abs()
            assert float(diff.max()) <= 2 * lr, name  # never more than a flipped sign on a ~0 gradient entry
            assert float((diff > 1e-3 * lr).float().mean()) < 1e-3, name  # and almost everywhere equal


def _grads(rows: list[int], texts, algo, world: int, rank: int, init: str, out):
    """Gradient of the module's update path (response_logprobs -> compute_policy_loss) on `rows` of the batch."""
    from seqrl.algorithms import compute_policy_loss, load_algorithm
    from seqrl.algorithms.rollout import response_logprobs, rollout_from_texts
    from seqrl.data import load_samples
    from seqrl.models import build_policy

    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    c = compose("train", ["paths.output_dir=/tmp/unused"])
    torch.manual_seed(0)
    policy = build_policy(c.model)
    model = torch.nn.parallel.DistributedDataParallel(policy.model) if world > 1 else policy.model
    samples = load_samples(c.data, "eval", c.paths.data_dir)[: len(texts)]
    batch = rollout_from_texts(policy, [samples[i] for i in rows], [texts[i] for i in rows])
    policy.model = model  # forward through the DDP wrapper, as Lightning does
    logp = response_logprobs(policy, batch, 1.0)[0]
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5, 0.3, -0.7])[rows]
    cfg = load_algorithm(algo)
    old = logp.detach() * 1.01  # off-policy by a token-dependent log-ratio, independent of the row's padding
    loss, _ = compute_policy_loss(cfg, logp, old, adv, batch.response_mask, ref_logp=logp.detach() * 0.99)
    loss.backward()
    grads = [p.grad.clone() for p in policy.model.parameters() if p.grad is not None]
    out.put((rank, [g.numpy() for g in grads]))
    if world > 1:
        dist.destroy_process_group()


TEXTS = ["1+2=3\n\\boxed{3}", "\\boxed{7}", "4+4=8\n8-1=7\n7+2=9\n\\boxed{9}", "\\boxed{12}", "x", "9-3=6\n\\boxed{6}"]


@pytest.mark.parametrize("algo", ["dapo", "grpo"])  # token-mean; seq-mean-token-mean + KL
def test_two_rank_gradient_equals_one_process_on_the_whole_batch(algo, tmp_path):
    """Ranks hold differently padded halves of the batch; DDP's averaged gradient = the 1-process gradient."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    _grads(list(range(6)), TEXTS, algo, 1, 0, "", q)
    full = q.get()[1]
    shards = [[0, 1, 3], [2, 4, 5]]  # uneven lengths: different P/T padding on each rank
    results = run_ranks(_grads, lambda r, init, out: (shards[r], TEXTS, algo, 2, r, init, out), tmp_path)
    for g_full, g0, g1 in zip(full, results[0], results[1]):
        assert abs(g0 - g1).max() == 0  # DDP leaves identical gradients on both ranks
        assert abs(g0 - g_full).max() < 1e-6 * max(1.0, abs(g_full).max())


def test_rank_shares_partition_the_one_process_batches():
    from seqrl.distributed import rank_share

    one = rank_share(50, steps=7, batch=8, seed=3, world=1, rank=0)
    shares = [rank_share(50, steps=7, batch=8, seed=3, world=2, rank=r) for r in range(2)]
    for step in range(7):
        union = shares[0][step * 4:(step + 1) * 4] + shares[1][step * 4:(step + 1) * 4]
        assert sorted(union) == sorted(one[step * 8:(step + 1) * 8])
    assert sorted(one[:50]) == list(range(50))  # the shuffle covers the data once before repeating
    assert rank_share(50, 7, 8, 4, 1, 0) != one  # the seed decides the order


def _failing_rollout(rank: int, init: str, out):
    """Rank 1's rollout raises; both ranks then meet in the next collective (as globally_finite's all-gather)."""
    from seqrl.distributed import gather_objects
    from seqrl.faults import on_every_rank

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)

    def rollout():
        if rank == 1:
            raise ValueError("reward function broke on 'x'")
        return "rollout"

    try:
        result = on_every_rank(rollout, "rollout")
        gather_objects(True)  # the step's next collective: would block rank 0 forever without the agreement
    except Exception as exc:  # noqa: BLE001
        result = f"{type(exc).__name__}: {exc}"
    out.put((rank, result))
    dist.destroy_process_group()


def test_an_exception_in_one_ranks_rollout_stops_every_rank(tmp_path):
    results = run_ranks(_failing_rollout, lambda r, init, out: (r, init, out), tmp_path, timeout_s=120)
    assert results[1] == "ValueError: reward function broke on 'x'"  # its own exception
    assert results[0] == "RuntimeError: rank 1 failed in the rollout: ValueError: reward function broke on 'x'"


def test_every_rank_back_propagates_in_as_many_parts_as_the_rank_that_needs_most(monkeypatch):
    """micro_batch_size=3 with 2 rows to back-propagate here and 7 (3 parts) on another rank: 3 parts here too,
    the empty one marked None (row 0 with a zero gradient), so every rank runs as many DDP backwards."""
    from types import SimpleNamespace

    import seqrl.module as module

    monkeypatch.setattr(module, "gather_objects", lambda mine: [mine, 3])
    me = SimpleNamespace(cfg=SimpleNamespace(micro_batch_size=3))
    parts = module.RLModule._micro_parts(me, list(range(8)), torch.tensor([1, 5]))
    assert [None if p is None else p.tolist() for p in parts] == [[1], [5], None]
    monkeypatch.setattr(module, "gather_objects", lambda mine: [mine])
    assert module.RLModule._micro_parts(me, list(range(3)), None) == []  # one part: the plain backward
    assert [p.tolist() for p in module.RLModule._micro_parts(me, list(range(7)), None)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert module.RLModule._micro_parts(SimpleNamespace(cfg=SimpleNamespace(micro_batch_size=None)), [0] * 9,
                                        None) == []
