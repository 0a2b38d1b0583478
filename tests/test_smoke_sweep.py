"""The CI sweep end to end: `seqrl-train -m --config-dir sweeps --config-name smoke` (every algorithm x rollout on
tiny_dense), then `seqrl-report` turns the sweep directory into a leaderboard with one row per run name."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

BIN = Path(sys.executable).parent
TINY = ["warmup.steps=40", "warmup.batch_size=16", "prompts_per_step=4", "rollout.group_size=4",
        "rollout.max_new_tokens=24", "eval.n_samples=2", "eval.limit=4", "eval.max_new_tokens=24", "logger=csv",
        "trainer.enable_progress_bar=false"]


@pytest.mark.slow
def test_smoke_sweep_runs_and_reports(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sweep = subprocess.run([str(BIN / "seqrl-train"), "-m", "--config-dir", "sweeps", "--config-name", "smoke",
                            *TINY, f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=1200)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    results = sorted((tmp_path / "sweep").glob("*/results.json"))
    assert len(results) == 16
    report = subprocess.run([str(BIN / "seqrl-report"), f"dirs=[{tmp_path / 'sweep'}]", f"out={tmp_path / 'table'}",
                             "plot=false"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    table = (tmp_path / "table" / "leaderboard.md").read_text()
    for name in ("grpo", "dr_grpo", "dapo", "rloo", "gspo", "gspo_token", "luspo", "fspo"):
        assert f"| {name} |" in table and f"| {name}+eqlen |" in table, name
    assert (tmp_path / "table" / "leaderboard.csv").read_text().count("\n") >= 17
