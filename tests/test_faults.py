"""Numerical faults injected into a real training run: the bad update is skipped and counted, the weights stay
finite, and persistent faults stop the run with one clear message."""
from __future__ import annotations

import pytest
import torch

from conftest import compose, tiny_overrides


def _train(tmp_path, *extra):
    from seqrl.train import train

    return train(compose("train", tiny_overrides(tmp_path, "trainer.max_steps=4", "eval.heldout=false", *extra)))


def _inject(monkeypatch, name: str, bad_calls: set[int], poison):
    """Wrap seqrl.module.<name> so that its n-th call (1-based) in `bad_calls` returns a poisoned result."""
    import seqrl.module as module

    original, calls = getattr(module, name), {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        out = original(*args, **kwargs)
        return poison(out) if calls["n"] in bad_calls else out

    monkeypatch.setattr(module, name, wrapped)
    return calls


def _weights_finite():
    from seqrl.module import RLModule

    return all(torch.isfinite(p).all() for p in RLModule._last.model.parameters())


@pytest.fixture(autouse=True)
def _remember_module(monkeypatch):
    from seqrl.module import RLModule

    original = RLModule.on_train_start

    def on_train_start(self):
        RLModule._last = self
        original(self)

    monkeypatch.setattr(RLModule, "on_train_start", on_train_start)


@pytest.mark.parametrize("name,poison,what", [
    ("shape_rewards", lambda out: (out[0] * float("nan"), out[1]), "rewards"),
    ("compute_advantages", lambda adv: adv + float("inf"), "advantages"),
    ("response_logprobs", lambda out: (out[0] * float("nan"), *out[1:]), "log-probs"),
    ("compute_policy_loss", lambda out: (out[0] * float("inf"), out[1]), "loss"),
])
def test_one_bad_step_is_skipped_and_counted(tmp_path, monkeypatch, name, poison, what):
    calls = _inject(monkeypatch, name, {2}, poison)
    results = _train(tmp_path)
    assert calls["n"] >= 2, f"{name} was not on the training path"
    assert results["rl_steps"] == 4
    assert results["train"]["train/skipped_steps"] == 1.0, what
    assert _weights_finite()


def test_non_finite_gradients_are_skipped(tmp_path, monkeypatch):
    """An inf gradient (a hook on one weight) is caught after the backward pass: no optimizer step is taken."""
    from seqrl.module import RLModule

    original = RLModule.on_train_start

    def poison_grads(self):
        original(self)
        first = next(p for p in self.model.parameters() if p.requires_grad)
        first.register_hook(lambda grad: grad * float("inf") if self.rl_step == 1 else grad)

    monkeypatch.setattr(RLModule, "on_train_start", poison_grads)
    results = _train(tmp_path)
    assert results["train"]["train/skipped_steps"] == 1.0
    assert _weights_finite()


def test_persistent_faults_stop_the_run_with_a_clear_message(tmp_path, monkeypatch):
    _inject(monkeypatch, "compute_policy_loss", set(range(1, 100)), lambda out: (out[0] * float("nan"), out[1]))
    with pytest.raises(RuntimeError, match=r"stopping after 2 consecutive RL steps with non-finite values \(loss\); "
                                           r"max_bad_steps=2"):
        _train(tmp_path, "max_bad_steps=2")
