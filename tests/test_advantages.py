"""Advantage estimators by hand and their identities, plus the algorithm configs (conf/algorithm/*.yaml)."""
import math
import re

import pytest
import torch

from seqrl.algorithms import AlgorithmConfig, available_algorithms, compute_advantages, load_algorithm
from seqrl.algorithms.config import conf_dir

# two groups with non-contiguous ids and unequal sizes: group 7 = [1, 0, 0, 1], group 3 = [2, 4, 6]
REWARDS = torch.tensor([1.0, 2.0, 0.0, 4.0, 0.0, 6.0, 1.0])
IDS = torch.tensor([7, 3, 7, 3, 7, 3, 7])


def test_zscore_by_hand():
    # group 7: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3); group 3: mean 4, std sqrt(8 / 2) = 2
    a = 0.5 / math.sqrt(1 / 3)
    expected = torch.tensor([a, -1.0, -a, 0.0, -a, 1.0, a])
    assert torch.allclose(compute_advantages("grpo", REWARDS, IDS, adv_eps=0.0), expected, atol=1e-6)
    with_eps = compute_advantages("grpo", REWARDS, IDS, adv_eps=0.5)
    assert with_eps[1].item() == pytest.approx(-2.0 / 2.5)


def test_dr_grpo_is_mean_centred_and_rloo_is_leave_one_out():
    dr = compute_advantages("dr_grpo", REWARDS, IDS)
    assert torch.allclose(dr, torch.tensor([0.5, -2.0, -0.5, 0.0, -0.5, 2.0, 0.5]))
    rloo = compute_advantages("rloo", REWARDS, IDS)
    loo = [REWARDS[i] - REWARDS[(IDS == IDS[i]) & (torch.arange(7) != i)].mean() for i in range(7)]
    assert torch.allclose(rloo, torch.stack(loo))
    sizes = torch.tensor([4.0, 3, 4, 3, 4, 3, 4])
    assert torch.allclose(rloo, sizes / (sizes - 1) * dr)  # G/(G-1) x Dr. GRPO


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "batch_norm"])
@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_constant_group_gets_zero_advantage(name, eps):
    adv = compute_advantages(name, torch.full((6,), 3.0), group_size=3, adv_eps=eps)
    assert torch.equal(adv, torch.zeros(6))


def test_group_size_equals_contiguous_group_ids():
    r = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.5, 0.0])
    by_size = compute_advantages("grpo", r, group_size=3)
    assert torch.equal(by_size, compute_advantages("grpo", r, torch.tensor([0, 0, 0, 1, 1, 1])))


def test_batch_norm_ignores_groups():
    r = torch.tensor([0.0, 1.0, 3.0, 4.0])  # mean 2, unbiased std sqrt(10/3)
    expected = (r - 2.0) / math.sqrt(10 / 3)
    assert torch.allclose(compute_advantages("batch_norm", r, adv_eps=0.0), expected)


def test_algorithm_names_and_configs_pick_their_estimator():
    assert torch.equal(compute_advantages("gspo", REWARDS, IDS), compute_advantages("grpo", REWARDS, IDS))
    cfg = load_algorithm("dr_grpo")
    assert torch.equal(compute_advantages(cfg, REWARDS, IDS), compute_advantages("dr_grpo", REWARDS, IDS))
    plain = compute_advantages(load_algorithm("grpo"), REWARDS, IDS, adv_eps=0.0)
    assert torch.allclose(plain, compute_advantages("grpo", REWARDS, IDS, adv_eps=0.0))


@pytest.mark.parametrize("call, message", [
    (lambda: compute_advantages("grpo", REWARDS), r"advantage='grpo' is group-relative: pass group_ids"),
    (lambda: compute_advantages("rloo", REWARDS, torch.tensor([0, 0, 1, 1, 2, 2, 3])),
     r"advantage='rloo' needs >= 2 responses per group; got group sizes \[1, 2\]"),
    (lambda: compute_advantages("grpo", REWARDS, group_size=2), r"group_size=2: must be >= 1 and divide"),
    (lambda: compute_advantages("grpo", torch.tensor([1.0, math.nan]), group_size=2), r"rewards: must be finite"),
    (lambda: compute_advantages("grpo", REWARDS, IDS.float()), r"group_ids: expected an integer tensor"),
    (lambda: compute_advantages("zscore", REWARDS, IDS), r"algorithm='zscore': unknown; allowed: dapo, dr_grpo"),
    (lambda: compute_advantages("grpo", REWARDS, IDS, eps=0.1), r"unknown keyword 'eps'; allowed: adv_eps"),
])
def test_bad_input_raises_one_clear_line(call, message):
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- configs
ALGORITHMS = ["dapo", "dr_grpo", "fspo", "grpo", "gspo", "gspo_token", "luspo", "rloo"]


def test_every_algorithm_file_loads_with_its_name_and_cites_its_paper():
    assert available_algorithms() == ALGORITHMS
    for name in ALGORITHMS:
        assert load_algorithm(name).name == name
        first = (conf_dir() / "algorithm" / f"{name}.yaml").read_text().splitlines()[0]
        assert first.startswith("#") and re.search(r"arXiv \d{4}\.\d{5}", first), first


def test_paper_defaults():
    grpo, dr, dapo = load_algorithm("grpo"), load_algorithm("dr_grpo"), load_algorithm("dapo")
    assert (grpo.clip_low, grpo.clip_high, grpo.kl_coef, grpo.kl_estimator) == (0.2, 0.2, 0.04, "k3")
    assert (dr.advantage, dr.agg, dr.kl_coef) == ("dr_grpo", "seq-mean-token-sum-norm", 0.0)
    assert (dapo.clip_low, dapo.clip_high, dapo.agg) == (0.2, 0.28, "token-mean")
    assert dapo.dynamic_sampling and dapo.overlong_filter and dapo.soft_overlong and dapo.kl_coef == 0.0
    assert (load_algorithm("rloo").advantage, load_algorithm("rloo").policy_loss) == ("rloo", "rloo_seq")
    for name in ("gspo", "gspo_token"):
        gspo = load_algorithm(name)
        assert (gspo.clip_low, gspo.clip_high, gspo.kl_coef, gspo.ppo_minibatches) == (3e-4, 4e-4, 0.0, 4)
    luspo = load_algorithm("luspo")
    assert (luspo.clip_low, luspo.clip_high, luspo.agg, luspo.format_weight) == (2e-3, 2.5e-3, "seq-mean-token-sum", 0.5)
    fspo = load_algorithm("fspo")
    assert (fspo.fspo_mu, fspo.fspo_c_low, fspo.fspo_c_high) == (None, 0.03, 0.03)
    assert grpo.group_relative and not load_algorithm("grpo", advantage="batch_norm").group_relative


@pytest.mark.parametrize("overrides, message", [
    ({"clip_low": -0.1}, r"^algorithm.clip_low=-0.1: must be in \[0, 1\)$"),
    ({"clip_low": "abc"}, r"^algorithm.clip_low='abc': must be in \[0, 1\)$"),
    ({"kl_estimator": "k4"}, r"^algorithm.kl_estimator='k4': must be one of k1, k2, k3$"),
    ({"agg": "mean"}, r"^algorithm.agg='mean': must be one of seq-mean-token-mean, "),
    ({"ppo_epochs": 0}, r"^algorithm.ppo_epochs=0: must be an integer >= 1$"),
    ({"fspo_mu": "drift"}, r"^algorithm.fspo_mu='drift': must be null \(batch drift\) or a finite float$"),
    ({"dual_clip_c": 1.0}, r"^algorithm.dual_clip_c=1.0: must be > 1 or null$"),
    ({"overlong_max_len": 100, "overlong_cache": 100}, r"^algorithm.overlong_cache=100: must be < overlong_max_len"),
    ({"clip_lo": 0.1}, r"^algorithm.clip_lo: unknown field; allowed: adv_eps, advantage, agg, "),
])
def test_bad_override_is_one_clear_line(overrides, message):
    with pytest.raises(ValueError, match=message) as info:
        load_algorithm("grpo", **overrides)
    assert "\n" not in str(info.value)


def test_unknown_algorithm_lists_the_allowed_names():
    with pytest.raises(ValueError, match=r"algorithm='ppo': unknown; allowed: " + ", ".join(ALGORITHMS)):
        load_algorithm("ppo")


def test_conf_dir_from_environment(tmp_path, monkeypatch):
    (tmp_path / "algorithm").mkdir()
    (tmp_path / "algorithm" / "shared.yaml").write_text("clip_low: 0.1\nclip_high: 0.1\n")
    (tmp_path / "algorithm" / "mine.yaml").write_text("defaults: [shared, _self_]\nname: mine\nclip_high: 0.5\n")
    monkeypatch.setenv("SEQRL_CONF_DIR", str(tmp_path))
    cfg = load_algorithm("mine", agg="token-mean")
    assert (cfg.name, cfg.agg, cfg.clip_low, cfg.clip_high, cfg.ppo_epochs) == ("mine", "token-mean", 0.1, 0.5, 1)
    assert available_algorithms() == ["mine", "shared"]


def test_hydra_composes_the_same_config():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from seqrl.algorithms import resolve_config

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(overrides=["+algorithm=dapo", "algorithm.clip_high=0.3"])
    assert resolve_config(cfg.algorithm) == load_algorithm("dapo", clip_high=0.3)
    schema = OmegaConf.structured(AlgorithmConfig)  # as the `algorithm` node of the training schema
    typed = OmegaConf.merge(schema, cfg.algorithm, OmegaConf.from_dotlist(["ppo_epochs=2", "fspo_mu=0.5"]))
    assert OmegaConf.to_object(typed) == load_algorithm("dapo", clip_high=0.3, ppo_epochs=2, fspo_mu=0.5)
