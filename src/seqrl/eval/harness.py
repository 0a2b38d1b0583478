"""The evaluation harness shared by training (Lightning validation hook) and `seqrl-eval`.

Items come from `seqrl.eval.benchmarks` (local copy first, gold mapping, prompt template) or from the held-out
split of the training data; generation uses the rollout engine (`seqrl.algorithms.rollout.generate`: batched,
KV-cached, images opened just before encoding); grading uses the same extractor and verifier as the RL reward
(`seqrl.eval.grading`, per-item options from `Sample.meta["grade_kw"]`); metrics come from `seqrl.eval.metrics`
(avg@k, unbiased pass@k, maj@k, bootstrap CI, mean response length, truncation rate) plus a benchmark's own
(`BenchmarkConfig.metrics`, e.g. We-Math's four dimensions).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from seqrl.algorithms.rollout import generate
from seqrl.eval.benchmarks import BENCHMARK_METRICS, BenchmarkSkipped, load_benchmark
from seqrl.eval.grading import extract_answer, grade_many
from seqrl.eval.metrics import summarize

log = logging.getLogger("seqrl")
PERCENT_PREFIXES = ("avg@", "pass@", "maj@", "ci_", "truncation_rate", "four_dim/")


@dataclass
class EvalSet:
    name: str
    samples: list  # seqrl.data.Sample, gold/kind/meta["grade_kw"] filled in
    ks: list[int] = field(default_factory=lambda: [1])
    metrics: list[str] = field(default_factory=list)  # keys of benchmarks.BENCHMARK_METRICS


def build_eval_sets(eval_cfg, data_cfg, data_dir: str, skipped: dict | None = None) -> list[EvalSet]:
    """The held-out split of the training data (when `eval.heldout` and a data config is given) + the benchmarks,
    each capped at `eval.limit` items. A benchmark that cannot run (images missing) is left out with its one-line
    reason: put into `skipped` (name -> reason) when given, else logged as a warning."""
    from seqrl.data import load_samples

    sets = []
    if data_cfg is not None and eval_cfg.heldout:
        sets.append(EvalSet(data_cfg.name, load_samples(data_cfg, "eval", data_dir)[: eval_cfg.limit]))
    for name, bench in eval_cfg.benchmarks.items():
        if sets and name == sets[0].name:
            raise ValueError(f"eval.benchmarks.{name}: same name as the held-out split of data={name}; "
                             f"rename the benchmark (+benchmark@eval.benchmarks.<other name>=...)")
        try:
            samples = load_benchmark(bench, data_dir, limit=eval_cfg.limit)
        except BenchmarkSkipped as exc:
            if skipped is None:
                log.warning("skipping benchmark %s", exc)
            else:
                skipped[name] = str(exc)
            continue
        sets.append(EvalSet(name, samples, list(bench.ks), list(bench.metrics)))
    for es in sets:
        es.ks = sorted({k for k in [1, *es.ks, eval_cfg.n_samples] if k <= eval_cfg.n_samples})
    return sets


def generate_for_eval(policy, samples: list, eval_cfg):
    """eval_cfg.n_samples responses per item (temperature 0 means greedy decoding); path-stored images are opened
    here, batch by batch, so that vision benchmarks feed real images whoever built the batch."""
    from seqrl.data import materialize

    samples = [materialize(s) for s in samples]
    return generate(policy, samples, eval_cfg, n=eval_cfg.n_samples, greedy=eval_cfg.temperature == 0)


def evaluate_rollout(es: EvalSet, rolls: list, eval_cfg) -> dict:
    """Grade the rollouts of one eval set; returns {"metrics": {...}, "records": [per-sample dicts]}."""
    k = eval_cfg.n_samples
    texts = [t for r in rolls for t in r.texts]
    rows = [s for r in rolls for s in r.samples]
    golds, kinds = [s.answer for s in rows], [s.kind for s in rows]
    item_kw = [dict(s.meta.get("grade_kw") or {}) for s in rows]
    correct = np.array(grade_many(texts, golds, kinds, workers=eval_cfg.grading_workers, item_kw=item_kw),
                       dtype=bool)
    answers = [extract_answer(t, kind, choices=kw.get("choices")) for t, kind, kw in zip(texts, kinds, item_kw)]
    lengths = np.concatenate([r.lengths.numpy() for r in rolls])
    truncated = np.concatenate([r.truncated.numpy() for r in rolls])
    n_items = len(rows) // k
    matrix = correct.reshape(n_items, k)  # (n_items, k)
    metrics = summarize(matrix, lengths.reshape(n_items, k), truncated.reshape(n_items, k),
                        answers=[answers[i * k:(i + 1) * k] for i in range(n_items)], ks=es.ks)
    for name in es.metrics:
        metrics.update(BENCHMARK_METRICS[name](rows[::k], matrix))
    records = [
        {"item": i // k, "sample": i % k, "index": s.meta.get("index"), "prompt": s.prompt, "completion": t,
         "extracted": a, "gold": s.answer, "kind": s.kind, "correct": bool(c), "length": int(n),
         "truncated": bool(tr), "n_images": len(s.images or [])}
        for i, (s, t, a, c, n, tr) in enumerate(zip(rows, texts, answers, correct, lengths, truncated))
    ]
    return {"metrics": metrics, "records": records}


def results_table(results: dict[str, dict], title: str = "") -> str:
    """A Markdown table: one row per benchmark, one column per metric (lm-eval style). Accuracies, CI bounds,
    truncation rates and We-Math scores print as percentages (100.0 = all correct); We-Math's per-dimension
    counts and rates stay in results.json only."""
    keys = sorted({k for r in results.values() for k in r["metrics"] if _in_table(k)}, key=_metric_order)
    lines = [f"### {title}" if title else "", "| benchmark | " + " | ".join(keys) + " |",
             "|---|" + "---:|" * len(keys)]
    for name, r in results.items():
        cells = [_fmt(k, r["metrics"].get(k)) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(line for line in lines if line)


def _in_table(key: str) -> bool:
    return not key.startswith("four_dim/") or key.startswith("four_dim/score")


_ORDER = ("avg@", "pass@", "maj@", "ci_low", "ci_high", "four_dim/", "n_items", "response_length", "truncation")


def _metric_order(key: str):
    rank = next((i for i, prefix in enumerate(_ORDER) if key.startswith(prefix)), len(_ORDER))
    return rank, int(key.split("@")[1]) if "@" in key else 0, key


def _fmt(key: str, v) -> str:
    if v is None:
        return ""
    if key.startswith(PERCENT_PREFIXES):
        return f"{100 * v:.1f}"
    return f"{v:.0f}" if key == "n_items" else f"{v:.1f}" if isinstance(v, float) else str(v)


def write_samples(results: dict[str, dict], out_dir: Path) -> None:
    """Per-sample JSONL (prompt, completion, extracted answer, gold, correct, length) per benchmark, atomically."""
    from seqrl.results import write_jsonl_atomic

    for name, r in results.items():
        write_jsonl_atomic(Path(out_dir) / "samples" / f"{name}.jsonl", r["records"])
