"""Graders under attack: >= 10,000 generated hostile strings through every extractor and verifier of
seqrl.eval.grading (extract_answer for each answer kind, verify for each kind, grade, format_reward, grade_many
serial / process pool / off the main thread). Each call must return the right type, never raise, and return
within its deadline (math checks: `timeout_s` + SLACK_S; the rest: EXTRACT_S, even on 100k characters).

Strings: towers (9^9^9^9, 9^{9^{9}}), huge exponents, factorial chains ((9^9)!!, ((12!)!)!), deep nesting of
braces / parentheses / \\frac / \\boxed up to 5000 levels, balanced or cut short, unbalanced brace soup, unicode
(lone surrogates, RTL overrides, zero-width joiners, NUL, form feed), LaTeX command soup and ~100k-character
responses. Hypothesis runs derandomized (a fixed seed), without its example database, so every run is the same.
"""
from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from seqrl.eval.grading import ANSWER_KINDS, extract_answer, format_reward, grade, grade_many, verify

# The math deadline is a SIGALRM; when it lands in one of Hypothesis' gc callbacks Python drops the exception with
# an "unraisable" warning and the grader's 50 ms re-fire ends the check instead: expected here, so not reported.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
TIMEOUT_S = 0.05  # the math deadline each fuzzed check runs under
SLACK_S = 1.0  # signal delivery, process scheduling on a shared 2-core machine
EXTRACT_S = 1.0  # extraction and the cheap verifiers: linear scans, even on 100k characters
EXAMPLES = {"extract": 3000, "verify": 2000, "verify_extracted": 1200, "grade": 1200, "grade_many": 400,
            "grade_many_pool": 3, "threaded": 150}  # Hypothesis examples per test
STRINGS_PER_EXAMPLE = {"verify": 2, "grade_many": 1, "grade_many_pool": 40}  # else 1 (grade_many: 1 to 4)
assert sum(n * STRINGS_PER_EXAMPLE.get(k, 1) for k, n in EXAMPLES.items()) >= 10_000
COUNTS: dict[str, int] = {}  # test name -> generated strings graded
BOMB_EVERY, LONG_EVERY = 16, 100  # 1 answer in 16 is a bomb, 1 response in 100 is ~100k characters long
SPECIAL = list("\u200b\u200c\u200d\u2060\ufeff\u202a\u202b\u202d\u202e\u200e\u200f\u061c\u0301\x00\x0c\r\t"
               "\u2028\u2029\u00a0\u2212\ud800\udbff\udfff")
LATEX = ["\\frac", "\\dfrac", "\\sqrt", "\\boxed", "\\fbox", "\\text", "\\textbf", "\\mathrm", "\\left(", "\\right)",
         "\\begin{pmatrix}", "\\end{pmatrix}", "\\infty", "\\pi", "\\cdot", "\\times", "\\pm", "\\int_0^1",
         "\\sum_{n=1}^{\\infty}", "\\prod", "\\lim_{x\\to 0}", "\\mathbb{R}", "\\in", "\\cup", "\\emptyset", "\\le",
         "\\neq", "\\overline", "\\log", "\\ln", "\\sin", "\\binom", "\\choose", "\\over", "\\dots", "\\%", "^\\circ",
         "\\,", "\\!", "{,}", "\\$", "\\\\", "&", "$", "$$", "\\{", "\\}", "\\", "\\x", "\\def", "\\Gamma", "\\gcd",
         "\\operatorname{lcm}", "\\mathbf{v}", "\\vec", "\\angle", "\\frac{", "\\sqrt[", "}{", "}", "{", "(", ")", "[",
         "]", "^", "_", "=", ",", ".", "!", "'", "i", "e", "x", "answer is", "Answer:", "\n"]
GOLDS = ["5", "-3", "0.5", "\\frac{1}{2}", "\\sqrt{2}", "x^2+1", "\\pi", "(1,2)", "A", "C", "AC", "B, D", "12 cm",
         "1,234", "\\infty", "10^{10}", "[0, 1)", "\\{1, 2\\}"]


# ------------------------------------------------------------------------------------------------ strategies
# Built once at import: strategies made inside a draw are re-validated by Hypothesis on every example (slow).
NUMBER = st.one_of(
    st.integers(-10**40, 10**40).map(str),
    st.floats().map(repr),  # nan, inf, 1e+308, 5e-324 ...
    st.tuples(st.integers(-999, 999), st.integers(0, 999)).map(lambda t: f"\\frac{{{t[0]}}}{{{t[1]}}}"),
    st.tuples(st.integers(-999, 999), st.integers(0, 99)).map(lambda t: f"{t[0]}/{t[1]}"),
    st.from_regex(r"[-+]?\d{1,3}(,\d{3}){0,4}(\.\d{1,8})?", fullmatch=True),
)


def one_in(draw, n: int) -> bool:
    """True about once in n draws. (Hypothesis favours boundary values such as 0 and n - 1: test a middle one.)"""
    return draw(st.integers(0, n - 1)) == n // 2


@st.composite
def tower(draw):
    """9^9^9^9, 9^{9^{9^{9}}}, 2**2**2, 9e999999999: values far past any float or memory."""
    base = draw(st.sampled_from(["9", "10", "2", "99", "x", "e", "\\pi", "1.5", "(-1)", "0"]))
    height, style = draw(st.integers(1, 8)), draw(st.sampled_from(["flat", "braced", "python", "sci"]))
    if style == "flat":
        return "^".join([base] * (height + 1))
    if style == "braced":
        return "^{".join([base] * (height + 1)) + "}" * height
    if style == "python":
        return "**".join([base] * (height + 1))
    return f"{base}e{draw(st.integers(10, 10**12))}"


TOWER = tower()


FACTORIAL_CORES = ["9^9", "9^{9}", "12!", "11!", "387420489", "99999999", "10^8", "2^{30}", "10^{10^{10}}", "x", "n"]
FACTORIAL_FORMS = ["({})!", "({})!!", "(({})!)!", "\\Gamma(\\Gamma({}))", "10^{{\\Gamma({})}}", "10^{{({})!}}",
                   "\\gcd(({})!, 5)", "\\operatorname{{lcm}}({}!, 5)", "\\binom{{{}}}{{2}}", "{{({})!}}^{{({})!}}"]


@st.composite
def factorial(draw):
    """Factorial chains around the sizes where sympy / mpmath build billion-digit integers in C code that no signal
    interrupts: (9^9)!!, ((12!)!)!, \\Gamma(\\Gamma(9^9)), 10^{\\Gamma(9^9)}, \\gcd(387420489!, 5), n!!!!!!."""
    core = draw(st.one_of(st.sampled_from(FACTORIAL_CORES), st.integers(0, 10**9).map(str), TOWER))
    for _ in range(draw(st.integers(0, 2))):  # nest: ((core)!)!
        core = f"({core})" + "!" * draw(st.integers(1, 2))
    if one_in(draw, 4):
        return core + "!" * draw(st.integers(1, 12))
    return draw(st.sampled_from(FACTORIAL_FORMS)).format(core, core)


BRACKETS = [("{", "}"), ("(", ")"), ("[", "]"), ("\\frac{1}{", "}"), ("\\sqrt{", "}"), ("\\left(", "\\right)"),
            ("\\boxed{", "}"), ("\\frac{", "}{2}"), ("^{", "}")]


@st.composite
def nesting(draw):
    """Braces / parentheses / \\frac / \\sqrt / \\boxed nested up to 5000 deep, balanced or cut short."""
    opener, closer = draw(st.sampled_from(BRACKETS))
    depth = draw(st.one_of(st.integers(0, 12), st.integers(13, 400), st.sampled_from([1000, 5000])))
    closed = draw(st.sampled_from([depth, depth, 0, depth // 2, depth + 3]))
    return opener * depth + draw(st.sampled_from(["1", "x", "", "2^2^2"])) + closer * closed


SOUP = st.lists(st.one_of(st.sampled_from(LATEX), st.sampled_from(SPECIAL), st.integers(0, 99).map(str)),
                max_size=60).map("".join)  # LaTeX commands with stray unicode and digits
# any code point, lone surrogates included (Hypothesis leaves category Cs out unless told)
UNICODE = st.text(st.one_of(st.characters(exclude_categories=()), st.sampled_from(SPECIAL)), max_size=80)
BRACES = st.lists(st.sampled_from(list("{}()[]$\\ \n") + ["\\boxed{", "\\fbox{", "answer is ", "Answer:"]),
                  max_size=120).map("".join)


@st.composite
def boxes(draw):
    """Many \\boxed{}: nested, one after another, or never closed."""
    k = draw(st.one_of(st.integers(1, 8), st.integers(9, 1000)))
    inner = draw(st.one_of(NUMBER, st.sampled_from(["", "A", "x^2"])))
    return draw(st.sampled_from(["\\boxed{" * k + inner + "}" * draw(st.integers(0, k)),
                                 ("\\boxed{" + inner + "} ") * k, ("\\fbox{" + inner) * k]))


# Most strings are quick for every grader: a plain answer, letters, brace / unicode / LaTeX soup, many boxes.
CHEAP = st.one_of(NUMBER, SOUP, UNICODE, BRACES, boxes(),
                  st.sampled_from(["A", "(C)", "B, D", "A and C", "\\text{(B)}", "3 cm", "12^\\circ", "50\\%"]))
BOMB = st.one_of(TOWER, factorial(), nesting())  # sympy bombs: the deadline and the pre-filters must hold


@st.composite
def answer(draw):
    """A final answer; 1 in BOMB_EVERY is a bomb (each tower costs up to a full math deadline)."""
    return draw(BOMB if one_in(draw, BOMB_EVERY) else CHEAP)


ANSWER = answer()


@st.composite
def response(draw):
    """A model response around 1-3 answers: bare, boxed, 'The answer is', Markdown, $$...$$; 1 in LONG_EVERY is
    ~100k characters: the answers repeated, or split by a 100k run of blanks."""
    body = "".join(draw(st.lists(ANSWER, min_size=1, max_size=3)))
    if one_in(draw, LONG_EVERY):
        blank = draw(st.sampled_from([" ", "\n", " \t", "\u00a0", ", "])) * 100_000
        body = draw(st.sampled_from([(body or "x") * (100_000 // max(1, len(body)) + 1),
                                     f"A{blank[:100_000]}{body}"]))
    wrap = draw(st.sampled_from(["none", "boxed", "answer_is", "answer_colon", "dollars", "prose"]))
    return {"none": body, "boxed": f"so \\boxed{{{body}}}", "answer_is": f"The answer is {body}.",
            "answer_colon": f"**Answer:** ${body}$", "dollars": f"$${body}$$",
            "prose": f"Let me think.\n{body}\nTherefore the final answer is \\boxed{{{body[-40:]}}}"}[wrap]


RESPONSE = response()
GOLD = st.one_of(st.sampled_from(GOLDS), st.sampled_from(GOLDS), CHEAP)
# per-item grading options, as benchmark_gold produces them (MathVista precision / unit, option texts)
OPTIONS = st.fixed_dictionaries({}, optional={
    "precision": st.one_of(st.none(), st.integers(0, 6)),
    "unit": st.one_of(st.sampled_from(["cm", "\\circ", "%", "$", "m^2"]), UNICODE),
    "choices": st.lists(st.one_of(CHEAP, st.just("3 cm")), max_size=6)})


def fuzz(n: int):
    """Derandomized Hypothesis settings for `n` examples; the per-example deadline is generous on purpose (several
    bounded calls each, on a busy machine): the per-call bounds are asserted in `timed`."""
    return settings(max_examples=n, derandomize=True, database=None, deadline=timedelta(seconds=30),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------------------------------------- checks
def timed(limit_s: float, fn, *args, **kw):
    """fn(*args, **kw), asserting it returns within limit_s seconds."""
    start = time.perf_counter()
    out = fn(*args, **kw)
    took = time.perf_counter() - start
    assert took <= limit_s, f"{fn.__name__} took {took:.2f} s > {limit_s} s on {str(args)[:300]!r}"
    return out


def check_extract(text: str, choices) -> None:
    for kind in ANSWER_KINDS:
        got = timed(EXTRACT_S, extract_answer, text, kind, choices=choices)
        assert got is None or (isinstance(got, str) and got != ""), (kind, got)
        if kind == "multi_choice" and got is not None:
            assert got == "".join(sorted(set(got))) and got.isupper(), got
        if kind == "choice" and got is not None:
            assert len(got) == 1 and got.isupper(), got
    assert type(timed(EXTRACT_S, format_reward, text)) is bool


def check_verify(pred, gold: str, kw: dict) -> None:
    kw = {k: v for k, v in kw.items() if k != "choices"}
    for kind in ANSWER_KINDS:
        limit = TIMEOUT_S + SLACK_S if kind == "math" else EXTRACT_S
        assert type(timed(limit, verify, pred, gold, kind, timeout_s=TIMEOUT_S, **kw)) is bool


def count(name: str, n: int) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + n


def report(name: str) -> None:
    """Print and check how many generated strings this test graded (every example ran)."""
    print(f"{name}: {COUNTS.get(name, 0)} generated strings graded")
    assert COUNTS.get(name, 0) >= EXAMPLES[name] * STRINGS_PER_EXAMPLE.get(name, 1), COUNTS


@pytest.fixture(scope="module", autouse=True)
def _print_total():
    yield
    print(f"\ngrader fuzz: {sum(COUNTS.values())} generated strings graded in all ({COUNTS})")


# -------------------------------------------------------------------------------------------------- tests
def test_extractors_and_format_reward():
    @fuzz(EXAMPLES["extract"])
    @given(RESPONSE, st.one_of(st.none(), st.lists(CHEAP, max_size=6)))
    @example("So the answer is A" + " " * 100_000 + "b", None)  # was quadratic: letter-list regex on long blanks
    def run(text, choices):
        count("extract", 1)
        check_extract(text, choices)

    run()
    report("extract")


def test_verify_every_kind_on_raw_answers():
    @fuzz(EXAMPLES["verify"])
    @given(ANSWER, GOLD, OPTIONS)
    @example("\\gcd(387420489!, 5)", "C", {})  # were 2-13 s past a 0.05 s deadline: C code no signal stops
    @example("(9^9)!!", "\\sqrt{2}", {})
    @example("((12!)!)!", "\\sqrt{2}", {})
    @example("010^{10^{10^{10}}}", "x^2+1", {})  # was 12 s: a zero times a tower, expanded against a polynomial
    @example("1" + " " * 100_000 + "x", "1", {"unit": "cm"})  # was quadratic: the unit regex on long blanks
    def run(pred, gold, kw):
        count("verify", 2)
        check_verify(pred, gold, kw)
        check_verify(gold, pred, {})  # a hostile gold must not break the verifier either

    run()
    report("verify")


def test_verify_every_kind_on_extracted_answers():
    @fuzz(EXAMPLES["verify_extracted"])
    @given(RESPONSE, GOLD, OPTIONS)
    def run(text, gold, kw):
        count("verify_extracted", 1)
        for kind in ANSWER_KINDS:
            check_verify(extract_answer(text, kind, choices=kw.get("choices")), gold, kw)

    run()
    report("verify_extracted")


def test_grade_every_kind():
    @fuzz(EXAMPLES["grade"])
    @given(RESPONSE, GOLD, OPTIONS)
    def run(text, gold, kw):
        count("grade", 1)
        for kind in ANSWER_KINDS:
            limit = TIMEOUT_S + SLACK_S + EXTRACT_S
            assert type(timed(limit, grade, text, gold, kind, timeout_s=TIMEOUT_S, **kw)) is bool

    run()
    report("grade")


RIGHT = ("Thus \\boxed{\\frac{6}{8}}.", "0.75", "math", {})  # sentinels: their grades are known whatever the timing
WRONG = ("The answer is 8", "7", "int", {})


@st.composite
def batch(draw, low: int, high: int):
    """low..high fuzzed items (text, gold, kind, options) with RIGHT and WRONG inserted at drawn positions."""
    items = draw(st.lists(st.tuples(RESPONSE, GOLD, st.sampled_from(ANSWER_KINDS), OPTIONS), min_size=low,
                          max_size=high))
    for sentinel in (RIGHT, WRONG):
        items.insert(draw(st.integers(0, len(items))), sentinel)
    return items


def check_batch(items: list, **kw) -> None:
    """grade_many returns one bool per item, in order (the sentinels land where they were put), in bounded time."""
    texts, gold, kinds, kws = (list(col) for col in zip(*items))
    limit = len(items) * (TIMEOUT_S + SLACK_S + EXTRACT_S) + kw.get("workers", 0) * 30  # + pool start-up
    got = timed(limit, grade_many, texts, gold, kinds, item_kw=kws, timeout_s=TIMEOUT_S, **kw)
    assert isinstance(got, list) and len(got) == len(items) and all(type(g) is bool for g in got)
    assert got[items.index(RIGHT)] is True and got[items.index(WRONG)] is False


def test_grade_many_serial_keeps_order():
    @fuzz(EXAMPLES["grade_many"])
    @given(batch(1, 4))
    def run(items):
        count("grade_many", len(items) - 2)
        check_batch(items)

    run()
    report("grade_many")


def test_grade_many_process_pool():
    """workers=2: the cached forkserver pool, whose workers keep the signal deadline in their main thread."""
    @fuzz(EXAMPLES["grade_many_pool"])
    @given(batch(40, 40))
    def run(items):
        count("grade_many_pool", len(items) - 2)
        check_batch(items, workers=2)

    run()
    report("grade_many_pool")


def test_grade_off_the_main_thread_uses_the_killable_helper():
    """From a worker thread (no signals there) math checks run in the helper process; same bounds apply, once
    it has started (the first call, which spawns it, is not timed)."""
    errors: list = []

    def worker():
        try:
            grade("\\boxed{\\frac{2}{4}}", "0.5", "math")  # spawns the helper

            @fuzz(EXAMPLES["threaded"])
            @given(RESPONSE, GOLD)
            def run(text, gold):
                count("threaded", 1)
                for kind in ANSWER_KINDS:
                    limit = TIMEOUT_S + SLACK_S + EXTRACT_S
                    assert type(timed(limit, grade, text, gold, kind, timeout_s=TIMEOUT_S)) is bool

            run()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's own thread below
            errors.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=300)
    assert not thread.is_alive() and not errors, errors
    report("threaded")
