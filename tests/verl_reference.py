"""verl's side of tests/test_verl_parity.py: runs verl.trainer.ppo.core_algos on the inputs the test wrote.

Usage: `python tests/verl_reference.py IN.pt OUT.pt`, with PYTHONPATH pointing at the side install made by
.ci/verl_ref.sh. It imports verl, torch and numpy only, never seqrl: the test computes ours in its own process from
the same float64 tensors and compares. OUT.pt maps names to tensors (or floats/strings):
  meta/version, meta/file, meta/clip_ratio_c     verl's version, where it was imported from, its dual-clip default
  adv/<estimator>                                verl's outcome advantages (B, T)
  agg/<mode>, agg/<mode>/default                 agg_loss with loss_scale_factor = inputs["norm_const"] / verl's own
  <gspo|vanilla>/<mode>/<value|grad|clipfrac|clipfrac_lower>   a policy loss, d loss / d logp (B, T), its metrics
Not collected by pytest (no test_ prefix); not importable without verl.
"""
from __future__ import annotations

import sys

import torch
import verl
from verl.trainer.ppo import core_algos as ca
from verl.workers.config import ActorConfig

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def advantages(x: dict) -> dict:
    """verl's outcome-reward estimators; the reward sits on each response's last valid token."""
    index = x["group"].numpy()  # verl groups by a numpy array of prompt ids
    rew, mask = x["token_rewards"], x["adv_mask"]  # (B, T)
    grpo_kw = {"grpo": {}, "dr_grpo": {"norm_adv_by_std_in_grpo": False}}
    out = {}
    for name, kw in grpo_kw.items():
        out[f"adv/{name}"] = ca.compute_grpo_outcome_advantage(rew.clone(), mask, index, epsilon=x["adv_eps"], **kw)[0]
        out[f"adv/{name}/vectorized"] = ca.compute_grpo_vectorized_outcome_advantage(
            rew.clone(), mask, index, epsilon=x["adv_eps"], **kw)[0]
    out["adv/grpo/eps0"] = ca.compute_grpo_outcome_advantage(rew.clone(), mask, index, epsilon=0.0)[0]
    out["adv/rloo"] = ca.compute_rloo_outcome_advantage(rew.clone(), mask, index)[0]
    out["adv/rloo/vectorized"] = ca.compute_rloo_vectorized_outcome_advantage(rew.clone(), mask, index)[0]
    return out


def aggregations(x: dict) -> dict:
    """agg_loss in every mode; the -norm mode once with the test's constant, once with verl's default."""
    out = {}
    for mode in AGGS:
        kw = {"loss_scale_factor": x["norm_const"]} if mode == "seq-mean-token-sum-norm" else {}
        out[f"agg/{mode}"] = ca.agg_loss(x["loss_mat"], x["mask"], mode, **kw)
    out["agg/seq-mean-token-sum-norm/default"] = ca.agg_loss(x["loss_mat"], x["mask"], "seq-mean-token-sum-norm")
    return out


def policy_losses(x: dict) -> dict:
    """verl's registered gspo and vanilla losses in every aggregation mode: value, gradient, clip fractions."""
    out = {}
    for name in ("gspo", "vanilla"):
        clip_low, clip_high = x[f"{name}_clip"]
        for mode in AGGS:
            cfg = ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1,
                              clip_ratio_low=clip_low, clip_ratio_high=clip_high)  # clip_ratio_c: verl's default
            if mode == "seq-mean-token-sum-norm":
                cfg.global_batch_info["loss_scale_factor"] = x["norm_const"]  # forwarded to agg_loss
            logp = x["logp"].clone().requires_grad_()  # (B, T)
            adv = x["adv"][:, None].expand_as(logp)  # (B, T): verl takes per-token advantages
            loss, metrics = ca.get_policy_loss_fn(name)(x["old_logp"], logp, adv, x["mask"], mode, cfg)
            loss.backward()
            key = f"{name}/{mode}"
            out.update({f"{key}/value": loss.detach(), f"{key}/grad": logp.grad,
                        f"{key}/clipfrac": metrics["actor/pg_clipfrac"],
                        f"{key}/clipfrac_lower": metrics["actor/pg_clipfrac_lower"]})
    out["meta/clip_ratio_c"] = float(cfg.clip_ratio_c)
    return out


def main(src: str, dst: str) -> None:
    """Read the test's inputs from src, write verl's outputs to dst."""
    torch.set_default_dtype(torch.float64)
    x = torch.load(src, weights_only=True)
    out = {"meta/version": verl.__version__, "meta/file": verl.__file__}
    for part in (advantages, aggregations, policy_losses):
        out.update(part(x))
    torch.save(out, dst)


if __name__ == "__main__":
    main(*sys.argv[1:3])
