"""Answer verification and grading, shared by the RL reward and the evaluation harness (extraction:
`seqrl.eval.extraction`, re-exported here; math fast paths: `seqrl.eval.fastgrade`).

Safe on model output: extraction scans in linear time, verification never raises (a hostile answer is just wrong)
and every math check has a hard deadline. math-verify's own timeouts use ``signal.alarm`` (whole seconds); we
switch them off and put one ``signal.setitimer`` deadline (float seconds, re-firing every 50 ms in case a library
swallows the first interrupt) around parse + verify. Signals only work in the main thread; from other threads the
check runs in a spawned helper process, killed if it overruns. Cheap pre-filters (length, nesting, factorial towers
such as ((12!)!)!, whose billion-digit values C code builds out of any signal's reach) reject absurd answers early.
Most answers never reach math-verify's slow LaTeX parser: `seqrl.eval.fastgrade` gives its verdicts for plain
numbers, tuples and `x = n` (fast_paths=False turns that off); grade_many parses each gold once per chunk of a batch.
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
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from fractions import Fraction

from math_verify import parse as _mv_parse, verify as _mv_verify

from seqrl.eval import fastgrade
from seqrl.eval.extraction import (ANSWER_KINDS, _as_fraction, _boxed_contents, _check_kind, _letter,  # noqa: F401
                                   _letter_set, _number_text, _strip_wrappers, extract_answer)  # (re-exported)

MAX_ANSWER_CHARS = 600  # a longer final answer is never right on our benchmarks; sympy never sees it
MAX_NESTING = 10  # deeper brackets are rejected: parse time grows exponentially with depth
CHUNKS_PER_WORKER = 4  # grade_many: chunks per pool worker (fewer, larger chunks: less IPC, coarser balance)
_TOWER_RE = re.compile(r"(?s)^(?=.*(?:(?<!\\)!(?!=)|\\Gamma|binom|choose|gcd|lcm))(?=.*(?:\^|\d{4}|!!!|[)}\]]\s*!))")
# an exponent that is itself a power of a number (10^{10^{10}}, 9^9^9): with a zero factor in front, sympy's
# comparison against a polynomial gold expands it in C code no signal stops (`010^{10^{10^{10}}}` vs `x^2+1`: 12 s)
_EXP_TOWER_RE = re.compile(r"\^\s*(?:\{\s*)?\(?\s*\d+(?:\.\d*)?\s*\^")
for _name in ("math_verify.parser", "math_verify.grader"):  # we disable its timeouts on purpose
    logging.getLogger(_name).addFilter(lambda record: "Timeout is disabled" not in record.getMessage())


class _Deadline(BaseException):
    """Raised by our SIGALRM handler; a BaseException so library `except Exception` blocks cannot eat it."""


# -------------------------------------------------------------------------------------------- verification
def _too_wild(s: str) -> bool:
    """Cheap guard: too long, too deep, a factorial tower (factorial, \\Gamma, binom, gcd, lcm with ^, 4 digits, !!!,
    (.)!) or a numeric exponent tower (a^{b^c} with b a number)."""
    depths = itertools.accumulate(1 if ch in "{([" else -1 if ch in "})]" else 0 for ch in s)
    return (len(s) > MAX_ANSWER_CHARS or max(depths, default=0) > MAX_NESTING or _TOWER_RE.match(s) is not None
            or _EXP_TOWER_RE.search(s) is not None)


def _parse(latex: str, fast: bool) -> list:
    """math-verify's parse of one answer (fast: plain numbers built without its LaTeX parser, same result)."""
    quick = fastgrade.quick_parse(latex) if fast else None
    return quick if quick is not None else _mv_parse("\\boxed{" + latex + "}", parsing_timeout=None)


def _with_deadline(fn, timeout_s: float) -> bool | None:
    """Run fn() (main thread only) under a SIGALRM deadline; None when time ran out.

    The alarm repeats every 50 ms until fn stops: a _Deadline raised inside a finalizer (`__del__`, a weakref
    callback) cannot propagate; Python hands it to sys.unraisablehook, where ours drops it silently, and the next
    alarm lands in fn's own frames."""
    armed = [True]

    def on_alarm(signum, frame):
        if armed[0]:
            raise _Deadline()

    def on_unraisable(meta):  # another object's report goes on, with the alarm held off while it is written
        if not isinstance(meta.exc_value, _Deadline):
            was, armed[0] = armed[0], False
            try:
                previous_hook(meta)
            finally:
                armed[0] = was

    previous, previous_hook = signal.signal(signal.SIGALRM, on_alarm), sys.unraisablehook
    sys.unraisablehook = on_unraisable
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
        sys.unraisablehook = previous_hook


def _math_equal_here(pred: str, gold: str, timeout_s: float, fast: bool = False) -> bool:
    """parse + verify under our deadline (main thread); fast=False: math-verify's own parser for both answers."""
    def check() -> bool:
        g, p = fastgrade.batch_cached("golds", (gold, fast), lambda: _parse(gold, fast)), _parse(pred, fast)
        if fast and fastgrade.both_rational(g, p):
            return g[0] == p[0]
        return _mv_verify(g, p, timeout_seconds=None)

    try:
        return bool(_with_deadline(check, timeout_s))
    except Exception:
        return False


class _Sidecar:
    """A spawned process running math checks for non-main threads (no signals there), one call at a time.
    A call overrunning its deadline by `slack_s` gets it killed (the only way to stop a hang in C code)."""

    slack_s = 1.0

    def __init__(self) -> None:
        self.lock, self.proc, self.conn = threading.Lock(), None, None

    def check(self, pred: str, gold: str, timeout_s: float, fast: bool = False) -> bool:
        with self.lock:
            try:
                if self.proc is None or not self.proc.is_alive():
                    ctx = mp.get_context("spawn")
                    self.conn, child = ctx.Pipe()
                    self.proc = ctx.Process(target=_sidecar_loop, args=(child,), daemon=True)
                    self.proc.start()
                    if not (self.conn.poll(60) and self.conn.recv() == "ready"):
                        raise RuntimeError("grading helper process did not start")
                self.conn.send((pred, gold, timeout_s, fast))
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


def _clean(s: str) -> str:
    """An answer as the math check sees it: outer $ signs and percent signs dropped, a form feed read as "\\f"."""
    return re.sub(r"^\$+|\$+$|\\%|%", "", s.replace("\x0c", "\\f")).strip()


def math_path(pred: str, gold: str) -> str:
    """Which path decides a math check of an extracted answer with fast paths on (for benchmarks): rejected,
    exact, rational, quick-parse (both answers built without the LaTeX parser) or math-verify (its parser)."""
    pred, gold = _clean(pred), _clean(gold)
    if not pred or not gold or _too_wild(pred) or _too_wild(gold):
        return "rejected"
    return fastgrade.fast_path(pred, gold)


def _math_equal(pred: str, gold: str, timeout_s: float, fast: bool = True) -> bool:
    """Pre-filters, then (fast) the parser-free checks, then parse + verify under the deadline, once per batch."""
    pred, gold = _clean(pred), _clean(gold)
    if not pred or not gold or _too_wild(pred) or _too_wild(gold):
        return False
    cheap = fastgrade.cheap_verdict(pred, gold) if fast else None
    if cheap is not None:
        return cheap[1]
    here = threading.current_thread() is threading.main_thread()
    check = _math_equal_here if here else _SIDECAR.check  # signals work in the main thread only
    return fastgrade.batch_cached("verdicts", (pred, gold, timeout_s, fast), lambda: check(pred, gold, timeout_s, fast))


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
           unit: str | None = None, fast_paths: bool = True) -> bool:
    """Is the extracted answer `pred` equal to `gold` under `kind`? Never raises on `pred`; None is wrong.

    math: math-verify equality (leading zeros, fractions vs decimals, \\text{} options, degrees; percent signs
    dropped; a JSON-mangled form feed read back as "\\f") bounded by `timeout_s`. int: exact integer.
    number: equal after rounding both to `precision` decimals (MathVista) or within relative tolerance 1e-6.
    A trailing `unit` is stripped from `pred`. choice: same letter, case-insensitive. multi_choice: same set.
    fast_paths=False sends every math check through math-verify's parser (the same verdicts, except answers equal
    up to spaces, which the fast path calls equal: seqrl.eval.fastgrade).
    """
    _check_kind(kind)
    if not isinstance(pred, str):
        return False
    try:
        if unit:  # a trailing unit, bare or in \text{}, is dropped ((?<!\s): a match starts where its blanks do)
            pred = re.sub(rf"(?<!\s)\s*(?:\\text\{{\s*)?{re.escape(unit)}\s*(?:\}}\s*)?\.?$", "", pred.strip())
        if kind == "math":
            return _math_equal(pred, str(gold), timeout_s, fast_paths)
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


def _grade_chunk(items: list[tuple]) -> list[bool]:
    """Grade (text, gold, kind, kw) items in one batch: each gold parsed once, each repeated answer checked once."""
    with fastgrade.batch():
        return [grade(text, gold, kind, **kw) for text, gold, kind, kw in items]


@functools.lru_cache(maxsize=None)
def _pool(workers: int) -> ProcessPoolExecutor:
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("forkserver"))
    atexit.register(pool.shutdown, wait=False, cancel_futures=True)
    return pool


def grade_many(texts: list[str], golds: list[str], kind: str | list[str], *, workers: int = 0,
               item_kw: list[dict] | None = None, **kw) -> list[bool]:
    """Grade many responses in order. `kind`: one kind or one per item; `item_kw`: one dict per item (e.g.
    MathVista's precision, choices) merged over `kw`. workers > 1 sends contiguous chunks (a prompt's samples stay
    together) to a cached process pool (each worker's main thread keeps the signal deadline, so every item stays
    bounded); a broken pool falls back to serial."""
    kinds = [kind] * len(texts) if isinstance(kind, str) else list(kind)
    extra = item_kw if item_kw is not None else [{}] * len(texts)
    if not len(texts) == len(golds) == len(kinds) == len(extra):
        raise ValueError(f"lengths differ: texts {len(texts)}, golds {len(golds)}, kind {len(kinds)}, "
                         f"item_kw {len(extra)}; all must be equal")
    for k in set(kinds):
        _check_kind(k)
    items = [(t, g, k, {**kw, **e}) for t, g, k, e in zip(texts, golds, kinds, extra)]
    if workers > 1 and len(items) > 1:
        size = -(-len(items) // (workers * CHUNKS_PER_WORKER))
        try:
            chunks = _pool(workers).map(_grade_chunk, [items[i:i + size] for i in range(0, len(items), size)])
            return [ok for chunk in chunks for ok in chunk]
        except BrokenProcessPool:
            _pool.cache_clear()
    return _grade_chunk(items)


def format_reward(text: str) -> bool:
    """True iff `text` holds exactly one \\boxed{...} (or \\fbox{...}) with closed braces and non-empty content."""
    boxes = _boxed_contents(text) if isinstance(text, str) else []
    return len(boxes) == 1 and boxes[0] is not None and boxes[0].strip() != ""
