"""Reference parity with verl's `verl.trainer.ppo.core_algos` on identical float64 tensors, to 1e-6.

verl cannot live in the project venv (0.9.1 pins transformers < 5.11; we need 5.23), so `.ci/verl_ref.sh` installs it
with `--no-deps` into a side directory ($VENV/verl_ref, or $VERL_REF_DIR) together with exactly the packages
core_algos imports that the venv lacks (ray, tensordict and a few small ones; pinned there). This module never imports
verl: it writes the inputs to a file, runs tests/verl_reference.py in a subprocess whose PYTHONPATH is that side
directory (the venv's transformers stays what it is), and compares verl's outputs with ours computed here. If the side
install is missing, the tests FAIL with the command to run: they never skip.

Compared (ours -> verl):
- advantages: grpo -> compute_grpo_outcome_advantage (and its vectorized twin), dr_grpo -> the same with
  norm_adv_by_std_in_grpo=False, rloo -> compute_rloo_outcome_advantage (and rloo_vectorized); unequal group sizes,
  one constant group. verl returns A_i broadcast over the response mask (B, T).
- aggregations: our agg_loss vs verl's agg_loss in all four modes, with garbage under padding and one row masked out
  entirely (both leave such a row out of the sequence count B).
- policy losses, in all four modes (value, gradient w.r.t. log pi, clip fraction): gspo and gspo_token -> verl "gspo";
  token_clip -> verl "vanilla".

Intentional differences, each pinned by a test below:
- verl's vanilla loss always applies the dual clip (clip_ratio_c, default 3) for A < 0; ours makes it opt-in
  (`dual_clip_c`), so parity sets dual_clip_c = verl's clip_ratio_c. verl reports the dual-clipped share separately
  (pg_clipfrac_lower); our pg_clipfrac counts every blocked token, so it equals pg_clipfrac + pg_clipfrac_lower
  (the two clips never bind on the same token).
- seq-mean-token-sum-norm: verl's constant (loss_scale_factor) defaults to the padded width T, ours (norm_const) to
  the longest response in the batch, which padding cannot change. Parity passes the constant explicitly to both.
- grpo with eps = 0: verl divides a constant group's 0 by std 0 (NaN); ours defines that advantage as 0.
- Small guards that never bind here: verl adds 1e-8 to each length in seq-mean-token-mean; verl caps gspo's log
  ratio at +10 and vanilla's at +-20, ours caps both at +-20.
- Precision: everything agrees to ~1e-10 except verl's grpo_vectorized, which computes group statistics in float32
  (~1e-7 apart, inside the 1e-6 tolerance).
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqrl.algorithms import AlgorithmConfig, agg_loss, compute_advantages, compute_policy_loss

ROOT = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).with_name("verl_reference.py")
INSTALLER = ROOT / ".ci" / "verl_ref.sh"
SIDE_DIR = Path(os.environ.get("VERL_REF_DIR") or Path(sys.prefix) / "verl_ref")
VERL_PIN = re.search(r"\bverl==([\w.]+)", INSTALLER.read_text()).group(1)
ATOL = 1e-6
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
T = 12  # padded width, wider than the longest response (9) so verl's default norm constant differs from ours
NORM_CONST = 16.0  # an explicit seq-mean-token-sum-norm constant (a generation budget)
CLIPS = {"gspo": (0.05, 0.08), "vanilla": (0.2, 0.28)}  # (low, high): a mix of clipped and free; DAPO's clip-higher


def make_inputs() -> dict:
    """Float64 inputs shared by both sides: ten responses of lengths 0..9 (one empty) in a (B, T) = (10, 12) batch."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([9, 3, 5, 1, 7, 0, 8, 4, 6, 2])  # (B,)
    mask = (torch.arange(T) < lengths[:, None]).double()  # (B, T)
    logp = -3 * torch.rand(len(lengths), T, generator=g, dtype=torch.float64)  # (B, T)
    old_logp = logp + 0.3 * torch.randn(logp.shape, generator=g, dtype=torch.float64)
    adv = torch.tensor([-0.9, -1.2, 0.4, -0.3, 1.5, 0.7, 0.8, -1.1, 0.2, 1.0], dtype=torch.float64)  # (B,)
    old_logp[1, 1] = logp[1, 1] - 1.5  # token ratio e^1.5 > 3 with A < 0: the dual clip binds
    old_logp[7, 2] = logp[7, 2] - 1.5
    logp, old_logp = logp.where(mask > 0, 5.0), old_logp.where(mask > 0, -40.0)  # garbage under padding
    # outcome rewards: groups of 3, 4 and 3 responses, the last group constant
    rewards = torch.tensor([1.0, 0.0, 0.25, 0.0, 1.0, 1.0, 0.25, 1.0, 1.0, 1.0], dtype=torch.float64)  # (B,)
    group = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])  # (B,)
    adv_len = lengths.clamp(min=1)  # every response carries its reward on its last token
    adv_mask = (torch.arange(T) < adv_len[:, None]).double()  # (B, T)
    token_rewards = rewards[:, None] * (torch.arange(T) == adv_len[:, None] - 1)  # (B, T)
    loss_mat = torch.randn(logp.shape, generator=g, dtype=torch.float64).where(mask > 0, 1e3)  # (B, T)
    return dict(mask=mask, logp=logp, old_logp=old_logp, adv=adv, rewards=rewards, group=group, adv_mask=adv_mask,
                token_rewards=token_rewards, adv_eps=1e-6, loss_mat=loss_mat, norm_const=NORM_CONST,
                gspo_clip=CLIPS["gspo"], vanilla_clip=CLIPS["vanilla"])


@pytest.fixture(scope="module")
def inputs() -> dict:
    return make_inputs()


@pytest.fixture(scope="module")
def verl_out(inputs, tmp_path_factory) -> dict:
    """verl's outputs on `inputs`, computed in a subprocess on the side install."""
    if not (SIDE_DIR / "verl").is_dir():
        pytest.fail(f"verl side install missing at {SIDE_DIR}: run `bash .ci/verl_ref.sh {Path(sys.prefix)}` "
                    "(with the same VERL_REF_DIR if set); `make test` runs it")
    tmp = tmp_path_factory.mktemp("verl")
    src, dst = tmp / "inputs.pt", tmp / "verl.pt"
    torch.save(inputs, src)
    # Only the side directory joins the venv's packages; verl's optional entry-point plugins are not loaded.
    env = os.environ | {"PYTHONPATH": str(SIDE_DIR), "OMP_NUM_THREADS": "1", "VERL_USE_EXTERNAL_PLUGINS": "none"}
    run = subprocess.run([sys.executable, str(HELPER), str(src), str(dst)], env=env, capture_output=True, text=True,
                         timeout=300)
    if run.returncode:
        pytest.fail(f"tests/verl_reference.py failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    return torch.load(dst, weights_only=True)


def assert_close(ours, theirs, what: str) -> None:
    ours, theirs = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(theirs, dtype=torch.float64)
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} != verl {tuple(theirs.shape)}"
    diff = (ours - theirs).abs().max().item()
    assert diff < ATOL, f"{what}: max |ours - verl| = {diff:.3g}"


def test_reference_is_the_pinned_verl_from_the_side_install(verl_out):
    assert verl_out["meta/version"] == VERL_PIN
    assert Path(verl_out["meta/file"]).resolve().is_relative_to(SIDE_DIR.resolve())


# ---------------------------------------------------------------- advantages
@pytest.mark.parametrize("ours, theirs", [("grpo", "grpo"), ("grpo", "grpo/vectorized"), ("dr_grpo", "dr_grpo"),
                                          ("dr_grpo", "dr_grpo/vectorized"), ("rloo", "rloo"),
                                          ("rloo", "rloo/vectorized")])
def test_advantages_match_verl(inputs, verl_out, ours, theirs):
    adv = compute_advantages(ours, inputs["rewards"], inputs["group"], adv_eps=inputs["adv_eps"])  # (B,)
    assert_close(adv[:, None] * inputs["adv_mask"], verl_out[f"adv/{theirs}"], f"{ours} vs verl {theirs}")
    assert adv[:7].abs().min() > 0.1 and torch.all(adv[7:] == 0)  # informative groups, and the constant one


def test_grpo_eps0_constant_group_is_nan_in_verl_zero_in_ours(inputs, verl_out):
    ours = compute_advantages("grpo", inputs["rewards"], inputs["group"], adv_eps=0.0)[:, None] * inputs["adv_mask"]
    theirs = verl_out["adv/grpo/eps0"]  # (B, T)
    assert_close(ours[:7], theirs[:7], "grpo eps=0, non-constant groups")
    assert torch.isnan(theirs[7:]).all() and torch.all(ours[7:] == 0)


# ---------------------------------------------------------------- aggregations
@pytest.mark.parametrize("mode", AGGS)
def test_aggregation_matches_verl(inputs, verl_out, mode):
    ours = agg_loss(inputs["loss_mat"], inputs["mask"], mode, norm_const=NORM_CONST)
    assert_close(ours, verl_out[f"agg/{mode}"], mode)


def test_sum_norm_default_constant_is_the_padded_width_in_verl(inputs, verl_out):
    theirs = verl_out["agg/seq-mean-token-sum-norm/default"]
    loss_mat, mask = inputs["loss_mat"], inputs["mask"]
    assert_close(agg_loss(loss_mat, mask, "seq-mean-token-sum-norm", norm_const=float(T)), theirs, "C = T")
    ours_default = agg_loss(loss_mat, mask, "seq-mean-token-sum-norm")  # C = longest response, 9
    assert math.isclose(ours_default.item() * 9, theirs.item() * T, rel_tol=1e-9, abs_tol=1e-12)
    assert abs(ours_default.item() - theirs.item()) > 1e-3


# ---------------------------------------------------------------- policy losses
def ours_loss(inputs, policy_loss: str, mode: str, clips, dual_clip_c=None):
    """Our loss, d loss / d logp and clip fraction with the same clip range and norm constant as verl's run."""
    cfg = AlgorithmConfig(name=f"verl-parity-{policy_loss}", policy_loss=policy_loss, agg=mode, clip_low=clips[0],
                          clip_high=clips[1], dual_clip_c=dual_clip_c, norm_const=NORM_CONST)
    logp = inputs["logp"].clone().requires_grad_()  # (B, T)
    loss, metrics = compute_policy_loss(cfg, logp, inputs["old_logp"], inputs["adv"], inputs["mask"])
    loss.backward()
    return loss.detach(), logp.grad, metrics["train/pg_clipfrac"]


@pytest.mark.parametrize("mode", AGGS)
@pytest.mark.parametrize("policy_loss", ["gspo", "gspo_token"])
def test_gspo_matches_verl(inputs, verl_out, policy_loss, mode):
    value, grad, clipfrac = ours_loss(inputs, policy_loss, mode, CLIPS["gspo"])
    key = f"gspo/{mode}"
    assert_close(value, verl_out[f"{key}/value"], f"{policy_loss} [{mode}] value")
    assert_close(grad, verl_out[f"{key}/grad"], f"{policy_loss} [{mode}] grad")
    assert_close(clipfrac, verl_out[f"{key}/clipfrac"], f"{policy_loss} [{mode}] clipfrac")
    assert 0.2 < clipfrac < 0.8 and grad.abs().max() > 1e-3  # both branches of the clip are exercised


@pytest.mark.parametrize("mode", AGGS)
def test_token_clip_with_dual_clip_matches_verl_vanilla(inputs, verl_out, mode):
    c = verl_out["meta/clip_ratio_c"]
    assert c == 3.0  # verl's default dual-clip constant, always on in its vanilla loss
    value, grad, clipfrac = ours_loss(inputs, "token_clip", mode, CLIPS["vanilla"], dual_clip_c=c)
    key = f"vanilla/{mode}"
    assert_close(value, verl_out[f"{key}/value"], f"token_clip [{mode}] value")
    assert_close(grad, verl_out[f"{key}/grad"], f"token_clip [{mode}] grad")
    upper, lower = verl_out[f"{key}/clipfrac"], verl_out[f"{key}/clipfrac_lower"]
    assert_close(clipfrac, upper + lower, f"token_clip [{mode}] clipfrac = verl pg_clipfrac + pg_clipfrac_lower")
    assert upper > 0 and lower > 0  # the ordinary clip and the dual clip both bind somewhere


def test_verl_vanilla_always_dual_clips_ours_only_when_asked(inputs, verl_out):
    value, grad, _ = ours_loss(inputs, "token_clip", "token-mean", CLIPS["vanilla"])  # dual_clip_c = None
    theirs_grad = verl_out["vanilla/token-mean/grad"]
    dual = torch.zeros_like(grad, dtype=torch.bool)
    dual[1, 1] = dual[7, 2] = True  # the two tokens with ratio e^1.5 > 3 and A < 0
    assert torch.all(theirs_grad[dual] == 0) and torch.all(grad[dual] != 0)  # verl blocks them, ours does not
    assert_close(grad[~dual], theirs_grad[~dual], "token_clip without dual clip, other tokens")
    assert value.item() > verl_out["vanilla/token-mean/value"].item() + 1e-3
