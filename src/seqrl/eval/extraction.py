"""Answer extraction: the final answer a response commits to, per answer kind (used by seqrl.eval.grading).

Safe on model output: every scan is linear in the length of the text, and nothing here raises on a string.
"""
from __future__ import annotations

import re
from fractions import Fraction

ANSWER_KINDS = ("math", "int", "number", "choice", "multi_choice")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_BOX_TOKEN_RE = re.compile(r"\\(?:boxed|fbox)\s*\{|[{}]")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is\s*:?|:)\s*", re.IGNORECASE)
_NUM = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+"
_NUMBER_RE = re.compile(_NUM)
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")
_FRAC_RE = re.compile(r"(?<!\d)\\[dt]?frac\{(-?\d+)\}\{(\d+)\}")  # not after a digit: 1\frac{4}{5} is 9/5


def _check_kind(kind: str) -> None:
    if kind not in ANSWER_KINDS:
        raise ValueError(f"unknown answer kind {kind!r}; allowed: {', '.join(ANSWER_KINDS)}")


# ----------------------------------------------------------------------------------------------- extraction
def _boxed_contents(text: str) -> list[str | None]:
    """Contents of every \\boxed{...}/\\fbox{...} in order; None for one whose braces never close (one pass)."""
    out, opened, depth = [], [], 0  # opened: (slot in out, content start, depth outside the box)
    for m in _BOX_TOKEN_RE.finditer(text):
        if m.group() == "}":
            depth -= 1
            if opened and opened[-1][2] == depth:
                slot, start, _ = opened.pop()
                out[slot] = text[start : m.start()]
            continue
        if m.group() != "{":
            opened.append((len(out), m.end(), depth))
            out.append(None)
        depth += 1
    return out


def _final_span(text: str) -> str | None:
    """The answer a response commits to: last boxed content, else the line after the last 'answer is/:'.
    None: no answer marker at all; "": a malformed (unclosed) or empty final box, i.e. no valid answer."""
    boxes = _boxed_contents(text)
    if boxes:
        return (boxes[-1] or "").strip()
    hits = list(_ANSWER_IS_RE.finditer(text))
    if not hits:
        return None
    tail = text[hits[-1].end() :].split("\n", 1)[0].strip().strip("*").strip()
    return re.sub(r"^\$+|\$+$", "", tail.rstrip(". ")).strip() or None


def _strip_wrappers(s: str) -> str:
    """Drop $ signs and \\text{...}-style wrappers, surrounding spaces and a final period."""
    return _TEXT_RE.sub(r"\1", s.replace("$", "")).strip().rstrip(".").strip()


def _letter(s: str) -> str | None:
    """'C', '(C)', 'C.', 'C: option text' -> 'C' (a lower-case letter only when it stands alone)."""
    m = re.fullmatch(r"\(?\s*([A-Za-z])\s*\)?(?:[.:]\s*.*)?", s, flags=re.DOTALL)
    return m.group(1).upper() if m and (s[0] == "(" or s[0].isupper() or len(s) == 1) else None


def _match_choice(s: str, choices: list[str] | None) -> str | None:
    """Letter of the option whose text equals `s` (ignoring case and runs of spaces), if any."""
    texts = [" ".join(str(c).split()).lower() for c in (choices or [])[:26]]
    key = " ".join(s.split()).lower()
    return _LETTERS[texts.index(key)] if key in texts else None


def _extract_choice(text: str, choices: list[str] | None) -> str | None:
    span = _final_span(text)
    if span == "":
        return None
    for cand in ([_strip_wrappers(span)] if span is not None else []) + [_strip_wrappers(text)]:
        hit = (_letter(cand) or _match_choice(cand, choices)) if cand else None
        if hit:
            return hit
    if span is not None:
        return None
    marked = re.findall(r"\(([A-Z])\)", text[-2000:])  # last resort: the last "(C)" of the response
    return marked[-1] if marked else None


def _letter_set(s: str) -> str | None:
    """'A, C' / 'AC' / 'A and C' / '(A)(C)' -> 'AC'; None if `s` is not a list of capital letters."""
    s = re.sub(r"[()\[\]{}]", " ", _strip_wrappers(s)).strip()
    if re.fullmatch(r"[A-Z](?:\s*(?:[,;/&]|\band\b)\s*[A-Z]|\s+[A-Z])*|[A-Z]{1,26}", s):  # linear in len(s)
        return "".join(sorted(set(re.findall(r"[A-Z]", s))))
    return None


def _number_text(s: str) -> str | None:
    """The number a span states: the whole span if it is one, else its last number."""
    s = _strip_wrappers(s).replace("\u2212", "-").replace("{,}", ",")
    s = re.sub(r"\\[,;:! ]|\\%|%|\^\s*\{?\\circ\}?|\\\$", "", _FRAC_RE.sub(r"\1/\2", s)).strip()
    if _as_fraction(s) is not None:
        return s
    found = _NUMBER_RE.findall(s)
    return found[-1] if found else None


def extract_answer(text: str, kind: str, *, choices: list[str] | None = None) -> str | None:
    """Extract the final answer of `text` for `kind` (one of ANSWER_KINDS) as a string, or None.

    math: content of the last \\boxed{}/\\fbox{} (balanced braces; an unclosed last box gives None), else the
    rest of the line after the last "answer is"/"Answer:". int/number: that span (or the whole text) reduced to
    its number (commas, signs, decimals, a/b and \\frac{a}{b}). choice: a letter from \\boxed{C}, "answer is
    (C)", "Answer: C", a bare "C", an option text equal to one of `choices` (mapped to its letter) or, failing
    those, the last "(C)". multi_choice: a set of letters ("A, C", "AC", "A and C") as a sorted string "AC".
    """
    _check_kind(kind)
    if not isinstance(text, str):
        return None
    if kind == "choice":
        return _extract_choice(text, choices)
    span = _final_span(text)
    if kind == "math" or span == "":
        return span or None
    if kind == "multi_choice":
        return _letter_set(span if span is not None else text)
    return _number_text(span if span is not None else text)


# ----------------------------------------------------------------------------------------- plain numbers
def _as_fraction(s: str) -> Fraction | None:
    """Exact value of a plain number string ('1,234', '-0.5', '3/4', '\\frac{3}{4}', '025'), else None."""
    s = _FRAC_RE.sub(r"\1/\2", s.strip().lstrip("+"))
    if len(s) > 100 or not re.fullmatch(_NUM, s):
        return None
    try:
        return Fraction(s.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None
