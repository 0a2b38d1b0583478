"""Supervised warm-up: teach a random-initialised tiny model the task's answer formats before RL.

The warm-up mixes worked (long, step-by-step) and direct (short) demonstrations of a generated task, so the warmed-up
policy samples both styles and RL can shift the mix: on the length-sensitive task the worked style is more accurate,
which is what lets length-bias effects show on a CPU. The result is cached on disk, keyed by everything it depends
on (model, task, warm-up settings, seed), and written atomically; a cached warm-up is loaded with weights_only=True.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from seqrl.algorithms.rollout import response_logprobs, rollout_from_texts

CACHE_VERSION = 1


def init_seed(cfg) -> int:
    """The seed of the model's random init and of the warm-up (warmup.seed, else the run's seed)."""
    return cfg.seed if cfg.warmup.seed is None else cfg.warmup.seed


def warmup_key(cfg) -> str:
    """Hash of the config parts the warm-up depends on."""
    parts = {"model": cfg.model, "data": cfg.data, "warmup": cfg.warmup, "seed": init_seed(cfg), "v": CACHE_VERSION}
    blob = json.dumps(OmegaConf.to_container(OmegaConf.structured(parts), resolve=True), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def warmup(policy, cfg, log=print) -> dict:
    """Warm `policy` up in place on cfg.data's task (cached). Returns {"cached", "seconds", "loss", "path"}."""
    from seqrl.data import build_task
    from seqrl.results import atomic_write

    w = cfg.warmup
    path = Path(cfg.paths.cache_dir).expanduser() / "warmup" / f"{warmup_key(cfg)}.pt"
    if path.exists():
        try:
            state = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - a corrupt cache must never be silently used
            raise RuntimeError(f"warm-up cache {path} is corrupt ({exc}); delete it to rebuild") from exc
        policy.model.load_state_dict(state)
        log(f"[seqrl] warm-up loaded from cache {path}")
        return {"cached": True, "seconds": 0.0, "loss": None, "path": str(path)}

    task = build_task(cfg.data.task, **cfg.data.task_kwargs)
    rng = random.Random(f"warmup-{init_seed(cfg)}")
    model = policy.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=w.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, w.steps))))
    t0, loss_ema = time.perf_counter(), None
    for step in range(w.steps):
        samples = [task.sample(rng) for _ in range(w.batch_size)]
        texts = [task.demonstration(s, "worked" if rng.random() < w.worked_frac else "direct") for s in samples]
        batch = rollout_from_texts(policy, samples, texts)
        logp = response_logprobs(policy, batch, 1.0)[0]  # (B, T)
        loss = -(logp * batch.response_mask).sum() / batch.response_mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss = loss.detach()
        loss_ema = float(loss) if loss_ema is None else 0.95 * loss_ema + 0.05 * float(loss)
        if (step + 1) % max(1, w.steps // 5) == 0:
            log(f"[seqrl] warm-up step {step + 1}/{w.steps} loss {loss_ema:.3f}")
    seconds = time.perf_counter() - t0
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    atomic_write(path, lambda f: torch.save(state, f), mode="wb")
    return {"cached": False, "seconds": seconds, "loss": loss_ema, "path": str(path)}

