"""Training curves of a study (matplotlib, Agg backend): one PNG per model and plot, one panel per metric.

Each panel draws one line per run name (algorithm[+rollout]): the mean over seeds at each step, with a band from
the lowest to the highest seed (seeds that did not log a step are left out of it); train/* curves can be smoothed
by a trailing moving average, eval/* points never are. Curves come from each run's per-step history (the Lightning
CSV log, or W&B). The x axis is the log's `step`, counted in RL steps (one rollout and its updates): a train/* value
at step s is measured on the rollout of update s; Lightning logs an eval inside training at the step of the last
update before it (9 after 10 updates) and the final eval at max_steps. Panels of one pattern share their y axis.
Output is deterministic (no timestamps in the PNG metadata).
"""
from __future__ import annotations

import fnmatch
import re
from collections import defaultdict
from pathlib import Path

from seqrl.runs import Run

PNG_METADATA = {"Software": None}  # matplotlib writes its version otherwise; no date is written for PNG


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` points (the first points average what is there)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def seed_band(series: list[dict[int, float]], window: int = 1) -> tuple[list[int], list[float], list[float],
                                                                        list[float]]:
    """Steps, mean, min and max over seeds of per-seed {step: value} series (each smoothed first)."""
    per_step: dict[int, list[float]] = defaultdict(list)
    for s in series:
        steps = sorted(s)
        for step, v in zip(steps, smooth([s[k] for k in steps], window)):
            per_step[step].append(v)
    steps = sorted(per_step)
    return (steps, [sum(per_step[k]) / len(per_step[k]) for k in steps], [min(per_step[k]) for k in steps],
            [max(per_step[k]) for k in steps])


def slug(text: str) -> str:
    """A file-name-safe version of a model label ('dense: Qwen2.5-7B' -> 'dense_Qwen2.5-7B')."""
    return re.sub(r"[^A-Za-z0-9.\-]+", "_", text).strip("_") or "model"


def panels_of(patterns: list[str], available: set[str]) -> list[str]:
    """The metrics matching `patterns`, in pattern order, each once (sorted within a pattern)."""
    keys: list[str] = []
    for p in patterns:
        keys += [k for k in sorted(fnmatch.filter(available, p)) if k not in keys]
    return keys


def plot_study(runs: list[Run], out_dir: Path, plots: dict[str, list[str]], window: int = 1) -> list[Path]:
    """Write <out_dir>/<model>_<plot>.png for each model and each plot whose patterns match logged metrics.

    `plots` maps a plot name to metric patterns, e.g. {"response_length": ["train/response_length/mean"],
    "clipfrac_by_length": ["train/pg_clipfrac/len_q*"]}. Returns the files written, sorted.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = sorted({r.run_name for r in runs})
    colors = {n: f"C{i % 10}" for i, n in enumerate(names)}  # one color per run name in every figure
    by_model: dict[str, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for r in sorted(runs, key=lambda r: r.rel):
        by_model[r.model][r.run_name].append(r)
    written = []
    for model, groups in sorted(by_model.items()):
        available = {k for rs in groups.values() for r in rs for k in r.history}
        for plot, patterns in plots.items():
            keys = panels_of(list(patterns), available)
            if not keys:
                continue
            fig, axes = plt.subplots(1, len(keys), figsize=(max(4.2 * len(keys), 6.0), 3.6), squeeze=False,
                                     sharey=len(patterns) == 1)
            for ax, key in zip(axes[0], keys):
                w = window if key.startswith("train/") else 1
                for name, rs in sorted(groups.items()):
                    steps, mean, lo, hi = seed_band([r.history.get(key, {}) for r in rs], w)
                    if not steps:
                        continue
                    ax.plot(steps, mean, color=colors[name], lw=1.4, label=f"{name} ({len(rs)} seeds)")
                    if len(rs) > 1:
                        ax.fill_between(steps, lo, hi, color=colors[name], alpha=0.18, lw=0)
                ax.set_title(key, fontsize=9)
                ax.set_xlabel("RL step")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.grid(alpha=0.3)
            axes[0][-1].legend(fontsize=7, loc="best")
            fig.suptitle(f"{model}: {plot}", fontsize=10)
            smoothing = f"; train/* curves: trailing mean of {window} steps" if window > 1 else ""
            fig.text(0.01, 0.01, f"line: mean over seeds; band: min-max over seeds{smoothing}", fontsize=7,
                     color="0.4")
            fig.tight_layout(rect=(0, 0.04, 1, 1))
            path = Path(out_dir) / f"{slug(model)}_{plot}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=100, metadata=PNG_METADATA)
            plt.close(fig)
            written.append(path)
    return sorted(written)
