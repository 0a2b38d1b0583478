"""The papers' reported numbers (results/reference.yaml) beside the same quantity computed from our leaderboard.

Each entry names its paper (arXiv id), where in the paper the number is, the paper's model and setting, and how to
compute "ours" from a leaderboard: `kind` value (the algorithm's mean), delta (algorithm - baseline) or ratio
(algorithm / baseline) of the first leaderboard column matching `column`, in every model table of `family`
(null: every table); `percent: true` scales our fractions to the papers' accuracy points.
"""
from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

REQUIRED = ("paper", "arxiv", "table", "model", "setting", "kind", "algorithm", "column", "reported")
KINDS = ("value", "delta", "ratio")


def load_reference(path: str | Path) -> list[dict[str, Any]]:
    """The checked entries of a reference file (a relative path is tried from the cwd, then the project root)."""
    from omegaconf import OmegaConf

    from seqrl.cli import conf_dir

    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = conf_dir().parent / p
    if not p.exists():
        raise ValueError(f"reference_file={str(path)!r}: not found (allowed: a YAML file like results/reference.yaml)")
    entries = OmegaConf.to_container(OmegaConf.load(p)).get("references") or []
    for i, e in enumerate(entries):
        where = f"{p.name}: entry {i} ({e.get('paper', '?')})"
        missing = [k for k in REQUIRED if e.get(k) is None]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}; required: {', '.join(REQUIRED)}")
        if e["kind"] not in KINDS:
            raise ValueError(f"{where}: kind={e['kind']!r}; allowed: {', '.join(KINDS)}")
        if e["kind"] != "value" and not e.get("baseline"):
            raise ValueError(f"{where}: kind={e['kind']} needs a baseline run name")
    return entries


def _show(x: float, kind: str, percent: bool) -> str:
    if kind == "ratio":
        return f"{x:.2f}x"
    text = f"{x:.1f}" if percent or abs(x) >= 10 else f"{x:.3f}"
    return ("+" if kind == "delta" and x >= 0 else "") + text


def ours(entry: dict, tables: dict) -> str:
    """Our value of an entry in each matching model table ('model: column value'), '-' where none can be computed."""
    from seqrl.report import mean_ci

    found = []
    for model, rows in tables.items():
        family = model.partition(":")[0]
        if entry.get("family") not in (None, family):
            continue
        needed = [entry["algorithm"]] + ([entry["baseline"]] if entry["kind"] != "value" else [])
        cols = sorted({c for name in needed if name in rows for c in rows[name].values})
        col = next((c for c in cols if fnmatch.fnmatchcase(c, entry["column"])), None)
        if col is None or not all(name in rows and rows[name].values.get(col) for name in needed):
            continue
        a = mean_ci(rows[needed[0]].values[col])[0]
        b = mean_ci(rows[needed[1]].values[col])[0] if len(needed) > 1 else None
        if entry["kind"] == "ratio" and b == 0:
            continue
        x = {"value": a, "delta": a - (b or 0.0), "ratio": a / b if b else 0.0}[entry["kind"]]
        percent = bool(entry.get("percent")) and entry["kind"] != "ratio"
        found.append(f"{model} {col}: {_show(x * (100 if percent else 1), entry['kind'], percent)}")
    return "; ".join(found) or "-"


def render_reference(entries: list[dict], tables: dict) -> str:
    """Markdown: one row per reported number, with ours beside it."""
    md = ["# Reported by the papers", "",
          "Numbers as the papers report them (results/reference.yaml), beside the same quantity from this "
          "leaderboard where it has the runs and the column. Models and scale differ (see `model`): compare "
          "directions, not values.", "",
          "| paper | arXiv | where | model | setting | compared | reported | ours |",
          "|---|---|---|---|---|---|---:|---|"]
    for e in entries:
        compared = e["algorithm"] + {"value": "", "delta": f" - {e.get('baseline')}",
                                     "ratio": f" / {e.get('baseline')}"}[e["kind"]]
        percent = bool(e.get("percent")) and e["kind"] != "ratio"
        md.append(f"| {e['paper']} | {e['arxiv']} | {e['table']} | {e['model']} | {e['setting']} | {compared} | "
                  f"{_show(float(e['reported']), e['kind'], percent)} | {ours(e, tables)} |")
    return "\n".join(md) + "\n"
