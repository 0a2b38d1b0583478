"""Prompt data for RL training: generated tasks and real prompt sets, as lists of `Sample`.

A data config (`seqrl.config.DataConfig`, conf/data/*.yaml) names one of three sources:
- generated: a registered task (`seqrl.tasks`); the held-out split is drawn from its own seed stream and the
  train split skips every held-out prompt, so the two never share a prompt.
- local: a .jsonl, .json or .parquet file, or a directory of them (relative paths resolve against `data_dir`).
- hf: a Hugging Face dataset id, loaded online with `datasets.load_dataset(hf_id, hf_config, split=split)`;
  a set `path` overrides it (offline users point it at a downloaded copy).
For local and hf sources the held-out split is the last `n_eval` distinct records and the train split the records
before them (capped at `n_train`); exact duplicates (same prompt, answer and images) are dropped first.

`fields` maps `prompt` and `answer` to record fields; a dotted path reaches into nested records
("prompt.0.content", "reward_model.ground_truth"). Two optional regexes clean a value: where
`fields.prompt_regex` / `fields.answer_regex` matches, its first group replaces the value (e.g. GSM8K's gold
is the text after "####"); where it does not match, the value is kept as it is. `prompt_template` is a
`str.format` template over `{prompt}` and the record's top-level fields (write literal braces as `{{}}`).
`image_field` names the record field holding the image(s): a PIL image, a `{"bytes", "path"}` dict, a path, or a
list of these; a template with braces ("images/{imagename}") builds a path from the record. Paths resolve against
the data file's directory and are opened lazily, by `PromptDataset` (or `materialize`), not at load time.
"""
from __future__ import annotations

import io
import itertools
import json
import random
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from PIL import Image

from seqrl.tasks import STYLES, TASKS, Sample, Task, build_task, register_task, response_style  # noqa: F401

SOURCES = ("generated", "local", "hf")
SPLITS = ("train", "eval", "all")
FILE_TYPES = (".jsonl", ".json", ".parquet")
DEFAULT_N_TRAIN = 1024  # generated tasks with n_train unset


def _key(cfg: Any) -> str:
    """The config prefix errors name: `data` for the training data, `eval.benchmarks.<name>` for a benchmark."""
    return f"eval.benchmarks.{cfg.name}" if hasattr(cfg, "ks") else "data"


def resolve_path(path: str, data_dir: str) -> Path:
    """`path` with ~ expanded; a relative path is taken relative to `data_dir`."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(data_dir).expanduser() / p


def check_data_source(cfg: Any, data_dir: str) -> None:
    """Fail fast, before any model loads, with a one-line ValueError when the data source cannot work."""
    key = _key(cfg)
    if cfg.source not in SOURCES:
        raise ValueError(f"{key}.source={cfg.source!r}: allowed: {', '.join(SOURCES)}")
    if cfg.source == "generated":
        build_task(cfg.task, **dict(cfg.task_kwargs or {}))
    elif cfg.path is not None:
        p = resolve_path(cfg.path, data_dir)
        if not p.exists():
            raise ValueError(f"{key}.path={cfg.path}: file not found; looked for {p} (data_dir={data_dir}); "
                             f"set {key}.path or paths.data_dir")
        if p.is_file() and p.suffix not in FILE_TYPES:
            raise ValueError(f"{key}.path={cfg.path}: unsupported file type {p.suffix!r}; "
                             f"allowed: {', '.join(FILE_TYPES)} or a directory of them")
    elif cfg.source == "local":
        raise ValueError(f"{key}.path=None: source 'local' needs a file path (relative to data_dir={data_dir})")
    elif not cfg.hf_id:
        raise ValueError(f"{key}.hf_id=None: source 'hf' needs a dataset id, or a local copy in {key}.path")
    for name in ("prompt", "answer"):
        if cfg.source != "generated" and name not in cfg.fields:
            raise ValueError(f"{key}.fields: no {name!r} entry; got {dict(cfg.fields)}")


def load_samples(cfg: Any, split: str, data_dir: str) -> List[Sample]:
    """The `split` ("train" | "eval" | "all") of a data config as Samples; deterministic given `cfg.seed`.

    "all" returns every record of a file or hub split, in order, without deduplication (benchmarks use it);
    for a generated task it is the train split followed by the eval split.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: allowed: {', '.join(SPLITS)}")
    check_data_source(cfg, data_dir)
    if cfg.source == "generated":
        train, held_out = _generated_splits(cfg, need_train=split != "eval")
        return {"train": train, "eval": held_out, "all": train + held_out}[split]
    records, base_dir = _read_records(cfg, data_dir)
    # lazy, so that only distinct records are ever held (DAPO's hub copy repeats every prompt about 100 times)
    stream = (_to_sample(cfg, r, i, base_dir) for i, r in enumerate(records))
    if split == "all":
        return list(itertools.islice(stream, cfg.n_train))
    samples = _dedup(stream)
    if cfg.n_eval >= len(samples):
        raise ValueError(f"{_key(cfg)}.n_eval={cfg.n_eval}: must be < the {len(samples)} distinct records of "
                         f"{cfg.path or cfg.hf_id}")
    cut = len(samples) - cfg.n_eval
    return samples[cut:] if split == "eval" else samples[:cut][: cfg.n_train]


# -------------------------------------------------------------------------------------------- generated tasks
def _generated_splits(cfg: Any, need_train: bool = True) -> Tuple[List[Sample], List[Sample]]:
    """(train, eval) of a generated task: eval = n_eval distinct samples from the eval stream; train = n_train
    samples from the train stream, skipping every eval prompt (repeats within train are allowed)."""
    task = build_task(cfg.task, **dict(cfg.task_kwargs or {}))
    stream = lambda part: random.Random(f"seqrl/{cfg.task}/{cfg.seed}/{part}")  # noqa: E731 - str seeds are stable
    held_out = _draw(cfg, task, stream("eval"), cfg.n_eval, exclude=set(), distinct=True)
    if not need_train:
        return [], held_out
    n_train = DEFAULT_N_TRAIN if cfg.n_train is None else cfg.n_train
    train = _draw(cfg, task, stream("train"), n_train, exclude={s.meta["key"] for s in held_out}, distinct=False)
    return train, held_out


def _draw(cfg: Any, task: Task, rng: random.Random, n: int, exclude: set, distinct: bool) -> List[Sample]:
    out: List[Sample] = []
    seen = set(exclude)
    for _ in range(50 * n + 1000):
        if len(out) == n:
            break
        s = task.sample(rng)
        if s.meta["key"] in seen:
            continue
        if distinct:
            seen.add(s.meta["key"])
        out.append(replace(s, prompt=_apply_template(cfg, s.prompt, {})))
    if len(out) < n:
        what = "distinct held-out" if distinct else f"train prompts outside the n_eval={cfg.n_eval} held-out"
        raise ValueError(f"{_key(cfg)}.task_kwargs={dict(cfg.task_kwargs or {})}: task {cfg.task} has too few "
                         f"distinct prompts to draw {n} {what}; widen the task or lower n_eval")
    return out


# ------------------------------------------------------------------------------------------ files and the hub
def _read_records(cfg: Any, data_dir: str) -> Tuple[Iterable[Dict[str, Any]], Optional[Path]]:
    """The records of a local file/directory (and the directory image paths resolve against), or of a hub split."""
    if cfg.path is None:
        import datasets

        return datasets.load_dataset(cfg.hf_id, cfg.hf_config, split=cfg.split), None
    p = resolve_path(cfg.path, data_dir)
    files = _data_files(p, cfg.split) if p.is_dir() else [p]
    if not files:
        raise ValueError(f"{_key(cfg)}.path={cfg.path}: no {', '.join(FILE_TYPES)} file in {p}")
    return itertools.chain.from_iterable(map(_read_file, files)), (p if p.is_dir() else p.parent)


def _data_files(folder: Path, split: str) -> List[Path]:
    """Data files directly in `folder` (else in `folder/data`); those whose name contains `split`, if any do."""
    for d in (folder, folder / "data"):
        files = sorted(f for f in d.glob("*") if f.suffix in FILE_TYPES) if d.is_dir() else []
        if files:
            return [f for f in files if split in f.name] or files
    return []


def _read_file(path: Path) -> Iterable[Dict[str, Any]]:
    """Records of one file: .jsonl/.parquet through `datasets`; .json (a list of records, or a dict of them
    keyed by id, which `datasets` cannot read; the key is kept as `_key`) through the json module."""
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return [{"_key": k, **v} for k, v in data.items()] if isinstance(data, dict) else list(data)
    import datasets

    builder = "json" if path.suffix == ".jsonl" else "parquet"
    return datasets.load_dataset(builder, data_files=str(path), split="train")


def _get(record: Dict[str, Any], dotted: str) -> Any:
    """record["a"]["b"][0] for "a.b.0" (a field name containing dots is looked up whole first); KeyError if absent."""
    if dotted in record:
        return record[dotted]
    value: Any = record
    for part in dotted.split("."):
        try:
            value = value[int(part)] if isinstance(value, (list, tuple)) else value[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise KeyError(dotted) from None
    return value


def _field(cfg: Any, record: Dict[str, Any], name: str, index: int) -> Any:
    """The record's value for fields[name] ("prompt", "answer") or for image_field (name "image")."""
    option, dotted = (f"fields.{name}", cfg.fields[name]) if name in cfg.fields else ("image_field", cfg.image_field)
    try:
        return dotted.format_map(record) if "{" in dotted else _get(record, dotted)
    except KeyError:
        raise ValueError(f"{_key(cfg)}.{option}={dotted!r}: not found in record {index}; "
                         f"its fields: {', '.join(sorted(map(str, record)))}") from None


def _clean(value: Any, regex: Optional[str]) -> str:
    text = str(value).strip()
    m = re.search(regex, text, flags=re.S) if regex else None
    return m.group(1).strip() if m else text


_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")


def normalize_answer(answer: Any, kind: str) -> str:
    """The gold answer as a string; for int/number kinds thousands separators go ("1,080" -> "1080") and an
    integral decimal loses its zero fraction (27.0 -> "27")."""
    text = str(answer).strip()
    if kind not in ("int", "number"):
        return text
    text = text.replace(",", "") if _THOUSANDS.match(text) else text
    return re.sub(r"^(-?\d+)\.0+$", r"\1", text)


def _apply_template(cfg: Any, prompt: str, record: Dict[str, Any]) -> str:
    values = {k: v for k, v in record.items() if isinstance(k, str)}
    try:
        return cfg.prompt_template.format_map({**values, "prompt": prompt})
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{_key(cfg)}.prompt_template={cfg.prompt_template!r}: bad field {e}; allowed: "
                         f"{{prompt}} and record fields {sorted(values)}; write literal braces as {{{{}}}}") from None


def _to_sample(cfg: Any, record: Dict[str, Any], index: int, base_dir: Optional[Path]) -> Sample:
    fields = cfg.fields
    prompt = _clean(_field(cfg, record, "prompt", index), fields.get("prompt_regex"))
    answer = normalize_answer(_clean(_field(cfg, record, "answer", index), fields.get("answer_regex")),
                              cfg.answer_kind)
    image_top = (cfg.image_field or "").split(".")[0]  # the record in meta leaves the (heavy) image field out
    meta: Dict[str, Any] = {"source": cfg.name, "index": index,
                            "record": {k: v for k, v in record.items() if k != image_top}}
    images = None
    if cfg.image_field:
        images, paths = _images(cfg, record, base_dir, index)
        meta["image_paths"] = paths
    meta["key"] = (prompt, answer, tuple(meta.get("image_paths") or ()))
    return Sample(prompt=_apply_template(cfg, prompt, record), answer=answer, kind=cfg.answer_kind,
                  images=images, meta=meta)


def _images(cfg: Any, record: Dict[str, Any], base_dir: Optional[Path],
            index: int) -> Tuple[Optional[list], List[str]]:
    """(decoded images, []) for embedded images, or (None, resolved paths) for images stored as paths."""
    field = cfg.image_field
    value = _field(cfg, record, "image", index)
    items = value if isinstance(value, (list, tuple)) else [value]
    items = [v for v in items if v is not None]
    if all(isinstance(v, str) for v in items):
        if base_dir is None and any(not Path(v).is_absolute() for v in items):
            raise ValueError(f"{_key(cfg)}.image_field={field}: images are relative paths ({items[0]!r}) but the "
                             f"records came from the hub; download {cfg.hf_id} with its images and set "
                             f"{_key(cfg)}.path to the folder")
        return None, [str(Path(v) if Path(v).is_absolute() else base_dir / v) for v in items]
    return [_decode(v) for v in items], []


def _decode(value: Any) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and value.get("bytes"):
        return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
    if isinstance(value, dict) and value.get("path"):
        return _open(value["path"])
    raise ValueError(f"image value of type {type(value).__name__}: allowed: PIL image, path, {{'bytes', 'path'}}")


def _open(path: str) -> Image.Image:
    if not Path(path).is_file():
        raise ValueError(f"image {path}: file not found")
    with Image.open(path) as im:
        return im.convert("RGB")


def materialize(sample: Sample) -> Sample:
    """The sample with its path-stored images opened (RGB); samples without image paths come back unchanged."""
    paths = sample.meta.get("image_paths")
    if sample.images is not None or not paths:
        return sample
    return replace(sample, images=[_open(p) for p in paths])


def _dedup(samples: Iterable[Sample]) -> List[Sample]:
    seen, out = set(), []
    for s in samples:
        if s.meta["key"] not in seen:
            seen.add(s.meta["key"])
            out.append(s)
    return out


# ------------------------------------------------------------------------------------------------ torch glue
def collate_samples(batch: List[Sample]) -> List[Sample]:
    """DataLoader collate_fn: the samples as a list (tokenisation happens in the RL module)."""
    return list(batch)


class PromptDataset(torch.utils.data.Dataset):
    """A map-style dataset over Samples; items come with their images opened. Use `collate_fn=self.collate`."""

    collate = staticmethod(collate_samples)

    def __init__(self, samples: List[Sample]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return materialize(self.samples[i])
