"""Evaluation metrics over graded samples (gold answers per benchmark: `seqrl.eval.benchmarks`).

Shapes: `correct`, `lengths`, `truncated` are (n_items, k) arrays, one row per benchmark item and one column
per sampled response. Accuracies are fractions in [0, 1] (tables may print them x100).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping

import numpy as np


def _as_matrix(correct, name: str = "correct") -> np.ndarray:
    arr = np.asarray(correct)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty (n_items, k) array, got shape {arr.shape}")
    return arr


def avg_at_k(correct: np.ndarray) -> float:
    """avg@k: accuracy averaged over all k samples of all items (the mean of the (n_items, k) matrix)."""
    return float(_as_matrix(correct).astype(float).mean())


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, arXiv 2107.03374):
    1 - C(n-c, k) / C(n, k), evaluated as the stable product 1 - prod_{i=n-c+1}^{n} (1 - k/i)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k_items(correct: np.ndarray, k: int) -> float:
    """Mean over items of the unbiased pass@k, each item using all n = correct.shape[1] samples."""
    arr = _as_matrix(correct).astype(bool)
    n = arr.shape[1]
    return float(np.mean([pass_at_k(n, int(c), k) for c in arr.sum(axis=1)]))


def maj_at_k(answers: list[list[str | None]], correct: np.ndarray, k: int) -> float:
    """maj@k: per item, majority vote over the extracted answers of the first k samples (None = abstain; a tie
    goes to the answer seen first); the item scores the correctness of the first sample giving that answer,
    0 if all k abstain. Answers are compared as strings, so pass canonical forms (e.g. extract_answer's)."""
    arr = _as_matrix(correct).astype(bool)
    if len(answers) != arr.shape[0] or not 1 <= k <= arr.shape[1] or any(len(a) < k for a in answers):
        raise ValueError(f"maj_at_k needs one answer list per item with >= k={k} entries and 1 <= k <= "
                         f"{arr.shape[1]}; got {len(answers)} lists for {arr.shape[0]} items")
    scores = []
    for row, ans in zip(arr, answers):
        votes = Counter(a for a in ans[:k] if a is not None)
        if not votes:
            scores.append(0.0)
            continue
        top = max(votes.values())
        winner = next(a for a in ans[:k] if a is not None and votes[a] == top)  # first seen among the tied
        scores.append(float(row[ans.index(winner)]))
    return float(np.mean(scores))


def bootstrap_ci(values: np.ndarray, *, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) confidence interval of the mean of `values` (one value per item),
    resampling items with replacement `n_boot` times; deterministic for a given seed."""
    vals = np.asarray(values, dtype=float).ravel()
    if vals.size == 0 or n_boot < 1 or not 0 < alpha < 1:
        raise ValueError(f"bootstrap_ci needs values, n_boot >= 1, 0 < alpha < 1; got {vals.size} values, "
                         f"n_boot={n_boot}, alpha={alpha}")
    rng = np.random.default_rng(seed)
    block = max(1, 2_000_000 // vals.size)  # bound memory: at most ~2M resampled indices at a time
    means = np.concatenate([vals[rng.integers(0, vals.size, (min(block, n_boot - s), vals.size))].mean(axis=1)
                            for s in range(0, n_boot, block)])
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def summarize(correct, lengths, truncated, answers=None, ks=(1,)) -> dict[str, float]:
    """One benchmark's metrics: avg@k (k = samples per item), pass@k and (given answers) maj@k for each k in
    `ks`, a bootstrap CI of avg@k over items (ci_low, ci_high), mean response length, truncation rate."""
    arr = _as_matrix(correct).astype(bool)
    lens, trunc = np.asarray(lengths, dtype=float), np.asarray(truncated, dtype=bool)
    if lens.shape != arr.shape or trunc.shape != arr.shape:
        raise ValueError(f"lengths {lens.shape} and truncated {trunc.shape} must have correct's shape {arr.shape}")
    n_items, k_all = arr.shape
    out = {f"avg@{k_all}": avg_at_k(arr)}
    for k in ks:
        out[f"pass@{k}"] = pass_at_k_items(arr, k)
        if answers is not None:
            out[f"maj@{k}"] = maj_at_k(answers, arr, k)
    out["ci_low"], out["ci_high"] = bootstrap_ci(arr.mean(axis=1))
    out["response_length/mean"] = float(lens.mean())
    out["truncation_rate"] = float(trunc.mean())
    out["n_items"] = float(n_items)
    return out


def wemath_four_dim(records: Iterable[Mapping]) -> dict[str, float]:
    """We-Math four-dimensional metrics (Qiao et al. 2024, arXiv 2407.01284).

    Each record needs "ID" (the composite problem it belongs to), "key" ('2steps_1', '2steps_2',
    '2steps_multi', '3steps_1', ... '3steps_multi') and "correct". Records sharing an ID form one composite
    problem: its multi-step question ("key" ends in '_multi') plus its one-step sub-problems. Per composite,
    with S = all sub-problems correct, A = any sub-problem correct, M = the multi-step question correct:
      IK (insufficient knowledge) = not S and not M     IG (inadequate generalisation) = S and not M
      CM (complete mastery)       = S and M             RM (rote memorisation)         = not S and M
    Loose variant (as in the authors' evaluation script): CM_loose = A and M, RM_loose = (no sub correct) and M.
    Rates: IK, IG, CM (and CM_loose) over the number of composites N; RM over CM + RM (0 when both are 0).
    score = (N - 0.5 IG - RM - IK) / N (strict) and the same with RM_loose (loose), i.e. (CM + 0.5 IG) / N.
    N = 525 on testmini, where this is exactly the paper's formula. Counts come back as n_IK, n_IG, ...
    """
    groups: dict[str, dict[str, list[bool]]] = defaultdict(lambda: {"multi": [], "sub": []})
    for r in records:
        groups[str(r["ID"])]["multi" if str(r["key"]).endswith("_multi") else "sub"].append(bool(r["correct"]))
    if not groups:
        raise ValueError("wemath_four_dim got no records")
    bad = [gid for gid, g in groups.items() if len(g["multi"]) != 1 or not g["sub"]]
    if bad:
        raise ValueError(f"We-Math composites need one '_multi' record and >= 1 one-step record; bad IDs: {bad[:5]}")
    n = Counter()
    for g in groups.values():
        s, a, m = all(g["sub"]), any(g["sub"]), g["multi"][0]
        n["IK"] += not s and not m
        n["IG"] += s and not m
        n["CM"] += s and m
        n["RM"] += not s and m
        n["CM_loose"] += a and m
        n["RM_loose"] += not a and m
    total = len(groups)
    out = {key: n[key] / total for key in ("IK", "IG", "CM", "CM_loose")}
    for rm, cm in (("RM", "CM"), ("RM_loose", "CM_loose")):
        out[rm] = n[rm] / (n[rm] + n[cm]) if n[rm] + n[cm] else 0.0
    out["score_strict"] = (total - 0.5 * n["IG"] - n["RM"] - n["IK"]) / total
    out["score_loose"] = (total - 0.5 * n["IG"] - n["RM_loose"] - n["IK"]) / total
    out.update({f"n_{key}": float(n[key]) for key in ("IK", "IG", "CM", "RM", "CM_loose", "RM_loose")})
    out["n_composites"] = float(total)
    return out
