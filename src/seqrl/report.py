"""`seqrl-report`: leaderboard tables and training-curve plots of a study (its sweep directories or W&B project).

    seqrl-report dirs=[multirun/length_bias] out=results/length_bias
    seqrl-report dirs=[results/length_bias/raw] out=results/length_bias reference=true
    seqrl-report source=wandb wandb.path=my-entity/seqrl out=results/online

One table per model (family, plus the checkpoint name of pretrained models); rows are run names (algorithm, with
`+eqlen` for EqLen rollouts), sorted; columns are each benchmark's metrics (`metrics` patterns), then the final
train metrics (`train_metrics`). A cell is the mean over seeds +- the half-width of its 95% Student-t interval (the
mean alone for one seed); the best mean of a column is in bold, except for length statistics (`unranked`).
Failed runs are counted in their row and listed with their error. Writes <out>/leaderboard.md and .csv, with
`reference=true` <out>/reference.md (the papers' reported numbers, results/reference.yaml, beside ours), and
<out>/plots/*.png (seqrl.plots). Output is deterministic: sorted rows, fixed float formats, no timestamps or paths.
The runs of a row must differ in seed only (paths and tags aside): the report refuses to average two settings.
`raw_out=DIR` also copies what it read (results.json, error.json, CSV logs) to DIR, to commit a study's raw results.
"""
from __future__ import annotations

import csv
import fnmatch
import io
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from seqrl.runs import Run

# two-sided 95% Student-t quantiles for 1..30 degrees of freedom; the normal quantile beyond
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
SEED_FREE_KEYS = ("seed", "paths", "tags", "ckpt_path")  # config keys allowed to differ between seeds of a row


@dataclass
class WandbSource:
    path: Optional[str] = None  # 'entity/project'
    filters: Dict[str, Any] = field(default_factory=dict)  # MongoDB-style filters of wandb.Api().runs


@dataclass
class ReportConfig:
    dirs: List[str] = field(default_factory=lambda: ["outputs/train"])
    out: str = "results/latest"
    source: str = "local"  # local: run directories under `dirs` | wandb: the W&B project `wandb.path`
    wandb: WandbSource = field(default_factory=WandbSource)
    metrics: List[str] = field(default_factory=lambda: ["avg@*", "response_length/mean"])
    train_metrics: List[str] = field(default_factory=lambda: ["train/accuracy", "train/response_length/mean"])
    unranked: List[str] = field(default_factory=lambda: ["*length*", "*truncation_rate"])
    reference: bool = False
    reference_file: str = "results/reference.yaml"
    plot: bool = True  # false: no plots
    plots: Dict[str, List[str]] = field(default_factory=dict)  # file stem -> metric patterns (conf/report.yaml)
    smooth: int = 5  # trailing moving-average window of the plotted train/* curves (1 = raw)
    raw_out: Optional[str] = None  # also copy what the report reads (results.json, CSV logs) here, for committing

    def __post_init__(self) -> None:
        if self.source not in ("local", "wandb"):
            raise ValueError(f"source={self.source!r}: allowed: local, wandb")
        if self.source == "local" and not self.dirs:
            raise ValueError("dirs=[]: allowed: one or more sweep or run directories")
        if self.smooth < 1:
            raise ValueError(f"smooth={self.smooth}: must be >= 1 (1 = no smoothing)")


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% Student-t confidence interval (None for a single value)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, None
    t = _T95[len(values) - 2] if len(values) - 1 <= len(_T95) else 1.96
    return m, t * statistics.stdev(values) / math.sqrt(len(values))


def fmt(x: float, big: bool = False) -> str:
    """Fixed formats: 3 decimals, 1 decimal for values of 10 or more (big=True); never '-0.000'."""
    s = f"{x:.1f}" if big else f"{x:.3f}"
    return s[1:] if s.lstrip("-0.") == "" and s.startswith("-") else s


@dataclass
class Row:
    values: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # column -> one per seed
    runs: list[Run] = field(default_factory=list)
    failed: list[Run] = field(default_factory=list)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check_same_setting(name: str, model: str, runs: list[Run]) -> None:
    """The runs of one row must differ only by seed: a row's mean +- CI is over seeds of one setting."""
    seeds: dict[Any, str] = {}
    for r in runs:
        if r.seed in seeds:
            raise ValueError(f"row {name} ({model}): runs {seeds[r.seed]} and {r.rel} both have seed {r.seed}; "
                             "report each run once")
        seeds[r.seed] = r.rel
    def setting(r: Run) -> dict[str, Any]:
        return {k: v for k, v in _flatten(r.config).items() if k.split(".")[0] not in SEED_FREE_KEYS}

    first = setting(runs[0])
    for r in runs[1:]:
        other = setting(r)
        for key in sorted(set(first) | set(other)):
            if first.get(key) != other.get(key):
                raise ValueError(f"row {name} ({model}): {runs[0].rel} and {r.rel} differ in {key} "
                                 f"({first.get(key)!r} vs {other.get(key)!r}); a row averages seeds of one setting")


def build_tables(runs: list[Run], metrics: list[str], train_metrics: list[str]) -> dict[str, dict[str, Row]]:
    """model -> run name -> Row of per-seed values (runs taken in seed order)."""
    tables: dict[str, dict[str, Row]] = defaultdict(lambda: defaultdict(Row))
    for r in sorted(runs, key=lambda r: (r.seed is None, r.seed if r.seed is not None else 0, r.rel)):
        row = tables[r.model][r.run_name]
        if r.failed:
            row.failed.append(r)
            continue
        row.runs.append(r)
        for bench in sorted(r.eval):
            for metric in sorted(r.eval[bench]):
                if any(fnmatch.fnmatchcase(metric, p) for p in metrics):
                    row.values[f"{bench}/{metric}"].append(float(r.eval[bench][metric]))
        for key in train_metrics:
            if key in r.train:
                row.values[key].append(float(r.train[key]))
    for model, rows in tables.items():
        for name, row in rows.items():
            if len(row.runs) > 1:
                _check_same_setting(name, model, row.runs)
    return {m: dict(sorted(rows.items())) for m, rows in sorted(tables.items())}


def _columns(rows: dict[str, Row], train_metrics: list[str]) -> list[str]:
    present = {c for row in rows.values() for c in row.values}
    evals = sorted(c for c in present if c not in train_metrics)
    return evals + [c for c in train_metrics if c in present]


def _cells(rows: dict[str, Row], cols: list[str], unranked: list[str]) -> dict[str, dict[str, list]]:
    """run name -> column -> [mean text, ci text ('' for one seed), best]; best compares the formatted means."""
    out: dict[str, dict[str, list]] = {name: {} for name in rows}
    for name, row in rows.items():
        for c in cols:
            if row.values.get(c):
                m, h = mean_ci(row.values[c])
                big = abs(m) >= 10
                out[name][c] = [fmt(m, big), "" if h is None else fmt(h, big), False]
    for c in cols:
        means = [float(cells[c][0]) for cells in out.values() if c in cells]
        if means and not any(fnmatch.fnmatchcase(c, p) for p in unranked):
            for cells in out.values():
                if c in cells:
                    cells[c][2] = float(cells[c][0]) == max(means)
    return out


def render(tables: dict[str, dict[str, Row]], train_metrics: list[str], unranked: list[str]) -> tuple[str, str]:
    """The leaderboard as Markdown (a section per model, then the failed runs) and CSV (a row per model and run)."""
    failed = sorted((f for rows in tables.values() for r in rows.values() for f in r.failed), key=lambda f: f.rel)
    n_runs = len(failed) + sum(len(r.runs) for rows in tables.values() for r in rows.values())
    md = ["# Leaderboard", "",
          "Mean ± 95% CI (Student t) over seeds; **bold**: the best mean of a column (length statistics are not "
          f"ranked); train/* columns are the last RL step's values. Runs: {n_runs}, failed: {len(failed)}.", ""]
    all_cols = sorted({c for rows in tables.values() for c in _columns(rows, train_metrics)})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "run", "seeds", "failed", *[x for c in all_cols for x in (c, f"{c} ci95")], "best"])
    for model, rows in tables.items():
        cols = _columns(rows, train_metrics)
        cells = _cells(rows, cols, unranked)
        md += [f"## {model}", "", "| run | seeds | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
        for name, row in rows.items():
            texts = []
            for c in cols:
                mean, ci, best = cells[name].get(c, ("", "", False))
                txt = f"{mean} ± {ci}" if ci else mean
                texts.append(f"**{txt}**" if best else txt)
            seeds = f"{len(row.runs)}" + (f" (+{len(row.failed)} failed)" if row.failed else "")
            md.append(f"| {name} | {seeds} | " + " | ".join(texts) + " |")
            cell = cells[name]
            w.writerow([model, name, len(row.runs), len(row.failed),
                        *[x for c in all_cols for x in cell.get(c, ("", ""))[:2]],
                        ";".join(c for c in cols if c in cell and cell[c][2])])
        md.append("")
    if failed:
        md += ["## Failed runs", ""]
        md += [f"- `{f.rel}` ({f.run_name}, {f.model}, seed {f.seed}): {f.error}" for f in failed] + [""]
    return "\n".join(md), buf.getvalue()


def collect(cfg: ReportConfig) -> list[Run]:
    """The runs to report, from the run directories under cfg.dirs or from W&B."""
    from seqrl.runs import load_local, load_wandb

    if cfg.source == "wandb":
        return load_wandb(cfg.wandb.path, cfg.wandb.filters)
    return load_local(list(cfg.dirs))


def report(cfg: ReportConfig) -> str:
    """Write the leaderboard (and reference table, plots) of cfg; returns the Markdown printed to the console."""
    from seqrl.plots import plot_study
    from seqrl.reference import load_reference, render_reference
    from seqrl.results import write_text_atomic
    from seqrl.runs import export_raw

    entries = load_reference(cfg.reference_file) if cfg.reference else None  # a bad file fails before any write
    runs = collect(cfg)
    tables = build_tables(runs, list(cfg.metrics), list(cfg.train_metrics))
    md, csv_text = render(tables, list(cfg.train_metrics), list(cfg.unranked))
    if cfg.raw_out and cfg.source == "local":
        export_raw(list(cfg.dirs), cfg.raw_out)
    out = Path(cfg.out)
    write_text_atomic(out / "leaderboard.md", md)
    write_text_atomic(out / "leaderboard.csv", csv_text)
    if entries is not None:
        ref_md = render_reference(entries, tables)
        write_text_atomic(out / "reference.md", ref_md)
        md += "\n" + ref_md
    if cfg.plot and cfg.plots:
        plot_study([r for r in runs if not r.failed], out / "plots", dict(cfg.plots), cfg.smooth)
    return md


def parse_config(cfg: DictConfig | dict) -> ReportConfig:
    """The typed, checked config (a misspelt key, a wrong type or a bad value raises with the key named)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ReportConfig), cfg))


def _precheck(argv: list[str]) -> None:
    """Compose conf/report.yaml with the command line and check it; one line and exit 2 on failure."""
    from hydra import compose, initialize_config_dir

    from seqrl.cli import _one_line, conf_dir

    if any(a.startswith("-") for a in argv):
        return
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            parse_config(compose(config_name="report", overrides=list(argv)))
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line
        msg = str(exc) if isinstance(exc, ValueError) and "\n" not in str(exc) else _one_line(exc)
        print(f"seqrl-report: error: {msg}", file=sys.stderr)
        sys.exit(2)


def _task(cfg: DictConfig) -> None:
    try:
        md = report(parse_config(cfg))
    except ValueError as exc:
        print(f"seqrl-report: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(md)


def main() -> None:
    import hydra

    from seqrl.cli import conf_dir

    _precheck(sys.argv[1:])
    hydra.main(config_path=str(conf_dir()), config_name="report", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()
