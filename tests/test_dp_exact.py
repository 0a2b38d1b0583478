"""Data parallelism: 2 gloo processes holding unequal halves of a batch reproduce the 1-process gradient.

A shared parameter w (D,) plays the model: log pi(y_it) = -softplus(x_it . w). Rank 0 holds 3 responses,
rank 1 holds 5 (one of them empty, as after overlong filtering), with different lengths. Each rank back-
propagates its local loss; the all-reduce average (what DDP does) must equal the full-batch gradient, and
every metric except the per-rank length quartiles must equal the full-batch metric.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from seqrl.algorithms import compute_advantages, compute_policy_loss

ROWS = [[0, 1, 2], [3, 4, 5, 6, 7]]
CASES = {
    "token-mean": ("dapo", {}),
    "seq-mean-token-mean": ("grpo", {}),  # with the k3 KL term (kl_coef 0.04)
    "seq-mean-token-sum": ("luspo", {"clip_low": 0.05, "clip_high": 0.05}),
    "seq-mean-token-sum-norm": ("dr_grpo", {}),  # C = longest response over both ranks
    "fspo-batch-drift": ("fspo", {"fspo_c_low": 0.2, "fspo_c_high": 0.2}),  # mu from both ranks
}


def make_batch():
    g = torch.Generator().manual_seed(0)
    B, T, D = 8, 7, 4
    lengths = torch.tensor([7, 2, 5, 1, 6, 3, 0, 4])
    return {
        "x": torch.randn(B, T, D, generator=g, dtype=torch.float64),
        "w": torch.randn(D, generator=g, dtype=torch.float64),
        "mask": (torch.arange(T) < lengths[:, None]).long(),  # (B, T)
        "old_shift": 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64),
        "ref_shift": 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64),
        "rewards": torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.5], dtype=torch.float64),
    }


def run_cases(rows):
    """Gradients (averaged over ranks when distributed) and metrics for the given rows of the batch."""
    data = make_batch()
    world = dist.get_world_size() if dist.is_initialized() else 1
    results = {"batch_norm": compute_advantages("batch_norm", data["rewards"][rows], adv_eps=0.0)}
    adv = compute_advantages("grpo", data["rewards"], group_size=2)[rows]
    for case, (name, overrides) in CASES.items():
        w = data["w"].clone().requires_grad_()
        logp = -F.softplus(data["x"][rows] @ w)  # (b, T)
        old, ref = logp.detach() + data["old_shift"][rows], logp.detach() + data["ref_shift"][rows]
        loss, metrics = compute_policy_loss(name, logp, old, adv, data["mask"][rows], ref_logp=ref, **overrides)
        (grad,) = torch.autograd.grad(loss, w)
        if world > 1:
            dist.all_reduce(grad)
            grad /= world
        results[case] = (grad, {k: v for k, v in metrics.items() if "len_q" not in k})
    return results


def worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.save(run_cases(ROWS[rank]), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("dp"))
    mp.spawn(worker, args=(free_port(), out_dir), nprocs=2, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_match_one_process(two_ranks, case):
    grad, metrics = run_cases(ROWS[0] + ROWS[1])[case]
    assert grad.abs().sum() > 0 and 0 < metrics["train/pg_clipfrac"] < 1, metrics
    for rank in range(2):
        rank_grad, rank_metrics = two_ranks[rank][case]
        assert torch.allclose(rank_grad, grad, atol=1e-6, rtol=0), (rank, rank_grad, grad)
        assert rank_metrics == pytest.approx(metrics, abs=1e-9), rank


def test_batch_norm_advantage_uses_every_rank(two_ranks):
    full = run_cases(ROWS[0] + ROWS[1])["batch_norm"]
    split = torch.cat([two_ranks[0]["batch_norm"], two_ranks[1]["batch_norm"]])
    assert torch.allclose(split, full, atol=1e-12)
