"""Numerical-fault guard: a NaN or inf in rewards, advantages, log-probs, the loss or the gradients skips the update
instead of corrupting the weights; the skip is counted (`train/skipped_steps`), and the run stops with a clear message
after `max_bad_steps` consecutive bad RL steps. Decisions are taken on values gathered from every data-parallel rank,
so all ranks skip together (no rank is left waiting in a collective); an exception in one rank's rollout stops every
rank (`on_every_rank`)."""
from __future__ import annotations

import torch

from seqrl.distributed import gather_objects


def on_every_rank(fn, what: str):
    """fn() on this rank, then one all-gather tells every rank whether any rank's fn raised: a rank-local exception
    (a reward function, the grader, a data error) stops every rank instead of leaving the others blocked in the
    step's next collective until the process group's timeout. The failing rank re-raises its own exception; the
    others raise RuntimeError naming the first failed rank and its error. One process: just fn()."""
    try:
        out, err = fn(), None
    except Exception as exc:  # noqa: BLE001 - re-raised below on this rank, reported to the others
        out, err = None, exc
    failed = [(r, e) for r, e in enumerate(gather_objects(None if err is None else f"{type(err).__name__}: {err}"))
              if e is not None]
    if err is not None:
        raise err
    if failed:
        raise RuntimeError(f"rank {failed[0][0]} failed in the {what}: {failed[0][1]}")
    return out


def globally_finite(*tensors: torch.Tensor | None, mask: torch.Tensor | None = None) -> bool:
    """True when every given tensor is finite (only where `mask` is set, if given) on every rank."""
    ok = all(bool(torch.isfinite(t if mask is None else t[mask.bool()]).all()) for t in tensors if t is not None)
    return all(gather_objects(ok))


class FaultGuard:
    """Counts RL steps with skipped updates; `state` ({"total", "consecutive"}) lives in the checkpoint."""

    def __init__(self, max_consecutive: int, state: dict):
        self.max_consecutive, self.state = max_consecutive, state

    def end_step(self, faults: list[str]) -> None:
        if not faults:
            self.state["consecutive"] = 0
            return
        self.state["total"] += 1
        self.state["consecutive"] += 1
        if self.state["consecutive"] >= self.max_consecutive:
            raise RuntimeError(f"seqrl: stopping after {self.state['consecutive']} consecutive RL steps with non-finite "
                               f"values ({', '.join(sorted(set(faults)))}); max_bad_steps={self.max_consecutive}")
