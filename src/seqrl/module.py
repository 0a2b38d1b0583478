"""The one RLModule: rollout -> reward -> advantage -> PPO minibatch updates, with Lightning manual optimisation.

Each Lightning training step is one RL step on `prompts_per_step` prompts:
1. rollout (registry `seqrl.algorithms.rollout.ROLLOUTS[cfg.rollout.name]`), G responses per prompt; with DAPO's
   dynamic sampling, groups whose rewards are all equal are dropped and more prompts are drawn (up to
   `algorithm.max_sampling_rounds` extra rounds; `train/sampling_rounds` logs how many were needed);
2. rewards from the shared grader (`seqrl.eval.grading`, the same functions the evaluation harness uses), shaped by
   `seqrl.algorithms.shape_rewards` (overlong punishment / filtering, format reward);
3. advantages (`compute_advantages`), old log-probs fixed once per rollout (skipped when the update is exactly
   on-policy: one epoch of one minibatch, where old = current, detached), optional frozen reference for KL;
4. `ppo_epochs` x `ppo_minibatches` optimizer steps on `compute_policy_loss`, with gradient clipping; on the one
   update of an on-policy step without KL, rows with zero advantage are not scored (`_rows_with_gradient`: their
   loss and gradient are exactly zero, their tokens still count in the aggregation); with `micro_batch_size`, the
   backward runs over parts of that many rows (`_backward_in_parts`, exact).
The module never branches on an algorithm's name: every variant is a registry entry selected by the config.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import time

import lightning as L
import torch

from seqrl.algorithms import compute_advantages, compute_policy_loss, dynamic_sampling_keep, shape_rewards
from seqrl.algorithms.losses import ADVANTAGE_SCALED
from seqrl.algorithms.rollout import ROLLOUTS, cat_rollouts, intra_op_threads, response_logprobs
from seqrl.algorithms.scoring import weighted_metrics
from seqrl.checkpointing import rng_state, set_rng_state
from seqrl.distributed import gather_objects, params_checksum, rank_share, shard, world_size
from seqrl.eval.grading import format_reward, grade_many
from seqrl.faults import FaultGuard, globally_finite, on_every_rank
from seqrl.models import get_family
from seqrl.eval.harness import EvalSet, evaluate_rollout, generate_for_eval


class RLModule(L.LightningModule):
    def __init__(self, cfg, policy, train_samples: list, eval_sets: list[EvalSet] | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.cfg, self.algo = cfg, cfg.algorithm
        self.policy = policy
        self.model = policy.model  # registered so Lightning moves, saves and restores it
        self.ref = None
        if self.algo.kl_coef > 0:
            self.ref = copy.deepcopy(policy.model).eval().requires_grad_(False)
        self.train_samples = train_samples
        self.eval_sets = eval_sets or []
        self.rollout_fn = ROLLOUTS[cfg.rollout.name]
        self.gen = torch.Generator().manual_seed(cfg.seed)  # draws refill prompts and minibatch orders
        self._eval_records: dict[int, list] = {}
        self.eval_results: dict[str, dict] = {}
        self.last_train_metrics: dict[str, float] = {}
        self.rl_step = 0  # completed RL steps (rollouts); saved in checkpoints
        self.bad_steps = {"total": 0, "consecutive": 0}  # steps skipped for NaN/inf (see FaultGuard)
        self.guard = FaultGuard(cfg.max_bad_steps, self.bad_steps)
        self.eval_before: dict = {}

    # ----------------------------------------------------------------- data
    def setup(self, stage: str) -> None:
        world = self.trainer.world_size
        if self.cfg.prompts_per_step % world:
            raise ValueError(f"prompts_per_step={self.cfg.prompts_per_step}: must be divisible by the {world} "
                             "data-parallel processes (it is the global batch)")
        self.gen.manual_seed(self.cfg.seed + 7919 * self.trainer.global_rank)  # each rank its own draws

    def train_dataloader(self):
        """One epoch = the whole run: trainer.max_steps global batches of prompts_per_step prompts, drawn from a
        seeded shuffle that does not depend on the world size; rank r takes positions r, r + world, ... of each."""
        B, world = self.cfg.prompts_per_step, self.trainer.world_size
        mine = rank_share(len(self.train_samples), self.cfg.trainer.max_steps, B, self.cfg.seed, world,
                          self.trainer.global_rank)
        done = self.rl_step * (B // world)  # resumed: start at the first step not done (same length: Lightning
        mine = mine[done:] + mine[:done]  # counts restored batches against it; max_steps ends the run)
        return torch.utils.data.DataLoader(self.train_samples, batch_size=B // world, sampler=mine, collate_fn=list)

    def val_dataloader(self):
        """Each rank generates for its shard of every eval set; records are gathered at the epoch end."""
        bs = max(1, self.cfg.eval.batch_size // self.cfg.eval.n_samples)
        return [torch.utils.data.DataLoader(shard(es.samples), batch_size=bs, collate_fn=list)
                for es in self.eval_sets]

    def configure_optimizers(self):
        o = self.cfg.optim
        opt = torch.optim.AdamW(self.model.parameters(), lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
        warm = max(1, o.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return [opt], [{"scheduler": sched, "interval": "step"}]

    # ------------------------------------------------------------- rollout
    def _grade(self, roll) -> dict[str, torch.Tensor]:
        golds = [s.answer for s in roll.samples]
        kinds = [s.kind for s in roll.samples]
        item_kw = [s.meta.get("grade_kw", {}) for s in roll.samples]  # per-item verifier options, as in eval
        correct = torch.tensor(grade_many(roll.texts, golds, kinds, item_kw=item_kw), dtype=torch.float32)
        fmt = torch.tensor([format_reward(t) for t in roll.texts], dtype=torch.float32)
        rewards, keep = shape_rewards(self.algo, correct, roll.response_lengths, self.cfg.rollout.max_new_tokens,
                                      roll.truncated, format_ok=fmt)
        return {"correct": correct, "rewards": rewards, "keep": keep}

    def _draw_prompts(self, k: int) -> list:
        idx = torch.randint(len(self.train_samples), (k,), generator=self.gen).tolist()
        return [self.train_samples[i] for i in idx]

    def _rollout(self, prompts: list):
        """Rollout; with DAPO's dynamic sampling, keep only groups with reward variance and refill from fresh
        prompts for up to `max_sampling_rounds` refill rounds after the first, trimming to the original number of
        groups. If no round yields an informative group, the last round is used as is (its advantages are all zero)."""
        target, kept, rounds = len(prompts), [], 0
        while True:
            with intra_op_threads(self.cfg.rollout.threads):
                roll = self.rollout_fn(self.policy, prompts, self.cfg.rollout, n=self.cfg.rollout.group_size)
            g = self._grade(roll)
            rounds += 1
            if not self.algo.dynamic_sampling:
                return roll, g, rounds
            informative = dynamic_sampling_keep(g["rewards"], roll.group_ids)
            if informative.any():
                rows = informative.nonzero().squeeze(1)
                kept.append((roll.select(rows), {k: v[rows] for k, v in g.items()}))
            n_prompts = sum(int(r.row_prompts.unique().numel()) for r, _ in kept)
            if n_prompts >= target or rounds > self.algo.max_sampling_rounds:
                break
            prompts = self._draw_prompts(target - n_prompts)
        if not kept:
            return roll, g, rounds
        roll = cat_rollouts([r for r, _ in kept], self.policy.pad_token_id)
        g = {k: torch.cat([gg[k] for _, gg in kept]) for k in kept[0][1]}
        prompt_ids = roll.row_prompts.unique()
        if prompt_ids.numel() > target:  # the last refill overshot: trim whole prompts
            rows = (roll.row_prompts < prompt_ids[target]).nonzero().squeeze(1)
            roll, g = roll.select(rows), {k: v[rows] for k, v in g.items()}
        return roll, g, rounds

    # --------------------------------------------------------------- train
    def training_step(self, batch: list, batch_idx: int):
        t0 = time.perf_counter()
        roll, g, rounds = on_every_rank(lambda: self._rollout(batch), "rollout")  # rank-local: no collective inside
        roll, g = roll.to(self.device), {k: v.to(self.device) for k, v in g.items()}  # CPU from the engines
        finite_rewards = globally_finite(g["rewards"])
        adv = compute_advantages(self.algo, g["rewards"], roll.group_ids) if finite_rewards else None  # (N,)
        mask = roll.response_mask * g["keep"].unsqueeze(1)  # (N, T) overlong filtering removes rows
        temp = self.cfg.rollout.temperature
        n_updates = self.algo.ppo_epochs * self.algo.ppo_minibatches
        old_logp = ref_logp = None
        with torch.no_grad():
            if n_updates > 1:
                old_logp = response_logprobs(self.policy, roll, temp, buckets=self.cfg.length_buckets)[0]
            if self.ref is not None:
                ref_logp = response_logprobs(self._ref_policy(), roll, temp, buckets=self.cfg.length_buckets)[0]
        faults: list[str] = []
        if not finite_rewards or not globally_finite(adv):
            faults.append("rewards/advantages")
            metrics = {}
        elif not globally_finite(old_logp, ref_logp, mask=mask):
            faults.append("old/reference log-probs")
            metrics = {}
        else:
            metrics = self._update(roll, adv, mask, old_logp, ref_logp, faults)
        self.guard.end_step(faults)
        metrics["train/skipped_steps"] = float(self.bad_steps["total"])
        metrics.update(self._rollout_metrics(roll, g, rounds))
        metrics.update(roll.metrics)
        metrics["perf/step_s"] = time.perf_counter() - t0
        metrics["perf/tokens_per_s"] = float(roll.attention_mask.sum()) / metrics["perf/step_s"]
        self.rl_step += 1
        metrics["train/rl_step"] = float(self.rl_step)
        self.last_train_metrics = metrics
        self._log_to_loggers(metrics)
        self.log_dict({"reward": metrics["train/reward/mean"], "len": metrics["train/response_length/mean"]},
                      prog_bar=True, logger=False)
        self._maybe_log_samples(roll, g)

    def _log_to_loggers(self, metrics: dict[str, float]) -> None:
        """The step's metrics straight to every logger, as Lightning's on_step `self.log_dict` writes them (every
        `log_every_n_steps` RL steps, step = the RL steps done before this one, `epoch` added) without
        its per-key bookkeeping: about 0.25 ms a key, 10 ms an RL step on CPU."""
        every, trainer = self.trainer.log_every_n_steps, self.trainer
        if every == 0 or (self.rl_step % every and not trainer.should_stop):
            return
        for logger in self.loggers:  # each logger writes on rank zero only
            logger.log_metrics({**metrics, "epoch": self.current_epoch}, step=self.rl_step - 1)
            logger.save()  # as Lightning does after every log: metrics.csv is current after each step

    def on_train_end(self) -> None:
        """Data-parallel guard: every rank must end with bit-identical weights (gradients were all-reduced)."""
        checksum = params_checksum(self.model.parameters())  # whole tensors, also when FSDP shards them
        self.ddp_params_in_sync = len(set(gather_objects(checksum))) == 1

    def _ref_policy(self):
        return dataclasses.replace(self.policy, model=self.ref)

    def _update(self, roll, adv, mask, old_logp, ref_logp, faults: list[str]) -> dict[str, float]:
        opt, sched = self.optimizers(), self.lr_schedulers()
        N, sums, count = len(roll), {}, 0
        for _ in range(self.algo.ppo_epochs):
            order = torch.randperm(N, generator=self.gen)
            for rows in order.chunk(self.algo.ppo_minibatches):
                if sum(gather_objects(float(mask[rows].sum()))) == 0:  # e.g. all rows overlong-filtered, on every
                    continue  # rank: no optimizer step, so AdamW's momentum cannot move the weights on zero gradients
                mb = roll.select(rows)
                live = self._rows_with_gradient(mb, adv[rows], ref_logp)
                split = self._micro_parts(mb, live)
                with torch.no_grad() if split else contextlib.nullcontext():
                    logp, ent, router = self._score(mb, live, split)
                if split:
                    logp.requires_grad_()  # a leaf: the loss's gradient with respect to the log-probs
                if not globally_finite(logp.detach(), mask=mask[rows]):
                    faults.append("log-probs")
                    continue
                old = old_logp[rows] if old_logp is not None else logp.detach()
                ref = ref_logp[rows] if ref_logp is not None else None
                loss, m = compute_policy_loss(self.algo, logp, old, adv[rows], mask[rows], ref_logp=ref,
                                              norm_const=self._norm_const())
                if not globally_finite(loss.detach()):
                    faults.append("loss")
                    continue
                opt.zero_grad(set_to_none=True)
                if split:
                    self._backward_in_parts(mb, split, torch.autograd.grad(loss, logp)[0])
                else:
                    self.manual_backward(loss)
                clip = self.cfg.optim.grad_clip
                norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
                if not torch.isfinite(norm):  # identical on every rank: the gradients were all-reduced
                    opt.zero_grad(set_to_none=True)
                    faults.append("gradients")
                    continue
                opt.step()
                sched.step()
                tok = mask[rows]
                m["train/entropy"] = float((ent * tok).sum() / tok.sum().clamp(min=1))
                m["train/grad_norm"] = float(norm)
                m["train/loss"] = float(loss.detach())
                m.update(router)
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                count += 1
        metrics = {k: v / max(count, 1) for k, v in sums.items()}
        metrics["train/lr"] = sched.get_last_lr()[0]
        return metrics

    def _rows_with_gradient(self, mb, adv: torch.Tensor, ref_logp) -> torch.Tensor | None:
        """The minibatch rows whose loss can have a gradient, when every other row's is exactly zero; None: all.

        On the one update of an on-policy step (old = current, detached: every ratio is 1) an advantage-scaled
        loss (`losses.ADVANTAGE_SCALED`: all registered ones) is 0 with zero gradient on a row with A_i = 0, while
        the aggregation still counts the row's tokens (the mask is unchanged): scoring only the other rows gives
        the same loss, gradient and metrics. Not with a KL term (its gradient does not vanish with A_i), nor for
        routed (moe) models, whose router metrics cover the tokens scored, nor without the engine's token
        entropy (`RolloutBatch.token_entropy`), which stands in for train/entropy on the rows left out."""
        if (self.algo.ppo_epochs * self.algo.ppo_minibatches != 1 or ref_logp is not None
                or self.algo.policy_loss not in ADVANTAGE_SCALED or mb.token_entropy is None
                or get_family(self.policy.family).routed):
            return None
        return (adv != 0).nonzero().squeeze(1)

    def _micro_parts(self, mb, live: torch.Tensor | None) -> list[torch.Tensor | None]:
        """The rows of minibatch `mb` to back-propagate, in parts of at most `micro_batch_size` rows; [] when one
        forward takes them all. Every data-parallel rank makes as many parts as the rank that needs most (DDP
        reduces gradients once per backward); an empty part is row 0 with a zero gradient."""
        size, rows = self.cfg.micro_batch_size, live if live is not None else torch.arange(len(mb))
        if size is None:
            return []
        count = max(gather_objects(-(-len(rows) // size)))
        if count <= 1:
            return []
        return [part if len(part) else None for part in torch.tensor_split(rows, count)]

    def _backward_in_parts(self, mb, parts: list, grad: torch.Tensor) -> None:
        """Accumulate the minibatch's parameter gradient from forwards of a few rows each: with g = dL/dlogp (N, T)
        from the loss on the whole minibatch's log-probs (scored without a graph), dL/dtheta = sum over parts of
        g_part . dlogp_part/dtheta, so each part's backward of logp_part against g_part adds its share (exact: the
        chain rule; the aggregation's counts, FSPO's batch mean and every metric saw the whole minibatch). Costs one
        forward without a graph more than a single forward (the log-probs are scored part by part too); the
        activations and logits held are one part's."""
        temp, buckets = self.cfg.rollout.temperature, self.cfg.length_buckets
        for part in parts:
            idx = part if part is not None else torch.zeros(1, dtype=torch.long)
            logp = response_logprobs(self.policy, mb.select(idx), temp, buckets=buckets)[0]  # (n, T)
            g = grad[idx.to(grad.device)]
            self.manual_backward(logp, g if part is not None else torch.zeros_like(g))

    def _score(self, mb, live: torch.Tensor | None, parts: list | tuple = ()):
        """(log-probs (N, T), token entropy (N, T), router metrics) of minibatch `mb`, scoring only rows `live`
        (None: all; at least one row is scored, so the update's graph and optimizer step stay as they are), one
        forward per part of `parts` (`_micro_parts`; the caller holds no graph then). The rows left out get
        log-prob 0 (a constant, and their old log-prob: ratio 1) and the rollout's entropy."""
        temp, buckets = self.cfg.rollout.temperature, self.cfg.length_buckets
        if not parts and (live is None or len(live) == len(mb)):
            return response_logprobs(self.policy, mb, temp, entropy=True, buckets=buckets)
        groups = [p for p in parts if p is not None] or [live if len(live) else live.new_zeros(1)]
        logp = entropy = None
        router = []
        for rows in groups:
            sub = mb.select(rows)
            lp, ent, metrics = response_logprobs(self.policy, sub, temp, entropy=True, buckets=buckets)
            if logp is None:  # (N, T): every part keeps the minibatch's width
                logp = lp.new_zeros(len(mb), lp.shape[1])
                entropy = mb.token_entropy.to(ent) if live is not None else ent.new_zeros(len(mb), ent.shape[1])
            at = (rows.to(lp.device),)
            logp, entropy = logp.index_put(at, lp), entropy.index_put(at, ent)
            router.append((metrics, float(sub.attention_mask.sum())))
        return logp, entropy, weighted_metrics(router)

    def _norm_const(self):
        return self.algo.norm_const if self.algo.norm_const is not None else self.cfg.rollout.max_new_tokens

    def _rollout_metrics(self, roll, g, rounds) -> dict[str, float]:
        """Rollout statistics over the global batch (gathered from every data-parallel rank); reward, accuracy and
        length statistics count each whole response once (EqLen rows hold segments of shared responses)."""
        groups = [g["rewards"][roll.group_ids == k] for k in roll.group_ids.unique()]
        zero_std = [bool(x.std(unbiased=False) == 0) for x in groups]
        one = roll.one_row_per_response()
        local = (g["rewards"][one], g["correct"][one], roll.response_lengths[one], roll.truncated[one], g["keep"],
                 zero_std)
        parts = gather_objects(local)
        r, correct, lengths, truncated, keep = (torch.cat([p[i] for p in parts]).float() for i in range(5))
        zero_std = sum(sum(p[5]) for p in parts) / sum(len(p[5]) for p in parts)
        return {
            "train/reward/mean": float(r.mean()), "train/reward/std": float(r.std(unbiased=False)),
            "train/accuracy": float(correct.mean()),
            "train/response_length/mean": float(lengths.mean()), "train/response_length/min": float(lengths.min()),
            "train/response_length/max": float(lengths.max()),
            "train/response_length/clip_ratio": float(truncated.mean()),
            "train/frac_reward_zero_std": float(zero_std), "train/sampling_rounds": float(rounds),
            "train/kept_frac": float(keep.mean()), "perf/gen_s": roll.gen_seconds,
            "perf/gen_tokens_per_s": float(roll.response_lengths.sum()) / max(roll.gen_seconds, 1e-9),
        }

    def _maybe_log_samples(self, roll, g) -> None:
        every = self.cfg.sample_table_every
        step = self.trainer.global_step
        if every <= 0 or (self.rl_step - 1) % every:
            return
        rows = [[step, s.prompt, t, s.answer, float(rw)] for s, t, rw in zip(roll.samples, roll.texts, g["rewards"])]
        for logger in self.loggers:
            if hasattr(logger, "log_table"):
                logger.log_table("train/samples", columns=["step", "prompt", "completion", "gold", "reward"],
                                 data=rows[:16], step=step)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["seqrl"] = {"rl_step": self.rl_step, "rng": rng_state(self.gen), "bad_steps": self.bad_steps,
                               "eval_before": self.eval_before}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["seqrl"]
        self.rl_step, self.eval_before = state["rl_step"], state["eval_before"]
        self.bad_steps.update(state["bad_steps"])  # the guard holds this dict
        self._resume_rng = state["rng"]  # applied when training starts (after Lightning's own setup draws)

    def on_train_start(self) -> None:
        if getattr(self, "_resume_rng", None) is not None:
            set_rng_state(self._resume_rng, self.gen)
            self._resume_rng = None

    # ---------------------------------------------------------- validation
    def validation_step(self, batch: list, batch_idx: int, dataloader_idx: int = 0):
        roll = generate_for_eval(self.policy, batch, self.cfg.eval)
        self._eval_records.setdefault(dataloader_idx, []).append(roll)

    def on_validation_epoch_end(self):
        for i, es in enumerate(self.eval_sets):
            rolls = _gather_items(self._eval_records.get(i, []), self.cfg.eval.n_samples)
            result = evaluate_rollout(es, rolls, self.cfg.eval)
            self.eval_results[es.name] = result
            self.log_dict({f"eval/{es.name}/{k}": v for k, v in result["metrics"].items()})
        self._eval_records = {}


@dataclasses.dataclass
class _ItemRoll:
    """The k generations of one eval item, without tensors of the prompt (what grading needs), picklable."""

    samples: list
    texts: list
    lengths: torch.Tensor  # (k,)
    truncated: torch.Tensor  # (k,)


def _gather_items(rolls: list, k: int) -> list[_ItemRoll]:
    """Per-item generations of every data-parallel rank, back in the eval set's order (rank r held items r::world)."""
    if world_size() == 1:
        return rolls
    items = [_ItemRoll([dataclasses.replace(s, images=None) for s in r.samples[j:j + k]], r.texts[j:j + k],
                       r.lengths[j:j + k], r.truncated[j:j + k])
             for r in rolls for j in range(0, len(r), k)]
    parts = gather_objects(items)
    return [part[j] for j in range(max(map(len, parts))) for part in parts if j < len(part)]
