"""Generated tasks: offline prompt generators with rule-checked answers and demonstrations.

A task draws a `Sample` from a `random.Random` and writes a demonstration for it in one of two styles:
"worked" (show the intermediate steps, then the boxed answer) or "direct" (only the boxed answer). They exist to
study length: on `arith_chain` a small model that works step by step is more accurate than one that answers
directly, so a length-aware RL algorithm should learn to write longer responses there.

- `arith_chain`: "Compute 7+5-3+8." -> worked "7+5=12\\n12-3=9\\n9+8=17\\n\\boxed{17}", direct "\\boxed{17}".
  Every worked step is a single one- or two-digit operation, while a direct answer needs the whole chain at once.
- `image_count`: a 112x112 RGB image with 1-6 solid shapes -> "How many shapes are in the image?" (or one
  colour's shapes); worked "red circle, blue square, so 2 shapes. \\boxed{2}".

Register a new task with `@register_task("name")`; build one with `build_task(name, **kwargs)`.
"""
from __future__ import annotations

import inspect
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Protocol

from PIL import Image, ImageDraw

STYLES = ("worked", "direct")


@dataclass
class Sample:
    """One prompt: user-turn text (template applied), gold answer string, answer kind, optional images."""

    prompt: str
    answer: str
    kind: str
    images: Optional[List[Image.Image]] = None
    meta: Dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    """A generated task: draws samples and writes demonstrations ending with \\boxed{answer}."""

    def sample(self, rng: random.Random) -> Sample: ...

    def demonstration(self, sample: Sample, style: str) -> str: ...


TASKS: Dict[str, Callable[..., Task]] = {}


def register_task(name: str) -> Callable:
    """Class decorator: make a task buildable as `build_task(name, **kwargs)`."""

    def deco(cls: Callable) -> Callable:
        TASKS[name] = cls
        return cls

    return deco


def build_task(name: Optional[str], **kwargs: Any) -> Task:
    """Build the registered task `name`; unknown names and unknown kwargs raise a one-line ValueError."""
    if name not in TASKS:
        raise ValueError(f"data.task={name!r}: unknown task; allowed: {', '.join(sorted(TASKS))}")
    allowed = [p for p in inspect.signature(TASKS[name]).parameters]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"data.task_kwargs: unknown key(s) {', '.join(unknown)} for task {name}; "
                         f"allowed: {', '.join(allowed)}")
    return TASKS[name](**kwargs)


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"style={style!r}: allowed: {', '.join(STYLES)}")


def boxed(answer: Any) -> str:
    return "\\boxed{" + str(answer) + "}"


# ----------------------------------------------------------------------------------------------- arith_chain
_STEP = re.compile(r"^(-?\d+)([+-])(\d+)=(-?\d+)$")


def response_style(text: str) -> str:
    """'worked' if the response writes at least one step "a+b=c" (or "a-b=c") before its answer, else 'direct'."""
    return "worked" if any(_STEP.match(line.strip()) for line in text.splitlines()) else "direct"


def parse_steps(text: str) -> List[tuple]:
    """The (a, op, b, c) steps of a worked arithmetic response, one per line of the form "a+b=c"."""
    steps = []
    for line in text.splitlines():
        m = _STEP.match(line.strip())
        if m:
            steps.append((int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))))
    return steps


@register_task("arith_chain")
class ArithChain:
    """Sum/difference chains of small integers: "Compute 7+5-3+8." (the length-sensitive task).

    n_terms: number of operands, an int or an inclusive [low, high] range (default 3-5); operands are drawn
    uniformly from [min_operand, max_operand] (default 1-9); each operator uniformly from `ops` (a subset of "+-").
    Unless `allow_negative`, a "-" whose operand would take the running total below zero draws its operand from
    [min_operand, total] instead, or becomes "+" when the total is below min_operand: every partial result stays
    >= 0, so steps and answers are short digit strings. With the defaults a prompt has at most 18 characters, a
    worked demonstration at most 42 and a direct one at most 10.
    """

    kind = "int"
    styles = STYLES

    def __init__(self, n_terms: Any = (3, 5), min_operand: int = 1, max_operand: int = 9, ops: str = "+-",
                 allow_negative: bool = False) -> None:
        low, high = (n_terms, n_terms) if isinstance(n_terms, int) else tuple(n_terms)
        if not 2 <= low <= high:
            raise ValueError(f"data.task_kwargs.n_terms={n_terms!r}: allowed: an int >= 2 or [low, high] "
                             "with 2 <= low <= high")
        if not 0 <= min_operand <= max_operand:
            raise ValueError(f"data.task_kwargs.min_operand={min_operand}, max_operand={max_operand}: "
                             "allowed: 0 <= min_operand <= max_operand")
        if not ops or set(ops) - set("+-"):
            raise ValueError(f"data.task_kwargs.ops={ops!r}: allowed: a non-empty subset of '+-'")
        if "+" not in ops and not allow_negative:
            raise ValueError(f"data.task_kwargs.ops={ops!r}: needs '+' unless allow_negative=true")
        self.n_terms, self.ops, self.allow_negative = (low, high), sorted(set(ops)), allow_negative
        self.min_operand, self.max_operand = min_operand, max_operand

    def sample(self, rng: random.Random) -> Sample:
        """Draw one chain; meta holds the terms, the operators and the partial results."""
        total = rng.randint(self.min_operand, self.max_operand)
        terms, ops, partials = [total], [], []
        for _ in range(rng.randint(*self.n_terms) - 1):
            op, hi = rng.choice(self.ops), self.max_operand
            if op == "-" and not self.allow_negative:
                if total < self.min_operand:
                    op = "+"
                else:
                    hi = min(hi, total)
            x = rng.randint(self.min_operand, hi)
            total = total + x if op == "+" else total - x
            terms, ops, partials = terms + [x], ops + [op], partials + [total]
        chain = str(terms[0]) + "".join(f"{o}{x}" for o, x in zip(ops, terms[1:]))
        meta = {"task": "arith_chain", "terms": terms, "ops": ops, "partials": partials, "key": chain}
        return Sample(prompt=f"Compute {chain}.", answer=str(total), kind=self.kind, meta=meta)

    def demonstration(self, sample: Sample, style: str) -> str:
        """"worked": one line "a+b=c" per operation, then \\boxed{answer}; "direct": \\boxed{answer} alone."""
        _check_style(style)
        if style == "direct":
            return boxed(sample.answer)
        m = sample.meta
        lefts = [m["terms"][0]] + m["partials"][:-1]
        lines = [f"{a}{o}{x}={c}" for a, o, x, c in zip(lefts, m["ops"], m["terms"][1:], m["partials"])]
        return "\n".join(lines + [boxed(sample.answer)])

    response_style = staticmethod(response_style)


# ----------------------------------------------------------------------------------------------- image_count
COLORS = {"red": (220, 30, 30), "green": (30, 150, 50), "blue": (40, 70, 220), "yellow": (230, 190, 0)}
SHAPES = ("circle", "square", "triangle")


def draw_shapes(shapes: List[Dict[str, Any]], size: int) -> Image.Image:
    """Render solid shapes (dicts with color, shape, x, y, s: top-left corner and side) on a white RGB canvas."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for d in shapes:
        x, y, s, rgb = d["x"], d["y"], d["s"], COLORS[d["color"]]
        if d["shape"] == "circle":
            draw.ellipse([x, y, x + s - 1, y + s - 1], fill=rgb)
        elif d["shape"] == "square":
            draw.rectangle([x, y, x + s - 1, y + s - 1], fill=rgb)
        else:
            draw.polygon([(x + s // 2, y), (x, y + s - 1), (x + s - 1, y + s - 1)], fill=rgb)
    return img


@register_task("image_count")
class ImageCount:
    """Count solid coloured shapes in a generated image (task for the vision-language model).

    The canvas (image_size x image_size, default 112) is cut into a 4x4 grid; n shapes (min_shapes..max_shapes,
    default 1-6) go into n distinct random cells, each with a random side (45-80% of a cell) and offset that keeps
    a 2-pixel margin, so shapes never touch: the answer equals the number of connected non-white blobs.
    question: "total" (count all shapes), "color" (count one colour present in the image) or "mixed" (either,
    50/50). Demonstrations list the counted shapes in reading order (cell by cell, left to right, top to bottom).
    """

    kind = "int"
    styles = STYLES
    grid = 4

    def __init__(self, min_shapes: int = 1, max_shapes: int = 6, image_size: int = 112,
                 question: str = "total") -> None:
        if not 1 <= min_shapes <= max_shapes <= self.grid ** 2:
            raise ValueError(f"data.task_kwargs.min_shapes={min_shapes}, max_shapes={max_shapes}: "
                             f"allowed: 1 <= min_shapes <= max_shapes <= {self.grid ** 2}")
        if image_size < 16 * self.grid:  # a cell must hold a shape plus its 2-pixel margins
            raise ValueError(f"data.task_kwargs.image_size={image_size}: allowed: >= {16 * self.grid}")
        if question not in ("total", "color", "mixed"):
            raise ValueError(f"data.task_kwargs.question={question!r}: allowed: total, color, mixed")
        self.n_shapes, self.image_size, self.question = (min_shapes, max_shapes), image_size, question

    def sample(self, rng: random.Random) -> Sample:
        """Draw a layout, render it; meta holds the shapes (reading order) and the counted colour (or None)."""
        cell = self.image_size // self.grid
        cells = sorted(rng.sample(range(self.grid ** 2), rng.randint(*self.n_shapes)))
        shapes = []
        for c in cells:
            s = rng.randint(int(0.45 * cell), int(0.8 * cell))
            x = (c % self.grid) * cell + rng.randint(2, cell - s - 2)
            y = (c // self.grid) * cell + rng.randint(2, cell - s - 2)
            shapes.append({"color": rng.choice(sorted(COLORS)), "shape": rng.choice(SHAPES), "x": x, "y": y, "s": s})
        mode = self.question if self.question != "mixed" else rng.choice(["total", "color"])
        color = rng.choice(sorted({d["color"] for d in shapes})) if mode == "color" else None
        counted = [d for d in shapes if color in (None, d["color"])]
        prompt = f"How many {color + ' ' if color else ''}shapes are in the image?"
        key = prompt + "|" + ";".join(f"{d['color']},{d['shape']},{d['x']},{d['y']},{d['s']}" for d in shapes)
        meta = {"task": "image_count", "shapes": shapes, "color": color, "count": len(counted), "key": key}
        return Sample(prompt=prompt, answer=str(len(counted)), kind=self.kind,
                      images=[draw_shapes(shapes, self.image_size)], meta=meta)

    def demonstration(self, sample: Sample, style: str) -> str:
        """"worked": "red circle, blue square, so 2 shapes. \\boxed{2}"; "direct": \\boxed{2} alone."""
        _check_style(style)
        if style == "direct":
            return boxed(sample.answer)
        color, n = sample.meta["color"], int(sample.answer)
        names = [f"{d['color']} {d['shape']}" for d in sample.meta["shapes"] if color in (None, d["color"])]
        noun = f"{color + ' ' if color else ''}shape{'' if n == 1 else 's'}"
        return f"{', '.join(names)}, so {n} {noun}. {boxed(n)}"
