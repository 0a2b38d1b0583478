"""Evaluation metrics: hand-computed values, brute-force pass@k, bootstrap behaviour, We-Math four dimensions."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA_DIR
from seqrl.eval.metrics import (
    avg_at_k,
    bootstrap_ci,
    maj_at_k,
    pass_at_k,
    pass_at_k_items,
    summarize,
    wemath_four_dim,
)

WEMATH = DATA_DIR / "wemath" / "testmini.json"


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (the first c correct) that contain a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_avg_at_k():
    assert avg_at_k(np.array([[1, 0, 0, 0], [1, 1, 1, 0]], dtype=bool)) == pytest.approx(4 / 8)
    with pytest.raises(ValueError, match="non-empty"):
        avg_at_k(np.zeros(3))


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edges_and_errors():
    assert pass_at_k(16, 4, 1) == pytest.approx(4 / 16)
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)  # C(199,100)/C(200,100) = 100/200
    for bad in [(4, 5, 1), (4, 2, 0), (4, 2, 5), (4, -1, 1)]:
        with pytest.raises(ValueError, match="pass_at_k needs"):
            pass_at_k(*bad)


def test_pass_at_k_items():
    correct = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=bool)
    # item 1: 1 - C(3,2)/C(4,2) = 1/2; item 2: 0; item 3: 1 - C(2,2)/C(4,2) = 5/6
    assert pass_at_k_items(correct, 2) == pytest.approx((0.5 + 0 + 5 / 6) / 3)
    assert pass_at_k_items(correct, 1) == pytest.approx(avg_at_k(correct))


def test_maj_at_k_votes_ties_and_abstentions():
    answers = [["1", "2", "2", "1"], [None, "3", None, "4"], [None, None, None, None], ["5", "6", "6", "6"]]
    correct = np.array([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=bool)
    # k=4: item1 ties 1/2 -> '1' seen first (correct); item2 ties 3/4 -> '3' (correct); item3 abstains;
    # item4 '6' wins 3-1 (wrong)
    assert maj_at_k(answers, correct, 4) == pytest.approx(2 / 4)
    # k=3: item1 '2' wins 2-1 (wrong); item2 only '3' (correct); item4 '6' wins 2-1 (wrong)
    assert maj_at_k(answers, correct, 3) == pytest.approx(1 / 4)
    # k=1 is the first sample's correctness (an abstention scores 0)
    assert maj_at_k(answers, correct, 1) == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="maj_at_k needs"):
        maj_at_k(answers[:2], correct, 2)


def test_bootstrap_ci_contains_mean_deterministic_and_calibrated():
    values = np.random.default_rng(1).random(400) < 0.5  # (400,) Bernoulli(0.5)
    low, high = bootstrap_ci(values, seed=3)
    assert low < values.mean() < high
    assert (low, high) == bootstrap_ci(values, seed=3)
    assert (low, high) != bootstrap_ci(values, seed=4)
    half_width = 1.96 * np.sqrt(values.mean() * (1 - values.mean()) / values.size)  # normal approximation
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.15)
    assert bootstrap_ci(np.full(50, 0.25)) == (0.25, 0.25)
    with pytest.raises(ValueError, match="bootstrap_ci needs"):
        bootstrap_ci(np.array([]))


def test_summarize():
    correct = np.array([[1, 0], [1, 1], [0, 0]], dtype=bool)
    lengths = np.array([[10, 20], [30, 40], [50, 60]])
    truncated = np.array([[0, 0], [0, 1], [1, 1]], dtype=bool)
    answers = [["a", "b"], ["c", "c"], [None, "d"]]
    out = summarize(correct, lengths, truncated, answers=answers, ks=(1, 2))
    assert out["avg@2"] == pytest.approx(3 / 6)
    assert out["pass@1"] == pytest.approx(3 / 6) and out["pass@2"] == pytest.approx(2 / 3)
    assert out["maj@1"] == pytest.approx(2 / 3) and out["maj@2"] == pytest.approx(2 / 3)
    assert out["ci_low"] <= out["avg@2"] <= out["ci_high"]
    assert out["response_length/mean"] == pytest.approx(35.0)
    assert out["truncation_rate"] == pytest.approx(3 / 6)
    assert out["n_items"] == 3
    with pytest.raises(ValueError, match="must have correct's shape"):
        summarize(correct, lengths[:2], truncated)


def composite(gid: str, steps: int, subs: list[int], multi: int) -> list[dict]:
    keys = [f"{steps}steps_{i + 1}" for i in range(steps)] + [f"{steps}steps_multi"]
    return [{"ID": gid, "key": k, "correct": bool(c)} for k, c in zip(keys, subs + [multi])]


def test_wemath_four_dim_hand_built():
    records = (composite("2steps_1", 2, [1, 1], 1)  # CM (strict and loose)
               + composite("2steps_2", 2, [1, 0], 1)  # RM strict, CM loose
               + composite("2steps_3", 2, [0, 0], 1)  # RM strict and loose
               + composite("2steps_4", 2, [1, 1], 0)  # IG
               + composite("2steps_5", 2, [0, 1], 0)  # IK
               + composite("3steps_1", 3, [1, 1, 1], 0)  # IG
               + composite("3steps_2", 3, [0, 0, 0], 0)  # IK
               + composite("3steps_3", 3, [1, 1, 1], 1))  # CM
    out = wemath_four_dim(records[::-1])  # order does not matter
    assert (out["n_IK"], out["n_IG"], out["n_CM"], out["n_RM"]) == (2, 2, 2, 2)
    assert (out["n_CM_loose"], out["n_RM_loose"], out["n_composites"]) == (3, 1, 8)
    assert out["IK"] == out["IG"] == out["CM"] == pytest.approx(2 / 8)
    assert out["RM"] == pytest.approx(2 / 4) and out["RM_loose"] == pytest.approx(1 / 4)
    assert out["CM_loose"] == pytest.approx(3 / 8)
    assert out["score_strict"] == pytest.approx((8 - 0.5 * 2 - 2 - 2) / 8)  # = (CM + IG/2)/N = 3/8
    assert out["score_loose"] == pytest.approx((8 - 0.5 * 2 - 1 - 2) / 8)


def test_wemath_four_dim_on_real_testmini_grouping():
    records = json.loads(WEMATH.read_text())
    perfect = wemath_four_dim([{**r, "correct": True} for r in records])
    assert perfect["n_composites"] == 525 and perfect["CM"] == 1.0 and perfect["score_strict"] == 1.0
    wrong = wemath_four_dim([{**r, "correct": False} for r in records])
    assert wrong["IK"] == 1.0 and wrong["score_strict"] == 0.0 and wrong["RM"] == 0.0
    only_multi = wemath_four_dim([{**r, "correct": r["key"].endswith("multi")} for r in records])
    assert only_multi["n_RM"] == only_multi["n_RM_loose"] == 525 and only_multi["score_strict"] == 0.0
    only_one_step = wemath_four_dim([{**r, "correct": not r["key"].endswith("multi")} for r in records])
    assert only_one_step["IG"] == 1.0 and only_one_step["score_strict"] == 0.5


def test_wemath_four_dim_rejects_incomplete_composites():
    with pytest.raises(ValueError, match="bad IDs: \\['x'\\]"):
        wemath_four_dim(composite("x", 2, [1, 1], 1)[:2])
    with pytest.raises(ValueError, match="no records"):
        wemath_four_dim([])
