"""Deterministic model-like responses to a gold answer, for grader benchmarks (bench/eval.py) and for the test that
the grader's fast paths agree with full math-verify (tests/test_grading.py).

`variant_responses(golds)` answers item i with an equivalent-but-different rewrite of its gold when i is even and
with a wrong answer when i is odd (`shift` rotates that for repeated measurements), boxed inside one of a few
sentences. The rewrites are chosen so that a grader cannot get by on string equality: `\\frac{a}{b}` ->
`\\dfrac{a}{b}`, `a/b` or an exact decimal; an integer -> `x = 5`, `5.0`, `05`, `5 \\text{ cm}` or `\\dfrac{10}{2}`;
`58,500` -> `58500`; `90^\\circ` -> `90`; tuples respaced inside `\\left( \\right)`; bare lists reversed;
`\\text{word}` -> `word`; anything else respaced. Wrong answers keep the gold's shape: a number plus one (same
notation), else its first digit bumped, else `+ 1` appended. `number_shaped_answers` adds generated answers that
are, or nearly are, plain numbers, assignments, tuples and intervals: what the grader's quick parser
(seqrl.eval.fastgrade) must handle exactly like math-verify.
"""
from __future__ import annotations

import random
import re
from fractions import Fraction

_INT_RE = re.compile(r"-?\d+")
_FRAC_RE = re.compile(r"(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}")
_DEC_RE = re.compile(r"-?\d*\.\d+")
SENTENCES = (
    "Let me work through this step by step.\nSo the final answer is $\\boxed{{{}}}$.",
    "Putting everything together we get \\boxed{{{}}}.",
    "The computation gives the answer: $\\boxed{{{}}}$",
    "Checking the cases once more, the answer is $\\boxed{{{}}}$. I am confident.",
)


def _decimal(value: Fraction) -> str | None:
    """The exact decimal of `value` when it terminates within 8 places, else None."""
    scaled = value * 10**8
    if scaled.denominator != 1:
        return None
    sign, digits = ("-" if value < 0 else ""), f"{abs(scaled.numerator):09d}"
    return f"{sign}{digits[:-8]}.{digits[-8:]}".rstrip("0").rstrip(".")


def equivalent(gold: str, i: int) -> str:
    """A rewrite of `gold` that math-verify should judge equal to it (chosen by `i` among the ones that fit)."""
    g = gold.strip()
    if _INT_RE.fullmatch(g):
        n = int(g)
        return [f"x = {n}", f"{n}.0", f"0{g}" if n >= 0 else f"-0{g[1:]}", f"{n} \\text{{ cm}}",
                f"\\dfrac{{{2 * n}}}{{2}}"][i % 5]
    m = _FRAC_RE.fullmatch(g)
    if m:
        sign, a, b = m.groups()
        dec = _decimal(Fraction(int(a), int(b)) * (-1 if sign else 1))
        options = [f"{sign}\\dfrac{{{a}}}{{{b}}}", f"{sign}{a}/{b}"] + ([dec] if dec else [])
        return options[i % len(options)]
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+", g):  # thousands separators: 58,500 -> 58500
        return g.replace(",", "")
    if _DEC_RE.fullmatch(g):
        v = Fraction(g)
        return [g + "0", f"\\dfrac{{{v.numerator}}}{{{v.denominator}}}"][i % 2]
    if re.search(r"\^\s*\{?\\circ\}?\s*$", g):
        return re.sub(r"\^\s*\{?\\circ\}?\s*$", "", g).strip()
    m = re.fullmatch(r"\\text\{\s*([A-Za-z ]+?)\s*\}", g)
    if m:
        return m.group(1)
    if re.fullmatch(r"\(([^()]*,[^()]*)\)", g):
        return "\\left( " + ", ".join(p.strip() for p in g[1:-1].split(",")) + " \\right)"
    if "," in g and not re.search(r"[()\[\]{}\\]", g):
        return ", ".join(p.strip() for p in reversed(g.split(",")))
    if "\\frac" in g:
        return g.replace("\\frac", "\\dfrac")
    return " ".join(re.sub(r"([=+-])", r" \1 ", g).split())  # respaced: only the exact shortcut needs no parser


def wrong(gold: str, i: int) -> str:
    """An answer of the same shape as `gold` that is not equal to it."""
    g = gold.strip()
    if _INT_RE.fullmatch(g):
        return str(int(g) + 1 + i % 3)
    m = _FRAC_RE.fullmatch(g)
    if m:
        sign, a, b = m.groups()
        return f"{sign}\\frac{{{int(a) + int(b)}}}{{{b}}}"  # the gold plus (or minus) one
    if _DEC_RE.fullmatch(g):
        return _decimal(Fraction(g) + Fraction(1, 1 + i % 2))
    d = re.search(r"\d", g)  # the first digit: a base subscript (52_8) is ignored by math-verify
    if d:
        return g[: d.start()] + str((int(d.group()) + 1) % 10) + g[d.end():]
    return g + " + 1"


def variant_responses(golds: list[str], shift: int = 0) -> list[tuple[str, bool]]:
    """One response per gold: (text, meant_equal). With j = i + shift, item i gets an equivalent rewrite (choice
    j // 2) when j is even, else a wrong answer, boxed inside sentence j % 4; another shift, other responses."""
    out = []
    for i, gold in enumerate(golds):
        j = i + shift
        meant = j % 2 == 0
        answer = equivalent(gold, j // 2) if meant else wrong(gold, j // 2)
        out.append((SENTENCES[j % len(SENTENCES)].format(answer), meant))
    return out


def _number(rng: random.Random) -> str:
    """A random number as a model might write it: sign, leading zeros, decimal, fraction, a/b, thousands comma."""
    n, den = str(rng.randrange(10 ** rng.randrange(1, 9))), rng.randrange(40)
    sign = rng.choice(["", "-", "+", "0", "-00"])
    frac, neg = rng.choice(["frac", "dfrac", "tfrac"]), rng.choice(["", "-"])
    return rng.choice([sign + n, f"{sign}{n}.{rng.randrange(10**4)}", f"{sign}.{rng.randrange(99)}", f"{sign}{n}/{den}",
                       f"{sign}\\{frac}{{{neg}{n}}}{{{den}}}", f"\\frac{n[:1]}{den % 10}",
                       f"{neg}{rng.randrange(1, 999)},{rng.randrange(1000):03d}"])


def number_shaped_answers(golds: list[str], n: int = 200, seed: int = 0) -> list[str]:
    """The golds, five equivalent and one wrong rewrite of each, and per round (n rounds) a generated number with
    an optional suffix (degrees, units), a `v = number`, and a tuple / interval / list of numbers and infinities;
    plus fixed edge cases (0,5 1,23 1e3 i = 5 (3, 1) 3/0 ...). Sorted, without duplicates."""
    rng, out = random.Random(seed), set()
    for g in golds:
        out.update([g, *(equivalent(g, i) for i in range(5)), wrong(g, 0)])
    for _ in range(n):
        suffix = rng.choice(["", "", "^\\circ", "^{\\circ}", " \\text{ cm}", "\\mbox{ m}^2", "~\\text{cm}"])
        out.add(_number(rng) + suffix)
        out.add(rng.choice("abcdefghijklmnopqrstuvwxyzXYE") + rng.choice(["=", " = "]) + _number(rng))
        items = [rng.choice([_number(rng), "\\infty", "-\\infty", str(rng.randrange(-3, 4))])
                 for _ in range(rng.randrange(2, 5))]
        left, right = rng.choice([("(", ")"), ("[", "]"), ("(", "]"), ("[", ")"), ("", ""), ("\\left( ", " \\right)")])
        out.add(left + rng.choice([",", ", "]).join(items) + right)
    out.update(["0.5", ".5", "-.5", "0,5", "0,123", "1,23", "1,234.5", "5.", "1e3", "10\\,000", "10{,}000", "i = 5",
                "e = 5", "x = 1,234", "(3, 1)", "[3, 1]", "(1, 1)", "[2, 2]", "(2, 1]", "\\frac{0}{0}", "3/0", "-0"])
    return sorted(out)
