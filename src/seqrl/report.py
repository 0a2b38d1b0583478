"""`seqrl-report`: leaderboard tables from the results.json files of runs and sweeps.

    seqrl-report dirs=[multirun/train/2026-11-22] out=results/smoke

Rows are run names (algorithm[+rollout]) per model family; columns are each benchmark's metrics and the final
response length; cells are the mean over seeds +- the half-width of a 95% t-interval, the best mean of each column in
bold. Writes <out>/leaderboard.md and <out>/leaderboard.csv (atomically); runs without results.json are listed as
failed with their directory.
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from omegaconf import DictConfig

# two-sided 95% Student-t quantiles by degrees of freedom (1..30); normal beyond
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t confidence interval (0 for a single value)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, 0.0
    t = _T95[len(values) - 2] if len(values) - 1 <= len(_T95) else 1.96
    return m, t * statistics.stdev(values) / math.sqrt(len(values))


def collect(dirs: list[str]) -> tuple[list[dict], list[str]]:
    """All results.json under `dirs` (sorted by path), and the run dirs that have a .hydra config but no results."""
    runs, failed = [], []
    for d in dirs:
        for cfg in sorted(Path(d).rglob(".hydra/config.yaml")):
            res = cfg.parent.parent / "results.json"
            if res.exists():
                runs.append(json.loads(res.read_text()))
            else:
                failed.append(str(cfg.parent.parent))
    return runs, failed


def rows_of(runs: list[dict], metrics: list[str]) -> dict[tuple[str, str], dict[str, list[float]]]:
    table: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        family = r["config"]["model"]["family"]
        cells = table[(r["run_name"], family)]
        for bench, m in r.get("eval", {}).items():
            for k in metrics:
                if k in m:
                    cells[f"{bench}/{k}"].append(m[k])
        if "train/response_length/mean" in r.get("train", {}):
            cells["train/response_length"].append(r["train"]["train/response_length/mean"])
    return table


def render(table, higher_is_better=lambda col: not col.endswith(("length", "truncation_rate"))) -> tuple[str, str]:
    cols = sorted({c for cells in table.values() for c in cells})
    stats = {key: {c: mean_ci(v) for c, v in cells.items() if v} for key, cells in table.items()}
    best = {}
    for c in cols:
        means = [s[c][0] for s in stats.values() if c in s]
        if means and higher_is_better(c):
            best[c] = max(means)
    md = ["| run | model | seeds | " + " | ".join(cols) + " |", "|---|---|---:|" + "---:|" * len(cols)]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["run", "model", "seeds"] + [x for c in cols for x in (c, c + "_ci95")])
    for (name, family), s in sorted(stats.items()):
        seeds = max((len(v) for v in table[(name, family)].values()), default=0)
        cells = []
        for c in cols:
            if c not in s:
                cells.append("")
                continue
            m, h = s[c]
            txt = f"{m:.3f} ± {h:.3f}" if abs(m) < 10 else f"{m:.1f} ± {h:.1f}"
            cells.append(f"**{txt}**" if best.get(c) == m else txt)
        md.append(f"| {name} | {family} | {seeds} | " + " | ".join(cells) + " |")
        w.writerow([name, family, seeds] + [x for c in cols for x in (s.get(c, ("", ""))[0], s.get(c, ("", ""))[1])])
    return "\n".join(md) + "\n", buf.getvalue()


def report(dirs: list[str], out: str, metrics: list[str]) -> str:
    from seqrl.results import write_text_atomic

    runs, failed = collect(dirs)
    if not runs and not failed:
        raise ValueError(f"dirs={dirs}: no run directories (with .hydra/config.yaml) found")
    md, csv_text = render(rows_of(runs, metrics))
    if failed:
        md += "\nFailed runs (no results.json):\n" + "".join(f"- {f}\n" for f in failed)
    write_text_atomic(Path(out) / "leaderboard.md", md)
    write_text_atomic(Path(out) / "leaderboard.csv", csv_text)
    return md


def _task(cfg: DictConfig) -> None:
    try:
        md = report(list(cfg.dirs), cfg.out, list(cfg.metrics))
    except ValueError as exc:
        print(f"seqrl-report: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(md)


def main() -> None:
    import hydra

    from seqrl.cli import conf_dir

    hydra.main(config_path=str(conf_dir()), config_name="report", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()
