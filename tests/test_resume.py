"""Exact resume: a run killed with SIGKILL mid-run resumes from its last checkpoint and logs, step by step, the same
metrics as the uninterrupted run with the same seed; a corrupt checkpoint fails in one clear line."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, tiny_overrides

EXE = str(Path(sys.executable).with_name("seqrl-train"))
STEPS = 6


def _cmd(run_dir: Path, *extra: str) -> list[str]:
    overrides = [o for o in tiny_overrides(run_dir) if not o.startswith(("paths.output_dir", "trainer.max_steps"))]
    return [EXE, *overrides, f"trainer.max_steps={STEPS}", "eval.heldout=false", "logger=csv",
            f"hydra.run.dir={run_dir}", *extra]


def _rows(run_dir: Path, version: str = "*") -> dict[int, dict]:
    """Per-RL-step training metrics from the CSV log(s) of a run, timings left out."""
    rows = {}
    for path in sorted(run_dir.glob(f"csv/version_{version}/metrics.csv")):
        for row in csv.DictReader(path.open()):
            if row.get("train/rl_step"):
                rows[int(float(row["train/rl_step"]))] = {
                    k: v for k, v in row.items() if v and not k.startswith(("perf/", "epoch", "step"))}
    return rows


@pytest.mark.slow
def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run(_cmd(tmp_path / "full"), capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert full.returncode == 0, full.stderr[-2000:]
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(killed_dir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if any(killed_dir.glob("checkpoints/epoch=0-step=2.ckpt")):  # RL step 2 is on disk: kill mid-run
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = subprocess.run(_cmd(killed_dir, "ckpt_path=last"), capture_output=True, text=True, cwd=ROOT, env=env,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    want, got = _rows(tmp_path / "full"), _rows(killed_dir, version="1")  # version_1: the resumed process
    assert sorted(want) == list(range(1, STEPS + 1))
    last_done = json.loads((killed_dir / "results.json").read_text())["rl_steps"]
    assert last_done == STEPS
    resumed_steps = sorted(got)
    assert resumed_steps[-1] == STEPS and len(resumed_steps) >= STEPS - 2  # at most the killed step is re-run
    for step in resumed_steps:
        assert got[step] == want[step], f"step {step} differs after resume"
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith("perf/")}  # noqa: E731
    final = json.loads((tmp_path / "full" / "results.json").read_text())["train"]
    assert strip(json.loads((killed_dir / "results.json").read_text())["train"]) == strip(final)


def test_corrupt_checkpoint_fails_in_one_line(tmp_path):
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    proc = subprocess.run(_cmd(tmp_path / "run", f"ckpt_path={bad}"), capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "corrupt" in lines[0] and "broken.ckpt" in lines[0], proc.stderr
