"""Benchmarks as data: how each benchmark states its gold answer, where it is read from, its prompt, and the
benchmark-level metrics beyond accuracy.

A benchmark config (conf/benchmark/*.yaml, schema `seqrl.config.BenchmarkConfig`) is a data source (local copy under
`paths.data_dir`, with the Hugging Face id as a fallback when the local copy is missing), a field mapping for each
copy (`fields` / `hf_fields`), a prompt template and a `gold_map`: the function below that turns one raw record into
(gold, answer kind, per-item verifier options), e.g. MathVista's precision, unit and option list. Those options
travel with the sample (`Sample.meta["grade_kw"]`) into `grading.grade_many(item_kw=...)`, so the RL reward and
the evaluation score an answer with the same functions.
"""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from string import ascii_uppercase
from typing import Any

import numpy as np

from seqrl.eval.metrics import wemath_four_dim

BENCHMARKS = ("aime24", "aime25", "math500", "amc23", "gsm8k", "mathvista", "mathvision", "wemath", "logicvista")


class BenchmarkSkipped(Exception):
    """A benchmark that cannot run as configured (e.g. its images are missing); the message is one line."""


# ------------------------------------------------------------------------------------------- gold answers
def _wemath_choices(option: str) -> list[str] | None:
    """'A. 3 cm;B. 4 cm; E. No correct answer' -> ['3 cm', '4 cm', ...] when the letters run A, B, C..."""
    parts = re.split(r"(?:^|;)\s*([A-H])\.\s*", option or "")
    ok = parts[1::2] and parts[1::2] == list(ascii_uppercase[: len(parts[1::2])])
    return [t.strip().rstrip(";").strip() for t in parts[2::2]] if ok else None


def benchmark_gold(benchmark: str, record: Mapping) -> tuple[str, str, dict] | None:
    """(gold, kind, grade kwargs) for one raw record of a local benchmark copy (fields as in its SOURCE.txt),
    or None if it has no gradeable answer (LogicVista v1_382 is empty). Feed the triple to grading.grade.

    gsm8k: the number after '####'. amc23: the float without '.0'. MathVista: a multi_choice answer (an option
    text) becomes its letter; free-form answers are int (with unit), number (with precision) or, for lists,
    math. MathVision: a letter answer is a choice (options attached), the rest math with a trailing unit such
    as '{degrees}' (test split) dropped. WeMath: a letter, option texts parsed from 'option'. LogicVista: one
    or more letters (multi_choice) or a numeric label (int).
    """
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; allowed: {', '.join(BENCHMARKS)}")
    answer = record.get("answer")
    if benchmark in ("aime24", "aime25", "math500"):
        return str(answer), "math", {}
    if benchmark == "amc23":
        return (str(int(float(answer))) if float(answer).is_integer() else str(answer)), "math", {}
    if benchmark == "gsm8k":
        return answer.split("####")[-1].strip().replace(",", ""), "number", {}
    if benchmark == "mathvista":
        if record["question_type"] == "multi_choice":
            return ascii_uppercase[record["choices"].index(answer)], "choice", {"choices": record["choices"]}
        kind = {"integer": "int", "float": "number"}.get(record["answer_type"], "math")
        kw = {"precision": record.get("precision"), "unit": record.get("unit")} if kind != "math" else {}
        return str(answer), kind, {key: v for key, v in kw.items() if v is not None}
    if benchmark == "mathvision":
        if record.get("options") or re.fullmatch(r"[A-E]", answer.strip()):
            return answer.strip(), "choice", {"choices": record.get("options") or None}
        return re.sub(r"(?:(?<=[\d}])|(?<=\\pi))\{[a-z]{4,}\}$", "", answer.strip()), "math", {}
    if benchmark == "wemath":
        return answer.strip(), "choice", {"choices": _wemath_choices(record.get("option", ""))}
    answer = str(answer).strip()
    if not answer:
        return None
    return (answer, "int", {}) if answer.isdigit() else (answer, "multi_choice", {})


def format_options(choices: list | None) -> str:
    """The `{options}` of a prompt template: '' without choices, else '\\nOptions:\\n(A) 97\\n(B) 102...'
    (an option whose text is its own letter, as in MathVision's picture options, is listed as '(A)')."""
    if not choices:
        return ""
    lines = [f"({letter})" + ("" if str(c) == letter else f" {c}") for letter, c in zip(ascii_uppercase, choices)]
    return "\nOptions:\n" + "\n".join(lines)


# ------------------------------------------------------------------------------------------------ loading
def resolve_benchmark(cfg: Any, data_dir: str) -> Any:
    """The benchmark config that will actually be read: the local copy when `path` exists under `data_dir`,
    else (with an `hf_id`) the hub copy with `hf_fields` / `hf_image_field`; `require_images: false` turns an
    image benchmark into a text-only one. Unknown `gold_map` or `metrics` names raise a one-line ValueError."""
    from seqrl.data import resolve_path

    key = f"eval.benchmarks.{cfg.name}"
    if cfg.gold_map is not None and cfg.gold_map not in BENCHMARKS:
        raise ValueError(f"{key}.gold_map={cfg.gold_map!r}: allowed: {', '.join(BENCHMARKS)} or null")
    unknown = sorted(set(cfg.metrics) - set(BENCHMARK_METRICS))
    if unknown:
        raise ValueError(f"{key}.metrics: unknown {', '.join(unknown)}; allowed: {', '.join(BENCHMARK_METRICS)}")
    if cfg.source == "local" and cfg.path and cfg.hf_id and not resolve_path(cfg.path, data_dir).exists():
        cfg = replace(cfg, source="hf", path=None, fields=dict(cfg.hf_fields or cfg.fields),
                      image_field=cfg.hf_image_field)
    if not cfg.require_images:
        cfg = replace(cfg, image_field=None, modality="text")
    return cfg


def load_benchmark(cfg: Any, data_dir: str, limit: int | None = None) -> list:
    """The items of one benchmark as `seqrl.data.Sample`s, in file order, at most `limit` of them.

    Each sample's prompt is `prompt_template` over `{prompt}`, the record's fields and `{options}`; its answer,
    kind and `meta["grade_kw"]` (the config's `verifier` options under the item's own) come from `gold_map`
    (else the mapped answer field and `answer_kind`). Records without a gradeable answer are left out.
    Generated benchmarks give their held-out split (`n_eval` items). Raises BenchmarkSkipped when an image
    benchmark's images are missing.
    """
    from seqrl.data import _apply_template, load_samples

    cfg = resolve_benchmark(cfg, data_dir)
    verifier = dict(cfg.verifier or {})
    if cfg.source == "generated":
        samples = load_samples(cfg, "eval", data_dir)[:limit]
        return [replace(s, meta={**s.meta, "grade_kw": verifier}) for s in samples]
    try:
        raw = load_samples(replace(cfg, prompt_template="{prompt}", n_train=None), "all", data_dir)
    except (OSError, ConnectionError) as exc:
        raise ValueError(f"eval.benchmarks.{cfg.name}: cannot read {cfg.path or cfg.hf_id} "
                         f"({' '.join(str(exc).split())[:200]}); put a local copy under paths.data_dir") from None
    out = []
    for s in raw:
        record = s.meta["record"]
        spec = benchmark_gold(cfg.gold_map, {**record, "answer": s.answer}) if cfg.gold_map else \
            (s.answer, cfg.answer_kind, {})
        if spec is None:
            continue
        gold, kind, kw = spec
        prompt = _apply_template(cfg, s.prompt, {**record, "options": format_options(kw.get("choices"))})
        out.append(replace(s, prompt=prompt, answer=gold, kind=kind, meta={**s.meta, "grade_kw": {**verifier, **kw}}))
        if limit is not None and len(out) == limit:
            break
    _check_images(cfg, out)
    return out


def _check_images(cfg: Any, samples: list) -> None:
    """An image benchmark needs every item's images: else it is skipped, with one line saying how to run it."""
    if cfg.modality != "image":
        return
    missing = [s for s in samples if not s.images and not _all_exist(s.meta.get("image_paths") or [])]
    if missing:
        example = (missing[0].meta.get("image_paths") or ["(no image field)"])[0]
        raise BenchmarkSkipped(
            f"{cfg.name}: images missing for {len(missing)} of {len(samples)} items (e.g. {example}); the local "
            f"copy is text-only: put the images there (hub: {cfg.hf_id}) or set "
            f"eval.benchmarks.{cfg.name}.require_images=false to run it text-only")


def _all_exist(paths: list[str]) -> bool:
    return bool(paths) and all(Path(p).is_file() for p in paths)


# ------------------------------------------------------------------------------- benchmark-level metrics
def wemath_metrics(samples: list, correct: np.ndarray) -> dict[str, float]:
    """We-Math four-dimensional metrics (`metrics.wemath_four_dim`) over the composites whose multi-step
    question and all its one-step sub-problems were evaluated (a `limit` can cut composites), averaged over the
    k sample columns of `correct` (n_items, k). Keys: four_dim/<IK|IG|CM|RM|score_strict|...>; {} when no
    composite is complete."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        groups[str(s.meta["record"]["ID"])].append(i)
    complete = []
    for rows in groups.values():
        keys = [str(samples[i].meta["record"]["key"]) for i in rows]
        multi = [k for k in keys if k.endswith("_multi")]
        steps = re.match(r"(\d+)steps", multi[0]) if len(multi) == 1 else None
        if steps and len(rows) == int(steps.group(1)) + 1:
            complete += rows
    if not complete:
        return {}
    columns = [wemath_four_dim([{**samples[i].meta["record"], "correct": bool(correct[i, j])} for i in complete])
               for j in range(correct.shape[1])]
    return {f"four_dim/{key}": float(np.mean([c[key] for c in columns])) for key in columns[0]}


BENCHMARK_METRICS = {"wemath_four_dim": wemath_metrics}
