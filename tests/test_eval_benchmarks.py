"""Benchmarks as config: every benchmark and suite composes, loads the real local copy with the right gold mapping
and verifier options, falls back to the hub copy's field names, and bad configs fail in one line."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from conftest import compose
from seqrl.cli import group_options
from seqrl.config import validate
from seqrl.eval.benchmarks import BenchmarkSkipped, format_options, load_benchmark, resolve_benchmark, wemath_metrics
from seqrl.eval.grading import grade
from seqrl.eval.harness import build_eval_sets, results_table

SUITES = {"math": ["aime24", "aime25", "math500", "amc23"],
          "vision": ["mathvista", "mathvision", "wemath", "logicvista"], "smoke": []}
ITEMS = {"aime24": 30, "aime25": 30, "math500": 500, "amc23": 40, "gsm8k": 1319, "mathvision": 304,
         "wemath": 1740, "logicvista": 447}  # LogicVista v1_382 has no answer


def bench(name: str, *overrides: str):
    """The validated config of one benchmark (added to the smoke suite under its own name) and its data_dir."""
    model = ["model=tiny_vl"] if name in SUITES["vision"] + ["image_count"] else []
    c = validate(compose("eval", [*model, f"+benchmark@eval.benchmarks.{name}={name}", *overrides]))
    return c.eval.benchmarks[name], c.paths.data_dir


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_suites_compose_with_their_benchmarks(suite):
    model = ["model=tiny_vl"] if suite == "vision" else []
    c = validate(compose("eval", [f"eval={suite}", *model]))
    assert list(c.eval.benchmarks) == SUITES[suite]
    assert c.eval.heldout is (suite == "smoke")
    assert c.eval.n_samples >= 1 and 0 < c.eval.top_p <= 1 and c.eval.max_new_tokens >= 1
    for name, b in c.eval.benchmarks.items():
        assert b.name == name and (b.modality == "image") is (suite == "vision")


def test_every_benchmark_option_has_a_config_and_a_gold_map():
    names = group_options("benchmark")
    assert set(ITEMS) | {"mathvista", "arith", "image_count"} == set(names)
    for name in ITEMS:
        assert bench(name)[0].gold_map == name


@pytest.mark.parametrize("name", list(ITEMS))
def test_local_copies_load_with_gold_kind_and_options(name):
    cfg, data_dir = bench(name)
    samples = load_benchmark(cfg, data_dir)
    assert len(samples) == ITEMS[name]
    assert all(s.answer and "{prompt}" not in s.prompt and "boxed" in s.prompt for s in samples)
    kinds = {s.kind for s in samples}
    expected = {"gsm8k": {"number"}, "mathvision": {"choice", "math"}, "wemath": {"choice"},
                "logicvista": {"multi_choice", "int"}}.get(name, {"math"})
    assert kinds == expected, kinds
    if cfg.modality == "image":
        assert all(len(s.meta["image_paths"]) == 1 for s in samples)
    if name == "wemath":  # option texts parsed from "A. 3 cm;B. 4 cm;..." (11 items are written irregularly)
        assert sum(bool(s.meta["grade_kw"].get("choices")) for s in samples) == 1740 - 11
    assert all(grade(f"\\boxed{{{s.answer}}}", s.answer, s.kind, **s.meta["grade_kw"]) for s in samples[:50])


def test_gold_mappings_on_real_records():
    aime24 = load_benchmark(*bench("aime24"))
    assert aime24[0].answer == "204" and aime24[0].meta["grade_kw"] == {"timeout_s": 2.0}
    assert load_benchmark(*bench("amc23"))[0].answer == "27"  # stored as the float 27.0
    assert load_benchmark(*bench("gsm8k"), limit=1)[0].answer == "18"  # after '####'
    mv = load_benchmark(*bench("mathvision"))
    letter = next(s for s in mv if s.meta["record"]["id"] == "6")
    assert (letter.answer, letter.kind) == ("D", "choice") and "\nOptions:\n(A)\n(B)" in letter.prompt
    lv = load_benchmark(*bench("logicvista"))
    assert lv[0].prompt.startswith("What choice (A, B, C, or D)") and lv[0].answer == "C"
    assert lv[0].meta["image_paths"][0].endswith("logicvista/images/v1_0.png")


def test_mathvista_without_images_is_skipped_in_one_line_or_run_text_only():
    cfg, data_dir = bench("mathvista")
    with pytest.raises(BenchmarkSkipped) as exc:
        load_benchmark(cfg, data_dir)
    msg = str(exc.value)
    assert "\n" not in msg and "images missing for 1000 of 1000" in msg and "require_images=false" in msg
    c = validate(compose("eval", ["+benchmark@eval.benchmarks.mathvista=mathvista",  # text model is fine now
                                  "eval.benchmarks.mathvista.require_images=false"]))
    samples = load_benchmark(c.eval.benchmarks["mathvista"], c.paths.data_dir)
    assert len(samples) == 1000 and all(s.images is None and "image_paths" not in s.meta for s in samples)
    first = {s.meta["record"]["pid"]: s for s in samples}
    assert (first["1"].answer, first["1"].kind, first["1"].meta["grade_kw"]) == (
        "1.2", "number", {"timeout_s": 2.0, "precision": 1})
    assert first["5"].answer == "A" and "\nOptions:\n(A) 97\n(B) 102\n(C) 107\n(D) 122\n" in first["5"].prompt
    assert {s.kind for s in samples} == {"choice", "int", "number", "math"}


def test_missing_local_copy_falls_back_to_the_hub_field_names(tmp_path):
    cfg, _ = bench("aime25")
    hub = resolve_benchmark(cfg, str(tmp_path))
    assert (hub.source, hub.path, hub.hf_id, hub.split) == ("hf", None, "math-ai/aime25", "test")
    assert hub.fields == {"prompt": "problem", "answer": "answer"}  # the local copy calls it "question"
    local = resolve_benchmark(cfg, bench("aime25")[1])
    assert (local.source, local.fields["prompt"]) == ("local", "question")
    mv = resolve_benchmark(bench("mathvista")[0], str(tmp_path))
    assert (mv.image_field, mv.modality) == ("decoded_image", "image")
    with pytest.raises(ValueError, match="eval.benchmarks.aime25: cannot read math-ai/aime25 .*put a local copy"):
        load_benchmark(cfg, str(tmp_path))  # the tests run offline: the hub copy cannot be fetched


def test_format_options():
    assert format_options(None) == "" and format_options([]) == ""
    assert format_options(["3 cm", "B"]) == "\nOptions:\n(A) 3 cm\n(B)"


BAD = [
    (["eval=vision"], "mathvista.modality", "model.family=vl"),
    (["eval=math", "eval.benchmarks.aime24.gold_map=aime26"], "eval.benchmarks.aime24.gold_map='aime26'", "allowed"),
    (["eval=vision", "model=tiny_vl", "eval.benchmarks.wemath.metrics=[f1]"], "eval.benchmarks.wemath.metrics",
     "wemath_four_dim"),
    (["eval=math", "eval.benchmarks.aime24.ks=[0]"], "eval.benchmarks.aime24.ks", ">= 1"),
    (["eval.top_p=0"], "eval.top_p", "(0, 1]"),
    (["eval.limit=0"], "eval.limit", ">= 1"),
    (["eval.max_new_tokens=0"], "eval.max_new_tokens", ">= 1"),
]


@pytest.mark.parametrize("overrides,key,allowed", BAD)
def test_bad_eval_config_is_one_line(overrides, key, allowed, capsys):
    from seqrl.cli import precheck

    with pytest.raises(SystemExit) as exc:
        precheck("eval", overrides)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1, err
    assert key in err and allowed in err, err


def test_build_eval_sets_skips_and_names():
    c = validate(compose("eval", ["eval=vision", "model=tiny_vl", "eval.limit=3"]))
    skipped = {}
    sets = build_eval_sets(c.eval, c.data, c.paths.data_dir, skipped=skipped)
    assert [es.name for es in sets] == ["mathvision", "wemath", "logicvista"] and list(skipped) == ["mathvista"]
    assert all(len(es.samples) == 3 for es in sets) and sets[1].metrics == ["wemath_four_dim"]
    c = validate(compose("eval", ["+benchmark@eval.benchmarks.arith=arith"]))  # clashes with data=arith held out
    with pytest.raises(ValueError, match="eval.benchmarks.arith: same name as the held-out split"):
        build_eval_sets(c.eval, c.data, c.paths.data_dir)


def _wemath_samples(composites):
    """Fake We-Math samples: (ID, steps, include multi?, n subs present)."""
    from seqrl.data import Sample

    out = []
    for gid, steps, n_sub, multi in composites:
        keys = [f"{steps}steps_{i + 1}" for i in range(n_sub)] + ([f"{steps}steps_multi"] if multi else [])
        out += [Sample("q", "A", "choice", meta={"record": {"ID": gid, "key": k}}) for k in keys]
    return out


def test_wemath_metrics_use_complete_composites_and_average_columns():
    samples = _wemath_samples([("a", 2, 2, True), ("b", 3, 3, True), ("c", 2, 1, True), ("d", 2, 2, False)])
    correct = np.zeros((len(samples), 2), dtype=bool)
    correct[0:3, 0] = True  # column 0: composite a fully right (CM); b all wrong (IK)
    correct[0:2, 1] = True  # column 1: a's subs right, multi wrong (IG); b IK
    out = wemath_metrics(samples, correct)
    assert out["four_dim/n_composites"] == 2  # c and d are incomplete
    assert out["four_dim/CM"] == pytest.approx(0.25) and out["four_dim/IG"] == pytest.approx(0.25)
    assert out["four_dim/IK"] == pytest.approx(0.5)
    assert out["four_dim/score_strict"] == pytest.approx(np.mean([(2 - 1) / 2, (2 - 0.5 - 1) / 2]))
    assert wemath_metrics(_wemath_samples([("c", 2, 1, True)]), np.ones((2, 1), bool)) == {}


def test_results_table_prints_percentages():
    table = results_table({"aime24": {"metrics": {"avg@4": 1.0, "pass@4": 0.5, "ci_low": 0.25, "n_items": 30.0,
                                                  "response_length/mean": 48.25, "four_dim/n_IK": 3.0,
                                                  "four_dim/score_strict": 0.875}}})
    header, _, row = table.splitlines()
    assert header.split(" | ")[1:3] == ["avg@4", "pass@4"] and "four_dim/n_IK" not in header
    assert row == "| aime24 | 100.0 | 50.0 | 25.0 | 87.5 | 30 | 48.2 |"


EQUIVALENT = [  # (response, gold, kind, options): graded correct by the shared verifier
    ("\\boxed{0.5}", "\\frac{1}{2}", "math", {}),
    ("\\boxed{1/2}", "\\frac{1}{2}", "math", {}),
    ("\\boxed{\\frac{1}{2}}", "0.5", "math", {}),
    ("\\boxed{\\dfrac12}", "1/2", "math", {}),
    ("\\boxed{50\\%}", "50", "number", {}),  # a percent sign is dropped (50% is graded as 50, not 0.5)
    ("\\boxed{30^\\circ}", "30", "math", {}),
    ("\\boxed{30^{\\circ}}", "30", "int", {}),
    ("\\boxed{12 \\text{ cm}}", "12", "int", {"unit": "cm"}),
    ("\\boxed{\\frac{\\pi}{6}}", "\\frac{\\pi}{6}", "math", {}),
]
NOT_EQUIVALENT = [("\\boxed{0.51}", "\\frac{1}{2}", "math", {}), ("\\boxed{1/3}", "0.5", "number", {}),
                  ("\\boxed{31^\\circ}", "30", "math", {})]


@pytest.mark.parametrize("text,gold,kind,kw", EQUIVALENT)
def test_equivalent_forms_grade_correct(text, gold, kind, kw):
    assert grade(text, gold, kind, **kw)


@pytest.mark.parametrize("text,gold,kind,kw", NOT_EQUIVALENT)
def test_near_misses_grade_wrong(text, gold, kind, kw):
    assert not grade(text, gold, kind, **kw)


def test_generated_benchmarks_give_their_held_out_items():
    cfg, data_dir = bench("arith")
    samples = load_benchmark(cfg, data_dir, limit=5)
    assert len(samples) == 5 and all(s.kind == "int" and s.prompt.count("+") + s.prompt.count("-") >= 5
                                     for s in samples)
    img, _ = bench("image_count")
    assert all(len(s.images) == 1 for s in load_benchmark(img, data_dir, limit=2))
    assert load_benchmark(replace(cfg, verifier={"timeout_s": 1.0}), data_dir, limit=1)[0].meta["grade_kw"] == {
        "timeout_s": 1.0}
