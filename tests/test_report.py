"""seqrl-report: hand-checked tables, committed tables reproduced exactly, failures, plots, reference, W&B errors.

The fixture tests/fixtures/report/raw holds two algorithms x two seeds (results.json + Lightning metrics.csv), a
luspo job that raised (error.json) and a grpo job that left only .hydra/config.yaml; expected/ holds the tables
`seqrl-report dirs=[tests/fixtures/report/raw] out=tests/fixtures/report/expected reference=true plot=false` wrote.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, compose
from seqrl import plots, reference, report, runs

FIXTURE = ROOT / "tests" / "fixtures" / "report"
TABLES = ("leaderboard.md", "leaderboard.csv", "reference.md")


def _cfg(raw: Path, out: Path, *extra: str) -> report.ReportConfig:
    """The config the CLI builds from conf/report.yaml and these overrides."""
    return report.parse_config(compose("report", [f"dirs=['{raw}']", f"out='{out}'", *extra]))


def _committed_studies():
    """(raw results, committed tables): the fixture, and every study committed under results/<study>/raw."""
    yield FIXTURE / "raw", FIXTURE / "expected"
    for raw in sorted((ROOT / "results").glob("*/raw")):
        yield raw, raw.parent


@pytest.mark.parametrize("raw,committed", list(_committed_studies()), ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_tables_are_what_the_report_writes(raw, committed, tmp_path):
    assert (committed / "leaderboard.md").exists(), f"{committed}: no committed leaderboard.md"
    report.report(_cfg(raw, tmp_path, "reference=true", "plot=false"))
    for name in TABLES:
        if (committed / name).exists():
            assert (tmp_path / name).read_text() == (committed / name).read_text(), f"{committed / name} is stale"


def test_hand_computed_cells():
    """arith/avg@4: gspo seeds 0.25, 0.35 -> mean 0.300, CI 12.706 * 0.0707 / sqrt(2) = 0.635; luspo 0.40, 0.50 ->
    0.450 (best, bold). Lengths are not ranked. pass@4 is not in the default metric patterns."""
    md = (FIXTURE / "expected" / "leaderboard.md").read_text()
    assert "| gspo | 2 | 0.300 ± 0.635 | 19.0 ± 12.7 | 0.350 ± 0.635 | 21.0 ± 12.7 |" in md
    assert "| luspo | 2 (+1 failed) | **0.450 ± 0.635** | 28.5 ± 19.1 | **0.500 ± 0.000** | 31.5 ± 19.1 |" in md
    assert "| grpo | 0 (+1 failed) |" in md and "pass@4" not in md
    assert "`4_dense_luspo_standard_seed2` (luspo, dense, seed 2): RuntimeError: loss is NaN at RL step 3" in md
    assert f"`5_dense_grpo_standard_seed0` (grpo, dense, seed 0): {runs.NO_RESULTS}" in md
    rows = (FIXTURE / "expected" / "leaderboard.csv").read_text().splitlines()
    assert rows[2] == "dense,gspo,2,0,0.300,0.635,19.0,12.7,0.350,0.635,21.0,12.7,"
    assert rows[3].endswith(",arith/avg@4;train/accuracy")
    # LUSPO's ~1.5x longer responses than GSPO's, beside ours: 31.5 / 21.0 = 1.50
    assert "| 1.50x | dense train/response_length/mean: 1.50x |" in (FIXTURE / "expected" / "reference.md").read_text()


def test_rerun_writes_identical_files_plots_included(tmp_path):
    for out in ("a", "b"):
        report.report(_cfg(FIXTURE / "raw", tmp_path / out, "reference=true"))
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert [str(f) for f in files if f.suffix == ".png"] == [
        "plots/dense_accuracy.png", "plots/dense_clipfrac_by_length.png", "plots/dense_response_length.png"]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "plots" / "dense_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_raw_export_round_trip_gives_the_same_tables(tmp_path):
    """raw_out copies what the report reads; reporting the copy writes the same tables (how a study is committed)."""
    report.report(_cfg(FIXTURE / "raw", tmp_path / "a", f"raw_out='{tmp_path / 'raw'}'", "plot=false"))
    assert (tmp_path / "raw" / "5_dense_grpo_standard_seed0" / ".hydra" / "config.yaml").exists()
    assert not (tmp_path / "raw" / "0_dense_gspo_standard_seed0" / ".hydra").exists()
    report.report(_cfg(tmp_path / "raw", tmp_path / "b", "plot=false"))
    for name in ("leaderboard.md", "leaderboard.csv"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()


def test_mean_ci_and_fixed_formats():
    assert report.mean_ci([0.25, 0.35]) == (pytest.approx(0.3), pytest.approx(12.706 * 0.05))
    assert report.mean_ci([1.0, 2.0, 3.0])[1] == pytest.approx(4.303 / 3 ** 0.5)
    assert report.mean_ci([0.7]) == (0.7, None)
    assert report.mean_ci([1.0] * 40)[1] == 0.0  # beyond the table: the normal quantile
    assert (report.fmt(-0.0001), report.fmt(0.12345), report.fmt(31.25, big=True)) == ("0.000", "0.123", "31.2")


def test_history_from_the_csv_log():
    h = runs.read_history(FIXTURE / "raw" / "2_dense_luspo_standard_seed0")
    assert h["train/response_length/mean"] == {0: 19.5, 1: 23.0, 2: 26.5, 3: 30.0}
    assert h["eval/arith/avg@4"] == {0: 0.2, 4: 0.4}  # empty cells of other rows are skipped
    assert "epoch" not in h and "step" not in h


def _run(seed, lr=1e-4, name="gspo", **kw):
    config = {"algorithm": {"name": name}, "rollout": {"name": "standard"}, "model": {"family": "dense"},
              "optim": {"lr": lr}, "seed": seed, "paths": {"output_dir": f"/x/{seed}"}}
    return runs.Run(f"{name}-{seed}-{lr}", name, "dense", seed, config, eval={"a": {"avg@1": 0.5}}, **kw)


def test_a_row_averages_seeds_of_one_setting_only():
    report.build_tables([_run(0), _run(1)], ["avg@*"], [])  # differ in seed and paths only: fine
    with pytest.raises(ValueError, match=r"differ in optim.lr \(0.0001 vs 0.001\)"):
        report.build_tables([_run(0), _run(1, lr=1e-3)], ["avg@*"], [])
    with pytest.raises(ValueError, match="both have seed 0"):
        report.build_tables([_run(0), _run(0, lr=1e-3)], ["avg@*"], [])


def test_one_section_per_model_best_within_it():
    moe = runs.Run("m", "gspo", "moe", 0, {}, eval={"a": {"avg@1": 0.9}})
    md, _ = report.render(report.build_tables([_run(0), moe], ["avg@*"], []), [], [])
    assert md.index("## dense") < md.index("## moe")
    assert "| gspo | 1 | **0.500** |" in md and "| gspo | 1 | **0.900** |" in md  # one seed: the mean alone


def test_seed_band_and_smoothing_by_hand():
    steps, mean, lo, hi = plots.seed_band([{0: 1.0, 1: 3.0}, {0: 3.0}])
    assert (steps, mean, lo, hi) == ([0, 1], [2.0, 3.0], [1.0, 3.0], [3.0, 3.0])
    assert plots.smooth([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert plots.panels_of(["train/pg_clipfrac/len_q*", "train/x"], {"train/pg_clipfrac/len_q2", "train/x",
                                                                    "train/pg_clipfrac/len_q1"}) == [
        "train/pg_clipfrac/len_q1", "train/pg_clipfrac/len_q2", "train/x"]
    assert plots.slug("dense: Qwen2.5-7B") == "dense_Qwen2.5-7B"


def test_reference_file_entries_are_complete_and_checked(tmp_path):
    entries = reference.load_reference(ROOT / "results" / "reference.yaml")
    assert {e["arxiv"] for e in entries} == {"2602.05261", "2503.14476", "2503.20783"}
    assert sorted(e["reported"] for e in entries) == [1.5, 2.9, 5.1, 6.0, 6.9, 30, 43.3, 50, 80.0]
    bad = tmp_path / "ref.yaml"
    bad.write_text("references:\n  - {paper: X, arxiv: '1', table: t, model: m, setting: s, kind: delta,"
                   " algorithm: a, column: c, reported: 1}\n")
    with pytest.raises(ValueError, match="kind=delta needs a baseline"):
        reference.load_reference(bad)
    bad.write_text("references:\n  - {paper: X, kind: value}\n")
    with pytest.raises(ValueError, match="missing arxiv, table"):
        reference.load_reference(bad)


def test_wandb_source_fails_in_one_clear_line_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(ValueError, match="WANDB_MODE=offline.*source=local"):
        runs.load_wandb("me/seqrl")
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(ValueError, match="wandb.path=None"):
        runs.load_wandb(None)
    import wandb

    def no_network(*a, **k):
        raise ConnectionError("Max retries exceeded\nwith url: https://api.wandb.ai/graphql")

    monkeypatch.setattr(wandb, "Api", no_network)
    with pytest.raises(ValueError, match=r"cannot read the runs of 'me/seqrl'.*ConnectionError: Max retries exceeded "
                                         r"with url") as exc:
        runs.load_wandb("me/seqrl")
    assert "\n" not in str(exc.value)


def test_a_wandb_run_is_read_like_a_run_directory():
    """What the public API returns (config, summary, history keyed by Lightning's trainer/global_step) -> Run."""
    class FakeRun:
        path, name, state = ["me", "seqrl", "abc"], "luspo", "finished"
        config = {"seed": 1, "model": {"family": "moe", "name_or_path": None}, "_wandb": {"x": 1}}
        summary = {"eval/arith/avg@4": 0.5, "eval/arith/response_length/mean": 30.0, "train/accuracy": 0.25,
                   "_step": 9, "train/samples": {"_type": "table"}}

        def scan_history(self):
            return [{"trainer/global_step": 0, "train/accuracy": 0.125, "_step": 0},
                    {"trainer/global_step": 1, "train/accuracy": 0.25, "_step": 1}]

    r = runs._wandb_run(FakeRun())
    assert (r.rel, r.run_name, r.model, r.seed, r.failed) == ("me/seqrl/abc", "luspo", "moe", 1, False)
    assert r.eval == {"arith": {"avg@4": 0.5, "response_length/mean": 30.0}} and r.train == {"train/accuracy": 0.25}
    assert r.history == {"train/accuracy": {0: 0.125, 1: 0.25}} and "_wandb" not in r.config
    FakeRun.state = "crashed"
    assert runs._wandb_run(FakeRun()).error == "W&B run state: crashed"


def test_cli_writes_the_committed_tables_and_rejects_bad_input(tmp_path):
    exe = Path(sys.executable).with_name("seqrl-report")
    ok = subprocess.run([str(exe), f"dirs=[{FIXTURE / 'raw'}]", f"out={tmp_path}", "reference=true", "plot=false"],
                        capture_output=True, text=True, cwd=tmp_path, timeout=120)  # cwd: reference found from root
    assert ok.returncode == 0, ok.stderr
    assert "| luspo | 2 (+1 failed) |" in ok.stdout
    for name in TABLES:
        assert (tmp_path / name).read_text() == (FIXTURE / "expected" / name).read_text()
    for args, needle in ([["source=nope"], "source='nope': allowed: local, wandb"], [["dirz=[x]"], "dirz"],
                         [[f"dirs=[{tmp_path / 'none'}]"], "is not a directory"], [["smooth=0"], "smooth=0"]):
        bad = subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and needle in bad.stderr, bad.stderr


def test_error_json_of_a_failed_sweep_job_is_listed(tmp_path):
    """The error.json layout proposed for seqrl.train._task (MULTIRUN): error + config."""
    shutil.copytree(FIXTURE / "raw" / "0_dense_gspo_standard_seed0", tmp_path / "ok")
    (tmp_path / "bad").mkdir()
    config = json.loads((tmp_path / "ok" / "results.json").read_text())["config"]
    config["rollout"]["name"] = "eqlen"
    (tmp_path / "bad" / "error.json").write_text(json.dumps({"error": "ValueError: bad\n  second line",
                                                             "config": config}))
    md, _ = report.render(report.build_tables(runs.load_local([str(tmp_path)]), ["avg@*"], []), [], [])
    assert "| gspo+eqlen | 0 (+1 failed) |" in md
    assert "- `bad` (gspo+eqlen, dense, seed 0): ValueError: bad second line" in md
