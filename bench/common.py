"""Shared plumbing of the bench/ scripts: the machine they ran on, min/median/max summaries, and the JSON record
each script writes to results/perf/<name>.json (rendered into results/perf.md by `python bench/perf_md.py`).

Every record holds: name, command line, machine (CPU model, cores, torch threads, load average before and after),
git commit, package versions, the script's own `settings` and `rows` (a list of flat dicts: the
table the script printed), and free-form `notes`.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PERF_DIR = ROOT / "results" / "perf"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """What the numbers depend on: CPU, cores, torch threads, the load average (other processes' work)."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "loadavg_1m": round(os.getloadavg()[0], 2), "cuda": torch.cuda.is_available()}


def summary(values: list[float]) -> dict:
    """min / median / max of repeated measurements."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


class Record:
    """Collects one bench script's results; `write()` saves results/perf/<name>.json atomically."""

    def __init__(self, name: str, settings: dict):
        self.name, self.settings, self.rows, self.notes = name, settings, [], []
        self.machine_before, self.t0 = machine(), time.time()

    def add(self, **row) -> None:
        self.rows.append(row)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def write(self, out_dir: Path = PERF_DIR) -> Path:
        from seqrl.results import git_commit, versions, write_json_atomic

        after = machine()
        record = {"name": self.name, "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.t0)),
                  "seconds": round(time.time() - self.t0, 1),
                  "machine": {**self.machine_before, "loadavg_1m_after": after["loadavg_1m"]},
                  "git_commit": git_commit(ROOT), "versions": versions(), "settings": self.settings,
                  "rows": self.rows, "notes": self.notes}
        path = Path(out_dir) / f"{self.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, record)
        print(f"wrote {path}")
        return path
