"""The runs of a study, read back for `seqrl-report`: final metrics, per-step history and failures.

Local (`source=local`): a run directory written by `seqrl-train` holds results.json (run name, config, seed, final
train and eval metrics) and the Lightning CSV log `csv/version_<n>/metrics.csv` (one row per logged step, empty
cells where a metric was not logged). A job that failed under a multirun sweep leaves error.json (its error and
config) or only Hydra's `.hydra/config.yaml`; both are read as failed runs, so a report never silently drops one.

W&B (`source=wandb`): the same from a project through the public API (`wandb.Api().runs(...)`): run name, config,
summary (the last logged value of each metric) and the history (`trainer/global_step` is Lightning's step).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NO_RESULTS = "no results.json (the job crashed, was killed or is still running)"


@dataclass
class Run:
    """One training run (finished or failed)."""

    rel: str  # where it came from: its directory relative to the directory given, or the W&B run path
    run_name: str  # algorithm[+rollout], e.g. gspo+eqlen
    model: str  # model label: the family, plus the checkpoint name for pretrained models
    seed: int | None
    config: dict[str, Any]
    train: dict[str, float] = field(default_factory=dict)  # final train/* metrics
    eval: dict[str, dict[str, float]] = field(default_factory=dict)  # benchmark -> metric -> final value
    history: dict[str, dict[int, float]] = field(default_factory=dict)  # metric -> {step: value}
    error: str | None = None  # set for a failed run

    @property
    def failed(self) -> bool:
        return self.error is not None


def model_label(config: dict) -> str:
    """'dense' for a random-init model, 'dense: Qwen2.5-7B' for a pretrained one (the last part of its id/dir)."""
    model = config.get("model") or {}
    name = model.get("local_dir") or model.get("name_or_path")
    family = str(model.get("family", "unknown"))
    return f"{family}: {Path(str(name)).name}" if name else family


def run_name_of(config: dict) -> str:
    """The run name seqrl-train gives a config (`seqrl.train.run_name`); 'unknown' without one."""
    from omegaconf import OmegaConf

    from seqrl.train import run_name

    try:
        return run_name(OmegaConf.create(config))
    except Exception:  # noqa: BLE001 - a config too broken to name still lists the run as failed
        return "unknown"


def one_line(text: str, limit: int = 300) -> str:
    """Collapse whitespace so an error fits one table line."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


def read_history(run_dir: Path) -> dict[str, dict[int, float]]:
    """Per-step metrics of a run's Lightning CSV log(s): metric -> {step: value}, steps sorted; later versions win."""
    def version(p: Path) -> int:
        n = p.parent.name.rpartition("_")[2]
        return int(n) if n.isdigit() else -1

    hist: dict[str, dict[int, float]] = defaultdict(dict)
    for path in sorted(Path(run_dir).glob("csv/*/metrics.csv"), key=version):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                step = row.pop("step", "")
                row.pop("epoch", None)
                if step in ("", None):
                    continue
                for key, value in row.items():
                    if value not in ("", None):
                        hist[key][int(float(step))] = float(value)
    return {k: dict(sorted(v.items())) for k, v in sorted(hist.items())}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable JSON file ({one_line(exc, 120)})") from exc


def _hydra_config(run_dir: Path) -> dict:
    from omegaconf import OmegaConf

    path = run_dir / ".hydra" / "config.yaml"
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path.exists() else {}


def load_run_dir(run_dir: Path, rel: str) -> Run:
    """A run directory as a Run: finished (results.json) or failed (error.json, else only .hydra/config.yaml)."""
    history = read_history(run_dir)
    if (run_dir / "results.json").exists():
        r = _read_json(run_dir / "results.json")
        config = r.get("config") or {}
        return Run(rel, r.get("run_name") or run_name_of(config), model_label(config), r.get("seed"), config,
                   r.get("train") or {}, r.get("eval") or {}, history)
    if (run_dir / "error.json").exists():
        e = _read_json(run_dir / "error.json")
        config, error = e.get("config") or _hydra_config(run_dir), e.get("error") or "error.json without an error"
    else:
        config, error = _hydra_config(run_dir), NO_RESULTS
    return Run(rel, run_name_of(config), model_label(config), config.get("seed"), config, history=history,
               error=one_line(error))


def run_dirs(root: Path) -> list[Path]:
    """Every run directory under `root` (itself included): those holding results.json, error.json or .hydra/."""
    found = {p.parent for name in ("results.json", "error.json") for p in root.rglob(name)}
    found |= {p.parent.parent for p in root.rglob(".hydra/config.yaml")}
    return sorted(found)


def load_local(dirs: list[str]) -> list[Run]:
    """All runs under the sweep (or run) directories `dirs`, sorted by their path relative to the directory given."""
    runs = []
    for d in dirs:
        root = Path(d)
        if not root.is_dir():
            raise ValueError(f"dirs: {d!r} is not a directory; allowed: sweep or run directories of seqrl-train")
        runs += [load_run_dir(p, p.relative_to(root).as_posix() or ".") for p in run_dirs(root)]
    if not runs:
        raise ValueError(f"dirs={list(dirs)}: no run directories (results.json, error.json or .hydra/) found")
    return sorted(runs, key=lambda r: r.rel)


def export_raw(dirs: list[str], dest: str) -> int:
    """Copy what the report reads (results.json, error.json, the CSV logs, and .hydra/config.yaml of runs without
    results) of every run under `dirs` into `dest`, keeping relative paths; returns the number of runs copied."""
    count = 0
    for d in dirs:
        root = Path(d)
        for run_dir in run_dirs(root):
            files = [run_dir / n for n in ("results.json", "error.json") if (run_dir / n).exists()]
            files += sorted(run_dir.glob("csv/*/metrics.csv"))
            if not (run_dir / "results.json").exists() and (run_dir / ".hydra" / "config.yaml").exists():
                files.append(run_dir / ".hydra" / "config.yaml")
            for f in files:
                target = Path(dest) / f.relative_to(root)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, target)
            count += 1
    return count


def load_wandb(path: str | None, filters: dict | None = None) -> list[Run]:
    """The runs of the W&B project `path` ('entity/project') through the public API; needs network and a login.

    Raises ValueError (one line) when W&B is offline or unreachable, or `path` is not set.
    """
    mode = os.environ.get("WANDB_MODE", "")
    if mode in ("offline", "disabled", "dryrun"):
        raise ValueError(f"source=wandb: WANDB_MODE={mode}, but the W&B public API needs network and `wandb login`; "
                         "for offline runs use source=local on their run directories (or `wandb sync` them first)")
    if not path or path.count("/") != 1:
        raise ValueError(f"wandb.path={path!r}: allowed: 'entity/project' of the runs to report")
    try:
        import wandb

        found = list(wandb.Api(timeout=30).runs(path, filters=dict(filters or {})))
        runs = [_wandb_run(r) for r in found]
    except Exception as exc:  # noqa: BLE001 - no network, no login, unknown project: one line
        raise ValueError(f"source=wandb: cannot read the runs of {path!r} through the W&B API "
                         f"({type(exc).__name__}: {one_line(exc, 160)}); it needs network and `wandb login`") from exc
    if not runs:
        raise ValueError(f"wandb.path={path!r}: no runs found (filters={dict(filters or {})})")
    return sorted(runs, key=lambda r: r.rel)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _wandb_run(r: Any) -> Run:
    """A `wandb.apis.public.Run` as a Run (summary = final metrics, scan_history = per-step metrics)."""
    config = {k: v for k, v in dict(r.config).items() if not k.startswith("_")}
    summary = {k: v for k, v in dict(r.summary).items() if _number(v)}
    train = {k: float(v) for k, v in summary.items() if k.startswith("train/")}
    evals: dict[str, dict[str, float]] = defaultdict(dict)
    for key, value in summary.items():
        parts = key.split("/", 2)
        if parts[0] == "eval" and len(parts) == 3:
            evals[parts[1]][parts[2]] = float(value)
    hist: dict[str, dict[int, float]] = defaultdict(dict)
    for row in r.scan_history():
        step = row.get("trainer/global_step", row.get("_step"))
        for key, value in row.items():
            if step is not None and _number(value) and not key.startswith("_") and key != "trainer/global_step":
                hist[key][int(step)] = float(value)
    error = None if r.state == "finished" else f"W&B run state: {r.state}"
    return Run("/".join(r.path), r.name or run_name_of(config), model_label(config), config.get("seed"), config,
               train, dict(evals), {k: dict(sorted(v.items())) for k, v in sorted(hist.items())}, error)
