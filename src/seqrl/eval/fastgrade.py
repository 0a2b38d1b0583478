"""Fast paths of the math verifier: math-verify's own verdicts without its LaTeX parser, and a batch cache.

math-verify (`parse` + `verify`) spends almost all its time in its ANTLR LaTeX parser (1-50 ms per answer, mostly
ANTLR's full-context prediction), while most answers are plain numbers. In the order
`grading._math_equal` tries them:

1. exact (kept from before; the one rule that is not math-verify's): answers equal up to spaces are equal, as TeX
   renders them alike (math-verify reads `2 3` as 5 and `1 000` as 0).
2. `rational_verdict(pred, gold)`: both strings are plain rationals (`-12`, `007`, `3/4`, `\\frac{-3}{4}`,
   `-\\dfrac{10}{2}`, `\\frac34`). math-verify parses each to a sympy Rational and then (`sympy_expr_eq`) decides by
   exact value: `a == b`, else the Integer/Rational comparison, else `simplify(a - b).is_zero`; its string-vs-string
   comparison only matches equal strings, hence equal values. So the verdict is `Fraction(pred) == Fraction(gold)`:
   pure Python, linear time. Decimals are not here: math-verify compares a float with a non-integer after rounding
   both to 6 places (0.333333 = 1/3) but with an integer exactly (3.0000001 != 3). This replaces the old
   fraction shortcut, which compared decimals exactly and read the mixed number `1\\frac{4}{5}` as 14/5.
3. `quick_parse(latex)`: exactly what `math_verify.parse("\\boxed{<latex>}")` returns, `[expr, normalized string]`,
   when math-verify's own normalisation (`normalize_latex`, run here, ~30 us: units and `\\text{}`, `\\dfrac`,
   `a/b`, `.5`) leaves a plain number (integer with sign, leading zeros or thousands commas; decimal; `\\frac{a}{b}`;
   optionally `^\\circ`), `x = <number>`, or a tuple / interval / list of plain numbers and infinities. The
   expression is built with the calls latex2sympy makes for those tokens (`sympy.Number` on the digits, unary minus,
   `Rational(a, b)`, `Eq(Symbol(x, real=True), n, evaluate=False)`, its interval-or-tuple rule, its FiniteSet), so
   math-verify's `verify` gets identical inputs; two Rationals are compared by value as in 2. Anything else
   returns None and goes to the real parser.
tests/test_grading.py checks quick_parse against math_verify.parse on ~1500 number-shaped answers (benchmark golds,
their rewrites, generated ones), plain_rational against it too, and fast against forced verdicts on MATH-500.

`batch()` / `batch_cached()`: grading.grade_many grades each chunk inside one batch, so a gold is parsed once per
chunk (not once per sample) and a repeated answer is checked once; nothing is cached across calls.
"""
from __future__ import annotations

import contextlib
import re
import threading
from dataclasses import replace
from fractions import Fraction

import sympy
from latex2sympy2_extended.latex2sympy2 import comma_number_regex
from latex2sympy2_extended.sets import FiniteSet
from math_verify.parser import LatexExtractionConfig, normalize_latex

_DIGITS = r"\d{1,60}"
_RATIONAL_RES = (  # raw answers whose parse is a Rational: (regex, group -> (outer sign, numerator, denominator))
    re.compile(rf"([-+]?)({_DIGITS})"),
    re.compile(rf"([-+]?)({_DIGITS})/({_DIGITS})"),
    re.compile(rf"([-+]?)\\[dt]?frac\{{([-+]?{_DIGITS})\}}\{{({_DIGITS})\}}"),
    re.compile(r"([-+]?)\\[dt]?frac(\d)(\d)"),
)
_DEGREES = r"(?:\s*\^(?:\\circ|\{\\circ\}))?"  # 90^\circ: the parser drops the degree sign (convert_degrees off)
_NORM_INT_RE = re.compile(rf"([-+]?)({_DIGITS}){_DEGREES}")
_NORM_COMMA_RE = re.compile(r"(-?)([1-9]\d{0,2}(?:,\d{3}){1,19})")  # latex2sympy reads 1,234 as 1234 (not 0,123)
_NORM_DEC_RE = re.compile(rf"([-+]?)(\d{{0,60}}\.\d{{1,60}}){_DEGREES}")
_NORM_FRAC_RE = re.compile(rf"([-+]?)\\frac\{{([-+]?{_DIGITS})\}}\{{({_DIGITS})\}}{_DEGREES}")
_NORM_ASSIGN_RE = re.compile(r"([a-df-hj-z])\s*=\s*(.*)")  # x = <number>; not e (Euler's number) nor i
# the normalisation math-verify applies to a \boxed{...} match (LatexExtractionConfig, boxed="last")
_BOXED_NORMALIZATION = replace(LatexExtractionConfig().normalization_config, boxed="last")


def _signed(sign: str, value):
    return -value if sign == "-" else value


def plain_rational(s: str) -> Fraction | None:
    """The value of `s` if it is a plain rational as listed in the module docstring (nonzero denominator)."""
    for pattern in _RATIONAL_RES:
        m = pattern.fullmatch(s)
        if m:
            sign, num, den = (m.groups() + ("1",))[:3]
            return _signed(sign, Fraction(int(num), int(den))) if int(den) != 0 else None
    return None


def rational_verdict(pred: str, gold: str) -> bool | None:
    """math-verify's verdict when both answers are plain rationals, else None."""
    p = plain_rational(pred)
    g = plain_rational(gold) if p is not None else None
    return None if g is None else p == g


def _number(norm: str, commas: bool = True):
    """The sympy number latex2sympy makes of a normalized plain-number string, else None."""
    m = _NORM_INT_RE.fullmatch(norm)
    if m:  # parse_number strips leading zeros; unary minus of an Integer
        return _signed(m.group(1), sympy.Number(m.group(2).lstrip("0") or "0"))
    m = _NORM_COMMA_RE.fullmatch(norm) if commas else None
    if m:  # the parser's comma_number_regex + convert_number (only for the whole answer)
        return _signed(m.group(1), sympy.Number(m.group(2).replace(",", "")))
    m = _NORM_DEC_RE.fullmatch(norm)
    if m:  # sympy.Number on the digits as written, then unary minus
        return _signed(m.group(1), sympy.Number(m.group(2)))
    m = _NORM_FRAC_RE.fullmatch(norm)
    if m and int(m.group(3)) != 0:  # convert_frac: Rational(top, bottom) of two Integers, then unary minus
        return _signed(m.group(1), sympy.Rational(int(m.group(2)), int(m.group(3))))
    return None


def _element(text: str):
    """One element of a tuple, interval or list: a plain number (no thousands commas) or +-infinity."""
    text = text.strip()
    infinity = re.fullmatch(r"(-?)\\infty", text)
    return _signed(infinity.group(1), sympy.oo) if infinity else _number(text, commas=False)


def _collection(norm: str):
    """(a, b, c) -> Tuple; (a, b], [a, b] ... -> Interval, or Tuple when empty (convert_interval); a, b, c -> the
    parser's FiniteSet; each element plain (`_element`). None for anything else."""
    bracketed = norm[:1] in "([" and norm[-1:] in ")]"
    parts = (norm[1:-1] if bracketed else norm).split(",")
    if len(parts) < 2 or (not bracketed and comma_number_regex.match(norm)):  # 1,234 is a number
        return None
    items = [_element(p) for p in parts]
    if any(item is None for item in items):
        return None
    if not bracketed:
        return FiniteSet(*items)
    left_open, right_open = norm[0] == "(", norm[-1] == ")"
    if len(items) > 2:
        return sympy.Tuple(*items) if left_open and right_open else None
    left, right = items
    try:
        if (left_open and right_open and right <= left) or (not left_open and not right_open and right < left):
            return sympy.Tuple(left, right)
    except Exception:
        pass
    return sympy.Interval(left, right, left_open=left_open, right_open=right_open)


def _expr(norm: str):
    """A plain number, `x = <plain number>` (convert_relation: Eq(Symbol(x, real=True), number) unevaluated), or a
    tuple / interval / list of plain numbers."""
    m = _NORM_ASSIGN_RE.fullmatch(norm)
    if m is None:
        number = _number(norm)
        return number if number is not None else _collection(norm)
    rhs = _number(m.group(2), commas=False)
    return None if rhs is None else sympy.Eq(sympy.Symbol(m.group(1), real=True), rhs, evaluate=False)


def quick_parse(latex: str) -> list | None:
    """`math_verify.parse("\\\\boxed{" + latex + "}")` for the answers listed in 3. above, else None."""
    if "answer" in latex.lower() or "$" in latex:  # other extraction patterns could compete with the box
        return None
    norm = normalize_latex("\\boxed{" + latex + "}", _BOXED_NORMALIZATION)
    expr = _expr(norm)
    return None if expr is None else [expr, norm]


def both_rational(gold_parsed: list, pred_parsed: list) -> bool:
    """True when both parses are [Rational, str]: then `verify` is value equality (see 2. above)."""
    return all(len(p) == 2 and isinstance(p[0], sympy.Rational) and isinstance(p[1], str)
               for p in (gold_parsed, pred_parsed))


def cheap_verdict(pred: str, gold: str) -> tuple[str, bool] | None:
    """(path, verdict) of the checks that need no parser, exact (equal up to spaces) or rational; else None."""
    if "".join(pred.split()) == "".join(gold.split()):
        return "exact", True
    verdict = rational_verdict(pred, gold)
    return None if verdict is None else ("rational", verdict)


def fast_path(pred: str, gold: str) -> str:
    """Which path decides (pred, gold): exact, rational, quick-parse (both parsed here) or math-verify."""
    cheap = cheap_verdict(pred, gold)
    if cheap is not None:
        return cheap[0]
    return "quick-parse" if quick_parse(pred) is not None and quick_parse(gold) is not None else "math-verify"


# ---------------------------------------------------------------------------------------------- batch cache
_BATCH = threading.local()  # while `batch()` is open in this thread: table name -> {key: value}


@contextlib.contextmanager
def batch():
    """Memoise `batch_cached` values (a gold's parse, a repeated answer's verdict) until the block ends."""
    previous, _BATCH.tables = getattr(_BATCH, "tables", None), {}
    try:
        yield
    finally:
        _BATCH.tables = previous


def batch_cached(table: str, key, compute):
    """compute(), memoised in this thread's open `batch()` (computed every time outside one)."""
    tables = getattr(_BATCH, "tables", None)
    if tables is None:
        return compute()
    cache = tables.setdefault(table, {})
    if key not in cache:
        cache[key] = compute()
    return cache[key]
