"""The oracle through the full harness (encode -> generate -> decode -> grade -> metrics): 100.0 on every local
benchmark of the math and vision suites, MathVista skipped in one line, and every miss reported as a grader bug."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from conftest import compose
from seqrl.config import validate
from seqrl.eval.harness import build_eval_sets, evaluate_rollout, generate_for_eval
from seqrl.evaluate import evaluate, load_policy


def run_eval(tmp_path, capsys, *overrides):
    """seqrl-eval in-process (logger=csv keeps it quick); returns (results dict, printed lines)."""
    cfg = compose("eval", ["model=oracle", "logger=csv", "eval.n_samples=1", f"paths.output_dir={tmp_path}",
                           *overrides])
    summary = evaluate(cfg)
    return summary, capsys.readouterr().out.splitlines()


def table_rows(lines: list[str]) -> dict[str, list[str]]:
    header = next(line for line in lines if line.startswith("| benchmark"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    rows = [line for line in lines if line.startswith("| ") and not line.startswith(("| benchmark", "|---"))]
    return {r.strip("|").split("|")[0].strip(): dict(zip(cols, (c.strip() for c in r.strip("|").split("|"))))
            for r in rows}


def test_oracle_math_suite_prints_100_everywhere(tmp_path, capsys):
    summary, lines = run_eval(tmp_path, capsys, "eval=math", "eval.n_samples=2")
    rows = table_rows(lines)
    assert list(rows) == ["aime24", "aime25", "math500", "amc23"]
    for name, row in rows.items():
        assert row["avg@2"] == row["pass@1"] == row["maj@2"] == "100.0", (name, row)
    assert {name: m["n_items"] for name, m in summary["eval"].items()} == {
        "aime24": 30, "aime25": 30, "math500": 500, "amc23": 40}
    assert "seqrl-eval: oracle check: 0 miss(es)" in lines and not any("grader bug" in line for line in lines)
    assert (tmp_path / "samples" / "math500.jsonl").read_text().count('"correct": true') == 1000


def test_oracle_vision_suite_skips_mathvista_in_one_line(tmp_path, capsys):
    summary, lines = run_eval(tmp_path, capsys, "eval=vision", "eval.limit=40")
    skip = [line for line in lines if "mathvista" in line]
    assert len(skip) == 1 and skip[0].startswith("seqrl-eval: skipping mathvista: images missing")
    rows = table_rows(lines)
    assert list(rows) == ["mathvision", "wemath", "logicvista"]
    assert all(row["avg@1"] == "100.0" for row in rows.values()), rows
    assert list(summary["skipped"]) == ["mathvista"]
    assert "seqrl-eval: oracle check: 0 miss(es)" in lines


def test_oracle_mathvista_text_only_when_asked(tmp_path, capsys):
    """Text-only MathVista repeats question texts with different answers (one per image): the oracle cannot tell
    those apart and says so; every other item is right."""
    from collections import defaultdict

    summary, lines = run_eval(tmp_path, capsys, "eval=vision", "eval.benchmarks.mathvista.require_images=false",
                              "eval.limit=200", "~eval.benchmarks.wemath", "~eval.benchmarks.logicvista",
                              "~eval.benchmarks.mathvision")
    answers = defaultdict(set)
    records = [json.loads(line) for line in (tmp_path / "samples" / "mathvista.jsonl").read_text().splitlines()]
    for r in records:
        answers[r["prompt"]].add(r["gold"])
    unique = [len(answers[r["prompt"]]) == 1 for r in records]
    assert [r["correct"] for r in records] == unique and 150 < sum(unique) < 200
    assert summary["eval"]["mathvista"]["avg@1"] == pytest.approx(sum(unique) / 200)
    misses = [line for line in lines if "mathvista item" in line]
    assert len(misses) == 200 - sum(unique) and all(line.startswith("not unique:") for line in misses)
    assert not summary["skipped"] and all(r["n_images"] == 0 for r in records)


@pytest.mark.slow
def test_oracle_full_vision_suite_and_wemath_four_dimensions(tmp_path, capsys):
    summary, lines = run_eval(tmp_path, capsys, "eval=vision")
    wemath = summary["eval"]["wemath"]
    assert wemath["n_items"] == 1740 and wemath["avg@1"] == 1.0
    assert wemath["four_dim/n_composites"] == 525 and wemath["four_dim/score_strict"] == 1.0
    assert wemath["four_dim/IK"] == wemath["four_dim/IG"] == wemath["four_dim/RM"] == 0.0
    assert summary["eval"]["mathvision"]["n_items"] == 304 and summary["eval"]["logicvista"]["n_items"] == 447
    assert all(row["avg@1"] == "100.0" for row in table_rows(lines).values())


def oracle_family():
    from seqrl.models import get_family

    return get_family("oracle")


def _oracle_and_sets(*overrides):
    c = validate(compose("eval", ["model=oracle", "eval.n_samples=1", *overrides]))
    return c, load_policy(c), build_eval_sets(c.eval, c.data, c.paths.data_dir, skipped={})


def test_oracle_sees_images_a_harness_that_drops_them_scores_zero():
    c, oracle, sets = _oracle_and_sets("eval=vision", "eval.limit=6")
    es = next(s for s in sets if s.name == "logicvista")
    good = evaluate_rollout(es, [generate_for_eval(oracle, es.samples, c.eval)], c.eval)
    assert good["metrics"]["avg@1"] == 1.0 and {r["n_images"] for r in good["records"]} == {1}
    blind = [replace(s, meta={k: v for k, v in s.meta.items() if k != "image_paths"}) for s in es.samples]
    bad = evaluate_rollout(es, [generate_for_eval(oracle, blind, c.eval)], c.eval)
    assert bad["metrics"]["avg@1"] == 0.0
    assert {r["completion"] for r in bad["records"]} == {"I do not know."}
    assert oracle_family().explain_miss(bad["records"][0]).startswith("harness bug")


def test_a_wrong_gold_is_printed_as_a_grader_bug(capsys):
    from seqrl.evaluate import _print_misses

    c, oracle, sets = _oracle_and_sets("eval=math", "eval.limit=3")
    es = sets[0]
    rolls = [generate_for_eval(oracle, es.samples, c.eval)]
    rolls[0].samples[1] = replace(rolls[0].samples[1], answer="-1")  # the grader now disagrees with the oracle
    result = evaluate_rollout(es, rolls, c.eval)
    assert [r["correct"] for r in result["records"]] == [True, False, True]
    _print_misses({es.name: result}, type(oracle_family()).explain_miss)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("grader bug: aime24 item 1: gold='-1' (math) extracted='113'")
    assert out[-1] == "seqrl-eval: oracle check: 1 miss(es) (listed above)"


def test_oracle_cannot_be_trained(capsys):
    from seqrl.cli import precheck

    with pytest.raises(SystemExit):
        precheck("train", ["model=oracle"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.family='oracle'" in err and "seqrl-eval" in err, err
