"""seqrl-eval end to end with real (tiny, random-init) models: a text export on the math suite with W&B offline
and provenance, and the tiny Qwen2.5-VL on real MathVision, We-Math and LogicVista images."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from conftest import compose
from seqrl.config import validate
from seqrl.eval.harness import build_eval_sets, generate_for_eval
from seqrl.evaluate import evaluate
from seqrl.loggers import read_offline_history


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine spinning OpenMP threads make
    each step 10-100x slower; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    """An HF-format export of a random-init tiny dense model (as seqrl-train writes into <run>/hf)."""
    from seqrl.models import build_policy

    out = tmp_path_factory.mktemp("export") / "hf"
    torch.manual_seed(0)
    build_policy(validate(compose("eval")).model).save(str(out))
    return out


def test_seqrl_eval_on_an_export_writes_results_and_wandb(tiny_export, tmp_path, capsys):
    cfg = compose("eval", [f"checkpoint={tiny_export}", "eval=math", "eval.limit=2", "eval.n_samples=2",
                           "eval.max_new_tokens=8", "eval.temperature=1.0", f"paths.output_dir={tmp_path}"])
    summary = evaluate(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["checkpoint"] == str(tiny_export) and saved["seed"] == 0
    assert saved["versions"]["torch"] == torch.__version__ and "git_commit" in saved and saved["machine"]["cpus"]
    assert saved["config"]["eval"]["name"] == "math" and list(saved["eval"]) == ["aime24", "aime25", "math500", "amc23"]
    for name, m in saved["eval"].items():
        assert m["n_items"] == 2 and 0.0 <= m["avg@2"] <= 1.0 and 0 < m["response_length/mean"] <= 8, (name, m)
    assert saved["eval"] == summary["eval"]
    rows = [json.loads(x) for x in (tmp_path / "samples" / "aime25.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["gold"] for r in rows} == {"70", "588"} and all(r["length"] <= 8 for r in rows)
    assert "| aime24 |" in (tmp_path / "results.md").read_text()
    run_file = next((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    for _ in range(50):  # wandb-core may still be flushing the file for a moment after run.finish()
        history = {k: v for row in read_offline_history(run_file) for k, v in row.items()}
        if all(f"eval/{name}/avg@2" in history for name in saved["eval"]):
            break
        time.sleep(0.2)
    for name, m in saved["eval"].items():
        assert history[f"eval/{name}/avg@2"] == pytest.approx(m["avg@2"])
        assert history[f"eval/{name}/n_items"] == 2
    assert "seqrl-eval: oracle check" not in capsys.readouterr().out  # only the oracle reports misses


def test_seqrl_eval_cli_rejects_a_vision_suite_for_a_text_model(tiny_export, tmp_path):
    """The console script itself: a vision suite with a text-only model fails in one line, before any model loads."""
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("seqrl-eval")
    bad = subprocess.run([str(exe), f"checkpoint={tiny_export}", "eval=vision"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "mathvista.modality='image'" in bad.stderr and "model.family=vl" in bad.stderr


def test_tiny_vl_evaluates_real_benchmark_images(tmp_path):
    overrides = ["model=tiny_vl", "eval=vision", "eval.limit=4", "eval.n_samples=1", "eval.max_new_tokens=6",
                 "eval.temperature=0", "logger=csv", f"paths.output_dir={tmp_path}"]
    c = validate(compose("eval", overrides))
    sets = build_eval_sets(c.eval, c.data, c.paths.data_dir, skipped={})
    from seqrl.models import build_policy

    torch.manual_seed(0)
    policy = build_policy(c.model)
    for es in sets:
        roll = generate_for_eval(policy, es.samples, c.eval)
        grid = roll.mm["image_grid_thw"]  # (images, 3): one real image per item, resized to <= 112x112
        assert grid.shape == (4, 3) and bool((grid.prod(-1) <= 64).all()) and bool((grid.prod(-1) >= 16).all())
        image_pad = policy.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert int((roll.input_ids == image_pad).sum()) == int(grid.prod(-1).sum()) // 4  # 2x2 merge
    summary = evaluate(compose("eval", overrides))
    assert list(summary["eval"]) == ["mathvision", "wemath", "logicvista"] and list(summary["skipped"]) == ["mathvista"]
    for name in summary["eval"]:
        rows = [json.loads(x) for x in (tmp_path / "samples" / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == 4 and all(r["n_images"] == 1 and r["length"] <= 6 for r in rows), name
