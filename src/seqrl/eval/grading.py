"""Answer extraction and verification, shared by the RL reward and the evaluation harness.

Safe on model output: extraction scans in linear time, verification never raises (a hostile answer is just wrong)
and every math check has a hard deadline. math-verify's own timeouts use ``signal.alarm`` (whole seconds); we
switch them off and put one ``signal.setitimer`` deadline (float seconds, re-firing every 50 ms in case a library
swallows the first interrupt) around parse + verify. Signals only work in the main thread; from other threads the
check runs in a spawned helper process, killed if it overruns. Cheap pre-filters (length, nesting, factorial towers
such as ((12!)!)!, whose billion-digit values C code builds out of any signal's reach) reject absurd answers early.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import logging
import multiprocessing as mp
import re
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from fractions import Fraction

from math_verify import parse as _mv_parse, verify as _mv_verify

ANSWER_KINDS = ("math", "int", "number", "choice", "multi_choice")
MAX_ANSWER_CHARS = 600  # a longer final answer is never right on our benchmarks; sympy never sees it
MAX_NESTING = 10  # deeper brackets are rejected: parse time grows exponentially with depth
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_BOX_TOKEN_RE = re.compile(r"\\(?:boxed|fbox)\s*\{|[{}]")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is\s*:?|:)\s*", re.IGNORECASE)
_NUM = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+"
_NUMBER_RE = re.compile(_NUM)
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")
_FRAC_RE = re.compile(r"\\[dt]?frac\{(-?\d+)\}\{(\d+)\}")
_TOWER_RE = re.compile(r"(?s)^(?=.*(?:(?<!\\)!(?!=)|\\Gamma|binom|choose|gcd|lcm))(?=.*(?:\^|\d{4}|!!!|[)}\]]\s*!))")
# an exponent that is itself a power of a number (10^{10^{10}}, 9^9^9): with a zero factor in front, sympy's
# comparison against a polynomial gold expands it in C code no signal stops (`010^{10^{10^{10}}}` vs `x^2+1`: 12 s)
_EXP_TOWER_RE = re.compile(r"\^\s*(?:\{\s*)?\(?\s*\d+(?:\.\d*)?\s*\^")
for _name in ("math_verify.parser", "math_verify.grader"):  # we disable its timeouts on purpose
    logging.getLogger(_name).addFilter(lambda record: "Timeout is disabled" not in record.getMessage())


class _Deadline(BaseException):
    """Raised by our SIGALRM handler; a BaseException so library `except Exception` blocks cannot eat it."""


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


# -------------------------------------------------------------------------------------------- verification
def _as_fraction(s: str) -> Fraction | None:
    """Exact value of a plain number string ('1,234', '-0.5', '3/4', '\\frac{3}{4}', '025'), else None."""
    s = _FRAC_RE.sub(r"\1/\2", s.strip().lstrip("+"))
    if len(s) > 100 or not re.fullmatch(_NUM, s):
        return None
    try:
        return Fraction(s.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def _too_wild(s: str) -> bool:
    """Cheap guard: too long, too deep, a factorial tower (factorial, \\Gamma, binom, gcd, lcm with ^, 4 digits, !!!,
    (.)!) or a numeric exponent tower (a^{b^c} with b a number)."""
    depths = itertools.accumulate(1 if ch in "{([" else -1 if ch in "})]" else 0 for ch in s)
    return (len(s) > MAX_ANSWER_CHARS or max(depths, default=0) > MAX_NESTING or _TOWER_RE.match(s) is not None
            or _EXP_TOWER_RE.search(s) is not None)


@functools.lru_cache(maxsize=4096)
def _parse(latex: str):
    return _mv_parse("\\boxed{" + latex + "}", parsing_timeout=None)  # our own deadline is around it


def _with_deadline(fn, timeout_s: float) -> bool | None:
    """Run fn() (main thread only) under a SIGALRM deadline; None when time ran out."""
    armed = [True]

    def on_alarm(signum, frame):
        if armed[0]:
            raise _Deadline()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout_s, 0.05)
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            armed[0] = False
    except _Deadline:
        return None
    finally:
        signal.signal(signal.SIGALRM, previous)


def _math_equal_here(pred: str, gold: str, timeout_s: float) -> bool:
    try:
        return bool(_with_deadline(lambda: _mv_verify(_parse(gold), _parse(pred), timeout_seconds=None), timeout_s))
    except Exception:
        return False


class _Sidecar:
    """A spawned process running math checks for non-main threads (no signals there), one call at a time.
    A call overrunning its deadline by `slack_s` gets it killed (the only way to stop a hang in C code)."""

    slack_s = 1.0

    def __init__(self) -> None:
        self.lock, self.proc, self.conn = threading.Lock(), None, None

    def check(self, pred: str, gold: str, timeout_s: float) -> bool:
        with self.lock:
            try:
                if self.proc is None or not self.proc.is_alive():
                    ctx = mp.get_context("spawn")
                    self.conn, child = ctx.Pipe()
                    self.proc = ctx.Process(target=_sidecar_loop, args=(child,), daemon=True)
                    self.proc.start()
                    if not (self.conn.poll(60) and self.conn.recv() == "ready"):
                        raise RuntimeError("grading helper process did not start")
                self.conn.send((pred, gold, timeout_s))
                if self.conn.poll(timeout_s + self.slack_s):
                    return bool(self.conn.recv())
            except Exception:
                pass
            if self.proc is not None:
                self.proc.kill()
                self.proc.join()
            self.proc = None
            return False


def _sidecar_loop(conn) -> None:
    conn.send("ready")
    with contextlib.suppress(EOFError):  # the parent closed its end
        while True:
            conn.send(_math_equal_here(*conn.recv()))


_SIDECAR = _Sidecar()


def _math_equal(pred: str, gold: str, timeout_s: float) -> bool:
    pred, gold = (re.sub(r"^\$+|\$+$|\\%|%", "", s.replace("\x0c", "\\f")).strip() for s in (pred, gold))
    if not pred or not gold or _too_wild(pred) or _too_wild(gold):
        return False
    if "".join(pred.split()) == "".join(gold.split()):
        return True
    a, b = _as_fraction(pred), _as_fraction(gold)
    if a is not None and b is not None:
        return a == b
    if threading.current_thread() is threading.main_thread():
        return _math_equal_here(pred, gold, timeout_s)
    return _SIDECAR.check(pred, gold, timeout_s)


def _number_equal(pred: str, gold: str, precision: int | None, integer: bool) -> bool:
    p, g = _number_text(pred), _number_text(gold)
    p, g = (_as_fraction(p) if p else None), (_as_fraction(g) if g else None)
    if p is None or g is None:
        return False
    if integer:
        return p.denominator == 1 and p == g
    if precision is not None:
        return round(p, int(precision)) == round(g, int(precision))
    return abs(p - g) <= Fraction(1, 10**6) * max(abs(g), Fraction(1, 1000))


def verify(pred: str | None, gold: str, kind: str, *, timeout_s: float = 2.0, precision: int | None = None,
           unit: str | None = None) -> bool:
    """Is the extracted answer `pred` equal to `gold` under `kind`? Never raises on `pred`; None is wrong.

    math: math-verify equality (leading zeros, fractions vs decimals, \\text{} options, degrees; percent signs
    dropped; a JSON-mangled form feed read back as "\\f") bounded by `timeout_s`. int: exact integer.
    number: equal after rounding both to `precision` decimals (MathVista) or within relative tolerance 1e-6.
    A trailing `unit` is stripped from `pred`. choice: same letter, case-insensitive. multi_choice: same set.
    """
    _check_kind(kind)
    if not isinstance(pred, str):
        return False
    try:
        if unit:  # a trailing unit, bare or in \text{}, is dropped ((?<!\s): a match starts where its blanks do)
            pred = re.sub(rf"(?<!\s)\s*(?:\\text\{{\s*)?{re.escape(unit)}\s*(?:\}}\s*)?\.?$", "", pred.strip())
        if kind == "math":
            return _math_equal(pred, str(gold), timeout_s)
        if kind in ("int", "number"):
            return _number_equal(pred, str(gold), precision, integer=kind == "int")
        if kind == "choice":
            letter = _letter(_strip_wrappers(pred))
            return letter is not None and letter == str(gold).strip().upper()
        got = _letter_set(pred)
        return got is not None and got == _letter_set(str(gold))
    except Exception:
        return False


def grade(text: str, gold: str, kind: str, **kw) -> bool:
    """extract_answer + verify; never raises on model output. `choices` goes to extraction, the rest
    (timeout_s, precision, unit) to verify. An unknown `kind` is a caller bug and raises ValueError."""
    _check_kind(kind)
    choices = kw.pop("choices", None)
    try:
        return verify(extract_answer(text, kind, choices=choices), gold, kind, **kw)
    except Exception:
        return False


def _grade_item(text: str, gold: str, kind: str, kw: dict) -> bool:
    return grade(text, gold, kind, **kw)


@functools.lru_cache(maxsize=None)
def _pool(workers: int) -> ProcessPoolExecutor:
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("forkserver"))
    atexit.register(pool.shutdown, wait=False, cancel_futures=True)
    return pool


def grade_many(texts: list[str], golds: list[str], kind: str | list[str], *, workers: int = 0,
               item_kw: list[dict] | None = None, **kw) -> list[bool]:
    """Grade many responses in order. `kind`: one kind or one per item; `item_kw`: one dict per item (e.g.
    MathVista's precision, choices) merged over `kw`. workers > 1 uses a cached process pool (each worker's
    main thread keeps the signal deadline, so every item stays bounded); a broken pool falls back to serial."""
    kinds = [kind] * len(texts) if isinstance(kind, str) else list(kind)
    extra = item_kw if item_kw is not None else [{}] * len(texts)
    if not len(texts) == len(golds) == len(kinds) == len(extra):
        raise ValueError(f"lengths differ: texts {len(texts)}, golds {len(golds)}, kind {len(kinds)}, "
                         f"item_kw {len(extra)}; all must be equal")
    for k in set(kinds):
        _check_kind(k)
    kws = [{**kw, **e} for e in extra]
    if workers > 1 and len(texts) > 1:
        try:
            chunk = max(1, len(texts) // (workers * 8))
            return list(_pool(workers).map(_grade_item, texts, golds, kinds, kws, chunksize=chunk))
        except BrokenProcessPool:
            _pool.cache_clear()
    return list(map(_grade_item, texts, golds, kinds, kws))


def format_reward(text: str) -> bool:
    """True iff `text` holds exactly one \\boxed{...} (or \\fbox{...}) with closed braces and non-empty content."""
    boxes = _boxed_contents(text) if isinstance(text, str) else []
    return len(boxes) == 1 and boxes[0] is not None and boxes[0].strip() != ""
