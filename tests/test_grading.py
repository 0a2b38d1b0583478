"""Answer extraction and verification: real-benchmark oracles, hand cases, adversarial inputs, parallel grading."""

import json
import re
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import DATA_DIR
from seqrl.eval import grading
from seqrl.eval.grading import extract_answer, format_reward, grade, grade_many, verify
from seqrl.eval.benchmarks import benchmark_gold

BENCH = DATA_DIR
SPLITS = {  # split name -> (benchmark, local file, records)
    "aime24": ("aime24", "aime24/test.jsonl", 30),
    "aime25": ("aime25", "aime25/aime25.jsonl", 30),
    "math500": ("math500", "math500/test.jsonl", 500),
    "amc23": ("amc23", "amc23/test.jsonl", 40),
    "gsm8k": ("gsm8k", "gsm8k/test.jsonl", 1319),
    "mathvision": ("mathvision", "mathvision/testmini.jsonl", 304),
    "mathvision_test": ("mathvision", "mathvision/test.jsonl", 3040),
    "mathvista": ("mathvista", "mathvista_testmini/testmini.json", 1000),
    "wemath": ("wemath", "wemath/testmini.json", 1740),
    "logicvista": ("logicvista", "logicvista/dataset.json", 448),
}


def load(split: str) -> list[dict]:
    path = BENCH / SPLITS[split][1]
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    data = json.loads(path.read_text())
    return list(data.values()) if isinstance(data, dict) else data


def golds(split: str) -> list[tuple[str, str, dict]]:
    specs = (benchmark_gold(SPLITS[split][0], record) for record in load(split))
    return [spec for spec in specs if spec is not None]


def wrong_answer(gold: str, kind: str, kw: dict) -> str:
    """A clearly wrong answer of the same shape as `gold`."""
    if kind == "choice":
        n = len(kw.get("choices") or "ABCDE")
        return "ABCDEFGH"[("ABCDEFGH".index(gold) + 1) % max(n, 2)]
    if kind == "multi_choice":
        letters = sorted(set(re.findall(r"[A-Z]", gold)))
        return letters[0] if len(letters) > 1 else chr(ord(letters[0]) + 1)
    value = grading._as_fraction(gold)
    return str(value + 1) if value is not None else "-98765.4321"


@pytest.mark.parametrize("split", list(SPLITS))
def test_oracle_gold_answers_grade_correct(split):
    """Every gold, written as a model would, grades True; a shifted answer grades False."""
    assert len(load(split)) == SPLITS[split][2]
    specs = golds(split)
    assert len(specs) == SPLITS[split][2] - (split == "logicvista")  # LogicVista v1_382 has an empty answer
    failures = []
    for gold, kind, kw in specs:
        texts = [f"Let me think.\nThe answer is \\boxed{{{gold}}}."]
        if kind == "choice":
            texts += [gold, f"Answer: ({gold})"]
        failures += [(text, gold, kind, kw) for text in texts if not grade(text, gold, kind, **kw)]
    for failure in failures:
        print("grader bug:", failure)
    assert not failures
    sample = specs[:: max(1, len(specs) // 60)]
    wrong = [(gold, kind, kw) for gold, kind, kw in sample
             if grade(f"The answer is \\boxed{{{wrong_answer(gold, kind, kw)}}}", gold, kind, **kw)]
    assert not wrong, wrong


def test_math_verify_itself_accepts_every_math_gold():
    """Bypassing the string/number fast paths, math-verify (under our deadline) equates each gold with itself."""
    math_golds = [g for split in ("math500", "mathvision", "aime24") for g, kind, _ in golds(split) if kind == "math"]
    assert len(math_golds) > 600
    bad = [g for g in math_golds if not grading._math_equal_here(g, g, 2.0)]
    assert not bad, bad


def test_benchmark_gold_mappings():
    mathvista = {r["pid"]: r for r in load("mathvista")}
    assert benchmark_gold("mathvista", mathvista["1"]) == ("1.2", "number", {"precision": 1})
    gold, kind, kw = benchmark_gold("mathvista", next(r for r in mathvista.values() if r["answer"] == "145°"))
    assert (gold, kind) == ("C", "choice") and kw["choices"][2] == "145°"
    assert benchmark_gold("gsm8k", {"answer": "so 1,080\n#### 1,080"}) == ("1080", "number", {})
    assert benchmark_gold("amc23", {"answer": 27.0}) == ("27", "math", {})
    assert benchmark_gold("mathvision", {"answer": "8\\sqrt{3}{squareinches}", "options": []})[0] == "8\\sqrt{3}"
    assert benchmark_gold("mathvision", {"answer": "\\frac{3}{4}\\pi{inches}", "options": []})[0] == "\\frac{3}{4}\\pi"
    assert benchmark_gold("logicvista", {"answer": "B, D"}) == ("B, D", "multi_choice", {})
    assert benchmark_gold("logicvista", {"answer": ""}) is None
    assert benchmark_gold("wemath", load("wemath")[0])[2]["choices"][2] == "3000, 4000"
    with pytest.raises(ValueError, match="unknown benchmark 'mmlu'"):
        benchmark_gold("mmlu", {})


HAND = [
    ("The answer is \\boxed{025}", "25", "math", {}, True),  # leading zeros (AIME)
    ("\\boxed{25}", "025", "math", {}, True),
    ("\\boxed{0.75}", "\\frac{3}{4}", "math", {}, True),  # fraction vs decimal
    ("\\boxed{\\dfrac{3}{4}}", "0.75", "math", {}, True),
    ("\\boxed{\\frac{6}{8}}", "\\frac34", "math", {}, True),
    ("\\boxed{3}, then corrected: \\boxed{4}", "4", "math", {}, True),  # last boxed wins
    ("\\boxed{3}, then corrected: \\boxed{4}", "3", "math", {}, False),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", "math", {}, True),  # nested braces
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", "math", {}, True),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}", "math", {}, True),
    ("\\boxed{C}", "\\text{(C)}", "math", {}, True),
    ("\\boxed{90^\\circ}", "90", "math", {}, True),  # degrees
    ("\\boxed{50\\%}", "50", "math", {}, True),  # percent
    ("\\boxed{x = 5}", "5", "math", {}, True),
    ("\\boxed{-2, 1}", "1,-2", "math", {}, True),
    ("\\boxed{6+9i}", "6 + 9i", "math", {}, True),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", "math", {}, True),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{6}", "math", {}, False),
    ("Answer: $\\frac{14}{3}$.", "\\frac{14}{3}", "math", {}, True),
    ("no final answer here, maybe 7", "7", "math", {}, False),
    ("So the total is 1,080 dollars.", "1080", "int", {}, True),
    ("\\boxed{18.0}", "18", "int", {}, True),
    ("\\boxed{18.5}", "18", "int", {}, False),
    ("The answer is -3.", "-3", "int", {}, True),
    ("\\boxed{\\frac{1}{4}}", "0.25", "number", {}, True),
    ("\\boxed{1.2000001}", "1.2", "number", {}, True),  # relative tolerance 1e-6
    ("\\boxed{1.21}", "1.2", "number", {}, False),
    ("\\boxed{1.24}", "1.2", "number", {"precision": 1}, True),  # MathVista precision
    ("\\boxed{1.26}", "1.2", "number", {"precision": 1}, False),
    ("\\boxed{0.213}", "0.21", "number", {"precision": 2}, True),
    ("\\boxed{14 \\text{ years}}", "14", "int", {"unit": "years"}, True),
    ("\\boxed{C}", "C", "choice", {}, True),
    ("\\boxed{c}", "C", "choice", {}, True),
    ("The correct option is (B) because ...", "B", "choice", {}, True),
    ("answer is D: the largest one", "D", "choice", {}, True),
    ("\\boxed{145°}", "C", "choice", {"choices": ["135°", "140°", "145°", "150°"]}, True),
    ("\\boxed{Yes}", "B", "choice", {"choices": ["No", "Yes"]}, True),
    ("\\boxed{B}", "C", "choice", {}, False),
    ("\\boxed{A, C}", "A, C", "multi_choice", {}, True),
    ("\\boxed{CA}", "A, C", "multi_choice", {}, True),
    ("The answer is B and D.", "B, D", "multi_choice", {}, True),
    ("\\boxed{A}", "A, C", "multi_choice", {}, False),
    ("\\boxed{A, B, C}", "A, C", "multi_choice", {}, False),
]


@pytest.mark.parametrize("text,gold,kind,kw,expected", HAND)
def test_hand_cases(text, gold, kind, kw, expected):
    assert grade(text, gold, kind, **kw) is expected


@pytest.mark.parametrize("text,kind,choices,expected", [
    ("a \\boxed{1} b \\fbox{\\frac{1}{2}} c", "math", None, "\\frac{1}{2}"),
    ("\\boxed{\\{1, 2\\}}", "math", None, "\\{1, 2\\}"),
    ("\\boxed{a \\boxed{b} c}", "math", None, "b"),  # the last box to open
    ("\\boxed{1} and a broken \\boxed{2", "math", None, None),  # malformed final answer
    ("\\boxed{}", "int", None, None),
    ("The final answer is: $-\\frac{3}{4}$", "number", None, "-3/4"),
    ("costs $1,234.50 in total", "number", None, "1,234.50"),
    ("\\boxed{A and C}", "multi_choice", None, "AC"),
    ("\\boxed{\\text{(C)}}", "choice", None, "C"),
    ("\\boxed{3 cm}", "choice", ["1 cm", "3 cm"], "B"),
    ("C", "choice", None, "C"),
    ("I cannot decide.", "choice", None, None),
])
def test_extract_answer(text, kind, choices, expected):
    assert extract_answer(text, kind, choices=choices) == expected


ADVERSARIAL = {
    "tower": "The answer is $\\boxed{10^{10^{10^{10}}}}$",
    "tower_bare": "\\boxed{2^{2^{2^{2^{2^{2}}}}}}",
    "factorial": "\\boxed{(10^{10})!}",
    "sum": "\\boxed{\\sum_{n=1}^{10^{12}} n^{n}}",
    "deep_nesting": "\\boxed{" + "{" * 3000 + "1" + "}" * 3000 + "}",
    "unbalanced": "The answer is \\boxed{\\frac{1}{2}",
    "100k_chars": "\\boxed{" + "1+" * 50000 + "1}",
    "100k_unclosed_boxes": "\\boxed{" * 15000,
    "100k_noise": "x" * 100000 + " answer is " + "(" * 20000,
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_inputs_are_false_fast_and_never_raise(name):
    for kind in grading.ANSWER_KINDS:
        start = time.perf_counter()
        assert grade(ADVERSARIAL[name], "5", kind, timeout_s=0.5) is False
        assert time.perf_counter() - start < 1.5, (name, kind)


def test_garbage_never_raises():
    for junk in [None, 42, "", "\\boxed", "}}}{{{", "\\boxed{\\frac{1}{0}}", "\\boxed{\x00\ud800}"]:
        for kind in grading.ANSWER_KINDS:
            assert grade(junk, "1", kind) is False
            assert verify(junk, "1", kind) is False


def test_unknown_kind_is_a_value_error():
    with pytest.raises(ValueError, match="unknown answer kind 'latex'"):
        grade("\\boxed{1}", "1", "latex")


def test_math_outside_the_main_thread_uses_a_killable_helper():
    out = {}

    def worker():
        start = time.perf_counter()
        out["true"] = grade("\\boxed{\\frac{2}{4}}", "0.5", "math")  # needs math-verify, not a fast path
        out["false"] = grade("\\boxed{\\sqrt{2}}", "1.41", "math")
        out["tower"] = grade(ADVERSARIAL["tower_bare"], "5", "math", timeout_s=0.5)
        out["seconds"] = time.perf_counter() - start

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=90)
    assert out["true"] is True and out["false"] is False and out["tower"] is False
    assert out["seconds"] < 60  # includes spawning the helper (imports sympy)


def test_a_deadline_landing_in_a_finalizer_is_not_reported_and_still_stops_the_check():
    """The alarm can fire inside a __del__, where its exception cannot propagate: nothing reaches the process's
    unraisable hook, the repeating alarm stops the check in its own frames, and the hooks are restored."""
    class SlowFinalizer:
        def __del__(self):
            end = time.perf_counter() + 0.3
            while time.perf_counter() < end:
                pass

    def check():
        SlowFinalizer()  # dropped at once: the first alarm (after 0.05 s) lands in __del__
        while True:
            pass

    seen, outer = [], sys.unraisablehook
    sys.unraisablehook = seen.append
    try:
        start = time.perf_counter()
        assert grading._with_deadline(check, 0.05) is None
        assert time.perf_counter() - start < 2.0
        assert sys.unraisablehook == seen.append
    finally:
        sys.unraisablehook = outer
    assert seen == []


def test_helper_process_is_killed_when_it_overruns_and_respawned(monkeypatch):
    sidecar = grading._Sidecar()
    assert sidecar.check("\\frac{2}{4}", "0.5", 2.0) is True
    first_pid = sidecar.proc.pid
    monkeypatch.setattr(sidecar, "slack_s", -0.4)  # give up after 0.1 s, before the helper's own 0.5 s deadline
    assert sidecar.check(ADVERSARIAL["tower_bare"][7:-1], "5", 0.5) is False
    assert sidecar.proc is None  # killed
    monkeypatch.setattr(sidecar, "slack_s", 1.0)
    assert sidecar.check("\\frac{2}{4}", "0.5", 2.0) is True and sidecar.proc.pid != first_pid
    sidecar.proc.kill()


def test_format_reward():
    assert format_reward("reasoning ... so \\boxed{42}.")
    assert not format_reward("no box at all, 42")
    assert not format_reward("\\boxed{1} or \\boxed{2}")
    assert not format_reward("\\boxed{}")
    assert not format_reward("\\boxed{\\frac{1}{2}")
    assert format_reward("\\boxed{\\frac{1}{2}}")


def test_grade_many_order_kinds_and_per_item_options():
    texts = ["\\boxed{1}", "\\boxed{B}", "\\boxed{1.24}", "\\boxed{2}", "\\boxed{A, C}"]
    gold = ["1", "B", "1.2", "3", "AC"]
    kinds = ["math", "choice", "number", "int", "multi_choice"]
    item_kw = [{}, {}, {"precision": 1}, {}, {}]
    assert grade_many(texts, gold, kinds, item_kw=item_kw) == [True, True, True, False, True]
    with pytest.raises(ValueError, match="lengths differ"):
        grade_many(texts, gold[:2], "math")


def test_grade_many_parallel_matches_serial_and_throughput():
    """workers=2 gives the serial answers in order; prints items/s (mismatched pairs run full math-verify)."""
    gold = [g for g, _, _ in golds("math500")]
    oracle = [f"The answer is \\boxed{{{g}}}" for g in gold]
    rates, results = {}, {}
    for label, workers, shift in (("serial", 0, 1), ("workers=2 incl. start-up", 2, 1), ("workers=2 warm", 2, 2)):
        mismatched = oracle[shift:] + oracle[:shift]  # item i gets item i+shift's answer
        start = time.perf_counter()
        results[label] = grade_many(oracle + mismatched, gold + gold, "math", workers=workers)
        rates[label] = 1000 / (time.perf_counter() - start)
        assert results[label][:500] == [True] * 500
        assert sum(results[label][500:]) < 25  # only neighbours that share an answer
    assert results["serial"] == results["workers=2 incl. start-up"]
    print("math500 grading, 500 oracle + 500 mismatched:", ", ".join(f"{k} {v:.0f} items/s" for k, v in rates.items()))


# ------------------------------------------------------------------------- fast paths vs full math-verify
def test_fast_paths_give_full_math_verify_verdicts_on_math500():
    """Every MATH-500 gold answered once equivalently and once wrongly (answer_variants, shifts 0 and 1): the fast
    paths (exact, plain rationals, quick_parse) return exactly the verdicts of math-verify's own parser + verify."""
    from seqrl.eval.answer_variants import variant_responses

    gold = [g for g, _, _ in golds("math500")]
    responses = variant_responses(gold, shift=0) + variant_responses(gold, shift=1)
    texts, meant, gold2 = [t for t, _ in responses], [m for _, m in responses], gold + gold
    fast, forced = grade_many(texts, gold2, "math"), grade_many(texts, gold2, "math", fast_paths=False)
    differ = [(gold2[i], texts[i][-60:], fast[i]) for i in range(len(texts)) if fast[i] != forced[i]]
    assert not differ, differ
    assert sum(meant) == 500 and sum(f == m for f, m in zip(fast, meant)) >= 995  # the variants mean what they say
    paths = {grading.math_path(extract_answer(t, "math"), g) for t, g in zip(texts, gold2)}
    assert paths == {"exact", "rational", "quick-parse", "math-verify"}  # every path was exercised


def test_quick_parse_and_plain_rationals_are_exactly_what_math_verify_parses():
    """quick_parse(a) == math_verify.parse("\\boxed{a}") (same sympy tree, same string) wherever it answers, and
    math-verify parses every plain rational to that exact Rational (rational_verdict's premise)."""
    from math_verify import parse
    from sympy import srepr

    from seqrl.eval import fastgrade
    from seqrl.eval.answer_variants import number_shaped_answers

    def show(parsed: list) -> list[str]:
        return [x if isinstance(x, str) else srepr(x) for x in parsed]

    generated = number_shaped_answers([g for g, _, _ in golds("math500")], n=200)
    answers = [a for a in map(grading._clean, generated) if a and not grading._too_wild(a)]
    quick = {a: fastgrade.quick_parse(a) for a in answers}
    real = {a: parse("\\boxed{" + a + "}", parsing_timeout=None) for a in answers
            if quick[a] is not None or fastgrade.plain_rational(a) is not None}
    shapes = ("=", "\\text", "\\left(", "\\infty", "^\\circ", "^{\\circ}", ",", "\\dfrac", "/", ".", "[")
    taken = [a for a in answers if quick[a] is not None]
    assert len(taken) > 800 and all(any(shape in a for a in taken) for shape in shapes)
    bad = [(a, show(quick[a]), show(real[a])) for a in taken if show(quick[a]) != show(real[a])]
    assert not bad, bad[:5]
    plain = [a for a in answers if fastgrade.plain_rational(a) is not None]
    assert len(plain) > 200
    bad = [(a, real[a]) for a in plain if not (real[a][0].is_Rational and real[a][0] == fastgrade.plain_rational(a))]
    assert not bad, bad[:5]
    assert None is fastgrade.quick_parse("\\sqrt{2}") is fastgrade.quick_parse("1\\frac{4}{5}")
    assert None is fastgrade.plain_rational("1\\frac{4}{5}") is fastgrade.plain_rational("3/0")


@pytest.mark.parametrize("pred,gold,expected", [
    ("\\frac{9}{5}", "1\\frac{4}{5}", True), ("\\frac{14}{5}", "1\\frac{4}{5}", False),  # mixed number (old: 14/5)
    ("0.333333", "\\frac{1}{3}", True), ("0.33", "\\frac{1}{3}", False),  # a float vs a fraction: 6 places
    ("3.0000001", "3", False), ("5.0", "5", True),  # ... but a float vs an integer: exact
    ("x = 5", "5", True), ("y = 5", "x = 5", False), ("\\left( -2, 1 \\right)", "(-2,1)", True),
    ("(2, 1)", "(1, 2)", False), ("[1, 2)", "[1,2]", False), ("-2, 1", "1,-2", True),  # an empty interval: a tuple
    ("58500", "58,500", True), ("0,5", "0.5", False),  # the parser reads 0,5 as the set {0, 5}
])
def test_fast_verdicts_on_hand_cases(pred, gold, expected):
    assert verify(pred, gold, "math") is expected
    assert verify(pred, gold, "math", fast_paths=False) is expected


def test_a_batch_parses_each_gold_once_and_each_repeated_answer_once(monkeypatch):
    calls = []
    real = grading._mv_parse
    monkeypatch.setattr(grading, "_mv_parse", lambda text, **kw: calls.append(text) or real(text, **kw))
    answers = ["\\sqrt{2}+0", "2^{1/2}", "\\frac{2}{\\sqrt{2}}", "\\sqrt{3}"]  # none has a fast path
    verdicts = grade_many([f"\\boxed{{{a}}}" for a in answers * 2], ["\\sqrt{2}"] * 8, "math")
    assert verdicts == [True, True, True, False] * 2
    assert sorted(calls) == sorted(f"\\boxed{{{a}}}" for a in ["\\sqrt{2}", *answers])  # 5 parses, not 16
    calls.clear()
    assert grade("\\boxed{\\sqrt{3}}", "\\sqrt{2}", "math") is False and len(calls) == 2  # no cache outside a batch
