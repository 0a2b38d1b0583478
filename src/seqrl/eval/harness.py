"""The evaluation harness shared by training (Lightning validation hook) and `seqrl-eval`.

Generation uses the rollout engine (`seqrl.algorithms.rollout.hf_generate`: batched, KV-cached), grading uses the
same extractor and verifier as the RL reward (`seqrl.eval.grading`), metrics come from `seqrl.eval.metrics`
(avg@k, unbiased pass@k, maj@k, bootstrap CI, mean response length, truncation rate).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from seqrl.algorithms.rollout import hf_generate
from seqrl.eval.grading import extract_answer, grade_many
from seqrl.eval.metrics import summarize


@dataclass
class EvalSet:
    name: str
    samples: list  # seqrl.data.Sample
    ks: list[int] = field(default_factory=lambda: [1])


def build_eval_sets(eval_cfg, data_cfg, data_dir: str) -> list[EvalSet]:
    """The held-out split of the training data (when `eval.heldout` and a data config is given) + the benchmarks."""
    from seqrl.data import load_samples

    sets = []
    if data_cfg is not None and eval_cfg.heldout:
        sets.append(EvalSet(data_cfg.name, load_samples(data_cfg, "eval", data_dir)))
    for name, bench in eval_cfg.benchmarks.items():
        sets.append(EvalSet(name, load_samples(bench, "eval", data_dir), list(bench.ks)))
    for es in sets:
        es.samples = es.samples[: eval_cfg.limit] if eval_cfg.limit else es.samples
        es.ks = sorted({k for k in [1, *es.ks, eval_cfg.n_samples] if k <= eval_cfg.n_samples})
    return sets


def generate_for_eval(policy, samples: list, eval_cfg):
    """eval_cfg.n_samples responses per item; temperature 0 means greedy decoding."""
    return hf_generate(policy, samples, eval_cfg, n=eval_cfg.n_samples, greedy=eval_cfg.temperature == 0)


def evaluate_rollout(es: EvalSet, rolls: list, eval_cfg) -> dict:
    """Grade the rollouts of one eval set; returns {"metrics": {...}, "records": [per-sample dicts]}."""
    k = eval_cfg.n_samples
    texts = [t for r in rolls for t in r.texts]
    rows = [s for r in rolls for s in r.samples]
    golds, kinds = [s.answer for s in rows], [s.kind for s in rows]
    correct = np.array(grade_many(texts, golds, kinds, workers=eval_cfg.grading_workers), dtype=bool)
    answers = [extract_answer(t, kind) for t, kind in zip(texts, kinds)]
    lengths = np.concatenate([r.lengths.numpy() for r in rolls])
    truncated = np.concatenate([r.truncated.numpy() for r in rolls])
    n_items = len(rows) // k
    metrics = summarize(correct.reshape(n_items, k), lengths.reshape(n_items, k), truncated.reshape(n_items, k),
                        answers=[answers[i * k:(i + 1) * k] for i in range(n_items)], ks=es.ks)
    records = [
        {"item": i // k, "sample": i % k, "prompt": s.prompt, "completion": t, "extracted": a, "gold": s.answer,
         "correct": bool(c), "length": int(n), "truncated": bool(tr)}
        for i, (s, t, a, c, n, tr) in enumerate(zip(rows, texts, answers, correct, lengths, truncated))
    ]
    return {"metrics": metrics, "records": records}


def results_table(results: dict[str, dict], title: str = "") -> str:
    """A Markdown table: one row per benchmark, one column per metric (lm-eval style)."""
    keys = sorted({k for r in results.values() for k in r["metrics"]}, key=_metric_order)
    lines = [f"### {title}" if title else "", "| benchmark | " + " | ".join(keys) + " |",
             "|---|" + "---:|" * len(keys)]
    for name, r in results.items():
        cells = [_fmt(r["metrics"].get(k)) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(line for line in lines if line)


def _metric_order(key: str):
    return (not key.startswith(("avg@", "pass@", "maj@")), key)


def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.3f}" if isinstance(v, float) and abs(v) < 10 else f"{v:.1f}" if isinstance(v, float) else str(v)


def write_samples(results: dict[str, dict], out_dir: Path) -> None:
    """Per-sample JSONL (prompt, completion, extracted answer, gold, correct, length) per benchmark, atomically."""
    from seqrl.results import write_jsonl_atomic

    for name, r in results.items():
        write_jsonl_atomic(Path(out_dir) / "samples" / f"{name}.jsonl", r["records"])
